"""``stamp-predict``: answer a query about an image; write the mask and overlay PNGs."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from stamp.cli import CONF_DIR, user_errors
from stamp.cli.eval import resolve_device
from stamp.model.tokens import SEG_TOKEN


def load_segmenter(cfg: DictConfig):
    from stamp.inference.segmenter import Segmenter

    device = resolve_device(cfg.device)
    sam = OmegaConf.to_container(cfg.sam) if cfg.sam.checkpoint else None
    return Segmenter.from_pretrained(
        cfg.ckpt,
        device=device,
        dtype=None if cfg.dtype == "auto" else cfg.dtype,
        generation=OmegaConf.to_container(cfg.generation, resolve=True),
        sam=sam,
        **cfg.get("model_overrides", {}),
    )


def save_outputs(image, result, out_dir: Path, stem: str, alpha: float) -> list[Path]:
    """Write ``<stem>_mask.png`` (union of the masks) and ``<stem>_overlay.png``; return the paths."""
    from stamp.utils.overlay import mask_image, overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
    mask_image(result.masks, (image.height, image.width)).save(mask_path)
    overlay(image, result.masks, alpha).save(overlay_path)
    return [mask_path, overlay_path]


def answer_lines(result) -> list[str]:
    """What the CLI prints for a result: the answer with ``[mask k]`` where each ``<|seg|>`` was,
    and a note when there is no mask or a mask is empty."""
    from stamp.utils.overlay import empty_masks_note

    lines = [f"answer: {result.answer}"]
    if not result.masks:
        lines.append("no mask: the answer has no <|seg|>, so nothing was segmented")
    elif note := empty_masks_note(result.masks):
        lines.append(note)
    return lines


class AnswerPrinter:
    """Prints an answer to stdout as it is generated (``answer: ...``, the k-th ``<|seg|>``
    shown as ``[mask k]``); called with the answer so far."""

    def __init__(self) -> None:
        self.shown = None  # None until the first piece

    def __call__(self, text: str) -> None:
        parts = text.split(SEG_TOKEN)
        live = (parts[0] + "".join(f"[mask {k}]{p}" for k, p in enumerate(parts[1:], start=1))).lstrip()
        if self.shown is None:
            print("answer: ", end="")
            self.shown = ""
        if live.startswith(self.shown):  # decoding only appends; anything else waits for the next piece
            print(live[len(self.shown) :], end="", flush=True)
            self.shown = live

    def finish(self) -> None:
        print("answer: " if self.shown is None else "", flush=True)


def answer(seg, image, query: str, history, out_dir: Path, stem: str, alpha: float):
    printer = AnswerPrinter()
    result = seg.segment(image, query, history=history, on_text=printer)
    printer.finish()
    notes = answer_lines(result)[1:]  # the answer itself is printed already
    if notes:
        print("\n".join(notes))
    if result.masks:
        for p in save_outputs(image, result, out_dir, stem, alpha):
            print(f"wrote {p}")
    return result


def run(cfg: DictConfig) -> None:
    from stamp.inference.images import load_image

    image = load_image(cfg.image)
    if not cfg.chat and (cfg.query is None or not str(cfg.query).strip()):
        raise ValueError('the query is empty; pass query="..." (or chat=true to type queries)')
    seg = load_segmenter(cfg)
    out_dir = Path(cfg.out_dir)
    if not cfg.chat:
        answer(seg, image, str(cfg.query), None, out_dir, "prediction", cfg.alpha)
        return
    history: list[tuple[str, str]] = []
    print("chat: type a request per line (empty line or Ctrl-D ends)", flush=True)
    for turn, line in enumerate(sys.stdin, start=1):
        query = line.strip()
        if not query or query in ("exit", "quit"):
            break
        result = answer(seg, image, query, history, out_dir, f"turn{turn}", cfg.alpha)
        history.append((query, result.text))
        sys.stdout.flush()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def _main(cfg: DictConfig) -> None:
    with user_errors("stamp-predict"):
        run(cfg)


def main() -> None:
    sys.argv = ["chat=true" if a == "--chat" else a for a in sys.argv]
    _main()


if __name__ == "__main__":
    main()
