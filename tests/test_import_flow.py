"""The architecture as a test: data flows data_pipeline -> engine -> tools, kernels is a leaf, and
nothing imports in a circle. Every import counts, including those inside functions (they hide
cycles from Python but not from a reader), and relative imports are resolved.

Checked: no cycle between modules; no cycle between engine's subpackages (model, diffusion,
training, audit, mitigation, reports); no import "up" the flow or into tools/tests/bench; no
private name (`_x`) imported from another project module. The checker itself is tested on a
small tree with each kind of fault, so a broken checker cannot pass silently.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipeline", "engine", "kernels")
# What each top-level package may import from the project (besides itself).
ALLOWED = {"kernels": set(), "data_pipeline": set(), "engine": {"data_pipeline", "kernels"}}
FORBIDDEN_ANYWHERE = {"tools", "tests", "bench"}


def project_modules(root: Path) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int, list[str]]]:
    """(imported project module, line, imported names) for every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from pkg import module` imports the module pkg.module; other names come from `base` itself
            modules = [n for n in names if f"{base}.{n}" in known]
            rest = [n for n in names if n not in modules]
            targets = [(f"{base}.{n}", []) for n in modules] + ([(base, rest)] if rest or not modules else [])
        else:
            continue
        for target, names in targets:
            top = target.split(".")[0]
            if top in FORBIDDEN_ANYWHERE:
                out.append((target, node.lineno, names))
                continue
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.append((target, node.lineno, names))
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))
    return comps


def engine_package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "engine" and len(parts) > 2 else module


def architecture_faults(root: Path) -> list[str]:
    mods = project_modules(root)
    known = set(mods)
    faults, graph, package_graph = [], {m: set() for m in mods}, {}
    for name, path in mods.items():
        top = name.split(".")[0]
        for target, line, names in imports_of(name, path, known):
            where = f"{path.relative_to(root)}:{line}"
            target_top = target.split(".")[0]
            if target_top in FORBIDDEN_ANYWHERE:
                faults.append(f"{where}: {name} imports {target} (nothing in the packages imports tools/tests/bench)")
                continue
            if target_top != top and target_top not in ALLOWED[top]:
                faults.append(f"{where}: {name} imports {target}: up the flow data_pipeline -> engine -> tools "
                              f"(kernels a leaf)")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != name:
                faults.append(f"{where}: {name} imports private {', '.join(private)} from {target}")
            graph[name].add(target)
            a, b = engine_package(name), engine_package(target)
            if a != b and a.startswith("engine.") and b.startswith("engine."):
                package_graph.setdefault(a, set()).add(b)
                package_graph.setdefault(b, set())
    faults += [f"import cycle between modules: {' <-> '.join(c)}" for c in find_cycles(graph)]
    faults += [f"import cycle between engine packages: {' <-> '.join(c)}" for c in find_cycles(package_graph)]
    return faults


def test_the_packages_follow_the_flow_without_cycles():
    faults = architecture_faults(REPO)
    assert not faults, "\n".join(faults)


def write(root: Path, rel: str, text: str = "") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checker_finds_each_kind_of_fault(tmp_path):
    for pkg in PACKAGES:
        write(tmp_path, f"{pkg}/__init__.py")
    write(tmp_path, "engine/audit/__init__.py")
    write(tmp_path, "engine/reports/__init__.py")
    # a cycle hidden inside a function, through a relative import
    write(tmp_path, "data_pipeline/a.py", "def f():\n    from .b import g\n")
    write(tmp_path, "data_pipeline/b.py", "from data_pipeline import a\n")
    # up the flow, and into tools
    write(tmp_path, "data_pipeline/c.py", "import engine.audit.x\n")
    write(tmp_path, "kernels/k.py", "from data_pipeline import a\n")
    write(tmp_path, "engine/audit/x.py", "from engine.reports.y import render, _helper\n")
    write(tmp_path, "engine/reports/y.py", "def render():\n    import engine.audit.z\n")
    write(tmp_path, "engine/audit/z.py", "import tools.demo\n")
    faults = "\n".join(architecture_faults(tmp_path))
    assert "import cycle between modules: data_pipeline.a <-> data_pipeline.b" in faults
    assert "data_pipeline/c.py:1: data_pipeline.c imports engine.audit.x: up the flow" in faults
    assert "kernels/k.py:1: kernels.k imports data_pipeline.a: up the flow" in faults
    assert "imports private _helper from engine.reports.y" in faults
    assert "import cycle between engine packages: engine.audit <-> engine.reports" in faults
    assert "engine.audit.z imports tools.demo" in faults
    assert len(faults.splitlines()) == 6, faults
