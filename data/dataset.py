"""The JSONL schema every dataset of the project is stored in, and its strict loader.

One row per question:
    {"id": str, "image": path relative to the file or null, "question": str, "answer": str,
     "teachers": {"teacher-name": [response, ...], ...},   # optional (evaluation sets have none)
     "students": {"student-name": [response, ...], ...},   # optional: the student's own cached samples,
                                                           #   for D's pre-training (data/teacher_cache.py)
     "response": str,                                      # optional: the SFT target for this question
     "kind": str}                                          # optional: question type, for per-type metrics

A malformed row raises ValueError naming the file, the line and the problem. No row is dropped. Empty cached
responses are kept (a model can answer nothing) and counted in a warning.
Below the loader: which rows a training step takes (a pure function of the seed and the step, so resuming
needs only the step) and which cached teacher responses fill a question's G teacher slots.
"""
from __future__ import annotations

import functools
import json
import logging
import random
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

import rollout

log = logging.getLogger(__name__)
REQUIRED = {"id": str, "question": str, "answer": str}
OPTIONAL = {"image", "teachers", "students", "response", "kind"}
# A byte-level BPE token covers at least one byte and a character at most four, so a text of n characters
# is at most 4n tokens: this bounds every sequence (and attention mask) built from a row, yet passes any
# real benchmark question or long chain of thought.
MAX_TEXT_CHARS = 100_000
# transformers' Qwen2-VL/Qwen2.5-VL image processor (smart_resize) rejects only an aspect ratio over this.
MAX_ASPECT_RATIO = 200


def _check_row(row, base: Path) -> str | None:
    """The problem with one parsed row, or None if it is valid. Resolves `image` to an absolute path."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    unknown = set(row) - set(REQUIRED) - OPTIONAL
    if unknown:
        return f"unknown field(s) {sorted(unknown)}; allowed: {sorted(set(REQUIRED) | OPTIONAL)}"
    for key, typ in REQUIRED.items():
        if key not in row:
            return f"missing field {key!r}"
        if not isinstance(row[key], typ) or not row[key].strip():
            return f"field {key!r} must be a non-empty string, got {row[key]!r:.80}"
    for key in ("response", "kind"):
        if key in row and (not isinstance(row[key], str) or not row[key].strip()):
            return f"field {key!r} must be a non-empty string when present"
    for key in ("question", "answer", "response"):
        if len(row.get(key, "")) > MAX_TEXT_CHARS:
            return f"field {key!r} is {len(row[key]):,} characters long (limit {MAX_TEXT_CHARS:,})"
    for field in ("teachers", "students"):
        cache = row.get(field)
        if cache is None:
            continue
        if not isinstance(cache, dict) or not cache:
            return f"field {field!r} must be a non-empty object {{name: [response, ...]}}"
        for name, responses in cache.items():
            if not isinstance(responses, list) or not responses:
                return f"{field}[{name!r}] must be a non-empty list of responses"
            if not all(isinstance(r, str) for r in responses):
                return f"{field}[{name!r}] must hold only strings"
            for i, r in enumerate(responses):
                if len(r) > MAX_TEXT_CHARS:
                    return f"{field}[{name!r}][{i}] is {len(r):,} characters long (limit {MAX_TEXT_CHARS:,})"
    image = row.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            return f"field 'image' must be a path string or null, got {image!r:.80}"
        path = (base / image).resolve()
        if not path.is_file():
            return f"image {image!r} not found (looked at {path})"
        try:
            with Image.open(path) as im:
                im.verify()
                width, height = im.size
        except Exception as e:  # PIL raises many types for a bad file
            return f"image {image!r} cannot be opened: {e}"
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            return (f"image {image!r} is {width}x{height}: an aspect ratio over {MAX_ASPECT_RATIO}, "
                    f"which the Qwen2-VL image processor rejects")
        row["image"] = str(path)
    return None


class DatasetError(ValueError):
    """A bad dataset: the message names the file (and the line) and what is wrong."""


def load_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a dataset; image paths come back absolute. Raises DatasetError at a bad row."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    rows, seen = [], {}
    with open(path, "rb") as f:  # binary, decoded line by line, so bad bytes are reported with their line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                raise DatasetError(f"{path}:{lineno}: not UTF-8 ({bad})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: bad JSON: {e}") from None
            problem = _check_row(row, path.parent)
            if problem is None and row["id"] in seen:
                problem = f"duplicate id {row['id']!r} (first on line {seen[row['id']]})"
            if problem:
                raise DatasetError(f"{path}:{lineno}: {problem}")
            seen[row["id"]] = lineno
            rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: the file holds no rows")
    empty = sum(not t.strip() for r in rows for field in ("teachers", "students")
                for ts in r.get(field, {}).values() for t in ts)
    if empty:  # kept (a model may answer nothing; it then earns no answer reward), but never unnoticed
        log.warning("%s: %d cached responses are empty", path, empty)
    return rows


def sft_rows(path: str | Path) -> list[dict]:
    """The rows of an SFT file that carry a `response` (the SFT target); the others are skipped, with a
    warning. A file with none is an error."""
    rows = load_jsonl(path)
    kept = [r for r in rows if "response" in r]
    if not kept:
        raise DatasetError(f"{path}: no row has a `response` field to fine-tune on")
    if len(kept) < len(rows):
        log.warning("%s: %d of %d rows have no `response`: skipped", path, len(rows) - len(kept), len(rows))
    return kept


def load_image(path: str | None) -> Image.Image | None:
    """An RGB image from a path returned by load_jsonl (None stays None)."""
    if path is None:
        return None
    with Image.open(path) as im:
        return im.convert("RGB")


def load_images(rows: list[dict]) -> list:
    """The images of dataset rows (None for text-only rows)."""
    return [load_image(r.get("image")) for r in rows]


def encode_rows(model, tokenizer, image_processor, rows: list[dict], device=None) -> dict:
    """rollout.encode_prompts of dataset rows (questions and images) for `model`'s family, on `device`."""
    questions = [r["question"] for r in rows]
    prompts = rollout.encode_prompts(tokenizer, image_processor, questions, load_images(rows),
                                     family=model.config.model_type)
    return {k: v.to(device) if torch.is_tensor(v) and device else v for k, v in prompts.items()}


# ------------------------------------------------------------------------------------------------------------
# Baselines from the data alone (no model): what any accuracy is measured against


def blind_guesses(train_rows: list[dict], rows: list[dict]) -> list[str]:
    """The blind baseline's answer to each row: the training split's most common answer for the same question
    text, else for the row's `kind`, else overall (ties: the answer met first). A student that never looks at
    the picture can learn exactly this much from its training data."""
    by_text, by_kind, overall = {}, {}, Counter()
    for r in train_rows:
        by_text.setdefault(r["question"], Counter())[r["answer"]] += 1
        by_kind.setdefault(r.get("kind", ""), Counter())[r["answer"]] += 1
        overall[r["answer"]] += 1
    if not overall:
        raise ValueError("blind_guesses: no training rows")
    return [(by_text.get(r["question"]) or by_kind.get(r.get("kind", "")) or overall).most_common(1)[0][0]
            for r in rows]


def chance_levels(train_rows: list[dict], rows: list[dict]) -> list[float]:
    """Chance for each row: one over the number of distinct answers its `kind` has in the training split
    (a four-way choice: 1/4; yes/no: 1/2). Rows of a kind the training split lacks use every answer seen."""
    answers, every = {}, set()
    for r in train_rows:
        answers.setdefault(r.get("kind", ""), set()).add(r["answer"])
        every.add(r["answer"])
    return [1 / len(answers.get(r.get("kind", "")) or every or {""}) for r in rows]


# ------------------------------------------------------------------------------------------------------------
# Batches and teacher slots

@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of n items in one epoch (drawn once, not once per item)."""
    return random.Random(seed * 1_000_003 + epoch).sample(range(n), n)


def step_rows(items: list, step: int, per_step: int, seed: int, rank: int = 0, world: int = 1) -> list:
    """Rank `rank`'s share (per_step // world items) of the `step`-th global batch of `per_step` items, read
    in order from a seeded permutation per epoch: every item once per epoch, ranks disjoint within a step."""
    n, start, share = len(items), step * per_step + rank * (per_step // world), per_step // world
    return [items[epoch_permutation(n, seed, pos // n)[pos % n]] for pos in range(start, start + share)]


def teacher_names(rows: list[dict], wanted: str = "", source: str = "the rows") -> list[str]:
    """The teachers to imitate: the comma-separated `wanted`, or every teacher cached in any row. Each must be
    cached in every row: a teacher some rows lack raises DatasetError (naming `source`) rather than silently
    leaving the run."""
    cached = [set(r.get("teachers", {})) for r in rows]
    have = set.intersection(*cached)
    names = [t for t in wanted.split(",") if t] if wanted else sorted(set.union(*cached))
    missing = [t for t in names if t not in have]
    if not names:
        raise DatasetError(f"{source}: no teacher responses are cached in the rows")
    if missing:
        lacking = [r["id"] for r, c in zip(rows, cached) if missing[0] not in c]
        hint = "" if wanted else "; name the teachers to imitate (--teachers) to leave it out"
        raise DatasetError(f"{source}: teachers {missing} are not cached in every row (have "
                           f"{sorted(have)}): {len(lacking)} of {len(rows)} rows lack {missing[0]!r}, the "
                           f"first is id {lacking[0]!r}{hint}")
    return names


def teacher_slots(row: dict, names: list[str], g: int, rng: random.Random) -> list[str]:
    """G cached teacher responses for one question: slot j goes to teacher j mod len(names) (round robin, so
    two teachers and G = 4 give two each), each teacher's responses drawn without replacement while they
    last."""
    pools = {t: rng.sample(row["teachers"][t], len(row["teachers"][t])) for t in names}
    slots = []
    for j in range(g):
        pool = pools[names[j % len(names)]]                                  # teacher j mod len(names)
        slots.append(pool[(j // len(names)) % len(pool)])                     # its (j // len(names))-th draw
    return slots
