"""The embedded visual task: scenes drawn with Pillow and questions whose answers need the picture.

A scene is a few coloured shapes placed in the cells of a 3 x 3 grid (one shape per cell, one clearly
largest). The image is 84 pixels wide, so with Qwen2.5-VL's 14 px patches merged 2 x 2 each cell is
exactly one image token. Each cell has a faint tint of its own, like the squares of a board: redder at the
top, bluer to the left. So where a cell is can be seen in its pixels. Without it, the only clue to a
place is the image token's rotary position. A 1.2M-parameter student trained from scratch did not learn to
attend by that in the SFT budget: it named which cells held objects but not their colours (colour of the
object at each listed place 0.27, chance 0.25). A linear probe read each token's colour perfectly but its
cell at chance (0.16 of 9).

Two families of questions, as in the paper, where the SFT data is general instruction data and the RL set
is the task:
- GENERAL (the SFT split): perception instructions. Describe the scene object by object, name the colour or
  shape at a place, say whether a colour is present. The marked world (data/build.py) adds five that go
  through the objects one by one (MARKED_TYPES): which objects are red, which are red or blue, number them,
  the shape of the largest object, the columns of two objects.
- TASK (the RL, validation and test splits): questions that combine what is seen. Count a colour, compare
  two counts, find the colour of the largest object, compare two objects' columns, pick the number of objects
  among four options. The SFT data answers a few of them plainly; the teachers answer them step by step.
Every answer is short and verifiable (a number, a colour or shape word, yes/no, a letter); a description's
answer is the description itself.

The scene description (`Scene.objects`) is privileged information: the scripted teachers read it,
the student only sees the pixels.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

GRID = 3  # cells per side
CELL = 28  # pixels per grid cell = one merged image token of Qwen2.5-VL (14 px patches, 2 x 2 merge)
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def tint(row: int, col: int) -> tuple[int, int, int]:
    """The background colour of a cell: red falls from top to bottom, blue from left to right."""
    return (250 - 14 * row, 240, 250 - 14 * col)


BACKGROUND = tint(1, 1)  # the centre cell's tint, the images' mean background (the tiny student's pixel mean)
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "middle", "right")
GENERAL_TYPES = ("describe", "color_at", "shape_at", "has_color")
TASK_TYPES = ("count_color", "compare", "largest_color", "left_of", "count_choice")
# GENERAL kinds of the marked world's SFT split only
MARKED_TYPES = ("which_color", "which_two", "number", "largest_shape", "columns")
DESCRIBE = ("List the objects in the image.", "Describe the objects you see.", "What is in the picture?")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    row: int
    col: int
    radius: int  # half the shape's extent in pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    grid: int  # the image is grid x grid cells
    objects: tuple[Obj, ...]

    def signature(self) -> tuple:
        """What makes two scenes the same scene (used to keep the test split disjoint)."""
        return (self.grid,) + tuple(sorted((o.color, o.shape, o.row, o.col, o.radius) for o in self.objects))


@dataclass(frozen=True)
class Question:
    kind: str  # one of GENERAL_TYPES or TASK_TYPES
    text: str
    answer: str
    args: tuple = ()  # what the question is about, e.g. ("red",) or ("red", "blue")


def random_scene(rng: random.Random, grid: int = GRID, min_objects: int = 2, max_objects: int = 6) -> Scene:
    """Objects in distinct cells with random colour, shape and size; the largest object is unique."""
    if grid != GRID:
        raise ValueError(f"the embedded task names places on a {GRID} x {GRID} grid, got grid={grid}")
    n_objects = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], n_objects)
    radii = [rng.randint(6, 10) for _ in cells]
    radii[rng.randrange(len(cells))] = 13  # one clearly largest object (others are at most 10)
    objects = tuple(Obj(rng.choice(list(COLORS)), rng.choice(SHAPES), r, c, rad)
                    for (r, c), rad in zip(cells, radii))
    return Scene(grid, objects)


def draw(scene: Scene) -> Image.Image:
    """Render the scene to an RGB image of side 28 * grid pixels: the tinted cells, then the shapes."""
    side = CELL * scene.grid
    img = Image.new("RGB", (side, side), BACKGROUND)
    d = ImageDraw.Draw(img)
    for row in range(scene.grid):
        for col in range(scene.grid):
            box = [col * CELL, row * CELL, (col + 1) * CELL - 1, (row + 1) * CELL - 1]
            d.rectangle(box, fill=tint(row, col))
    for o in scene.objects:
        cx, cy, r = o.col * CELL + CELL // 2, o.row * CELL + CELL // 2, o.radius
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def place(row: int, col: int) -> str:
    """A cell's name: 'top left', 'middle right', ..., 'center' for the middle cell."""
    return "center" if (row, col) == (1, 1) else f"{ROWS[row]} {COLUMNS[col]}"


def reading_order(scene: Scene) -> list[Obj]:
    """The objects from the top left to the bottom right, row by row."""
    return sorted(scene.objects, key=lambda o: (o.row, o.col))


def largest(scene: Scene) -> Obj:
    return max(scene.objects, key=lambda o: o.radius)


def item(o: Obj, scene: Scene) -> str:
    """One object as the descriptions write it: 'top left: red circle', 'center: large blue square'."""
    return f"{place(o.row, o.col)}: {'large ' if o is largest(scene) else ''}{o.name}"


def describe(scene: Scene, objs: list[Obj] | None = None) -> str:
    """The scene (or `objs`) in reading order: 'top left: red circle; center: large blue square'."""
    objs = reading_order(scene) if objs is None else objs
    return "; ".join(item(o, scene) for o in objs) or "none"


def of_color(scene: Scene, color: str) -> list[Obj]:
    return [o for o in reading_order(scene) if o.color == color]


def at(scene: Scene, row: int, col: int) -> Obj:
    """The object in cell (row, col); ValueError if the cell is empty."""
    for o in scene.objects:
        if (o.row, o.col) == (row, col):
            return o
    raise ValueError(f"no object at the {place(row, col)}")


def the_two(scene: Scene, colors: tuple) -> tuple[Obj, Obj]:
    """The object of each of two colours ('the red object', 'the blue object'); ValueError unless each colour
    names exactly one."""
    found = [of_color(scene, c) for c in colors[:2]]
    if any(len(f) != 1 for f in found):
        raise ValueError(f"'the {colors[0]} object' and 'the {colors[1]} object' must each name one object")
    return found[0][0], found[1][0]


def answer_for(scene: Scene, kind: str, args: tuple) -> str:
    """Ground truth of a question of `kind` about `args`, from the scene description. ValueError when the
    question does not apply to the scene (a place is empty, a colour named as unique is not)."""
    objs = scene.objects
    if kind == "describe":
        return describe(scene)
    if kind in ("color_at", "shape_at"):
        o = at(scene, *args)
        return o.color if kind == "color_at" else o.shape
    if kind == "has_color":
        return "yes" if of_color(scene, args[0]) else "no"
    if kind == "count_color":
        return str(len(of_color(scene, args[0])))
    if kind == "compare":
        a, b = (len(of_color(scene, c)) for c in args)
        return "yes" if a > b else "no"
    if kind == "largest_color":
        return largest(scene).color
    if kind == "left_of":
        a, b = the_two(scene, args)
        return "yes" if a.col < b.col else "no"
    if kind == "count_choice":
        return "ABCD"[args.index(len(objs))]
    if kind == "which_color":
        return ", ".join(place(o.row, o.col) for o in of_color(scene, args[0])) or "none"
    if kind == "which_two":
        return ", ".join(f"{len(of_color(scene, c))} {c}" for c in args)
    if kind == "number":
        return str(len(objs))
    if kind == "largest_shape":
        return largest(scene).shape
    if kind == "columns":
        a, b = the_two(scene, args)
        return f"{COLUMNS[a.col]}, {COLUMNS[b.col]}"
    raise ValueError(f"unknown question kind {kind!r}")


# Each TASK kind's answer set: a balanced split draws the answer uniformly from it first (balanced_task).
ANSWERS = {"count_color": ("0", "1", "2", "3"), "compare": ("yes", "no"), "largest_color": tuple(COLORS),
           "left_of": ("yes", "no"), "count_choice": tuple("ABCD")}
# A multiple-choice count lists (lo) lo .. (D) lo+3; with 2-6 objects every letter can be right.
CHOICE_START = (2, 3)


def question_text(kind: str, args: tuple) -> str:
    """The words of a question of `kind` about `args`."""
    if kind in ("color_at", "shape_at"):
        return f"What {'color' if kind == 'color_at' else 'shape'} is the object at the {place(*args)}?"
    if kind == "has_color":
        return f"Is there a {args[0]} object?"
    if kind == "count_color":
        return f"How many {args[0]} objects are there?"
    if kind == "compare":
        return f"Are there more {args[0]} objects than {args[1]} objects?"
    if kind == "largest_color":
        return "What color is the largest object?"
    if kind == "left_of":
        return f"Is the {args[0]} object to the left of the {args[1]} object?"
    if kind == "count_choice":
        return "How many objects are there? " + " ".join(f"({L}) {v}" for L, v in zip("ABCD", args))
    if kind == "which_color":
        return f"Which objects are {args[0]}?"
    if kind == "which_two":
        return f"Which objects are {args[0]} or {args[1]}?"
    if kind == "number":
        return "Number the objects."
    if kind == "largest_shape":
        return "What shape is the largest object?"
    if kind == "columns":
        return f"Which columns are the {args[0]} and the {args[1]} object in?"
    raise ValueError(f"unknown question kind {kind!r}")


def ask(scene: Scene, rng: random.Random, kind: str | None = None) -> Question:
    """A random question about the scene (of `kind` if given, GENERAL kinds too) with its ground truth. The
    answer follows from the scene, so its distribution is the scenes' (skewed); balanced_task draws it
    first."""
    kind = kind or rng.choice(TASK_TYPES)
    if kind == "describe":
        return Question(kind, rng.choice(DESCRIBE), describe(scene))
    if kind in ("color_at", "shape_at"):
        o = rng.choice(scene.objects)
        args = (o.row, o.col)
    elif kind in ("has_color", "count_color", "which_color"):
        args = (rng.choice(list(COLORS)),)
    elif kind in ("compare", "which_two"):
        args = tuple(rng.sample(list(COLORS), 2))
    elif kind in ("largest_color", "number", "largest_shape"):
        args = ()
    elif kind in ("left_of", "columns"):
        unique = [o for o in scene.objects if len(of_color(scene, o.color)) == 1]
        pairs = [(a, b) for a in unique for b in unique if a.col != b.col]
        if not pairs:  # no two objects of unique colours in different columns: ask something else
            return ask(scene, rng, "count_color" if kind == "left_of" else "which_color")
        a, b = rng.choice(pairs)
        args = (a.color, b.color)
    elif kind == "count_choice":
        n = len(scene.objects)
        lo = rng.randint(max(1, n - 3), n)
        args = tuple(range(lo, lo + 4))
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return Question(kind, question_text(kind, args), answer_for(scene, kind, args), args)


def balanced_task(rng: random.Random, grid: int = GRID, exclude: set | frozenset = frozenset(),
                  tries: int = 100_000) -> tuple[Scene, Question]:
    """A TASK question and a scene that fits it, the answer drawn first: the kind, the question's words and
    the answer are drawn uniformly (answer from ANSWERS[kind]), then random scenes until one has that answer
    (rejection sampling; scenes whose signature is in `exclude` are skipped). Given a question's words, every
    answer is then equally likely: a student that does not look at the picture can do no better than chance.

        "How many red objects are there?"            answer uniform over 0, 1, 2, 3
        "How many objects are there? (A) 3 ... (D) 6"  answer uniform over A-D (the scene has 3, 4, 5 or 6)
    """
    kind = rng.choice(TASK_TYPES)
    target = rng.choice(ANSWERS[kind])
    n_objects = None
    if kind == "count_color":
        args = (rng.choice(list(COLORS)),)
    elif kind in ("compare", "left_of"):
        args = tuple(rng.sample(list(COLORS), 2))
    elif kind == "largest_color":
        args = ()
    else:  # count_choice: the options start at 2 or 3, the answer's letter fixes the number of objects
        lo = rng.choice(CHOICE_START)
        args = tuple(range(lo, lo + 4))
        n_objects = args["ABCD".index(target)]
    for _ in range(tries):
        scene = random_scene(rng, grid, *((n_objects, n_objects) if n_objects else ()))
        if scene.signature() in exclude:
            continue
        try:
            answer = answer_for(scene, kind, args)
        except ValueError:  # the question does not apply (left_of: a colour missing or repeated)
            continue
        if answer == target:
            return scene, Question(kind, question_text(kind, args), answer, args)
    raise RuntimeError(f"no scene answers {question_text(kind, args)!r} with {target!r} in {tries} tries")
