"""No class in ``service/`` is over 400 lines (the project's standard, issue 22): a class that
grows past it is split by who owns which state, not let through."""

from __future__ import annotations

import ast
from pathlib import Path

MAX_CLASS_LINES = 400
SERVICE = Path(__file__).resolve().parents[2] / "service"


def class_lengths(source: str) -> dict[str, int]:
    """Each class of ``source`` (nested ones as ``Outer.Inner``) and its length in lines, from
    its first decorator to its last line."""
    lengths: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                end = child.end_lineno if child.end_lineno is not None else child.lineno
                name = f"{prefix}{child.name}"
                lengths[name] = end - first + 1
                walk(child, f"{name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return lengths


def test_the_count_sees_a_class_over_the_limit() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_CLASS_LINES))
    lengths = class_lengths(f"@decorated\nclass Big:\n{body}\n\nclass Small:\n    pass\n")
    assert lengths == {"Big": MAX_CLASS_LINES + 2, "Small": 2}


def test_no_class_in_service_is_over_400_lines() -> None:
    files = sorted(SERVICE.rglob("*.py"))
    assert len(files) > 50  # the package was found
    over = [
        f"{path.relative_to(SERVICE.parent)}: {name} has {lines} lines"
        for path in files
        for name, lines in class_lengths(path.read_text(encoding="utf-8")).items()
        if lines > MAX_CLASS_LINES
    ]
    assert over == [], "split these by who owns which state:\n" + "\n".join(over)
