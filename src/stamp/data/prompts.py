"""Question and answer templates for segmentation chats: a ``PromptSet`` read from YAML
(``conf/prompts/<name>.yaml`` or a user's file), chosen with a seeded generator.

Families (what the user asks) and kinds (what the answer says):

* ``refer``  - a referring phrase naming one object (RefCOCO/+/g, RefCLEF, short ReasonSeg queries).
* ``gref``   - a generalised phrase that may name one, several or no objects (gRefCOCO); the
  question never gives away which, the answer does (``refer`` / ``multi`` / ``none`` kinds).
* ``reason`` - a full sentence that needs reasoning to find the target (ReasonSeg).

Every answer holds exactly one ``<|seg|>``. Evaluation uses the first template of each list
(``rng=None``), so a score never depends on a random draw.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from stamp.model.tokens import SEG_TOKEN
from stamp.utils.config import CONF_DIR

FAMILIES = ("refer", "gref", "reason")
KINDS = ("refer", "multi", "none", "reason")
PLACEHOLDERS = ("text", "np")

_LEADING_ARTICLE = re.compile(r"^(the|a|an)\s+", re.IGNORECASE)
# First words with which a phrase already stands alone as a noun phrase ("all three kids",
# "both men", "two dogs", "everything on the table"): {np} does not put "the" before them.
_DETERMINERS = frozenset(
    """the a an this that these those all both each every either neither any some no none several
    many few most other another everything everyone everybody anything anyone anybody something
    someone somebody nothing nobody my your his her its our their one two three four five six
    seven eight nine ten eleven twelve""".split()  # noqa: SIM905 - a word list reads better so
)


def phrase(text: str) -> str:
    """A referring expression ready to follow "the": trimmed, no leading article or final period."""
    text = " ".join(text.split()).rstrip(".")
    return _LEADING_ARTICLE.sub("", text)


def noun_phrase(text: str) -> str:
    """The expression as a noun phrase that stands alone: as written (trimmed, no final period)
    when it starts with a determiner, quantifier or number, else "the <expression>"."""
    text = " ".join(text.split()).rstrip(".")
    first = text.split(" ", 1)[0].lower() if text else ""
    return text if first in _DETERMINERS or first.isdigit() else f"the {text}"


def sentence(text: str) -> str:
    """A reasoning query as a sentence: trimmed, ending with punctuation."""
    text = " ".join(text.split())
    return text if text[-1:] in ".?!" else text + "."


def pick(options: tuple[str, ...], rng: np.random.Generator | None) -> str:
    """A seeded random template, or the first one when ``rng`` is None (evaluation)."""
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


@dataclass(frozen=True)
class PromptSet:
    """Question templates per family and answer templates per kind (see ``conf/prompts/default.yaml``)."""

    name: str
    questions: dict[str, tuple[str, ...]]
    answers: dict[str, tuple[str, ...]]

    def chat(self, family: str, kind: str, text: str, rng: np.random.Generator | None) -> tuple[str, str]:
        """(question, answer) asking for one mask.

        Args:
            family: ``refer``, ``gref`` or ``reason`` (the question templates).
            kind: ``refer`` (one object), ``multi`` (several, one union mask), ``none`` (no object,
                an empty mask) or ``reason`` (the answer templates).
            text: the referring phrase or reasoning sentence.
            rng: the sample's generator; None = the first templates.
        """
        if family not in self.questions:
            raise ValueError(f"unknown prompt family {family!r}; valid families: {sorted(self.questions)}")
        if kind not in self.answers:
            raise ValueError(f"unknown answer kind {kind!r}; valid kinds: {sorted(self.answers)}")
        fill = {"text": sentence(text) if family == "reason" else phrase(text), "np": noun_phrase(text)}
        return pick(self.questions[family], rng).format(**fill), pick(self.answers[kind], rng).format(**fill)


def _templates(node, where: str, names: tuple[str, ...], seg: bool) -> dict[str, tuple[str, ...]]:
    if not isinstance(node, dict) or set(node) != set(names):
        got = sorted(node) if isinstance(node, dict) else type(node).__name__
        raise ValueError(f"{where}: expected lists for exactly {list(names)}, got {got}")
    out = {}
    for key, items in node.items():
        if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
            raise ValueError(f"{where}.{key}: expected a non-empty list of strings")
        for t in items:
            fields = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
            if fields - set(PLACEHOLDERS):
                raise ValueError(
                    f"{where}.{key}: template {t!r} uses {sorted(fields - set(PLACEHOLDERS))}; "
                    f"placeholders are {{{'}, {'.join(PLACEHOLDERS)}}}"
                )
            if t.count(SEG_TOKEN) != (1 if seg else 0):
                raise ValueError(
                    f"{where}.{key}: template {t!r} must hold {SEG_TOKEN} {'exactly once' if seg else 'nowhere'}"
                )
        out[key] = tuple(items)
    return out


def prompts_dir() -> Path:
    return Path(CONF_DIR) / "prompts"


@functools.lru_cache(maxsize=16)
def load_prompts(name: str = "default") -> PromptSet:
    """The template set ``name``: a file of ``conf/prompts/`` (``default``) or a path to a YAML file."""
    path = Path(name).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        path = prompts_dir() / f"{name}.yaml"
        if not path.is_file():
            valid = sorted(p.stem for p in prompts_dir().glob("*.yaml"))
            raise ValueError(f"unknown prompt set {name!r}; valid names: {valid}, or a path to a .yaml file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # YAML syntax errors of several kinds
        raise ValueError(f"cannot parse prompt file {path}: {e}") from e
    if not isinstance(cfg, dict) or set(cfg) != {"questions", "answers"}:
        raise ValueError(f"{path}: expected the keys 'questions' and 'answers'")
    return PromptSet(
        name=str(name),
        questions=_templates(cfg["questions"], f"{path}: questions", FAMILIES, seg=False),
        answers=_templates(cfg["answers"], f"{path}: answers", KINDS, seg=True),
    )


def segmentation_chat(
    family: str, kind: str, text: str, rng: np.random.Generator | None, prompts: str = "default"
) -> tuple[str, str]:
    """(question, answer) from the template set ``prompts``; see ``PromptSet.chat``."""
    return load_prompts(prompts).chat(family, kind, text, rng)
