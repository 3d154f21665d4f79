"""reproduce.py: the commands it builds, and a 2 x 2 grid on the tiny student end to end (table, curves,
resume)."""
import re

import numpy as np
import pytest
from PIL import Image

import reproduce
from data.build import world_dirs


def test_dry_run_commands(tmp_path, capsys):
    (tmp_path / "beta0-s1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "beta0-s1" / "checkpoints" / "latest").write_text("step-2")  # interrupted: resumes
    (tmp_path / "beta0-s2").mkdir()
    (tmp_path / "beta0-s2" / "summary.json").write_text("{}")                # finished: skipped
    (tmp_path / "beta0-s0").mkdir()
    (tmp_path / "beta0-s0" / "metrics.jsonl").write_text("")                 # failed early: starts again
    reproduce.main(["--dry-run", "--only", "beta0", "--out", str(tmp_path), "--steps", "7", "--beta", "0.5",
                    "--", "--student", str(tmp_path), "--discriminator", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[-1] == "2 runs to do, 1 finished runs skipped"
    for seed, line in zip((0, 1), lines):
        args = line.split()
        assert "--nproc_per_node=2" in line  # one 2-process run at a time by default
        assert reproduce.flag_value(args, "--beta") == "0"  # the configuration's flag wins over a common one
        assert reproduce.flag_value(args, "--steps") == "7" and reproduce.flag_value(args, "--stage") == "rl"
        assert reproduce.flag_value(args, "--lr") is None  # ril.py's own lr
        assert reproduce.flag_value(args, "--name") == f"beta0-s{seed}"
        assert reproduce.flag_value(args, "--seed") == str(seed)
        assert ("--resume" in args) == (seed == 1) and ("--overwrite" in args) == (seed == 0)
    reproduce.main(["--dry-run", "--only", "grpo", "--seeds", "0", "--nproc", "1", "--out", str(tmp_path),
                    "--lr", "3e-5"])
    args = capsys.readouterr().out.split()
    assert args[1].endswith("ril.py")  # plain python
    assert reproduce.flag_value(args, "--lr") == "3e-5"  # the last --lr wins
    assert reproduce.flag_value(args, "--steps") is None  # no --steps: ril.py's own


def test_the_embedded_world_flag_picks_its_checkpoints(tmp_path):
    """`-- --world plain` keeps the plain world's SFT start and discriminators apart from the marked ones (the
    default world), and configurations that name no teachers imitate the world's default ones."""
    plain, marked = world_dirs("plain")[1], world_dirs("marked")[1]
    assert marked != plain and reproduce.tiny_dir([]) == marked
    assert reproduce.disc_dir(tmp_path, ["--world", "plain"], "") == plain / "tiny-disc"
    assert reproduce.disc_dir(tmp_path, ["--lr", "1"], "methodical") == marked / "tiny-disc-methodical"
    assert reproduce.teachers_of("frozen-disc", []) == "methodical"  # ril.py's default in the marked world
    assert reproduce.teachers_of("frozen-disc", ["--world", "plain"]) == ""  # every teacher
    assert reproduce.teachers_of("frozen-disc", ["--teachers", "reflective"]) == "reflective"
    assert reproduce.teachers_of("ril-both", ["--teachers", "reflective"]) == "methodical,reflective"


def test_each_configuration_gets_a_discriminator_of_its_own_teachers(tmp_path, capsys):
    """Single-teacher configurations get a discriminator pre-trained on that teacher only; both-teacher ones
    share one; the baselines need none."""
    reproduce.main(["--dry-run", "--only", "grpo,ril-methodical,ril-both,frozen-disc", "--seeds", "0",
                    "--out", str(tmp_path), "--", "--student", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    prep = [line.split() for line in lines if "--stage disc" in " ".join(line.split())]
    built = [(reproduce.flag_value(a, "--teachers"), reproduce.flag_value(a, "--discriminator"))
             for a in prep]
    both = "methodical,reflective"
    assert built == [("methodical", str(tmp_path / "shared" / "discriminator-methodical")),
                     (both, str(tmp_path / "shared" / "discriminator-methodical+reflective")),
                     (None, str(tmp_path / "shared" / "discriminator"))]  # --student: every teacher
    names = [reproduce.flag_value(a, "--name") for a in prep]  # a used run folder is refused: one each
    assert names == ["shared-disc-methodical", "shared-disc-methodical+reflective", "shared-disc"]
    assert all("--overwrite" in a for a in prep)
    rl = [line.split() for line in lines if "--stage rl" in line]
    runs = {reproduce.flag_value(a, "--name"): a for a in rl}
    disc = reproduce.flag_value(runs["ril-methodical-s0"], "--discriminator")
    assert disc.endswith("discriminator-methodical")
    both = reproduce.flag_value(runs["ril-both-s0"], "--discriminator")
    assert both.endswith("shared/discriminator-methodical+reflective")
    assert reproduce.flag_value(runs["frozen-disc-s0"], "--discriminator").endswith("shared/discriminator")
    assert reproduce.flag_value(runs["grpo-s0"], "--discriminator") is None


@pytest.mark.parametrize("argv, message", [
    (["--only", "ril,grpo"], "unknown configuration"),
    (["--seeds", "0,x"], "comma-separated integers"),
    (["--", "--seed", "3"], "--seed: set per run"),
    (["--name=x"], "--name: set per run"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--dry-run", *argv])
    assert message in capsys.readouterr().err


def test_tiny_grid_end_to_end(tiny_student, embedded, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["--only", "grpo,ril-both", "--seeds", "0,1", "--steps", "1", "--nproc", "1", "--parallel", "2",
            "--out", str(out), "--eval-limit", "4", "--",
            "--student", str(tiny_student), "--data", str(embedded / "train.jsonl"),
            "--eval-data", str(embedded / "val.jsonl"), "--test-data", str(embedded / "test.jsonl"),
            "--batch-size", "2", "--group-size", "2",
            "--max-new-tokens", "16", "--max-disc-len", "64", "--micro-batch", "8", "--sample-every", "0",
            "--save-every", "0", "--disc-steps", "1", "--disc-questions", "4", "--disc-samples", "1",
            "--disc-batch-size", "4"]
    reproduce.main(argv)
    printed = capsys.readouterr().out
    runs = [f"{n}-s{s}" for n in ("grpo", "ril-both") for s in (0, 1)]
    for r in runs:
        assert (out / r / "summary.json").is_file() and (out / r / "log.txt").is_file()
    both = out / "shared" / "discriminator-methodical+reflective"
    assert (both / "config.json").is_file()  # one discriminator for both seeds
    assert "--discriminator" in (out / "ril-both-s1" / "log.txt").read_text().splitlines()[0]

    table = (out / "table.md").read_text()
    assert table.strip() in printed
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    # the seeds of a configuration together, one row each
    assert sorted(r.split("|")[1].strip() for r in rows) == ["grpo", "ril-both"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[1] == "2" and re.fullmatch(r"\S+ ± \S+", cells[2])  # 2 seeds, test start as mean ± std
    assert "Test split: n=40, chance" in table  # the baselines head the table

    img = Image.open(out / "curves.png")
    assert img.format == "PNG" and np.asarray(img.convert("RGB")).std() > 10

    stamps = {r: (out / r / "summary.json").stat().st_mtime_ns for r in runs}
    reproduce.main(argv)  # everything finished: nothing runs again, the report is rewritten
    printed = capsys.readouterr().out
    assert "4 finished (skipped), 0 to do" in printed and "0 runs (4 skipped)" in printed
    assert {r: (out / r / "summary.json").stat().st_mtime_ns for r in runs} == stamps
    assert (out / "table.md").read_text() == table


def test_only_missing_discriminators_are_built(tmp_path, capsys):
    """An existing discriminator is reused even when another one has to be built first."""
    (tmp_path / "shared" / "discriminator-methodical+reflective").mkdir(parents=True)
    (tmp_path / "shared" / "discriminator-methodical+reflective" / "config.json").write_text("{}")
    reproduce.main(["--dry-run", "--only", "ril-methodical,ril-both", "--seeds", "0", "--out", str(tmp_path),
                    "--", "--student", str(tmp_path)])
    prep = [line.split() for line in capsys.readouterr().out.splitlines() if "--stage disc" in line]
    assert [reproduce.flag_value(a, "--teachers") for a in prep] == ["methodical"]
