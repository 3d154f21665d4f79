"""RIL: unified reinforcement and imitation learning for vision-language models (Algorithm 2).

    torchrun --nproc_per_node=2 ril.py                   # the embedded run: builds what is missing, trains
    python ril.py --algo drgrpo                          # Algorithm 1 baseline, one process
    torchrun --nproc_per_node=8 ril.py --student /ckpt/Qwen2.5-VL-7B-Instruct --data rl.jsonl \
        --eval-data test.jsonl --answer-reward judge --judge /ckpt/Qwen2.5-32B-Instruct

Per batch of questions (Algorithm 2):
  1. pi_old <- pi_theta
  2. G student samples per question (rollout.generate) + G cached teacher responses  -> a group of 2G
  3. mu discriminator steps on the 2G responses (Eq. 1)
  4. R = r_sim + r_ans for all 2G, A_i = R_i - mean_j R_j over the group (Dr.GRPO: no std)
  5. mu policy steps on the clipped surrogate with a KL penalty (Eq. 2), teacher responses included
`--algo grpo|drgrpo` runs Algorithm 1 in the same code: G student samples, answer reward only.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.dataset import load_images, load_jsonl, step_rows, teacher_names, teacher_slots


# ----------------------------------------------------------------------------------------------------
# Config

@dataclass
class Config:
    # what to train ("" = the embedded world, built on the first run)
    student: str = ""              # student checkpoint (HF folder); also pi_ref, the SFT model
    data: str = ""                 # RL questions with cached teacher responses (JSONL schema)
    eval_data: str = ""            # held-out questions for accuracy before / after / during training
    sft_data: str = ""             # SFT rows (`response` field) for --stage sft
    discriminator: str = ""        # pre-trained discriminator; "" = pre-train one from the student
    judge: str = ""                # text-only judge LLM for --answer-reward judge
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
    repetition_penalty: float = 1.05
    lr: float = 1e-6               # student learning rate
    disc_lr: float = 1e-6          # discriminator learning rate (pre-training and RL)
    batch_size: int = 144          # questions per step, all ranks together
    steps: int = 1000              # RL steps
    loss_agg: str = "token-mean"   # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    max_new_tokens: int = 1024     # response length cap (also Dr.GRPO's constant normaliser)
    max_disc_len: int = 1024       # discriminator input cap, in tokens (longer: cut from the left)
    micro_batch: int = 32          # sequences per forward/backward (gradient accumulation within a step)
    grad_checkpointing: bool = False  # recompute activations in backward (real 3B/7B students need it)
    keep_gathered: bool = False    # FSDP2 reshard_after_forward=False for trained models: one all-gather fewer per
                                   # layer and step, the gathered weights held from forward to backward (memory)
    grad_clip: float = 1.0         # max gradient norm
    vision_lr_scale: float = 1.0   # the vision tower's (and projector's) lr as a fraction of --lr / --sft-lr
    # SFT warm start and discriminator pre-training
    sft_steps: int = 1000          # SFT steps
    sft_lr: float = 1e-5           # SFT learning rate, decayed linearly to a tenth (the paper: 1e-5 -> 1e-6)
    sft_batch_size: int = 64       # SFT sequences per step, all ranks together
    sft_micro_batch: int = 16      # SFT sequences per forward/backward, grouped by length (less padding)
    disc_steps: int = 500          # discriminator pre-training steps
    disc_batch_size: int = 32      # responses per pre-training step, half student half teacher
    disc_questions: int = 2000     # questions whose student samples pre-train the discriminator
    disc_samples: int = 16         # student samples per such question (the paper's N = 16)
    # bookkeeping
    out_dir: str = "runs"          # runs/<name>/ holds metrics.jsonl, summary.json, checkpoints/
    name: str = "ril"
    seed: int = 0
    eval_every: int = 0            # held-out accuracy every N RL steps (0 = only before and after)
    eval_limit: int = 0            # evaluate on the first N held-out rows (0 = all)
    save_every: int = 100          # checkpoint every N RL steps
    sample_every: int = 50         # print a few responses every N RL steps
    resume: bool = False           # continue runs/<name> from its latest checkpoint


# The embedded run trains a 1.2M-parameter model from scratch on two CPU cores in minutes: it needs larger
# learning rates than a pre-trained 7B model and far fewer, shorter steps. These values replace the paper's
# defaults only when no --student is given, and only for flags not set on the command line. The vision tower
# moves at a tenth of the lr: at the full SFT lr its patch embedding grew one shared "an object is here"
# direction until every object gave the same image token. 600 SFT steps: after 300 (plain SFT answers) the
# student named which cells held objects but the colour at each place at chance (0.35 of 4 colours); after 600
# (the current SFT data) it describes 100 fresh scenes with every place and colour right.
# The policy lr, KL weight and steps, measured from the 600-step SFT start (README). 100 steps at 2e-5 lost accuracy
# (0.23 -> 0.13); at 2e-4 and 5e-4 the student imitates the teachers' reasoning, but with beta = 0.01 the entropy
# of its own samples runs up (0.19 -> 3.5); beta = 0.1 keeps it under 3, and it falls again as the samples come
# right. Imitation needs steps more than lr: at 3e-4, beta 0.1 held-out accuracy went 0.23 -> 0.175 (step 50)
# -> 0.28 (100) -> 0.325 (150) -> 0.41 (200), where 100 steps at 2e-4 or 5e-4 stopped at 0.31.
EMBEDDED = dict(lr=3e-4, beta=0.1, vision_lr_scale=0.1, keep_gathered=True, disc_lr=1e-4, batch_size=16, steps=200,
                max_new_tokens=96, max_disc_len=192, micro_batch=32, sft_steps=600, sft_lr=2e-3, sft_batch_size=64,
                disc_steps=60, disc_batch_size=32, disc_questions=256, disc_samples=2, eval_limit=200, save_every=50,
                sample_every=50)
EMBEDDED_DIR = Path(__file__).parent / "data" / "embedded"
TINY_DIR = Path(__file__).parent / "checkpoints"


def parse_config(argv=None) -> Config:
    """argparse built from Config; embedded defaults apply when no --student is given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"without --student these defaults change (the embedded run): {EMBEDDED}")
    notes = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(Config), re.M))  # each field's comment
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":  # --flag / --no-flag (an EMBEDDED default can be turned off)
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=notes.get(f.name))
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=argparse.SUPPRESS,
                           help=f"{notes.get(f.name, '')} (default {f.default!r})")
    given = vars(p.parse_args(argv))
    cfg = Config(**{**(EMBEDDED if not given.get("student") else {}), **given})
    check_config(cfg)
    return cfg


TEACHER_ONLY = ("qwen3_vl_moe",)  # config.model_type of checkpoints that run as teachers only


def check_config(cfg: Config) -> None:
    """Fail before any work on values that cannot run."""
    choices = dict(stage=("all", "sft", "disc", "rl"), algo=("ril", "drgrpo", "grpo"),
                   similarity=("binary", "continuous", "off"), answer_reward=("rule", "judge", "off"),
                   loss_agg=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key.replace('_', '-')} must be one of {allowed}, got {getattr(cfg, key)!r}")
    for key in ("group_size", "mu", "batch_size", "max_new_tokens", "micro_batch", "sft_batch_size",
                "sft_micro_batch"):
        if getattr(cfg, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if cfg.algo == "grpo" and cfg.group_size < 2:
        raise SystemExit("--algo grpo needs --group-size >= 2 (the group std is undefined for one sample)")
    if cfg.answer_reward == "judge" and not cfg.judge:
        raise SystemExit("--answer-reward judge needs --judge PATH (a text-only LLM checkpoint)")
    if cfg.answer_reward == "off" and (cfg.algo != "ril" or cfg.similarity == "off"):
        raise SystemExit("--answer-reward off leaves no reward (Algorithm 1 has only the answer reward)")
    for key in ("student", "data", "eval_data", "sft_data", "discriminator", "judge"):
        path = getattr(cfg, key)
        if path and not Path(path).exists():
            raise SystemExit(f"--{key.replace('_', '-')}: {path} does not exist")
    config = Path(cfg.student or "", "config.json")
    model_type = json.loads(config.read_text()).get("model_type") if cfg.student and config.exists() else None
    if model_type in TEACHER_ONLY:
        raise SystemExit(f"--student {cfg.student} is a {model_type} checkpoint (mixture of experts): training an "
                         "MoE student is not supported (no expert parallelism, no router load-balancing loss); it "
                         f"runs as a teacher: python -m data.teacher_cache --data DATA --teacher NAME={cfg.student}")
    if cfg.student and cfg.stage in ("all", "rl") and not cfg.data:
        raise SystemExit("--student needs --data (questions with cached teacher responses) for RL")


# ----------------------------------------------------------------------------------------------------
# The math: advantages and the policy loss (Eq. 2)

def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = False, eps: float = 1e-6):
    """A_i = R_i - mean_j R_j within each group (Dr.GRPO); / (std_j R_j + eps) too for GRPO.

    rewards: [N] laid out group-major (N = groups * group_size). A group of equal rewards gives zeros.
    """
    r = rewards.view(-1, group_size)                                    # [groups, G]
    adv = r - r.mean(dim=1, keepdim=True)                               # [groups, G]
    if scale_by_std:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])  # Bessel
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
        k3 = exp(ref - logp) - (ref - logp) - 1   (non-negative; on tokens sampled from pi_theta an unbiased
                                                    estimate of KL(pi_theta || pi_ref); the teacher tokens are not)

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


# ----------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun; plain `python ril.py` runs as one process without FSDP)

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); nccl on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_sum(x: float | torch.Tensor) -> float:
    """Sum of a number over ranks (on the GPU under nccl, which reduces no CPU tensor)."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    t = torch.as_tensor(x, dtype=torch.float64, device="cuda" if nccl else None).clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shard(model: torch.nn.Module, device: torch.device, keep_gathered: bool = False) -> torch.nn.Module:
    """FSDP2: fully_shard every decoder layer and vision block (the model's `_no_split_modules`), then the root.

    GPU: bf16 parameters in compute, fp32 gradient reductions (fp32 master weights stay sharded).
    keep_gathered: a layer keeps its gathered weights from forward to backward instead of gathering them again.
    One process: no sharding.
    """
    if world_size() == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    for m in model.modules():
        if type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=not keep_gathered)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def length_batches(mask: torch.Tensor, size: int, group: int = 1) -> list[tuple[torch.Tensor, slice]]:
    """Micro-batches of about `size` sequences, each cut to its longest response (less padding, the same sums):
    (row indices, column slice) pairs over the response mask [N, T]. Rows come in whole groups of `group`
    consecutive rows (one prompt's responses, whose prompt then runs once), groups of similar lengths together."""
    longest = mask.sum(1).view(-1, group).amax(1)                            # [N / group]
    return [((g[:, None] * group + torch.arange(group, device=mask.device)).flatten(),
             slice(0, max(1, int(longest[g].max()))))
            for g in longest.argsort(stable=True).split(max(1, size // group))]


def sync_gradients(model: torch.nn.Module, last: bool) -> None:
    """FSDP2 gradient accumulation: keep a step's micro-batch gradients local and reduce-scatter once, with the
    last one (the same sum, one collective per layer instead of one per micro-batch)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole (unsharded) state dict on CPU, on rank 0 (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if world_size() == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optim_state(model, optimizer, state=None):
    """Get (state=None) or set the full optimizer state dict, the same on every rank count."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if state is None:
        return get_optimizer_state_dict(model, optimizer, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------------------------------
# Models and data

def load_student(path: str, device: torch.device, trainable: bool = True, checkpointing: bool = False,
                 keep_gathered: bool = False):
    """(model, tokenizer, image processor) from a checkpoint folder, through the Auto classes. With
    `checkpointing`, each layer's activations are recomputed in backward instead of stored."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    proc = AutoImageProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).to(device)
    model.requires_grad_(trainable)
    if checkpointing and trainable:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return shard(model.train(trainable), device, keep_gathered and trainable), tok, proc


def student_optimizer(model, lr: float, vision_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the student, the vision side (every parameter outside the language model and its head: the
    vision tower and the projector) at lr * vision_lr_scale, the rest at lr. No weight decay (as the paper)."""
    from rollout import text_model
    lm = {id(p) for p in text_model(model).parameters()} | {id(p) for p in model.get_output_embeddings().parameters()}
    vision = [p for p in model.parameters() if id(p) not in lm]
    groups = [dict(params=[p for p in model.parameters() if id(p) in lm], lr=lr)]
    groups += [dict(params=vision, lr=lr * vision_lr_scale)] if vision else []
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, foreach=True)  # (DTensors default to a per-tensor loop)


def save_pretrained(module, path: Path, *extras) -> None:
    """`save_pretrained` of the whole module (gathered from the shards) and of `extras` (tokenizer, image
    processor) on rank 0: the student folder then loads with `from_pretrained` and no project code."""
    sd = full_state_dict(module)
    if get_rank() == 0:
        module.save_pretrained(path, state_dict=sd)
        for extra in extras:
            extra.save_pretrained(path)


def student_rows(n: int, k: int, g: int) -> torch.Tensor:
    """[n] bool: which of n responses (k per question, the G student samples first) are the student's."""
    return (torch.arange(n) % k) < g


def decode(tok, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Response texts: the masked tokens of each row, special tokens dropped."""
    return [tok.decode(i[m].tolist(), skip_special_tokens=True) for i, m in zip(ids, mask)]


def to_device(tensors: dict, device) -> dict:
    """A dict's tensors on `device` (prompts are built on the CPU), other values as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in tensors.items()}


def pad_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad a [N, T] tensor with zeros to [N, width]."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def ensure_embedded(cfg: Config, rank: int) -> Config:
    """Without --student: build the embedded dataset and tiny student if missing (rank 0; the others wait) and
    point the data paths at them."""
    if cfg.student:
        return cfg
    if rank == 0:
        from data.build import build_missing
        build_missing(EMBEDDED_DIR, TINY_DIR / "tiny-student")
    barrier()
    return dataclasses.replace(cfg, data=cfg.data or str(EMBEDDED_DIR / "train.jsonl"),
                               eval_data=cfg.eval_data or str(EMBEDDED_DIR / "test.jsonl"),
                               sft_data=cfg.sft_data or str(EMBEDDED_DIR / "sft.jsonl"))


def held_out_accuracy(model, tok, proc, rows: list[dict], cfg: Config) -> float:
    """Greedy pass@1 on the held-out rows (evaluate.evaluate_model), rows split evenly over ranks."""
    from evaluate import evaluate_model
    rows = rows[:cfg.eval_limit] if cfg.eval_limit else rows
    rank, world = get_rank(), world_size()
    per = math.ceil(len(rows) / world)
    mine = (rows[rank * per:(rank + 1) * per] + rows[:per])[:per]  # equal counts: FSDP needs the same calls
    n_real = max(0, min(per, len(rows) - rank * per))
    res = evaluate_model(model, tok, proc, mine, temperature=0.0, max_new_tokens=cfg.max_new_tokens,
                         batch_size=32)
    return all_sum(sum(res["correct"][:n_real])) / len(rows)


# ----------------------------------------------------------------------------------------------------
# Stage 1: SFT warm start (cross-entropy on the response tokens; prompt tokens masked)

def token_mean_scale(local_count: float, global_count: float) -> float:
    """Factor that turns a local mean into its share of the global mean: FSDP averages gradients over ranks,
    so a rank's loss is weighted by world * local / global. 2 processes then equal 1 with the same batch."""
    return world_size() * local_count / max(global_count, 1.0)


def sft(cfg: Config, init: str, out: Path, device, rank: int) -> None:
    """Fine-tune `init` on cfg.sft_data for cfg.sft_steps and save it to `out` (save_pretrained)."""
    from rollout import encode_prompts, encode_responses, response_logprobs
    all_rows = load_jsonl(cfg.sft_data)
    rows = [r for r in all_rows if "response" in r]
    if not rows:
        raise SystemExit(f"{cfg.sft_data}: no row has a `response` field to fine-tune on")
    if cfg.sft_batch_size % world_size():
        raise SystemExit(f"--sft-batch-size {cfg.sft_batch_size} must be a multiple of the {world_size()} processes")
    if rank == 0 and len(rows) < len(all_rows):
        print(f"sft: {len(all_rows) - len(rows)} of {len(all_rows)} rows have no `response`: skipped", flush=True)
    model, tok, proc = load_student(init, device, checkpointing=cfg.grad_checkpointing, keep_gathered=cfg.keep_gathered)
    opt = student_optimizer(model, cfg.sft_lr, cfg.vision_lr_scale)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - 0.9 * s / max(1, cfg.sft_steps))  # lr -> lr/10
    bar = tqdm(range(cfg.sft_steps), desc="sft", disable=rank != 0)
    for step in bar:
        batch = step_rows(rows, step, cfg.sft_batch_size, cfg.seed, get_rank(), world_size())
        ids, mask, _ = encode_responses(tok, [r["response"] for r in batch], cfg.max_new_tokens, tok.eos_token_id)
        ids, mask = ids.to(device), mask.to(device)                                       # [b, T]
        total = all_sum(mask.sum())
        micro, nll = length_batches(mask, cfg.sft_micro_batch), 0.0  # each adds its share of the global token mean
        for i, (mb, w) in enumerate(micro):
            sync_gradients(model, i == len(micro) - 1)
            part = [batch[j] for j in mb.tolist()]
            prompts = to_device(encode_prompts(tok, proc, [r["question"] for r in part], load_images(part),
                                               family=model.config.model_type), device)
            logp = response_logprobs(model, prompts, ids[mb, w], mask[mb, w])            # [mb, t]
            loss = -(logp * mask[mb, w]).sum() / total                                    # token-mean cross-entropy
            (loss * world_size()).backward()                # FSDP averages gradients over ranks
            nll += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{all_sum(nll):.3f}")
    save_pretrained(model, out, tok, proc)
    barrier()


# ----------------------------------------------------------------------------------------------------
# Stage 2: discriminator pre-training on student samples vs cached teacher responses (Eq. 1)

def imitated_teachers(cfg: Config, rows: list[dict]) -> list[str]:
    """--teachers, or every teacher cached in every row; a clear message when one is missing."""
    try:
        return teacher_names(rows, cfg.teachers)
    except ValueError as e:
        raise SystemExit(f"{cfg.data}: {e}") from None


def pretrain_discriminator(cfg: Config, student: str, out: Path, device, rank: int) -> None:
    """Sample the student on cfg.disc_questions questions (cfg.disc_samples each, RL sampling settings; or take its
    cached samples, the `students` field, when every row has them), take every cached response of the chosen
    teachers on them (all labelled teacher), train D, save it to `out`."""
    from discriminator import Discriminator, pretrain
    from rollout import encode_prompts, encode_responses, generate
    rows = load_jsonl(cfg.data)
    names = imitated_teachers(cfg, rows)
    cached = all("students" in r for r in rows)  # written by data/teacher_cache.py --field students
    n = min(cfg.disc_questions, len(rows)) // world_size() * world_size()
    rows = step_rows(rows, 0, n, cfg.seed + 1, rank, world_size())
    model, tok, proc = load_student(student, device, trainable=False)
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    student_texts = [t for r in rows for ts in r["students"].values() for t in ts] if cached else []
    for i in tqdm([] if cached else range(0, len(rows), 16), desc="student samples for D", disable=rank != 0):
        batch = rows[i:i + 16]
        prompts = to_device(encode_prompts(tok, proc, [r["question"] for r in batch], load_images(batch),
                                           family=model.config.model_type), device)
        out_ = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, num_samples=cfg.disc_samples,
                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                        repetition_penalty=cfg.repetition_penalty, generator=gen)
        student_texts += decode(tok, out_.response_ids, out_.response_mask)
    teacher_texts = [t for r in rows for n in names for t in r["teachers"][n]]  # as RL gives them to D: cut, decoded
    teacher_texts = decode(tok, *encode_responses(tok, teacher_texts, cfg.max_new_tokens, tok.eos_token_id)[:2])
    del model
    disc = shard(Discriminator.from_student(student).to(device), device, cfg.keep_gathered)
    opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, weight_decay=0.0)
    stats = pretrain(disc, opt, tok, student_texts, teacher_texts, steps=cfg.disc_steps,
                     batch_size=max(1, cfg.disc_batch_size // (2 * world_size())), max_len=cfg.max_disc_len,
                     seed=cfg.seed * 1000 + rank, log_every=max(1, cfg.disc_steps // 5))
    if rank == 0:
        print(f"discriminator pre-trained on {len(student_texts)} {'cached' if cached else 'sampled'} student responses"
              f" per rank: {stats['steps']} steps, {stats['seconds']:.0f}s, "
              f"last-batch accuracy {stats['accuracy']:.3f}", flush=True)
    save_pretrained(disc, out)
    barrier()


# ----------------------------------------------------------------------------------------------------
# Stage 3: the RL loop (Algorithm 2; Algorithm 1 with --algo grpo|drgrpo)

def sample_group(cfg: Config, step: int, batch: list[dict], m: dict, names: list[str], gen: torch.Generator):
    """Algorithm 2, steps 1-2: G student samples per question (pi_old = pi_theta now) and, for RIL, G cached
    teacher responses, laid out group-major: [q0: G student, G teacher | q1: ...]. Returns
    (prompts, ids [N, T], mask [N, T], k = responses per question, n teacher responses truncated)."""
    from rollout import encode_prompts, encode_responses, generate
    G, tok = cfg.group_size, m["tok"]
    prompts = to_device(encode_prompts(tok, m["proc"], [r["question"] for r in batch], load_images(batch),
                                       family=m["policy"].config.model_type), m["device"])
    with torch.no_grad():
        roll = generate(m["policy"], prompts, max_new_tokens=cfg.max_new_tokens, num_samples=G,
                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                        repetition_penalty=cfg.repetition_penalty, generator=gen)
    ids, mask = roll.response_ids, roll.response_mask                        # [b*G, T]
    if cfg.algo != "ril":
        return prompts, ids, mask, G, 0
    texts = [s for r in batch for s in teacher_slots(r, names, G, random.Random(f"{cfg.seed}-{step}-{r['id']}"))]
    t_ids, t_mask, n_trunc = encode_responses(tok, texts, cfg.max_new_tokens, tok.eos_token_id)
    t_ids, t_mask = t_ids.to(ids.device), t_mask.to(ids.device)                # [b*G, T']
    width = max(ids.shape[1], t_ids.shape[1])
    per_q = lambda x: pad_cols(x, width).view(len(batch), G, width)         # [b, G, T]
    ids = torch.cat([per_q(ids), per_q(t_ids)], 1).view(-1, width)           # [b*2G, T]
    mask = torch.cat([per_q(mask), per_q(t_mask)], 1).view(-1, width)
    return prompts, ids, mask, 2 * G, n_trunc


def rewards(cfg: Config, batch: list[dict], texts: list[str], k: int, m: dict, out: dict):
    """Algorithm 2, step 4: R = r_sim + r_ans for every response (Algorithm 1: r_ans only). Returns (R [N], parts)."""
    from rewards import combine_rewards, judge_rewards, rule_rewards, similarity_reward
    answers = [r["answer"] for r in batch for _ in range(k)]
    r_ans = r_sim = None
    if cfg.answer_reward == "rule":
        r_ans = rule_rewards(texts, answers)[0]                              # [N]
    elif cfg.answer_reward == "judge":
        questions = [r["question"] for r in batch for _ in range(k)]
        r_ans, jstats = judge_rewards(m["judge"], m["judge_tok"], questions, answers, texts)
        out.update({f"judge/{a}": b for a, b in jstats.items()})
    if "disc" in m:
        from discriminator import p_student
        p = p_student(m["disc"], m["tok"], texts, cfg.max_disc_len, batch_size=cfg.micro_batch)   # [N] D(o)
        r_sim = similarity_reward(p, mode=cfg.similarity)
        is_student = student_rows(len(texts), k, cfg.group_size)
        out["disc/p_student_on_student"] = p[is_student].mean().item()
        out["disc/p_student_on_teacher"] = p[~is_student].mean().item()
    return combine_rewards(r_sim, r_ans)


def policy_update(cfg: Config, m: dict, prompts: dict, ids, mask, adv, k: int) -> dict:
    """Algorithm 2, step 5: mu steps of Eq. 2 over all responses (teacher ones included), in micro-batches of
    whole questions (a prompt runs once for its k responses) of similar lengths. Token means divide by the global
    token count, so the update does not depend on the split."""
    from rollout import response_logprobs, select_prompts
    policy, temp = m["policy"], cfg.temperature or 1.0  # greedy runs score log-probs at T = 1
    count = lambda msk: msk.sum().item() if cfg.loss_agg == "token-mean" else float(msk.shape[0])
    total = all_sum(count(mask))
    micro = length_batches(mask, cfg.micro_batch, group=k)                              # (rows, columns)
    micro_prompts = [select_prompts(prompts, s[::k] // k) for s, _ in micro]           # one row per question
    with torch.no_grad():  # pi_old (with mu = 1 it equals pi_theta: reuse the live log-probs, detached) and pi_ref
        old = [response_logprobs(policy, p, ids[s, w], mask[s, w], temp) if cfg.mu > 1 else None
               for (s, w), p in zip(micro, micro_prompts)]
        ref = [response_logprobs(m["ref"], p, ids[s, w], mask[s, w], temp) if cfg.beta else None
               for (s, w), p in zip(micro, micro_prompts)]
    is_student = student_rows(ids.shape[0], k, cfg.group_size).to(mask.device)[:, None] & mask   # [N, T]
    stats, skipped, ent = [], 0, [0.0, 0.0]
    for _ in range(cfg.mu):
        loss_sum = 0.0
        for j, ((s, w), p) in enumerate(zip(micro, micro_prompts)):
            sync_gradients(policy, j == len(micro) - 1)
            logp, entropy = response_logprobs(policy, p, ids[s, w], mask[s, w], temp, return_entropy=True)  # [n, t]
            loss, st = policy_loss(logp, old[j] if old[j] is not None else logp.detach(), ref[j], adv[s], mask[s, w],
                                   clip_eps=cfg.clip_eps, beta=cfg.beta, agg=cfg.loss_agg,
                                   norm_len=cfg.max_new_tokens)
            (loss * token_mean_scale(count(mask[s]), total)).backward()
            loss_sum += loss.item() * count(mask[s]) / max(count(mask), 1)
            stats.append(st)
            ent = [ent[0] + (entropy.detach() * is_student[s, w]).sum().item(), ent[1] + is_student[s, w].sum().item()]
        gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        gnorm = (gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm).item()
        if all_sum(float(not (math.isfinite(gnorm) and math.isfinite(loss_sum)))) > 0:
            skipped += 1                                                     # never reaches the weights
        else:
            m["popt"].step()
        m["popt"].zero_grad(set_to_none=True)
    return {"policy/loss": loss_sum, "policy/kl": sum(x["kl"] for x in stats) / len(stats),
            "policy/clip_frac": sum(x["clip_frac"] for x in stats) / len(stats),
            "policy/ratio_min": min(x["ratio_min"] for x in stats), "policy/ratio_max": max(x["ratio_max"] for x in stats),
            "policy/entropy": ent[0] / max(ent[1], 1), "policy/grad_norm": gnorm, "policy/skipped": skipped}


def rl_step(cfg: Config, step: int, batch: list[dict], m: dict, names: list[str], gen: torch.Generator) -> dict:
    """One batch of Algorithm 2 (Algorithm 1 for --algo grpo|drgrpo) on this rank's questions; its metrics.
    m holds device, policy, ref, tok, proc, popt; for RIL disc, dopt; judge, judge_tok for the judge reward."""
    t0 = time.time()
    prompts, ids, mask, k, n_trunc = sample_group(cfg, step, batch, m, names, gen)       # steps 1-2
    texts = decode(m["tok"], ids, mask)
    is_student = student_rows(ids.shape[0], k, cfg.group_size)                             # [N]
    t1, out = time.time(), {}
    if "disc" in m and not cfg.freeze_disc:                                                # step 3: Eq. 1
        from discriminator import update
        s_txt = [x for x, s in zip(texts, is_student) if s]
        t_txt = [x for x, s in zip(texts, is_student) if not s]
        for _ in range(cfg.mu):
            out.update({f"disc/{a}": b for a, b in update(m["disc"], m["dopt"], m["tok"], s_txt, t_txt,
                                                          cfg.max_disc_len, micro_batch_size=cfg.micro_batch).items()})
    t2 = time.time()
    R, parts = rewards(cfg, batch, texts, k, m, out)                                       # step 4
    adv = group_advantages(R.float(), k, scale_by_std=cfg.algo == "grpo").to(mask.device)  # [N]
    t3 = time.time()
    out.update(policy_update(cfg, m, prompts, ids, mask, adv, k))                          # step 5
    t4 = time.time()
    lengths = mask[is_student.to(mask.device)].sum(1).float()
    part = lambda key, rows: parts[key][rows].mean().item() if parts[key] is not None else None
    out.update({
        "reward/total": R[is_student].mean().item(), "reward/answer": part("r_ans", is_student),
        "reward/similarity": part("r_sim", is_student),
        "reward/teacher_answer": part("r_ans", ~is_student) if k > cfg.group_size else None,
        "response/length": lengths.mean().item(), "response/length_max": lengths.max().item(),
        "response/truncated_teacher": n_trunc, "tokens_per_s": lengths.sum().item() / max(t1 - t0, 1e-9),
        "time/rollout": t1 - t0, "time/disc": t2 - t1, "time/rewards": t3 - t2, "time/update": t4 - t3,
        "_sample": (batch[0]["question"], batch[0]["answer"], texts[0], R[0].item()),
    })
    return out


# ----------------------------------------------------------------------------------------------------
# Checkpoints: atomic, resumable

def save_checkpoint(run: Path, step: int, m: dict, state: dict, gen: torch.Generator) -> None:
    """runs/<name>/checkpoints/step-N: student (save_pretrained), discriminator, optimizers, RNG, step.
    Written to a temporary folder and renamed, then `latest` is replaced atomically."""
    rank = get_rank()
    tmp, final = run / "checkpoints" / f"step-{step}.tmp", run / "checkpoints" / f"step-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_pretrained(m["policy"], tmp / "student", m["tok"], m["proc"])
    optim = {"policy": optim_state(m["policy"], m["popt"])}
    if "disc" in m:
        save_pretrained(m["disc"], tmp / "discriminator")
        optim["disc"] = optim_state(m["disc"], m["dopt"])
    torch.save({"generator": gen.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()},
               tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        torch.save(optim, tmp / "optimizers.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step)))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (run / "checkpoints" / "latest.tmp").write_text(final.name)
        os.replace(run / "checkpoints" / "latest.tmp", run / "checkpoints" / "latest")
    barrier()


def load_checkpoint(ckpt: Path, m: dict, gen: torch.Generator) -> dict:
    """The optimizer and RNG states of a checkpoint into m["popt"], m["dopt"] and `gen` (the weights are loaded
    with the models); returns the saved state (step, counters)."""
    optim = torch.load(ckpt / "optimizers.pt", weights_only=False)
    optim_state(m["policy"], m["popt"], optim["policy"])
    if "disc" in m:
        optim_state(m["disc"], m["dopt"], optim["disc"])
    rng = torch.load(ckpt / f"rng-rank{get_rank()}.pt", weights_only=False)
    gen.set_state(rng["generator"]), torch.set_rng_state(rng["torch"]), random.setstate(rng["python"])
    return json.loads((ckpt / "state.json").read_text())


def latest_checkpoint(run: Path) -> Path | None:
    p = run / "checkpoints" / "latest"
    return run / "checkpoints" / p.read_text().strip() if p.exists() else None


# ----------------------------------------------------------------------------------------------------
# main

def train_rl(cfg: Config, student: str, disc_path: str | None, run: Path, device, rank: int) -> dict:
    """The RL stage; returns the summary (held-out accuracy before and after)."""
    rows, eval_rows = load_jsonl(cfg.data), load_jsonl(cfg.eval_data) if cfg.eval_data else []
    ril = cfg.algo == "ril"
    names = imitated_teachers(cfg, rows) if ril else []
    if cfg.batch_size % world_size():
        raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of the {world_size()} processes")
    ckpt = latest_checkpoint(run) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise SystemExit(f"--resume: no checkpoint in {run / 'checkpoints'}")
    m = {"device": device}
    m["policy"], m["tok"], m["proc"] = load_student(str(ckpt / "student") if ckpt else student, device,
                                                    checkpointing=cfg.grad_checkpointing,
                                                    keep_gathered=cfg.keep_gathered)
    m["ref"] = load_student(student, device, trainable=False)[0] if cfg.beta else None
    m["popt"] = student_optimizer(m["policy"], cfg.lr, cfg.vision_lr_scale)
    if ril and cfg.similarity != "off":
        from discriminator import Discriminator
        m["disc"] = shard(Discriminator.from_pretrained(str(ckpt / "discriminator") if ckpt else disc_path)
                          .to(device).train(not cfg.freeze_disc), device, cfg.keep_gathered and not cfg.freeze_disc)
        m["dopt"] = torch.optim.AdamW(m["disc"].parameters(), lr=cfg.disc_lr, weight_decay=0.0)
    if cfg.answer_reward == "judge":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m["judge_tok"] = AutoTokenizer.from_pretrained(cfg.judge)
        m["judge"] = AutoModelForCausalLM.from_pretrained(cfg.judge, dtype=torch.bfloat16 if device.type == "cuda"
                                                          else torch.float32).to(device).eval()
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    state = {"skipped": 0, "accuracy_before": None}
    if ckpt:
        state = load_checkpoint(ckpt, m, gen)
    elif eval_rows:
        state["accuracy_before"] = held_out_accuracy(m["policy"], m["tok"], m["proc"], eval_rows, cfg)
        if rank == 0:
            print(f"held-out accuracy before RL: {state['accuracy_before']:.3f}", flush=True)
    metrics_path = run / "metrics.jsonl"
    if rank == 0:  # a resumed run keeps only the rows up to its checkpoint
        kept = [l for l in (metrics_path.read_text().splitlines() if ckpt and metrics_path.exists() else [])
                if json.loads(l)["step"] <= state["step"]]
        metrics_path.write_text("".join(l + "\n" for l in kept))
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    start = state.get("step", 0)
    bar = tqdm(range(start, cfg.steps), desc=cfg.algo, disable=rank != 0, initial=start, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        batch = step_rows(rows, step, cfg.batch_size, cfg.seed, get_rank(), world_size())
        out = rl_step(cfg, step, batch, m, names, gen)
        state["skipped"] += out["policy/skipped"]
        sample = out.pop("_sample")
        out = {"step": step + 1, **{k: v for k, v in out.items() if v is not None}, "time/step": time.time() - t0}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and eval_rows:
            out["eval/accuracy"] = held_out_accuracy(m["policy"], m["tok"], m["proc"], eval_rows, cfg)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(out) + "\n")
            bar.set_postfix({"R": f"{out['reward/total']:.2f}", "acc": f"{out.get('reward/answer', 0):.2f}",
                             "sim": f"{out.get('reward/similarity', 0):.2f}", "len": f"{out['response/length']:.0f}"})
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                tqdm.write(f"[step {step + 1}] Q: {sample[0]} (answer {sample[1]})\n  -> {sample[2]!r} R={sample[3]}")
        last = step + 1 == cfg.steps
        stopping = all_sum(float(stop["flag"])) > 0
        if last or stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            save_checkpoint(run, step + 1, m, state, gen)
        if stopping:
            if rank == 0:
                print(f"SIGTERM: saved step {step + 1} and stopped", flush=True)
            sys.exit(0)
    summary = {"accuracy_before": state["accuracy_before"], "skipped_steps": state["skipped"],
               "config": dataclasses.asdict(cfg)}
    if eval_rows:
        summary["accuracy_after"] = held_out_accuracy(m["policy"], m["tok"], m["proc"], eval_rows, cfg)
    return summary


def main(argv=None) -> None:
    cfg = parse_config(argv)
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    cfg = ensure_embedded(cfg, rank)
    run = Path(cfg.out_dir) / cfg.name
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    student, disc = cfg.student, cfg.discriminator
    if not cfg.student:  # the embedded pipeline: reuse each stage's output when it exists
        student = str(TINY_DIR / "tiny-sft")
        if cfg.stage == "sft" or (cfg.stage == "all" and not (Path(student) / "config.json").exists()):
            sft(cfg, str(TINY_DIR / "tiny-student"), Path(student), device, rank)
        elif not (Path(student) / "config.json").exists():
            raise SystemExit(f"--stage {cfg.stage}: no SFT student in {student}; run `ril.py --stage sft` "
                             "(or the whole pipeline) first")
        disc = disc or str(TINY_DIR / "tiny-disc")
    elif cfg.stage == "sft":
        sft(cfg, cfg.student, run / "sft", device, rank)
    needs_disc = cfg.algo == "ril" and cfg.similarity != "off" and cfg.stage in ("all", "disc", "rl")
    if needs_disc and (cfg.stage == "disc" or not disc or not (Path(disc) / "config.json").exists()):
        disc = disc or str(run / "discriminator")
        pretrain_discriminator(cfg, student, Path(disc), device, rank)
    if cfg.stage in ("all", "rl"):
        summary = train_rl(cfg, student, disc, run, device, rank)
        summary["wall_clock_s"] = time.time() - t0
        if rank == 0:
            (run / "summary.json").write_text(json.dumps(summary, indent=1))
            print(f"held-out accuracy: before {summary['accuracy_before']} -> after {summary.get('accuracy_after')} "
                  f"({summary['wall_clock_s']:.0f}s, {summary['skipped_steps']} skipped steps)", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
