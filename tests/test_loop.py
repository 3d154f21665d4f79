"""The step loop every stage shares (distributed.Loop, optimizer_step): skipped updates, stops, resumes."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed
import ril


def test_loop_counts_skips_stops_and_resumes(tmp_path):
    """Updates skipped K times in a row stop the run before the failing step is saved; a resumed loop starts
    at the last checkpoint and keeps the metrics rows up to it."""
    gen = torch.Generator()
    loop = distributed.Loop(tmp_path, 10, {}, gen, None, save_every=2, keep=0, max_skipped=3)
    with pytest.raises(SystemExit, match="step 6: 3 updates in a row had a non-finite") as e:
        for step in loop:
            loop.done(skipped=int(step >= 3), metrics={"x": step})
    assert e.value.code != 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    resumed = distributed.Loop(tmp_path, 10, {}, gen, distributed.latest_checkpoint(tmp_path), save_every=2,
                               keep=0, max_skipped=3)
    assert resumed.progress == distributed.Progress(step=4, skipped=1, skipped_in_a_row=1)
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_optimizer_step_skips_non_finite_and_shows_a_wrecking_update():
    """A NaN loss leaves the weights bit for bit; a finite step at a huge learning rate is reported as an
    update many times the weights' size, a sane one as a small fraction."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    before = model.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e6, weight_decay=0.0)
    model(torch.randn(4, 8)).sum().backward()
    stats = distributed.optimizer_step(model, opt, 1.0, float("nan"))
    assert stats["skipped"] == 1 and stats["update"] == 0.0 and torch.equal(model.weight, before)
    assert all(p.grad is None for p in model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    assert distributed.optimizer_step(model, opt, 1.0, 1.0)["update"] > 1e4
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model(torch.randn(4, 8)).sum().backward()
    assert 0 < distributed.optimizer_step(model, opt, 1.0, 1.0)["update"] < 1e-2


def stop_at(call: int):
    """A stop_requested that answers True from its `call`-th call on."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= call
    return stop


def test_sft_stopped_by_sigterm_resumes_to_the_straight_result(tiny_student, embedded, tmp_path, monkeypatch,
                                                               one_thread):
    """SIGTERM during SFT: the step is finished and saved, the process exits 0 without publishing a student;
    --resume then ends with the weights of a run never stopped."""
    cfg = ril.parse_config(["--student", str(tiny_student), "--sft-data", str(embedded / "sft.jsonl"),
                            "--stage", "sft", "--sft-steps", "4", "--sft-batch-size", "4",
                            "--max-new-tokens", "16", "--save-every", "0"])
    cpu = torch.device("cpu")
    ril.sft(cfg, str(tiny_student), tmp_path / "straight", tmp_path / "straight-stage", cpu, rank=0)
    monkeypatch.setattr(distributed, "stop_requested", stop_at(2))               # after step 2
    with pytest.raises(SystemExit) as e:
        ril.sft(cfg, str(tiny_student), tmp_path / "stopped", tmp_path / "stopped-stage", cpu, rank=0)
    assert e.value.code == 0 and not (tmp_path / "stopped").exists()
    assert distributed.latest_checkpoint(tmp_path / "stopped-stage").name == "step-2"
    monkeypatch.setattr(distributed, "stop_requested", lambda: False)
    ril.sft(dataclasses.replace(cfg, resume=True), str(tiny_student), tmp_path / "stopped",
            tmp_path / "stopped-stage", cpu, rank=0)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("straight", "stopped"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)
    rows = [json.loads(line) for line in open(tmp_path / "stopped-stage" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["update"] > 0 for r in rows)


def test_rl_stop_inside_a_step_abandons_it_and_resumes_exactly(tiny_student, embedded, tmp_path, monkeypatch,
                                                                 one_thread):
    """A stop requested during a step's rollout abandons the step (no weight changed, the sampling RNG put
    back), saves the step before and exits 0; --resume then matches a run never stopped (sampled, T = 1)."""
    args = ["--student", str(tiny_student), "--data", str(embedded / "train.jsonl"),
            "--out-dir", str(tmp_path), "--algo", "drgrpo", "--stage", "rl", "--steps", "3",
            "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "16", "--save-every", "0",
            "--beta", "0", "--sample-every", "0", "--lr", "1e-3"]
    ril.main(args + ["--name", "straight"])
    monkeypatch.setattr(distributed, "stop_requested", stop_at(3))  # step 1: 2 checks; step 2's first: stop
    with pytest.raises(SystemExit) as e:
        ril.main(args + ["--name", "stopped"])
    assert e.value.code == 0 and distributed.latest_checkpoint(tmp_path / "stopped").name == "step-1"
    monkeypatch.setattr(distributed, "stop_requested", lambda: False)
    ril.main(args + ["--name", "stopped", "--resume"])
    a, b = (load_file(str(tmp_path / n / "checkpoints" / "step-3" / "student" / "model.safetensors"))
            for n in ("straight", "stopped"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)


def test_a_worker_whose_launcher_died_stops(monkeypatch):
    """Under torchrun a worker re-parented away from its agent (the agent was killed) asks to stop."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert not distributed.launcher_gone()
    monkeypatch.setattr(distributed, "_PARENT", -1)
    assert distributed.launcher_gone() and distributed.stop_requested()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert not distributed.launcher_gone()  # plain `python ril.py`: no agent to lose


TEARDOWN_SCRIPT = '''
import gc, json, sys
import torch
from torch.distributed.fsdp import fully_shard
import distributed

def stage():  # a stage's sharded model, left behind as reference cycles when the stage returns
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model(torch.ones(2, 4)).sum().backward()

gc.disable()  # as if the collector had not run since: only teardown's own collection frees the model
rank, world, device = distributed.setup()
stage()
distributed.teardown()
left = sum(type(o).__name__ == "FSDPState" for o in gc.get_objects())
json.dump(left, open(f"{sys.argv[1]}/left-{rank}.json", "w"))
'''


def test_teardown_frees_the_sharded_models_before_the_process_group_goes(tmp_path):
    """Under torchrun (2 gloo ranks) a stage's FSDP2 model outlives the stage as reference cycles; teardown
    collects it while the group is alive, so nothing of it is left for the interpreter's shutdown."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [json.load(open(tmp_path / f"left-{r}.json")) for r in (0, 1)] == [0, 0]
