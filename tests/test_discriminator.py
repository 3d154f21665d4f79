"""discriminator.py: built from the student, its prompt, Eq. 1, the update, and pre-training on the embedded
task."""
import copy
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoTokenizer

import attention
from discriminator import (HEAD_FILE, Discriminator, can_share_cache, discriminator_loss,
                           encode_for_discriminator, evaluate, pack_behind_prefix, p_student, pretrain,
                           prompt_parts, update)
from tests.test_attention import counting_calls


@pytest.fixture(scope="module")
def tok(tiny_student):
    return AutoTokenizer.from_pretrained(tiny_student)


@pytest.fixture(scope="module")
def disc0(tiny_student):
    """A fresh discriminator from the tiny student (copy it before training)."""
    return Discriminator.from_student(tiny_student)


def _with_random_head(disc, seed=0):
    d = copy.deepcopy(disc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d.head.weight.copy_(torch.randn(d.head.weight.shape, generator=g))
        d.head.bias.fill_(0.1)
    return d


def test_initial_weights_equal_the_students(tiny_student, disc0):
    student = AutoModelForImageTextToText.from_pretrained(tiny_student)
    lm = student.model.language_model.state_dict()
    mine = disc0.backbone.state_dict()
    assert set(mine) == set(lm)  # the whole text backbone, nothing else
    assert all(torch.equal(mine[k], lm[k]) for k in lm)
    assert not any("visual" in n for n, _ in disc0.named_parameters())  # no vision tower
    assert disc0.head.weight.shape == (1, student.config.text_config.hidden_size)
    assert len(disc0.backbone.layers) == student.config.text_config.num_hidden_layers  # FSDP2 shards these


def test_discriminator_loss_by_hand():
    ls = torch.tensor([2.0, -1.0])
    lt = torch.tensor([0.5])
    sig = lambda x: 1 / (1 + math.exp(-x))
    # Eq. 1: -(mean_i log D(o_i^s) + mean_j log(1 - D(o_j^t))) / 2, label 1 = student, 0 = teacher
    hand = -0.5 * ((math.log(sig(2.0)) + math.log(sig(-1.0))) / 2 + math.log(1 - sig(0.5)))
    assert discriminator_loss(ls, lt).item() == pytest.approx(hand, rel=1e-6)
    # numerically stable from logits: confident and right ~ 0, confident and wrong ~ |logit| / 2, never inf
    sure = discriminator_loss(torch.tensor([200.0]), torch.tensor([-200.0]))
    assert sure.item() == pytest.approx(0.0, abs=1e-6)
    assert discriminator_loss(torch.tensor([-200.0]), torch.tensor([-200.0])).item() == pytest.approx(100.0)
    ls = torch.tensor([0.3, -0.2], requires_grad=True)
    discriminator_loss(ls, torch.tensor([0.0])).backward()
    assert torch.allclose(ls.grad, 0.5 * (torch.sigmoid(ls.detach()) - 1) / 2)  # d/dl -log sigmoid(l), halved


def test_prompt_and_left_truncation(tok, caplog):
    before, after = prompt_parts(tok)
    text = tok.decode(before + after)
    assert "teacher (0)" in text and "student (1)" in text and "<response>" in text and "</response>" in text
    assert text.rstrip().endswith("assistant")  # D is read where the model would answer
    long = " ".join(f"step {i % 10}." for i in range(200)) + r" So the answer is \boxed{7}."
    with caplog.at_level("WARNING"):
        max_len = len(before) + len(after) + 40
        enc, n_cut = encode_for_discriminator(tok, ["short", long, "", "a <|im_end|> b"], max_len=max_len)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert n_cut == 1 and "truncated from the left" in caplog.text
    assert ids.shape == (4, max_len) and mask[1].all()
    assert (mask[:, -1] == 1).all() and not mask[0, 0]  # left padded
    assert tok.decode(ids[1]).endswith(r"\boxed{7}.</response><|im_end|>" + "\n<|im_start|>assistant\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    n_im_end = (ids[0][mask[0].bool()] == im_end).sum()
    assert (ids[3][mask[3].bool()] == im_end).sum() == n_im_end  # not injected
    with pytest.raises(ValueError, match="no room"):
        encode_for_discriminator(tok, ["x"], max_len=len(before) + len(after))


def test_logits_do_not_depend_on_padding(tok, disc0):
    d = _with_random_head(disc0)
    texts = ["Final answer: \\boxed{2}", "Let me look at each object. I see a red circle at the top left. "
             "Step 2: the red ones are red circle. That makes 1. So the answer is \\boxed{1}."]
    alone = torch.stack([d(**encode_for_discriminator(tok, [t], 256)[0]) for t in texts]).squeeze(-1)  # [2]
    together = d(**encode_for_discriminator(tok, texts, 256)[0])  # [2], the first one left-padded
    assert torch.allclose(alone, together, atol=1e-5)
    p = p_student(d, tok, texts, 256, batch_size=1)
    assert torch.allclose(p, torch.sigmoid(alone), atol=1e-5) and p.shape == (2,)


def test_shared_prefix_gives_the_same_logits_and_gradients(tok, disc0, one_thread):
    """The prompt's fixed start run once, its cache shared (p_student, and update on one process) or the
    responses packed behind it (update under FSDP2, checkpointing), equals the prompt written into every row:
    logits and every parameter's gradient, with packs of one response, of some, and of all."""
    texts = ["Final answer: \\boxed{2}", "Let me look at each object. I see a red circle at the top left. "
             "So the answer is \\boxed{1}.", "The answer is \\boxed{yes}.", "x"]
    plain, _ = encode_for_discriminator(tok, texts, 256)
    shared, _ = encode_for_discriminator(tok, texts, 256, shared_prefix=True)
    P = len(shared["prefix_ids"])
    assert shared["input_ids"].shape[1] + P == plain["input_ids"].shape[1]
    assert shared["prefix_ids"].tolist() == prompt_parts(tok)[0]
    packs = [pack_behind_prefix(shared["attention_mask"].sum(1).tolist(), P, n)[0].tolist()
             for n in (1, P + 30, 512)]
    assert packs[0] == [0, 1, 2, 3] and 1 < len(set(packs[1])) < 4 and packs[2] == [0, 0, 0, 0]
    ways = [lambda d: d(**plain), lambda d: d(**shared)]
    ways += [lambda d, n=n: d(**shared, pack_tokens=n) for n in (1, P + 30, 512)]  # packed: checkpointing
    ways += ways[2:]                                             # ... on attention.block_attention
    grads, calls = [], []
    for i, way in enumerate(ways):
        d = _with_random_head(disc0)
        if i >= 2:  # HF turns the cache off under checkpointing: the responses are packed
            d.backbone.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
            d.train()
            assert not can_share_cache(d.backbone)
        if i >= 5:
            attention.use_block_attention(d)
            assert d.backbone.config._attn_implementation == attention.NAME
        with counting_calls() as called:
            logits = way(d)  # [4]
            (logits * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        calls.append(called)
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in d.named_parameters()}))
    layers = disc0.backbone.config.num_hidden_layers
    assert [len(c) for c in calls] == [0] * 5 + [2 * layers] * 3           # forward + recomputed in backward
    assert all(all(c) for c in calls)
    for logits, g in grads[1:]:
        torch.testing.assert_close(logits, grads[0][0], atol=1e-5, rtol=1e-5)
        for n, ref in grads[0][1].items():  # fp32 sums in another order: relative to the gradient's size
            assert (g[n] - ref).norm() <= 1e-5 * ref.norm() + 1e-7, (n, (g[n] - ref).norm() / ref.norm())


def test_save_and_load_roundtrip(tok, disc0, tmp_path):
    d = _with_random_head(disc0)
    d.save_pretrained(tmp_path / "disc", tokenizer=tok)
    assert (tmp_path / "disc" / HEAD_FILE).is_file()
    d2 = Discriminator.from_pretrained(tmp_path / "disc")
    enc, _ = encode_for_discriminator(tok, ["The answer is \\boxed{3}.", "Focus on the red objects."], 256)
    assert torch.allclose(d(**enc), d2(**enc), atol=1e-6)
    d3 = Discriminator.from_pretrained(tmp_path / "disc")  # also a starting point for from_student-like use
    assert len(d3.backbone.layers) == len(d.backbone.layers)


def _saved_text_lm(tok, path):
    """A 2-layer Qwen2 causal LM on the tiny student's vocabulary, saved to `path`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)
    lm = Qwen2ForCausalLM(cfg)
    lm.save_pretrained(path)
    return lm


def test_from_a_text_only_checkpoint(tok, tmp_path):
    lm = _saved_text_lm(tok, tmp_path / "lm")
    d = Discriminator.from_student(tmp_path / "lm")
    assert type(d.backbone).__name__ == "Qwen2Model" and len(d.backbone.layers) == 2
    assert torch.equal(d.backbone.embed_tokens.weight, lm.model.embed_tokens.weight)
    enc, _ = encode_for_discriminator(tok, ["a", "bb bb"], 256)
    assert d(**enc).shape == (2,)


def test_from_student_drops_the_lm_head_quietly_and_refuses_a_missing_weight(tiny_student, tok, tmp_path,
                                                                             capfd):
    Discriminator.from_student(tiny_student)
    assert "lm_head" not in capfd.readouterr().err  # the head D replaces is not reported as unexpected
    from safetensors.torch import load_file, save_file
    _saved_text_lm(tok, tmp_path / "lm")
    weights = load_file(tmp_path / "lm" / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "lm" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weight.*layers.1.mlp.up_proj"):
        Discriminator.from_student(tmp_path / "lm")


def test_update_micro_batches_give_the_full_batch_step(tok, disc0, one_thread):
    s = ["So the answer is \\boxed{2}.", "Step 1: the objects."]
    t = ["Final answer: \\boxed{2}", "I need it.", "Wait."]
    a = _with_random_head(disc0)
    b = _with_random_head(disc0)
    sa = update(a, torch.optim.SGD(a.parameters(), lr=0.1), tok, s, t, 256, max_grad_norm=None)
    sb = update(b, torch.optim.SGD(b.parameters(), lr=0.1), tok, s, t, 256, max_grad_norm=None,
                micro_batch_size=2)
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-5) and sa["skipped"] == 0
    assert sa["grad_norm"] == pytest.approx(sb["grad_norm"], rel=1e-4)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=1e-4, msg=n)  # fp32 sums reordered, times lr 0.1
    d0 = _with_random_head(disc0)
    enc, _ = encode_for_discriminator(tok, s + t, 256)
    assert sa["loss"] == pytest.approx(discriminator_loss(d0(**enc)[:2], d0(**enc)[2:]).item(), rel=1e-5)


def test_update_skips_a_nonfinite_loss(tok, disc0, caplog):
    d = copy.deepcopy(disc0)
    with torch.no_grad():
        d.head.bias.fill_(float("nan"))
    before = {n: p.clone() for n, p in d.named_parameters()}
    opt = torch.optim.AdamW(d.parameters(), lr=1e-3)
    stats = update(d, opt, tok, ["a"], ["b"], 256)
    assert stats["skipped"] == 1 and "skipped" in caplog.text
    assert all(torch.allclose(p, before[n], rtol=0, atol=0, equal_nan=True) for n, p in d.named_parameters())
    assert all(p.grad is None for p in d.parameters())


def _styles(path, rows):
    """(methodical, reflective) teacher responses of some train rows."""
    data = [json.loads(line) for line in open(path / "train.jsonl")]
    pick = [data[i] for i in rows]
    return ([r for row in pick for r in row["teachers"]["methodical"]],
            [r for row in pick for r in row["teachers"]["reflective"]])


def test_pretraining_separates_two_styles(tiny_student, embedded, tok, disc0, one_thread):
    """Methodical labelled student (1), reflective labelled teacher (0); held-out rows, accuracy > 0.9."""
    train_s, train_t = _styles(embedded, range(0, 80))
    held_s, held_t = _styles(embedded, range(80, 120))  # other questions, never seen in pre-training
    d = copy.deepcopy(disc0)
    assert p_student(d, tok, held_s[:2] + held_t[:2], 256).tolist() == [0.5] * 4  # zero head: undecided
    opt = torch.optim.AdamW(d.parameters(), lr=3e-3, weight_decay=0.0)
    t0 = time.time()
    stats = pretrain(d, opt, tok, train_s, train_t, steps=16, batch_size=4, max_len=256, seed=0, log_every=4)
    seconds = time.time() - t0
    after = evaluate(d, tok, held_s, held_t, max_len=256, batch_size=64)
    print(f"\ndiscriminator pre-training: {stats['steps']} steps x (4 student + 4 teacher), {seconds:.1f}s; "
          f"held-out accuracy {after['accuracy']:.3f} on {len(held_s)}+{len(held_t)} "
          f"responses (p_student {after['p_student']:.3f}, p_teacher {after['p_teacher']:.3f})")
    assert stats["n_skipped"] == 0 and len(stats["history"]) == 16
    assert after["accuracy"] > 0.9


FSDP_SCRIPT = r'''
import json, sys, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoTokenizer
from discriminator import Discriminator, p_student, update
torch.set_num_threads(1)
student, out, S, T = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
tok = AutoTokenizer.from_pretrained(student)
d = Discriminator.from_student(student)
with torch.no_grad():
    d.head.weight.copy_(torch.linspace(-0.1, 0.1, d.head.weight.numel()).view_as(d.head.weight))
mesh = init_device_mesh("cpu", (world,))
for layer in d.backbone.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(d, mesh=mesh)
opt = torch.optim.SGD(d.parameters(), lr=0.5)
n = len(S) // world  # each rank its own shard of the global batch
stats = update(d, opt, tok, S[rank * n:(rank + 1) * n], T[rank * n:(rank + 1) * n], 256, micro_batch_size=3)
p = p_student(d, tok, S + T, 256, batch_size=4)
sd = get_model_state_dict(d, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    d.save_pretrained(out, state_dict=sd)
    json.dump({"stats": stats, "p": p.tolist()}, open(out + "/result.json", "w"))
dist.barrier()  # gloo aborts a rank that tears down while its peer is still working
dist.destroy_process_group()
'''


def test_update_under_fsdp2_matches_one_process(tiny_student, tok, tmp_path, one_thread):
    """torchrun, 2 gloo ranks, FSDP2 per decoder layer + root: one update on half the batch per rank gives
    the single-process update on the whole batch; a gathered full state dict saves and reloads."""
    import os
    import subprocess
    import sys

    S = ["So the answer is \\boxed{2}.", "Step 1: the objects.", "I see a red circle.", "That makes 1."]
    T = ["Final answer: \\boxed{2}", "I need it.", "Wait.", "Focus on the red objects."]
    script = tmp_path / "fsdp_update.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "disc"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(tiny_student), str(out), json.dumps(S),
                           json.dumps(T)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out / "result.json"))

    d = Discriminator.from_student(tiny_student)
    with torch.no_grad():
        d.head.weight.copy_(torch.linspace(-0.1, 0.1, d.head.weight.numel()).view_as(d.head.weight))
    stats = update(d, torch.optim.SGD(d.parameters(), lr=0.5), tok, S, T, 256)
    for k in ("loss", "accuracy", "p_student", "p_teacher", "grad_norm"):
        assert result["stats"][k] == pytest.approx(stats[k], rel=1e-4, abs=1e-6), k
    assert result["p"] == pytest.approx(p_student(d, tok, S + T, 256).tolist(), abs=1e-5)
    p = p_student(Discriminator.from_pretrained(out), tok, S + T, 256)
    assert p.tolist() == pytest.approx(result["p"], abs=1e-5)
