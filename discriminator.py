"""The LLM discriminator D of RIL: does this response read like the student (1) or a teacher (0)?

- `Discriminator`: the student's language model (embeddings + decoder layers + final norm; no vision
  tower, the input is text only), weights copied from the student so that D starts as strong as the
  policy it judges (the paper's answer to the GAN balance problem), with the LM head replaced by a
  linear head d -> 1 read at the last non-pad token of the final layer. D(o) = sigmoid(logit).
- its prompt: a system message that states the task, then the response inside <response></response>;
  no question, no image (as in the paper). The prompt's fixed start runs once per batch (or once per packed
  row of responses) rather than once per response: the same logits, and it is about half the tokens D reads on
  the embedded task.
- `discriminator_loss`: Eq. 1 as binary cross-entropy, label 1 = student, 0 = teacher.
- `pretrain` over cached (student, teacher) responses (`pretrain_batch`: step k's draw), and `update`, the
  mu = 1 per-batch step inside the RL loop (Algorithm 2, step 3). Both work on a plain module or one
  sharded with FSDP2 under torchrun.
- `record_origin` / `origin_mismatch`: the student and teachers a pre-trained D belongs to, so that a run
  never uses a D pre-trained for another student or other teachers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel

log = logging.getLogger(__name__)

SYSTEM = ("You are a discriminator. Say who wrote the response inside <response></response>: "
          "the teacher (0) or the student (1).")
HEAD_FILE = "discriminator_head.safetensors"
# packed rows' length where the prefix's cache cannot be shared (see Discriminator.forward), under dense
# masked attention, whose cost grows with its square (under block attention: attention.PACK_TOKENS)
PACK_TOKENS = 256
ORIGIN = "pretrained_from.json"  # beside its weights: the student and teachers D learnt to tell apart


class Discriminator(nn.Module):
    """D(o) = sigmoid(head(h_last)): a causal LM backbone with a d -> 1 head on the last real token.
    The decoder layers are `disc.backbone.layers` (shard each with FSDP2 `fully_shard`, then the root)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone  # embed_tokens, layers, norm (e.g. Qwen2_5_VLTextModel, Qwen2Model)
        self.head = nn.Linear(backbone.config.hidden_size, 1, dtype=backbone.dtype)
        nn.init.zeros_(self.head.weight)  # D starts undecided: p(student) = 0.5 for every response
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prefix_ids: torch.Tensor | None = None, pack_tokens: int = PACK_TOKENS) -> torch.Tensor:
        """Logits [B] (pre-sigmoid; sigmoid = p(student)) for left- or right-padded input_ids [B, L].

        prefix_ids [P]: tokens that come before every row (the prompt's fixed start: see
        `encode_for_discriminator(..., shared_prefix=True)`), computed once rather than once per row, with the
        same logits as with the prefix written into each row. Where `can_share_cache`, the prefix runs once
        and its keys/values are shared by the B rows; else (FSDP2 with gradients, checkpointing) the rows are
        packed behind copies of the prefix, each pack at most pack_tokens long (`pack_behind_prefix`).
        """
        mask = attention_mask.long()  # [B, L]
        B, L = mask.shape
        P = 0 if prefix_ids is None else prefix_ids.numel()
        if P and not can_share_cache(self.backbone):
            return self.packed_forward(input_ids, mask, prefix_ids.to(input_ids), pack_tokens)
        last = L - 1 - mask.flip(1).argmax(1)  # [B] index of the last real token
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]: real tokens at 0..n-1 under left padding
        cache = None
        if P:  # the prefix once, its cache repeated B times, the rows on top of it
            cache = self.backbone(input_ids=prefix_ids.to(input_ids).view(1, P),
                                  position_ids=torch.arange(P).to(mask)[None], use_cache=True).past_key_values
            cache.batch_repeat_interleave(B)  # [1, ...] -> [B, ...]
            position_ids = position_ids + P
            mask = torch.cat([mask.new_ones(B, P), mask], 1)  # [B, P + L]
        h = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=cache is not None).last_hidden_state  # [B, L, d]
        h_last = h[torch.arange(B, device=h.device), last]  # [B, d]
        return self.head(h_last).squeeze(-1).float().clone()  # [B]; a copy: FSDP2 warns on returned views

    def packed_forward(self, input_ids: torch.Tensor, mask: torch.Tensor, prefix_ids: torch.Tensor,
                       pack_tokens: int) -> torch.Tensor:
        """Logits [B] of the rows of input_ids [B, L] (mask [B, L], any padding) read behind prefix_ids [P],
        in one forward call over packed rows [prefix | row i | row i+1 | ...]: each row's tokens see the
        prefix and themselves, never another row's, and sit at the positions they would have alone. The
        backbone also gets `packed_layout`, which attention.block_attention uses to skip the masked blocks
        (any other attention function ignores it)."""
        P, dev = prefix_ids.numel(), input_ids.device
        n = mask.sum(1)                                                         # [B] real tokens per row
        pack, start = pack_behind_prefix(n.tolist(), P, pack_tokens)            # [B], [B]
        pack, start = pack.to(dev), start.to(dev)
        row, col = mask.nonzero(as_tuple=True)                                  # every real token
        t = (mask.cumsum(1) - 1)[row, col]                                      # its index in its row
        r, c = pack[row], start[row] + t                                        # its pack and column
        R, S = int(pack[-1]) + 1, int((start + n).max())
        ids = input_ids.new_zeros(R, S)                                         # [R, S]
        ids[:, :P], ids[r, c] = prefix_ids, input_ids[row, col]
        segment = torch.full((R, S), -1, device=dev)                            # [R, S]: -1 padding
        segment[:, :P], segment[r, c] = 0, row + 1                              # 0 prefix, i + 1 row i
        position_ids = torch.zeros(R, S, dtype=torch.long, device=dev)          # [R, S]
        position_ids[:, :P], position_ids[r, c] = torch.arange(P, device=dev), P + t
        q, k = segment[:, :, None], segment[:, None, :]                         # [R, S, 1], [R, 1, S]
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()          # [S, S]
        allowed = causal & ((k == q) | (k == 0)) & (k >= 0) | torch.eye(S, dtype=torch.bool, device=dev)
        T = int(n.max())
        cols = (start[:, None] + torch.arange(T, device=dev)).clamp(max=S - 1)  # [B, T] each token's column
        valid = torch.arange(T, device=dev) < n[:, None]                        # [B, T] its real tokens
        h = self.backbone(input_ids=ids, attention_mask=allowed[:, None], position_ids=position_ids,
                          use_cache=False, packed_layout=(P, pack, cols, valid)).last_hidden_state
        h_last = h[pack, start + n - 1]                                         # [B, d] each row's last token
        return self.head(h_last).squeeze(-1).float().clone()  # [B]; a copy: FSDP2 warns on returned views

    @classmethod
    def from_student(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "Discriminator":
        """D initialised from a student checkpoint by path (the paper), or from any other checkpoint:
        a VLM gives its language model (vision tower dropped), a text-only causal LM its base model. The LM
        head is left behind (D replaces it), so transformers' report of it as an unexpected key is not shown;
        a backbone weight the checkpoint lacks is an error (it would start D from random numbers)."""
        report = logging.getLogger("transformers.modeling_utils")  # where transformers logs its load report
        level = report.level
        report.setLevel(logging.ERROR)
        try:
            model, info = AutoModel.from_pretrained(path, dtype=dtype, output_loading_info=True)
        finally:
            report.setLevel(level)
        if info["missing_keys"]:
            raise ValueError(f"{path}: the checkpoint lacks {len(info['missing_keys'])} weight(s) of the "
                             f"discriminator's backbone, e.g. {sorted(info['missing_keys'])[0]}")
        unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("lm_head."))
        if unexpected:
            log.warning("%s: %d weight(s) not used by the discriminator, e.g. %s", path, len(unexpected),
                        unexpected[0])
        return cls(_text_backbone(model))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "Discriminator":
        """Load what `save_pretrained(path)` wrote: the backbone (transformers format) plus the head."""
        disc = cls(AutoModel.from_pretrained(path, dtype=dtype))
        disc.head.load_state_dict({k: v.to(dtype) for k, v in load_file(str(Path(path) / HEAD_FILE)).items()})
        return disc

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None, tokenizer=None) -> None:
        """Write the backbone with its own `save_pretrained` and the head to HEAD_FILE. Under FSDP2 pass the
        gathered full `state_dict` of this module (keys "backbone.*", "head.*") and call on rank 0 only."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        body = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v.detach().cpu().contiguous()
                for k, v in sd.items() if k.startswith("head.")}
        self.backbone.save_pretrained(path, state_dict=body)
        save_file(head, str(path / HEAD_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def can_share_cache(backbone: nn.Module) -> bool:
    """Whether the prefix's KV cache may feed the rows' forward: not under activation checkpointing (HF turns
    the cache off), nor when gradients flow under FSDP2 (each layer would run twice before backward; FSDP2
    releases a layer's gathered weights and reduces its gradients after the second call's backward, before the
    prefix's call, which it reaches only through the cache). There, `Discriminator.packed_forward` shares the
    prefix within packed rows, one call per layer."""
    from torch.distributed.fsdp import FSDPModule
    fsdp = any(isinstance(m, FSDPModule) for m in backbone.modules())
    checkpointing = getattr(backbone, "is_activation_checkpointing", False)
    return not checkpointing and not (fsdp and torch.is_grad_enabled())


def pack_behind_prefix(lengths: list[int], prefix: int, pack_tokens: int):
    """Rows of these lengths, in order, into packs that start with a prefix of `prefix` tokens: a row joins
    the current pack while it stays within pack_tokens (a pack holds at least one row). Returns each row's
    pack and the column of its first token, LongTensors [B]. For example, lengths [10, 20, 30, 5], prefix 40,
    pack_tokens 80:

        pack  [0, 0, 1, 1]      pack 0 = prefix (0..39) | row 0 (40..49) | row 1 (50..69)
        start [40, 50, 40, 70]  pack 1 = prefix (0..39) | row 2 (40..69) | row 3 (70..74)
    """
    pack, start, r, used = [], [], 0, prefix
    for n in lengths:
        if used > prefix and used + n > pack_tokens:
            r, used = r + 1, prefix
        pack.append(r)
        start.append(used)
        used += n
    return torch.tensor(pack, dtype=torch.long), torch.tensor(start, dtype=torch.long)


def _text_backbone(model: nn.Module) -> nn.Module:
    """The text model inside whatever AutoModel loaded: VLM -> .language_model, causal LM -> base model."""
    model = getattr(model, "language_model", model)
    return getattr(model, "base_model", model)


# -----------------------------------------------------------------------------
# The prompt

def prompt_parts(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after the response: chat template with SYSTEM, user "<response>...</response>",
    and the assistant turn opened (D is read where the model would start to answer 0 or 1)."""
    marker = "\x00RESPONSE\x00"
    user = f"<response>{marker}</response>"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a tokenizer without a chat template (a base LM): plain text, same structure
        text = f"{SYSTEM}\n\n{user}\n\nAnswer:"
    before, after = text.split(marker)
    return (tokenizer(before, add_special_tokens=False)["input_ids"],
            tokenizer(after, add_special_tokens=False)["input_ids"])


def encode_for_discriminator(tokenizer, responses: list[str], max_len: int,
                             shared_prefix: bool = False) -> tuple[dict, int]:
    """Left-padded {"input_ids", "attention_mask"} [N, L <= max_len] and the number of responses cut.
    A response too long for max_len keeps its end (where the answer is): truncated from the left, logged.
    shared_prefix: the prompt's fixed start (system message, "<response>") is left out of the rows and given
    once as "prefix_ids" [P], for `Discriminator.forward` to run once for the whole batch (the same
    logits)."""
    before, after = prompt_parts(tokenizer)
    budget = max_len - len(before) - len(after)
    if budget < 1:
        raise ValueError(f"max_len={max_len} leaves no room for a response (the prompt takes "
                         f"{len(before) + len(after)} tokens)")
    # split_special_tokens: a response that spells "<|im_end|>" cannot close the prompt early
    body = tokenizer(list(responses), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    n_cut = sum(len(b) > budget for b in body)
    if n_cut:
        log.warning("discriminator: %d/%d responses longer than %d tokens, truncated from the left",
                    n_cut, len(body), budget)
    head = [] if shared_prefix else before
    seqs = [head + (b[-budget:] if len(b) > budget else b) + after for b in body]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)  # [N, L]
    attention_mask = torch.zeros((len(seqs), L), dtype=torch.long)  # [N, L]
    for i, s in enumerate(seqs):
        input_ids[i, L - len(s):] = torch.tensor(s)
        attention_mask[i, L - len(s):] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    return (dict(out, prefix_ids=torch.tensor(before, dtype=torch.long)) if shared_prefix else out), n_cut


def _device(disc: nn.Module) -> torch.device:
    return next(disc.parameters()).device


@torch.no_grad()
def p_student(disc: Discriminator, tokenizer, responses: list[str], max_len: int = 1024,
              batch_size: int = 32) -> torch.Tensor:
    """D(o) = p(student) for each response, FloatTensor [N] on CPU, in batches, without gradients."""
    out = []
    for i in range(0, len(responses), batch_size):
        enc, _ = encode_for_discriminator(tokenizer, responses[i:i + batch_size], max_len, shared_prefix=True)
        logits = disc(**{k: v.to(_device(disc)) for k, v in enc.items()})  # [b]
        out.append(torch.sigmoid(logits).cpu())
    return torch.cat(out) if out else torch.zeros(0)  # [N]


# -----------------------------------------------------------------------------
# Eq. 1 and the updates

def discriminator_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 1 as a loss: -(mean log D(o_s) + mean log(1 - D(o_t))) / 2, from logits (stable BCE),
    label 1 = student, 0 = teacher; each set averaged, then the two averaged."""
    ls = logits_student.float()  # [Ns]
    lt = logits_teacher.float()  # [Nt]
    loss_s = F.binary_cross_entropy_with_logits(ls, torch.ones_like(ls))  # -mean log sigmoid(l_s)
    loss_t = F.binary_cross_entropy_with_logits(lt, torch.zeros_like(lt))  # -mean log(1 - sigmoid(l_t))
    return 0.5 * (loss_s + loss_t)


def _all_mean(values: list[float]) -> list[float]:
    """Average a few scalars over ranks (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return (t / dist.get_world_size()).tolist()


def update(disc: Discriminator, optimizer: torch.optim.Optimizer, tokenizer, student_texts: list[str],
           teacher_texts: list[str], max_len: int, *, micro_batch_size: int | None = None,
           max_grad_norm: float | None = 1.0, pack_tokens: int = PACK_TOKENS) -> dict:
    """One optimizer step of D on Eq. 1 over this batch's student and teacher responses (Algorithm 2,
    step 3, mu = 1). Micro-batches accumulate gradients to the exact Eq. 1 gradient. Under FSDP2 every
    rank must call it with the same numbers of texts; stats are averaged over ranks. A non-finite loss or
    gradient norm (on any rank) skips the step: stats["skipped"] = 1. Returns loss, accuracy (mean of
    the two per-set accuracies), p_student / p_teacher (mean D on each set), grad_norm, n_truncated.
    pack_tokens: the packed rows' length where they are packed (`Discriminator.forward`)."""
    ns = len(student_texts)
    nt = len(teacher_texts)
    if ns == 0 or nt == 0:
        raise ValueError(f"update needs texts of both kinds, got {ns} student and {nt} teacher")
    texts = list(student_texts) + list(teacher_texts)
    labels = torch.cat([torch.ones(ns), torch.zeros(nt)])  # [N]
    weights = torch.cat([torch.full((ns,), 0.5 / ns), torch.full((nt,), 0.5 / nt)])  # [N] Eq. 1 as a sum
    mb = micro_batch_size or len(texts)
    dev = _device(disc)
    disc.train()
    order = sorted(range(len(texts)), key=lambda j: len(texts[j]))  # similar lengths together: less padding
    logits, n_cut = torch.zeros(len(texts)), 0
    for i in range(0, len(texts), mb):
        idx = order[i:i + mb]
        enc, cut = encode_for_discriminator(tokenizer, [texts[j] for j in idx], max_len, shared_prefix=True)
        n_cut += cut
        lg = disc(**{k: v.to(dev) for k, v in enc.items()}, pack_tokens=pack_tokens)  # [mb]
        per = F.binary_cross_entropy_with_logits(lg, labels[idx].to(dev), reduction="none")  # [mb]
        (per * weights[idx].to(dev)).sum().backward()  # sums over micro-batches to Eq. 1
        logits[idx] = lg.detach().float().cpu()
    loss = discriminator_loss(logits[:ns], logits[ns:]).item()
    gn = torch.nn.utils.clip_grad_norm_(disc.parameters(), max_grad_norm if max_grad_norm else float("inf"))
    gn = (gn.full_tensor() if hasattr(gn, "full_tensor") else gn).item()  # a DTensor under FSDP2
    p = torch.sigmoid(logits)  # [N]
    acc = 0.5 * ((p[:ns] > 0.5).float().mean() + (p[ns:] < 0.5).float().mean()).item()
    loss, acc, p_s, p_t, bad = _all_mean([loss, acc, p[:ns].mean().item(), p[ns:].mean().item(),
                                          float(not math.isfinite(loss))])
    skipped = bad > 0 or not math.isfinite(gn)
    if skipped:
        log.warning("discriminator update skipped: loss %s, grad norm %s", loss, gn)
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "accuracy": acc, "p_student": p_s, "p_teacher": p_t, "grad_norm": gn,
            "skipped": int(skipped), "n_truncated": n_cut}


def pretrain_batch(n_student: int, n_teacher: int, batch_size: int, seed: int, step: int):
    """Pre-training step `step`'s draw (with replacement) of batch_size student and batch_size teacher text
    indices: a function of (seed, step) only, so a resumed pre-training draws what a straight one does."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return (torch.randint(n_student, (batch_size,), generator=g).tolist(),
            torch.randint(n_teacher, (batch_size,), generator=g).tolist())


def pretrain(disc: Discriminator, optimizer: torch.optim.Optimizer, tokenizer, student_texts: list[str],
             teacher_texts: list[str], steps: int, batch_size: int, max_len: int, seed: int = 0,
             log_every: int = 10, micro_batch_size: int | None = None,
             max_grad_norm: float | None = 1.0) -> dict:
    """Pre-train D on cached responses (all teachers' responses labelled teacher): `steps` calls of
    `update`, each on the `pretrain_batch` of that step. Under torchrun give each rank its own shard of texts
    or its own seed. Returns the last step's stats plus steps, seconds, n_skipped and the per-step history."""
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    history, t0 = [], time.time()
    for step in range(steps):
        si, ti = pretrain_batch(len(student_texts), len(teacher_texts), batch_size, seed, step)
        stats = update(disc, optimizer, tokenizer, [student_texts[i] for i in si],
                       [teacher_texts[i] for i in ti], max_len, micro_batch_size=micro_batch_size,
                       max_grad_norm=max_grad_norm)
        history.append(stats)
        if rank0 and log_every and (step % log_every == 0 or step == steps - 1):
            print(f"disc pretrain step {step:5d} | loss {stats['loss']:.4f} | acc {stats['accuracy']:.3f} | "
                  f"p_s {stats['p_student']:.3f} p_t {stats['p_teacher']:.3f} | "
                  f"gnorm {stats['grad_norm']:.3f}")
    return {**(history[-1] if history else {}), "steps": steps, "seconds": time.time() - t0,
            "n_skipped": sum(h["skipped"] for h in history), "history": history}


@torch.no_grad()
def evaluate(disc: Discriminator, tokenizer, student_texts: list[str], teacher_texts: list[str],
             max_len: int = 1024, batch_size: int = 32) -> dict:
    """Held-out accuracy of D: student texts should get p > 0.5, teacher texts p < 0.5 (balanced mean)."""
    ps = p_student(disc, tokenizer, student_texts, max_len, batch_size)  # [Ns]
    pt = p_student(disc, tokenizer, teacher_texts, max_len, batch_size)  # [Nt]
    acc_s = (ps > 0.5).float().mean().item()
    acc_t = (pt < 0.5).float().mean().item()
    return {"accuracy": 0.5 * (acc_s + acc_t), "acc_student": acc_s, "acc_teacher": acc_t,
            "p_student": ps.mean().item(), "p_teacher": pt.mean().item()}


# ------------------------------------------------------------------------------------------------------------
# Provenance: which student and teachers a pre-trained D belongs to


def fingerprint(checkpoint: str | Path) -> str:
    """sha256 of a checkpoint's weight files: which weights, not which folder."""
    h = hashlib.sha256()
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def record_origin(disc_dir: str | Path, student: str | Path, teachers: list[str]) -> None:
    """Write beside D's weights the student it was built from and the teachers it saw."""
    origin = {"student": fingerprint(student), "teachers": sorted(teachers)}
    (Path(disc_dir) / ORIGIN).write_text(json.dumps(origin))


def origin_mismatch(disc_dir: str | Path, student: str | Path, teachers: list[str]) -> str | None:
    """Why the D in `disc_dir` does not belong to a run of `student` imitating `teachers` (another student,
    e.g. after a new SFT, or other teachers), or None. A D without a record cannot be checked: None."""
    record = Path(disc_dir) / ORIGIN
    if not record.exists():
        return None
    origin = json.loads(record.read_text())
    if origin["teachers"] != sorted(teachers):
        return (f"it was pre-trained on the teachers {origin['teachers']}, this run imitates "
                f"{sorted(teachers)}")
    if origin["student"] != fingerprint(student):
        return f"it was pre-trained from another student than {student} (a new SFT run?)"
    return None
