"""ril.py end to end: bad configs fail early, 2 processes = 1 process, resume = straight run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import discriminator
import distributed
import ril

ROOT = Path(__file__).resolve().parents[1]


def run(args, nproc=1, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable]) + [str(ROOT / "ril.py"), *map(str, args)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.parametrize("argv, message", [
    (["--algo", "ppo"], "--algo must be one of"),
    (["--loss-agg", "sum"], "--loss-agg must be one of"),
    (["--group-size", "0"], "--group-size must be >= 1"),
    (["--algo", "grpo", "--group-size", "1"], "needs --group-size >= 2"),
    (["--answer-reward", "judge"], "needs --judge PATH"),
    (["--student", "/no/such/model"], "/no/such/model does not exist"),
    (["--similarity", "off", "--answer-reward", "off"], "leaves no reward"),
    (["--algo", "drgrpo", "--answer-reward", "off"], "leaves no reward"),
    (["--world", "blocks"], "--world must be one of"),
])
def test_bad_config_fails_before_any_work(argv, message):
    with pytest.raises(SystemExit) as e:
        ril.parse_config(argv)
    assert message in str(e.value)


def test_embedded_defaults_apply_only_without_student(tiny_student, embedded):
    assert ril.parse_config([]).lr == ril.EMBEDDED["lr"]
    assert ril.parse_config(["--test-data", "none"]).test_data == "none"  # tuning runs never read test
    assert ril.parse_config(["--lr", "3e-5"]).lr == 3e-5
    assert ril.parse_config([]).keep_gathered and not ril.parse_config(["--no-keep-gathered"]).keep_gathered
    marked, plain = ril.parse_config([]), ril.parse_config(["--world", "plain"])  # then the world's own
    assert (marked.world, marked.teachers, marked.beta, marked.steps, marked.max_new_tokens) == \
        ("marked", "methodical", 0.1, 150, 192)
    assert (plain.teachers, plain.beta, plain.steps, plain.max_new_tokens) == ("", 1.0, 100, 96)
    assert ril.parse_config(["--beta", "0.5", "--teachers", ""]).beta == 0.5  # a given flag wins
    assert ril.parse_config(["--teachers", ""]).teachers == ""                  # even an empty one
    cfg = ril.parse_config(["--student", str(tiny_student), "--data", str(embedded / "train.jsonl")])
    assert cfg.lr == 1e-6 and cfg.group_size == 4 and cfg.clip_eps == 0.2 and cfg.beta == 0.01
    assert cfg.teachers == "" and cfg.max_new_tokens == 1024 and cfg.sft_max_len == 1024


@pytest.fixture(scope="module")
def small_run(tiny_student, embedded, tmp_path_factory):
    """Common flags of a few tiny RL steps on a given student, and a discriminator pre-trained for them."""
    out = tmp_path_factory.mktemp("runs")
    common = ["--student", tiny_student, "--data", embedded / "train.jsonl", "--out-dir", out,
              "--batch-size", 4, "--group-size", 2, "--max-new-tokens", 96, "--max-disc-len", 192,
              "--lr", 1e-3, "--disc-lr", 1e-3, "--micro-batch", 8, "--sample-every", 0]
    run(common + ["--stage", "disc", "--name", "disc", "--disc-steps", 8, "--disc-questions", 8,
                  "--disc-samples", 1, "--disc-batch-size", 8])
    return common + ["--discriminator", out / "disc" / "discriminator"], out


def test_two_processes_equal_one(small_run):
    common, out = small_run
    args = common + ["--stage", "rl", "--steps", 2, "--save-every", 0,
                     "--temperature", 0,                                  # greedy: the same work
                     "--vision-lr-scale", 0.1]
    run(args + ["--name", "one"], nproc=1)
    run(args + ["--name", "two"], nproc=2)
    run(args + ["--name", "two-kept", "--keep-gathered"], nproc=2)  # FSDP2 without re-gathering in backward
    one = weights(out / "one" / "checkpoints" / "step-2" / "student")
    start = weights(common[1])
    assert any(not torch.equal(one[k], start[k]) for k in one)  # the steps changed the weights
    for name in ("two", "two-kept"):
        two = weights(out / name / "checkpoints" / "step-2" / "student")
        for k in one:
            torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4, msg=f"{name}: {k}")


def test_resume_equals_straight_run(small_run):
    common, out = small_run
    args = common + ["--stage", "rl", "--save-every", 2]  # sampled (T = 1): the RNG state must resume too
    run(args + ["--name", "straight", "--steps", 4])
    run(args + ["--name", "resumed", "--steps", 2])
    run(args + ["--name", "resumed", "--steps", 4, "--resume"])
    a, b = (weights(out / n / "checkpoints" / "step-4" / "student") for n in ("straight", "resumed"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)
    rows = (out / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [int(r.split('"step": ')[1].split(",")[0]) for r in rows] == [1, 2, 3, 4]


def test_gradient_checkpointing_gives_the_same_update(small_run):
    common, out = small_run
    loaded = distributed.load_pretrained(str(common[1]), torch.device("cpu"), checkpointing=True)[0]
    assert loaded.is_activation_checkpointing
    args = common + ["--stage", "rl", "--steps", 1, "--save-every", 0, "--temperature", 0]
    run(args + ["--name", "stored"])
    run(args + ["--name", "recomputed", "--grad-checkpointing"])
    a, b = (weights(out / n / "checkpoints" / "step-1" / "student") for n in ("stored", "recomputed"))
    assert any(not torch.equal(a[k], weights(common[1])[k]) for k in a)
    for k in a:  # checkpointing runs one prompt row per response (HF drops the cache): sums in another order,
        # and Adam's first step (size lr = 1e-3 on every element) turns float noise in a near-zero gradient
        # into ~1e-6: 1% of a step still catches any real difference
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("group", [1, 4])
def test_length_batches_cover_every_row_once_in_whole_groups(group):
    lengths = torch.tensor([3, 9, 1, 0, 7, 7, 2, 5, 8, 4, 6, 1])                # 12 responses, 3 or 12 groups
    mask = torch.arange(10)[None] < lengths[:, None]                          # [12, 10]
    batches = distributed.length_batches(mask, 5, group)
    rows = torch.cat([r for r, _ in batches])
    assert sorted(rows.tolist()) == list(range(12))
    for r, cols in batches:
        assert len(r) == max(1, 5 // group) * group or r is batches[-1][0]
        g = r.view(-1, group)                                                 # a group's rows stay together:
        assert (g % group == 0)[:, 0].all() and (g - g[:, :1] == torch.arange(group)).all()
        assert cols.stop == max(1, int(lengths[r].max())) and not mask[r, cols.stop:].any()
    longest = [int(lengths[r].max()) for r, _ in batches]
    assert longest == sorted(longest)                                         # similar lengths together


def test_student_optimizer_splits_vision_and_language(tiny_student, tiny_internvl):
    """Every parameter in exactly one group; the vision tower and projector (and only they) at lr * scale."""
    for path, vision_prefixes in ((tiny_student, ("model.visual.",)),
                                  (tiny_internvl, ("model.vision_tower.", "model.multi_modal_projector."))):
        model = distributed.load_pretrained(str(path), torch.device("cpu"))[0]
        opt = distributed.student_optimizer(model, 1e-3, 0.1)
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert sum(len(g["params"]) for g in opt.param_groups) == len(lr_of) == len(list(model.parameters()))
        for name, p in model.named_parameters():
            assert lr_of[id(p)] == pytest.approx(1e-4 if name.startswith(vision_prefixes) else 1e-3), name


def test_short_run_raises_the_mean_reward(small_run):
    """A few RIL steps against a fixed discriminator raise the student's reward (here: looking like a teacher,
    the part a random tiny student can earn); the answer part stays in the reward."""
    common, out = small_run
    run(common + ["--stage", "rl", "--name", "learn", "--steps", 12, "--save-every", 0, "--freeze-disc",
                  "--lr", 3e-3, "--group-size", 4])
    rows = [json.loads(line) for line in (out / "learn" / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(r["reward/total"] for r in part) / len(part) for part in (rows[:4], rows[-4:]))
    print(f"mean student reward: first 4 steps {first:.3f}, last 4 {last:.3f}")
    assert last > first + 0.2


def test_sft_visits_every_row_once_per_epoch(tiny_student, embedded, tmp_path, monkeypatch, one_thread):
    """25 steps of 8 rows over the 200 SFT rows: every question is trained on exactly once."""
    import rollout
    seen, encode = [], rollout.encode_prompts
    monkeypatch.setattr(rollout, "encode_prompts", lambda tok, proc, qs, *a, **kw: seen.extend(qs) or encode(
        tok, proc, qs, *a, **kw))
    cfg = ril.parse_config(["--student", str(tiny_student), "--sft-data", str(embedded / "sft.jsonl"),
                            "--stage", "sft", "--sft-steps", "25", "--sft-batch-size", "8",
                            "--sft-micro-batch", "3"])
    ril.sft(cfg, str(tiny_student), tmp_path / "sft", tmp_path / "sft-stage", torch.device("cpu"), rank=0)
    rows = [json.loads(line) for line in open(embedded / "sft.jsonl")]
    assert sorted(seen) == sorted(r["question"] for r in rows)


def test_saved_student_generates_like_the_sampler(tiny_student, embedded, tmp_path, batch, one_thread):
    """A student saved by ril.py carries a generation_config.json that makes plain `from_pretrained` +
    `generate` behave like rollout.generate: placeholders suppressed, EOS and pad set, the run's sampling
    settings and response cap. Greedy transformers output (nothing passed but do_sample=False) equals
    rollout's greedy output."""
    import rollout
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    cfg = ril.parse_config(["--student", str(tiny_student), "--sft-data", str(embedded / "sft.jsonl"),
                            "--stage", "sft", "--sft-steps", "2", "--sft-batch-size", "4",
                            "--max-new-tokens", "16"])
    ril.sft(cfg, str(tiny_student), tmp_path / "sft", tmp_path / "sft-stage", torch.device("cpu"), rank=0)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "sft").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    ip = AutoImageProcessor.from_pretrained(tmp_path / "sft")
    gc = model.generation_config
    assert gc.suppress_tokens == rollout.placeholder_ids(model) and len(gc.suppress_tokens) == 2
    assert gc.pad_token_id == tok.pad_token_id and tok.convert_tokens_to_ids("<|im_end|>") in gc.eos_token_id
    assert (gc.do_sample, gc.temperature, gc.top_p, gc.top_k, gc.repetition_penalty, gc.max_new_tokens) == \
        (True, 1.0, 0.95, 50, 1.05, 16)
    p = rollout.encode_prompts(tok, ip, *batch)
    ours = rollout.generate(model, p, max_new_tokens=16, temperature=0, repetition_penalty=1.05)
    theirs = model.generate(input_ids=p["input_ids"], attention_mask=p["attention_mask"],
                            mm_token_type_ids=p["mm_token_type_ids"], do_sample=False,
                            **rollout.vision_inputs(p))[:, p["input_ids"].shape[1]:]
    for row, mask, hf in zip(ours.response_ids, ours.response_mask, theirs):
        n = int(mask.sum())
        assert torch.equal(row[:n], hf[:n]) and (hf[n:] == gc.pad_token_id).all(), (row, hf)


def test_no_update_moves_mass_onto_tokens_the_sampler_never_draws(tiny_student, batch, one_thread,
                                                                   monkeypatch):
    """Eq. 2 with every sample's advantage strongly negative pushes down what was sampled. Scored over the
    sampler's support, the placeholders (which it never draws) get no gradient: the LM head's rows for them
    stay bit for bit. Scored over the whole vocabulary (placeholder_ids patched to nothing after sampling),
    the same steps move those rows: the test can tell the two apart."""
    import rollout
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_student)
    ip = AutoImageProcessor.from_pretrained(tiny_student)
    banned = None

    def steps(score_whole_vocabulary):
        model = AutoModelForImageTextToText.from_pretrained(tiny_student)
        nonlocal banned
        banned = rollout.placeholder_ids(model)
        p = rollout.encode_prompts(tok, ip, *batch)
        out = rollout.generate(model, p, max_new_tokens=8, num_samples=2,
                               generator=torch.Generator().manual_seed(0))
        if score_whole_vocabulary:
            monkeypatch.setattr(rollout, "placeholder_ids", lambda model: [])
        before = model.lm_head.weight[banned].detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        for _ in range(3):
            logp, ent = rollout.response_logprobs(model, p, out.response_ids, out.response_mask,
                                                  return_entropy=True)
            adv = torch.full((logp.shape[0],), -5.0)
            loss, _ = ril.policy_loss(logp, logp.detach(), None, adv, out.response_mask, beta=0.0)
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert torch.isfinite(ent).all() and torch.isfinite(logp).all()
        return model.lm_head.weight[banned].detach(), before

    after, before = steps(score_whole_vocabulary=False)
    assert banned and torch.equal(after, before)
    after, before = steps(score_whole_vocabulary=True)
    assert not torch.equal(after, before)


def test_stale_discriminator_is_detected(small_run, tiny_student, tmp_path):
    """A discriminator records the student and teachers it was pre-trained on; another student (a new SFT
    run) or other teachers are caught, and a given --discriminator that does not fit stops the run with the
    reason."""
    common, out = small_run
    disc = common[common.index("--discriminator") + 1]
    origin = json.loads((Path(disc) / discriminator.ORIGIN).read_text())
    assert origin == {"student": discriminator.fingerprint(str(tiny_student)),
                      "teachers": ["methodical", "reflective"]}
    assert discriminator.origin_mismatch(disc, str(tiny_student), ["reflective", "methodical"]) is None
    assert "teachers" in discriminator.origin_mismatch(disc, str(tiny_student), ["methodical"])
    new_sft = tmp_path / "new-sft"  # the same files with one weight changed: another student
    new_sft.mkdir()
    for f in Path(tiny_student).iterdir():
        (new_sft / f.name).write_bytes(f.read_bytes())
    w = weights(new_sft)
    w["lm_head.weight"][0, 0] += 1.0
    from safetensors.torch import save_file
    save_file(w, str(new_sft / "model.safetensors"), metadata={"format": "pt"})
    both = ["methodical", "reflective"]
    assert "another student" in discriminator.origin_mismatch(disc, str(new_sft), both)
    args = [a if a != tiny_student else new_sft for a in common]
    p = run(args + ["--stage", "rl", "--name", "stale", "--steps", 1], check=False)
    assert p.returncode != 0 and "another student" in p.stderr and "--stage disc" in p.stderr


def test_single_teacher_discriminator_sees_only_that_teacher(tiny_student, embedded, tmp_path, monkeypatch,
                                                             one_thread):
    """--teachers methodical: the discriminator is pre-trained on that teacher's cached responses only (all 4
    per question) and records it."""
    seen = {"teacher": []}
    draw = discriminator.pretrain_batch

    def counting_draw(n_student, n_teacher, *args):
        seen["n_teacher"] = n_teacher
        return draw(n_student, n_teacher, *args)

    def fake_update(disc, opt, tok, student_texts, teacher_texts, *args, **kw):
        seen["teacher"] += teacher_texts
        return {"skipped": 0, "loss": 0.0, "accuracy": 0.0}
    monkeypatch.setattr(discriminator, "pretrain_batch", counting_draw)
    monkeypatch.setattr(discriminator, "update", fake_update)
    cfg = ril.parse_config(["--student", str(tiny_student), "--data", str(embedded / "train.jsonl"),
                            "--teachers", "methodical", "--disc-questions", "6", "--disc-samples", "1",
                            "--max-new-tokens", "8", "--disc-steps", "3", "--disc-batch-size", "8"])
    ril.pretrain_discriminator(cfg, str(tiny_student), tmp_path / "disc", tmp_path / "disc-stage",
                               torch.device("cpu"), rank=0)
    assert seen["n_teacher"] == 6 * 4 and len(seen["teacher"]) == 3 * 4
    assert all(t.startswith(("Let me look", "First I list", "Step 1")) for t in seen["teacher"])  # methodical
    assert json.loads((tmp_path / "disc" / discriminator.ORIGIN).read_text())["teachers"] == ["methodical"]


def test_a_used_run_folder_is_not_overwritten(tiny_student, embedded, tmp_path):
    """A fresh run in a folder that holds a run refuses (metrics.jsonl would be truncated); an unwritable
    --out-dir fails before any work."""
    (tmp_path / "ril").mkdir()
    (tmp_path / "ril" / "metrics.jsonl").write_text('{"step": 1}\n')
    args = ["--student", str(tiny_student), "--data", str(embedded / "train.jsonl"),
            "--out-dir", str(tmp_path), "--algo", "drgrpo", "--stage", "rl"]
    with pytest.raises(SystemExit, match="already holds a run: --resume continues it, --overwrite"):
        ril.main(args)
    assert (tmp_path / "ril" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit, match="cannot write the run folder"):
        ril.main(args + ["--out-dir", str(tmp_path / "file")])


def test_a_bad_data_file_is_named_without_a_traceback(tiny_student, embedded, tmp_path):
    """ril.py on a malformed dataset exits non-zero with the file, the line and the problem, and nothing
    else: no traceback to read through."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q0", "question": \n')
    p = run(["--student", tiny_student, "--data", bad, "--out-dir", tmp_path, "--algo", "drgrpo",
             "--stage", "rl"], check=False)
    assert p.returncode != 0
    assert f"error: {bad}:1: bad JSON" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_checkpoints_are_pruned_and_resume_checks_the_process_count(tmp_path):
    """--keep-checkpoints N keeps the N newest; a checkpoint saved by another number of processes is refused
    with the count to use; a torn last metrics line is dropped on resume."""
    gen = torch.Generator()
    for step in range(1, 5):
        distributed.save_checkpoint(tmp_path, step, {}, {"skipped": 0}, gen, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-3", "step-4"]
    latest = distributed.latest_checkpoint(tmp_path)
    assert latest.name == "step-4" and distributed.load_checkpoint(latest, {}, gen)["step"] == 4
    (latest / "rng-rank1.pt").write_bytes((latest / "rng-rank0.pt").read_bytes())
    with pytest.raises(SystemExit, match="saved by 2 processes: resume it with --nproc_per_node=2"):
        distributed.load_checkpoint(latest, {}, gen)
    assert distributed.metrics_step('{"step": 3, "x": 1}') == 3
    assert distributed.metrics_step('{"step": 4, "rew') == float("inf")


def test_a_run_whose_updates_keep_failing_stops(tiny_student, embedded, tmp_path, monkeypatch, one_thread):
    """--max-skipped K: K policy updates in a row skipped as non-finite stop the run with a non-zero exit,
    before the stopping step writes anything (skipped updates never reach the weights)."""
    def failing_step(cfg, step, batch, m, names, gen):
        return {"policy/skipped": 1, "reward/total": 0.0, "response/length": 0.0,
                "_sample": ("q", "a", "r", 0)}
    monkeypatch.setattr(ril, "rl_step", failing_step)
    args = ["--student", str(tiny_student), "--data", str(embedded / "train.jsonl"),
            "--out-dir", str(tmp_path), "--algo", "drgrpo", "--stage", "rl", "--steps", "10",
            "--max-skipped", "3", "--save-every", "1",
            "--beta", "0", "--sample-every", "0"]
    with pytest.raises(SystemExit, match="3 updates in a row had a non-finite") as e:
        ril.main(args)
    assert e.value.code != 0 and not (tmp_path / "ril" / "checkpoints" / "step-3").exists()


def test_a_folder_that_is_not_a_model_is_never_replaced(tmp_path):
    """--discriminator naming a folder that holds no discriminator fails before any work, and publish refuses
    to replace a folder that holds something other than a model: its files stay."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="holds no discriminator"):
        ril.parse_config(["--discriminator", str(mine)])
    with pytest.raises(SystemExit, match="holds no model"):
        distributed.publish(torch.nn.Linear(1, 1), mine)
    assert (mine / "notes.txt").read_text() == "keep me"
