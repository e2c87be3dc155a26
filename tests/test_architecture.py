"""The package's layering, checked on the source: what may import what.

* ``lowrank_optim.distributed`` never imports ``lowrank_optim.optim`` (not at runtime, not
  under ``TYPE_CHECKING``, not inside a function): the optimizer asks its placement, never the
  reverse.
* No module imports another module's private (underscore) name.
* ``import lowrank_optim`` loads neither ``lowrank_optim.distributed`` nor
  ``torch.distributed.tensor``: only the optimizers and what they need.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_optim"


def _modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` of every import anywhere in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):  # every depth: functions, TYPE_CHECKING blocks, try/except
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def test_distributed_never_imports_the_optimizers() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in _modules(PACKAGE / "distributed")
        for line, module, names in _imported_modules(path)
        if module.startswith("lowrank_optim.optim")
        or (module == "lowrank_optim" and "optim" in names)
    ]
    assert not offenders, "\n".join(offenders)


def test_no_module_imports_a_private_name_of_another() -> None:
    offenders = []
    for path in _modules(PACKAGE):
        for line, module, names in _imported_modules(path):
            if module == "__future__" or not module.startswith("lowrank_optim"):
                continue
            private = [name for name in names if name.startswith("_")]
            if private:
                where = path.relative_to(PACKAGE.parent)
                offenders.append(f"{where}:{line} imports {', '.join(private)} from {module}")
    assert not offenders, "\n".join(offenders)


def test_import_loads_no_distributed_code() -> None:
    code = (
        "import sys, lowrank_optim\n"
        "loaded = [m for m in ('lowrank_optim.distributed', 'torch.distributed.tensor') "
        "if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "", f"import lowrank_optim loaded {result.stdout.strip()}"
