"""What the demo page does, without the page: check and shrink uploads, keep the conversation
about one image, ask the segmenter, and draw the masks.

Every action returns the new ``Session`` (one per browser tab) and a ``View`` (what the page
shows). Problems a user can fix (a file that is not an image, an empty request) come back as a
message in ``View.status``, never as an exception.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from stamp.data.sample import Sample
from stamp.inference.images import load_image
from stamp.model.tokens import SEG_TOKEN, mark_masks
from stamp.utils.overlay import empty_masks_note, mask_image, overlay

log = logging.getLogger(__name__)

MIN_SIDE = (
    28  # one Qwen2-VL cell; smaller images are refused (Qwen3-VL's processor rounds up to its 32-px cell)
)
# Chat-template markers such as <|im_end|> or <|seg|> typed into a request would be read as
# special tokens and could forge turns; they are removed from requests.
SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


@dataclass(frozen=True)
class Limits:
    """Input limits (their values live in ``conf/demo.yaml``, key ``demo``)."""

    max_image_side: int  # longer images are downscaled to this many pixels on their longest side
    max_query_chars: int  # longer requests are refused
    max_turns: int  # earlier turns given to the model as context (the oldest are dropped)


@dataclass
class Session:
    """One browser tab: its image, the conversation about it and the last answer's masks."""

    image: Image.Image | None = None  # as the model sees it (after downscaling)
    name: str = ""  # where the image came from, for messages
    turns: list[tuple[str, str]] = field(default_factory=list)  # (request, raw answer with <|seg|>)
    masks: list[np.ndarray] = field(default_factory=list)  # the last answer's masks, one per <|seg|>
    refined: list[np.ndarray] | None = None  # their SAM refinement, once asked for


@dataclass
class View:
    """What the page shows after an action."""

    chat: list[dict[str, str]]  # chat messages, {"role", "content"}
    image: Image.Image | None  # the image the model sees
    overlay: Image.Image | None  # the image with the last answer's masks tinted
    mask: Image.Image | None  # the union of those masks, black and white
    raw: str  # the last answer as generated, <|seg|> tokens included
    status: str | None  # a one-line message: what happened, or what to fix (None: no news)


def render_answer(text: str) -> str:
    """An answer for the chat: the k-th ``<|seg|>`` becomes **[mask k]**, the number that labels
    mask k on the overlay (no colour word, which could read as if the model had said it)."""
    marked = re.sub(r"\[mask (\d+)\]", r"**[mask \1]**", mark_masks(text))
    return marked or "(empty answer)"


def clean_query(query: str | None) -> str:
    """The request as the model gets it: stripped, chat-template markers removed."""
    return " ".join(SPECIAL_TOKEN.sub(" ", query or "").split())


def prepare_image(path: str | Path, max_side: int) -> tuple[Image.Image, str]:
    """Open an uploaded file as an RGB image, downscaled to ``max_side`` on its longest side.

    Returns the image and a note for the user (empty when nothing was changed). Raises
    ``ValueError`` with a message for the page when the file is not a usable image.
    """
    name = Path(path).name
    try:
        image = load_image(path)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name!r} is too large to open safely ({e})") from e
    except (ValueError, OSError) as e:
        raise ValueError(
            f"{name!r} is not an image that can be read; upload a PNG, JPEG, WebP, BMP, GIF or TIFF file"
        ) from e
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        raise ValueError(f"{name!r} is only {w}x{h} pixels; the model needs at least {MIN_SIDE} on each side")
    note = ""
    if max(w, h) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        if min(image.size) < MIN_SIDE:
            raise ValueError(
                f"{name!r} ({w}x{h}) is too narrow to shrink to {max_side} pixels on its longest side"
            )
        note = f"Downscaled from {w}x{h} to {image.width}x{image.height} (limit: {max_side} pixels)."
    return image, note


class DemoBackend:
    """The demo's actions on a ``Segmenter``.

    Args:
        segmenter: a ``stamp.inference.Segmenter`` (without a refiner: the page decides on SAM
            per request).
        limits: input limits.
        refiner: an optional ``SamRefiner``; without one the SAM toggle is off and disabled.
        examples: samples whose images (and first request) make the example gallery.
    """

    def __init__(self, segmenter, limits: Limits, refiner=None, examples: Sequence[Sample] = ()) -> None:
        self.segmenter = segmenter
        self.limits = limits
        self.refiner = refiner
        self.examples = list(examples)
        self._sam_lock = threading.Lock()  # the refiner caches the current image's embedding

    @property
    def sam_available(self) -> bool:
        return self.refiner is not None

    # -- actions --------------------------------------------------------------------------

    def open_image(self, path: str | Path | None, alpha: float) -> tuple[Session, View]:
        """A new conversation about an uploaded file (or a message saying why it cannot be)."""
        if path is None:
            return self._fail(Session(), alpha, False, "Upload an image or pick an example to start.")
        try:
            image, note = prepare_image(path, self.limits.max_image_side)
        except ValueError as e:
            return self._fail(Session(), alpha, False, f"Error: {e}.")
        session = Session(image=image, name=Path(path).name)
        return session, self.view(
            session, alpha, False, " ".join(["Image loaded; type a request.", note]).strip()
        )

    def open_example(self, index: int, alpha: float) -> tuple[Session, View, str]:
        """A new conversation about example ``index``; also returns its suggested request."""
        sample = self.examples[index]
        session = Session(image=sample.image.convert("RGB"), name=f"example {index + 1}")
        question = sample.messages[0]["content"]
        return (
            session,
            self.view(session, alpha, False, "Example loaded; send the suggested request or type another."),
            question,
        )

    def ask(
        self, session: Session | None, query: str | None, use_sam: bool, alpha: float
    ) -> tuple[Session, View, bool]:
        """Answer ``query`` about the session's image after its earlier turns.

        Returns the session, the view and whether the request was answered (the page keeps
        an unanswered request in its text box).
        """
        *_, last = self.ask_stream(session, query, use_sam, alpha)
        return last

    def ask_stream(
        self, session: Session | None, query: str | None, use_sam: bool, alpha: float
    ) -> Iterator[tuple[Session, View, bool]]:
        """``ask`` as it happens: a view with the answer so far for every step of the
        generation (no masks yet, ``answered`` False), then ``ask``'s result."""
        session = session or Session()
        use_sam = use_sam and self.sam_available
        question = clean_query(query)
        problem = None
        if session.image is None:
            problem = "Upload an image or pick an example first."
        elif not question:
            problem = "The request is empty; type one, e.g. 'Please segment the red circle.'"
        elif len(question) > self.limits.max_query_chars:
            problem = (
                f"The request has {len(question)} characters; the limit is {self.limits.max_query_chars}."
            )
        if problem:
            yield (*self._fail(session, alpha, use_sam, f"Error: {problem}"), False)
            return
        history = session.turns[-self.limits.max_turns :] if self.limits.max_turns > 0 else []
        start = time.perf_counter()
        result = None
        try:
            for item in self.segmenter.stream(session.image, question, history=history):
                if isinstance(item, str):  # the answer so far: shown, masks not drawn yet
                    partial = replace(
                        session, turns=[*session.turns, (question, item)], masks=[], refined=None
                    )
                    yield partial, self.view(partial, alpha, False, "Generating the answer..."), False
                else:
                    result = item
            refined = self._refine(session.image, result.masks) if use_sam else None
        except ValueError as e:  # e.g. an image shape the processor refuses
            yield (*self._fail(session, alpha, use_sam, f"Error: {str(e).rstrip('.')}."), False)
            return
        except Exception:  # keep serving the other users; the traceback goes to the server log
            log.exception("request %r about %s failed", question, session.name)
            yield (
                *self._fail(
                    session, alpha, use_sam, "Error: the model failed on this request; see the server log."
                ),
                False,
            )
            return
        seconds = time.perf_counter() - start
        session = replace(
            session, turns=[*session.turns, (question, result.text)], masks=result.masks, refined=refined
        )
        n = len(result.masks)
        if n:
            status = f"Answered in {seconds:.1f} s with {n} mask{'s' if n > 1 else ''}" + (
                ", refined with SAM." if use_sam else "."
            )
            note = empty_masks_note(result.masks)
            if note:
                status += " " + note
        else:
            status = f"Answered in {seconds:.1f} s; the answer has no `{SEG_TOKEN}`, so there is no mask."
        if len(session.turns) > self.limits.max_turns:
            status += f" Only the last {self.limits.max_turns} turns are kept as context."
        yield session, self.view(session, alpha, use_sam, status), True

    def redraw(
        self, session: Session | None, use_sam: bool, alpha: float, refine: bool = True
    ) -> tuple[Session, View]:
        """The last answer drawn again (new opacity, SAM on or off). With ``refine`` SAM runs if
        it has not yet; without, unrefined masks are drawn as they are. ``View.status`` is None
        unless there is news: the page keeps its message."""
        session = session or Session()
        use_sam = use_sam and self.sam_available
        status = None
        if refine and use_sam and session.masks and session.refined is None:
            session = replace(session, refined=self._refine(session.image, session.masks))
            status = "Masks refined with SAM."
        return session, self.view(session, alpha, use_sam, status)

    def clear(self, session: Session | None, alpha: float) -> tuple[Session, View]:
        """Forget the conversation, keep the image."""
        session = Session(image=session.image, name=session.name) if session else Session()
        message = "Conversation cleared." if session.image is not None else ""
        return session, self.view(session, alpha, False, message)

    # -- drawing --------------------------------------------------------------------------

    def view(self, session: Session, alpha: float, use_sam: bool, status: str | None) -> View:
        """What the page shows for ``session``: chat, overlay and mask of the last answer."""
        chat = []
        for question, answer in session.turns:
            chat += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": render_answer(answer)},
            ]
        image = session.image
        if image is None:
            return View(chat, None, None, None, "", status)
        masks = session.refined if use_sam and session.refined is not None else session.masks
        alpha = float(min(max(alpha, 0.0), 1.0))
        over = overlay(image, masks, alpha) if masks else None
        mask = mask_image(masks, (image.height, image.width)) if masks else None
        raw = session.turns[-1][1] if session.turns else ""
        return View(chat, image, over, mask, raw, status)

    def _refine(self, image: Image.Image, masks: list[np.ndarray]) -> list[np.ndarray]:
        if not masks:
            return []
        with self._sam_lock:
            return self.refiner.refine(image, masks)

    def _fail(self, session: Session, alpha: float, use_sam: bool, status: str) -> tuple[Session, View]:
        return session, self.view(session, alpha, use_sam, status)
