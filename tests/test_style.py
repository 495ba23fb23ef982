"""House style that holds across the package (DESIGN.md): no function body over 80 lines, and no
decoder probed with getattr/hasattr (its optional hooks are declared on VolumeDecoder)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cryoscape"
MAX_LINES = 80


def _functions():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(SRC), node


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from its ``def`` to its end, less its docstring (which may be long)."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_body_lines_counts_code_not_docstrings():
    tree = ast.parse('def f():\n    """one\n    two\n    three"""\n    a = 1\n    return a\n')
    assert body_lines(tree.body[0]) == 3  # def, assignment, return


def test_no_function_body_is_longer_than_80_lines():
    long = [f"{path}:{node.lineno} {node.name} ({body_lines(node)} lines)" for path, node in _functions()
            if body_lines(node) > MAX_LINES]
    assert not long, "split these functions: " + ", ".join(long)


def test_no_decoder_is_probed_with_getattr_or_hasattr():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and node.args and "decoder" in ast.unparse(node.args[0])):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "declare the attribute or hook on VolumeDecoder instead: " + ", ".join(bad)
