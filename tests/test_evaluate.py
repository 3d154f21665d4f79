"""evaluate.py: reflection metrics, pass@k, evaluate_model's bookkeeping, the CLI, --compare and --plot."""
import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import rewards
import rollout
from data.dataset import blind_guesses, chance_levels, load_jsonl
from evaluate import evaluate_model, is_reflective, pass_at_k, reflection_metrics

ROOT = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# reflection metrics


@pytest.mark.parametrize("text, expected", [
    ("Wait, let me count again.", True), ("wait", True), ("WAIT!", True), ("(wait)", True),
    ("I await the result.", False), ("I am waiting.", False), ("awaited", False), ("wait-and-see", False),
    ("Let me re-check.", True), ("Let me recheck it.", True), ("a pre-check", False), ("rechecking", False),
    ("Hmm, let me check again.", True), ("check\nagain", True), ("Check  Again", True),
    ("check it again", False),
    ("Let me double-check.", True), ("Let me verify.", True), ("verified", False), ("not yet", True),
    ("yesterday", False), ("The answer is \\boxed{2}.", False), ("", False),
])
def test_reflection_words_are_whole_words(text, expected):
    assert is_reflective(text) is expected


def test_reflection_metrics_hand_counted():
    responses = [
        "Wait, let me count again. \\boxed{2}",           # reflective, correct
        "I await the answer while waiting. \\boxed{3}",    # not reflective, correct
        "Let me re-check: yes. \\boxed{1}",                # reflective, wrong
        "The answer is \\boxed{4}.",                       # not reflective, wrong
        "Not yet sure; let me VERIFY. \\boxed{5}",         # reflective, correct
        "A pre-check, then more rechecking. \\boxed{6}",   # not reflective, wrong
    ]
    correct = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    # N = 6, N+ = 3, N_ref = 3, N_ref+ = 2
    m = reflection_metrics(responses, correct)
    assert m == pytest.approx({"reflection_ratio": 3 / 6, "reflection_ratio_correct": 2 / 3,
                               "reflection_ratio_incorrect": 1 / 3, "accuracy_reflective": 2 / 3,
                               "accuracy_non_reflective": 1 / 3})


def test_reflection_metrics_zero_denominators_give_zero():
    empty = reflection_metrics([], [])
    assert empty == dict.fromkeys(empty, 0.0) and len(empty) == 5
    # all correct, none reflective: N - N+ = 0 and N_ref = 0
    m = reflection_metrics(["\\boxed{1}", "\\boxed{2}"], [1.0, 1.0])
    assert m == {"reflection_ratio": 0.0, "reflection_ratio_correct": 0.0, "reflection_ratio_incorrect": 0.0,
                 "accuracy_reflective": 0.0, "accuracy_non_reflective": 1.0}
    # all wrong, all reflective: N+ = 0 and N - N_ref = 0
    m = reflection_metrics(["wait", "verify"], [0.0, 0.0])
    assert m == {"reflection_ratio": 1.0, "reflection_ratio_correct": 0.0, "reflection_ratio_incorrect": 1.0,
                 "accuracy_reflective": 0.0, "accuracy_non_reflective": 0.0}
    assert not any(math.isnan(v) for v in m.values())


# -----------------------------------------------------------------------------
# pass@k


def test_pass_at_k_matches_brute_force_over_all_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute), (n, c, k)


# -----------------------------------------------------------------------------
# evaluate_model's bookkeeping, with a scripted rollout (no model needed)

TEXTS = ["<pad>", "The answer is \\boxed{2}.", "Wait, \\boxed{3}", "no answer here", "\\boxed{7}"]


class WordTokenizer:
    """Token i decodes to TEXTS[i]; 0 is padding."""
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(TEXTS[i] for i in ids.tolist() if i)


def test_evaluate_model_bookkeeping(monkeypatch):
    rows = [{"id": "a", "image": None, "question": "q0", "answer": "2"},
            {"id": "b", "image": None, "question": "q1", "answer": "3"},
            {"id": "c", "image": None, "question": "q2", "answer": "5"}]
    # 3 samples per question, prompt-major: q0 has 2 right, q1 has 1 right, q2 has none
    script = {"q0": [[1, 1], [3, 0], [1, 0]], "q1": [[4, 0], [2, 0], [3, 3]], "q2": [[4, 4], [3, 0], [2, 0]]}
    seen = []

    def encode_prompts(tokenizer, image_processor, questions, images, family=None):
        assert images == [None] * len(questions) and family == "qwen2_5_vl"  # the model's config.model_type
        return {"input_ids": torch.zeros(len(questions), 4, dtype=torch.long), "questions": questions}

    def generate(model, prompts, *, max_new_tokens, num_samples, temperature, top_p, top_k, eos_token_id,
                 generator):
        seen.append((len(prompts["questions"]), num_samples, temperature))
        ids = torch.tensor([s for q in prompts["questions"] for s in script[q][:num_samples]])  # [B*G, 2]
        return SimpleNamespace(response_ids=ids, response_mask=ids > 0)

    monkeypatch.setattr(rollout, "encode_prompts", encode_prompts, raising=False)
    monkeypatch.setattr(rollout, "generate", generate, raising=False)
    model = torch.nn.Linear(1, 1)
    model.config = SimpleNamespace(model_type="qwen2_5_vl")
    r = evaluate_model(model, WordTokenizer(), None, rows, temperature=1.0, num_samples=3, batch_size=2)
    assert seen == [(2, 3, 1.0), (1, 3, 1.0)] and model.training
    assert r["correct"] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    truths = ["2"] * 3 + ["3"] * 3 + ["5"] * 3
    assert r["correct"] == [rewards.answer_reward(t, a) for t, a in zip(r["responses"], truths)]
    assert r["accuracy"] == pytest.approx(3 / 9)
    assert r["pass@3"] == pytest.approx(2 / 3)
    assert r["answer_rate"] == pytest.approx(6 / 9)  # "no answer here" x3 has no final answer
    assert r["lengths"] == [2, 1, 1, 1, 1, 2, 2, 1, 1]
    assert r["length_mean"] == pytest.approx(12 / 9)
    assert r["length_std"] == pytest.approx(np.std(r["lengths"]))
    assert r["reflection_ratio"] == pytest.approx(2 / 9) and r["accuracy_reflective"] == pytest.approx(1 / 2)


# -----------------------------------------------------------------------------
# --compare and --plot on fake runs


def fake_report(acc, n=20):
    """accuracy_report's fields a comparison reads: the first round(acc * n) of n questions right."""
    correct = [1.0] * round(acc * n) + [0.0] * (n - round(acc * n))
    return {"n": n, "accuracy": acc, "chance": 0.25, "blind": 0.3, "correct": correct}


def write_run(path, name, algo, seed, acc_before, acc_after, offset, kl=True, junk=False):
    path.mkdir(parents=True)
    config = {"name": name, "algo": algo, "seed": seed, "lr": 1e-6, "out_dir": str(path)}
    split = {"start": fake_report(acc_before), "final": fake_report(acc_after)}
    path.joinpath("summary.json").write_text(json.dumps({"val": split, "test": split, "config": config}))
    with open(path / "metrics.jsonl", "w") as f:
        for step in range(20):
            row = {"step": step, "reward/answer": 0.4 + 0.01 * step + offset,
                   "reward/similarity": 0.2 + offset, "response/length": 30 + step}
            if kl:
                row["policy/kl"] = 0.001 * step
            if step % 5 == 4:
                row["eval/accuracy"] = acc_before + (acc_after - acc_before) * step / 19
            f.write(json.dumps(row) + "\n")
        if junk:  # a None, a NaN and a line cut short by a killed run: all left out
            f.write(json.dumps({"step": 20, "reward/answer": None, "reward/similarity": float("nan")}) + "\n")
            f.write('{"step": 21, "reward/ans')


def table_rows(text):
    """{first cell: [cells]} of a printed markdown table."""
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    header = rows[0]
    return {r[0]: dict(zip(header, r)) for r in rows[2:]}


@pytest.mark.parametrize("kl, size", [(True, (1350, 640)), (False, (900, 640))])
def test_compare_and_plot(tmp_path, capsys, kl, size):
    write_run(tmp_path / "ril-s0", "ril-s0", "ril", 0, 0.4, 0.6, 0.0, kl)
    write_run(tmp_path / "ril-s1", "ril-s1", "ril", 1, 0.5, 0.7, 0.1, kl)
    write_run(tmp_path / "drgrpo-s0", "drgrpo-s0", "drgrpo", 0, 0.4, 0.55, 0.05, kl, junk=True)
    png = tmp_path / "curves.png"
    runs = [str(tmp_path / r) for r in ("ril-s0", "drgrpo-s0", "ril-s1")]
    evaluate.main(["--compare", *runs, "--plot", str(png)])
    out, err = capsys.readouterr()
    assert "skipped 1 unreadable line" in err
    rows = table_rows(out)
    assert set(rows) == {"ril", "drgrpo"}
    ril, dr = rows["ril"], rows["drgrpo"]
    sd = statistics.stdev([0.4, 0.5])  # the same spread for before, after and max eval accuracy
    assert ril["seeds"] == "2" and dr["seeds"] == "1"
    assert ril["test start"] == f"0.450 ± {sd:.3f}" and ril["test final"] == f"0.650 ± {sd:.3f}"
    assert dr["test start"] == "0.400" and dr["test final"] == "0.550"
    assert ril["val final"] == ril["test final"]
    assert ril["test final - ril"] == "–"
    assert dr["test final - ril"].startswith("-0.100 [")  # 0.55 - (0.6 + 0.7) / 2
    assert "Test split: n=20, chance 0.250, blind baseline 0.300." in out
    best = [a + (b - a) * 19 / 19 for a, b in ((0.4, 0.6), (0.5, 0.7))]  # eval at step 19 is the best
    assert ril["max eval/accuracy"] == f"{statistics.fmean(best):.3f} ± {statistics.stdev(best):.3f}"
    final = [statistics.fmean(0.4 + 0.01 * s + o for s in range(10, 20)) for o in (0.0, 0.1)]  # last 10 steps
    assert ril["final reward/answer"] == f"{statistics.fmean(final):.3f} ± {statistics.stdev(final):.3f}"
    kl_mean = statistics.fmean(0.001 * s for s in range(10, 20))
    assert ril["final policy/kl"] == (f"{kl_mean:.3f} ± 0.000" if kl else "–")
    assert dr["final reward/similarity"] == "0.250"
    assert dr["final reward/answer"] == ril["final reward/answer"].split()[0]

    img = Image.open(png)
    assert img.format == "PNG" and img.size == size  # 3 or 2 panels per row, 2 rows (no KL panel: skipped)
    pixels = np.asarray(img.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert pixels.std() > 10 and len(colours) > 50  # not blank: lines and a band


# -----------------------------------------------------------------------------
# a real model: the tiny student through rollout.py

needs_rollout = pytest.mark.skipif(not (hasattr(rollout, "encode_prompts") and hasattr(rollout, "generate")),
                                   reason="rollout.py has no encode_prompts / generate yet")


@needs_rollout
def test_evaluate_model_on_tiny_student(tiny_student, embedded):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    model = AutoModelForImageTextToText.from_pretrained(tiny_student)
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    processor = AutoImageProcessor.from_pretrained(tiny_student)
    rows = load_jsonl(embedded / "test.jsonl")[:3]
    greedy = evaluate_model(model, tokenizer, processor, rows, max_new_tokens=6, batch_size=2)
    assert len(greedy["responses"]) == 3 and all(0 <= n <= 6 for n in greedy["lengths"])
    answers = [r["answer"] for r in rows]
    assert greedy["accuracy"] == pytest.approx(statistics.fmean(
        rewards.answer_reward(t, a) for t, a in zip(greedy["responses"], answers)))
    sampled = evaluate_model(model, tokenizer, processor, rows, temperature=1.0, num_samples=2,
                             max_new_tokens=6, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert len(sampled["responses"]) == 6 and 0.0 <= sampled["accuracy"] <= sampled["pass@2"] <= 1.0


@needs_rollout
def test_cli_writes_json(tiny_student, embedded, tmp_path, capsys):
    from discriminator import Discriminator
    Discriminator.from_student(tiny_student).save_pretrained(tmp_path / "disc")  # zero head: p_student = 0.5
    out = tmp_path / "eval.json"
    evaluate.main(["--model", str(tiny_student), "--data", str(embedded / "test.jsonl"), "--limit", "2",
                   "--k", "2", "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out),
                   "--discriminator", str(tmp_path / "disc")])
    assert "| greedy |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["n_questions"] == 2 and set(report["settings"]) == {"greedy", "pass@2 T=1.0", "T=0.6"}
    greedy = report["settings"]["greedy"]
    assert report["summary"]["pass@1 greedy"] == greedy["accuracy"] and len(greedy["responses"]) == 2
    assert len(report["settings"]["pass@2 T=1.0"]["responses"]) == 4
    assert greedy["teacher_like"] == 0.0  # undecided (p = 0.5) is not teacher-like: the r_sim rule p < 0.5
    for key in ("answer_rate", "length_mean", "length_std", "reflection_ratio", "accuracy_non_reflective"):
        assert key in greedy


def test_out_that_cannot_be_written_fails_before_any_model_loads(tmp_path):
    """--out under a regular file (unwritable even for root): a SystemExit naming it, before the model and the
    data (neither exists here, so loading either would raise something else)."""
    parent = tmp_path / "a-file"
    parent.write_text("")
    out = parent / "eval.json"
    argv = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"), "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert str(e.value).startswith(f"--out {out}: cannot write: "), e.value


def test_out_is_not_left_behind_empty_when_the_evaluation_fails(tmp_path):
    out = tmp_path / "eval.json"
    argv = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"), "--out", str(out)]
    with pytest.raises((OSError, ValueError, SystemExit)):  # the missing model
        evaluate.main(argv)
    assert not out.exists()


# -----------------------------------------------------------------------------
# numbers beside every accuracy: interval, chance, blind baseline, paired differences


def test_wilson_interval_against_known_values():
    """Wilson score intervals (z = 1.96) as published tables give them."""
    assert evaluate.wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert evaluate.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert evaluate.wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)


def test_blind_baseline_and_chance_equal_a_hand_count():
    """Blind: the training split's most common answer for the same text, else for the kind. Chance: one over
    the kind's distinct training answers."""
    row = lambda q, a, kind: {"question": q, "answer": a, "kind": kind}
    train = [row("How many red?", "1", "count"), row("How many red?", "1", "count"),
             row("How many red?", "2", "count"),
             row("How many blue?", "0", "count"), row("How many blue?", "3", "count"),
             row("How many blue?", "3", "count"),
             row("Red left of blue?", "yes", "left"), row("Red left of blue?", "no", "left"),
             row("Green left of red?", "no", "left")]
    rows = [row("How many red?", "1", "count"),       # guess 1: right
            row("How many red?", "2", "count"),       # guess 1: wrong
            row("How many blue?", "3", "count"),      # guess 3: right
            row("How many green?", "3", "count"),     # new text: the kind's most common, 1 (3 times): wrong
            row("Green left of red?", "yes", "left"),  # guess no: wrong
            row("Blue left of green?", "no", "left")]  # new text: the kind's most common, no: right
    assert blind_guesses(train, rows) == ["1", "1", "3", "1", "no", "no"]
    assert chance_levels(train, rows) == [1 / 4] * 4 + [1 / 2] * 2
    r = evaluate.accuracy_report([1, 1, 0, 0, 1, 1], rows, train)
    assert r["n"] == 6 and r["accuracy"] == pytest.approx(4 / 6) and r["blind"] == pytest.approx(3 / 6)
    assert r["chance"] == pytest.approx((4 / 4 + 2 / 2) / 6) and r["ci95"] == evaluate.wilson_interval(4, 6)
    assert r["per_kind"]["count"] == {"n": 4, "accuracy": 0.5, "ci95": evaluate.wilson_interval(2, 4),
                                      "chance": 0.25, "blind": 0.5,
                                      "blind_ci95": evaluate.wilson_interval(2, 4)}
    assert r["per_kind"]["left"]["blind"] == 0.5 and r["correct"] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert "0.667 [" in evaluate.format_report(r) and "blind 0.500" in evaluate.format_report(r)


def test_paired_bootstrap_tells_a_real_difference_from_noise():
    """Synthetic runs on 1,000 questions: b is a with 100 more right answers (significant); c differs from a
    on 30 questions, 15 each way (not significant). Several seeds resample too."""
    rng = np.random.default_rng(0)
    a = (rng.random(1000) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:100]] = 1.0
    diff, lo, hi = evaluate.paired_bootstrap([b], [a], n_boot=2000)
    assert diff == pytest.approx(0.1) and 0.07 < lo < 0.1 < hi < 0.13  # paired: far tighter than +-0.044
    assert "not significant" not in evaluate.format_difference(diff, lo, hi)
    c = a.copy()
    c[np.flatnonzero(a == 0)[:15]] = 1.0
    c[np.flatnonzero(a == 1)[:15]] = 0.0
    diff, lo, hi = evaluate.paired_bootstrap([c, a], [a, a, a], n_boot=2000)
    assert diff == 0.0 and lo < 0 < hi
    assert evaluate.format_difference(diff, lo, hi).endswith("not significant")
    with pytest.raises(ValueError):
        evaluate.paired_bootstrap([[1, 0]], [[1, 0, 1]])


def test_a_rerun_is_the_same_configuration():
    """A run resumed or started again (--resume, --overwrite), or the RL stage of a `--stage all` run, groups
    with its seeds; another lr does not."""
    base = {"name": "ril-s0", "seed": 0, "lr": 1e-6, "resume": False, "overwrite": False, "stage": "rl"}
    rerun = dict(base, name="ril-s1", seed=1, resume=True, overwrite=True, stage="all")
    assert evaluate.config_key(base) == evaluate.config_key(rerun)
    assert evaluate.config_key(base) != evaluate.config_key(dict(base, lr=1e-5))


@pytest.mark.parametrize("script", ["evaluate.py", "bench.py"])
def test_a_bad_data_file_is_named_with_its_line_before_any_model_loads(tmp_path, script):
    """A malformed row: the command exits with the file, the line and the problem, and no traceback. The model
    does not exist, so reaching it would fail differently."""
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"id": "a", "image": null, "question": "q?", "answer": "1"}\n{"id": "b", \n')
    args = {"evaluate.py": ["--model", str(tmp_path / "no-model"), "--data", str(bad)],
            "bench.py": ["--student", str(tmp_path / "no-model"), "--data", str(tmp_path)]}[script]
    p = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and f"error: {bad}:2: bad JSON" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
