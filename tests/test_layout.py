"""The house of issue 30: packages that import only the floors below them and no import cycle (imports through a
package's __init__ count), functions that fit on a screen, one pass through the data in a run, and every old module
path (the docs', notebooks', scripts') still importing the code it names."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "grass_ft"
# The floors, lowest first: a module may import its own package and the packages on lower floors only.
FLOORS = ("base", "config", "model", "data", "parallel", "method", "evaluation", "planner", "run", "frontends")
LONGEST = 60  # lines of a function, its docstring included
SETUP_LONGEST = 50  # the recipe's setup steps
EXEMPT = {"method/offload.py:_run_offloaded"}  # the offload optimizer's step kernel: one stream of copies and math


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _file_of(module: str) -> Path | None:
    base = SRC.parent / module.replace(".", "/")
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imports(path: Path) -> set[str]:
    """The grass_ft modules ``path`` imports, at its top or inside a function; ``from PKG import NAME`` is the
    submodule when NAME is one, else PKG itself (its __init__)."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("grass_ft")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("grass_ft"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if _file_of(sub) is not None else base)
    return {m for m in out if _file_of(m) is not None and m != me}


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _floor(module: str) -> int:
    if module in ("grass_ft", "grass_ft.cli"):  # grass_ft/__init__.py, grass_ft/cli.py: the doors, on top
        return len(FLOORS)
    return FLOORS.index(module.split(".")[1])


def test_no_import_cycle_in_src():
    graph, index, low, stack, on, cycles = _graph(), {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_nothing_low_imports_anything_high():
    wrong = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets if _floor(b) > _floor(a)]
    assert wrong == []


def test_every_package_says_what_lives_there_and_what_it_may_import():
    for init in sorted(SRC.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 200 and "import" in doc, init


def test_no_function_is_longer_than_a_screen():
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        where = str(path.relative_to(SRC))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and f"{where}:{node.name}" not in EXEMPT:
                limit = SETUP_LONGEST if where == "run/train.py" else LONGEST
                if node.end_lineno - node.lineno + 1 > limit:
                    too_long.append(f"{where}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert too_long == []


# ------------------------------------------------------------------------------------------------ old paths


def _resolve(dotted: str):
    """The module or attribute a dotted ``grass_ft.`` path names (longest importable module, then attributes); None
    when it needs an optional dependency that is not installed (axolotl)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("grass_ft"):
                return None
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_old_module_path_is_the_module_that_holds_its_code():
    import grass_ft

    for old, new in grass_ft.MOVED.items():
        try:
            moved = importlib.import_module(f"grass_ft.{new}")
        except ModuleNotFoundError as e:
            assert not e.name.startswith("grass_ft") and old == "axolotl_plugin"  # it needs axolotl installed
            continue
        assert importlib.import_module(f"grass_ft.{old}") is moved, old
    assert importlib.import_module("grass_ft.cli") is importlib.import_module("grass_ft.frontends.cli")


def test_the_public_names_and_every_path_the_docs_show_import():
    from grass_ft import (GrassCallback, GrassTrainer, GrassTrainerMixin, LayerwiseOffloadAdamW, TrainConfig,
                          grass_trainer)

    assert GrassCallback.__module__ == GrassTrainer.__module__ == "grass_ft.frontends.hf"
    assert all(callable(c) for c in (GrassTrainerMixin, grass_trainer, LayerwiseOffloadAdamW, TrainConfig))
    shown = set()
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*.py"),
                 *(ROOT / "benchmarks").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        shown |= set(re.findall(r"\bgrass_ft(?:\.[A-Za-z_]\w*)+", text))
        for module, names in re.findall(r"from (grass_ft(?:\.\w+)*) import \(?([\w, ]+)", text):
            shown |= {f"{module}.{n.split(' as ')[0].strip()}" for n in names.split(",") if n.strip()}
    assert {"grass_ft.loss.enable_supervised_loss", "grass_ft.data.collate", "grass_ft.offload.LayerwiseOffloadAdamW",
            "grass_ft.formats.encode"} <= shown
    resolved = {dotted: _resolve(dotted) for dotted in sorted(shown)}
    assert [d for d, obj in resolved.items() if obj is None and "axolotl_plugin" not in d] == []  # axolotl: optional


def test_python_m_grass_ft_cli_and_the_console_script_reach_the_cli():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "grass_ft.cli", "--help"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("grass-ft COMMAND")
    import tomllib

    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["grass-ft"]
    module, _, name = script.partition(":")
    assert callable(getattr(importlib.import_module(module), name))


# ------------------------------------------------------------------------------------- one pass through the data


@pytest.mark.slow
def test_a_default_run_passes_through_the_data_once(tmp_path, tiny_model_dir):
    """tools/call_trace.py on a default run (the tests' tiny model, few examples): the data stages in the order
    load -> normalise -> tokenize -> batch, no format told or task resolved again once tokenisation has begun, and
    the evaluation package entered once per evaluation (before and after training)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import call_trace

    trace = call_trace.trace_run([f"model={tiny_model_dir}", *call_trace.SMALL, f"output_dir={tmp_path / 'run'}"])
    assert call_trace.check(trace) == []
    assert len(trace.evaluations()) == 2
    entered = [(c, f) for c, m, f in trace.entries if m.startswith("evaluation.") and not c.startswith("evaluation.")]
    assert entered == [("run.held_out", "evaluate")] * 2 + [("run.finish", "write_eval")]  # eval.json at the end


@pytest.mark.slow
def test_a_run_on_a_file_evaluating_while_training_passes_through_the_data_once(tmp_path, tiny_model_dir, tiny_data):
    sys.path.insert(0, str(ROOT / "tools"))
    import call_trace

    trace = call_trace.trace_run([f"model={tiny_model_dir}", f"data={tiny_data}", "eval_samples=4", "max_steps=3",
                                  "eval_steps=1", "max_new_tokens=4", "batch_size=4", f"output_dir={tmp_path / 'run'}"])
    assert call_trace.check(trace) == []
    assert len(trace.evaluations()) == 4  # before, after steps 1 and 2, after training
