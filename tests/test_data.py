"""The embedded world: generator, teachers, loader, tiny student."""
import filecmp
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.build import MARKED_SHARES, SFT_TEACHER_STYLE, SPLITS, build, world_dirs
from data.dataset import (MAX_ASPECT_RATIO, MAX_TEXT_CHARS, load_image, load_jsonl, step_rows, teacher_names,
                          teacher_slots)
from data.scenes import (ANSWERS, COLORS, GENERAL_TYPES, TASK_TYPES, answer_for, ask, balanced_task, describe,
                         draw, of_color, question_text, random_scene)
from data.teachers import TEACHERS, methodical, plain_response, teacher_response
from tests.conftest import SMALL


def test_generator_is_deterministic(tmp_path):
    sizes = {"train": 20, "test": 10}
    a = build(tmp_path / "a", seed=3, sizes=sizes)
    b = build(tmp_path / "b", seed=3, sizes=sizes)
    c = build(tmp_path / "c", seed=4, sizes=sizes)
    for split in sizes:
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
        assert (a / f"{split}.jsonl").read_bytes() != (c / f"{split}.jsonl").read_bytes()
    images = sorted(p.name for p in (a / "images").iterdir())
    assert len(images) == 30
    match, mismatch, errors = filecmp.cmpfiles(a / "images", b / "images", images, shallow=False)
    assert match == images and not mismatch and not errors


def test_every_generated_row_loads(embedded):
    for split, n in SMALL.items():
        rows = load_jsonl(embedded / f"{split}.jsonl")
        assert len(rows) == n
        for row in rows:
            assert Path(row["image"]).is_absolute() and load_image(row["image"]).size == (84, 84)
            assert ("teachers" in row) == (split == "train") and ("response" in row) == (split == "sft")
            if split == "train":
                assert set(row["teachers"]) == set(TEACHERS)
                assert all(len(v) == 4 for v in row["teachers"].values())


def test_test_split_scenes_are_new(embedded):
    def scene_bytes(split):
        return {Path(r["image"]).read_bytes() for r in load_jsonl(embedded / f"{split}.jsonl")}
    seen = scene_bytes("sft") | scene_bytes("train") | scene_bytes("val")
    assert not scene_bytes("test") & seen


def test_answers_need_the_picture():
    """Each question type has more than one answer across scenes, so the text alone cannot answer it."""
    rng = random.Random(0)
    for kind in GENERAL_TYPES + TASK_TYPES:
        answers = {ask(random_scene(rng), rng, kind).answer for _ in range(200)}
        assert len(answers) >= 2, kind


def test_drawing_shows_each_object():
    rng = random.Random(1)
    scene = random_scene(rng)
    img = draw(scene)
    for o in scene.objects:  # the centre pixel of each object's cell carries its colour
        px = img.getpixel((o.col * 28 + 14, o.row * 28 + 14 + (3 if o.shape == "triangle" else 0)))
        assert px in COLORS.values(), o


def _boxed(text):
    return text[text.rindex("\\boxed{") + 7:text.rindex("}")]


@pytest.mark.parametrize("name", list(TEACHERS))
def test_teacher_accuracy_matches_its_error_rate(name):
    rng = random.Random(7)
    n, right = 3000, 0
    for _ in range(n):
        scene = random_scene(rng)
        q = ask(scene, rng)
        right += _boxed(teacher_response(name, scene, q, rng)) == q.answer
    err, want = 1 - right / n, TEACHERS[name]
    assert abs(err - want) < 3 * (want * (1 - want) / n) ** 0.5 + 0.005, (err, want)


def test_teachers_write_different_styles_and_reflect():
    rng = random.Random(2)
    texts = {t: [] for t in TEACHERS}
    for _ in range(300):
        scene = random_scene(rng)
        q = ask(scene, rng)
        for t in TEACHERS:
            texts[t].append(teacher_response(t, scene, q, rng))
    assert all(t.startswith(("Let me look", "First I list", "Step 1")) for t in texts["methodical"])
    assert not any(t.startswith(("Let me look", "First I list", "Step 1")) for t in texts["reflective"])
    reflective = sum("Wait" in t or "double-check" in t or "check again" in t for t in texts["reflective"])
    assert 0.15 < reflective / 300 < 0.6


def test_sft_data_is_general_and_teachers_describe_in_its_words(embedded):
    """The SFT split asks GENERAL questions (descriptions plain, other answers plain or in a teacher's style,
    always right) and a few TASK ones (answered plainly); the RL and test splits only TASK questions; a
    correct methodical teacher's listing is the SFT description of the same scene, word for word."""
    sft, train, test = (load_jsonl(embedded / f"{s}.jsonl") for s in ("sft", "train", "test"))
    assert {r["kind"] for r in sft} - set(TASK_TYPES) == set(GENERAL_TYPES)
    assert {r["kind"] for r in train} <= set(TASK_TYPES) and {r["kind"] for r in test} <= set(TASK_TYPES)
    styled = 0
    for r in sft:
        plain = r["answer"] + "." if r["kind"] == "describe" else f"The answer is \\boxed{{{r['answer']}}}."
        assert r["response"] == plain or (r["kind"] != "describe" and _boxed(r["response"]) == r["answer"])
        styled += r["response"] != plain
    n = sum(r["kind"] in GENERAL_TYPES and r["kind"] != "describe" for r in sft)
    assert abs(styled / n - SFT_TEACHER_STYLE) < 4 * (SFT_TEACHER_STYLE * (1 - SFT_TEACHER_STYLE) / n) ** 0.5
    rng = random.Random(5)
    for _ in range(100):
        scene = random_scene(rng)
        q = ask(scene, rng)
        text = teacher_response("methodical", scene, q, random.Random(0))  # error draw 0.84 > 0.05: correct
        assert f": {describe(scene)}. Step 2: " in text and text.endswith(f"\\boxed{{{q.answer}}}.")
        assert plain_response(ask(scene, rng, "describe")) == describe(scene) + "."


def _write(tmp_path, rows, image=True):
    if image:
        draw(random_scene(random.Random(0))).save(tmp_path / "ok.png")
        (tmp_path / "broken.png").write_bytes(b"not a png")
    p = tmp_path / "d.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


GOOD = {"id": "a", "image": "ok.png", "question": "q?", "answer": "1", "teachers": {"t": ["r"]}}


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "bad JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({k: v for k, v in GOOD.items() if k != "question"}, "missing field 'question'"),
    (dict(GOOD, answer=3), "field 'answer' must be a non-empty string"),
    (dict(GOOD, id=""), "field 'id' must be a non-empty string"),
    (dict(GOOD, image="missing.png"), "not found"),
    (dict(GOOD, image="broken.png"), "cannot be opened"),
    (dict(GOOD, image=5), "must be a path string or null"),
    (dict(GOOD, teachers=["r"]), "'teachers' must be a non-empty object"),
    (dict(GOOD, teachers={"t": []}), "teachers['t'] must be a non-empty list"),
    (dict(GOOD, teachers={"t": ["ok", 3]}), "must hold only strings"),
    (dict(GOOD, students={}), "'students' must be a non-empty object"),
    (dict(GOOD, students={"s": ["ok", None]}), "students['s'] must hold only strings"),
    (dict(GOOD, teacher={"t": ["r"]}), "unknown field"),
    (GOOD, "duplicate id 'a'"),
])
def test_malformed_rows_are_rejected_with_file_and_line(tmp_path, bad, problem):
    path = _write(tmp_path, [GOOD, dict(GOOD, id="b", image=None), bad])
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ") and problem in str(e.value), str(e.value)


def test_loader_accepts_text_only_and_evaluation_rows(tmp_path):
    rows = load_jsonl(_write(tmp_path, [GOOD, {"id": "b", "image": None, "question": "q", "answer": "x"}]))
    assert rows[1]["image"] is None and "teachers" not in rows[1]
    with pytest.raises(ValueError, match="no such dataset file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_empty_cached_responses_load_and_are_counted(tmp_path, caplog):
    rows = [dict(GOOD, teachers={"t": ["r", " "]}), dict(GOOD, id="b", students={"s": ["", "x"]})]
    with caplog.at_level("WARNING"):
        loaded = load_jsonl(_write(tmp_path, rows))
    assert loaded[0]["teachers"]["t"] == ["r", " "] and "2 cached responses are empty" in caplog.text


def test_bytes_that_are_not_utf8_are_reported_with_line_and_column(tmp_path):
    path = _write(tmp_path, [GOOD])
    bad = json.dumps(dict(GOOD, id="b")).encode().replace(b'"q?"', b'"q\xff?"')
    path.write_bytes(path.read_bytes() + bad + b"\n")
    column = bad.index(b"\xff") + 1
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    assert str(e.value) == f"{path}:2: not UTF-8 (byte 0xff at column {column})"


def test_image_the_qwen2vl_processor_rejects_is_reported(tmp_path):
    Image.new("RGB", (1, 2 * MAX_ASPECT_RATIO)).save(tmp_path / "thin.png")
    Image.new("RGB", (2, 2 * MAX_ASPECT_RATIO)).save(tmp_path / "tall.png")  # ratio 200 exactly: accepted
    path = _write(tmp_path, [dict(GOOD, image="tall.png"), dict(GOOD, id="b", image="thin.png")])
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: image 'thin.png' is 1x400: an aspect ratio over 200"), e.value


def test_over_long_texts_are_rejected_with_their_field(tmp_path):
    long = "x" * (MAX_TEXT_CHARS + 1)
    for row, field in [(dict(GOOD, id="b", question=long), "field 'question'"),
                       (dict(GOOD, id="b", response=long), "field 'response'"),
                       (dict(GOOD, id="b", students={"s": ["ok", long]}), "students['s'][1]")]:
        path = _write(tmp_path, [dict(GOOD, question=long[1:]), row])  # exactly the limit: accepted
        with pytest.raises(ValueError) as e:
            load_jsonl(path)
        assert str(e.value) == f"{path}:2: {field} is 100,001 characters long (limit 100,000)"


def test_a_teacher_some_rows_lack_is_an_error_unless_left_out_explicitly():
    rows = [{"id": "a", "teachers": {"t": ["x"], "u": ["y"]}}, {"id": "b", "teachers": {"t": ["x"]}},
            {"id": "c", "teachers": {"t": ["x"]}}]
    want = r"teachers \['u'\] are not cached in every row .*: 2 of 3 rows lack 'u', the first is id 'b'"
    with pytest.raises(ValueError, match=want):
        teacher_names(rows)
    assert teacher_names(rows, "t") == ["t"]
    with pytest.raises(ValueError, match="2 of 3 rows lack 'u'"):
        teacher_names(rows, "t,u")


def test_step_rows_two_ranks_split_the_one_rank_batch_and_cover_each_epoch():
    items = list(range(12))
    for step in range(7):  # 4 items a step: no batch straddles two epochs, so the ranks' shares are disjoint
        whole = step_rows(items, step, 4, seed=3)
        halves = [step_rows(items, step, 4, seed=3, rank=r, world=2) for r in range(2)]
        assert halves[0] + halves[1] == whole and not set(halves[0]) & set(halves[1])
    epoch = [x for step in range(6) for x in step_rows(items, step, 2, seed=3)]  # 6 steps x 2 = one epoch
    assert sorted(epoch) == items and epoch != items  # every item once, in a shuffled order
    assert step_rows(items, 0, 12, seed=3) != step_rows(items, 0, 12, seed=4)
    assert sorted(step_rows(items, 6, 12, seed=3)) == items  # a later epoch: every item again


def test_teacher_slots_round_robin_without_replacement():
    row = {"id": "r", "teachers": {"a": ["a1", "a2", "a3"], "b": ["b1"], "c": ["c1"]}}
    slots = teacher_slots(row, ["a", "b"], 4, random.Random(0))
    assert [s[0] for s in slots] == ["a", "b", "a", "b"]
    assert slots[0] != slots[2] and slots[1] == slots[3] == "b1"  # a pool is reused only once it is used up
    assert sorted(teacher_slots(row, ["a"], 3, random.Random(1))) == ["a1", "a2", "a3"]
    assert teacher_names([row, {"teachers": {"a": ["x"], "b": ["y"], "c": ["z"]}}]) == ["a", "b", "c"]
    assert teacher_names([row], "c,a") == ["c", "a"]
    with pytest.raises(ValueError, match=r"\['d'\] are not cached"):
        teacher_names([row], "a,d")


def test_tiny_student_round_trip_and_forward(tiny_student, embedded):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_student)
    proc = AutoImageProcessor.from_pretrained(tiny_student)
    model = AutoModelForImageTextToText.from_pretrained(tiny_student).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and 5e5 < n_params < 1e7
    row = load_jsonl(embedded / "train.jsonl")[0]
    for text in [row["question"], *row["teachers"]["methodical"]]:
        assert tok.decode(tok(text)["input_ids"]) == text
    img = proc(images=[load_image(row["image"])], return_tensors="pt")
    n_img = int(img["image_grid_thw"].prod()) // 4
    assert n_img == 9  # 84 px -> 6 x 6 patches -> 3 x 3 merged tokens
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and text.count("<|image_pad|>") == 1
    enc = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n_img), return_tensors="pt")
    mm = (enc.input_ids == model.config.image_token_id).int()
    with torch.no_grad():
        out = model(**enc, **img, mm_token_type_ids=mm)
        reloaded = AutoModelForImageTextToText.from_pretrained(tiny_student).eval()
        again = reloaded(**enc, **img, mm_token_type_ids=mm)
    assert out.logits.shape == (1, enc.input_ids.shape[1], len(tok)) and torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits, again.logits)


def test_task_answers_are_balanced_within_each_kind():
    """balanced_task draws the answer first: over 4,000 questions each kind's answers are uniform over its
    answer set (every share within 4 points of 1/|set|), and so are the answers to one fixed question text."""
    rng = random.Random(5)
    drawn = [balanced_task(rng)[1] for _ in range(4000)]
    for kind in TASK_TYPES:
        answers = Counter(q.answer for q in drawn if q.kind == kind)
        n = sum(answers.values())
        assert set(answers) == set(ANSWERS[kind]), kind
        assert all(abs(c / n - 1 / len(ANSWERS[kind])) < 0.04 for c in answers.values()), (kind, answers)
    red = Counter(q.answer for q in drawn if q.text == "How many red objects are there?")
    assert set(red) == {"0", "1", "2", "3"} and max(red.values()) / sum(red.values()) < 0.4, red
    for q in drawn[:200]:  # the text says what was asked; the scene's answer agrees
        assert q.text == question_text(q.kind, q.args)


def test_blind_baseline_is_near_chance_in_every_split(embedded):
    """meta.json records chance and the blind baseline per split and kind; with balanced answers the blind
    baseline stays near chance (a few points of sampling noise on the small test splits)."""
    meta = json.loads((embedded / "meta.json").read_text())["baselines"]
    assert set(meta) == {"train", "val", "test"}
    for split, kinds in meta.items():
        assert kinds["all"]["n"] == SMALL[split] and set(kinds) == {"all", *TASK_TYPES}
        assert abs(kinds["all"]["blind"] - kinds["all"]["chance"]) < 0.2, (split, kinds["all"])
    assert SPLITS["test"] >= 1000 and SPLITS["val"] >= 500  # the default run's: a 95% interval of ~+-0.03


def test_sft_task_share_adds_plain_task_answers(tmp_path):
    """--sft-task-share: that share of the SFT rows asks a TASK question (balanced answers, disjoint scenes),
    answered plainly, never in a teacher's step-by-step form; 0 leaves the SFT split GENERAL only."""
    sizes = {"sft": 400, "train": 10, "test": 10}
    rows = load_jsonl(build(tmp_path / "share", seed=1, sizes=sizes, sft_task_share=0.25) / "sft.jsonl")
    task = [r for r in rows if r["kind"] in TASK_TYPES]
    assert abs(len(task) / len(rows) - 0.25) < 4 * (0.25 * 0.75 / len(rows)) ** 0.5
    assert all(r["response"] == f"The answer is \\boxed{{{r['answer']}}}." for r in task)
    plain = load_jsonl(build(tmp_path / "none", seed=1, sizes=sizes, sft_task_share=0.0) / "sft.jsonl")
    assert all(r["kind"] in GENERAL_TYPES for r in plain)


def _read_marks(text: str, color: str) -> list[tuple[str, bool, str | None]]:
    """(object, marked yes, what the mark carries) for each listed object of a marked list, read back with a
    regex independent of data.teachers: the running count, the column once seen, or nothing."""
    out = []
    other = r"[a-z]+\? (?:yes|no)(?:, (?:\d+|left|middle|right))?, "
    for obj, yes, carried in re.findall(rf"([a-z ]+: [a-z ]+) - (?:{other})*{color}\? (yes|no)"
                                        rf"(?:, (\d+|left|middle|right))?", text):
        out.append((obj.strip(), yes == "yes", carried or None))
    return out


def test_marks_agree_with_the_scene():
    """The marked methodical teacher (no misreading) marks exactly the objects of the asked colour and carries
    the running count on every object (its last count is the one it answers), carries each named object's
    column from where it is listed on, carries the largest object from where it is listed on, and numbers
    every object of a multiple-choice count."""
    rng = random.Random(7)
    for _ in range(300):
        scene, q = balanced_task(rng)
        text = methodical(scene, q, rng, marked=True)
        assert text.endswith(f"\\boxed{{{q.answer}}}.")
        ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
        if q.kind in ("count_color", "compare"):
            for color in q.args:
                read = _read_marks(text, color)
                assert len(read) == len(scene.objects)
                running = [sum(o.color == color for o in ordered[:i + 1]) for i in range(len(ordered))]
                assert [int(n) for _, _, n in read] == running
                is_color = [obj.split()[-2] == color for obj, _, _ in read]      # '... large red square'
                assert is_color == [y for _, y, _ in read]
            assert f"That makes {len(of_color(scene, q.args[0]))} {q.args[0]}" in text
        if q.kind == "left_of":
            for color in q.args:
                read = _read_marks(text, color)
                assert len(read) == len(scene.objects)
                first = next(i for i, o in enumerate(ordered) if o.color == color)
                column = ("left", "middle", "right")[ordered[first].col]
                assert [c for _, _, c in read] == [None] * first + [column] * (len(ordered) - first)
        if q.kind == "largest_color":
            big = max(scene.objects, key=lambda o: o.radius)
            found = re.findall(r"([a-z ]+: [a-z ]+) - large\? (yes|no)(?:, ([a-z]+ [a-z]+))?", text)
            assert len(found) == len(scene.objects)
            first = ordered.index(big)
            assert [y == "yes" for _, y, _ in found] == [o is big for o in ordered]
            assert [c or None for _, _, c in found] == [None] * first + [big.name] * (len(ordered) - first)
        if q.kind == "count_choice":
            numbers = re.findall(r", (\d+)[;.] ", text)
            assert numbers == [str(i) for i in range(1, len(scene.objects) + 1)]


def test_marked_cap_holds_every_correct_methodical_response(tiny_student):
    """The marked world's default response cap holds the methodical teacher's correct responses at their
    longest (six objects, every kind), so RL never cuts a cached answer before its \\boxed{} and greedy
    evaluation lets the student finish an answer in that form; the earlier cap of 128 did not."""
    from transformers import AutoTokenizer
    from ril import EMBEDDED_WORLD
    tok, rng, longest = AutoTokenizer.from_pretrained(tiny_student), random.Random(0), {}
    for _ in range(300):
        scene = random_scene(rng, min_objects=6)
        for kind in TASK_TYPES:
            q = ask(scene, rng, kind)
            n = len(tok(methodical(scene, q, rng, marked=True))["input_ids"]) + 1    # + the end token
            longest[q.kind] = max(longest.get(q.kind, 0), n)
    assert 128 < max(longest.values()) <= EMBEDDED_WORLD["marked"]["max_new_tokens"], longest


def test_marked_world_sft_teaches_the_marks(tmp_path):
    """--world marked: the SFT split asks MARKED_TYPES questions answered by the marked list, its TASK rows
    are answered in the reflective teacher's chain (right answer), the methodical cache carries the marks;
    the plain world has none of it."""
    sizes = {"sft": 400, "train": 20, "val": 10, "test": 10}
    out = build(tmp_path / "marked", seed=2, sizes=sizes, world="marked")
    sft, train = load_jsonl(out / "sft.jsonl"), load_jsonl(out / "train.jsonl")
    kinds = Counter(r["kind"] for r in sft)
    general = len(sft) - sum(kinds[k] for k in TASK_TYPES)
    columns = kinds.pop("columns")
    assert columns > 0
    kinds["which_color"] += columns  # a columns draw that the scene cannot ask falls back to which_color
    shares = {k: v for k, v in MARKED_SHARES.items() if k != "columns"}
    shares["which_color"] += MARKED_SHARES["columns"]
    for kind, share in shares.items():
        assert abs(kinds[kind] / general - share) < 4 * (share * (1 - share) / general) ** 0.5, kind
    for r in sft:
        if r["kind"] == "which_color":
            color = r["question"].split()[-1].rstrip("?")
            assert r["response"].endswith(f"The {color} objects: {r['answer']}.")
            assert all(n is not None for _, y, n in _read_marks(r["response"], color) if y)
        if r["kind"] == "largest_shape":
            assert r["response"].endswith(f"so its shape is {r['answer']}.")
            assert r["response"].count("large? yes") == 1
        if r["kind"] == "columns":
            colors = re.findall(r"the (\w+) and the (\w+) object", r["question"])[0]
            said = re.findall(r"[Tt]he (\w+) one is in the (\w+) column", r["response"])
            assert said == list(zip(colors, r["answer"].split(", ")))
        if r["kind"] == "number":
            assert r["response"].endswith(f", {r['answer']}. That is {r['answer']} objects.")
        if r["kind"] in TASK_TYPES:
            assert r["response"].startswith(("I need", "The question is about", "Focus on"))
            assert _boxed(r["response"]) == r["answer"]
    assert any("? yes, 1" in t for r in train for t in r["teachers"]["methodical"])
    assert json.loads((out / "meta.json").read_text())["world"] == "marked"
    plain = build(tmp_path / "plain", seed=2, sizes=sizes)
    assert "? yes" not in (plain / "sft.jsonl").read_text() + (plain / "train.jsonl").read_text()
    with pytest.raises(ValueError, match="unknown embedded world"):
        world_dirs("blocks")
