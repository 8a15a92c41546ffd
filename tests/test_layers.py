"""The layers: the core imports without Spark, and the import-linter contracts catch a wrong import.

`make test` runs `lint-imports` on the tree itself; these tests prove the two
claims that run cannot show: that the core really loads with no pyspark in the
process, and that each contract fails when the import it forbids appears.
"""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sparkrec.core

pytestmark = pytest.mark.nojvm

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def core_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(sparkrec.core.__path__, "sparkrec.core."))


def test_every_core_module_loads_without_pyspark():
    modules = core_modules()
    # The kernels a server shares with the batch are among them.
    for kernel in ("topk", "foldin", "block", "metrics", "pseudonyms", "config", "columns"):
        assert f"sparkrec.core.{kernel}" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(p for p in ('pyspark', 'py4j', 'delta') if p in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], capture_output=True, text=True, cwd=tree)


def test_the_contracts_hold_on_the_tree_and_break_on_a_wrong_import(tmp_path):
    shutil.copytree(ROOT / "sparkrec", tmp_path / "sparkrec", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    kept = _lint(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "4 kept, 0 broken" in kept.stdout

    def add(rel: str, line: str) -> None:
        with (tmp_path / "sparkrec" / rel).open("a") as fh:
            fh.write(f"\n{line}\n")

    add("core/topk.py", "import pyspark")                      # Spark in the core
    add("batch/ids.py", "from sparkrec.stream import live")     # an upward import
    add("storage/files.py", "from sparkrec.dev import kafka")  # a development service in a product layer
    add("serve/state.py", "from sparkrec.storage import tables")  # the server reaching for Spark's storage
    add("serve/app.py", "from sparkrec.stream import live")      # one sibling importing the other
    (tmp_path / "sparkrec" / "search.py").write_text('"""A module outside every layer."""\n')
    broken = _lint(tmp_path)
    assert broken.returncode != 0
    out = " ".join(broken.stdout.split())
    assert "0 kept, 4 broken" in out
    assert "sparkrec.core.topk -> pyspark" in out
    assert "sparkrec.batch.ids -> sparkrec.stream.live" in out
    assert "sparkrec.storage.files -> sparkrec.dev.kafka" in out
    assert "sparkrec.serve.state -> sparkrec.storage.tables" in out
    assert "sparkrec.serve.app -> sparkrec.stream.live" in out
    assert "sparkrec.search" in out  # exhaustive: a new folder must be given a layer
