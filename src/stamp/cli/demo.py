"""``stamp-demo``: the web demo on http://127.0.0.1:<port> (Gradio; see ``stamp.demo``)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from stamp.cli import CONF_DIR, user_errors


def newest_demo_model(runs_dir: str | Path) -> Path:
    """The newest ``<runs_dir>/<run>/model`` checkpoint that ``make demo`` exported."""
    runs_dir = Path(runs_dir)
    # run folders are named by their start time (%Y-%m-%d_%H-%M-%S), so names sort by age
    found = sorted(p.parent for p in runs_dir.glob("*/model/stamp_head.safetensors"))
    if not found:
        raise FileNotFoundError(
            f"no demo model under {runs_dir}/*/model; run `make demo` first to train one, or pass ckpt=path/to/model"
        )
    return found[-1]


def load_backend(cfg: DictConfig):
    """The model named by ``cfg`` (``ckpt`` or the newest demo model), SAM and the examples,
    as a ``stamp.demo.backend.DemoBackend``."""
    from stamp.cli.predict import load_segmenter
    from stamp.demo.backend import DemoBackend, Limits

    if not cfg.ckpt:
        with open_dict(cfg):
            cfg.ckpt = str(newest_demo_model(cfg.demo_runs))
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
