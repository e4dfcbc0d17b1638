"""RefCOCO, RefCOCO+, RefCOCOg and RefCLEF in the REFER layout (Yu et al. / lichengunc/refer).

    <root>/<dataset>/refs(<split_by>).p   pickled list of refs: ref_id, ann_id, image_id, split,
                                          sentences [{sent, raw, tokens, sent_id}], category_id, ...
    <root>/<dataset>/instances.json       COCO-style images (id, file_name, height, width) and
                                          annotations (id, image_id, segmentation, bbox, ...)
    <image_dir>/<file_name>               COCO train2014 images (RefCLEF: saiapr_tc-12)

A ref's own ``file_name`` carries an ``_<ann_id>`` suffix and is not a real file; the image file
is the one named in ``instances.json``. Every sentence of every ref of the split is one sample.
"""

from __future__ import annotations

from pathlib import Path

from stamp.data.io import DataError, read_json
from stamp.data.records import RecordDataset
from stamp.data.safe_pickle import safe_load

# dataset -> the split schemes its REFER release ships (refs(<split_by>).p)
REFER_DATASETS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
}


def index_coco(instances: dict, path: Path) -> tuple[dict, dict]:
    """(images by id, annotations by id) of a COCO-style instances file."""
    for key in ("images", "annotations"):
        if not isinstance(instances, dict) or key not in instances:
            raise DataError(f"{path}: not a COCO instances file (no {key!r} list)")
    return {im["id"]: im for im in instances["images"]}, {a["id"]: a for a in instances["annotations"]}


def split_records(refs: list, split: str, refs_path: Path) -> list:
    """The refs of one split; an unknown split raises, listing the file's splits."""
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DataError(f"{refs_path}: expected a list of ref dicts")
    present = sorted({str(r.get("split")) for r in refs})
    if split not in present:
        raise ValueError(
            f"unknown split {split!r} for {refs_path.parent.name} ({refs_path.name}); valid splits: {present}"
        )
    return [r for r in refs if r.get("split") == split]


def ref_texts(ref: dict) -> list[str]:
    """Every sentence of a ref, in order, stripped: the reference evaluations score each one,
    an empty sentence included, so a split has exactly their number of expressions."""
    return [str(s.get("sent", "")).strip() for s in ref.get("sentences", [])]


class ReferSegDataset(RecordDataset):
    """Referring expression segmentation from a REFER release.

    Args:
        root: the folder holding ``refcoco/``, ``refcoco+/``, ... (``refer_seg`` in the paper's tree).
        dataset: ``refcoco``, ``refcoco+``, ``refcocog`` or ``refclef``.
        split_by: the split scheme (``unc``; ``umd`` for refcocog; ``google``, ``berkeley``).
        split: a split of that scheme, e.g. ``train``, ``val``, ``testA``, ``testB``, ``test``.
        image_dir: the folder of the images named in ``instances.json``.
        **kwargs: see ``RecordDataset`` (prepared_dir, repeats, seed, prompts, texts, limit).
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split: str,
        image_dir: str | Path,
        split_by: str = "unc",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if dataset not in REFER_DATASETS:
            raise ValueError(f"unknown REFER dataset {dataset!r}; valid datasets: {sorted(REFER_DATASETS)}")
        if split_by not in REFER_DATASETS[dataset]:
            raise ValueError(
                f"unknown split_by {split_by!r} for {dataset}; valid: {list(REFER_DATASETS[dataset])}"
            )
        self.root, self.dataset, self.split_by, self.split = Path(root), dataset, split_by, split
        self.image_dir = Path(image_dir)

    @property
    def name(self) -> str:
        return f"{self.dataset}|{self.split_by}|{self.split}"

    @property
    def refs_path(self) -> Path:
        return self.root / self.dataset / f"refs({self.split_by}).p"

    @property
    def instances_path(self) -> Path:
        return self.root / self.dataset / "instances.json"

    def source_files(self) -> list[tuple[Path, str]]:
        return [(self.refs_path, self.refs_path.name), (self.instances_path, self.instances_path.name)]

    def read_raw(self) -> list[dict]:
        refs = split_records(safe_load(self.refs_path), self.split, self.refs_path)
        images, anns = index_coco(read_json(self.instances_path), self.instances_path)
        records = []
        for ref in refs:
            rid = ref.get("ref_id")
            rec = {
                "id": f"{self.dataset}_{self.split_by}_{rid}",
                "texts": ref_texts(ref),
                "kind": "refer",
                "source": f"{self.refs_path} ref {rid} (ann {ref.get('ann_id')})",
            }
            image, ann = images.get(ref.get("image_id")), anns.get(ref.get("ann_id"))
            if image is None:
                rec["error"] = (
                    f"{self.instances_path} has no image {ref.get('image_id')} (ref {rid} of {self.refs_path.name})"
                )
            elif ann is None or "segmentation" not in ann:
                rec["error"] = (
                    f"{self.instances_path} has no annotation {ref.get('ann_id')} with a segmentation "
                    f"(ref {rid} of {self.refs_path.name})"
                )
            else:
                rec.update(
                    image=image["file_name"],
                    size=[int(image["height"]), int(image["width"])],
                    masks=[[ann["segmentation"]]],
                )
            records.append(rec)
        return records

    def image_path(self, rec: dict) -> Path:
        return self.image_dir / rec["image"]
