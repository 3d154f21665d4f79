"""The embedded visual task: scenes drawn with Pillow and questions whose answers need the picture.

A scene is a few coloured shapes placed in the cells of a square grid (one shape per cell). The image
is `28 * grid` pixels wide, so with Qwen2.5-VL's 14 px patches merged 2 x 2 each cell is exactly one
image token. Questions ask for counts, colours, comparisons and left/right relations; every answer is
short and verifiable (a number, a colour word, yes/no, or a multiple-choice letter).

The scene description (`Scene.objects`) is privileged information: the scripted teachers read it,
the student only sees the pixels.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

CELL = 28  # pixels per grid cell = one merged image token of Qwen2.5-VL (14 px patches, 2 x 2 merge)
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)
QUESTION_TYPES = ("count_color", "count_shape", "largest_color", "compare", "left_of", "count_choice")


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
    kind: str  # one of QUESTION_TYPES
    text: str
    answer: str
    args: tuple = ()  # what the question is about, e.g. ("red",) or (obj_a, obj_b)


def random_scene(rng: random.Random, grid: int = 3, min_objects: int = 2, max_objects: int = 6) -> Scene:
    """Objects in distinct cells with random colour, shape and size; the largest object is unique."""
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], rng.randint(min_objects, max_objects))
    radii = [rng.randint(6, 10) for _ in cells]
    radii[rng.randrange(len(cells))] = 13  # one clearly largest object (others are at most 10)
    objects = tuple(Obj(rng.choice(list(COLORS)), rng.choice(SHAPES), r, c, rad) for (r, c), rad in zip(cells, radii))
    return Scene(grid, objects)


def draw(scene: Scene) -> Image.Image:
    """Render the scene to an RGB image of side 28 * grid pixels."""
    side = CELL * scene.grid
    img = Image.new("RGB", (side, side), BACKGROUND)
    d = ImageDraw.Draw(img)
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


def where(o: Obj, grid: int) -> str:
    """Coarse location words for an object, e.g. 'top left', 'center'."""
    v = "top" if o.row == 0 else "bottom" if o.row == grid - 1 else ""
    h = "left" if o.col == 0 else "right" if o.col == grid - 1 else ""
    return f"{v} {h}".strip() or "center"


def largest(scene: Scene) -> Obj:
    return max(scene.objects, key=lambda o: o.radius)


def named(scene: Scene, name: str) -> Obj:
    """The one object called `name` ('red circle'); ValueError if there is none or several."""
    found = [o for o in scene.objects if o.name == name]
    if len(found) != 1:
        raise ValueError(f"{len(found)} objects are called {name!r}")
    return found[0]


def unique_objects(scene: Scene) -> list[Obj]:
    """Objects that the phrase '<colour> <shape>' names unambiguously."""
    names = [o.name for o in scene.objects]
    return [o for o in scene.objects if names.count(o.name) == 1]


def answer_for(scene: Scene, kind: str, args: tuple) -> str:
    """Ground truth of a question of `kind` about `args`, from the scene description."""
    objs = scene.objects
    if kind == "count_color":
        return str(sum(o.color == args[0] for o in objs))
    if kind == "count_shape":
        return str(sum(o.shape == args[0] for o in objs))
    if kind == "largest_color":
        return largest(scene).color
    if kind == "compare":
        a, b = (sum(o.color == c for o in objs) for c in args)
        return "yes" if a > b else "no"
    if kind == "left_of":
        a, b = (named(scene, n) for n in args)
        return "yes" if a.col < b.col else "no"
    if kind == "count_choice":
        return "ABCD"[args.index(len(objs))]
    raise ValueError(f"unknown question kind {kind!r}")


def ask(scene: Scene, rng: random.Random, kind: str | None = None) -> Question:
    """A random question about the scene (of `kind` if given) with its ground-truth answer."""
    kind = kind or rng.choice(QUESTION_TYPES)
    if kind == "left_of":
        pairs = [(a, b) for a in unique_objects(scene) for b in unique_objects(scene) if a.col != b.col]
        if not pairs:  # no two nameable objects in different columns: ask something else
            return ask(scene, rng, "count_color")
        a, b = rng.choice(pairs)
        args, text = (a.name, b.name), f"Is the {a.name} to the left of the {b.name}?"
    elif kind == "count_color":
        args = (rng.choice(list(COLORS)),)
        text = f"How many {args[0]} objects are there?"
    elif kind == "count_shape":
        args = (rng.choice(SHAPES),)
        text = f"How many {args[0]}s are there?"
    elif kind == "largest_color":
        args, text = (), "What color is the largest object?"
    elif kind == "compare":
        args = tuple(rng.sample(list(COLORS), 2))
        text = f"Are there more {args[0]} objects than {args[1]} objects?"
    elif kind == "count_choice":
        n = len(scene.objects)
        lo = rng.randint(max(1, n - 3), n)
        args = tuple(range(lo, lo + 4))
        text = "How many objects are there? " + " ".join(f"({L}) {v}" for L, v in zip("ABCD", args))
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return Question(kind, text, answer_for(scene, kind, args), args)
