"""torchrun / FSDP2 plumbing for ril.py: the process group, collectives, sharding, full state dicts, atomic
checkpoints and SIGTERM. Nothing here is RIL: ril.py calls these by name (`distributed.all_sum(...)`).

- `setup` starts the process group under torchrun (nccl on GPUs, gloo on CPU); plain `python ril.py` runs as
  one process, where every function below degrades to its one-process meaning (a sum of one, no sharding).
- `shard`: FSDP2's `fully_shard` on every decoder layer and vision block, then the root; bf16 compute with
  fp32 reductions on GPUs. `load_pretrained` loads a checkpoint by path and shards it; `length_batches` cuts a
  step into micro-batches for gradient accumulation.
- Token means across processes: `token_mean_scale` weights a rank's local mean so that FSDP's gradient average
  equals the mean over every token of the global batch (2 processes = 1 process with the same batch).
- Checkpoints are written to a temporary folder, renamed, then `latest` is replaced atomically: a kill at any
  moment leaves the previous checkpoint whole.
- `Loop` is the step loop every stage shares (SFT, discriminator pre-training, RL): resume from the latest
  checkpoint, a checkpoint every N steps and at the end, SIGTERM (or a dead torchrun agent) saves and stops,
  K skipped updates in a row stop the run; `optimizer_step` skips a non-finite update and measures the rest.
"""
from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

import attention
import rollout

# ---- The process group and collectives ---------------------------------------------------------------------
def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); nccl on GPUs, gloo on CPU, one process without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")

def teardown() -> None:
    """Leave the process group together: gloo aborts a rank that tears down while its peer still works. The
    stages' sharded models are reference cycles (modules, hooks, FSDP state) that hold the group's mesh: they
    are collected here, while the group and the interpreter are alive, not during the interpreter's shutdown
    (where a gloo rank has been seen to abort at exit: "terminate called without an active exception")."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()

def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0

def all_sum(x: float | torch.Tensor) -> float:
    """Sum of a number over ranks (on the GPU under nccl, which reduces no CPU tensor)."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    t = torch.as_tensor(x, dtype=torch.float64, device="cuda" if nccl else None).clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item()

def all_gather_list(values: list) -> list:
    """Every rank's list, concatenated in rank order (one process: the list itself)."""
    if not dist.is_initialized():
        return list(values)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]

def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

def token_mean_scale(local_count: float, global_count: float) -> float:
    """Factor that turns a local mean into its share of the global mean: FSDP averages gradients over ranks,
    so a rank's loss is weighted by world * local / global. 2 processes then equal 1 with the same batch."""
    return world_size() * local_count / max(global_count, 1.0)

# ---- FSDP2 -------------------------------------------------------------------------------------------------
def shard(model: torch.nn.Module, device: torch.device, keep_gathered: bool = False) -> torch.nn.Module:
    """FSDP2: fully_shard every decoder layer and vision block (`_no_split_modules`), then the root.

    GPU: bf16 parameters in compute, fp32 gradient reductions (fp32 master weights stay sharded).
    keep_gathered: a layer keeps its gathered weights from forward to backward instead of gathering them
    again. One process: no sharding."""
    if world_size() == 1:
        return model
    mesh = init_device_mesh(device.type, (world_size(),))
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    for m in model.modules():
        if type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=not keep_gathered)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model

def load_pretrained(path: str, device: torch.device, trainable: bool = True, checkpointing: bool = False,
                    keep_gathered: bool = False):
    """(model, tokenizer, image processor) of a VLM checkpoint folder, through the Auto classes, in fp32,
    its language model on attention.block_attention (the same values as sdpa; packed log-probs faster),
    sharded with `shard`. With `checkpointing`, each layer's activations are recomputed in backward instead
    of stored."""
    tok = AutoTokenizer.from_pretrained(path)
    proc = AutoImageProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).to(device)
    attention.use_block_attention(model)
    model.requires_grad_(trainable)
    if checkpointing and trainable:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return shard(model.train(trainable), device, keep_gathered and trainable), tok, proc

TEACHER_ONLY = ("qwen3_vl_moe",)  # config.model_type of checkpoints that run as teachers only

def check_student(path: str) -> None:
    """Before any model loads: `path` is a checkpoint folder of a model this project can train."""
    if not (Path(path) / "config.json").exists():
        raise SystemExit(f"--student: {path} is not a checkpoint folder (no config.json)")
    model_type = json.loads(Path(path, "config.json").read_text()).get("model_type")
    if model_type in TEACHER_ONLY:
        raise SystemExit(f"--student {path} is a {model_type} checkpoint (mixture of experts): "
                         "training an MoE student is not supported (no expert parallelism, no router "
                         "load-balancing loss); it runs as a teacher: "
                         "python -m data.teacher_cache --data DATA --teacher NAME=PATH")

def sampler_defaults(model, tok, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                     repetition_penalty: float) -> None:
    """Make the student's generation_config (saved with it) describe rollout.generate, so that a saved student
    run with `from_pretrained` + `generate` and no arguments samples as the run does: the image and video
    placeholders suppressed, EOS and pad set, the run's sampling settings and response cap."""
    gc = model.generation_config
    gc.suppress_tokens = rollout.placeholder_ids(model)
    gc.eos_token_id = rollout.eos_list(model, None) or [tok.eos_token_id]
    gc.pad_token_id = tok.pad_token_id
    gc.do_sample = temperature > 0
    gc.temperature = temperature if gc.do_sample else None
    gc.top_p = top_p if gc.do_sample else None
    gc.top_k = top_k if gc.do_sample else None
    gc.repetition_penalty = repetition_penalty
    gc.max_new_tokens = max_new_tokens

def student_optimizer(model, lr: float, vision_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the (sharded) student, the vision side (every parameter outside the language model and its
    head: the vision tower and the projector) at lr * vision_lr_scale, the rest at lr. No weight decay."""
    lm = {id(p) for p in rollout.text_model(model).parameters()}
    lm |= {id(p) for p in model.get_output_embeddings().parameters()}
    vision = [p for p in model.parameters() if id(p) not in lm]
    groups = [dict(params=[p for p in model.parameters() if id(p) in lm], lr=lr)]
    if vision:
        groups.append(dict(params=vision, lr=lr * vision_lr_scale))
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, foreach=True)  # DTensors: else one per tensor

def length_batches(mask: torch.Tensor, size: int, group: int = 1) -> list[tuple[torch.Tensor, slice]]:
    """Micro-batches (gradient accumulation) of about `size` sequences, each cut to its longest response: less
    padding, the same sums. (row indices, column slice) pairs over the response mask [N, T]. Rows come in
    whole groups of `group` consecutive rows (one prompt's responses, whose prompt then runs once), groups of
    similar lengths together.

        lengths [3, 1, 9, 8 | 2, 2, 1, 1], group=4, size=4  ->  (rows [4, 5, 6, 7], cols :2),
                                                                (rows [0, 1, 2, 3], cols :9)"""
    longest = mask.sum(1).view(-1, group).amax(1)                            # [N / group]
    out = []
    for g in longest.argsort(stable=True).split(max(1, size // group)):    # groups, shortest first
        rows = (g[:, None] * group + torch.arange(group, device=mask.device)).flatten()
        out.append((rows, slice(0, max(1, int(longest[g].max())))))
    return out

def sync_gradients(model: torch.nn.Module, last: bool) -> None:
    """FSDP2 gradient accumulation: keep a step's micro-batch gradients local and reduce-scatter once, with
    the last one (the same sum, one collective per layer instead of one per micro-batch)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)

def grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients to `max_norm` and return their norm before clipping (a DTensor under FSDP2)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()

def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole (unsharded) state dict on CPU, on rank 0 (a collective under FSDP)."""
    if world_size() == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

def optim_state(model, optimizer, state=None):
    """Get (state=None) or set the full optimizer state dict, the same on every rank count."""
    if state is None:
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))

def save_pretrained(module, path: Path, *extras) -> None:
    """`save_pretrained` of the whole module (gathered from the shards) and of `extras` (tokenizer, image
    processor) on rank 0: the folder then loads with `from_pretrained` and no project code."""
    sd = full_state_dict(module)
    if rank() == 0:
        module.save_pretrained(path, state_dict=sd)
        for extra in extras:
            extra.save_pretrained(path)

# ---- Checkpoints: atomic, resumable ------------------------------------------------------------------------
def prepare_run(run: Path, writes: tuple[str, ...], resume: bool, overwrite: bool, config: dict) -> None:
    """Before any work: refuse a run folder that holds what this command writes (`writes`) unless resuming or
    overwriting (which deletes it first); write config.json, so a folder that cannot be written fails now."""
    if any((run / f).exists() for f in writes) and not (resume or overwrite):
        raise SystemExit(f"{run} already holds a run: --resume continues it, --overwrite starts it again, "
                         "--name NAME starts another")
    if rank() == 0:
        try:
            run.mkdir(parents=True, exist_ok=True)
            for f in writes if overwrite and not resume else ():
                if (run / f).is_dir():
                    shutil.rmtree(run / f)
                else:
                    (run / f).unlink(missing_ok=True)
            (run / "config.json").write_text(json.dumps(config, indent=1))
        except OSError as e:
            raise SystemExit(f"cannot write the run folder {run}: {e}") from None
    barrier()

def save_checkpoint(run: Path, step: int, trained: dict, state: dict, gen: torch.Generator,
                    keep: int = 0) -> None:
    """runs/<name>/checkpoints/step-N: each trained model (save_pretrained into its own folder), the
    optimizers, every rank's RNG, and `state` (JSON) with the step. trained: {folder name: (model,
    optimizer, extras)}. Written to a temporary folder and renamed, then `latest` is replaced atomically;
    then all but the `keep` newest checkpoints are deleted (0: keep every one)."""
    me = rank()
    tmp = run / "checkpoints" / f"step-{step}.tmp"
    final = run / "checkpoints" / f"step-{step}"
    if me == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    optim = {}
    for name, (model, optimizer, extras) in trained.items():
        save_pretrained(model, tmp / name, *extras)
        optim[name] = optim_state(model, optimizer)
    rng = {"generator": gen.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save(rng, tmp / f"rng-rank{me}.pt")
    if me == 0:
        torch.save(optim, tmp / "optimizers.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step)))
    barrier()
    if me == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (run / "checkpoints" / "latest.tmp").write_text(final.name)
        os.replace(run / "checkpoints" / "latest.tmp", run / "checkpoints" / "latest")
        steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*") if p.name[5:].isdigit())
        for old in steps[:-keep] if keep else []:
            shutil.rmtree(run / "checkpoints" / f"step-{old}", ignore_errors=True)
    barrier()

def load_checkpoint(ckpt: Path, trained: dict, gen: torch.Generator) -> dict:
    """The optimizer and RNG states of a checkpoint into the optimizers of `trained` and into `gen` (the
    weights are loaded with the models); returns the saved state (step, counters)."""
    optim = torch.load(ckpt / "optimizers.pt", weights_only=False)
    for name, (model, optimizer, _) in trained.items():
        optim_state(model, optimizer, optim[name])
    saved_by = len(list(ckpt.glob("rng-rank*.pt")))
    if saved_by != world_size():
        raise SystemExit(f"{ckpt} was saved by {saved_by} processes: resume it with --nproc_per_node="
                         f"{saved_by} (each process's sampling RNG is part of the checkpoint)")
    rng = torch.load(ckpt / f"rng-rank{rank()}.pt", weights_only=False)
    gen.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return json.loads((ckpt / "state.json").read_text())

def latest_checkpoint(run: Path) -> Path | None:
    p = run / "checkpoints" / "latest"
    return run / "checkpoints" / p.read_text().strip() if p.exists() else None

# ---- SIGTERM: finish the step, save, stop ------------------------------------------------------------------
_SIGTERM = {"received": False}  # set by the handler; read through stop_requested()
_PARENT = os.getppid()          # under torchrun: the agent; a worker whose agent died is re-parented

def catch_sigterm() -> None:
    """From now on SIGTERM only sets a flag; the training loop saves and stops at its next check."""
    signal.signal(signal.SIGTERM, _on_sigterm)

def _on_sigterm(signum, frame) -> None:
    _SIGTERM["received"] = True

def launcher_gone() -> bool:
    """Whether this torchrun worker's agent has died (the worker was re-parented): nobody would restart or
    stop it, so it saves and stops like on SIGTERM instead of training on unwatched."""
    return "TORCHELASTIC_RUN_ID" in os.environ and os.getppid() != _PARENT

def stop_requested() -> bool:
    """Whether any rank has received SIGTERM or lost its agent (a collective: every rank gets the same
    answer, so every rank must call it at the same points)."""
    return all_sum(float(_SIGTERM["received"] or launcher_gone())) > 0

# ---- The step loop every stage shares ----------------------------------------------------------------------
def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
                   loss: float) -> dict:
    """Clip the gradients and step, unless the loss or the gradient norm is not finite on some rank: then the
    step is skipped and the weights stay as they were. Zeroes the gradients either way. Returns grad_norm,
    skipped (0 / 1) and update = ||theta_after - theta_before|| / ||theta_before|| over every parameter the
    optimizer holds (0 when skipped): a finite but wrecking step (too large a learning rate) shows here."""
    norm = grad_norm(model, max_norm)
    skipped = all_sum(float(not (math.isfinite(norm) and math.isfinite(loss)))) > 0
    update = 0.0
    if not skipped:
        params = [p.detach() for g in optimizer.param_groups for p in g["params"]]
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]    # this rank's shard
        before = [t.clone() for t in local]
        optimizer.step()
        moved = all_sum(sum((a - b).float().pow(2).sum() for a, b in zip(local, before)))
        size = all_sum(sum(b.float().pow(2).sum() for b in before))
        update = math.sqrt(moved / max(size, 1e-30))
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": norm, "skipped": int(skipped), "update": update}

def publish(module, path: Path, *extras) -> None:
    """save_pretrained into `path` atomically: written beside it, then renamed over it, so a kill or a full
    disk never leaves a half-written model where a later run would load it. Only a model is replaced: a folder
    that holds anything else is refused."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not (path / "config.json").exists()):
        raise SystemExit(f"{path} exists and holds no model: not replacing it (give a new or empty folder)")
    tmp = path.with_name(path.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    save_pretrained(module, tmp, *extras)
    if rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    barrier()

@dataclass
class Progress:
    """A stage's counters, saved in every checkpoint's state.json."""
    step: int = 0               # steps done
    skipped: int = 0            # updates skipped as non-finite, in all
    skipped_in_a_row: int = 0   # ... since the last update that went through
    notes: dict = field(default_factory=dict)  # the stage's own (the RL stage: the start's val report)

class Loop:
    """The steps of one stage, with the guarantees every stage needs:

        loop = distributed.Loop(folder, steps, trained, gen, ckpt, save_every=50, keep=3, max_skipped=5)
        for step in loop:                    # from the checkpoint's step when ckpt is given (--resume)
            ...                              # one step; `continue` without loop.done(): abandoned (SIGTERM)
            loop.done(skipped, metrics)      # counts a skipped update, appends metrics to metrics.jsonl

    After each step: a checkpoint in folder/checkpoints every `save_every` steps and after the last; on
    SIGTERM or a dead torchrun agent, a checkpoint of the last finished step, then exit 0. `max_skipped`
    updates skipped in a row stop the run with an error before any checkpoint of the failing steps, so the
    last checkpoint holds good weights. trained: {folder name: (model, optimizer, extras)}; ckpt: the
    checkpoint to resume (models already loaded from it: this restores optimizers, RNG and progress)."""

    def __init__(self, folder: Path, steps: int, trained: dict, gen: torch.Generator, ckpt: Path | None, *,
                 save_every: int, keep: int, max_skipped: int, name: str = "step"):
        self.folder, self.steps, self.trained, self.gen = Path(folder), steps, trained, gen
        self.save_every, self.keep, self.max_skipped, self.name = save_every, keep, max_skipped, name
        self.progress = Progress(**load_checkpoint(ckpt, trained, gen)) if ckpt else Progress()
        self.finished = False
        self.metrics = self.folder / "metrics.jsonl"
        if rank() == 0:  # keep the metrics rows up to the checkpoint; a line torn by a kill is dropped
            self.folder.mkdir(parents=True, exist_ok=True)
            old = self.metrics.read_text().splitlines() if ckpt and self.metrics.exists() else []
            kept = [line for line in old if metrics_step(line) <= self.progress.step]
            self.metrics.write_text("".join(line + "\n" for line in kept))

    def __iter__(self):
        catch_sigterm()
        for step in range(self.progress.step, self.steps):
            self.finished = False
            yield step
            stopping = not self.finished or stop_requested()
            done = self.progress.step
            if stopping or done == self.steps or (self.save_every and done % self.save_every == 0):
                save_checkpoint(self.folder, done, self.trained, asdict(self.progress), self.gen, self.keep)
            if stopping:
                if rank() == 0:
                    print(f"{self.folder}: stop requested (SIGTERM or the launcher is gone): saved step "
                          f"{done} and stopped; --resume continues", flush=True)
                sys.exit(0)

    def done(self, skipped: int, metrics: dict | None = None) -> None:
        """End of a step: count a skipped update, stop after max_skipped in a row, log the metrics row."""
        p = self.progress
        p.step += 1
        p.skipped += skipped
        p.skipped_in_a_row = p.skipped_in_a_row + 1 if skipped else 0
        if p.skipped_in_a_row >= self.max_skipped:
            raise SystemExit(f"{self.folder}: {self.name} {p.step}: {p.skipped_in_a_row} updates in a row "
                             "had a non-finite loss or gradient and were skipped "
                             f"(--max-skipped {self.max_skipped}); skipped updates leave the weights as "
                             "they were, so the last checkpoint is good: lower the learning rate, or look "
                             "at the data")
        if metrics is not None and rank() == 0:
            with open(self.metrics, "a") as f:
                f.write(json.dumps({"step": p.step, **metrics}) + "\n")
        self.finished = True

def metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line cut short by a kill (it is not kept)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
