"""The layers of ARCHITECTURE.md, checked: every import in the package points down.

Reads each module's source with ``ast`` (function-level imports included, so a cycle cannot
hide inside a function) and resolves relative imports.
"""
import ast
from pathlib import Path

import pytest

import qcourse

PACKAGE = Path(qcourse.__file__).resolve().parent

#: Rank of each top-level unit of the package: a unit may import only lower ranks (and
#: itself). Toolkit 0-6 (in the reference's order), techniques 10, application 20, glue 30.
RANKS = {
    "utils": 0, "tensor_quant": 1, "calib": 2, "nn": 3, "quant_modules": 4, "export": 5,
    "workflow": 5, "optim": 6,
    "ptq": 10, "sensitivity": 10, "qat": 10, "engines": 10,
    "yolo": 20,
    "course": 30, "__main__": 40,
}


def _unit(module: str) -> str:
    """``qcourse.calib.histogram`` -> ``calib``; ``qcourse`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """``(line, imported qcourse module)`` for every import statement in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qcourse":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qcourse":
                continue
            if target == "qcourse":   # from qcourse import calib, ... : each name is a unit
                for alias in node.names:
                    yield node.lineno, f"qcourse.{alias.name}"
            else:
                yield node.lineno, target


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


def test_every_unit_has_a_rank():
    units = {_unit(_module_name(p)) for p in _modules()}
    assert units <= set(RANKS), f"units without a layer in ARCHITECTURE.md: {sorted(units - set(RANKS))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    me = _unit(_module_name(path))
    wrong = []
    for line, target in _imports(path):
        other = _unit(target)
        if other in ("", me, "__version__"):
            continue
        if RANKS.get(other, 99) >= RANKS[me]:
            wrong.append(f"line {line}: imports {target} ({other}, rank {RANKS.get(other)}) "
                         f"from {me} (rank {RANKS[me]})")
    assert not wrong, f"{path.relative_to(PACKAGE)} imports upward or sideways:\n" + "\n".join(wrong)


def test_the_checker_catches_a_wrong_import(tmp_path, monkeypatch):
    # the test above must be able to fail: a toolkit module importing the application
    bad = PACKAGE / "calib" / "_architecture_probe.py"
    fake = tmp_path / "probe.py"
    fake.write_text("def f():\n    from qcourse.yolo import models\n")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: fake.open().read())
    found = list(_imports(bad))
    assert found == [(2, "qcourse.yolo")]
    assert RANKS[_unit("qcourse.yolo")] > RANKS[_unit(_module_name(bad))]
