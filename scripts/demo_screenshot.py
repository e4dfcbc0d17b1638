"""A screenshot of the web demo (``stamp-demo``) answering real requests, for the README.

Serves the demo on a free port of 127.0.0.1 with the model `make demo` trained (or ``--ckpt``),
opens it in headless Chromium (Playwright with Debian's ``chromium``), clicks an example of the
gallery, sends the requests one after another (the example's own request when none is given),
waits for each answer and its masks, and saves the page with ``--label`` written above it.

    .venv/bin/python scripts/demo_screenshot.py --example 0 --out docs/images/demo-good.png \\
        --label "Does well: ..." [--query "Please segment the red circle." --query "Now the blue one."]
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CHROMIUM = os.environ.get("STAMP_CHROMIUM", "/usr/bin/chromium")
WAIT_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def label(path: Path, text: str) -> None:
    """Write ``text`` in a band above the picture at ``path``."""
    shot = Image.open(path).convert("RGB")
    font = ImageFont.load_default(size=22)
    band = Image.new("RGB", (shot.width, 44), (255, 255, 255))
    ImageDraw.Draw(band).text((16, 10), text, fill=(0, 0, 0), font=font)
    out = Image.new("RGB", (shot.width, shot.height + band.height))
    out.paste(band, (0, 0))
    out.paste(shot, (0, band.height))
    out.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a STAMP checkpoint (default: the `make demo` model)")
    p.add_argument("--example", type=int, default=0, help="which example of the gallery to click")
    p.add_argument("--query", action="append", default=None, help="a request (repeat for several turns)")
    p.add_argument("--label", default="", help="a line written above the screenshot")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    from hydra import compose, initialize_config_dir
    from playwright.sync_api import sync_playwright

    from stamp.cli import CONF_DIR
    from stamp.cli.demo import launch, load_backend

    port = free_port()
    overrides = [f"port={port}", "device=cpu"] + ([f"ckpt={a.ckpt}"] if a.ckpt else [])
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("demo", overrides=overrides)
    backend = load_backend(cfg)
    app = launch(cfg, backend, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(WAIT_MS)
            page.goto(f"http://127.0.0.1:{port}")
            page.locator("#examples .thumbnail-item").nth(a.example).click()
            page.locator("#status", has_text="Example loaded").wait_for()
            queries = a.query or [page.locator("#query textarea").input_value()]
            for turn, query in enumerate(queries, start=1):
                page.locator("#query textarea").fill(query)
                page.locator("#send").click()
                page.locator("#chat", has_text=query).wait_for()
                page.locator("#status", has_text="Answered in").wait_for()
                print(f"turn {turn}: {query!r} -> {page.inner_text('#status')}")
            a.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(a.out), full_page=True)
            browser.close()
    finally:
        app.close()
    if a.label:
        label(a.out, a.label)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
