"""``stamp-prepare-data``: convert raw datasets into their prepared form (JSONL + RLE + index).

    stamp-prepare-data data=uni paths.data_dir=/data/playground/data --workers 8

The Hydra overrides select a data config as for ``stamp-train``; every real-data split it names
(training sources and evaluation splits) is prepared into ``paths.prepared_dir``:

    <stem>.jsonl       one record per line, masks as compressed RLE
    <stem>.index.npy   int64 (records x 2): byte offset of each line, texts (samples) per record
    <stem>.meta.json   format version, raw-file fingerprint, counts (records, samples, unreadable
                       records and the first reasons); written last (= complete)

Work is split into chunks written by worker processes as ``<stem>.parts/part-NNNNN.jsonl``;
an interrupted run resumes from the chunks already written. A split whose meta matches the
raw files is left alone, so re-running is a no-op.

A record that cannot be read (a missing annotation, a mask that does not decode) is kept with
its reason: the summary counts them per split and names the first few, and the command exits
non-zero unless ``--allow-errors`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig
from tqdm import tqdm

from stamp.data.records import (
    ERROR_EXAMPLES,
    FORMAT_VERSION,
    RecordDataset,
    compact_record,
    n_texts,
    summarize_errors,
)
from stamp.utils.config import CONF_DIR

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    name: str
    records: int
    samples: int
    status: str  # "prepared" | "up to date"
    path: Path
    errors: int = 0  # unreadable records (kept in the prepared form with their reason)
    error_examples: list[str] = field(default_factory=list)


def write_part(records: list[dict], path: Path) -> None:
    """Compact ``records`` into ``path`` (a JSONL chunk), its ``.counts.npy`` and its
    ``.errors.json`` (unreadable records: count and first reasons), the chunk last."""
    lines, counts, compacted = [], [], []
    for rec in records:
        rec = compact_record(rec)
        compacted.append(rec)
        lines.append(json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n")
        counts.append(n_texts(rec))
    np.save(path.with_suffix(".counts.npy"), np.asarray(counts, dtype=np.int64))
    path.with_suffix(".errors.json").write_text(json.dumps(summarize_errors(compacted)))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)  # the chunk exists only once complete


def prepare_dataset(
    ds: RecordDataset, workers: int = 0, chunk_size: int = 1000, force: bool = False, progress: bool = True
) -> Prepared:
    """Write the prepared form of ``ds`` (resuming an interrupted run); a no-op when up to date."""
    jsonl, index_path, meta_path = ds.prepared_paths
    meta = None if force else ds.prepared_meta()
    if meta is not None:
        return Prepared(
            ds.name,
            meta["records"],
            meta["samples"],
            "up to date",
            jsonl,
            meta["errors"],
            meta["error_examples"],
        )
    fingerprint = ds.fingerprint()
    if fingerprint is None:
        missing = [str(p) for p, _ in ds.source_files() if not p.exists()]
        raise FileNotFoundError(f"{ds.name}: raw files not found: {missing}")
    meta_path.unlink(missing_ok=True)  # a stale form stops counting as complete from here on
    records = ds.read_raw()
    parts_dir = jsonl.with_name(f"{ds.stem}.parts")
    plan = {"fingerprint": fingerprint, "chunk_size": chunk_size, "records": len(records)}
    plan_path = parts_dir / "plan.json"
    if force or not plan_path.is_file() or json.loads(plan_path.read_text()) != plan:
        shutil.rmtree(parts_dir, ignore_errors=True)  # parts of another run or other raw files
        parts_dir.mkdir(parents=True)
        plan_path.write_text(json.dumps(plan))
    chunks = [(k, records[s : s + chunk_size]) for k, s in enumerate(range(0, len(records), chunk_size))]

    def part(k: int) -> Path:
        return parts_dir / f"part-{k:05d}.jsonl"

    todo = [(k, recs) for k, recs in chunks if not part(k).is_file()]
    bar = tqdm(
        total=len(records),
        initial=len(records) - sum(len(r) for _, r in todo),
        unit="rec",
        desc=f"prepare {ds.name}",
        disable=not progress,
    )
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(write_part, recs, part(k)): len(recs) for k, recs in todo}
            for fut in as_completed(futures):
                fut.result()
                bar.update(futures[fut])
    else:
        for k, recs in todo:
            write_part(recs, part(k))
            bar.update(len(recs))
    bar.close()
    samples = merge_parts([part(k) for k, _ in chunks], jsonl, index_path)
    errors, examples = 0, []
    for k, _ in chunks:
        n, first = json.loads(part(k).with_suffix(".errors.json").read_text())
        errors, examples = errors + n, (examples + first)[:ERROR_EXAMPLES]
    meta = {
        "version": FORMAT_VERSION,
        "name": ds.name,
        "fingerprint": fingerprint,
        "records": len(records),
        "samples": samples,
        "errors": errors,
        "error_examples": examples,
    }
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, meta_path)  # written last: its presence means the prepared form is complete
    shutil.rmtree(parts_dir)
    return Prepared(ds.name, len(records), samples, "prepared", jsonl, errors, examples)


def merge_parts(parts: list[Path], jsonl: Path, index_path: Path) -> int:
    """Concatenate the chunks into ``jsonl`` and write its index; return the number of samples."""
    offsets, counts, pos = [], [], 0
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            counts.append(np.load(p.with_suffix(".counts.npy")))
            with open(p, "rb") as f:
                for line in f:
                    offsets.append(pos)
                    out.write(line)
                    pos += len(line)
    counts_all = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    if len(counts_all) != len(offsets):
        raise RuntimeError(f"{jsonl}: {len(offsets)} lines but {len(counts_all)} counts; re-run with --force")
    index = np.stack([np.asarray(offsets, dtype=np.int64), counts_all.astype(np.int64)], axis=1).reshape(
        -1, 2
    )
    with open(index_path.with_suffix(".tmp"), "wb") as f:
        np.save(f, index)
    os.replace(index_path.with_suffix(".tmp"), index_path)
    os.replace(tmp, jsonl)
    return int(counts_all.sum())


def find_datasets(node, found: dict[str, RecordDataset] | None = None) -> dict[str, RecordDataset]:
    """Every ``RecordDataset`` a data config names (instantiated, still unloaded), by prepared path."""
    from hydra.utils import get_class, instantiate

    found = {} if found is None else found
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if target is not None:
            try:
                cls = get_class(target)
            except Exception:  # a function target or another kind of object: not a data source
                cls = None
            if isinstance(cls, type) and issubclass(cls, RecordDataset):
                ds = instantiate(node)
                if ds.prepared_dir is not None:
                    found.setdefault(str(ds.prepared_paths[0]), ds)
                return found
        for key in node:
            find_datasets(node[key], found)
    elif isinstance(node, ListConfig):
        for item in node:
            find_datasets(item, found)
    return found


def compose_data(overrides: list[str]) -> DictConfig:
    """The ``data`` node of the training config composed with ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return cfg.data


def run(
    overrides: list[str],
    workers: int = 0,
    chunk_size: int = 1000,
    force: bool = False,
    only: list[str] | None = None,
    progress: bool = True,
) -> list[Prepared]:
    """Prepare every split of the composed data config (or those named in ``only``)."""
    datasets = list(find_datasets(compose_data(overrides)).values())
    if not datasets:
        raise ValueError(
            "the data config names no real-data split with a prepared_dir; pick one with data=<name>"
        )
    if only:
        names = {n for ds in datasets for n in (ds.name, ds.stem)}
        unknown = sorted(set(only) - names)
        if unknown:
            raise ValueError(
                f"unknown split(s) {unknown} in --only; valid: {sorted(ds.name for ds in datasets)}"
            )
        datasets = [ds for ds in datasets if ds.name in only or ds.stem in only]
    results = [prepare_dataset(ds, workers, chunk_size, force, progress) for ds in datasets]
    print(summary(results))
    return results


def summary(results: list[Prepared]) -> str:
    """A table of the prepared splits (records, samples, unreadable records, status), then the
    first reasons of each split's unreadable records."""
    width = max(len(r.name) for r in results)
    lines = [f"{'split':<{width}}  {'records':>9}  {'samples':>9}  {'errors':>7}  status"]
    for r in results:
        lines.append(
            f"{r.name:<{width}}  {r.records:>9}  {r.samples:>9}  {r.errors:>7}  {r.status}  {r.path}"
        )
    for r in results:
        if r.errors:
            lines.append(f"{r.name}: {r.errors} unreadable record(s), first {len(r.error_examples)}:")
            lines += [f"  {reason}" for reason in r.error_examples]
    return "\n".join(lines)


class UnreadableRecords(ValueError):
    """Some prepared split holds records that cannot be read."""


def main(argv: list[str] | None = None) -> None:
    from stamp.cli import user_errors

    parser = argparse.ArgumentParser(
        prog="stamp-prepare-data",
        description="Convert the raw datasets of a data config into their prepared form (JSONL + RLE + index).",
        epilog="example: stamp-prepare-data data=uni paths.data_dir=/data/playground/data --workers 8",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=res_mix paths.data_dir=...")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--chunk-size", type=int, default=1000, help="records per resumable chunk")
    parser.add_argument("--force", action="store_true", help="prepare again even if up to date")
    parser.add_argument(
        "--allow-errors",
        action="store_true",
        help="exit 0 even when some records cannot be read (they are kept, with their reason)",
    )
    parser.add_argument(
        "--only", action="append", help="prepare only this split (name or file stem); repeatable"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with user_errors("stamp-prepare-data"):
        results = run(args.overrides, args.workers, args.chunk_size, args.force, args.only)
        bad = [f"{r.name} ({r.errors})" for r in results if r.errors]
        if bad and not args.allow_errors:
            raise UnreadableRecords(
                f"unreadable records in {', '.join(bad)} (reasons above); training skips them and "
                "evaluation stops on them. Fix the files, or pass --allow-errors to accept the loss"
            )


if __name__ == "__main__":
    sys.exit(main())
