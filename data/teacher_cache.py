"""Teacher caches from real VLM checkpoints: N sampled responses per question per teacher, into a dataset.

    python -m data.teacher_cache --data rl.jsonl -n 16 \
        --teacher qwen72b=/ckpt/Qwen2.5-VL-72B-Instruct --teacher internvl78b=/ckpt/InternVL3-78B-hf
    python -m data.teacher_cache --data rl.jsonl -n 16 --field students --teacher sft=runs/sft/sft

Every row of --data (the JSONL schema, data/dataset.py) gets `row["teachers"][name]` = N responses of each
checkpoint, sampled by rollout.generate with the paper's settings (T = 1.0, top-p 0.95, top-k 50, repetition
penalty 1.05), a batch of questions at a time, one checkpoint after the other (one model in memory at a time).
- `--field students` writes the student's own samples into `row["students"][name]` instead: ril.py's
  discriminator pre-training then takes them rather than sampling the student itself (the paper's N = 16 per
  question). `discriminator_texts` gives that pre-training its texts, cached or sampled there and then.
- Resumable: each finished batch is one line appended to OUT.journal (flushed and fsynced; each line holds the
  full response lists of its rows, so replaying it is idempotent); a rerun reads it and goes on with the rest,
  in the same batches and with the same per-batch seeds as a run that was never interrupted. A half-written
  last line (a crash mid-write) is dropped. Responses already in the rows count toward N; a teacher with N or
  more is left alone.
- Atomic: OUT (default: --data itself) is written once at the end, to a temporary file moved over it with
  os.replace, then the journal is removed. When OUT exists already, its rows are the starting point (a
  finished run is not redone).
- Several GPUs: a teacher is split over all visible GPUs layer by layer (device_map="auto"; needs `pip install
  accelerate`). It must fit in their memory: CPU offload is refused (rollout.generate calls the layers
  directly).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

import rollout
from data.dataset import encode_rows, load_jsonl

PAPER = dict(temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.05)  # the paper's sampling settings


def read_journal(path: Path) -> list[dict]:
    """The complete lines of the journal; a half-written last line is cut off the file (it is redone)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1]                                  # everything up to the last newline
    if len(keep) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return [json.loads(line) for line in keep.decode("utf-8").splitlines() if line.strip()]


def apply(rows: dict, record: dict) -> None:
    """Put one journal record (a batch: {field, name, responses: {id: [...]}}) into the rows, by id."""
    for rid, responses in record["responses"].items():
        if rid not in rows:
            raise SystemExit(f"the journal holds id {rid!r}, which is not in the dataset: "
                             "wrong --data, or delete it")
        rows[rid].setdefault(record["field"], {})[record["name"]] = responses


def load_teacher(path: str, device: str):
    """(model, tokenizer, image processor) through the Auto classes; bf16 on GPUs, split over them when
    several."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    dtype = torch.bfloat16 if gpus else torch.float32
    if gpus > 1:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map="auto")
        if any(p.device.type in ("cpu", "meta") for p in model.parameters()):
            raise SystemExit(f"{path} does not fit on the {gpus} visible GPUs "
                             "(parts were offloaded to CPU or disk)")
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


def sample_batch(model, tok, proc, batch: list[dict], need: list[int], max_new_tokens: int, seed: int,
                 knobs: dict) -> tuple[list[list[str]], int]:
    """need[i] sampled responses for question i of the batch (max(need) drawn for each, the first need[i]
    kept), and how many of the kept ones hit max_new_tokens before their end-of-sequence token."""
    device = rollout.text_model(model).embed_tokens.weight.device
    prompts = encode_rows(model, tok, proc, batch, device)
    G = max(need)
    out = rollout.generate(model, prompts, max_new_tokens=max_new_tokens, num_samples=G,
                           generator=torch.Generator(device).manual_seed(seed), **knobs)
    eos = torch.tensor(rollout.eos_list(model, None), device=device)
    ids = out.response_ids.cpu()                                              # [B*G, T]
    mask = out.response_mask.cpu()                                            # [B*G, T]
    ended = torch.isin(out.response_ids, eos).any(1).cpu()                    # [B*G]
    texts, cut = [], 0
    for b, n in enumerate(need):
        rows = range(b * G, b * G + n)
        texts.append([tok.decode(ids[j][mask[j]].tolist(), skip_special_tokens=True) for j in rows])
        cut += sum(not ended[j] for j in rows)
    return texts, cut


def discriminator_texts(model, tok, proc, rows: list[dict], names: list[str], samples: int,
                        max_new_tokens: int, knobs: dict, gen: torch.Generator,
                        show: bool = True) -> tuple[list[str], list[str]]:
    """What D is pre-trained on (Eq. 1): (student texts, teacher texts). The student's are its cached samples
    (the `students` field) when every row has them, else `samples` drawn per question, 16 questions at a time;
    the teachers' are every cached response of the teachers `names`, cut at max_new_tokens and decoded, as the
    RL stage gives them to D."""
    def decode(ids, mask):
        return [tok.decode(i[m].tolist(), skip_special_tokens=True) for i, m in zip(ids, mask)]
    device = rollout.text_model(model).embed_tokens.weight.device
    cached = all("students" in r for r in rows)
    student_texts = [t for r in rows for ts in r["students"].values() for t in ts] if cached else []
    for i in tqdm([] if cached else range(0, len(rows), 16), desc="student samples for D", disable=not show):
        prompts = encode_rows(model, tok, proc, rows[i:i + 16], device)
        out = rollout.generate(model, prompts, max_new_tokens=max_new_tokens, num_samples=samples,
                               generator=gen, **knobs)
        student_texts += decode(out.response_ids, out.response_mask)
    teacher_texts = [t for r in rows for name in names for t in r["teachers"][name]]
    ids, mask, _ = rollout.encode_responses(tok, teacher_texts, max_new_tokens, tok.eos_token_id)
    return student_texts, decode(ids, mask)


def fill(rows: dict, name: str, path: str, args, journal) -> dict:
    """Top up `name`'s responses to N in every row, a batch at a time, journaling each batch. Returns
    counts."""
    todo = [r for r in rows.values() if len(r.get(args.field, {}).get(name, [])) < args.n]
    stats = {"questions": len(todo), "responses": 0, "truncated": 0, "empty": 0}
    if not todo:
        return stats
    model, tok, proc = load_teacher(path, args.device)
    knobs = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 repetition_penalty=args.repetition_penalty)
    bar = tqdm(total=len(todo), desc=name, unit="question")                  # shows the time left
    for i in range(0, len(todo), args.batch_size):
        batch = todo[i:i + args.batch_size]
        have = [r.get(args.field, {}).get(name, []) for r in batch]
        key = f"{args.seed}:{args.field}:{name}:{batch[0]['id']}"
        seed = zlib.crc32(key.encode())                                       # same batches, same seeds
        new, cut = sample_batch(model, tok, proc, batch, [args.n - len(h) for h in have], args.max_new_tokens,
                                seed, knobs)
        responses = {r["id"]: h + x for r, h, x in zip(batch, have, new)}
        record = {"field": args.field, "name": name, "responses": responses}
        journal.write(json.dumps(record) + "\n")
        journal.flush()
        os.fsync(journal.fileno())
        apply(rows, record)
        stats["responses"] += sum(map(len, new))
        stats["truncated"] += cut
        stats["empty"] += sum(not t.strip() for x in new for t in x)
        bar.update(len(batch))
    bar.close()
    del model
    gc.collect()                                                         # free it before the next checkpoint
    return stats


def write_atomic(rows: list[dict], out: Path) -> None:
    """The dataset to `out` (image paths relative to its folder): a temporary file, then os.replace."""
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            image = row.get("image")
            row = dict(row, image=os.path.relpath(image, out.parent)) if image else row
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset in the JSONL schema")
    p.add_argument("--out", default=None, help="where to write it (default: --data, in place)")
    p.add_argument("--teacher", action="append", required=True, metavar="NAME=PATH",
                   help="a checkpoint by path and the name its responses are stored under; "
                        "repeat for several")
    p.add_argument("--field", default="teachers", choices=("teachers", "students"),
                   help="teachers: the teacher cache; "
                        "students: the student's own samples for D's pre-training")
    p.add_argument("-n", type=int, default=16, help="responses per question per checkpoint")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (x N sequences)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    for key, value in PAPER.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    teachers = [t.split("=", 1) for t in args.teacher]
    malformed = any(len(t) != 2 or not t[0] or not t[1] for t in teachers)
    if malformed or len({n for n, _ in teachers}) != len(teachers):
        raise SystemExit(f"--teacher takes NAME=PATH with distinct names, got {args.teacher}")
    if args.n < 1 or args.batch_size < 1:
        raise SystemExit("-n and --batch-size must be >= 1")
    out = Path(args.out or args.data)
    rows = {r["id"]: r for r in load_jsonl(out if out.exists() else args.data)}
    journal_path = out.with_name(out.name + ".journal")
    for record in read_journal(journal_path):                            # resume: what is done is not redone
        apply(rows, record)
    t0, stats = time.time(), {}
    with open(journal_path, "a", encoding="utf-8") as journal:
        for name, path in teachers:
            stats[name] = fill(rows, name, path, args, journal)
            print(f"{name}: {stats[name]}", flush=True)
    write_atomic(list(rows.values()), out)
    journal_path.unlink()
    print(f"wrote {out}: {len(rows)} questions, {args.n} responses per {args.field[:-1]} "
          f"({', '.join(n for n, _ in teachers)}) in {time.time() - t0:.0f}s", flush=True)
    return stats


if __name__ == "__main__":
    main()
