"""Scripted teachers for the embedded task, and the plain style of the SFT warm-start data.

The teachers stand in for the paper's large teacher VLMs (Qwen2.5-VL-72B, InternVL3-78B). They read
the scene description, which the student never sees, and write step-by-step answers ending in
`\\boxed{...}`; they answer the TASK questions (data/scenes.py), which the SFT data answers plainly. Both
describe what they see in the words of the SFT descriptions ('top left: red circle; center: large blue
square'), so a student that has learnt to describe a scene can learn to answer from its own description.
Two styles, clearly different so that a discriminator can learn them:

- "methodical": lists every object with its place, then reasons about the question. In the marked world
  (data/build.py) it marks each object as it lists it with what the question needs so far (`marks`), so
  that each of its steps reads only what was written right before it.
- "reflective": looks only at what the question is about, and sometimes re-checks in words
  ("Wait, let me count again."), occasionally fixing a slip on the way.

A teacher is wrong on a seeded fraction `error_rate` of its responses. An error is a misperception:
the teacher reasons, consistently, about a slightly misread scene (an object missed or imagined, a
colour or shape misread, two places swapped) chosen so that its final answer is wrong.
"""
from __future__ import annotations

import random
from dataclasses import replace

from data.scenes import (COLORS, COLUMNS, SHAPES, Obj, Question, Scene, answer_for, at, describe, item,
                         largest, of_color, place, reading_order, the_two)

TEACHERS = {"methodical": 0.05, "reflective": 0.08}  # name -> error rate


def _perturb(scene: Scene, rng: random.Random) -> Scene:
    """One misreading: an object missed or imagined, a colour or shape misread, or two places swapped."""
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    j = rng.randrange(len(objs))
    how = rng.choice(("drop", "add", "color", "shape", "swap"))
    taken = {(o.row, o.col) for o in objs}
    free = [(r, c) for r in range(scene.grid) for c in range(scene.grid) if (r, c) not in taken]
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


def _places(objs: list[Obj]) -> str:
    """'at top left', 'at top left and center', 'at top left, center and bottom right', or 'nowhere'."""
    names = [place(o.row, o.col) for o in objs]
    if not names:
        return "nowhere"
    return "at " + (f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0])


def _reasoning(scene: Scene, q: Question) -> str:
    """The step from the objects to the answer: for every TASK question, and for the GENERAL ones that SFT
    rows answer in a teacher's style (all but the description)."""
    ans = answer_for(scene, q.kind, q.args)
    if q.kind in ("count_color", "has_color"):
        found = of_color(scene, q.args[0])
        counted = f"The {q.args[0]} ones are {_places(found)}. That makes {len(found)}"
        if q.kind == "count_color":
            return f"{counted}."
        return f"{counted}, so there is {'one' if found else 'none'}."
    if q.kind == "compare":
        (a, b), (na, nb) = q.args, (len(of_color(scene, c)) for c in q.args)
        rel = "more than" if na > nb else "not more than"
        return (f"{a.capitalize()} is {_places(of_color(scene, a))}, that is {na}; {b} is "
                f"{_places(of_color(scene, b))}, that is {nb}. {na} is {rel} {nb}.")
    if q.kind == "largest_color":
        o = largest(scene)
        return f"The large one is the {o.name} at {place(o.row, o.col)}, so its color is {ans}."
    if q.kind == "left_of":
        a, b = the_two(scene, q.args)
        return f"{_columns(a, b)}, so it is {'left of' if a.col < b.col else 'not left of'} it."
    if q.kind == "count_choice":
        return f"That is {len(scene.objects)} objects in total, which is option ({ans})."
    if q.kind in ("color_at", "shape_at"):
        o = at(scene, *q.args)
        return f"The object at the {place(o.row, o.col)} is the {o.name}, so its {q.kind[:-3]} is {ans}."
    raise ValueError(f"the teachers do not answer {q.kind!r} questions step by step")


def _columns(a: Obj, b: Obj) -> str:
    """'The red one is in the left column and the blue one is in the middle column'."""
    return (f"The {a.color} one is in the {COLUMNS[a.col]} column and the {b.color} one is in the "
            f"{COLUMNS[b.col]} column")


def marks(scene: Scene, q: Question) -> str:
    """Every object in reading order with what the question needs beside it (the marked world). Each mark
    carries the running state, so the last object's mark holds all that the answer needs and no later step
    has to look back across the list; other kinds get the plain list.

        count, is there, which (a colour): top left: green circle - red? no, 0; center: red square -
                                           red? yes, 1
        compare, which of two:             top left: red circle - red? yes, 1, blue? no, 0; ...
        the largest object:                top left: red circle - large? no; center: large blue square -
                                           large? yes, blue square; bottom left: green circle - large? no,
                                           blue square
        left of, which columns:            top left: red circle - red? yes, left, blue? no; center: blue
                                           square - red? no, left, blue? yes, middle
        multiple choice, number:           top left: green circle, 1; center: large red square, 2
    """
    by_color = q.kind in ("count_color", "has_color", "which_color", "compare", "which_two")  # args: colours
    by_place = q.kind in ("left_of", "columns")                                            # args: colours
    counts = dict.fromkeys(q.args if by_color else (), 0)      # colour -> objects of it listed so far
    columns = dict.fromkeys(q.args if by_place else (), "")    # colour -> its object's column, once listed
    big, seen = largest(scene), ""                             # the largest object; its name, once listed
    out = []
    for i, o in enumerate(reading_order(scene), 1):
        if o.color in counts:
            counts[o.color] += 1
        if o.color in columns:
            columns[o.color] = COLUMNS[o.col]
        if o is big:
            seen = o.name
        said = {c: "yes" if o.color == c else "no" for c in (*counts, *columns)}  # colour -> is it this one?
        if q.kind in ("count_choice", "number"):
            out.append(f"{item(o, scene)}, {i}")
        elif counts:
            out.append(f"{item(o, scene)} - " + ", ".join(f"{c}? {said[c]}, {counts[c]}" for c in counts))
        elif columns:
            carried = [f"{c}? {said[c]}" + (f", {columns[c]}" if columns[c] else "") for c in columns]
            out.append(f"{item(o, scene)} - {', '.join(carried)}")
        elif q.kind in ("largest_color", "largest_shape"):
            said_big = "yes" if o is big else "no"
            out.append(f"{item(o, scene)} - large? {said_big}" + (f", {seen}" if seen else ""))
        else:
            out.append(item(o, scene))
    return "; ".join(out)


def _tally(scene: Scene, q: Question) -> str:
    """The step after the marks, what the last mark carries read off: 'That makes 2 red.' (the marked
    world)."""
    if q.kind in ("largest_color", "largest_shape"):
        o, what = largest(scene), q.kind.removeprefix("largest_")
        return f"The large one is the {o.name}, so its {what} is {o.color if what == 'color' else o.shape}."
    n = [len(of_color(scene, c)) for c in q.args[:2]]
    if q.kind == "count_color":
        return f"That makes {n[0]} {q.args[0]}."
    if q.kind == "has_color":
        return f"That makes {n[0]} {q.args[0]}, so there is {'one' if n[0] else 'none'}."
    both = f"That makes {n[0]} {q.args[0]} and {n[1]} {q.args[1]}."
    if q.kind == "which_two":
        return both
    return f"{both} {n[0]} is {'more than' if n[0] > n[1] else 'not more than'} {n[1]}."  # compare


def methodical(scene: Scene, q: Question, rng: random.Random, marked: bool = False) -> str:
    """List every object in reading order (`marked`: with marks), then answer step by step."""
    opener = rng.choice(("Let me look at each object:", "First I list the objects:", "Step 1, the objects:"))
    ans = answer_for(scene, q.kind, q.args)
    listed = marks(scene, q) if marked else describe(scene)
    tallied = marked and q.kind in ("count_color", "has_color", "compare", "largest_color")
    step = _tally(scene, q) if tallied else _reasoning(scene, q)
    return f"{opener} {listed}. Step 2: {step} So the answer is \\boxed{{{ans}}}."


def marked_answer(scene: Scene, q: Question) -> str:
    """The marked world's SFT answer to a MARKED_TYPES question: the marks, then what they add up to."""
    if q.kind == "which_color":
        return f"{marks(scene, q)}. The {q.args[0]} objects: {q.answer}."
    if q.kind in ("which_two", "largest_shape"):
        return f"{marks(scene, q)}. {_tally(scene, q)}"
    if q.kind == "columns":
        return f"{marks(scene, q)}. {_columns(*the_two(scene, q.args))}."
    return f"{marks(scene, q)}. That is {q.answer} objects."


def _relevant(scene: Scene, q: Question) -> tuple[str, list[Obj]]:
    """What the reflective teacher looks at: a short description and the objects that matter, in reading
    order."""
    if q.kind == "count_color":
        return f"the {q.args[0]} objects", of_color(scene, q.args[0])
    if q.kind == "compare":
        objs = [o for o in reading_order(scene) if o.color in q.args]
        return f"the {q.args[0]} and {q.args[1]} objects", objs
    if q.kind == "left_of":
        objs = [o for o in reading_order(scene) if o.color in q.args]
        return f"the {q.args[0]} and the {q.args[1]} object", objs
    if q.kind == "largest_color":
        return "the biggest shape", [largest(scene)]
    if q.kind in ("color_at", "shape_at"):
        return f"the object at the {place(*q.args)}", [at(scene, *q.args)]
    if q.kind == "has_color":
        return f"the {q.args[0]} objects", of_color(scene, q.args[0])
    return "all objects", reading_order(scene)


def reflective(scene: Scene, q: Question, rng: random.Random, slip: Scene | None = None) -> str:
    """Look at what matters, reason, sometimes re-check; `slip` is a first-pass misreading to fix."""
    what, objs = _relevant(scene, q)
    ans = answer_for(scene, q.kind, q.args)
    seen = describe(scene, objs)
    out = [rng.choice(("I need", "The question is about", "Focus on")) + f" {what}.",
           f"In the picture: {seen}."]
    if slip is not None:  # a first-pass slip, caught by re-checking
        out = [out[0], f"At first glance the answer looks like {answer_for(slip, q.kind, q.args)}.",
               rng.choice(("Wait, let me count again.", "Hmm, let me check again.", "Wait, let me verify.")),
               f"Looking again: {seen}."]
    out.append(_reasoning(scene, q))
    if slip is None and rng.random() < 0.3:
        out.append(rng.choice(("Wait, let me count again.", "Let me double-check.", "Wait, let me verify.")))
        out.append("Yes, that is right.")
    out.append(f"Final answer: \\boxed{{{ans}}}")
    return " ".join(out)


def teacher_response(name: str, scene: Scene, q: Question, rng: random.Random, marked: bool = False) -> str:
    """One response of teacher `name` (`marked`: the marked world's): wrong (by misperception) with
    probability TEACHERS[name]."""
    seen = scene
    if rng.random() < TEACHERS[name]:
        seen = misperceive(scene, q, rng) or scene
    if name == "methodical":
        return methodical(seen, q, rng, marked)
    slip = misperceive(scene, q, rng) if seen is scene and rng.random() < 0.1 else None
    return reflective(seen, q, rng, slip)


def styled_response(name: str, scene: Scene, q: Question, rng: random.Random, marked: bool = False) -> str:
    """Teacher `name`'s style with no misperception: SFT rows written by a large model, for GENERAL
    questions."""
    return methodical(scene, q, rng, marked) if name == "methodical" else reflective(scene, q, rng)


def plain_response(q: Question) -> str:
    """The SFT warm-start style, for GENERAL questions: a description as a plain list, any other answer bare.
    No reasoning and no teacher's moves: the SFT data is not the teacher cache."""
    return f"{q.answer}." if q.kind == "describe" else f"The answer is \\boxed{{{q.answer}}}."
