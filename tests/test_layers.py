"""The layering the folder tree shows: foundation (errors, config) -> core packages -> engine -> commands. No import
cycles; core packages import nothing above them; the engine imports no command. Imports inside functions count."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "efdit"
FOUNDATION = ("efdit.errors", "efdit.config")
CORE = ("efdit.models", "efdit.diffusion", "efdit.data", "efdit.latent", "efdit.metrics", "efdit.d2it")
ENGINE = ("efdit.engine",)
COMMANDS = ("efdit.commands", "efdit.cli")
TOP = ("efdit",)   # efdit/__init__.py: the public API, re-exports


def module_name(path: Path) -> str:
    parts = ("efdit",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t in mods and t != m and not m.startswith(t + ".") and not t.startswith(m + "."):
                    edges[m].add(t)
    return edges


def layer(m: str) -> int:
    for rank, prefixes in enumerate((FOUNDATION, CORE, ENGINE, COMMANDS)):
        if any(m == p or m.startswith(p + ".") for p in prefixes):
            return rank
    assert m in TOP, f"{m} is in no layer: put it in a package of its layer"
    return 4


def test_no_module_imports_a_higher_layer():
    edges = imports()
    upward = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts if m not in TOP and layer(t) > layer(m))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = imports()
    seen, stack, cycles = {}, [], []

    def visit(m):
        seen[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if seen.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = "done"

    for m in sorted(edges):
        if m not in seen:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_the_check_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: a relative import inside a function is an edge."""
    pkg = tmp_path / "efdit"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "commands").mkdir()
    (pkg / "commands" / "__init__.py").write_text("")
    (pkg / "commands" / "x.py").write_text("")
    (pkg / "models" / "bad.py").write_text("def f():\n    from ..commands import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    assert "efdit.commands.x" in imports()["efdit.models.bad"]
