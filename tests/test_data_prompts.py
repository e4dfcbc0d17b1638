"""Question/answer templates: YAML sets chosen by config, seeded choice, the first one for
evaluation, and gRefCOCO questions that read well whatever the expression's number."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from stamp.data.prompts import load_prompts, segmentation_chat
from stamp.data.refer import ReferSegDataset
from stamp.model.tokens import SEG_TOKEN
from tests.fixtures_data import COCO_DIR, write_playground

DEFAULT = load_prompts("default")


def template_index(templates: tuple[str, ...], rendered: str, text: str, np: str) -> int:
    """Which template, filled with ``text`` and ``np``, reads ``rendered``."""
    hits = [k for k, t in enumerate(templates) if t.format(text=text, np=np) == rendered]
    assert len(hits) == 1, (rendered, hits)
    return hits[0]


@pytest.mark.parametrize(
    ("family", "kind"), [("refer", "refer"), ("gref", "multi"), ("gref", "none"), ("reason", "reason")]
)
def test_templates_are_used_evenly_and_hold_one_seg(family, kind):
    questions, answers = DEFAULT.questions[family], DEFAULT.answers[kind]
    assert len(questions) >= 4 and len(answers) >= 4
    qs, ans = Counter(), Counter()
    rng = np.random.default_rng(0)
    text = "Which thing keeps you dry in the rain?" if family == "reason" else "the man on the left."
    fill = {"text": text, "np": "the man on the left."} if family == "reason" else {}
    fill = fill or {"text": "man on the left", "np": "the man on the left"}
    for _ in range(2000):
        q, a = segmentation_chat(family, kind, text, rng)
        assert a.count(SEG_TOKEN) == 1 and SEG_TOKEN not in q
        qs[template_index(questions, q, **fill)] += 1
        ans[template_index(answers, a, **fill)] += 1
    for counts, n in ((qs, len(questions)), (ans, len(answers))):
        assert set(counts) == set(range(n))
        assert all(abs(c / 2000 - 1 / n) < 0.05 for c in counts.values()), counts


def test_fixed_prompts_and_seeded_choice():
    assert segmentation_chat("refer", "refer", "The cat.", None) == (
        "Please segment the cat in this image.",
        f"Sure, it is {SEG_TOKEN}",
    )
    a = [segmentation_chat("refer", "refer", "dog", np.random.default_rng([1, i])) for i in range(50)]
    b = [segmentation_chat("refer", "refer", "dog", np.random.default_rng([1, i])) for i in range(50)]
    c = [segmentation_chat("refer", "refer", "dog", np.random.default_rng([2, i])) for i in range(50)]
    assert a == b and a != c
    with pytest.raises(
        ValueError, match=r"unknown prompt family 'vqa'; valid families: \['gref', 'reason', 'refer'\]"
    ):
        segmentation_chat("vqa", "refer", "x", None)


def test_dataset_uses_the_templates(tmp_path):
    root: Path = tmp_path
    write_playground(root)
    ds = ReferSegDataset(root / "refer_seg", "refcoco", "train", root / COCO_DIR, repeats=50, seed=0)
    questions = DEFAULT.questions["refer"]
    used = Counter()
    for i in range(len(ds)):
        text = ds.records[int(ds._rec_idx[i % ds.num_samples])]["texts"][
            int(ds._text_idx[i % ds.num_samples])
        ]
        used[
            template_index(questions, ds[i].messages[0]["content"], text=text.removeprefix("the "), np="")
        ] += 1
    assert set(used) == set(range(len(questions)))
    fixed = ReferSegDataset(
        root / "refer_seg", "refcoco", "train", root / COCO_DIR, repeats=3, prompt_choice="fixed"
    )
    assert {fixed[i].messages[0]["content"].split(" the ")[0] for i in range(len(fixed))} == {
        "Please segment"
    }


MINE = """
questions:
  refer: ["Where is the {text}? Mask it."]
  gref: ["Mask {np}."]
  reason: ["{text} Mask it."]
answers:
  refer: ["Here: <|seg|>."]
  multi: ["All of them: <|seg|>."]
  none: ["None: <|seg|>."]
  reason: ["Done: <|seg|>."]
"""


def test_prompt_set_chosen_by_name_or_path_in_the_data_config(tmp_path, compose_cfg):
    root = tmp_path / "data"
    write_playground(root)
    mine = tmp_path / "my_prompts.yaml"
    mine.write_text(MINE)

    def first_chat(*overrides: str) -> list[str]:
        cfg = compose_cfg(["data=uni", f"paths.data_dir={root}", *overrides])
        train = instantiate(cfg.data.train).datasets["refcoco"]
        assert train.prompts is not None
        val = instantiate(cfg.data.splits.grefcoco_val)
        return [m["content"] for m in train[0].messages] + [m["content"] for m in val[0].messages]

    default = first_chat()
    assert default[2:] == ["Please segment both things in this image.", f"Sure, here they are: {SEG_TOKEN}"]
    assert first_chat("data.prompts=single") == [
        "Please segment the man on left in this image.",
        f"Sure, it is {SEG_TOKEN}",
        *default[2:],  # evaluation: the first template, the same in both sets
    ]
    assert first_chat(f"data.prompts={mine}") == [
        "Where is the man on left? Mask it.",
        f"Here: {SEG_TOKEN}.",
        "Mask both things.",
        f"All of them: {SEG_TOKEN}.",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINE.replace("Done: <|seg|>.", "Done."), r"my\.yaml: answers\.reason: template 'Done\.' must hold <\|seg\|> exactly once"),
        (MINE.replace("Mask {np}.", "Mask {noun}."), r"my\.yaml: questions\.gref: template 'Mask \{noun\}\.' uses \['noun'\]"),
        (MINE.replace('  none: ["None: <|seg|>."]\n', ""), r"my\.yaml: answers: expected lists for exactly \['refer', 'multi', 'none', 'reason'\], got \['multi', 'reason', 'refer'\]"),
        (MINE.replace('["Mask {np}."]', "[]"), r"my\.yaml: questions\.gref: expected a non-empty list of strings"),
    ],
)  # fmt: skip
def test_malformed_prompt_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(path))


def test_unknown_prompt_set_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown prompt set 'lisa'; valid names: \['default', 'single'\]"):
        load_prompts("lisa")
    with pytest.raises(FileNotFoundError, match=r"prompt file not found: /nowhere/p\.yaml"):
        load_prompts("/nowhere/p.yaml")


# gRefCOCO expressions of every number: singular, plural, numbered, both/all/everything
GREF_EXPRESSIONS = [
    "man in red",
    "the man in red",
    "a giraffe",
    "kids on the left",
    "two things near the edges",
    "all three kids",
    "3 cars in the back",
    "both men",
    "all people",
    "everything on the table",
    "everyone sitting down",
    "each of the dogs",
    "the two women on the right.",
]
# a determiner or quantifier followed by one that cannot follow it: "every all three kids",
# "the both men", "any two things", "the everything on the table" ("the two women" reads well)
DOUBLED = re.compile(
    r"\b(every|each|any|a|an|all the)\s+(all|both|every|each|everything|everyone|any|the|a|an|one|two|"
    r"three|four|five|\d+|these|those)\b|\bthe\s+(all|both|every|each|everything|everyone|any|the|a|an|"
    r"these|those)\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("name", ["default", "single"])
def test_gref_questions_and_answers_read_well_for_any_number(name):
    prompts = load_prompts(name)
    rendered = []
    for text in GREF_EXPRESSIONS:
        rng = np.random.default_rng(0)
        for _ in range(60):  # every template of a few-template list is drawn
            for kind in ("refer", "multi", "none"):
                rendered += prompts.chat("gref", kind, text, rng)
    bad = sorted({r for r in rendered if DOUBLED.search(r) or "  " in r or ".." in r})
    assert not bad, bad
    # every expression appears in the first question, as written or after "the"
    firsts = [prompts.chat("gref", "multi", t, None)[0] for t in GREF_EXPRESSIONS]
    assert firsts[:6] == [
        "Please segment the man in red in this image.",
        "Please segment the man in red in this image.",
        "Please segment a giraffe in this image.",
        "Please segment the kids on the left in this image.",
        "Please segment two things near the edges in this image.",
        "Please segment all three kids in this image.",
    ]
    assert firsts[-1] == "Please segment the two women on the right in this image."
