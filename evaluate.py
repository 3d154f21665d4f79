"""Benchmarks and metrics: accuracy against chance and a blind baseline, pass@k, response length, reflection;
run comparison tables with paired intervals, and plots.

    python evaluate.py --model checkpoints/tiny-sft --data data/embedded/test.jsonl --out eval.json
    python evaluate.py --model CKPT --data DATA.jsonl --discriminator CKPT_D    # + teacher-likeness
    python evaluate.py --compare runs/ril-s0 runs/ril-s1 runs/drgrpo-s0 --plot curves.png

MAYE's scheme (arXiv 2504.02587): pass@1 greedy, pass@k sampled (k=8, T=1.0), pass@1 at T=0.6, response
length in tokens, the share of parsable final answers and five reflection metrics. Every accuracy comes with
n, a 95% Wilson interval, chance and the blind baseline, overall and per kind; ril.py calls the same
functions, so a number means the same in its log and here. Runs are compared with paired 95% intervals.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import distributed
import rewards
import rollout
from data.dataset import DatasetError, blind_guesses, chance_levels, encode_rows, load_jsonl

# MAYE's reflection words, plus spelling variants and "double-check" (the embedded reflective teacher's
# phrase). Matched case-insensitively as whole words: a letter, digit, "_" or "-" may not touch either
# end, so "await", "waiting", "pre-verify" and "yet-to-come" do not count, while "Wait," does.
REFLECTION_WORDS = ["re-check", "recheck", "re-evaluate", "reevaluate", "re-examine", "reexamine",
                    "re-think", "rethink", "check again", "think again", "try again", "double-check",
                    "double check", "verify", "wait", "yet"]
REFLECTION_ALTERNATIVES = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in REFLECTION_WORDS)
REFLECTION_RE = re.compile(r"(?<![\w-])(?:" + REFLECTION_ALTERNATIVES + r")(?![\w-])", re.IGNORECASE)
CURVES = ["reward/answer", "reward/similarity", "eval/accuracy", "response/length", "policy/kl"]  # --plot

# ---- Metrics -----------------------------------------------------------------------------------------------
def is_reflective(text: str) -> bool:
    """Whether a response holds at least one reflection word (whole-word match)."""
    return REFLECTION_RE.search(text) is not None

def reflection_metrics(responses: list[str], correct: list[float]) -> dict:
    """MAYE's five reflection metrics. N responses, N+ correct, N_ref reflective, N_ref+ both. A ratio whose
    denominator is 0 is reported as 0.0 (never NaN)."""
    assert len(responses) == len(correct), (len(responses), len(correct))
    ref = [is_reflective(r) for r in responses]
    ok = [c > 0.5 for c in correct]
    n, n_pos, n_ref = len(ref), sum(ok), sum(ref)
    n_ref_pos = sum(r and c for r, c in zip(ref, ok))
    fractions = {"reflection_ratio": (n_ref, n),                                # N_ref / N
                 "reflection_ratio_correct": (n_ref_pos, n_pos),                # N_ref+ / N+
                 "reflection_ratio_incorrect": (n_ref - n_ref_pos, n - n_pos),  # (N_ref - N_ref+) / (N - N+)
                 "accuracy_reflective": (n_ref_pos, n_ref),                     # N_ref+ / N_ref
                 "accuracy_non_reflective": (n_pos - n_ref_pos, n - n_ref)}     # (N+ - N_ref+) / (N - N_ref)
    return {name: num / den if den else 0.0 for name, (num, den) in fractions.items()}

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    assert 0 <= c <= n and 1 <= k <= n, (n, c, k)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # math.comb is 0 when n - c < k

def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (good near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))

def accuracy_report(correct: list[float], rows: list[dict], train_rows: list[dict] | None = None) -> dict:
    """Accuracy of `correct` (0/1, one per row) with n and a 95% Wilson interval; given the training split's
    rows, also chance (one over the kind's answer count) and the blind baseline (its most common answer for
    the question's text) with its interval; the same per `kind`. `correct` is kept for paired_bootstrap."""
    assert len(correct) == len(rows), (len(correct), len(rows))
    blind = chance = None
    if train_rows:
        guesses = blind_guesses(train_rows, rows)
        blind = [float(rewards.answers_match(g, r["answer"])) for g, r in zip(guesses, rows)]
        chance = chance_levels(train_rows, rows)

    def summary(idx: list[int]) -> dict:
        n, k = len(idx), sum(correct[i] for i in idx)
        out = {"n": n, "accuracy": k / max(1, n), "ci95": wilson_interval(k, n)}
        if blind is not None:
            out["chance"] = sum(chance[i] for i in idx) / max(1, n)
            out["blind"] = sum(blind[i] for i in idx) / max(1, n)
            out["blind_ci95"] = wilson_interval(sum(blind[i] for i in idx), n)
        return out

    kinds = sorted({r.get("kind", "") for r in rows})
    report = summary(list(range(len(rows))))
    if kinds != [""]:
        report["per_kind"] = {kd: summary([i for i, r in enumerate(rows) if r.get("kind", "") == kd])
                              for kd in kinds}
    return report | {"correct": [float(c) for c in correct]}

def format_report(report: dict) -> str:
    """'0.412 [0.382, 0.443], n=1000; chance 0.351, blind 0.340 [0.311, 0.370]' (blind parts if known)."""
    lo, hi = report["ci95"]
    text = f"{report['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], n={report['n']}"
    if "blind" in report:
        blo, bhi = report["blind_ci95"]
        text += f"; chance {report['chance']:.3f}, blind {report['blind']:.3f} [{blo:.3f}, {bhi:.3f}]"
    return text

def paired_bootstrap(a: list[list[float]], b: list[list[float]], n_boot: int = 10_000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Difference in mean accuracy a - b and its 95% paired bootstrap interval. a, b: per-question correctness
    [seeds][questions] of two configurations on the same questions (seed counts may differ); each resample
    draws the questions (the same for both: paired) and each configuration's seeds, with replacement.
        paired_bootstrap([[1, 1, 0, 1]], [[1, 0, 0, 1]])  ->  (0.25, 0.0, 0.75)"""
    A, B = np.asarray(a, dtype=float), np.asarray(b, dtype=float)           # [Sa, Q], [Sb, Q]
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"paired_bootstrap needs [seeds, questions] on the same questions, got {A.shape}, "
                         f"{B.shape}")
    rng = np.random.default_rng(seed)
    Q = A.shape[1]
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        q = rng.integers(0, Q, Q)                                           # [Q] the same questions for both
        sa, sb = rng.integers(0, len(A), len(A)), rng.integers(0, len(B), len(B))
        diffs[i] = A[sa][:, q].mean() - B[sb][:, q].mean()
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return float(A.mean() - B.mean()), float(lo), float(hi)

def format_difference(diff: float, lo: float, hi: float) -> str:
    """'+0.052 [+0.021, +0.083]', with 'not significant' when the interval covers 0."""
    return f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" not significant" if lo <= 0 <= hi else "")

# ---- Evaluating a model ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_model(model, tokenizer, image_processor, rows: list[dict], *, temperature: float = 0.0,
                   num_samples: int = 1, max_new_tokens: int = 256, batch_size: int = 16, top_p: float = 1.0,
                   top_k: int = 0, generator: torch.Generator | None = None, progress: bool = False) -> dict:
    """num_samples scored responses per row (temperature=0 is greedy: then num_samples=1). Returns accuracy
    (pass@1 over all responses), pass@{num_samples} if num_samples > 1, answer_rate, length_mean / _std / _max
    (tokens), the reflection metrics and the prompt-major lists `responses`, `correct` and `lengths` (entry
    b*num_samples + j is sample j of row b)."""
    if not rows:
        raise ValueError("evaluate_model: no rows to evaluate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    responses, lengths = [], []
    desc = f"eval T={temperature} x{num_samples}"
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress):
        batch = rows[i:i + batch_size]
        prompts = encode_rows(model, tokenizer, image_processor, batch, device)
        out = rollout.generate(model, prompts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                               temperature=temperature, top_p=top_p, top_k=top_k, eos_token_id=None,
                               generator=generator)
        ids, mask = out.response_ids.cpu(), out.response_mask.cpu().bool()  # [B*num_samples, T]
        responses += [tokenizer.decode(ids[j][mask[j]], skip_special_tokens=True) for j in range(len(ids))]
        lengths += mask.sum(1).tolist()
    model.train(was_training)
    answers = [r["answer"] for r in rows for _ in range(num_samples)]  # prompt-major, like the responses
    correct = [float(rewards.answer_reward(text, ans)) for text, ans in zip(responses, answers)]
    length = torch.tensor(lengths, dtype=torch.float)
    result = {"accuracy": sum(correct) / len(correct),
              "answer_rate": sum(rewards.extract_answer(t) is not None for t in responses) / len(responses),
              "length_mean": length.mean().item(),
              "length_std": length.std(correction=0).item(),  # population std over responses
              "length_max": int(length.max().item())}
    if num_samples > 1:
        per_question = [sum(correct[b * num_samples:(b + 1) * num_samples]) for b in range(len(rows))]
        result[f"pass@{num_samples}"] = statistics.fmean(pass_at_k(num_samples, round(c), num_samples)
                                                         for c in per_question)
    result |= reflection_metrics(responses, correct)
    return result | {"responses": responses, "correct": correct, "lengths": lengths}

def held_out(model, tokenizer, image_processor, rows: list[dict], train_rows: list[dict],
             max_new_tokens: int) -> dict:
    """Greedy pass@1 on held-out rows (accuracy_report), split over the ranks of a torchrun job: each rank
    calls it on as many rows (FSDP's collectives need it), the last padding its share with uncounted rows."""
    rank, world = distributed.rank(), distributed.world_size()
    per = math.ceil(len(rows) / world)
    mine = (rows[rank * per:(rank + 1) * per] + rows[:per])[:per]
    n_real = max(0, min(per, len(rows) - rank * per))
    res = evaluate_model(model, tokenizer, image_processor, mine, temperature=0.0,
                         max_new_tokens=max_new_tokens, batch_size=32)
    correct = distributed.all_gather_list(res["correct"][:n_real])      # in row order: rank 0's rows first
    return accuracy_report(correct, rows, train_rows)

def print_eval_table(results: dict):
    """One markdown row per decoding setting."""
    cols = ["accuracy", "pass@k", "answer_rate", "length", "reflection_ratio", "accuracy_reflective",
            "accuracy_non_reflective", "teacher_like"]
    print("| setting | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for name, r in results.items():
        passk = next((f"{v:.3f}" for k, v in r.items() if k.startswith("pass@")), "–")
        cells = [f"{r['accuracy']:.3f}", passk, f"{r['answer_rate']:.3f}",
                 f"{r['length_mean']:.1f} ± {r['length_std']:.1f}"]
        cells += [f"{r[k]:.3f}" for k in cols[4:7]]
        cells.append(f"{r['teacher_like']:.3f}" if "teacher_like" in r else "–")
        print(f"| {name} | " + " | ".join(cells) + " |")

def evaluate_checkpoint(args) -> dict:
    """The three MAYE decoding settings on one checkpoint and one dataset; prints a table, writes JSON."""
    if args.out:  # fail now, before transformers loads, rather than after all the work (and leave no file)
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=Path(args.out).parent).close()
        except OSError as e:
            raise SystemExit(f"--out {args.out}: cannot write: {e}") from None
    rows = load_jsonl(args.data)[:args.limit]  # the data before the model: a bad file fails at once
    if not rows:
        raise SystemExit(f"{args.data}: no rows to evaluate (--limit {args.limit})")
    beside = Path(args.data).parent / "train.jsonl"  # the default split for chance and the blind baseline
    train_data = args.train_data or (beside if beside.is_file() and not beside.samefile(args.data) else None)
    train_rows = load_jsonl(train_data) if train_data else None
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    image_processor = AutoImageProcessor.from_pretrained(args.model)
    # the response cap the student was trained with (ril.py writes it into generation_config.json)
    max_new_tokens = args.max_new_tokens or model.generation_config.max_new_tokens or 1024
    disc = None
    if args.discriminator:
        from discriminator import Discriminator, p_student
        disc = Discriminator.from_pretrained(args.discriminator, dtype=dtype).to(device).eval()
    generator = torch.Generator(device).manual_seed(args.seed)
    settings = {"greedy": dict(temperature=0.0, num_samples=1),
                f"pass@{args.k} T=1.0": dict(temperature=1.0, num_samples=args.k),
                "T=0.6": dict(temperature=0.6, num_samples=1)}
    results = {}
    for name, kw in settings.items():
        res = evaluate_model(model, tokenizer, image_processor, rows, max_new_tokens=max_new_tokens,
                             batch_size=args.batch_size, top_p=args.top_p, generator=generator, progress=True,
                             **kw)
        if disc is not None:  # teacher-like: p_student < 0.5, the r_sim rule (D reads the student's tokens)
            p = p_student(disc, tokenizer, res["responses"], args.disc_max_len, args.batch_size)  # [N]
            res["teacher_like"] = (p < 0.5).float().mean().item()
        results[name] = res
    greedy = accuracy_report(results["greedy"]["correct"], rows, train_rows)
    print(f"{args.model} on {args.data} ({len(rows)} questions, at most {max_new_tokens} new tokens)")
    print_eval_table(results)
    print(f"greedy accuracy: {format_report(greedy)}"
          + ("" if train_rows else " (no training split found: no chance or blind baseline; --train-data)"))
    for kind, r in greedy.get("per_kind", {}).items():
        print(f"  {kind}: {format_report(r)}")
    summary = {"pass@1 greedy": results["greedy"]["accuracy"],
               f"pass@{args.k} T=1.0": results[f"pass@{args.k} T=1.0"][f"pass@{args.k}"],
               "pass@1 T=0.6": results["T=0.6"]["accuracy"]}
    report = {"model": str(args.model), "data": str(args.data), "n_questions": len(rows), "summary": summary,
              "greedy": greedy, "args": vars(args), "settings": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.out}")
    return report

# ---- Comparing training runs -------------------------------------------------------------------------------
def load_run(path: str | Path) -> dict:
    """A run folder: its summary.json and its metrics.jsonl rows (a line torn by a kill: skipped, counted)."""
    path = Path(path)
    if not (path / "summary.json").is_file():
        raise SystemExit(f"{path}: no summary.json (not a finished run folder?)")
    summary = json.loads((path / "summary.json").read_text())
    metrics, bad = [], 0
    if (path / "metrics.jsonl").is_file():
        for line in filter(str.strip, open(path / "metrics.jsonl", encoding="utf-8")):  # blank lines skipped
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        print(f"{path}/metrics.jsonl: skipped {bad} unreadable line(s)", file=sys.stderr)
    return {"path": path, "summary": summary, "config": summary.get("config", {}), "metrics": metrics}

def config_key(config: dict) -> str:
    """What makes two runs the same configuration: the config minus seed, name, outputs, stage (all = rl)."""
    ignore = {"seed", "name", "run_name", "out", "out_dir", "output_dir", "run_dir", "save_dir",
              "checkpoint_dir", "resume", "overwrite", "keep_checkpoints", "stage"}
    return json.dumps({k: v for k, v in config.items() if k not in ignore}, sort_keys=True, default=str)

def group_runs(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by configuration, labelled by the first run's name without its seed suffix."""
    groups, labels = {}, {}
    for run in runs:
        key = config_key(run["config"])
        if key not in labels:
            name = str(run["config"].get("name") or run["path"].name)
            label = re.sub(r"[-_.]?(seed|s)\d+$", "", name) or name
            labels[key] = label if label not in groups else f"{label} ({len(groups) + 1})"
        groups.setdefault(labels[key], []).append(run)
    return groups

def series(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one key, from the rows that log it as a finite number (None, NaN left out)."""
    return [(int(r.get("step", i)), float(r[key])) for i, r in enumerate(metrics)
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

def mean_std(values: list[float]) -> str:
    """'mean ± std' (sample std over seeds), the value for one seed, '–' for none; 3 decimals or 1e-04."""
    if not values:
        return "–"
    numbers = [statistics.fmean(values)] + ([statistics.stdev(values)] if len(values) > 1 else [])
    return " ± ".join(f"{x:.3f}" if x == 0 or abs(x) >= 0.01 else f"{x:.1e}" for x in numbers)

def final_correct(run: dict, split: str = "test", which: str = "final") -> list[float] | None:
    """Per-question correctness of a run's student (`final` or `start`) on a split, from its summary.json."""
    return ((run["summary"].get(split) or {}).get(which) or {}).get("correct")

def final_reports(policy, start, tokenizer, image_processor, train_rows: list[dict], val_rows: list[dict],
                  test_rows: list[dict], val_start: dict | None, max_new_tokens: int) -> dict:
    """A run's held-out accuracy: val (the start's report given) and test, of the `start` model and the final
    `policy`, and each split's gain (final - start) with its paired 95% interval."""
    report = lambda model, rows: held_out(model, tokenizer, image_processor, rows, train_rows, max_new_tokens)
    summary = {}
    if val_rows:
        summary["val"] = {"start": val_start, "final": report(policy, val_rows)}
    if test_rows:
        summary["test"] = {"start": report(start, test_rows), "final": report(policy, test_rows)}
    for part in summary.values():
        if part["start"]:
            diff, lo, hi = paired_bootstrap([part["final"]["correct"]], [part["start"]["correct"]])
            part["gain"] = {"diff": diff, "ci95": [lo, hi]}
    return summary

def print_run_summary(summary: dict) -> None:
    """The accuracies of a run's summary.json, one line each, and the gains."""
    print(f"{summary['wall_clock_s']:.0f}s, {summary['skipped_steps']} skipped steps", flush=True)
    for name in ("val", "test"):
        split = summary.get(name) or {}
        for which in ("start", "final"):
            if split.get(which):
                print(f"{name} {which:5s}: {format_report(split[which])}", flush=True)
        if "gain" in split:
            diff = format_difference(split["gain"]["diff"], *split["gain"]["ci95"])
            print(f"{name} gain : {diff} (final - start, paired 95% interval)", flush=True)

def compare_table(groups: dict[str, list[dict]], reference: str | None = None, tail: int = 10) -> str:
    """Chance and the blind baseline, then one markdown row per configuration, each number mean ± std over
    seeds: test accuracy of the start and final student, the final one's difference from the `reference`
    configuration (default: the first) with its paired 95% interval, final val accuracy, the best logged
    eval/accuracy, and the mean of each run's last `tail` logged values of the other CURVES."""
    reference = reference or next(iter(groups))
    if reference not in groups:
        raise SystemExit(f"--reference {reference!r}: no such configuration (have {list(groups)})")
    ref = [c for r in groups[reference] if (c := final_correct(r))]
    finals = [k for k in CURVES if k != "eval/accuracy"]
    header = ["run", "seeds", "test start", "test final", f"test final - {reference}", "val final",
              "max eval/accuracy"] + [f"final {k}" for k in finals]
    lines = []
    first = next((r["summary"]["test"]["final"] for rs in groups.values() for r in rs
                  if "blind" in ((r["summary"].get("test") or {}).get("final") or {})), None)
    if first:
        lines.append(f"Test split: n={first['n']}, chance {first['chance']:.3f}, "
                     f"blind baseline {first['blind']:.3f}.\n")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rs in groups.items():
        acc = lambda split, which: [sum(c) / len(c) for r in rs if (c := final_correct(r, split, which))]
        cells = [label, str(len(rs)), mean_std(acc("test", "start")), mean_std(acc("test", "final"))]
        mine = [c for r in rs if (c := final_correct(r))]
        comparable = label != reference and mine and ref
        cells.append(format_difference(*paired_bootstrap(mine, ref)) if comparable else "–")
        curves = [s for r in rs if (s := series(r["metrics"], "eval/accuracy"))]
        cells += [mean_std(acc("val", "final")), mean_std([max(v for _, v in s) for s in curves])]
        for k in finals:
            cells.append(mean_std([statistics.fmean(v for _, v in s[-tail:]) for r in rs
                                   if (s := series(r["metrics"], k))]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

def plot_runs(groups: dict[str, list[dict]], out: str | Path):
    """Training curves, one panel per logged key in CURVES (missing keys skipped): the mean over a group's
    seeds at each step, with a shaded ± std band when the group has several runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in CURVES if any(series(r["metrics"], k) for rs in groups.values() for r in rs)]
    if not keys:
        raise SystemExit(f"--plot: no run logs any of {CURVES}")
    ncols = math.ceil(len(keys) / math.ceil(len(keys) / 3))  # 5 -> 3 + 2, 4 -> 2 + 2
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    color = {label: f"C{i % 10}" for i, label in enumerate(groups)}  # one colour per group in every panel
    for ax, key in zip(axes.flat, keys):
        for label, rs in groups.items():
            by_step: dict[int, list[float]] = {}
            for r in rs:
                for step, v in series(r["metrics"], key):
                    by_step.setdefault(step, []).append(v)
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = np.array([statistics.fmean(by_step[s]) for s in steps])
            std = np.array([statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps])
            ax.plot(steps, mean, color=color[label], marker="o" if len(steps) <= 30 else None, markersize=3)
            if len(rs) > 1:
                ax.fill_between(steps, mean - std, mean + std, color=color[label], alpha=0.2, linewidth=0)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=color[label], marker="o", markersize=3, label=f"{label} (n={len(rs)})")
               for label, rs in groups.items()]
    axes.flat[0].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)

# ---- Command line ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="student checkpoint (a save_pretrained folder)")
    p.add_argument("--data", help="a JSONL dataset in the project's schema")
    p.add_argument("--discriminator", help="discriminator checkpoint: adds teacher-likeness (p < 0.5)")
    p.add_argument("--disc-max-len", type=int, default=1024, help="discriminator input tokens")
    p.add_argument("--out", help="where to write the JSON report")
    p.add_argument("--train-data", help="split for the baselines (default: train.jsonl beside --data)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="questions per generate call")
    p.add_argument("--max-new-tokens", type=int, help="response cap (default: the checkpoint's, as trained)")
    p.add_argument("--k", type=int, default=8, help="samples per question for pass@k at T=1.0")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="run folders (summary.json, metrics.jsonl)")
    p.add_argument("--plot", help="with --compare: write the training curves to this PNG")
    p.add_argument("--reference", help="with --compare: the configuration to subtract (default: the first)")
    args = p.parse_args(argv)
    if args.plot and not args.compare:
        p.error("--plot needs --compare RUN [RUN ...]")
    if args.compare:
        groups = group_runs([load_run(r) for r in args.compare])
        print(compare_table(groups, args.reference))
        if args.plot:
            plot_runs(groups, args.plot)
            print(f"wrote {args.plot}")
    elif args.model and args.data:
        try:
            evaluate_checkpoint(args)
        except DatasetError as e:  # a bad data file: its name, line and problem, without a traceback
            raise SystemExit(f"error: {e}") from None
    else:
        p.error("give --model and --data, or --compare RUN [RUN ...]")

if __name__ == "__main__":
    main()
