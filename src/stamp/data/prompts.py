"""Question and answer templates for segmentation chats, chosen with a seeded generator.

Families (what the user asks) and kinds (what the answer says):

* ``refer``  - a referring phrase naming one object (RefCOCO/+/g, RefCLEF, short ReasonSeg queries).
* ``gref``   - a generalised phrase that may name one, several or no objects (gRefCOCO); the
  question never gives away which, the answer does (``refer`` / ``multi`` / ``none`` kinds).
* ``reason`` - a full sentence that needs reasoning to find the target (ReasonSeg).

Every answer ends with exactly one ``<|seg|>``. Evaluation uses the first template of each list
(``rng=None``), so a score never depends on a random draw.
"""

from __future__ import annotations

import re

import numpy as np

from stamp.model.tokens import SEG_TOKEN

S = SEG_TOKEN

QUESTIONS: dict[str, tuple[str, ...]] = {
    "refer": (
        "Please segment the {text} in this image.",
        "Can you segment the {text} in this image?",
        "What is the {text} in this picture? Please answer with a segmentation mask.",
        "Where is the {text}? Show it with a segmentation mask.",
        "Segment the {text}.",
        "Could you mark the {text} for me?",
    ),
    "gref": (
        "Please segment every {text} in this image, if there is any.",
        "Find and segment the {text} in this picture.",
        "Is there any {text} here? Please segment all of it.",
        "Segment all objects that match the description: {text}.",
        "Could you mark each {text} you can see?",
    ),
    "reason": (
        "{text} Please output the segmentation mask.",
        "{text} Please answer with a segmentation mask.",
        "{text} Respond by segmenting the answer in the image.",
        "Look at this image. {text} Segment your answer.",
    ),
}

ANSWERS: dict[str, tuple[str, ...]] = {
    "refer": (
        f"Sure, it is {S}",
        f"It is {S}",
        f"Sure, here it is: {S}",
        "Sure, the {text} is " + S,
        "Here is the {text}: " + S,
    ),
    "multi": (
        f"Sure, here they are: {S}",
        f"They are {S}",
        f"Sure, all of them are {S}",
        "Here are all the {text}: " + S,
    ),
    "none": (
        f"There is no such object in this image. {S}",
        "I cannot find any {text} in this image. " + S,
        f"Nothing in the picture matches that description. {S}",
        f"Sorry, there is none here. {S}",
    ),
    "reason": (
        f"Sure, {S}",
        f"It is {S}",
        f"Sure, here is the segmentation: {S}",
        f"The answer is {S}",
    ),
}

_LEADING_ARTICLE = re.compile(r"^(the|a|an)\s+", re.IGNORECASE)


def phrase(text: str) -> str:
    """A referring expression ready to follow "the": trimmed, no leading article or final period."""
    text = " ".join(text.split()).rstrip(".")
    return _LEADING_ARTICLE.sub("", text)


def sentence(text: str) -> str:
    """A reasoning query as a sentence: trimmed, ending with punctuation."""
    text = " ".join(text.split())
    return text if text[-1:] in ".?!" else text + "."


def pick(options: tuple[str, ...], rng: np.random.Generator | None) -> str:
    """A seeded random template, or the first one when ``rng`` is None (evaluation)."""
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def segmentation_chat(family: str, kind: str, text: str, rng: np.random.Generator | None) -> tuple[str, str]:
    """(question, answer) asking for one mask.

    Args:
        family: ``refer``, ``gref`` or ``reason`` (the question templates).
        kind: ``refer`` (one object), ``multi`` (several, one union mask), ``none`` (no object,
            an empty mask) or ``reason`` (the answer templates).
        text: the referring phrase or reasoning sentence.
        rng: the sample's generator; None = the first templates.
    """
    if family not in QUESTIONS:
        raise ValueError(f"unknown prompt family {family!r}; valid families: {sorted(QUESTIONS)}")
    if kind not in ANSWERS:
        raise ValueError(f"unknown answer kind {kind!r}; valid kinds: {sorted(ANSWERS)}")
    text = sentence(text) if family == "reason" else phrase(text)
    question = pick(QUESTIONS[family], rng).format(text=text)
    answer = pick(ANSWERS[kind], rng).format(text=phrase(text))
    return question, answer
