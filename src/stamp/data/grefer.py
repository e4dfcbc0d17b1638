"""gRefCOCO (generalised referring expressions: one, several or no target).

    <root>/grefs(<split_by>).json   JSON list of refs (a ``grefs(<split_by>).p`` pickle also works):
                                    ref_id, image_id, ann_id (a LIST; [-1] = no target), split,
                                    sentences [{sent, raw, tokens, sent_id}], no_target (optional)
    <root>/instances.json           COCO-style images and annotations
    <image_dir>/<file_name>         COCO train2014 images

One ``<|seg|>`` per expression: a multi-target expression's ground truth is the union of its
objects, a no-target expression's is all zero (docs/METHOD.md section 3).
"""

from __future__ import annotations

from pathlib import Path

from stamp.data.io import read_json
from stamp.data.records import RecordDataset
from stamp.data.refer import index_coco, ref_texts, split_records
from stamp.data.safe_pickle import safe_load


def target_ids(ref: dict) -> list:
    """The annotation ids a ref points at, without the no-target marker -1."""
    ids = ref.get("ann_id", [])
    ids = ids if isinstance(ids, list | tuple) else [ids]
    return [i for i in ids if i != -1]


class GReferSegDataset(RecordDataset):
    """Generalised referring segmentation from gRefCOCO.

    Args:
        root: the ``grefcoco`` folder.
        split: ``train``, ``val``, ``testA`` or ``testB``.
        image_dir: the COCO train2014 image folder.
        split_by: the split scheme in the file name (``unc``).
        **kwargs: see ``RecordDataset``.
    """

    family = "gref"

    def __init__(
        self, root: str | Path, split: str, image_dir: str | Path, split_by: str = "unc", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.root, self.split, self.split_by, self.image_dir = Path(root), split, split_by, Path(image_dir)

    @property
    def name(self) -> str:
        return f"grefcoco|{self.split_by}|{self.split}"

    @property
    def refs_path(self) -> Path:
        json_path = self.root / f"grefs({self.split_by}).json"
        pickle_path = json_path.with_suffix(".p")
        return pickle_path if not json_path.exists() and pickle_path.exists() else json_path

    @property
    def instances_path(self) -> Path:
        return self.root / "instances.json"

    def source_files(self) -> list[tuple[Path, str]]:
        return [(self.refs_path, self.refs_path.name), (self.instances_path, self.instances_path.name)]

    def read_raw(self) -> list[dict]:
        path = self.refs_path
        grefs = safe_load(path) if path.suffix == ".p" else read_json(path)
        refs = split_records(grefs, self.split, path)
        images, anns = index_coco(read_json(self.instances_path), self.instances_path)
        records = []
        for ref in refs:
            rid, ids = ref.get("ref_id"), target_ids(ref)
            kind = "none" if not ids else ("multi" if len(ids) > 1 else "refer")
            rec = {
                "id": f"grefcoco_{self.split_by}_{rid}",
                "texts": ref_texts(ref),
                "kind": kind,
                "source": f"{path} ref {rid} (anns {ref.get('ann_id')})",
            }
            image = images.get(ref.get("image_id"))
            missing = [i for i in ids if i not in anns or "segmentation" not in anns[i]]
            if image is None:
                rec["error"] = (
                    f"{self.instances_path} has no image {ref.get('image_id')} (ref {rid} of {path.name})"
                )
            elif missing:
                rec["error"] = (
                    f"{self.instances_path} has no annotation(s) {missing} (ref {rid} of {path.name})"
                )
            elif ref.get("no_target") and ids:
                rec["error"] = f"{path} ref {rid} is marked no_target but points at annotations {ids}"
            else:
                rec.update(
                    image=image["file_name"],
                    size=[int(image["height"]), int(image["width"])],
                    masks=[[anns[i]["segmentation"] for i in ids]],
                )
            records.append(rec)
        return records

    def image_path(self, rec: dict) -> Path:
        return self.image_dir / rec["image"]
