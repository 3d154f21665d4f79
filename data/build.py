"""Generate the embedded dataset: images, train / val / test / SFT splits in the JSONL schema.

    python -m data.build                  # the default world (marked) -> data/embedded-marked
    python -m data.build --world plain    # -> data/embedded

Deterministic by seed. `train` carries the teacher cache (several responses per teacher per question); `sft`
carries the SFT target in `response`: GENERAL questions (describe the scene, the colour or shape at a place,
is a colour present), the general instruction data of the paper's SFT stage. A description is always a plain
list; the other answers are bare or, for a share SFT_TEACHER_STYLE, in a teacher's style (general SFT data is
largely written by large models, so the paper's students start near their teachers' form). `train`, `val` and
`test` ask TASK questions (counts, comparisons, the largest object, left/right, multiple choice); a share
SFT_TASK_SHARE of the SFT rows asks them too, answered plainly ("The answer is \\boxed{2}."), never in a
teacher's step-by-step form: the student starts able to answer, and the teachers' way of answering is what
imitation can add. `val` and `test` carry no responses. The test split holds only scenes that no other split
contains. Written to a temporary folder and renamed at the end, so a half-built dataset is never picked up.
A second world, `--world marked`, is described beside its settings (MARKED_SHARES).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from collections import Counter

from data.dataset import blind_guesses, chance_levels
from data.scenes import GENERAL_TYPES, MARKED_TYPES, TASK_TYPES, ask, balanced_task, draw, random_scene
from data.teachers import TEACHERS, marked_answer, plain_response, styled_response, teacher_response

EMBEDDED_DIR = Path(__file__).parent / "embedded"        # the embedded dataset, built on the first run
TINY_DIR = Path(__file__).parent.parent / "checkpoints"  # the tiny student, its SFT, its discriminators
SPLIT_FILES = dict(data="train.jsonl", eval_data="val.jsonl", test_data="test.jsonl", sft_data="sft.jsonl")

# Questions per split (one scene each); a test accuracy of 1,000 questions has a 95% interval of about +-0.03.
SPLITS = {"sft": 4000, "train": 2000, "val": 500, "test": 1000}
SFT_TEACHER_STYLE = 0.9  # share of the SFT answers (descriptions aside) written in a teacher's style
SFT_TASK_SHARE = 0.1     # share of the SFT rows that ask a TASK question, answered plainly (no reasoning)
# The marked world: the methodical teacher marks each object as it lists it with what the question needs so
# far ("center: red square - red? yes, 1"; data/teachers.py `marks`), and the SFT data teaches those marks as
# general skills, in MARKED_TYPES questions answered by the marked list (these shares of the GENERAL rows; the
# four plain GENERAL kinds share the rest). Its SFT rows that ask a TASK question are answered in the
# reflective teacher's chain, not plainly: the student starts with a chain of its own, and imitation asks it
# to move to another one.
# A "columns" draw on a scene without two objects of unique colours in different columns asks "which_color"
# instead (data/scenes.py `ask`): about half of them, so the rows come out at which_color 0.20, columns 0.045.
MARKED_SHARES = {"which_color": 0.15, "which_two": 0.1, "number": 0.1,
                 "largest_shape": 0.1, "columns": 0.1}
MARKED_SFT_ROWS = 5000
WORLDS = ("plain", "marked")
DEFAULT_WORLD = "marked"  # the world ril.py, explain.py and reproduce.py run without --world


def check_world(world: str) -> None:
    """Refuse a world name that is not one of WORLDS."""
    if world not in WORLDS:
        raise ValueError(f"unknown embedded world {world!r}; one of {WORLDS}")


def world_dirs(world: str) -> tuple[Path, Path]:
    """(dataset folder, tiny-checkpoint folder) of an embedded world."""
    check_world(world)
    return (EMBEDDED_DIR, TINY_DIR) if world == "plain" else (EMBEDDED_DIR.with_name("embedded-marked"),
                                                               TINY_DIR / "marked")


def tiny_disc_dir(tiny: Path, teachers: str = "") -> Path:
    """The embedded discriminator pre-trained for a set of teachers (--teachers a,b): tiny-disc[-a+b]."""
    return tiny / ("tiny-disc" + (f"-{teachers.replace(',', '+')}" if teachers else ""))


def split_paths(given: dict, folder: Path = EMBEDDED_DIR) -> dict:
    """{flag: path} of the embedded splits (in `folder`) for the data flags of `given` that are empty."""
    return {key: given.get(key) or str(folder / file) for key, file in SPLIT_FILES.items()}


def general_kind(rng: random.Random, marked: bool) -> str:
    """The kind of a GENERAL SFT question: uniform over GENERAL_TYPES, or the marked world's shares."""
    if not marked:
        return rng.choice(GENERAL_TYPES)
    rest = (1 - sum(MARKED_SHARES.values())) / len(GENERAL_TYPES)
    weights = [*MARKED_SHARES.values()] + [rest] * len(GENERAL_TYPES)
    return rng.choices(MARKED_TYPES + GENERAL_TYPES, weights)[0]


def build_split(out: Path, split: str, n: int, seed: int, grid: int, per_teacher: int, exclude: set,
                sft_task_share: float = SFT_TASK_SHARE, world: str = "plain") -> list[dict]:
    """n rows of one split; scenes whose signature is in `exclude` are redrawn; adds new signatures to it."""
    rng, marked = random.Random(f"{seed}-{split}"), world == "marked"
    rows = []
    while len(rows) < n:
        if split == "sft" and sft_task_share and rng.random() < sft_task_share:
            scene, q = balanced_task(rng, grid, exclude)     # answered plainly (marked world: a chain) below
        elif split == "sft":
            scene = random_scene(rng, grid)
            if scene.signature() in exclude:
                continue
            q = ask(scene, rng, general_kind(rng, marked))
        else:  # TASK questions, answers balanced within each kind
            scene, q = balanced_task(rng, grid, exclude)
        exclude.add(scene.signature())
        rid = f"{split}-{len(rows):05d}"
        draw(scene).save(out / "images" / f"{rid}.png")
        row = {"id": rid, "image": f"images/{rid}.png", "question": q.text, "answer": q.answer,
               "kind": q.kind}
        if split == "train":
            row["teachers"] = {t: [teacher_response(t, scene, q, rng, marked) for _ in range(per_teacher)]
                               for t in TEACHERS}
        if split == "sft" and q.kind in MARKED_TYPES:
            row["response"] = marked_answer(scene, q)
        elif split == "sft" and marked and q.kind in TASK_TYPES:
            row["response"] = styled_response("reflective", scene, q, rng)
        elif split == "sft":
            styled = q.kind in GENERAL_TYPES[1:] and rng.random() < SFT_TEACHER_STYLE
            teacher = rng.choice(list(TEACHERS)) if styled else None
            row["response"] = styled_response(teacher, scene, q, rng, marked) if styled else plain_response(q)
        rows.append(row)
    return rows


def build(out: str | Path, seed: int = 0, sizes: dict | None = None, grid: int = 3, per_teacher: int = 4,
          sft_task_share: float = SFT_TASK_SHARE, world: str = "plain") -> Path:
    """Write `<out>/{split}.jsonl` and `<out>/images/`; returns `out`. Replaces an existing folder."""
    check_world(world)
    out = Path(out)
    sizes = sizes or (SPLITS | {"sft": MARKED_SFT_ROWS} if world == "marked" else SPLITS)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    seen: set = set()
    order = [s for s in sizes if s != "test"] + (["test"] if "test" in sizes else [])  # test last: own scenes
    for split in order:
        exclude = seen if split != "test" else set(seen)
        rows = build_split(tmp, split, sizes[split], seed, grid, per_teacher, exclude, sft_task_share, world)
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    meta = {"world": world, "seed": seed, "sizes": sizes, "grid": grid, "per_teacher": per_teacher,
            "teachers": TEACHERS, "sft_task_share": sft_task_share,
            "baselines": baselines(tmp, [s for s in order if s != "sft"])}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def baselines(folder: Path, splits: list[str]) -> dict:
    """Chance and the blind baseline (data.dataset.blind_guesses: the training split's most common answer for
    the question's text) per split and question kind, with the answers' counts, from the data alone."""
    read = lambda split: [json.loads(line) for line in open(folder / f"{split}.jsonl", encoding="utf-8")]
    train, out = read("train"), {}
    for split in splits:
        rows = read(split)
        out[split] = {}
        for kind in ("all",) + TASK_TYPES:
            mine = [r for r in rows if kind in ("all", r["kind"])]
            right = [g == r["answer"] for g, r in zip(blind_guesses(train, mine), mine)]
            out[split][kind] = {"n": len(mine), "chance": sum(chance_levels(train, mine)) / max(1, len(mine)),
                                "blind": sum(right) / max(1, len(mine)),
                                "answers": dict(Counter(r["answer"] for r in mine).most_common())}
    return out


def build_missing(out: str | Path, student: str | Path, seed: int = 0, world: str = "plain") -> None:
    """What the default run needs and cannot download: the dataset in `out` and the tiny student (its
    tokenizer trained on this dataset's text) in `student`, each built only when missing."""
    out = Path(out)
    student = Path(student)
    if not (out / "test.jsonl").exists():  # build() renames a finished folder into place
        print(f"building the embedded dataset in {out} ...", flush=True)
        build(out, seed=seed, world=world)
    if not (student / "config.json").exists():
        from data.tiny_student import build_tiny_student
        build_tiny_student(out, student, seed=seed)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="default: the world's own folder, where ril.py looks for it")
    p.add_argument("--world", default=DEFAULT_WORLD, choices=WORLDS, help="the embedded world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-teacher", type=int, default=4, help="cached responses per teacher per question")
    p.add_argument("--sft-task-share", type=float, default=SFT_TASK_SHARE,
                   help="share of SFT rows asking a TASK question, answered plainly")
    a = p.parse_args()
    a.out = a.out or str(world_dirs(a.world)[0])
    t0 = time.time()
    meta = json.loads((build(a.out, a.seed, per_teacher=a.per_teacher, sft_task_share=a.sft_task_share,
                             world=a.world) / "meta.json").read_text())
    print(f"wrote {a.out} ({sum(meta['sizes'].values())} questions) in {time.time() - t0:.1f}s")
