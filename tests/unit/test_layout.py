"""The code's shape: imports run one way, Ray stays in its module, every torch.load is safe, ruff is clean."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("search", "trainables", "spaces")
# The commands (`python -m search.<name>`) are the top-level modules of search/; the library is in
# its sub-packages (and in trainables/ and spaces/). The README documents every one of these names.
COMMANDS = {f"search.{p.stem}" for p in (ROOT / "search").glob("*.py") if p.stem != "__init__"}
PUBLISHED = {"search.run", "search.final", "search.evaluate", "search.lr_find", "search.augment_preview",
             "search.report", "search.predict", "search.export_model"}
# What only commands outside a trial use: no module a trial imports may import these, so a trial worker
# never loads OpenCV, ONNX, captum, matplotlib or cleanlab (the label audit's).
SERVING_AND_FIGURES = ("search.serving", "search.figures")
HEAVY_LIBRARIES = ("cv2", "onnx", "onnxruntime", "captum", "matplotlib", "cleanlab")
# Imported only where used (a ResNet or DenseNet built, a metric table computed): a ConvNet trial's worker
# process would otherwise spend 2-3 s of a core importing them.
LAZY_LIBRARIES = ("torchvision", "sklearn")


def _modules() -> dict[str, Path]:
    """Every project module (packages recursively), by dotted name."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` refers to: itself, or the longest dotted prefix that is a module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere, inside functions included (relative imports resolved)."""
    found: set[str | None] = set()
    package = ".".join(path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:  # `from a.b import c` is module a.b.c when that exists, else a.b
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else _resolve(base, modules))
    return {m for m in found if m}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_has_no_cycle():
    graph = _graph()
    assert {"search.run", "trainables.runner", "trainables.data.kaggle_csv"} <= set(graph)  # the walk sees them
    assert "search.final_stage.stage" in graph["search.run"] and "trainables.optim" in graph["trainables.lr_range"]
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_check_finds_a_cycle():
    # The checker itself: a back edge hidden inside a function is a cycle too.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_commands_are_the_top_level_of_search():
    # The published `python -m search.X` names are exactly the modules at the top of search/.
    assert COMMANDS == PUBLISHED
    modules = _modules()
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        if name in COMMANDS:
            # one shape: build_parser(), main(argv) -> int raising UserError, sys.exit(run_cli(main))
            defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
            assert {"build_parser", "main"} <= defined, name
            assert [ast.unparse(b.body[0]) for b in blocks] == ["sys.exit(run_cli(main))"], name
        else:
            assert not blocks, f"{name} is library code with a __main__ block: make it a command in search/"


def test_no_module_imports_a_command():
    # Library code never imports a command, and no command imports another: what two commands share
    # (the final stage, the report) is library.
    offending = sorted((src, dst) for src, deps in _graph().items() for dst in deps if dst in COMMANDS)
    assert not offending, offending


def _trial_modules() -> set[str]:
    """The project modules a trial imports: the Tune trainable and everything it imports, transitively."""
    graph, seen, todo = _graph(), set(), ["trainables.tune_trainable"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def test_a_trial_never_imports_serving_or_figures():
    trial = _trial_modules()
    assert {"trainables.runner", "trainables.models", "trainables.augment"} <= trial  # the walk sees them
    offending = sorted(m for m in trial if m.startswith(SERVING_AND_FIGURES) or not m.startswith("trainables"))
    assert not offending, offending


def test_a_convnet_trial_process_loads_no_opencv_onnx_captum_matplotlib_cleanlab_torchvision_or_sklearn():
    # What a ConvNet trial's worker does (import the trainable, build a run, train and score one epoch)
    # pulls in none of the serving, figure or lazily imported libraries: they would cost it seconds.
    code = ("import sys; import trainables.tune_trainable; from trainables.data import make_demo; "
            "from trainables.runner import build_run, run_epoch; "
            "run_epoch(build_run({'width': 8, 'depth': 2}, make_demo(n_train=70, n_val=14), epochs=1)); "
            f"print(sorted(m for m in {HEAVY_LIBRARIES + LAZY_LIBRARIES!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_only_the_trainable_and_the_driver_import_ray():
    users = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(m == "ray" or m.startswith("ray.") for m in mods):
                users.add(name)
    assert [u for u in users if u.startswith("trainables")] == ["trainables.tune_trainable"]
    assert not any(u.startswith("spaces") for u in users)


def _torch_load_calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def test_every_torch_load_is_weights_only():
    calls = [(path, call) for path in _modules().values() for call in _torch_load_calls(path)]
    assert len(calls) >= 3, "fewer torch.load calls than the project has: the walk is stale"
    unsafe = [f"{path.relative_to(ROOT)}:{call.lineno}" for path, call in calls
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in call.keywords)]
    assert not unsafe, unsafe


def test_weights_only_guard_sees_calls_not_text(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text('"""torch.load(path) in a docstring is not a call."""\nimport torch\n'
                      'a = torch.load("x", weights_only=True)\nb = torch.load("y")\n')
    calls = _torch_load_calls(sample)
    assert [c.lineno for c in calls] == [3, 4]


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed (pip install -e '.[test]' installs it)")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    r = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
