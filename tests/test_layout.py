"""The layout's promises: rollout.py, attention.py, discriminator.py and rewards.py can be copied alone (no
import of the project anywhere in them, inside functions included), and each imports in a folder that holds
only itself."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {p.stem for p in ROOT.glob("*.py")} | {"data", "tests"}


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module a file imports, wherever the import statement stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            names.add(".")                                                  # a relative import
    return names


@pytest.mark.parametrize("name", ["rollout", "attention", "discriminator", "rewards"])
def test_copy_alone_files_import_nothing_from_the_project(name, tmp_path):
    own = imported_modules(ROOT / f"{name}.py") & (PROJECT | {"."})
    assert not own, f"{name}.py imports {sorted(own)} from the project"
    shutil.copy(ROOT / f"{name}.py", tmp_path)
    subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, check=True)


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from rollout import generate\n    return generate\n")
    assert "rollout" in imported_modules(f)
