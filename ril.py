"""RIL: unified reinforcement and imitation learning for vision-language models (arXiv 2510.19307).

    torchrun --nproc_per_node=2 ril.py                   # the embedded run: builds what is missing, trains
    python ril.py --algo drgrpo                          # Algorithm 1 baseline, one process
    torchrun --nproc_per_node=8 ril.py --student /ckpt/Qwen2.5-VL-7B-Instruct --data rl.jsonl \
        --eval-data val.jsonl --test-data test.jsonl --answer-reward judge --judge /ckpt/Qwen2.5-32B-Instruct

Per batch of questions (Algorithm 2, `rl_step`):
  1. pi_old <- pi_theta
  2. G student samples per question (rollout.generate) + G cached teacher responses  -> a group of 2G
  3. mu discriminator steps on the 2G responses (Eq. 1)
  4. R = r_sim + r_ans for all 2G, A_i = R_i - mean_j R_j over the group (Dr.GRPO: no std)
  5. mu policy steps on the clipped surrogate with a KL penalty (Eq. 2), teacher responses included
`--algo grpo|drgrpo` runs Algorithm 1 in the same code: G student samples, answer reward only.
The file reads top to bottom: Config, Eq. 2, the stages (SFT, discriminator pre-training), the RL step, the
loop, main. The torchrun / FSDP2 plumbing is in distributed.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import attention
import discriminator
import distributed
import evaluate
import rewards
import rollout
from data import teacher_cache
from data.build import DEFAULT_WORLD, WORLDS, build_missing, split_paths, tiny_disc_dir, world_dirs
from data.dataset import (DatasetError, encode_rows, load_jsonl, sft_rows, step_rows, teacher_names,
                          teacher_slots)

# ---- Config ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    # what to train ("" = the embedded world, built on the first run)
    student: str = ""              # student checkpoint (HF folder); also pi_ref, the SFT model
    data: str = ""                 # RL questions with cached teacher responses (JSONL schema)
    eval_data: str = ""            # validation questions: accuracy before / during / after RL (tune on these)
    test_data: str = ""            # test questions: start and final, once, at the end ("none": skip, to tune)
    sft_data: str = ""             # SFT rows (`response` field) for --stage sft
    discriminator: str = ""        # pre-trained discriminator; "" = pre-train one from the student
    judge: str = ""                # text-only judge LLM for --answer-reward judge
    world: str = DEFAULT_WORLD     # the embedded world, without --student: plain | marked (data/build.py)
    stage: str = "all"             # all | sft | disc | rl
    algo: str = "ril"              # ril (Algorithm 2) | drgrpo | grpo (Algorithm 1)
    teachers: str = ""             # comma-separated teacher names to imitate; "" = every teacher in the data
    similarity: str = "binary"     # r_sim: binary 1[D(o) < 0.5] | continuous 1 - D(o) | off
    answer_reward: str = "rule"    # r_ans: rule-based check | judge LLM | off
    freeze_disc: bool = False      # ablation: keep the pre-trained discriminator fixed during RL
    # RL, the paper's values
    group_size: int = 4            # G: student samples (and teacher responses) per question
    clip_eps: float = 0.2          # eps of the clipped ratio in Eq. 2
    beta: float = 0.01             # KL(pi_theta || pi_ref) weight in Eq. 2
    mu: int = 1                    # policy and discriminator updates per batch
    temperature: float = 1.0       # sampling temperature
    top_p: float = 0.95            # nucleus sampling
    top_k: int = 50                # top-k sampling
    repetition_penalty: float = 1.05  # transformers' repetition penalty while sampling
    lr: float = 1e-6               # student learning rate
    disc_lr: float = 1e-6          # discriminator learning rate (pre-training and RL)
    batch_size: int = 144          # questions per step, all ranks together
    steps: int = 1000              # RL steps
    loss_agg: str = "token-mean"   # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr.GRPO)
    max_new_tokens: int = 1024     # response length cap (also Dr.GRPO's constant normaliser)
    max_disc_len: int = 1024       # discriminator input cap, in tokens (longer: cut from the left)
    micro_batch: int = 32          # sequences per forward/backward (gradient accumulation within a step)
    grad_checkpointing: bool = False  # recompute activations in backward (real 3B/7B students need it)
    keep_gathered: bool = False    # FSDP2: keep a layer's gathered weights from forward to backward (memory)
    grad_clip: float = 1.0         # max gradient norm
    vision_lr_scale: float = 1.0   # the vision tower's (and projector's) lr as a fraction of --lr / --sft-lr
    # SFT warm start and discriminator pre-training
    sft_steps: int = 1000          # SFT steps
    sft_max_len: int = 1024        # SFT responses longer than this many tokens are cut
    sft_lr: float = 1e-5           # SFT learning rate, decayed linearly to a tenth (the paper: 1e-5 -> 1e-6)
    sft_batch_size: int = 64       # SFT sequences per step, all ranks together
    sft_micro_batch: int = 16      # SFT sequences per forward/backward, grouped by length (less padding)
    disc_steps: int = 500          # discriminator pre-training steps
    disc_batch_size: int = 32      # responses per pre-training step, half student half teacher
    disc_questions: int = 2000     # questions whose student samples pre-train the discriminator
    disc_samples: int = 16         # student samples per such question (the paper's N = 16)
    # bookkeeping
    out_dir: str = "runs"          # runs/<name>/ holds metrics.jsonl, summary.json, checkpoints/
    name: str = "ril"              # the run's folder name under --out-dir
    seed: int = 0                  # seeds sampling, batches and teacher slots
    eval_every: int = 0            # validation accuracy every N RL steps (0 = only before and after)
    eval_limit: int = 0            # evaluate the first N validation rows (0 = all; test is always whole)
    save_every: int = 100          # checkpoint every N RL steps
    sample_every: int = 50         # print a response every N RL steps
    resume: bool = False           # continue runs/<name> from its latest checkpoint
    overwrite: bool = False        # start again in a run folder that already holds a run
    keep_checkpoints: int = 3      # RL checkpoints kept in runs/<name>/checkpoints (0 = all)
    max_skipped: int = 5           # stop after this many policy updates in a row skipped as non-finite

# The embedded run (no --student): a 1.2M-parameter student trained from scratch on two CPU cores needs
# larger learning rates and fewer, shorter steps than a 7B model. EMBEDDED, then --world's: docs/LOG.md
EMBEDDED = dict(lr=1e-4, batch_size=16, micro_batch=32, vision_lr_scale=0.1, keep_gathered=True, disc_lr=1e-5,
                sft_steps=600, sft_lr=2e-3, sft_batch_size=64, sft_max_len=96, save_every=50, sample_every=50,
                max_disc_len=192, disc_steps=60, disc_batch_size=32, disc_questions=256, disc_samples=2)
EMBEDDED_WORLD = dict(plain=dict(beta=1.0, steps=100, max_new_tokens=96),  # marked: 192 fits correct answers
                      marked=dict(beta=0.1, steps=150, max_new_tokens=192, teachers="methodical"))
CHOICES = dict(world=WORLDS, stage=("all", "sft", "disc", "rl"), algo=("ril", "drgrpo", "grpo"),
               similarity=("binary", "continuous", "off"), answer_reward=("rule", "judge", "off"),
               loss_agg=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"))

def parse_config(argv=None) -> Config:
    """argparse built from Config; embedded defaults apply when no --student is given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"without --student: {EMBEDDED}, then per --world: {EMBEDDED_WORLD}")
    notes = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(Config), re.M))  # comments: help
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":  # --flag / --no-flag (an EMBEDDED default can be turned off)
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=notes.get(f.name))
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                           help=f"{notes.get(f.name, '')} (default {f.default!r})")
    given = vars(p.parse_args(argv))
    embedded = EMBEDDED | EMBEDDED_WORLD.get(given.get("world", Config.world), {})
    cfg = Config(**{**(embedded if not given.get("student") else {}), **given})
    check_config(cfg)
    return cfg

def check_config(cfg: Config) -> None:
    """Fail before any model loads on values that cannot run or would train silently wrong."""
    def fail(key: str, why: str):
        raise SystemExit(f"--{key.replace('_', '-')} {why}, got {getattr(cfg, key)!r}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            fail(key, f"must be one of {allowed}")
    for key in ("group_size", "mu", "batch_size", "max_new_tokens", "micro_batch", "sft_batch_size",
                "sft_max_len", "max_skipped", "sft_micro_batch", "steps", "sft_steps", "disc_steps",
                "disc_batch_size", "disc_questions", "disc_samples", "max_disc_len"):
        if getattr(cfg, key) < 1:
            fail(key, "must be >= 1")
    for key in ("lr", "disc_lr", "sft_lr", "grad_clip", "clip_eps", "repetition_penalty"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) > 0):
            fail(key, "must be finite and > 0")
    for key in ("beta", "temperature", "vision_lr_scale", "top_k", "eval_limit", "eval_every", "save_every",
                "sample_every", "keep_checkpoints"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            fail(key, "must be finite and >= 0")
    if not 0 < cfg.top_p <= 1:
        fail("top_p", "must be in (0, 1]")
    if cfg.algo == "grpo" and cfg.group_size < 2:
        raise SystemExit("--algo grpo needs --group-size >= 2 (the group std is undefined for one sample)")
    if cfg.answer_reward == "judge" and not cfg.judge:
        raise SystemExit("--answer-reward judge needs --judge PATH (a text-only LLM checkpoint)")
    if cfg.answer_reward == "off" and (cfg.algo != "ril" or cfg.similarity == "off"):
        raise SystemExit("--answer-reward off leaves no reward (Algorithm 1 has only the answer reward)")
    for key in ("student", "data", "eval_data", "test_data", "sft_data", "discriminator", "judge"):
        path, written = getattr(cfg, key), key == "discriminator" and cfg.stage == "disc"  # disc writes it
        if path and not written and (key, path) != ("test_data", "none") and not Path(path).exists():
            raise SystemExit(f"--{key.replace('_', '-')}: {path} does not exist")
    if cfg.discriminator and cfg.stage != "disc" and not (Path(cfg.discriminator) / "config.json").exists():
        raise SystemExit(f"--discriminator {cfg.discriminator} holds no discriminator (no config.json); "
                         "pre-train one into it with --stage disc")
    if cfg.student:
        distributed.check_student(cfg.student)
    if cfg.student and cfg.stage in ("all", "rl") and not cfg.data:
        raise SystemExit("--student needs --data (questions with cached teacher responses) for RL")

# ---- The math: advantages and the policy loss (Eq. 2) ------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = False, eps: float = 1e-6):
    """A_i = R_i - mean_j R_j within each group (Dr.GRPO); / (std_j R_j + eps) too for GRPO.

    rewards: [N] laid out group-major (N = groups * group_size). A group of equal rewards gives zeros.

        group_advantages(torch.tensor([2., 0., 1., 1.,   1., 1., 1., 1.]), 4)
        -> [1., -1., 0., 0.,   0., 0., 0., 0.]       (question 0: mean 1; question 1: all equal)
    """
    r = rewards.view(-1, group_size)                                    # [groups, G]
    adv = r - r.mean(dim=1, keepdim=True)                               # [groups, G]
    if scale_by_std:                                                    # Bessel-corrected std, as GRPO
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)                                              # [N]

def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str, norm_len: int | None = None):
    """Reduce per-token values [N, T] to a scalar; the three conventions of the RL-for-LLM literature."""
    m = mask.to(values.dtype)
    if agg == "token-mean":                                             # sum l*m / sum m
        return (values * m).sum() / m.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":                                    # mean_i (sum_t l*m / sum_t m)
        return ((values * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    if agg == "seq-mean-token-sum-norm":                                # Dr.GRPO: sum l*m / (N * norm_len)
        return (values * m).sum() / (values.shape[0] * (norm_len or values.shape[1]))
    raise ValueError(f"unknown aggregation {agg!r}")

def policy_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, clip_eps=0.2, beta=0.01,
                agg="token-mean", norm_len=None):
    """Eq. 2, negated for minimisation, per token:

        -min(r A, clip(r, 1-eps, 1+eps) A) + beta * k3,   r = pi_theta / pi_old,
        k3 = exp(ref - logp) - (ref - logp) - 1   (non-negative; on tokens sampled from pi_theta an
                                                    unbiased estimate of KL(pi_theta || pi_ref); on the
                                                    teacher tokens it is not)

    logprobs, old_logprobs, ref_logprobs: [N, T] (ref may be None when beta == 0); advantages: [N];
    mask: [N, T] bool. Returns (loss, stats) with stats detached floats.
    """
    m = mask.bool()
    ratio = torch.exp(torch.where(m, logprobs - old_logprobs, 0.0))    # [N, T]
    adv = advantages[:, None].to(logprobs.dtype)                         # [N, 1]
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -torch.min(ratio * adv, clipped * adv)                   # [N, T]
    kl = torch.zeros_like(per_token)
    if beta != 0:
        log_r = torch.where(m, ref_logprobs - logprobs, 0.0)            # log pi_ref / pi_theta
        kl = torch.exp(log_r) - log_r - 1                                # [N, T] k3
        per_token = per_token + beta * kl
    loss = aggregate(per_token, m, agg, norm_len)
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
        r_valid = ratio[m] if m.any() else torch.ones(1)
        stats = {"clip_frac": ((is_clipped & m).sum() / n).item(), "kl": ((kl * m).sum() / n).item(),
                 "ratio_min": r_valid.min().item(), "ratio_max": r_valid.max().item()}
    return loss, stats

# ---- Models and batches ------------------------------------------------------------------------------------
def sampling(cfg: Config) -> dict:
    """The sampler's settings (rollout.generate's keyword arguments), as the run gives them."""
    return {key: getattr(cfg, key) for key in ("temperature", "top_p", "top_k", "repetition_penalty")}

def load_student(cfg: Config, path: str, device, lr: float) -> tuple:
    """(model, tokenizer, image processor, optimizer) to train, sharded; generation_config: the sampler."""
    model, tok, proc = distributed.load_pretrained(path, device, checkpointing=cfg.grad_checkpointing,
                                                   keep_gathered=cfg.keep_gathered)
    distributed.sampler_defaults(model, tok, max_new_tokens=cfg.max_new_tokens, **sampling(cfg))
    return model, tok, proc, distributed.student_optimizer(model, lr, cfg.vision_lr_scale)

def stage_loop(cfg: Config, folder: Path, steps: int, trained: dict, gen, ckpt, name: str, rank: int):
    """distributed.Loop over a stage's steps (checkpoints, --resume, SIGTERM) and its progress bar."""
    loop = distributed.Loop(folder, steps, trained, gen, ckpt, save_every=cfg.save_every,
                            keep=cfg.keep_checkpoints, max_skipped=cfg.max_skipped, name=f"{name} step")
    return loop, tqdm(loop, desc=name, disable=rank != 0, initial=loop.progress.step, total=steps)

def student_rows(n: int, k: int, g: int) -> torch.Tensor:
    """[n] bool: which of n responses (k per question, the G student samples first) are the student's."""
    return (torch.arange(n) % k) < g

# ---- Stage 1: SFT warm start (cross-entropy on the response tokens; prompt tokens masked) ------------------
def sft(cfg: Config, init: str, out: Path, folder: Path, device, rank: int) -> None:
    """Fine-tune `init` on cfg.sft_data for cfg.sft_steps (lr decaying linearly to a tenth); publish to `out`.
    Checkpoints, metrics.jsonl and --resume in `folder`, as in the RL stage (distributed.Loop)."""
    rows = sft_rows(cfg.sft_data)
    world = distributed.world_size()
    if cfg.sft_batch_size % world:
        raise SystemExit(f"--sft-batch-size {cfg.sft_batch_size} must be a multiple of the {world} processes")
    ckpt = distributed.latest_checkpoint(folder) if cfg.resume else None
    model, tok, proc, opt = load_student(cfg, str(ckpt / "student") if ckpt else init, device, cfg.sft_lr)
    base_lr = [g["lr"] for g in opt.param_groups]
    trained, gen = {"student": (model, opt, (tok, proc))}, torch.Generator().manual_seed(cfg.seed)
    loop, bar = stage_loop(cfg, folder, cfg.sft_steps, trained, gen, ckpt, "sft", rank)
    for step in bar:
        for group, lr in zip(opt.param_groups, base_lr):
            group["lr"] = lr * (1 - 0.9 * step / cfg.sft_steps)                 # lr -> lr / 10, linearly
        batch = step_rows(rows, step, cfg.sft_batch_size, cfg.seed, rank, world)
        ids, mask, _ = rollout.encode_responses(tok, [r["response"] for r in batch], cfg.sft_max_len,
                                                tok.eos_token_id)
        ids, mask = ids.to(device), mask.to(device)                                  # [b, T]
        total = distributed.all_sum(mask.sum())
        micro = distributed.length_batches(mask, cfg.sft_micro_batch)
        nll = 0.0
        for i, (mb, w) in enumerate(micro):                 # each adds its share of the global token mean
            distributed.sync_gradients(model, i == len(micro) - 1)
            prompts = encode_rows(model, tok, proc, [batch[j] for j in mb.tolist()], device)
            logp = rollout.response_logprobs(model, prompts, ids[mb, w], mask[mb, w])  # [mb, t]
            loss = -(logp * mask[mb, w]).sum() / total                          # token-mean cross-entropy
            (loss * world).backward()                       # FSDP averages gradients over ranks
            nll += loss.item()
        nll = distributed.all_sum(nll)
        stats = distributed.optimizer_step(model, opt, cfg.grad_clip, nll)
        loop.done(stats["skipped"], {"loss": nll, "lr": opt.param_groups[0]["lr"], **stats})
        bar.set_postfix(loss=f"{nll:.3f}", update=f"{stats['update']:.1e}")
    distributed.publish(model, out, tok, proc)

# ---- Stage 2: discriminator pre-training on student samples vs cached teacher responses (Eq. 1) ------------
def pretrain_discriminator(cfg: Config, student: str, out: Path, folder: Path, device, rank: int) -> None:
    """Train D (Eq. 1) on the student's samples on cfg.disc_questions questions (cfg.disc_samples each, RL
    sampling settings; its cached ones when every row has them) against every cached response of the chosen
    teachers on them (all labelled teacher); publish it to `out` with what it saw. Checkpoints,
    metrics.jsonl and --resume in `folder` (distributed.Loop)."""
    world = distributed.world_size()
    rows = load_jsonl(cfg.data)
    names = teacher_names(rows, cfg.teachers, cfg.data)
    n = min(cfg.disc_questions, len(rows)) // world * world
    rows = step_rows(rows, 0, n, cfg.seed + 1, rank, world)
    model, tok, proc = distributed.load_pretrained(student, device, trainable=False)
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    student_texts, teacher_texts = teacher_cache.discriminator_texts(
        model, tok, proc, rows, names, cfg.disc_samples, cfg.max_new_tokens, sampling(cfg), gen, rank == 0)
    del model
    ckpt = distributed.latest_checkpoint(folder) if cfg.resume else None
    disc = discriminator.Discriminator.from_pretrained(ckpt / "discriminator") if ckpt else \
        discriminator.Discriminator.from_student(student)
    disc = distributed.shard(attention.use_block_attention(disc.to(device)), device, cfg.keep_gathered)
    opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, weight_decay=0.0)
    loop, bar = stage_loop(cfg, folder, cfg.disc_steps, {"discriminator": (disc, opt, ())}, gen, ckpt,
                           "discriminator", rank)
    per_rank = max(1, cfg.disc_batch_size // (2 * world))      # student and teacher texts per rank and step
    stats = {"accuracy": math.nan}
    for step in bar:
        si, ti = discriminator.pretrain_batch(len(student_texts), len(teacher_texts), per_rank,
                                              cfg.seed * 1000 + rank, step)
        stats = discriminator.update(disc, opt, tok, [student_texts[i] for i in si],
                                     [teacher_texts[i] for i in ti], cfg.max_disc_len,
                                     max_grad_norm=cfg.grad_clip, pack_tokens=attention.PACK_TOKENS)
        loop.done(stats["skipped"], stats)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
    distributed.publish(disc, out)
    if rank == 0:  # which student and teachers it learnt to tell apart (a later run checks them)
        discriminator.record_origin(out, student, names)
        source = "cached" if all("students" in r for r in rows) else "sampled"
        print(f"discriminator trained on {len(student_texts)} {source} student responses per rank, "
              f"{loop.progress.skipped} steps skipped; last batch acc {stats['accuracy']:.3f}", flush=True)
    distributed.barrier()

# ---- Stage 3: the RL step (Algorithm 2; Algorithm 1 with --algo grpo|drgrpo) -------------------------------
@dataclass
class Models:
    """What the RL stage trains and reads (ref: pi_ref when beta > 0; disc, dopt: RIL's D; judge: an LLM)."""
    device: torch.device
    policy: torch.nn.Module
    tok: object
    proc: object
    popt: torch.optim.Optimizer
    ref: torch.nn.Module | None = None
    disc: torch.nn.Module | None = None
    dopt: torch.optim.Optimizer | None = None
    judge: torch.nn.Module | None = None
    judge_tok: object = None

def by_question(x: torch.Tensor, questions: int, width: int) -> torch.Tensor:
    """[questions * G, T] -> [questions, G, width], right-padded with zeros."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1])).view(questions, -1, width)

def sample_group(cfg: Config, step: int, batch: list[dict], m: Models, names: list[str],
                 gen: torch.Generator):
    """Algorithm 2, steps 1-2: G student samples per question (pi_old = pi_theta now) and, for RIL, G cached
    teacher responses, laid out group-major. Returns (prompts, ids [N, T], mask [N, T], k = responses per
    question, n teacher responses truncated). With G = 2, two questions:

        row:  0    1    2    3  |  4    5    6    7
              q0s0 q0s1 q0t0 q0t1 | q1s0 q1s1 q1t0 q1t1      (s: student sample, t: teacher response)
    """
    G, tok = cfg.group_size, m.tok
    prompts = encode_rows(m.policy, tok, m.proc, batch, m.device)
    with torch.no_grad():
        roll = rollout.generate(m.policy, prompts, max_new_tokens=cfg.max_new_tokens, num_samples=G,
                                generator=gen, **sampling(cfg))
    ids, mask = roll.response_ids, roll.response_mask                        # [b*G, T]
    if cfg.algo != "ril":
        return prompts, ids, mask, G, 0
    texts = []
    for r in batch:  # the draw depends on the question and the step only, not on how ranks split the batch
        texts += teacher_slots(r, names, G, random.Random(f"{cfg.seed}-{step}-{r['id']}"))
    t_ids, t_mask, n_trunc = rollout.encode_responses(tok, texts, cfg.max_new_tokens, tok.eos_token_id)
    t_ids, t_mask = t_ids.to(ids.device), t_mask.to(ids.device)              # [b*G, T']
    b, width = len(batch), max(ids.shape[1], t_ids.shape[1])
    ids = torch.cat([by_question(ids, b, width), by_question(t_ids, b, width)], 1).view(-1, width)  # [b*2G,T]
    mask = torch.cat([by_question(mask, b, width), by_question(t_mask, b, width)], 1).view(-1, width)
    return prompts, ids, mask, 2 * G, n_trunc

def score_group(cfg: Config, batch: list[dict], texts: list[str], k: int, m: Models, out: dict):
    """Algorithm 2, step 4: R = r_sim + r_ans for every response (Algorithm 1: r_ans only).
    Returns (R [N], {"r_sim", "r_ans", "p_student": D(o)}), a part None when it is off."""
    answers = [r["answer"] for r in batch for _ in range(k)]
    r_ans = r_sim = None
    if cfg.answer_reward == "rule":
        r_ans = rewards.rule_rewards(texts, answers)[0]                           # [N]
    elif cfg.answer_reward == "judge":
        questions = [r["question"] for r in batch for _ in range(k)]
        r_ans, jstats = rewards.judge_rewards(m.judge, m.judge_tok, questions, answers, texts)
        out.update({f"judge/{a}": b for a, b in jstats.items()})
    p = None
    if m.disc is not None:
        p = discriminator.p_student(m.disc, m.tok, texts, cfg.max_disc_len, batch_size=cfg.micro_batch)  # [N]
        r_sim = rewards.similarity_reward(p, mode=cfg.similarity)
        is_student = student_rows(len(texts), k, cfg.group_size)
        out["disc/p_student_on_student"] = p[is_student].mean().item()
        out["disc/p_student_on_teacher"] = p[~is_student].mean().item()
    total, parts = rewards.combine_rewards(r_sim, r_ans)
    return total, parts | {"p_student": p}

def loss_weight(cfg: Config, mask: torch.Tensor) -> float:
    """What a micro-batch counts for in the step's mean: its tokens (token-mean) or its sequences."""
    return mask.sum().item() if cfg.loss_agg == "token-mean" else float(mask.shape[0])

def policy_update(cfg: Config, m: Models, prompts: dict, ids, mask, adv, k: int) -> dict:
    """Algorithm 2, step 5: mu steps of Eq. 2 over all responses (teacher ones included), in micro-batches of
    whole questions (a prompt runs once for its k responses) of similar lengths. Token means divide by the
    global token count, so the update does not depend on the split."""
    temp = cfg.temperature or 1.0                                    # greedy runs score log-probs at T = 1
    total = distributed.all_sum(loss_weight(cfg, mask))
    micro = distributed.length_batches(mask, cfg.micro_batch, group=k)               # (rows, columns)
    micro_prompts = [rollout.select_prompts(prompts, s[::k] // k) for s, _ in micro]  # a row per question
    old, ref = [], []
    with torch.no_grad():  # pi_old (with mu = 1 it equals pi_theta: the live log-probs, detached) and pi_ref
        for (s, w), p in zip(micro, micro_prompts):
            old.append(rollout.response_logprobs(m.policy, p, ids[s, w], mask[s, w], temp) if cfg.mu > 1
                       else None)
            ref.append(rollout.response_logprobs(m.ref, p, ids[s, w], mask[s, w], temp) if cfg.beta else None)
    is_student = student_rows(ids.shape[0], k, cfg.group_size).to(mask.device)[:, None] & mask   # [N, T]
    stats, skipped, ent_sum, ent_n = [], 0, 0.0, 0.0
    for _ in range(cfg.mu):
        loss_sum = 0.0
        for j, ((s, w), p) in enumerate(zip(micro, micro_prompts)):
            distributed.sync_gradients(m.policy, j == len(micro) - 1)
            logp, entropy = rollout.response_logprobs(m.policy, p, ids[s, w], mask[s, w], temp,
                                                      return_entropy=True)                      # [n, t]
            pi_old = old[j] if old[j] is not None else logp.detach()
            loss, st = policy_loss(logp, pi_old, ref[j], adv[s], mask[s, w], clip_eps=cfg.clip_eps,
                                   beta=cfg.beta, agg=cfg.loss_agg, norm_len=cfg.max_new_tokens)
            (loss * distributed.token_mean_scale(loss_weight(cfg, mask[s]), total)).backward()
            loss_sum += loss.item() * loss_weight(cfg, mask[s]) / max(loss_weight(cfg, mask), 1)
            stats.append(st)
            ent_sum += (entropy.detach() * is_student[s, w]).sum().item()
            ent_n += is_student[s, w].sum().item()
        step = distributed.optimizer_step(m.policy, m.popt, cfg.grad_clip, loss_sum)  # non-finite: skipped
        skipped += step["skipped"]
    mean = {f"policy/{key}": sum(x[key] for x in stats) / len(stats) for key in ("kl", "clip_frac")}
    return mean | {"policy/loss": loss_sum, "policy/entropy": ent_sum / max(ent_n, 1),
                   "policy/ratio_min": min(x["ratio_min"] for x in stats), "policy/skipped": skipped,
                   "policy/ratio_max": max(x["ratio_max"] for x in stats), "policy/update": step["update"],
                   "policy/grad_norm": step["grad_norm"]}

def rl_step(cfg: Config, step: int, batch: list[dict], m: Models, names: list[str],
            gen: torch.Generator) -> dict:
    """One batch of Algorithm 2 (Algorithm 1 for --algo grpo|drgrpo) on this rank's questions; its metrics.
    None when a stop was requested during the rollout: the step is abandoned before any weight changes."""
    t0 = time.time()
    gen_before = gen.get_state()
    prompts, ids, mask, k, n_trunc = sample_group(cfg, step, batch, m, names, gen)       # steps 1-2
    if distributed.stop_requested():  # SIGTERM during the (longest) phase: save the previous step now
        gen.set_state(gen_before)
        return None
    texts = [m.tok.decode(row[keep].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask)]
    is_student = student_rows(ids.shape[0], k, cfg.group_size)                             # [N]
    t1 = time.time()
    out = {}
    if m.disc is not None and not cfg.freeze_disc:                                         # step 3: Eq. 1
        s_txt = [x for x, s in zip(texts, is_student) if s]
        t_txt = [x for x, s in zip(texts, is_student) if not s]
        for _ in range(cfg.mu):
            stats = discriminator.update(m.disc, m.dopt, m.tok, s_txt, t_txt, cfg.max_disc_len,
                                         micro_batch_size=cfg.micro_batch, pack_tokens=attention.PACK_TOKENS)
            out.update({f"disc/{a}": b for a, b in stats.items()})
    t2 = time.time()
    reward, parts = score_group(cfg, batch, texts, k, m, out)                                  # step 4
    adv = group_advantages(reward.float(), k, scale_by_std=cfg.algo == "grpo").to(mask.device)  # [N]
    t3 = time.time()
    out.update(policy_update(cfg, m, prompts, ids, mask, adv, k))                          # step 5
    t4 = time.time()
    lengths = mask[is_student.to(mask.device)].sum(1).float()
    r_ans, r_sim = parts["r_ans"], parts["r_sim"]
    out.update({"reward/total": reward[is_student].mean().item(),
        "reward/answer": r_ans[is_student].mean().item() if r_ans is not None else None,
        "reward/similarity": r_sim[is_student].mean().item() if r_sim is not None else None,
        "reward/teacher_answer": r_ans[~is_student].mean().item() if r_ans is not None and k > cfg.group_size
        else None,
        "response/length": lengths.mean().item(), "response/length_max": lengths.max().item(),
        "response/truncated_teacher": n_trunc, "tokens_per_s": lengths.sum().item() / max(t1 - t0, 1e-9),
        "time/rollout": t1 - t0, "time/disc": t2 - t1, "time/rewards": t3 - t2, "time/update": t4 - t3,
        "_sample": (batch[0]["question"], batch[0]["answer"], texts[0], reward[0].item())})
    return out

# ---- The loop ----------------------------------------------------------------------------------------------
def load_models(cfg: Config, student: str, disc_path: str | None, ckpt: Path | None, device) -> Models:
    """The policy (from the checkpoint when resuming), pi_ref, the optimizer, and D / the judge when used."""
    policy, tok, proc, popt = load_student(cfg, str(ckpt / "student") if ckpt else student, device, cfg.lr)
    m = Models(device=device, policy=policy, tok=tok, proc=proc, popt=popt)
    if cfg.beta:
        m.ref = distributed.load_pretrained(student, device, trainable=False)[0]
    if cfg.algo == "ril" and cfg.similarity != "off":
        disc = discriminator.Discriminator.from_pretrained(str(ckpt / "discriminator") if ckpt else disc_path)
        disc = attention.use_block_attention(disc.to(device).train(not cfg.freeze_disc))
        m.disc = distributed.shard(disc, device, cfg.keep_gathered and not cfg.freeze_disc)
        m.dopt = torch.optim.AdamW(m.disc.parameters(), lr=cfg.disc_lr, weight_decay=0.0)
    if cfg.answer_reward == "judge":
        m.judge, m.judge_tok = rewards.load_judge(cfg.judge, device)
    return m

def train_rl(cfg: Config, student: str, disc_path: str | None, run: Path, device, rank: int) -> dict:
    """The RL stage; returns the summary (evaluate.final_reports, skipped steps, the config)."""
    rows = load_jsonl(cfg.data)
    eval_rows = load_jsonl(cfg.eval_data)[:cfg.eval_limit or None] if cfg.eval_data else []
    names = teacher_names(rows, cfg.teachers, cfg.data) if cfg.algo == "ril" else []
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    ckpt = distributed.latest_checkpoint(run) if cfg.resume else None
    if cfg.resume and ckpt is None and cfg.stage == "rl":
        raise SystemExit(f"--resume: no checkpoint in {run / 'checkpoints'}")
    m = load_models(cfg, student, disc_path, ckpt, device)
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    trained = {"student": (m.policy, m.popt, (m.tok, m.proc))}            # the checkpoints' folders
    trained |= {"discriminator": (m.disc, m.dopt, ())} if m.disc is not None else {}
    loop, bar = stage_loop(cfg, run, cfg.steps, trained, gen, ckpt, cfg.algo, rank)
    notes = loop.progress.notes
    if not ckpt and eval_rows:
        notes["val_start"] = evaluate.held_out(m.policy, m.tok, m.proc, eval_rows, rows, cfg.max_new_tokens)
        if rank == 0:
            print(f"val accuracy before RL: {evaluate.format_report(notes['val_start'])}", flush=True)
    for step in bar:
        t0 = time.time()
        batch = step_rows(rows, step, cfg.batch_size, cfg.seed, rank, world)
        out = rl_step(cfg, step, batch, m, names, gen)
        if out is None:                              # stopped mid-step: the loop saves the step before
            continue
        sample = out.pop("_sample")
        out = {k: v for k, v in out.items() if v is not None} | {"time/step": time.time() - t0}
        due = cfg.eval_every and (step + 1) % cfg.eval_every == 0 and eval_rows
        if due and not distributed.stop_requested():
            report = evaluate.held_out(m.policy, m.tok, m.proc, eval_rows, rows, cfg.max_new_tokens)
            out["eval/accuracy"] = report["accuracy"]
        loop.done(out["policy/skipped"], out)          # stops after --max-skipped skipped updates in a row
        bar.set_postfix(R=f"{out['reward/total']:.2f}", acc=f"{out.get('reward/answer', 0):.2f}",
                        sim=f"{out.get('reward/similarity', 0):.2f}", len=f"{out['response/length']:.0f}")
        if rank == 0 and cfg.sample_every and (step + 1) % cfg.sample_every == 0:  # one response
            tqdm.write("[step {}] Q: {} (answer {})\n  -> {!r} R={}".format(step + 1, *sample))
    test_rows = load_jsonl(cfg.test_data) if cfg.test_data not in ("", "none") else []  # read only here
    if test_rows and m.ref is None:  # beta = 0: pi_ref (the start) was not loaded
        m.ref = distributed.load_pretrained(student, device, trainable=False)[0]
    summary = evaluate.final_reports(m.policy, m.ref, m.tok, m.proc, rows, eval_rows, test_rows,
                                     notes.get("val_start"), cfg.max_new_tokens)
    return summary | {"skipped_steps": loop.progress.skipped, "config": dataclasses.asdict(cfg)}

# ---- main --------------------------------------------------------------------------------------------------
# what each stage writes in runs/<name> (SFT and D's pre-training: their checkpoints and metrics.jsonl)
WRITES = dict(sft=("sft-stage",), disc=("disc-stage",), rl=("metrics.jsonl", "summary.json", "checkpoints"))
WRITES["all"] = WRITES["sft"] + WRITES["disc"] + WRITES["rl"]

def main(argv=None) -> None:
    cfg = parse_config(argv)
    rank, world, device = distributed.setup()
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    data_dir, tiny = world_dirs(cfg.world)
    if not cfg.student:  # the embedded world: built when missing (by rank 0), its splits as the data
        if rank == 0:
            build_missing(data_dir, tiny / "tiny-student", world=cfg.world)
        distributed.barrier()
        cfg = dataclasses.replace(cfg, **split_paths(dataclasses.asdict(cfg), data_dir))
    run = Path(cfg.out_dir) / cfg.name
    distributed.prepare_run(run, WRITES[cfg.stage], cfg.resume, cfg.overwrite, dataclasses.asdict(cfg))
    # RL starts from --student, or from the embedded SFT student (trained first when missing)
    student = cfg.student or str(tiny / "tiny-sft")
    built = (Path(student) / "config.json").exists()
    if cfg.stage == "sft" or (cfg.stage == "all" and not built):
        out = run / "sft" if cfg.student else Path(student)
        sft(cfg, cfg.student or str(tiny / "tiny-student"), out, run / "sft-stage", device, rank)
    elif not built:
        raise SystemExit(f"--stage {cfg.stage}: no SFT student in {student}; run `ril.py --stage sft` "
                         "(or the whole pipeline) first")
    # one pre-trained D per student and set of imitated teachers (embedded: a folder per set of teachers)
    disc = cfg.discriminator or ("" if cfg.student else str(tiny_disc_dir(tiny, cfg.teachers)))
    needs_disc = cfg.algo == "ril" and cfg.similarity != "off" and cfg.stage != "sft"
    why = "none yet" if cfg.stage == "disc" or not (disc and (Path(disc) / "config.json").exists()) else None
    if needs_disc and why is None:  # one of another student or other teachers: pre-trained again (or refused)
        if rank == 0:  # rank 0 hashes the student's weights, every rank gets its verdict
            names = teacher_names(load_jsonl(cfg.data), cfg.teachers, cfg.data)
            why = discriminator.origin_mismatch(disc, student, names)
        why = distributed.all_gather_list([why])[0]
        if why and cfg.discriminator:
            raise SystemExit(f"--discriminator {disc}: {why}; pre-train one for this run with --stage disc")
        if why and rank == 0:
            print(f"{disc}: {why}: pre-training it again", flush=True)
    if needs_disc and why:
        disc = disc or str(run / "discriminator")
        pretrain_discriminator(cfg, student, Path(disc), run / "disc-stage", device, rank)
    if cfg.stage in ("all", "rl"):
        summary = train_rl(cfg, student, disc, run, device, rank)
        summary["wall_clock_s"] = time.time() - t0
        if rank == 0:
            (run / "summary.json").write_text(json.dumps(summary, indent=1))
            evaluate.print_run_summary(summary)
    distributed.teardown()


if __name__ == "__main__":
    try:
        main()
    except DatasetError as e:  # a bad data file: its name, line and problem, without a traceback
        raise SystemExit(f"error: {e}") from None
