"""``stamp-make-tiny``: build the embedded tiny Qwen2-VL checkpoint directory (offline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stamp.cli import project_dir, user_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        default=str(project_dir() / "artifacts" / "tiny-qwen2vl"),
        help="output directory (default: artifacts/tiny-qwen2vl under STAMP_ROOT or the current directory)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokenizer corpus")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if (out / "config.json").exists() and not args.force:
        print(f"{out} exists (use --force to rebuild)")
        return
    from stamp.model.tiny import make_tiny

    with user_errors("stamp-make-tiny"):
        make_tiny(out, seed=args.seed)
    print(out)


if __name__ == "__main__":
    main()
