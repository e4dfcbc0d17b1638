"""``stamp-make-tiny``: build an embedded tiny checkpoint directory (offline): Qwen2-VL by
default, or the tiny Qwen2.5-VL / Qwen3-VL (``--family``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stamp.cli import project_dir, user_errors

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # stamp.model.families (not imported: fast --help)
DIR_NAMES = {"qwen2_vl": "tiny-qwen2vl", "qwen2_5_vl": "tiny-qwen25vl", "qwen3_vl": "tiny-qwen3vl"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="qwen2_vl",
        help="backbone family (default: qwen2_vl; model=tiny_qwen25vl and model=tiny_qwen3vl use the others)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: artifacts/tiny-qwen2vl, tiny-qwen25vl or tiny-qwen3vl under "
        "STAMP_ROOT or the current directory)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokenizer corpus")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    args = parser.parse_args(argv)
    out = Path(args.out or project_dir() / "artifacts" / DIR_NAMES[args.family])
    if (out / "config.json").exists() and not args.force:
        print(f"{out} exists (use --force to rebuild)")
        return
    from stamp.model.tiny import make_tiny

    with user_errors("stamp-make-tiny"):
        make_tiny(out, seed=args.seed, family=args.family)
    print(out)


if __name__ == "__main__":
    main()
