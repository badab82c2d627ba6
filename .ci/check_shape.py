"""The package's shape, checked in `make test` (issue 18): the import graph of flux2_kit/ has no cycle (module-level and
function-local imports alike), and the notebooks' cells stay small. Prints the graph's order and a cell-size report."""
import ast, json, statistics, sys
from pathlib import Path

MAX_CELL = 60  # lines in any code cell of a module notebook (tutorials and tests aside)

def imports(path: Path) -> set:
    "The flux2_kit modules `path` imports, anywhere in the file."
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1: mod = "flux2_kit." + mod if mod else "flux2_kit"
            if mod == "flux2_kit": out |= {f"flux2_kit.{a.name}" for a in node.names}
            elif mod.startswith("flux2_kit."): out.add(mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("flux2_kit.")}
    return out

mods = {f"flux2_kit.{p.stem}": p for p in Path("flux2_kit").glob("*.py") if p.stem not in ("__init__", "_modidx")}
graph = {m: sorted(i for i in imports(p) if i in mods and i != m) for m, p in mods.items()}
order, state, cycles = [], {}, []
def visit(m, stack):
    if state.get(m) == "done": return
    if state.get(m) == "open": cycles.append(stack[stack.index(m):] + [m]); return
    state[m] = "open"
    for d in graph[m]: visit(d, stack + [m])
    state[m] = "done"; order.append(m)
for m in sorted(graph): visit(m, [])
print("import order (each module imports only modules before it):")
print("  " + " -> ".join(m.split(".")[1] for m in order))
problems = [f"import cycle: {' -> '.join(c)}" for c in cycles]

# the notebooks' numbers are a reading order without forward references: each module imports only earlier notebooks'
nb_of = {}
for nb in sorted(Path("nbs").glob("*.ipynb")):
    for c in json.loads(nb.read_text())["cells"]:
        src = "".join(c["source"])
        if src.startswith("#| default_exp "): nb_of[f"flux2_kit.{src.split()[2]}"] = nb.name
for m, deps in graph.items():
    for d in deps:
        if m in nb_of and d in nb_of and nb_of[d] > nb_of[m]:
            problems.append(f"{nb_of[m]} imports {d} from a later notebook, {nb_of[d]}: renumber so a reader meets it first")

export_lines, defs_per_cell, largest = [], [], (0, "")
for nb in sorted(Path("nbs").glob("*.ipynb")):
    for c in json.loads(nb.read_text())["cells"]:
        if c["cell_type"] != "code": continue
        src = "".join(c["source"])
        lines = [l for l in src.splitlines() if not l.startswith("#|")]
        if len(lines) > largest[0]: largest = (len(lines), f"{nb.name} cell {c.get('id')}")
        if len(lines) > MAX_CELL: problems.append(f"{nb.name} cell {c.get('id')}: {len(lines)} lines (at most {MAX_CELL})")
        if src.lstrip().startswith("#| export"):
            export_lines.append(len(lines))
            try: tree = ast.parse(src)
            except SyntaxError: continue
            defs_per_cell.append(sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body))
print(f"cells: {len(export_lines)} export cells, median {statistics.median(export_lines):g} lines, "
      f"{statistics.mean(defs_per_cell):.2f} definitions per export cell; largest code cell {largest[0]} lines ({largest[1]})")
print("\n".join(problems) or "no import cycle; no code cell over the limit")
sys.exit(1 if problems else 0)
