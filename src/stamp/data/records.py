"""Records, the plain-JSON form every real-data reader produces, and ``RecordDataset``, which
turns records into ``Sample``s, from the raw files or from their prepared JSONL form.

A record is one annotated unit (a REFER ref, a ReasonSeg image, a LLaVA conversation):

    {"id": "refcoco_unc_17", "image": "COCO_train2014_000000581857.jpg", "size": [h, w],
     "texts": ["man on left", ...],            # every text is one sample
     "masks": [[seg, ...]],                    # per <|seg|>: COCO segmentations to unite ([] = none)
     "kind": "refer" | "multi" | "none" | "reason", "source": "refs(unc).p ref 17",
     "error": "..."}                           # present when the annotation is broken

Records from the raw files carry polygons as annotated; ``compact_record`` (run by
``stamp-prepare-data``) turns them into one compressed RLE per target. Both decode alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from stamp.data.io import DataError, load_image
from stamp.data.masks import check_segmentations, encode_rle, union_mask
from stamp.data.prompts import load_prompts
from stamp.data.sample import Sample

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: meta counts unreadable records; RLE lists (RefCLEF) decode
ERROR_EXAMPLES = 5  # unreadable records named in a summary
PROMPT_CHOICES = ("random", "fixed")
TEXT_MODES = ("all", "first")


def n_texts(rec: dict) -> int:
    """Samples a record yields: one per text (a broken record still yields one, which raises)."""
    if "texts" not in rec:
        return 1
    return max(len(rec["texts"]), 1 if "error" in rec else 0)


def record_error(rec: dict) -> str | None:
    """Why ``rec`` cannot be read (its ``error``, or a segmentation of the wrong layout or size),
    or None. Masks are checked, not decoded."""
    if "error" in rec:
        return rec["error"]
    if rec.get("masks") and rec.get("size"):
        h, w = rec["size"]
        try:
            for segs in rec["masks"]:
                check_segmentations(segs, h, w, rec.get("source", rec["id"]))
        except DataError as e:
            return str(e)
    return None


def summarize_errors(records) -> tuple[int, list[str]]:
    """(number of unreadable records, the first few of their reasons) among ``records``."""
    reasons = [e for e in map(record_error, records) if e is not None]
    return len(reasons), reasons[:ERROR_EXAMPLES]


def compact_record(rec: dict) -> dict:
    """The prepared form of a record: each target's segmentations as one compressed RLE.

    A target that cannot be decoded turns into an ``error`` that loading reports (training
    skips the sample, evaluation stops), so preparation itself never drops data silently.
    """
    if "error" in rec or not rec.get("masks") or not rec.get("size"):
        return rec
    h, w = rec["size"]
    try:
        masks = [
            [encode_rle(union_mask(segs, h, w, rec.get("source", rec["id"])))] if segs else []
            for segs in rec["masks"]
        ]
    except DataError as e:
        return {**rec, "masks": [], "error": str(e)}
    return {**rec, "masks": masks}


def file_state(path: Path, name: str | None = None) -> list:
    st = path.stat()
    return [name or path.name, st.st_size, st.st_mtime_ns]


class JsonlRecords(Sequence):
    """Random access to the lines of a JSONL file through their byte offsets.

    The file is opened lazily in each process, so the object can be handed to data-loader
    workers before it is first read.
    """

    def __init__(self, path: str | Path, offsets: np.ndarray) -> None:
        self.path, self.offsets = Path(path), np.asarray(offsets, dtype=np.int64)
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, k: int) -> dict:  # type: ignore[override]
        if self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 - kept open for reads
        self._file.seek(int(self.offsets[k]))
        line = self._file.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{self.path}: line {k + 1} is not valid JSON ({e}); re-run stamp-prepare-data"
            ) from e

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}


class RecordDataset(Dataset):
    """A map-style dataset of ``Sample``s built from records.

    Loading is lazy (the first ``len`` or item reads the files), so configs can name many
    splits cheaply; the DataModule loads its sets in the main process before workers start.
    The prepared form under ``prepared_dir`` is used when it exists and still matches the raw
    files (their sizes and modification times); otherwise the raw files are read.

    Args:
        prepared_dir: where ``stamp-prepare-data`` writes; None = always read the raw files.
        repeats: the dataset is listed this many times; each copy draws its own templates.
        seed: seeds the template choice of sample i as ``(seed, dataset, i)``.
        prompts: the template set, a name in ``conf/prompts/`` or a path to a YAML file.
        prompt_choice: ``random`` (seeded templates, training) or ``fixed`` (the first template,
            evaluation).
        texts: ``all`` (every text of a record is a sample) or ``first`` (only the first).
        limit: keep only the first ``limit`` samples (before repeats); None = all.
    """

    family = "refer"  # the prompt family of stamp.data.prompts

    def __init__(
        self,
        prepared_dir: str | Path | None = None,
        repeats: int = 1,
        seed: int = 0,
        prompts: str = "default",
        prompt_choice: str = "random",
        texts: str = "all",
        limit: int | None = None,
    ) -> None:
        if prompt_choice not in PROMPT_CHOICES:
            raise ValueError(f"prompt_choice={prompt_choice!r}; expected one of {PROMPT_CHOICES}")
        if texts not in TEXT_MODES:
            raise ValueError(f"texts={texts!r}; expected one of {TEXT_MODES}")
        if int(repeats) < 1:
            raise ValueError(f"repeats={repeats}; expected a positive integer")
        self.prepared_dir = Path(prepared_dir) if prepared_dir else None
        self.repeats, self.seed, self.texts = int(repeats), int(seed), texts
        self.prompts, self.prompt_choice = load_prompts(str(prompts)), prompt_choice
        self.limit = None if limit is None else int(limit)
        self._records: Sequence[dict] | None = None
        self._rec_idx = self._text_idx = None
        self._meta: dict | None = None
        self.from_prepared = False

    # -- what a source defines ----------------------------------------------------------------

    @property
    def name(self) -> str:
        """Display name, e.g. ``refcoco|unc|val``."""
        raise NotImplementedError

    @property
    def stem(self) -> str:
        """File-name-safe name of the prepared files, e.g. ``refcoco_unc_val``."""
        return self.name.replace("|", "_")

    def source_files(self) -> list[tuple[Path, str]]:
        """The raw files the records come from, as (path, name in the fingerprint)."""
        raise NotImplementedError

    def read_raw(self) -> list[dict]:
        """Parse the raw files into records (no image is opened)."""
        raise NotImplementedError

    def image_path(self, rec: dict) -> Path:
        raise NotImplementedError

    # -- loading --------------------------------------------------------------------------------

    @property
    def prepared_paths(self) -> tuple[Path, Path, Path]:
        """(records JSONL, index .npy, meta .json) under ``prepared_dir``."""
        if self.prepared_dir is None:
            raise ValueError(f"{self.name}: no prepared_dir configured")
        d, stem = self.prepared_dir, self.stem
        return d / f"{stem}.jsonl", d / f"{stem}.index.npy", d / f"{stem}.meta.json"

    def fingerprint(self) -> str | None:
        """A digest of the raw files' names, sizes and modification times; None if one is missing."""
        try:
            states = [file_state(p, n) for p, n in self.source_files()]
        except (FileNotFoundError, DataError):
            return None
        blob = json.dumps({"version": FORMAT_VERSION, "name": self.name, "files": states}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()

    def prepared_meta(self) -> dict | None:
        """The meta of a complete, up-to-date prepared form, else None."""
        if self.prepared_dir is None:
            return None
        jsonl, index, meta_path = self.prepared_paths
        if not (meta_path.is_file() and jsonl.is_file() and index.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("%s: cannot read %s (%s); reading the raw files", self.name, meta_path, e)
            return None
        if meta.get("version") != FORMAT_VERSION:
            log.warning(
                "%s: %s has format version %s, expected %s; reading the raw files",
                self.name,
                meta_path,
                meta.get("version"),
                FORMAT_VERSION,
            )
            return None
        current = self.fingerprint()
        if current is not None and current != meta.get("fingerprint"):
            log.warning(
                "%s: the raw files changed since %s was prepared; reading them instead "
                "(run stamp-prepare-data to refresh)",
                self.name,
                jsonl,
            )
            return None
        return meta

    def load(self) -> None:
        """Read the records and build the sample index (done once)."""
        if self._records is not None:
            return
        self._meta = self.prepared_meta()
        if self._meta is not None:
            jsonl, index_path, _ = self.prepared_paths
            index = np.load(index_path)
            records: Sequence[dict] = JsonlRecords(jsonl, index[:, 0])
            counts = index[:, 1].astype(np.int64)
            self.from_prepared = True
        else:
            records = self.read_raw()
            counts = np.array([n_texts(r) for r in records], dtype=np.int64)
        if self.texts == "first":
            counts = np.minimum(counts, 1)
        rec_idx = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        text_idx = np.arange(len(rec_idx), dtype=np.int64) - starts
        if self.limit is not None:
            rec_idx, text_idx = rec_idx[: self.limit], text_idx[: self.limit]
        self._rec_idx, self._text_idx, self._records = rec_idx, text_idx, records

    def unreadable(self) -> tuple[int, list[str]]:
        """(records that cannot be read, the first few reasons, each naming its file).

        From the prepared form's meta (every mask was decoded when it was prepared), else from
        the raw records (their annotations and masks checked, not decoded).
        """
        self.load()
        if self._meta is not None:
            return int(self._meta["errors"]), list(self._meta["error_examples"])
        return summarize_errors(self._records)

    @property
    def records(self) -> Sequence[dict]:
        self.load()
        return self._records

    @property
    def num_records(self) -> int:
        return len(self.records)

    @property
    def num_samples(self) -> int:
        """Samples in one copy (before ``repeats``)."""
        self.load()
        return len(self._rec_idx)

    def __len__(self) -> int:
        return self.repeats * self.num_samples

    def locate(self, index: int) -> tuple[dict, int]:
        """(record, text index) of sample ``index``."""
        n = self.num_samples
        if not 0 <= index < self.repeats * n:
            raise IndexError(f"{self.name}: index {index} out of range for {self.repeats * n} samples")
        base = index % n
        return self.records[int(self._rec_idx[base])], int(self._text_idx[base])

    def rng(self, index: int) -> np.random.Generator | None:
        if self.prompt_choice == "fixed":
            return None
        return np.random.default_rng([self.seed, zlib.crc32(self.stem.encode()), index])

    def __getitem__(self, index: int) -> Sample:
        rec, t = self.locate(index)
        return self.make_sample(rec, t, self.rng(index))

    # -- samples --------------------------------------------------------------------------------

    def family_of(self, rec: dict) -> str:
        """The prompt family of a record's questions (``stamp.data.prompts``)."""
        return self.family

    def decode(self, rec: dict, h: int, w: int) -> tuple[list[np.ndarray], np.ndarray | None]:
        """(one HxW boolean mask per target, ignore mask or None)."""
        where = rec.get("source", rec["id"])
        return [union_mask(segs, h, w, where) for segs in rec["masks"]], None

    def make_sample(self, rec: dict, t: int, rng: np.random.Generator | None) -> Sample:
        """A one-turn segmentation chat about text ``t`` of ``rec``."""
        if "error" in rec:
            raise DataError(rec["error"])
        path = self.image_path(rec)
        image = load_image(path)
        w, h = image.size
        if rec.get("size") and [int(v) for v in rec["size"]] != [h, w]:
            raise DataError(
                f"image {path} is {w}x{h} (WxH) but {rec.get('source', rec['id'])} "
                f"annotates it as {rec['size'][1]}x{rec['size'][0]}"
            )
        masks, ignore = self.decode(rec, h, w)
        question, answer = self.prompts.chat(self.family_of(rec), rec["kind"], rec["texts"][t], rng)
        return Sample(
            image=image,
            messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            masks=masks,
            ignore=ignore,
            kind=rec["kind"],
            id=f"{rec['id']}_{t}",
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def record_sources(dataset) -> list[RecordDataset]:
    """The ``RecordDataset``s inside ``dataset`` (itself, or the sources of a mixture)."""
    if isinstance(dataset, RecordDataset):
        return [dataset]
    inner = getattr(dataset, "datasets", None)
    if isinstance(inner, dict):
        return [ds for d in inner.values() for ds in record_sources(d)]
    return []


def report_unreadable(dataset, role: str) -> None:
    """Log, per record source of ``dataset``, how many of its records cannot be read."""
    for ds in record_sources(dataset):
        n, examples = ds.unreadable()
        if n:
            log.warning(
                "data %s %s: %d of %d records unreadable (training skips them, evaluation stops "
                "on them); first: %s",
                role,
                ds.name,
                n,
                ds.num_records,
                examples[0],
            )
        else:
            log.info("data %s %s: %d records, none unreadable", role, ds.name, ds.num_records)
