"""data/teacher_cache.py: N responses per question per teacher from real (tiny) VLM checkpoints of two
families, resumed after a crash or a kill without redoing or duplicating anything, equal to an uninterrupted
run; the student's own samples (--field students) feed ril.py's discriminator pre-training."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rollout
from data import teacher_cache
from data.dataset import load_jsonl
from tests.test_ril import run

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
GENERATE = rollout.generate


@pytest.fixture
def questions(embedded, tmp_path):
    """10 held-out questions (no teacher cache), one of them text-only, in a file of their own folder."""
    rows = [json.loads(line) for line in open(embedded / "val.jsonl")][:10]
    for r in rows:
        r["image"] = os.path.relpath(embedded / r["image"], tmp_path)
    rows[3]["image"] = None
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def counting(monkeypatch, crash_after=None):
    """Count rollout.generate calls; raise on call number crash_after + 1 (a crash in the middle of a run)."""
    calls = []

    def generate(*a, **kw):
        if crash_after is not None and len(calls) == crash_after:
            raise RuntimeError("simulated crash")
        calls.append(1)
        return GENERATE(*a, **kw)
    monkeypatch.setattr(rollout, "generate", generate)
    return calls


def test_fills_n_per_teacher_and_resumes_after_a_crash(questions, tiny_qwen2vl, tiny_internvl, tmp_path,
                                                        monkeypatch):
    args = ["--data", questions, "--teacher", f"qwen2vl={tiny_qwen2vl}",
            "--teacher", f"internvl={tiny_internvl}", "-n", 3, "--batch-size", 4, "--max-new-tokens", 8]
    args = [str(a) for a in args]
    straight = tmp_path / "straight.jsonl"
    teacher_cache.main(args + ["--out", str(straight)])

    resumed = tmp_path / "sub" / "resumed.jsonl"                  # another folder: image paths are rewritten
    resumed.parent.mkdir()
    journal = resumed.with_name(resumed.name + ".journal")
    counting(monkeypatch, crash_after=4)                          # qwen2vl's 3 batches, internvl's 1, crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        teacher_cache.main(args + ["--out", str(resumed)])
    assert not resumed.exists() and len(journal.read_text().splitlines()) == 4
    with open(journal, "a") as f:
        f.write('{"field": "teachers", "name": "internvl", "respo')  # a line cut off by the crash
    calls = counting(monkeypatch)
    teacher_cache.main(args + ["--out", str(resumed)])
    assert len(calls) == 2 and not journal.exists()              # only internvl's last two batches were run

    rows = load_jsonl(resumed)                                   # valid, images found from the new folder
    assert len(rows) == 10 and rows[3]["image"] is None
    for r in rows:
        assert set(r["teachers"]) == {"qwen2vl", "internvl"}
        assert all(len(v) == 3 for v in r["teachers"].values())
    assert [json.loads(line)["teachers"] for line in open(resumed)] == \
        [json.loads(line)["teachers"] for line in open(straight)]  # = the run that was never interrupted
    # sampled, not greedy
    assert not all(r["teachers"]["qwen2vl"][0] == r["teachers"]["qwen2vl"][1] for r in rows)

    before = resumed.read_text()
    calls = counting(monkeypatch)
    teacher_cache.main(args + ["--out", str(resumed)])           # finished: nothing is redone
    assert calls == [] and resumed.read_text() == before


def test_a_killed_run_resumes_where_it_stopped(questions, tiny_qwen2vl, tmp_path, monkeypatch):
    out = tmp_path / "cache.jsonl"
    journal = out.with_name(out.name + ".journal")
    args = ["--data", str(questions), "--out", str(out), "--teacher", f"t={tiny_qwen2vl}", "-n", "2",
            "--batch-size", "1", "--max-new-tokens", "16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "data.teacher_cache", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (journal.exists() and journal.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run ended before it was killed"
    done = len(teacher_cache.read_journal(journal))
    calls = counting(monkeypatch)
    teacher_cache.main(args)
    assert 2 <= done < 10 and len(calls) == 10 - done
    assert all(len(r["teachers"]["t"]) == 2 for r in load_jsonl(out))


def test_student_samples_top_up_and_pretrain_the_discriminator(embedded, tiny_student, tmp_path):
    """--field students: a row holding one sample gets two more (the first kept); ril.py --stage disc then
    trains D on these cached samples instead of sampling the student."""
    rows = [json.loads(line) for line in open(embedded / "train.jsonl")][:8]
    for r in rows:
        r["image"] = str(embedded / r["image"])
    rows[0]["students"] = {"tiny": ["an old sample"]}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher_cache.main(["--data", str(data), "--field", "students", "--teacher", f"tiny={tiny_student}",
                        "-n", "3", "--max-new-tokens", "8"])
    cached = load_jsonl(data)
    assert all(len(r["students"]["tiny"]) == 3 for r in cached)
    assert cached[0]["students"]["tiny"][0] == "an old sample"
    # the teachers kept as they were
    assert all(r["teachers"] == json.loads(json.dumps(o["teachers"])) for r, o in zip(cached, rows))
    p = run(["--student", tiny_student, "--data", data, "--stage", "disc", "--out-dir", tmp_path,
             "--name", "d", "--disc-steps", 1, "--disc-questions", 8, "--disc-batch-size", 4,
             "--max-disc-len", 192])
    assert "on 24 cached student responses" in p.stdout
    assert (tmp_path / "d" / "discriminator" / "discriminator_head.safetensors").exists()
