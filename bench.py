"""Benchmarks, one process: rollout.generate against transformers' model.generate, same settings;
rollout.response_logprobs with the prompt run once per question against one prompt copy per response; and the
discriminator with its fixed prompt start run once per batch against written into every row.

    python bench.py                                  # tiny student (built on the fly if no --student)
    python bench.py --student checkpoints/tiny-sft    # the plain world's SFT student (data/embedded)

RL-shaped workload: 16 prompts with images x 8 samples, temperature 1.0, top-p 0.95, top-k 50, repetition
penalty 1.05, up to 128 new tokens; once with EOS (rows end at varied lengths) and once with EOS disabled
(every row runs the full 128 tokens). Prints generated tokens per second for both, the ratio, and where
rollout.generate spends its time (model forward incl. prefill and vision, sampling, cache handling).

Log-probs (the policy update's forward and backward, `--what logprobs`): the same 16 prompts x 8 cached
teacher responses, teacher-forced; the prompts (images included) once, packed with each question's responses
(rollout.response_logprobs given N/k prompt rows) against each prompt repeated per response (N rows), both
under dense masked attention; then the packed rows under dense attention against attention.block_attention.
Discriminator (`--what disc`): D's forward and forward + backward over the same questions' 2G responses (the
cached teacher responses and as many plain ones), its fixed prompt start run once per batch with its KV cache
shared, or (forward + backward) written once per pack of responses as under FSDP2 (packs of 256 tokens under
dense attention; a micro-batch in one pack under block attention, as ril.py runs D), against written into
every row (discriminator.encode_for_discriminator's shared_prefix, Discriminator.packed_forward).
Each is timed --repeats times, alternating, and the fastest run of each counts (other processes only ever add
time). Absolute numbers mean little on a shared CPU; the ratios are the point.

Agreement (`--what agree`, not part of `all`): greedy answers to every question of `--split`, rollout.generate
against transformers' generate given nothing but do_sample=False (the checkpoint's generation_config.json
does the rest); how many responses are identical, and the accuracy of each.

    python bench.py --what agree --student runs/ril/checkpoints/step-150/student --data data/embedded-marked

Attention (`--what attention`, not part of `all`): the packed policy update's attention, one layer's forward
and backward with the student's heads, over 4 packed rows of a 64-token prompt and 8 responses of 86 tokens
(the marked world's micro-batch): one dense masked sdpa over the whole row (rollout.packed_mask) against
attention.block_attention (the prompt causal on itself, each response on the prompt and itself).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

import rewards
import rollout
from attention import block_attention, use_block_attention
from data.dataset import DatasetError, encode_rows, load_jsonl

SHARES = {"forward": ["embed_prompts", "forward"], "sampling": ["sample_next"],
          "cache": ["allocate_cache", "share_prefill", "drop_rows"]}


def timed(name, fn, clock, sync):
    """fn, accumulating its wall time into clock[name]."""
    def wrapper(*args, **kwargs):
        sync()
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        clock[name] += time.perf_counter() - t
        return out
    return wrapper


def fastest(work_a, work_b, repeats: int, sync) -> tuple[float, float]:
    """Seconds of the fastest of `repeats` runs of each of two callables, run alternately after one warm-up
    each (other processes only ever add time)."""
    def clock(work):
        sync()
        t = time.perf_counter()
        work()
        sync()
        return time.perf_counter() - t
    work_a()
    work_b()
    times = [(clock(work_a), clock(work_b)) for _ in range(repeats)]
    return min(a for a, _ in times), min(b for _, b in times)


def response_tokens(ids: torch.Tensor, eos: list[int]) -> int:
    """Tokens generated per row up to and including the first EOS, summed. ids [N, T]."""
    T = ids.shape[1]
    if eos:
        is_eos = torch.isin(ids, torch.tensor(eos, device=ids.device))           # [N, T]
    else:
        is_eos = torch.zeros_like(ids, dtype=torch.bool)
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(ids[:, 0], T))
    return int(first.sum())


def agree(a, model, tok, ip, data: Path) -> None:
    """Greedy responses to every row of the split, rollout.generate vs transformers' generate (see above)."""
    rows = load_jsonl(data / f"{a.split}.jsonl")
    gc = model.generation_config
    same = right_ours = right_theirs = 0
    for i in range(0, len(rows), 32):
        batch = rows[i:i + 32]
        p = encode_rows(model, tok, ip, batch, a.device)
        ours = rollout.generate(model, p, max_new_tokens=gc.max_new_tokens or a.max_new_tokens, temperature=0,
                                repetition_penalty=gc.repetition_penalty or 1.0)
        theirs = model.generate(input_ids=p["input_ids"], attention_mask=p["attention_mask"],
                                mm_token_type_ids=p["mm_token_type_ids"], do_sample=False,
                                **rollout.vision_inputs(p))[:, p["input_ids"].shape[1]:]        # [b, T]
        for row, ids, mask, hf in zip(batch, ours.response_ids, ours.response_mask, theirs):
            text_ours = tok.decode(ids[mask].tolist(), skip_special_tokens=True)
            text_theirs = tok.decode(hf.tolist(), skip_special_tokens=True)
            same += text_ours == text_theirs
            right_ours += rewards.answer_reward(text_ours, row["answer"])
            right_theirs += rewards.answer_reward(text_theirs, row["answer"])
    n = len(rows)
    print(f"[greedy, {a.split}, n={n}] identical responses {same}/{n}; accuracy: rollout.generate "
          f"{right_ours / n:.3f}, transformers generate {right_theirs / n:.3f}")


def attention(a, model, sync) -> None:
    """Dense masked attention over packed rows against attention.block_attention; forward + backward."""
    cfg = model.config.get_text_config()
    B, H, Hkv, P, k, R = 4, cfg.num_attention_heads, cfg.num_key_value_heads, 64, 8, 86
    D, L, N = cfg.hidden_size // H, P + k * R, B * k
    seg = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(1, k + 1).repeat_interleave(R)])  # [L]
    dense_mask = rollout.packed_mask(seg[None].to(a.device)).expand(B, 1, L, L)  # as the model gets it
    cols = (P + torch.arange(N) % k * R)[:, None] + torch.arange(R)               # [N, R]
    layout = (P, torch.arange(N) // k, cols, torch.ones(N, R, dtype=torch.bool))
    layout = tuple(x.to(a.device) if torch.is_tensor(x) else x for x in layout)

    def dense(q, key, v):
        return torch.nn.functional.scaled_dot_product_attention(q, key, v, attn_mask=dense_mask,
                                                                enable_gqa=True).transpose(1, 2)

    def block(q, key, v):
        return block_attention(torch.nn.Module(), q, key, v, dense_mask, packed_layout=layout)[0]
    qkv = [torch.randn(B, h, L, D, device=a.device, requires_grad=True) for h in (H, Hkv, Hkv)]
    gap = (dense(*qkv) - block(*qkv)).abs().max().item()
    step = lambda f: lambda: [f(*qkv).sum().backward() for _ in range(10)]
    t_dense, t_block = fastest(step(dense), step(block), a.repeats, sync)
    print(f"attention, {B} rows of {L} tokens ({P} + {k} x {R}), {H} heads ({Hkv} KV) of {D}: max |dense - "
          f"block| {gap:.1e}; forward + backward {t_dense * 100:.1f} ms vs {t_block * 100:.1f} ms, "
          f"**{t_dense / t_block:.2f}x** for block attention")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=None, help="checkpoint folder; default: build the tiny student")
    p.add_argument("--data", default="data/embedded", help="embedded dataset folder (built if missing)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: stable timings on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each, alternating; the fastest counts")
    p.add_argument("--what", default="all", choices=("all", "generate", "logprobs", "disc", "agree",
                                                          "attention"))
    p.add_argument("--split", default="val", help="--what agree: the split whose questions are answered")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = Path(a.data)
    if not (data / "train.jsonl").exists():
        from data.build import build
        data = build(Path(tempfile.mkdtemp()) / "embedded", seed=0,
                     sizes={"sft": 50, "train": 64, "val": 10, "test": 10})
    if a.student is None:
        from data.tiny_student import build_tiny_student
        a.student = build_tiny_student(data, Path(tempfile.mkdtemp()) / "tiny-student", seed=0)
    rows = load_jsonl(data / "train.jsonl")[:a.prompts]  # the data before the model: a bad file fails at once
    tok = AutoTokenizer.from_pretrained(a.student)
    ip = AutoImageProcessor.from_pretrained(a.student)
    model = AutoModelForImageTextToText.from_pretrained(a.student).to(a.device).eval()
    prompts = rollout.encode_prompts(tok, ip, [r["question"] for r in rows],
                                     [r["image"] for r in rows], family=model.config.model_type)
    prompts = {k: v.to(a.device) for k, v in prompts.items()}
    knobs = dict(temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.05)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    eos = rollout.eos_list(model, None)
    print(f"device {a.device} ({torch.get_num_threads()} threads), student {a.student}")
    if a.what == "agree":
        return agree(a, model, tok, ip, data)
    if a.what == "attention":
        return attention(a, model, sync)
    print(f"workload: {len(rows)} prompts x {a.samples} samples, {knobs}, max_new_tokens {a.max_new_tokens}")

    if a.what in ("all", "logprobs"):
        bench_logprobs(a, model, tok, prompts, rows, sync)
    if a.what in ("all", "disc"):
        bench_disc(a, tok, rows, sync)
    if a.what in ("logprobs", "disc"):
        return

    def ours(eos_ids):
        generator = torch.Generator(a.device).manual_seed(a.seed)
        out = rollout.generate(model, prompts, max_new_tokens=a.max_new_tokens, num_samples=a.samples,
                               eos_token_id=eos_ids, generator=generator, **knobs)
        return int(out.response_mask.sum())

    def theirs(eos_ids):
        saved, model.generation_config.eos_token_id = model.generation_config.eos_token_id, (eos_ids or None)
        vision = rollout.vision_inputs(prompts)
        try:
            out = model.generate(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                                 mm_token_type_ids=prompts["mm_token_type_ids"], do_sample=True,
                                 num_return_sequences=a.samples, max_new_tokens=a.max_new_tokens,
                                 pad_token_id=0, suppress_tokens=rollout.placeholder_ids(model), **vision,
                                 **knobs)
        finally:
            model.generation_config.eos_token_id = saved
        return response_tokens(out[:, prompts["input_ids"].shape[1]:], eos_ids)

    def clock(fn, eos_ids):
        torch.manual_seed(a.seed)
        sync()
        t = time.perf_counter()
        n = fn(eos_ids)
        sync()
        return n, time.perf_counter() - t

    a_small = a.max_new_tokens
    a.max_new_tokens = 4                                                          # warm-up
    ours(eos)
    theirs(eos)
    a.max_new_tokens = a_small
    for mode, eos_ids in (("EOS on", eos), ("EOS off", [])):
        hf, us, spent = [], [], defaultdict(float)                  # runs alternate: same load for both
        for _ in range(a.repeats):
            hf.append(clock(theirs, eos_ids))
            originals = {name: getattr(rollout, name) for names in SHARES.values() for name in names}
            for name, fn in originals.items():
                setattr(rollout, name, timed(name, fn, spent, sync))
            try:
                us.append(clock(ours, eos_ids))
            finally:
                for name, fn in originals.items():
                    setattr(rollout, name, fn)
        n_hf, t_hf = min(hf, key=lambda r: r[1])
        n_us, t_us = min(us, key=lambda r: r[1])
        print(f"\n[{mode}] runs (s): transformers {' '.join(f'{t:.2f}' for _, t in hf)}, "
              f"rollout {' '.join(f'{t:.2f}' for _, t in us)}; fastest of each below")
        print(f"[{mode}] transformers generate: {n_hf} tokens in {t_hf:.2f} s = {n_hf / t_hf:.0f} tok/s")
        print(f"[{mode}] rollout.generate:      {n_us} tokens in {t_us:.2f} s = {n_us / t_us:.0f} tok/s")
        print(f"[{mode}] speed-up (tokens/s): {n_us / t_us / (n_hf / t_hf):.2f}x")
        shares = {k: sum(spent[n] for n in names) / sum(t for _, t in us) for k, names in SHARES.items()}
        shares["other (loop, bookkeeping)"] = 1 - sum(shares.values())
        print(f"[{mode}] rollout time: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))


def bench_logprobs(a, model, tok, prompts, rows, sync):
    """Forward + backward of response_logprobs over a.samples cached teacher responses per prompt: the prompt
    once per question (shared KV cache) against one prompt copy per response; and the forward alone (pi_old,
    pi_ref)."""
    texts = []
    for r in rows:                                                            # a.samples per prompt, cycling
        pool = [t for responses in r["teachers"].values() for t in responses]
        texts += [pool[j % len(pool)] for j in range(a.samples)]
    ids, mask, _ = rollout.encode_responses(tok, texts, a.max_new_tokens, tok.eos_token_id)
    ids = ids.to(a.device)                                                        # [N, T]
    mask = mask.to(a.device)
    per_row = rollout.select_prompts(prompts, torch.arange(len(texts), device=a.device) // a.samples)
    print(f"log-probs workload: {len(rows)} prompts ({prompts['input_ids'].shape[1]} tokens) x {a.samples} "
          f"responses ({mask.sum(1).float().mean():.0f} tokens on average, {ids.shape[1]} padded)")

    def work(p, grad, m=model):
        with torch.set_grad_enabled(grad):
            logp = rollout.response_logprobs(m, p, ids, mask)
            if grad:
                logp.sum().backward()

    blocked = use_block_attention(copy.deepcopy(model))                          # as ril.py loads students
    for grad in (True, False):
        what = "forward + backward" if grad else "forward (no grad)"
        shared, copied = fastest(lambda: work(prompts, grad), lambda: work(per_row, grad), a.repeats, sync)
        print(f"[log-probs, {what}] one row per response {copied:.3f} s, shared prompt {shared:.3f} s: "
              f"speed-up {copied / shared:.2f}x (dense masked attention)")
        dense, block = fastest(lambda: work(prompts, grad), lambda: work(prompts, grad, blocked), a.repeats,
                               sync)
        print(f"[log-probs, {what}] shared prompt, dense masked attention {dense:.3f} s, block attention "
              f"{block:.3f} s: speed-up {dense / block:.2f}x")
    model.zero_grad(set_to_none=True)


def bench_disc(a, tok, rows, sync):
    """D on a.samples responses per question (half cached teacher text, half the plain SFT style), in
    micro-batches of 32 as in the RL step: the prompt's fixed start run once per micro-batch (its cache
    shared; with gradients also once per pack of responses, what FSDP2 runs) against written into every
    row."""
    from attention import PACK_TOKENS as BLOCK_PACK_TOKENS
    from discriminator import PACK_TOKENS, Discriminator, encode_for_discriminator
    disc = Discriminator.from_student(a.student).to(a.device)
    texts = []
    for r in rows:
        pool = [t for responses in r["teachers"].values() for t in responses]
        texts += [pool[j % len(pool)] for j in range(a.samples // 2)]
        texts += [f"The answer is \\boxed{{{r['answer']}}}." for _ in range(a.samples - a.samples // 2)]
    texts.sort(key=len)                                                           # as update() orders them
    batches = {False: [], True: []}                                  # shared prefix or not -> micro-batches
    for shared in batches:
        for i in range(0, len(texts), 32):
            enc = encode_for_discriminator(tok, texts[i:i + 32], 192, shared_prefix=shared)[0]
            batches[shared].append({k: v.to(a.device) for k, v in enc.items()})
    n_tokens = sum(int(e["attention_mask"].sum()) for e in batches[False])
    print(f"discriminator workload: {len(texts)} responses, {n_tokens} tokens with the prompt in every row")

    blocked = use_block_attention(copy.deepcopy(disc))                            # as ril.py runs D

    def work(shared, grad, packed=False, block=False):
        with torch.set_grad_enabled(grad):
            for enc in batches[shared]:
                if packed:                                                        # [32]
                    logits = (blocked if block else disc).packed_forward(
                        enc["input_ids"], enc["attention_mask"], enc["prefix_ids"],
                        BLOCK_PACK_TOKENS if block else PACK_TOKENS)
                else:
                    logits = disc(**enc)                                          # [32]
                if grad:
                    logits.sum().backward()

    ways = [(True, False, False, "shared prompt start (cache)"),
            (True, True, False, f"prompt start once per pack of {PACK_TOKENS} tokens (FSDP2)"),
            (True, True, True, f"... per pack of {BLOCK_PACK_TOKENS} tokens, block attention (ril.py's D)"),
            (False, False, False, "shared prompt start (cache)")]
    for grad, packed, block, name in ways:
        shared, copied = fastest(lambda: work(True, grad, packed, block), lambda: work(False, grad),
                                 a.repeats, sync)
        what = "forward + backward (update)" if grad else "forward (p_student)"
        print(f"[discriminator, {what}] prompt in every row {copied:.3f} s, "
              f"{name} {shared:.3f} s: speed-up {copied / shared:.2f}x")


if __name__ == "__main__":
    try:
        main()
    except DatasetError as e:  # a bad data file: its name, line and problem, without a traceback
        raise SystemExit(f"error: {e}") from None
