"""The package's shape: layers that import only downwards, a light core, short functions, no copies.

Layers, lowest first: the core (``rada_mma/*.py`` but ``cli.py``), ``rada_mma/fewshot``,
``rada_mma/demo``, ``rada_mma/cli.py``. Every import counts, function-level ones included.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rada_mma"
TESTS = Path(__file__).resolve().parent
LAYERS = {"fewshot": 1, "demo": 2, "cli": 3}
MAX_FUNCTION_LINES = 80
REPEATED_LINES = 6


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str) -> set[str]:
    """The package modules ``module`` imports, anywhere in its body."""
    path = MODULES[module]
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = base[: len(base) - node.level + 1] if node.level else []
            source = ".".join(prefix + ([node.module] if node.module else []))
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_every_layer_imports_only_downwards():
    upward = sorted(
        f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)})"
        for source, targets in GRAPH.items()
        for target in targets
        if layer(target) > layer(source)
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    # a module importing its own package's __init__ is the package's business, not a cycle of code
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in GRAPH.items()}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]) if target in path else target)
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_core_loads_alone():
    code = (
        "import sys, rada_mma; "
        "heavy = ('rada_mma.fewshot', 'rada_mma.demo', 'rada_mma.cli', 'torchvision', 'PIL', 'matplotlib', 'open_clip'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'PIL', 'matplotlib', 'open_clip', "
        "'onnx', 'onnxruntime', 'onnxscript', 'clip') "
        "or m.startswith(heavy[:3])))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"import rada_mma loaded {done.stdout.strip()}"


def test_the_old_pipeline_names_say_where_they_went():
    import rada_mma

    with pytest.raises(AttributeError, match=r"use `from rada_mma.fewshot import fit`"):
        rada_mma.fit  # noqa: B018


def test_functions_are_short():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)


def code_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of the lines that carry code: no blanks, comments, docstrings, imports,
    lone brackets, or entries of data tables (a string or name alone with a comma, such as ``__all__``)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            skip.update(range(body[0].lineno, body[0].end_lineno + 1))  # a docstring
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        text = text.split("  #")[0].strip()
        if number in skip or not text or text.startswith("#") or re.fullmatch(r"[\[\](){},:]*", text):
            continue
        if re.fullmatch(r"""("[^"]*"|'[^']*'|\w+),""", text):
            continue
        lines.append((number, text))
    return lines


def test_no_block_of_code_is_written_twice():
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in MODULES.values():
        lines = code_lines(path)
        for i in range(len(lines) - REPEATED_LINES + 1):
            window = tuple(text for _, text in lines[i : i + REPEATED_LINES])
            seen[window].append(f"{path.relative_to(PACKAGE.parent)}:{lines[i][0]}")
    repeated = {window: places for window, places in seen.items() if len(places) > 1}
    assert not repeated, "\n\n".join(f"{places}:\n" + "\n".join(window) for window, places in repeated.items())


def test_tests_import_helpers_as_modules_and_only_public_names():
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text())
        modules = {}  # local name -> rada_mma module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sys":
                if node.attr == "path":
                    problems.append(f"{path.relative_to(TESTS)}:{node.lineno}: sys.path")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rada_mma"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        problems.append(f"{path.relative_to(TESTS)}:{node.lineno}: imports {node.module}.{alias.name}")
                    if f"{node.module}.{alias.name}" in MODULES:
                        modules[alias.asname or alias.name] = node.module
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("rada_mma"):
                        modules[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                problems.append(f"{path.relative_to(TESTS)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not problems, "\n".join(problems)
