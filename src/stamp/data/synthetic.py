"""A seeded synthetic referring-segmentation and VQA dataset that a tiny model can learn on a CPU.

Each image holds a few coloured shapes on a pale background. Every sample is a chat of one of
these kinds:

* ``refer``  - one target named by colour, shape, both, or its relative position among the
  shapes a description fits ("the left red shape", "the upper circle"); the text is needed
  to pick it out. Words always describe the target itself, which keeps the grounding of
  colour and shape words consistent for a tiny model.
* ``multi``  - "all the red shapes": one ``<|seg|>`` whose ground truth is the union.
* ``none``   - "the purple star" where there is none: one ``<|seg|>`` with an all-zero mask.
  The answer reads like any other ("Sure, the purple star is <|seg|>"): the mask, not the
  text, says that nothing matches (an empty mask is the prediction "no target"). Each mask
  cell looks for its own match in the image, which the tiny model learns far more reliably
  than one yes/no word at the start of the answer (docs/PERFORMANCE.md).
* ``pair``   - two targets in one answer: two ``<|seg|>``, each with its own mask.
* ``vqa``    - a short question about colour, shape, count or presence; no mask.
* ``caption`` - "Describe the image.": every shape named by its colour and kind, left to right;
  no mask. Not in the default mixture; in training it gives the language model's answers
  practice in reading every shape, which the short VQA answers give one word at a time.

A sample is a pure function of ``(seed, split, index)``, so splits are reproducible and disjoint
(each split draws from its own random stream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from stamp.data.sample import Sample
from stamp.model.tokens import SEG_TOKEN

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 220),
    "yellow": (235, 200, 35),
    "purple": (140, 60, 185),
    "orange": (245, 135, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
# Relative position among the shapes a description fits: the sort key puts the named one first.
POSITIONS = {
    "left": lambda s: s.cx,
    "right": lambda s: -s.cx,
    "upper": lambda s: s.cy,
    "lower": lambda s: -s.cy,
}
POSITION_MARGIN = 12.0  # pixels between the named shape and the runner-up
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
ROLES = ("user", "assistant")  # a chat's turns alternate between them
KINDS = ("refer", "multi", "none", "pair", "vqa", "caption")

REFER_QUESTIONS = (
    "Segment the {d}.",
    "Please segment the {d}.",
    "Where is the {d}?",
    "Can you segment the {d} in this image?",
    "Show me the {d}.",
)
MULTI_QUESTIONS = ("Segment all the {d}.", "Please segment every {s}.", "Show me all the {d}.")
PAIR_QUESTIONS = ("Segment the {a} and the {b}.", "Please segment the {a} and the {b}.")
# Answers restate what they segment, right before each <|seg|>, as a person would.
ANSWER_ONE = "Sure, the {d} is " + SEG_TOKEN
ANSWER_MANY = "Sure, all the {d} are " + SEG_TOKEN
ANSWER_PAIR = "Sure, the {a} is " + SEG_TOKEN + " and the {b} is " + SEG_TOKEN
CAPTION_QUESTIONS = ("Describe the image.", "What is in this image?", "Describe the shapes in this image.")


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cx: float
    cy: float
    r: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def shape_polygon(s: Shape) -> list[tuple[float, float]] | None:
    """Outline of a shape (None for a circle, which is drawn as an ellipse)."""
    if s.kind == "circle":
        return None
    if s.kind == "square":
        h = s.r * 0.85
        return [(s.cx - h, s.cy - h), (s.cx + h, s.cy - h), (s.cx + h, s.cy + h), (s.cx - h, s.cy + h)]
    if s.kind == "triangle":
        return [
            (s.cx + s.r * math.cos(a), s.cy + s.r * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if s.kind == "star":
        pts = []
        for i in range(10):
            rad = s.r if i % 2 == 0 else s.r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((s.cx + rad * math.cos(a), s.cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape kind {s.kind!r}; expected one of {SHAPES}")


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape, fill) -> None:
    poly = shape_polygon(s)
    if poly is None:
        draw.ellipse([s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(
    shapes: list[Shape], size: int, background: tuple[int, int, int]
) -> tuple[Image.Image, list[np.ndarray]]:
    """Draw the scene; return the RGB image and one boolean mask per shape."""
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    masks = []
    for s in shapes:
        draw_shape(draw, s, COLOURS[s.colour])
        m = Image.new("L", (size, size), 0)
        draw_shape(ImageDraw.Draw(m), s, 255)
        masks.append(np.asarray(m) > 127)
    return img, masks


class SyntheticScenes:
    """Deterministic generator of synthetic samples.

    Args:
        split: ``train``, ``val`` or ``test``; each has its own random stream.
        size: number of samples in the split.
        image_size: side of the square images in pixels (at least 224 for the demo).
        seed: base seed.
        min_shapes, max_shapes: shapes per image.
        radius: (min, max) radius of a shape in pixels.
        kind_weights: sampling weights of the sample kinds (``KINDS``).
        turns: (min, max) question-answer turns per chat. Several turns about one image teach
            that the words decide the mask (the same picture, different targets); evaluation
            splits use single turns, so that every expression is scored on its own.
        curriculum: a warm-up for training in index order: three quarters of the first
            ``curriculum`` samples name one shape by its colour alone among distinct colours,
            the rest (and everything after) come from the full mixture. Colour words are the
            quickest to ground; once the mask block reads them, the harder expressions follow
            (a tiny random-init model otherwise idles for a long while segmenting any shape).
            0 = off.
        kind_curriculum: a second warm-up phase of this many samples right after the first:
            shapes of distinct kinds and one colour, named by their kind alone, a different
            one in each turn (up to ``turns``), so that the words for shapes are grounded
            before the full mixture. 0 = off.
        shared: probabilities that a scene repeats the first shape's colour, or its kind,
            in the other shapes (the rest draw both freely). Repeated colours make the kind
            words necessary; repeated kinds the colour words.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10_000,
        image_size: int = 224,
        seed: int = 0,
        min_shapes: int = 2,
        max_shapes: int = 4,
        radius: tuple[float, float] = (24.0, 44.0),
        kind_weights: dict[str, float] | None = None,
        turns: tuple[int, int] = (1, 1),
        curriculum: int = 0,
        kind_curriculum: int = 0,
        shared: tuple[float, float] = (0.25, 0.25),
    ) -> None:
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; valid splits: {sorted(SPLIT_IDS)}")
        if image_size < 28:
            raise ValueError(f"image_size={image_size} is smaller than one 28x28 cell")
        if not 1 <= min_shapes <= max_shapes:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        weights = dict(kind_weights or {"refer": 0.55, "multi": 0.1, "none": 0.1, "pair": 0.05, "vqa": 0.2})
        unknown = set(weights) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown sample kind(s) {sorted(unknown)}; valid kinds: {list(KINDS)}")
        if not 1 <= turns[0] <= turns[1]:
            raise ValueError(f"need 1 <= min turns <= max turns, got {tuple(turns)}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.turns = (int(turns[0]), int(turns[1]))
        self.curriculum, self.kind_curriculum = int(curriculum), int(kind_curriculum)
        if min(shared) < 0 or sum(shared) > 1:
            raise ValueError(f"shared={tuple(shared)}: need two probabilities with a sum of at most 1")
        self.shared = (float(shared[0]), float(shared[1]))
        self.min_shapes, self.max_shapes, self.radius = min_shapes, max_shapes, tuple(radius)
        self.kinds = [k for k in KINDS if weights.get(k, 0) > 0]
        p = np.array([weights[k] for k in self.kinds], dtype=float)
        self.kind_p = p / p.sum()

    def __len__(self) -> int:
        return self.size

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = self.rng(index)
        if index < self.curriculum and rng.random() < 0.75:
            return self.easy(rng, index)
        if 0 <= index - self.curriculum < self.kind_curriculum:
            return self.easy_kind(rng, index)
        shapes = self.scene(rng)
        n_turns = int(rng.integers(self.turns[0], self.turns[1] + 1))
        texts, groups, kinds, short = [], [], [], None
        for _ in range(100 * n_turns):
            if len(kinds) == n_turns:
                break
            kind = str(rng.choice(self.kinds, p=self.kind_p))
            made = getattr(self, f"_{kind}")(rng, shapes)
            if made is None:  # e.g. "all the red shapes" in a scene without two of a kind
                continue
            question, answer, targets, short = made
            texts += [question, answer]
            groups += targets
            kinds.append(kind)
        if len(kinds) < n_turns:
            raise RuntimeError(f"no sample of kinds {self.kinds} fits the scenes of index {index}")
        kind = kinds[0] if n_turns == 1 else "chat"
        return self.make(rng, shapes, texts, groups, kind, index, short if n_turns == 1 else None)

    def make(self, rng, shapes, texts, groups, kind, index, short) -> Sample:
        """Render the scene and pair the chat (alternating user/assistant texts) with its masks."""
        bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
        image, shape_masks = render(shapes, self.image_size, bg)
        masks = []
        for group in groups:
            m = np.zeros((self.image_size, self.image_size), dtype=bool)
            for i in group:
                m |= shape_masks[i]
            masks.append(m)
        return Sample(
            image=image,
            messages=[{"role": ROLES[i % 2], "content": t} for i, t in enumerate(texts)],
            masks=masks,
            kind=kind,
            id=f"synthetic-{self.split}-{index}",
            answer=short,
        )

    def easy(self, rng: np.random.Generator, index: int) -> Sample:
        """A curriculum sample: one shape named by its colour alone, every colour distinct."""
        n = int(rng.integers(max(2, self.min_shapes), self.max_shapes + 1))
        pairs = [(str(c), str(rng.choice(SHAPES))) for c in rng.choice(list(COLOURS), n, replace=False)]
        return self.name_one(rng, self.place(pairs, rng), index, lambda s: f"{s.colour} shape")

    def easy_kind(self, rng: np.random.Generator, index: int) -> Sample:
        """A curriculum chat: shapes of distinct kinds, all of one colour (so that only the shape
        tells them apart), each turn naming another of them by its kind alone."""
        n = int(rng.integers(max(2, self.min_shapes), min(self.max_shapes, len(SHAPES)) + 1))
        colour = str(rng.choice(list(COLOURS)))
        shapes = self.place([(colour, str(k)) for k in rng.choice(SHAPES, n, replace=False)], rng)
        n_turns = min(len(shapes), int(rng.integers(self.turns[0], self.turns[1] + 1)))
        texts, groups = [], []
        for idx in rng.choice(len(shapes), n_turns, replace=False):
            d = shapes[int(idx)].kind
            texts += [str(rng.choice(REFER_QUESTIONS)).format(d=d), ANSWER_ONE.format(d=d)]
            groups.append([int(idx)])
        return self.make(rng, shapes, texts, groups, "refer" if n_turns == 1 else "chat", index, None)

    def name_one(self, rng, shapes: list[Shape], index: int, describe) -> Sample:
        """A single-turn ``refer`` sample: a random shape, named by ``describe(shape)``."""
        idx = int(rng.integers(len(shapes)))
        d = describe(shapes[idx])
        question = str(rng.choice(REFER_QUESTIONS)).format(d=d)
        return self.make(rng, shapes, [question, ANSWER_ONE.format(d=d)], [[idx]], "refer", index, None)

    # -- scenes -------------------------------------------------------------------------------

    def scene(self, rng: np.random.Generator) -> list[Shape]:
        """Non-overlapping shapes with unique (colour, kind). By default half of the scenes repeat
        a colour or a kind, so that one word is often not enough (``shared``); the rest mostly
        have distinct colours."""
        n = int(rng.integers(self.min_shapes, self.max_shapes + 1))
        colours, kinds = list(COLOURS), list(SHAPES)
        pairs: list[tuple[str, str]] = []
        share = rng.random()
        while len(pairs) < n:
            if pairs and share < self.shared[0]:
                c, k = pairs[0][0], str(rng.choice(kinds))  # same colour, another kind
            elif pairs and share < self.shared[0] + self.shared[1]:
                c, k = str(rng.choice(colours)), pairs[0][1]  # same kind, another colour
            else:
                c, k = str(rng.choice(colours)), str(rng.choice(kinds))
            if (c, k) not in pairs:
                pairs.append((c, k))
        return self.place(pairs, rng)

    def place(self, pairs: list[tuple[str, str]], rng: np.random.Generator) -> list[Shape]:
        """Random non-overlapping positions and sizes for (colour, kind) pairs."""
        lo, hi = self.radius
        shapes: list[Shape] = []
        for c, k in pairs:
            for _ in range(200):
                r = float(rng.uniform(lo, hi))
                cx, cy = rng.uniform(r + 2, self.image_size - r - 2, size=2)
                if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.r + 4 for o in shapes):
                    shapes.append(Shape(c, k, float(cx), float(cy), r))
                    break
        return shapes

    # -- sample kinds -----------------------------------------------------------------------
    # Each returns (question, answer, target index groups, short answer) or None to retry.

    def _refer(self, rng, shapes):
        idx = int(rng.integers(len(shapes)))
        t = shapes[idx]
        options = [f"{t.colour} {t.kind}"]
        if sum(s.colour == t.colour for s in shapes) == 1:
            options += [f"{t.colour} shape"] * 2  # colour words are the quickest to ground
        if sum(s.kind == t.kind for s in shapes) == 1:
            options.append(t.kind)
        pos = self._position(rng, shapes, idx) if rng.random() < 0.5 else None
        if pos is not None:
            options.append(pos)
        d = str(rng.choice(options))
        return str(rng.choice(REFER_QUESTIONS)).format(d=d), ANSWER_ONE.format(d=d), [[idx]], None

    def _position(self, rng, shapes, idx) -> str | None:
        """'<left|right|upper|lower> <base>' naming shapes[idx] as the extreme one, by a clear
        margin, among the shapes that fit <base> (its kind, its colour, or any shape)."""
        t = shapes[idx]
        found = []
        for base, match in (
            (t.kind, lambda s: s.kind == t.kind),
            (f"{t.colour} shape", lambda s: s.colour == t.colour),
            ("shape", lambda s: True),
        ):
            group = [s for s in shapes if match(s)]
            if len(group) < 2:
                continue
            for word, key in POSITIONS.items():
                ranked = sorted(group, key=key)
                if ranked[0] is t and key(ranked[1]) - key(t) >= POSITION_MARGIN:
                    found.append(f"{word} {base}")
        return str(rng.choice(found)) if found else None

    def _multi(self, rng, shapes):
        by_colour = {c: [i for i, s in enumerate(shapes) if s.colour == c] for c in COLOURS}
        by_kind = {k: [i for i, s in enumerate(shapes) if s.kind == k] for k in SHAPES}
        groups = [(f"{c} shapes", f"{c} shape", g) for c, g in by_colour.items() if len(g) >= 2]
        groups += [(f"{k}s", k, g) for k, g in by_kind.items() if len(g) >= 2]
        if not groups:
            return None
        d, s, g = groups[int(rng.integers(len(groups)))]
        return str(rng.choice(MULTI_QUESTIONS)).format(d=d, s=s), ANSWER_MANY.format(d=d), [g], None

    def _none(self, rng, shapes):
        # The same forms as the referring expressions, so that the words alone never tell that
        # the target is missing: an absent colour, an absent kind, or an absent combination.
        colours = [c for c in COLOURS if all(s.colour != c for s in shapes)]
        kinds = [k for k in SHAPES if all(s.kind != k for s in shapes)]
        options = [self._absent(rng, shapes), f"{rng.choice(colours)} shape"]
        if kinds:
            options.append(str(rng.choice(kinds)))
        d = str(rng.choice(options))
        return str(rng.choice(REFER_QUESTIONS)).format(d=d), ANSWER_ONE.format(d=d), [[]], None

    @staticmethod
    def _absent(rng, shapes) -> str:
        """'<colour> <kind>' naming no shape: its colour, or its kind, is missing altogether."""
        colours = [c for c in COLOURS if all(s.colour != c for s in shapes)]
        kinds = [k for k in SHAPES if all(s.kind != k for s in shapes)]
        if kinds and rng.random() < 0.5:
            return f"{rng.choice(list(COLOURS))} {rng.choice(kinds)}"
        return f"{rng.choice(colours)} {rng.choice(SHAPES)}"

    def _pair(self, rng, shapes):
        if len(shapes) < 2:
            return None
        i, j = (int(v) for v in rng.choice(len(shapes), size=2, replace=False))
        a, b = shapes[i].name, shapes[j].name
        return (
            str(rng.choice(PAIR_QUESTIONS)).format(a=a, b=b),
            ANSWER_PAIR.format(a=a, b=b),
            [[i], [j]],
            None,
        )

    def _vqa(self, rng, shapes):
        kinds_unique = [s for s in shapes if sum(o.kind == s.kind for o in shapes) == 1]
        colours_unique = [s for s in shapes if sum(o.colour == s.colour for o in shapes) == 1]
        choices = ["count", "count_colour", "exists"]
        if kinds_unique:
            choices.append("colour")
        if colours_unique:
            choices.append("shape")
        q = str(rng.choice(choices))
        if q == "colour":
            s = kinds_unique[int(rng.integers(len(kinds_unique)))]
            return f"What colour is the {s.kind}?", s.colour, [], s.colour
        if q == "shape":
            s = colours_unique[int(rng.integers(len(colours_unique)))]
            return f"What shape is the {s.colour} one?", s.kind, [], s.kind
        if q == "count":
            a = NUMBER_WORDS[len(shapes)]
            return "How many shapes are there?", a, [], a
        if q == "count_colour":
            c = str(rng.choice(list(COLOURS)))
            a = NUMBER_WORDS[sum(s.colour == c for s in shapes)]
            return f"How many {c} shapes are there?", a, [], a
        if rng.random() < 0.5:
            s = shapes[int(rng.integers(len(shapes)))]
            return f"Is there a {s.name}?", "yes", [], "yes"
        return f"Is there a {self._absent(rng, shapes)}?", "no", [], "no"

    def _caption(self, rng, shapes):
        names = [
            ("an " if s.colour[0] in "aeiou" else "a ") + s.name for s in sorted(shapes, key=lambda s: s.cx)
        ]
        if len(names) == 1:
            answer = f"There is one shape: {names[0]}."
        else:
            listed = ", ".join(names[:-1]) + " and " + names[-1]
            answer = f"There are {NUMBER_WORDS[len(names)]} shapes: {listed}."
        return str(rng.choice(CAPTION_QUESTIONS)), answer, [], None


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Texts of ``n`` training turns, for training the tiny tokenizer: each question and answer
    (every sample kind, captions included) and the chat template's role names, so that "user",
    "assistant" and the caption words become whole tokens rather than runs of letters."""
    weights = {"refer": 0.5, "multi": 0.1, "none": 0.1, "pair": 0.05, "vqa": 0.15, "caption": 0.1}
    gen = SyntheticScenes("train", size=n, seed=seed, image_size=224, kind_weights=weights)
    texts = []
    for i in range(n):
        rng = gen.rng(i)
        kind = str(rng.choice(gen.kinds, p=gen.kind_p))
        made = getattr(gen, f"_{kind}")(rng, gen.scene(rng))
        if made is not None:
            texts += [ROLES[0], made[0], ROLES[1], made[1]]
    return texts
