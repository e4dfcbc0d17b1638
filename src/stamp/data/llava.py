"""The LLaVA-v1.5 instruction mix (``llava_v1_5_mix665k.json``): dialogue data for the "uni" model.

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]},
     {"id": "i6IyJda_0", "conversations": [...]},   # no "image": a text-only chat
     ...]

An image path's first folder (coco, gqa, ocr_vqa, textvqa, vg) picks its root in ``image_dirs``
(default: ``image_dir/<folder>``). The ``<image>`` placeholder is removed from the text: the
collator puts the image itself at the start of the first user turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stamp.data.io import DataError, load_image, read_json
from stamp.data.records import RecordDataset
from stamp.data.sample import Sample
from stamp.model.tokens import MASK_TOKEN, SEG_TOKEN

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}


def chat_messages(rec: dict) -> list[dict[str, str]]:
    """The conversation as alternating user/assistant messages, ``<image>`` removed.

    A trailing unanswered question is dropped; a conversation without an answer, with an
    unknown speaker or out of turn raises ``DataError``.
    """
    where = f"LLaVA entry {rec.get('id')!r}"
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: no 'conversations' list")
    messages = []
    for k, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in ROLES:
            raise DataError(f"{where}: turn {k} is from {speaker!r}; expected one of {sorted(ROLES)}")
        role = ROLES[speaker]
        if role != ("user", "assistant")[k % 2]:
            raise DataError(
                f"{where}: turn {k} is from {speaker!r} out of turn (human and gpt must alternate)"
            )
        text = str(turn.get("value", ""))
        if IMAGE_PLACEHOLDER in text:
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        if SEG_TOKEN in text or MASK_TOKEN in text:
            raise DataError(f"{where}: turn {k} contains STAMP's special token {SEG_TOKEN} or {MASK_TOKEN}")
        messages.append({"role": role, "content": text})
    if messages[-1]["role"] == "user":
        messages.pop()
    if not messages:
        raise DataError(f"{where}: no answer in the conversation")
    return messages


class LlavaDataset(RecordDataset):
    """LLaVA-style conversations, with an image or text-only.

    Args:
        json_path: ``llava_v1_5_mix665k.json`` (or any file in that format).
        image_dir: the folder the entries' relative image paths start from.
        image_dirs: overrides per first path component, e.g. ``{gqa: /data/gqa}``.
        **kwargs: see ``RecordDataset`` (prompts and texts do not apply).
    """

    def __init__(
        self,
        json_path: str | Path,
        image_dir: str | Path,
        image_dirs: Mapping[str, str | Path] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.json_path, self.image_dir = Path(json_path), Path(image_dir)
        self.image_dirs = {str(k): Path(v) for k, v in (image_dirs or {}).items()}

    @property
    def name(self) -> str:
        return f"llava|{self.json_path.stem}"

    def source_files(self) -> list[tuple[Path, str]]:
        return [(self.json_path, self.json_path.name)]

    def read_raw(self) -> list[dict]:
        entries = read_json(self.json_path)
        if not isinstance(entries, list):
            raise DataError(f"{self.json_path}: expected a JSON list of conversations")
        records = []
        for k, e in enumerate(entries):
            if not isinstance(e, dict):
                records.append({"id": str(k), "error": f"{self.json_path}: entry {k} is not an object"})
                continue
            rec = {"id": str(e.get("id", k)), "conversations": e.get("conversations")}
            if e.get("image"):
                rec["image"] = str(e["image"])
            records.append(rec)
        return records

    def image_path(self, rec: dict) -> Path:
        rel = Path(rec["image"])
        head = rel.parts[0] if len(rel.parts) > 1 else None
        if head in self.image_dirs:
            return self.image_dirs[head].joinpath(*rel.parts[1:])
        return self.image_dir / rel

    def make_sample(self, rec: dict, t: int, rng: np.random.Generator | None) -> Sample:
        if "error" in rec:
            raise DataError(rec["error"])
        messages = chat_messages(rec)
        image = load_image(self.image_path(rec)) if rec.get("image") else None
        return Sample(
            image=image,
            messages=messages,
            kind="vqa" if image is not None else "text",
            id=f"llava_{rec['id']}",
        )
