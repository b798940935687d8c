"""The trunk stays simple: small files, the flow reads as the DAG, no import cycle, no upward import
(kernels know no method; the library imports no Prefect)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"squeezeflow": ROOT / "squeezeflow", "squeezeflow.flows": ROOT / "flows",
            "squeezeflow.tasks": ROOT / "tasks", "squeezeflow.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "squeezeflow" and parts and parts[0] in ("flows", "tasks", "kernels"):
                continue
            out[".".join([pkg, *parts])] = f
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every squeezeflow / prefect module `name` imports, at any depth in the file (lazy imports count)."""
    out = _imports_of(ast.parse(path.read_text()), name, path)
    return {i for i in out if i.split(".")[0] in ("squeezeflow", "prefect", "prefect_dask")}


def test_no_file_is_a_room_for_everything():
    big = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 450}
    assert big == {}
    assert len((ROOT / "flows" / "compress.py").read_text().splitlines()) <= 65


def test_kernels_know_no_method_and_the_library_imports_no_prefect():
    mods = modules()
    for name, path in mods.items():
        deps = imports(name, path)
        if name.startswith("squeezeflow.kernels"):
            assert not [d for d in deps if d.startswith(("squeezeflow.methods", "squeezeflow.stages", "squeezeflow.dag"))], name
        library = not name.startswith(("squeezeflow.flows", "squeezeflow.tasks")) and name not in (
            "squeezeflow.cli", "squeezeflow.cli_submit", "squeezeflow.deploy", "squeezeflow.services", "squeezeflow.runners",
            "squeezeflow.dask_nanny", "squeezeflow.signing", "squeezeflow.progress")
        if name.startswith("squeezeflow.") and library and not name.startswith("squeezeflow.kernels"):
            assert not [d for d in deps if d.split(".")[0] in ("prefect", "prefect_dask")
                        or d.startswith(("squeezeflow.flows", "squeezeflow.tasks"))], (name, deps)


def test_no_import_cycle_among_top_level_imports():
    """Module-level imports only (lazy imports inside functions are how optional parts stay optional)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        top = ast.parse(path.read_text()).body
        sub = ast.Module(body=[n for n in top if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
        graph[name] = {d for d in _imports_of(sub, name, path) if d in mods and d != name}
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
        if n in seen:
            return
        stack.append(n)
        for d in graph[n]:
            visit(d)
        stack.pop()
        seen.add(n)

    for n in graph:
        visit(n)


def _imports_of(tree, name, path):
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out |= {f"{base}.{a.name}" for a in node.names} | {base}
    return out


def test_every_package_is_installed():
    """A subpackage missing from pyproject's list works in the editable checkout and is absent from wheels."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"squeezeflow." + ".".join(p.parent.relative_to(ROOT / "squeezeflow").parts)
             for p in (ROOT / "squeezeflow").rglob("__init__.py") if p.parent != ROOT / "squeezeflow"}
    assert found - listed == set()
