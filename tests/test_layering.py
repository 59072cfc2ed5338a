"""The package's import layering (docs/ARCHITECTURE.md "Layers"), checked on the source.

Each subpackage imports only from itself and the subpackages below it in ``LAYERS``; no module
imports a private (``_``-prefixed) name from another module, nor a private module of another
subpackage. Function-local imports count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nvfp4_megatron"
# bottom first; docs/ARCHITECTURE.md draws the same order
LAYERS = ("formats", "kernels", "quant", "ssm", "mcore", "parallel", "runtime", "training",
          "cli")


def _imports(path: Path):
    """(line, imported module, imported names) for every import of the package in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("nvfp4_megatron"):
                    yield node.lineno, a.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("nvfp4_megatron"):
                yield node.lineno, mod, tuple(a.name for a in node.names)


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _modules():
    return sorted(p for p in PKG.rglob("*.py"))


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(LAYERS)


def test_imports_follow_the_layering():
    bad = []
    for path in _modules():
        src = _subpackage(".".join(path.relative_to(PKG.parent).with_suffix("").parts))
        if src is None:
            continue
        for line, mod, names in _imports(path):
            dst = _subpackage(mod)
            if dst is None:  # "from nvfp4_megatron import formats"
                dst = names[0] if names and names[0] in LAYERS else None
            if dst is not None and LAYERS.index(dst) > LAYERS.index(src):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({src}) imports {mod} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for path in _modules():
        here = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        for line, mod, names in _imports(path):
            if mod != here:
                bad += [f"{path.relative_to(PKG.parent)}:{line} imports {mod}.{n}"
                        for n in names if n.startswith("_") and n != "__version__"]
            parts = mod.split(".")
            private = [i for i, p in enumerate(parts) if p.startswith("_")]
            if private and _subpackage(mod) != _subpackage(here):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports the private module {mod}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The walk above finds function-local and relative imports (so the tests can fail)."""
    f = PKG / "formats" / "nvfp4.py"
    found = {mod for _, mod, _ in _imports(f)}
    assert "nvfp4_megatron.formats.inputs" in found
    quant = {mod for _, mod, _ in _imports(PKG / "quant" / "gemm.py")}
    assert "nvfp4_megatron.kernels" in quant or "nvfp4_megatron.kernels.dequant" in quant
