"""explain.py: one RIL step on the tiny student, every number consistent with Algorithm 2."""
import re

import pytest

import explain
from discriminator import Discriminator


def test_one_step_is_shown_with_consistent_numbers(tiny_student, embedded, tmp_path, one_thread):
    Discriminator.from_student(tiny_student).save_pretrained(tmp_path / "disc")
    out = tmp_path / "one-step.md"
    rows = explain.main(["--student", str(tiny_student), "--data", str(embedded / "train.jsonl"),
                         "--discriminator", str(tmp_path / "disc"), "--group-size", "2",
                         "--max-new-tokens", "96",
                         "--max-disc-len", "192", "--lr", "1e-3", "--disc-lr", "1e-3", "--out", str(out)])
    assert [r["who"] for r in rows] == ["student", "student", "teacher", "teacher"]  # G = 2 of each, in order
    assert sum(r["A"] for r in rows) == pytest.approx(0, abs=1e-6)                   # A = R - mean(R)
    mean_r = sum(r["R"] for r in rows) / 4
    for r in rows:
        assert r["R"] == r["r_sim"] + r["r_ans"] and r["A"] == pytest.approx(r["R"] - mean_r)
        assert r["r_sim"] == float(r["D"] < 0.5) and r["kl_share"] >= 0
    assert any(r["r_ans"] == 1 for r in rows if r["who"] == "teacher")  # the teachers answer right
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert text.startswith("# One RIL step") and len(table) == 2 + 4                 # header, rule, 2G rows
    assert "--group-size 2" in text


def test_without_student_it_reads_the_chosen_worlds_checkpoints(tmp_path, monkeypatch, one_thread):
    """No --student: the SFT student and discriminator of the --world's checkpoint folder, asked for by the
    command that builds them when missing (the default world needs no --world)."""
    monkeypatch.setattr(explain, "world_dirs", lambda world: (tmp_path / f"data-{world}", tmp_path / world))
    missing = f"{tmp_path / 'plain' / 'tiny-sft'} is missing: run "
    with pytest.raises(SystemExit, match=re.escape(missing + "`torchrun --nproc_per_node=2 ril.py --stage "
                                                   "sft --world plain` first")):
        explain.main(["--world", "plain", "--out", str(tmp_path / "x.md")])
    # the marked world (the default): the discriminator ril.py pre-trains for its teachers, and its command
    (tmp_path / "marked" / "tiny-sft").mkdir(parents=True)
    (tmp_path / "marked" / "tiny-sft" / "config.json").write_text("{}")
    missing = f"{tmp_path / 'marked' / 'tiny-disc-methodical'} is missing: run "
    with pytest.raises(SystemExit, match=re.escape(missing + "`torchrun --nproc_per_node=2 ril.py --stage "
                                                   "disc --teachers methodical` first")):
        explain.main(["--out", str(tmp_path / "x.md")])
