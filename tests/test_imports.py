"""Import hygiene: no import cycles among hf_hetermoe and model_patches modules (benchmarks/import_graph.py), and
the pure-Python parts (planner, config, the `hetermoe plan` front end) load neither torch nor the Trainer."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torch.distributed", "transformers", "transformers.trainer", "hf_hetermoe.zebra")


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "benchmarks" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles():
    graph = _import_graph()
    edges = graph.edges()
    assert "hf_hetermoe.config" in edges and "model_patches.base" in edges
    assert graph.cycles(edges) == []


def test_the_checker_finds_cycles_through_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "hf_hetermoe"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "model_patches").mkdir()
    (tmp_path / "model_patches" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import name\n")
    graph = _import_graph()
    edges = graph.edges(tmp_path)
    assert edges["hf_hetermoe"] == {}  # TYPE_CHECKING imports never run
    assert graph.cycles(edges) == [["hf_hetermoe.a", "hf_hetermoe.sub.b", "hf_hetermoe.a"]]


def _loaded_after(code: str) -> dict:
    """Which of HEAVY a fresh interpreter has loaded after running `code` (light probes: not marked slow)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    probe = f"import sys, json\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import hf_hetermoe",
    "import hf_hetermoe.planner",
    "import hf_hetermoe.config; hf_hetermoe.config.HeterMoEConfig.from_dict({})",
    "from hf_hetermoe.planner.plan_cli import main_plan\ntry:\n    main_plan(['--help'])\nexcept SystemExit:\n    pass",
])
def test_pure_python_parts_load_neither_torch_nor_the_trainer(code):
    loaded = _loaded_after(code)
    assert not any(loaded.values()), loaded


@pytest.mark.slow  # imports torch and transformers in a fresh process (seconds)
def test_public_names_load_on_first_use():
    loaded = _loaded_after("import hf_hetermoe\nassert 'HeterMoECallback' in dir(hf_hetermoe)\n"
                           "from hf_hetermoe import HeterMoECallback")
    assert loaded["transformers.trainer"] and loaded["torch.distributed"]
