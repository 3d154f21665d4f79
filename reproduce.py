"""Reproduce the paper's comparisons on the embedded task: the baselines, RIL and its ablations, 3 seeds each.

    python reproduce.py                                 # the grid -> runs/grid/table.md, runs/grid/curves.png
    python reproduce.py --only grpo,ril-both --seeds 0  # a subset
    python reproduce.py --steps 40 -- --batch-size 8    # after --: flags for every ril.py run
    python reproduce.py --dry-run                       # print the commands, run nothing

Every run is `ril.py --stage rl` from the same SFT student. Each configuration's discriminator is pre-trained
from that student on the teachers the configuration imitates: one for both teachers, one for each single
teacher. On the embedded task they are checkpoints/marked/tiny-sft and checkpoints/marked/tiny-disc-<teachers>
(`-- --world plain`: checkpoints/tiny-sft and checkpoints/tiny-disc[-teachers]), built first when missing
(`ril.py --stage sft`, `ril.py --stage disc --teachers T`). With `--student PATH` after `--`, PATH is the SFT
start and the discriminators go to <out>/shared/discriminator-<teachers> (unless `--discriminator` is given,
which ril.py then checks against each configuration's teachers).
A run whose summary.json exists is skipped and one with a checkpoint is resumed, so an interrupted grid goes
on where it stopped. Runs go seed-major (every configuration at seed 0 first): a grid cut short still gives
one row per configuration. At the end evaluate.py's compare_table and plot_runs write <out>/table.md
(mean ± std over seeds) and <out>/curves.png.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from data.build import DEFAULT_WORLD, tiny_disc_dir, world_dirs  # where ril.py's embedded runs keep them
from ril import EMBEDDED_WORLD  # the embedded worlds' own defaults (the teachers RIL imitates)

ROOT = Path(__file__).resolve().parent
RIL = ROOT / "ril.py"

# The grid: configuration name -> the ril.py flags that make it (everything else is ril.py's default).
GRID = {
    "grpo":           ["--algo", "grpo"],                # Algorithm 1: answer reward, A = (R - mean) / std
    "drgrpo":         ["--algo", "drgrpo"],              # Algorithm 1: answer reward, A = R - mean
    "ril-methodical": ["--teachers", "methodical"],      # RIL with one teacher
    "ril-reflective": ["--teachers", "reflective"],      # RIL with the other teacher
    "ril-both":       ["--teachers", "methodical,reflective"],  # RIL with both teachers
    "sim-only":       ["--answer-reward", "off"],        # ablation: similarity reward only
    "frozen-disc":    ["--freeze-disc"],                 # ablation: the pre-trained discriminator stays fixed
    "continuous":     ["--similarity", "continuous"],    # ablation: r_sim = 1 - D(o) instead of 1[D(o) < 0.5]
    "beta0":          ["--beta", "0"],                   # ablation: no KL penalty
}
SEEDS = [0, 1, 2]
OWN_FLAGS = ("--stage", "--name", "--out-dir", "--seed", "--resume")  # set per run by this script
# Processes per run and runs at once: on two cores one 2-process run at a time does an RL step ~10% faster
# than two 1-process runs side by side (docs/LOG.md, world v1).
NPROC, PARALLEL = 2, 1
# Every run takes ril.py's own settings: on the embedded task EMBEDDED in ril.py, with --student the paper's.
# What a grid costs on two cores: docs/reproduce.md (--steps N shortens every run).


def run_name(name: str, seed: int) -> str:
    return f"{name}-s{seed}"


def launcher(nproc: int) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N` for several processes, plain python for one."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable]


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value of `--flag VALUE` or `--flag=VALUE` in an argument list (as ril.py's argparse reads
    it: the last wins)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def teachers_of(name: str, extra: list[str]) -> str:
    """The --teachers value a configuration imitates ("" = every teacher in the data): its own, else the one
    given to every run, else ril.py's default (on the embedded task, its world's)."""
    own = flag_value(GRID[name], "--teachers") or flag_value(extra, "--teachers")
    if own is not None or flag_value(extra, "--student") is not None:
        return own or ""
    return EMBEDDED_WORLD[flag_value(extra, "--world") or DEFAULT_WORLD].get("teachers", "")


def uses_disc(name: str) -> bool:
    """Whether a configuration needs a pre-trained discriminator (RIL with a similarity reward)."""
    is_ril = flag_value(GRID[name], "--algo") in (None, "ril")
    return is_ril and flag_value(GRID[name], "--similarity") != "off"


def tiny_dir(extra: list[str]) -> Path:
    """The embedded pipeline's checkpoint folder for the world the runs' flags choose (--world)."""
    return world_dirs(flag_value(extra, "--world") or DEFAULT_WORLD)[1]


def disc_dir(out: Path, extra: list[str], teachers: str) -> Path | None:
    """Where the discriminator for a set of teachers lives: on the embedded task ril.py's own place
    (checkpoints/tiny-disc[-teachers], which ril.py keys the same way); with --student one per set under
    <out>/shared; None when --discriminator is given (ril.py refuses it if it was pre-trained on other
    teachers)."""
    if flag_value(extra, "--student") is None:
        return tiny_disc_dir(tiny_dir(extra), teachers)
    suffix = f"-{teachers.replace(',', '+')}" if teachers else ""
    if flag_value(extra, "--discriminator") is not None:
        return None
    return out / "shared" / f"discriminator{suffix}"


def shared_stages(out: Path, extra: list[str], names: list[str]) -> list[tuple[str, list[str]]]:
    """The commands that build what the runs share, when missing, as (log name, ril.py args): the SFT start on
    the embedded task, then one discriminator per set of imitated teachers (each pre-trained on the teachers
    its configurations imitate). ril.py itself pre-trains a discriminator again when its SFT start has
    changed. Each stage runs in a folder of its own, <out>/shared-<log name>, started again (--overwrite) when
    an earlier attempt left one: a stage runs only when what it builds is missing."""
    def shared(log: str) -> list[str]:
        return ["--out-dir", str(out), "--name", f"shared-{log}", "--overwrite"]
    todo = []
    if flag_value(extra, "--student") is None and not (tiny_dir(extra) / "tiny-sft" / "config.json").exists():
        todo.append(("sft", ["--stage", "sft"] + shared("sft") + extra))
    new_start = bool(todo)                                   # a new SFT start: every discriminator again
    for teachers in dict.fromkeys(teachers_of(n, extra) for n in names if uses_disc(n)):
        path = disc_dir(out, extra, teachers)
        if path is not None and (new_start or not (path / "config.json").exists()):
            flags = (["--teachers", teachers] if teachers else []) + (
                ["--discriminator", str(path)] if flag_value(extra, "--student") else [])
            log = f"disc{teachers and '-' + teachers.replace(',', '+')}"
            todo.append((log, ["--stage", "disc"] + shared(log) + extra + flags))
    return todo


def disc_flags(name: str, out: Path, extra: list[str]) -> list[str]:
    """The flag that points one configuration's runs at its discriminator (with --student; the embedded
    pipeline finds its own)."""
    path = disc_dir(out, extra, teachers_of(name, extra))
    if uses_disc(name) and path and flag_value(extra, "--student"):
        return ["--discriminator", str(path)]
    return []


def run_args(name: str, seed: int, out: Path, common: list[str]) -> list[str]:
    """ril.py's arguments for one run: the common flags, then the configuration's (which a common flag cannot
    undo), then its identity. A run with a checkpoint but no summary was interrupted: it resumes; one that
    failed before its first checkpoint starts again (--overwrite)."""
    folder = out / run_name(name, seed)
    args = [*common, *disc_flags(name, out, common), *GRID[name], "--stage", "rl", "--out-dir", str(out),
            "--name", run_name(name, seed), "--seed", str(seed)]
    if (folder / "checkpoints" / "latest").exists():
        args.append("--resume")
    elif (folder / "metrics.jsonl").exists():
        args.append("--overwrite")
    return args


def launch(args: list[str], log: Path, nproc: int, threads: int) -> int:
    """Run ril.py with `args`, stdout and stderr to `log`; the exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
    with open(log, "w") as f:
        f.write(" ".join([*launcher(nproc), str(RIL), *args]) + "\n")
        f.flush()
        return subprocess.run([*launcher(nproc), str(RIL), *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env).returncode


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def write_report(out: Path, run_dirs: list[Path]) -> str:
    """evaluate.py's comparison table (to <out>/table.md) and curves (to <out>/curves.png) of the finished
    runs."""
    from evaluate import compare_table, group_runs, load_run, plot_runs
    groups = group_runs([load_run(d) for d in run_dirs])
    table = compare_table(groups)
    (out / "table.md").write_text(table + "\n")
    plot_runs(groups, out / "curves.png")
    return table


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False,
                                epilog="Any other option goes to every ril.py run as it is.")
    p.add_argument("--out", default="runs/grid",
                   help="the grid's folder: one run folder per run, table.md, curves.png")
    p.add_argument("--only", default=",".join(GRID),
                   help=f"comma-separated configurations (default all: {','.join(GRID)})")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: ril.py's)")
    p.add_argument("--nproc", type=int, default=NPROC, help="processes per run (torchrun when > 1)")
    p.add_argument("--parallel", type=int, default=PARALLEL, help="runs at once")
    p.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    args, unknown = p.parse_known_args(argv)
    args.extra = unknown + extra
    names = [n for n in args.only.split(",") if n]
    if not names or any(n not in GRID for n in names):
        p.error(f"--only: unknown configuration in {args.only!r}; known: {', '.join(GRID)}")
    if not all(s.isdigit() for s in args.seeds.split(",")):
        p.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    args.names, args.seed_list = names, [int(s) for s in args.seeds.split(",")]
    if bad := [f for f in OWN_FLAGS if any(a == f or a.startswith(f + "=") for a in args.extra)]:
        p.error(f"{', '.join(bad)}: set per run by reproduce.py (use --out, --seeds)")
    if args.nproc < 1 or args.parallel < 1:
        p.error("--nproc and --parallel must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out).resolve()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cpus // (args.nproc * args.parallel))  # intra-op threads per process: the cores shared
    common = [*(["--steps", str(args.steps)] if args.steps else []), *args.extra]
    prep = shared_stages(out, args.extra, args.names)
    runs = [(n, s) for s in args.seed_list for n in args.names]  # seed-major
    done = [r for r in runs if (out / run_name(*r) / "summary.json").exists()]
    todo = [r for r in runs if r not in done]
    if args.dry_run:
        for log, a in prep:
            print(" ".join([*launcher(args.nproc * args.parallel), str(RIL), *a]))
        for r in todo:
            print(" ".join([*launcher(args.nproc), str(RIL), *run_args(*r, out, common)]))
        print(f"{len(todo)} runs to do, {len(done)} finished runs skipped")
        return
    print(f"{len(runs)} runs: {len(done)} finished (skipped), {len(todo)} to do, {args.parallel} at a time x "
          f"{args.nproc} process(es) x {threads} thread(s); logs in {out}/<run>/log.txt", flush=True)
    for log, a in prep:  # the shared SFT start / discriminator, once, with all the grid's processes
        print(f"shared stage: ril.py {' '.join(a[:2])} (log {out / 'shared' / f'{log}.log'})", flush=True)
        if launch(a, out / "shared" / f"{log}.log", args.nproc * args.parallel, threads) != 0:
            raise SystemExit(f"shared stage {log} failed:\n{tail(out / 'shared' / f'{log}.log')}")
    failed = []
    with ThreadPoolExecutor(args.parallel) as pool, tqdm(total=len(todo), unit="run", desc="grid") as bar:
        jobs = {pool.submit(launch, run_args(*r, out, common), out / run_name(*r) / "log.txt",
                            args.nproc, threads): r for r in todo}
        for job in as_completed(jobs):
            name = run_name(*jobs[job])
            if job.result() != 0 or not (out / name / "summary.json").exists():
                failed.append(name)
                tqdm.write(f"{name} failed (exit {job.result()}):\n{tail(out / name / 'log.txt')}")
            bar.set_postfix(last=name, failed=len(failed))
            bar.update()
    finished = [out / run_name(*r) for r in runs if (out / run_name(*r) / "summary.json").exists()]
    if finished:
        print(write_report(out, finished))
        print(f"wrote {out / 'table.md'} and {out / 'curves.png'} ({len(finished)} runs)")
    minutes, seconds = divmod(round(time.time() - t0), 60)
    print(f"grid wall-clock: {minutes} min {seconds} s for {len(todo)} runs ({len(done)} skipped)")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)} (logs: {out}/<run>/log.txt)")


if __name__ == "__main__":
    main()
