"""Scripted teachers for the embedded task, and the plain style of the SFT warm-start data.

The teachers stand in for the paper's large teacher VLMs (Qwen2.5-VL-72B, InternVL3-78B). They read
the scene description, which the student never sees, and write step-by-step answers ending in
`\\boxed{...}`. Two styles, clearly different so that a discriminator can learn them:

- "methodical": lists every object with its place, then reasons about the question.
- "reflective": looks only at what the question is about, and sometimes re-checks in words
  ("Wait, let me count again."), occasionally fixing a slip on the way.

A teacher is wrong on a seeded fraction `error_rate` of its responses. An error is a misperception:
the teacher reasons, consistently, about a slightly misread scene (an object missed or imagined, a
colour or shape misread, two places swapped) chosen so that its final answer is wrong.
"""
from __future__ import annotations

import random
from dataclasses import replace

from data.scenes import COLORS, SHAPES, Obj, Question, Scene, answer_for, largest, named, where

TEACHERS = {"methodical": 0.05, "reflective": 0.08}  # name -> error rate


def _perturb(scene: Scene, rng: random.Random) -> Scene:
    """One misreading: an object missed or imagined, a colour or shape misread, or two places swapped."""
    objs = list(scene.objects)
    i, j = rng.randrange(len(objs)), rng.randrange(len(objs))
    how = rng.choice(("drop", "add", "color", "shape", "swap"))
    free = [(r, c) for r in range(scene.grid) for c in range(scene.grid) if all((o.row, o.col) != (r, c) for o in objs)]
    if how == "drop" and len(objs) > 1:
        objs.pop(i)
    elif how == "add" and free:
        r, c = rng.choice(free)
        objs.append(Obj(rng.choice(list(COLORS)), rng.choice(SHAPES), r, c, rng.randint(6, 10)))
    elif how == "color":
        objs[i] = replace(objs[i], color=rng.choice([c for c in COLORS if c != objs[i].color]))
    elif how == "shape":
        objs[i] = replace(objs[i], shape=rng.choice([s for s in SHAPES if s != objs[i].shape]))
    else:
        objs[i], objs[j] = (replace(objs[i], row=objs[j].row, col=objs[j].col),
                            replace(objs[j], row=objs[i].row, col=objs[i].col))
    return Scene(scene.grid, tuple(objs))


def misperceive(scene: Scene, q: Question, rng: random.Random, tries: int = 100) -> Scene | None:
    """A slightly misread scene (one to three misreadings) on which the answer differs from the truth."""
    for _ in range(tries):
        seen = scene
        for _ in range(rng.randint(1, 3)):
            seen = _perturb(seen, rng)
        try:
            if answer_for(seen, q.kind, q.args) != q.answer:
                return seen
        except ValueError:  # a named object vanished or doubled, or the count is not an option
            continue
    return None


def _count_phrase(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def methodical(scene: Scene, q: Question, rng: random.Random) -> str:
    """List every object with its place, then answer step by step."""
    objs = list(scene.objects)
    if rng.random() < 0.5:
        rng.shuffle(objs)
    opener = rng.choice(("Let me look at each object.", "First I list the objects.", "Step 1: the objects."))
    listing = "; ".join(f"a {o.name} at {where(o, scene.grid)}" for o in objs)
    steps = [opener, f"I see {listing}."]
    ans = answer_for(scene, q.kind, q.args)
    if q.kind in ("count_color", "count_shape"):
        match = [o.name for o in objs if q.args[0] in (o.color, o.shape)]
        steps.append(f"Step 2: the {q.args[0]} ones are {_count_phrase(match)}. That makes {len(match)}.")
    elif q.kind == "largest_color":
        steps.append(f"Step 2: the largest one is the {largest(scene).name}, so its color is {ans}.")
    elif q.kind == "compare":
        a, b = (sum(o.color == c for o in objs) for c in q.args)
        rel = "more than" if a > b else "not more than"
        steps.append(f"Step 2: {q.args[0]} has {a} and {q.args[1]} has {b}. {a} is {rel} {b}.")
    elif q.kind == "left_of":
        a, b = (named(scene, n) for n in q.args)
        side = "left of" if a.col < b.col else "not left of"
        steps.append(f"Step 2: the {a.name} is in column {a.col + 1} and the {b.name} is in column {b.col + 1}, "
                     f"so it is {side} it.")
    else:  # count_choice
        steps.append(f"Step 2: that is {len(objs)} objects in total, which is option ({ans}).")
    steps.append(f"So the answer is \\boxed{{{ans}}}.")
    return " ".join(steps)


def _relevant(scene: Scene, q: Question) -> tuple[str, list[Obj]]:
    """What the reflective teacher looks at: a short description and the objects that matter."""
    objs = list(scene.objects)
    if q.kind in ("count_color", "count_shape"):
        return f"the {q.args[0]} objects", [o for o in objs if q.args[0] in (o.color, o.shape)]
    if q.kind == "compare":
        return f"the {q.args[0]} and {q.args[1]} objects", [o for o in objs if o.color in q.args]
    if q.kind == "left_of":
        return f"the {q.args[0]} and the {q.args[1]}", [o for o in objs if o.name in q.args]
    if q.kind == "largest_color":
        return "the biggest shape", [largest(scene)]
    return "all objects", objs


def reflective(scene: Scene, q: Question, rng: random.Random, slip: Scene | None = None) -> str:
    """Look at what matters, state the result, sometimes re-check; `slip` is a first-pass misreading to fix."""
    what, objs = _relevant(scene, q)
    ans = answer_for(scene, q.kind, q.args)
    seen = ", ".join(f"{o.name} ({where(o, scene.grid)})" for o in objs) or "nothing"
    out = [rng.choice(("I need", "The question is about", "Focus on")) + f" {what}.", f"In the picture: {seen}."]
    if slip is not None:  # a first-pass slip, caught by re-checking
        out = [out[0], f"At first glance the answer looks like {answer_for(slip, q.kind, q.args)}.",
               rng.choice(("Wait, let me count again.", "Hmm, let me check again.", "Wait, let me verify.")),
               f"Looking again: {seen}."]
    elif rng.random() < 0.3:
        out.append(rng.choice(("Wait, let me count again.", "Let me double-check.", "Wait, let me verify.")))
        out.append("Yes, that is right.")
    out.append(f"Final answer: \\boxed{{{ans}}}")
    return " ".join(out)


def teacher_response(name: str, scene: Scene, q: Question, rng: random.Random) -> str:
    """One response of teacher `name`: wrong (by misperception) with probability TEACHERS[name]."""
    seen = scene
    if rng.random() < TEACHERS[name]:
        seen = misperceive(scene, q, rng) or scene
    if name == "methodical":
        return methodical(seen, q, rng)
    slip = misperceive(scene, q, rng) if seen is scene and rng.random() < 0.1 else None
    return reflective(seen, q, rng, slip)


def plain_response(q: Question) -> str:
    """The SFT warm-start style: the bare answer, no reasoning (not a teacher's style)."""
    return f"The answer is \\boxed{{{q.answer}}}."
