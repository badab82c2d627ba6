"""Run nbdev's own docs processors (what `nbdev_docs` does before Quarto renders) on notebooks, without Quarto.

`nbdev_docs` executes, in every notebook that documents exports, the exported cells and every cell that imports
something (`exec_show_docs`), skipping the rest. A cell that mixes an import with code using names from a skipped
cell then fails under `nbdev_docs` although `nbdev_test` passes: keep imports in their own cells.
Do not call `nbdev_docs`/`nbdev_proc_nbs` to check this where Quarto is missing: nbdev then tries to install Quarto
(with sudo) and runs `pip install -e ".[dev]"` with whatever pip is first on PATH.

usage: python docs/check_nbdev_docs.py [NOTEBOOK ...]   (default: every notebook under nbs/); exit 1 if any fails
"""
import os, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(nb: Path) -> str | None:
    "None if nbdev's docs processors run through `nb`; else the first error."
    from nbdev.processors import FilterDefaults
    from nbdev.serve_drv import exec_nb
    out = ROOT / "build" / "docs" / "nbdev_proc" / nb.name
    out.parent.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(nb.parent)  # as nbdev_docs runs it: from the notebook's folder
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec_nb(nb, out, FilterDefaults)
    except Exception as e:
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        return str(e).splitlines()[0] + cause
    finally: os.chdir(cwd)
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    os.chdir(ROOT)
    nbs = [Path(a).resolve() for a in argv] or sorted(p.resolve() for p in (ROOT / "nbs").rglob("*.ipynb")
                                                      if ".ipynb_checkpoints" not in p.parts)
    bad = []
    for nb in nbs:
        t = time.time()
        err = check(nb)
        print(f"{'FAIL' if err else 'ok  '} {nb.relative_to(ROOT)} ({time.time() - t:.1f}s){': ' + err if err else ''}",
              flush=True)
        if err: bad.append(nb)
    if bad: sys.exit(f"{len(bad)} notebook(s) fail nbdev's docs processing: split their imports into their own cells")


if __name__ == "__main__":
    main()
