"""``stamp-demo``: the web demo on http://127.0.0.1:<port> (Gradio; see ``stamp.demo``)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from stamp.cli import CONF_DIR, user_errors


def make_demo_model(marker: str | Path) -> Path:
    """The model that ``make demo`` exported last: the path written in ``marker``
    (``stamp-train export_marker=...``, which ``make demo`` passes). Later ``experiment=demo``
    runs without ``export_marker`` do not change it."""
    marker = Path(marker)
    if not marker.is_file():
        raise FileNotFoundError(
            f"no `make demo` model: {marker} does not exist; run `make demo` (it writes that file) "
            "or pass ckpt=path/to/model"
        )
    model = Path(marker.read_text().strip())
    if not (model / "stamp_head.safetensors").is_file():
        raise FileNotFoundError(
            f"{marker} names {model}, which holds no exported STAMP model; run `make demo` again "
            "or pass ckpt=path/to/model"
        )
    return model


def load_backend(cfg: DictConfig):
    """The model named by ``cfg`` (``ckpt``, or the ``make demo`` model), SAM and the examples,
    as a ``stamp.demo.backend.DemoBackend``."""
    from stamp.cli.predict import load_segmenter
    from stamp.demo.backend import DemoBackend, Limits

    if not cfg.ckpt:
        with open_dict(cfg):
            cfg.ckpt = str(make_demo_model(cfg.demo_marker))
    print(f"stamp-demo: loading {cfg.ckpt}", flush=True)
    segmenter = load_segmenter(cfg)  # stamp-predict's loader: the same keys (device, dtype, sam, ...)
    refiner, segmenter.refiner = segmenter.refiner, None  # SAM runs when the page's toggle asks for it
    limits = Limits(cfg.demo.max_image_side, cfg.demo.max_query_chars, cfg.demo.max_turns)
    examples = instantiate(cfg.examples)
    return DemoBackend(segmenter, limits, refiner, [examples[i] for i in range(len(examples))])


def launch(cfg: DictConfig, backend, block: bool = True):
    """Lay out the page for ``backend`` and serve it on 127.0.0.1:``cfg.port``. With ``block``
    this returns when the server stops; otherwise at once, with the app (``.close()`` stops it)."""
    from stamp.demo.app import build_app, serve

    app = build_app(backend, cfg.demo.alpha, cfg.demo.concurrency)
    return serve(app, cfg.port, cfg.demo.queue_size, cfg.demo.max_file_size, block=block)


def run(cfg: DictConfig, block: bool = True):
    """Load the demo model and serve the page (see ``launch``)."""
    return launch(cfg, load_backend(cfg), block)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    with user_errors("stamp-demo"):
        run(cfg)


if __name__ == "__main__":
    main()
