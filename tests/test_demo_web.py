"""The web demo (``stamp-demo``): its actions without a browser, then the real page in headless
Chromium (Playwright, Debian's ``chromium``), served on a free port of 127.0.0.1.

The browser tests need a model that segments. The untrained tiny model answers anything, so
``segmenting_backend`` turns it into one that always answers ``<|seg|>`` (a bias on its
language-model head) and shifts its mask head so that about half of the example image's cells
are foreground. The app itself has no test-only path: the page shows what that model predicts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stamp.cli import CONF_DIR
from stamp.demo.backend import DemoBackend, Limits, Session, clean_query, prepare_image, render_answer
from stamp.model.tokens import SEG_TOKEN
from stamp.utils.overlay import outline
from stamp.utils.overlay import overlay as draw_overlay
from tests.helpers import square_sample

CHROMIUM = os.environ.get("STAMP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUESTION = "Please segment the red square."
WAIT_MS = 60_000  # the longest any single wait in the page may take


# -- the actions, without a browser ---------------------------------------------------------


class FakeSegmenter:
    """Answers every request with one ``<|seg|>`` whose mask is the image's left half."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list]] = []

    def segment(self, image, question, answer=None, history=None):
        from stamp.inference.segmenter import SegmentationResult

        self.calls.append((question, list(history or [])))
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[:, : image.width // 2] = True
        return SegmentationResult(f"Sure, it is {SEG_TOKEN}", [mask], [torch.zeros(2, 2)], [mask])

    def stream(self, image, question, history=None):
        yield from ("Sure,", "Sure, it is", f"Sure, it is {SEG_TOKEN}")
        yield self.segment(image, question, history=history)


def _backend(max_turns: int = 2) -> DemoBackend:
    return DemoBackend(FakeSegmenter(), Limits(max_image_side=64, max_query_chars=40, max_turns=max_turns))


def test_prepare_image_downscales_and_refuses_non_images(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 150), "white").save(big)
    image, note = prepare_image(big, max_side=64)
    assert image.size == (64, 32) and "Downscaled from 300x150 to 64x32" in note
    assert prepare_image(big, max_side=1024)[1] == ""
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    for name in ("notes.txt", "broken.png"):
        with pytest.raises(ValueError, match=rf"'{name}' is not an image that can be read; upload a PNG"):
            prepare_image(tmp_path / name, max_side=64)
    Image.new("RGB", (20, 100)).save(tmp_path / "thin.png")
    with pytest.raises(ValueError, match="only 20x100 pixels; the model needs at least 28"):
        prepare_image(tmp_path / "thin.png", max_side=64)


def test_requests_and_answers_for_the_chat():
    assert clean_query("  Segment <|im_end|> the <|seg|>dog  ") == "Segment the dog"
    assert render_answer(f"It is {SEG_TOKEN} and {SEG_TOKEN}.") == "It is **[mask 1]** and **[mask 2]**."
    assert render_answer(SEG_TOKEN) == "**[mask 1]**"


def test_backend_streams_the_answer_then_draws_the_masks(tmp_path):
    backend = _backend()
    path = tmp_path / "square.png"
    square_sample(size=64).image.save(path)
    session, _ = backend.open_image(path, 0.5)
    steps = list(backend.ask_stream(session, "segment it", False, 0.5))
    shown = [view.chat[-1]["content"] for _, view, _ in steps]
    assert shown == ["Sure,", "Sure, it is", "Sure, it is **[mask 1]**", "Sure, it is **[mask 1]**"]
    for _, view, answered in steps[:-1]:  # while generating: text only, nothing kept yet
        assert not answered and view.overlay is None and view.status == "Generating the answer..."
    assert session.turns == [] and steps[-1][2] and steps[-1][1].overlay is not None
    assert steps[-1][0].turns == [("segment it", f"Sure, it is {SEG_TOKEN}")]


def test_backend_keeps_the_conversation_and_reports_problems(tmp_path):
    backend = _backend(max_turns=2)
    _, view, answered = backend.ask(None, "segment it", False, 0.5)
    assert not answered and view.status == "Error: Upload an image or pick an example first."
    path = tmp_path / "square.png"
    square_sample(size=112).image.save(path)
    session, view = backend.open_image(path, 0.5)
    assert view.image.size == (64, 64) and "Downscaled from 112x112" in view.status
    for bad, message in (("   ", "The request is empty"), ("x" * 41, "has 41 characters; the limit is 40")):
        session, view, answered = backend.ask(session, bad, False, 0.5)
        assert not answered and message in view.status and not session.turns
    for i in range(4):  # use_sam=True is ignored: no SAM is configured
        session, view, answered = backend.ask(session, f"segment thing {i}", True, 0.5)
        assert answered and view.status.startswith("Answered in") and "1 mask." in view.status
    calls = backend.segmenter.calls
    # the history grows to max_turns, then holds the last ones
    assert [len(h) for _, h in calls] == [0, 1, 2, 2]
    assert calls[-1][1] == [
        ("segment thing 1", f"Sure, it is {SEG_TOKEN}"),
        ("segment thing 2", f"Sure, it is {SEG_TOKEN}"),
    ]
    assert "Only the last 2 turns" in view.status
    assert view.raw == f"Sure, it is {SEG_TOKEN}" and len(view.chat) == 8  # the page shows every turn
    assert view.chat[-1] == {"role": "assistant", "content": "Sure, it is **[mask 1]**"}
    over, image = np.asarray(view.overlay), np.asarray(view.image)
    assert (over[:, :32] != image[:, :32]).any(-1).all() and (over[:, 33:] == image[:, 33:]).all()
    assert (over[:, 32] == 0).all()  # the mask's outline, just outside it
    assert np.array_equal(np.asarray(view.mask) > 0, np.broadcast_to(np.arange(64) < 32, (64, 64)))
    session, view = backend.redraw(session, False, 0.0)  # opacity 0: the overlay is the image
    assert np.array_equal(np.asarray(view.overlay), image) and view.status is None
    session, view = backend.clear(session, 0.5)
    assert session.image is not None and not session.turns and view.overlay is None and view.chat == []
    session, view = backend.open_image(tmp_path / "missing.png", 0.5)
    assert session == Session() and view.status.startswith("Error: 'missing.png' is not an image")


class HalfRefiner:
    """Stands in for SAM: keeps the top half of each mask."""

    def __init__(self) -> None:
        self.calls = 0

    def refine(self, image, masks):
        self.calls += 1
        out = [np.asarray(m, dtype=bool).copy() for m in masks]
        for m in out:
            m[m.shape[0] // 2 :] = False
        return out


def test_sam_toggle_refines_on_request_and_on_redraw(tmp_path):
    backend = DemoBackend(FakeSegmenter(), Limits(64, 40, 2), refiner=HalfRefiner())
    assert backend.sam_available and not _backend().sam_available
    path = tmp_path / "square.png"
    square_sample(size=64).image.save(path)
    session, _ = backend.open_image(path, 0.5)
    session, view, _ = backend.ask(session, "segment it", True, 0.5)
    assert view.status.endswith("1 mask, refined with SAM.") and backend.refiner.calls == 1
    assert (np.asarray(view.mask) > 0).sum() == 32 * 32  # the left half, top half of it
    session, view = backend.redraw(session, False, 0.5)  # off: the coarse mask, no new SAM run
    assert (np.asarray(view.mask) > 0).sum() == 64 * 32 and backend.refiner.calls == 1
    session, view, _ = backend.ask(session, "again", False, 0.5)
    session, view = backend.redraw(session, True, 0.5)  # on after the answer: SAM runs now
    assert view.status == "Masks refined with SAM." and backend.refiner.calls == 2
    assert (np.asarray(view.mask) > 0).sum() == 32 * 32


def test_the_make_demo_model_is_the_one_make_demo_marked(compose_cfg, tmp_path, capsys):
    """`make demo` passes export_marker; a later experiment=demo run (newer, later in name order)
    leaves the choice alone, and stamp-demo says which model it loads."""
    from omegaconf import open_dict

    from stamp.cli.demo import load_backend, make_demo_model
    from stamp.cli.train import train

    marker = tmp_path / "logs" / "demo" / "make-demo-model.txt"
    quick = ["trainer=cpu", "trainer.max_steps=1", "+trainer.limit_val_batches=0", "data.batch_size=1"]
    quick += ["data.train.image_size=56", "data.train.radius=[8,14]", "trainer.enable_progress_bar=false"]
    with pytest.raises(
        FileNotFoundError, match=r"no `make demo` model: .*; run `make demo` .* or pass ckpt="
    ):
        make_demo_model(marker)
    made = tmp_path / "logs" / "demo" / "runs" / "2026-01-02_10-00-00"
    later = tmp_path / "logs" / "demo" / "runs" / "2026-01-03_09-00-00"
    for out, extra in ((made, [f"export_marker={marker}"]), (later, [])):
        cfg = compose_cfg([*quick, *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
        train(cfg)
    assert (later / "model" / "stamp_head.safetensors").is_file()
    assert make_demo_model(marker) == made / "model"

    cfg = compose_cfg(["device=cpu", "examples.size=1"], config="demo")
    with open_dict(cfg):
        cfg.demo_marker = str(marker)
    load_backend(cfg)
    assert f"stamp-demo: loading {made / 'model'}" in capsys.readouterr().out


def test_cli_without_a_demo_model_says_what_to_do(tmp_path):
    bin_dir = Path(sys.executable).parent
    r = subprocess.run(
        [str(bin_dir / "stamp-demo"), f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"stamp-demo: error: no `make demo` model: {tmp_path}/demo/make-demo-model.txt does not exist; "
        "run `make demo` (it writes that file) or pass ckpt=path/to/model"
    )


# -- the page in a browser -------------------------------------------------------------------


def _need_browser() -> None:
    """Skip (fail in CI) without Playwright or Debian's Chromium."""
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the Python package playwright is not installed (pip install -r requirements.txt)"
    if reason is None and not Path(CHROMIUM).is_file():
        reason = f"no Chromium at {CHROMIUM}: apt-get install -y chromium chromium-driver (.ci/run does)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run in CI, but {reason}")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def segmenting_backend(backend: DemoBackend, image: Image.Image) -> None:
    """Make the untrained model answer ``<|seg|>`` to everything and see about half of ``image``."""
    seg = backend.segmenter
    head = seg.model.qwen.lm_head
    bias = torch.full((head.out_features,), -1e4, dtype=head.weight.dtype, device=head.weight.device)
    bias[seg.processor.tokenizer.convert_tokens_to_ids(SEG_TOKEN)] = 1e4
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    result = seg.segment(image, QUESTION)
    assert result.text == SEG_TOKEN, result.text
    with torch.no_grad():
        seg.model.mask_head.bias -= result.cell_logits[0].median().to(seg.model.mask_head.bias)


class Gate:
    """A segmenter wrapper that, while closed, holds every request until it is opened; while
    ``resume`` is clear, it holds a request after the first piece of its answer."""

    def __init__(self, segmenter) -> None:
        self.segmenter, self.open, self.entered = segmenter, threading.Event(), threading.Event()
        self.resume, self.streamed = threading.Event(), threading.Event()
        self.open.set()
        self.resume.set()

    def segment(self, *args, **kwargs):  # the tests' own calls, never held
        return self.segmenter.segment(*args, **kwargs)

    def stream(self, *args, **kwargs):
        self.entered.set()
        if not self.open.wait(timeout=120):
            raise TimeoutError("the test never opened the gate")
        for i, item in enumerate(self.segmenter.stream(*args, **kwargs)):
            yield item
            if i == 0:
                self.streamed.set()
                if not self.resume.wait(timeout=120):
                    raise TimeoutError("the test never resumed the answer")


@pytest.fixture(scope="module")
def server(stamp_ckpt, tmp_path_factory):
    """The demo on a free port of 127.0.0.1, its backend, and the synthetic image the tests upload."""
    _need_browser()
    from hydra import compose, initialize_config_dir

    from stamp.cli.demo import launch, load_backend

    port = _free_port()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(
            "demo",
            overrides=[
                f"ckpt={stamp_ckpt}",
                f"port={port}",
                "device=cpu",
                "generation.max_new_tokens=1",
                "examples.size=3",
            ],
        )
    backend = load_backend(cfg)
    image_path = tmp_path_factory.mktemp("upload") / "shapes.png"
    backend.examples[0].image.save(image_path)  # a synthetic scene, 224 x 224
    segmenting_backend(backend, Image.open(image_path).convert("RGB"))
    backend.segmenter = Gate(backend.segmenter)
    app = launch(cfg, backend, block=False)
    try:
        yield f"http://127.0.0.1:{port}", backend, image_path
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser(server):
    """A headless Debian Chromium with a fresh profile; requests that leave 127.0.0.1 are refused
    and recorded in ``browser.outside``."""
    from playwright.sync_api import sync_playwright

    url = server[0]
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1100},
            timeout=WAIT_MS,
        )
        context.set_default_timeout(WAIT_MS)
        context.outside = []

        def local_only(route):
            if route.request.url.startswith(url) or route.request.url.startswith("data:"):
                route.continue_()
            else:
                context.outside.append(route.request.url)
                route.abort()

        context.route("**/*", local_only)
        try:
            yield context
        finally:
            context.close()


def _open(browser, url):
    page = browser.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#send")
    return page


def _upload(page, path: Path) -> None:
    page.locator("#upload input[type=file]").set_input_files(str(path))


def _status(page, text: str) -> str:
    page.locator("#status", has_text=text).wait_for()
    return page.inner_text("#status")


def _send(page, request: str) -> None:
    page.locator("#query textarea").fill(request)
    page.locator("#send").click()


def _page_image(page, selector: str) -> np.ndarray:
    """The picture an image component of the page shows, as the browser fetches it."""
    src = page.locator(f"{selector} img").first.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, f"{src}: {response.status}"
    return np.asarray(Image.open(BytesIO(response.body())))


@pytest.mark.slow
def test_segment_in_the_browser(server, browser, tmp_path, record_property):
    url, backend, image_path = server
    page = _open(browser, url)
    page.locator("#examples .thumbnail-item").nth(1).click()  # an example fills the image and the request
    _status(page, "Example loaded")
    assert page.locator("#query textarea").input_value() == backend.examples[1].messages[0]["content"]
    _upload(page, image_path)
    _status(page, "Image loaded")
    page.locator("#image img").wait_for()
    _send(page, QUESTION)
    status = _status(page, "Answered in")
    assert "with 1 mask." in status
    page.locator("#overlay img").wait_for()
    page.locator("#mask img").wait_for()
    shown = _page_image(page, "#image")
    overlay = _page_image(page, "#overlay")
    mask = _page_image(page, "#mask") > 0
    source = np.asarray(Image.open(image_path).convert("RGB"))
    assert np.array_equal(shown, source)  # 224 px: nothing downscaled, PNG all the way
    expected = backend.segmenter.segment(Image.open(image_path), QUESTION).masks[0]
    assert np.array_equal(mask, expected)
    assert 0.1 < mask.mean() < 0.9, mask.mean()  # a partial mask, so both sides of the check count
    changed = (overlay != source).any(-1)
    # the backend's drawing (tint, outline, number tag), unchanged on the way to the page
    assert np.array_equal(overlay, np.asarray(draw_overlay(Image.fromarray(source), [expected], 0.5)))
    _, ring = outline(mask)
    assert (changed & ~mask & ~ring).mean() < 0.01  # outside the mask and its outline: the tag only
    assert changed[mask].mean() > 0.99  # and (nearly) every pixel inside is
    assert page.locator("#raw textarea").input_value() == SEG_TOKEN
    assert "[mask 1]" in page.inner_text("#chat")
    assert page.locator("#query textarea").input_value() == ""

    # a follow-up turn keeps the conversation
    _send(page, "Now the other one.")
    page.locator("#chat", has_text="Now the other one.").wait_for()
    _status(page, "Answered in")
    assert page.inner_text("#chat").count("[mask 1]") == 2

    screenshot = tmp_path / "stamp-demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    record_property("screenshot", str(screenshot))
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000
    assert page.errors == [] and browser.outside == []
    page.close()


@pytest.mark.slow
def test_the_answer_streams_before_the_masks(server, browser):
    url, backend, image_path = server
    gate = backend.segmenter
    page = _open(browser, url)
    _upload(page, image_path)
    _status(page, "Image loaded")
    gate.resume.clear()
    gate.streamed.clear()
    try:
        _send(page, QUESTION)
        assert gate.streamed.wait(timeout=WAIT_MS / 1000), "no piece of the answer was generated"
        _status(page, "Generating the answer")
        page.locator("#chat", has_text="[mask 1]").wait_for()  # the text is on the page ...
        assert page.locator("#overlay img").count() == 0  # ... the masks are not yet
    finally:
        gate.resume.set()
    _status(page, "Answered in")
    page.locator("#overlay img").wait_for()
    assert page.errors == [] and browser.outside == []
    page.close()


@pytest.mark.slow
def test_bad_uploads_and_requests_get_a_message(server, browser, tmp_path):
    url, _, image_path = server
    page = _open(browser, url)
    page.locator("#send").click()
    _status(page, "Error: Upload an image or pick an example first.")
    (tmp_path / "notes.txt").write_text("These are notes, not a picture.")
    _upload(page, tmp_path / "notes.txt")
    assert "'notes.txt' is not an image that can be read" in _status(page, "notes.txt")
    (tmp_path / "photo.png").write_bytes(os.urandom(2048))  # named like an image, but is not one
    _upload(page, tmp_path / "photo.png")
    assert "'photo.png' is not an image that can be read" in _status(page, "photo.png")
    assert page.locator("#image img").count() == 0
    _upload(page, image_path)  # the server still serves
    _status(page, "Image loaded")
    page.locator("#send").click()
    _status(page, "Error: The request is empty")
    assert page.errors == [] and browser.outside == []
    page.close()


@pytest.mark.slow
def test_a_slow_request_does_not_block_others(server, browser):
    url, backend, image_path = server
    gate = backend.segmenter
    first, second = _open(browser, url), _open(browser, url)
    _upload(first, image_path)
    _status(first, "Image loaded")
    gate.open.clear()
    gate.entered.clear()
    try:
        _send(first, QUESTION)
        assert gate.entered.wait(timeout=WAIT_MS / 1000), "the first request never reached the model"
        _upload(second, image_path)  # while the model is busy with the first tab
        _status(second, "Image loaded")
        _send(second, QUESTION)  # waits in the queue behind the first
        assert first.locator("#overlay img").count() == 0
    finally:
        gate.open.set()
    for page in (first, second):
        _status(page, "Answered in")
        page.locator("#overlay img").wait_for()
        assert page.errors == []
        page.close()
    assert browser.outside == []
