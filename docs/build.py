"""Build the docs site offline: nbdev's own notebook processors, then Sphinx + myst-nb (Quarto's stand-in).

`nbdev_docs` renders the site with Quarto, which CI cannot install. This script builds the same pages from the same
notebooks with tools from PyPI:

1. each notebook gets nbdev's `add_show_docs` (a `show_doc(sym)` cell after every exported definition);
2. it is executed once, top to bottom, in a fresh execnb `CaptureShell` (what `nbdev_test` uses), in its own
   process, skipping `tst_flags` and `#| eval: false` cells as `nbdev_test` does; results are cached under
   build/docs/exec, keyed on the notebook and the flux2_kit modules it imports;
3. nbdev's `FilterDefaults` processors run on the executed notebook (`#| hide` cells go, directives are stripped,
   the title cell becomes the page title); `#| export` cells are treated as nbdev's `#| exports` (the `show_doc`,
   then the source, folded) so the code stays visible;
4. `show_doc` output is inlined as markdown (Quarto's `output: asis`), exported source folds (`code-fold`), nbdev's
   doc links become links between pages, and Sphinx (myst-nb, furo theme) writes the HTML with nbdev's page names
   (`07_tiny.ipynb` -> `tiny.html`) and Pandoc's heading anchors (`tiny.html#flux2_tiny`).

usage: python docs/build.py [NOTEBOOK_OR_GLOB ...] [--no-exec] [--complete] [--out site] [--workers N] [--force] [--strict]
Paths are relative to the current folder.
Notebooks default to every notebook under nbs/ (nbdev's `nbglob`); `--no-exec` runs only the exported cells and
`show_doc` (a quick structural build). A partial build's links to pages it did not build do not resolve (Sphinx
warns, `--strict` fails): `--complete` adds every other notebook as a structural page, so the site is whole.
"""
from __future__ import annotations
import argparse, glob, hashlib, os, re, shutil, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from nbdev.process import Processor

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXEC_VERSION = 1  # bump when `execute` changes, to re-run every cached notebook
BUILD = ROOT / "build" / "docs"  # src/: processed notebooks for Sphinx; exec/: executed-notebook cache
for k, v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                 TOKENIZERS_PARALLELISM="false").items():
    os.environ.setdefault(k, v)


def _cfg():
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    from nbdev.config import get_config
    return get_config()


def select_notebooks(patterns: list[str]) -> list[Path]:
    "Notebooks matching `patterns` (absolute paths or globs); every notebook under nbs/ when empty."
    cfg = _cfg()
    if not patterns:
        from nbdev.doclinks import nbglob
        return sorted(Path(p).resolve() for p in nbglob(cfg.nbs_path))  # recursive: settings.ini says so
    out = []
    for pat in patterns:
        hits = sorted(Path(p).resolve() for p in glob.glob(pat, recursive=True) if p.endswith(".ipynb"))
        if not hits: raise SystemExit(f"docs/build.py: no notebook matches {pat!r}")
        out += [h for h in hits if h not in out]
    for p in out:
        if cfg.nbs_path.resolve() not in p.parents: raise SystemExit(f"docs/build.py: {p} is not under {cfg.nbs_path}")
    return out


def page_name(nb: Path) -> Path:
    "The page path nbdev/Quarto give a notebook, relative to nbs/, without suffix (`07_tiny.ipynb` -> `tiny`)."
    from nbdev.doclinks import _nbpath2html
    rel = nb.relative_to(_cfg().nbs_path.resolve())
    return _nbpath2html(rel).with_suffix("")


def _deps(text: str) -> set[str]:
    "flux2_kit modules that `text` imports, followed through the library's own imports."
    pat = re.compile(r"(?:flux2_kit\.|from \.|default_exp\s+)(\w+)")
    pkg = re.compile(r"(?:from|import)\s+flux2_kit\b(?!\.)")  # the package itself: its __init__
    found = lambda t: set(pat.findall(t)) | ({"__init__"} if pkg.search(t) else set())
    todo, seen = found(text), set()
    while todo:
        m = todo.pop()
        f = ROOT / "flux2_kit" / f"{m}.py"
        if m in seen or not f.exists(): continue
        seen.add(m); todo |= found(f.read_text())
    return seen


def cache_key(src: Path) -> str:
    "What an executed notebook depends on: the notebook, the library modules it uses, how `execute` runs it."
    text = src.read_text()
    h = hashlib.sha256(f"{EXEC_VERSION}\n{text}".encode())
    for m in sorted(_deps(text)): h.update((ROOT / "flux2_kit" / f"{m}.py").read_bytes())
    return h.hexdigest()


# --- per notebook, in a fresh process -------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])")
_QUARTO_OPT = re.compile(r"^#\|\s*(output|echo|code-fold|code-summary)\s*:.*\n?", re.M)


def _skip_cell(flags: set, structural: bool):
    "`run_all` preproc: True skips a cell (nbdev_test's rule; `structural` runs only exports and `show_doc`)."
    from nbdev.process import extract_directives
    def skip(cell):
        if cell.cell_type != "code" or "nbdev_export(" in cell.source: return True
        d = extract_directives(cell, remove=False)
        if d.get("eval:", [""])[0].lower() == "false" or flags & d.keys(): return True
        if structural: return not (d.keys() & {"export", "exports", "exporti"} or cell.source.startswith("show_doc("))
        return False
    return skip


def execute(src: Path, dest: Path, structural: bool) -> float:
    "Insert nbdev's `show_doc` cells into notebook `src`, run it in a fresh `CaptureShell`, save it with outputs."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.process import NBProcessor
    from nbdev.processors import add_show_docs, populate_language
    t = time.time()
    nb = read_nb(src)
    NBProcessor(nb=nb, procs=[populate_language, add_show_docs], rm_directives=False).process()
    cfg = _cfg()
    flags = set(cfg.get("tst_flags", "").split())
    os.environ["IN_TEST"] = "1"
    k = CaptureShell(src)
    k.run_cell("from nbdev.showdoc import show_doc")
    with working_directory(src.parent):
        try: k.run_all(nb, exc_stop=True, preproc=_skip_cell(flags, structural))
        except BaseException: raise RuntimeError(k.prettytb(fname=src)) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dest)
    return time.time() - t


def _tags(cell, *new):
    tags = cell.metadata.setdefault("tags", [])
    tags += [t for t in new if t not in tags]


_MD_LINK = re.compile(r"\]\(([^()\s#]+?\.ipynb)(#[^()\s]*)?\)")


def _links(md: str, src: Path, doc_prefix: str, rel: str) -> str:
    "Links to notebooks and nbdev's links to the published site -> links to this site's pages (myst resolves them)."
    if doc_prefix: md = re.sub(re.escape(doc_prefix) + r"([^()\s#]+?)\.html", lambda m: f"{rel}{m[1]}.ipynb", md)
    nbs = _cfg().nbs_path.resolve()
    def fix(m):
        target = (src.parent / m[1]).resolve()
        if nbs not in target.parents or target.suffix != ".ipynb": return m[0]
        return f"]({rel}{page_name(target).as_posix()}.ipynb{m[2] or ''})"
    return _MD_LINK.sub(fix, md)


class _mv_exports(Processor):
    "nbdev's `mv_exports` (each `show_doc` above the source it documents), moving each `show_doc` only once."
    # nbdev's own re-checks positions after each swap, so a `show_doc` climbs above the previous `exports` cell too
    def begin(self):
        cells, res, i = self.nb.cells, [], 0
        while i < len(cells):
            c = cells[i]
            if (c.cell_type == "code" and "exports" in c.directives_ and i + 1 < len(cells)
                    and getattr(cells[i + 1], "has_sd", 0)):
                res += [cells[i + 1], c]; i += 2
            else: res.append(c); i += 1
        self.nb.cells = res


def to_page(executed: Path, src: Path, dest: Path, doc_prefix: str):
    "Apply nbdev's docs processors to an executed notebook and adapt the result for myst-nb."
    from execnb.nbio import read_nb, write_nb, mk_cell
    from nbdev.processors import FilterDefaults, exec_show_docs, mv_exports
    nb = read_nb(executed)
    nb.path_ = str(src)  # FrontmatterProc names the page from it
    for c in nb.cells:
        if c.cell_type != "code": continue
        c.source = re.sub(r"^#\|\s*export\s*$", "#| exports", c.source, flags=re.M)  # keep exported code visible
        if c.source.startswith("show_doc("): c.has_sd = True  # lets nbdev's mv_exports put it before the source
    procs = [{mv_exports: _mv_exports}.get(p, p) for p in FilterDefaults().procs()
             if p is not exec_show_docs]  # outputs exist: executed above
    from nbdev.process import NBProcessor
    NBProcessor(nb=nb, procs=procs).process()
    cells = []
    rel = "../" * (len(page_name(src).parts) - 1)  # from this page up to the site root
    for c in nb.cells:
        c.pop("has_sd", None); c.pop("idx_", None); c.pop("directives_", None)
        if c.cell_type == "raw" and c.source.startswith("---"):  # Quarto front matter -> an H1 and the summary
            import yaml
            fm = yaml.safe_load(c.source.strip().strip("-")) or {}
            md = f"# {fm.get('title', page_name(src).name)}"
            if fm.get("description"): md += f"\n\n> {fm['description']}"
            cells.append(mk_cell(md, "markdown")); continue
        if c.cell_type == "code":
            opts = dict(m.groups() for m in re.finditer(r"^#\|\s*([\w-]+)\s*:\s*(.*)$", c.source, re.M))
            c.source = _QUARTO_OPT.sub("", c.source)
            if opts.get("output") == "asis" and opts.get("echo") == "false":  # show_doc: its markdown, inline
                md = "".join("".join(o.get("data", {}).get("text/markdown", [])) for o in c.get("outputs", []))
                md = re.sub(r"^\s*---\s*\n", "", md)  # Quarto's rule above each entry; Sphinx forbids it after a heading
                if md.strip(): cells.append(mk_cell(_links(md, src, doc_prefix, rel), "markdown"))
                continue
            if "code-fold" in opts: _tags(c, "hide-input")
        if c.cell_type == "markdown": c.source = _links(c.source, src, doc_prefix, rel)
        for o in c.get("outputs", []):  # what a terminal shows of progress bars: the text after the last \r
            if o.get("output_type") == "stream":
                text = _ANSI.sub("", "".join(o.get("text", [])))
                o["text"] = "\n".join(l.rstrip("\r").split("\r")[-1] for l in text.split("\n"))
        cells.append(c)
    nb.cells = cells
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dest)


def build_one(src: Path, exec_dir: Path, pages_dir: Path, run: bool, force: bool) -> tuple:
    "Execute (or reuse the cached run of) one notebook and write its page notebook; returns (name, seconds, cached)."
    cfg = _cfg()
    rel = src.relative_to(cfg.nbs_path.resolve())
    executed = exec_dir / ("full" if run else "structural") / rel
    key = cache_key(src)
    stamp = executed.with_suffix(".sha256")
    cached = not force and executed.exists() and stamp.exists() and stamp.read_text() == key
    secs = 0.0
    if not cached:
        secs = execute(src, executed, structural=not run)
        stamp.write_text(key)
    prefix = f"{cfg.doc_host.rstrip('/')}{cfg.doc_baseurl.rstrip('/')}/" if cfg.get("doc_host") else ""
    to_page(executed, src, pages_dir / page_name(src).with_suffix(".ipynb"), prefix)
    return str(rel), secs, cached


_PAGE_LINK = re.compile(r"\]\(((?:\.\./)*)([\w/.-]+?)\.ipynb#([^()\s]+)\)")


def fix_anchors(pages_dir: Path):
    """Point links to `page#anchor` whose anchor no heading makes (a method without its own `show_doc`, a private
    name) at the class's entry (`#panel.show` -> `#panel`), or else at the page."""
    sys.path.insert(0, str(DOCS))
    from _slug import pandoc_slug  # the anchors Sphinx writes (docs/conf.py) and Quarto writes
    from execnb.nbio import read_nb, write_nb
    nbs = {p: read_nb(p) for p in pages_dir.rglob("*.ipynb")}
    heads = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
    anchors = {p.relative_to(pages_dir).with_suffix("").as_posix():
               {pandoc_slug(h) for c in nb.cells if c.cell_type == "markdown" for h in heads.findall(c.source)}
               for p, nb in nbs.items()}
    for p, nb in nbs.items():
        here = p.relative_to(pages_dir).parent
        def fix(m):
            page = os.path.normpath(here / m[1] / m[2]).replace(os.sep, "/")
            if page not in anchors: return m[0]  # not built (a partial build): Sphinx reports it
            frag = m[3]
            while frag and frag not in anchors[page]: frag = frag.rpartition(".")[0]
            return f"]({m[1]}{m[2]}.ipynb{'#' + frag if frag else ''})"
        for c in nb.cells:
            if c.cell_type == "markdown": c.source = _PAGE_LINK.sub(fix, c.source)
        write_nb(nb, p)


# --- the site ---------------------------------------------------------------------------------------------------------

def _toctree(caption: str, pages: list[str]) -> str:
    return "```{toctree}\n:hidden:\n:caption: " + caption + "\n\n" + "\n".join(pages) + "\n```"


def tutorial_order() -> list[str]:
    "Page names of the tutorials in the order of the Tutorials menu in nbs/_quarto.yml (what Quarto's navbar shows)."
    import yaml
    q = yaml.safe_load((_cfg().nbs_path / "_quarto.yml").read_text()) or {}
    menus = [i for i in q.get("website", {}).get("navbar", {}).get("left", []) or []
             if isinstance(i, dict) and i.get("text") == "Tutorials"]
    nbs = _cfg().nbs_path.resolve()
    return [page_name(nbs / m).as_posix() for m in (menus[0].get("menu", []) if menus else [])]


def add_navigation(pages_dir: Path, pages: list[Path]):
    "Sphinx's navigation: hidden toctrees in the home page, one per sub-folder (tutorials), then the API reference."
    from execnb.nbio import read_nb, write_nb, mk_cell
    home = pages_dir / "index.ipynb"
    if not home.exists(): raise SystemExit("docs/build.py: the site needs nbs/index.ipynb (the home page)")
    groups: dict[str, list[str]] = {}
    for p in pages:
        if p.as_posix() == "index": continue
        groups.setdefault(p.parts[0] if len(p.parts) > 1 else "", []).append(p.as_posix())
    order = tutorial_order()
    if "tutorials" in groups:  # reading order from nbs/_quarto.yml's navbar, then any others by name
        groups["tutorials"].sort(key=lambda p: (order.index(p) if p in order else len(order), p))
    nb = read_nb(home)
    for folder in sorted(k for k in groups if k):
        nb.cells.append(mk_cell(_toctree(folder.replace("_", " ").capitalize(), groups[folder]), "markdown"))
    if "" in groups: nb.cells.append(mk_cell(_toctree("API reference", groups[""]), "markdown"))
    write_nb(nb, home)


def sphinx(pages_dir: Path, out: Path, strict: bool):
    "Render the page notebooks to HTML with Sphinx + myst-nb (configuration: docs/conf.py), then copy it to `out`."
    from sphinx.cmd.build import build_main
    html = BUILD / "html"  # myst-nb writes output files beside Sphinx's outdir (html/../jupyter_execute)
    shutil.rmtree(html, ignore_errors=True)
    args = ["-b", "html", "-q", "-c", str(DOCS), "-d", str(BUILD / "doctrees"), str(pages_dir), str(html)]
    if strict: args[0:0] = ["-W", "--keep-going"]
    if build_main(args): raise SystemExit("docs/build.py: Sphinx failed (see the messages above)")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(html, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", help="notebooks or globs (default: every notebook under nbs/)")
    ap.add_argument("--no-exec", action="store_true", help="run only exported cells and show_doc (quick build)")
    ap.add_argument("--out", default=str(ROOT / "site"), help="site folder (default: site/)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="notebooks run in parallel")
    ap.add_argument("--force", action="store_true", help="re-execute notebooks even when the cache is current")
    ap.add_argument("--strict", action="store_true", help="turn Sphinx warnings into errors")
    ap.add_argument("--complete", action="store_true",
                    help="with named notebooks: build every other notebook too, structurally (exports + show_doc), "
                         "so that every page exists and every link resolves (the browser test's site)")
    a = ap.parse_args(argv)
    t0 = time.time()
    out = Path(a.out).resolve()
    nbs = select_notebooks([str(Path(p).absolute()) for p in a.notebooks])
    cfg = _cfg()
    if not any(p == cfg.nbs_path.resolve() / "index.ipynb" for p in nbs): nbs.insert(0, cfg.nbs_path.resolve() / "index.ipynb")
    run = {p: not a.no_exec for p in nbs}
    if a.complete: run |= {p: False for p in select_notebooks([]) if p not in run}  # the rest: structural pages
    nbs = list(run)
    pages_dir = BUILD / "src"
    shutil.rmtree(pages_dir, ignore_errors=True)
    # a fresh interpreter per notebook (spawned, one task per process), as nbdev_test gives each notebook; not a
    # multiprocessing.Pool: its workers are daemonic and may not start processes (`flux2_kit.launch` does)
    fresh = dict(max_tasks_per_child=1) if sys.version_info >= (3, 11) else {}  # 3.10: workers are reused
    with ProcessPoolExecutor(a.workers, mp_context=get_context("spawn"), **fresh) as pool:
        jobs = [pool.submit(build_one, p, BUILD / "exec", pages_dir, run[p], a.force) for p in nbs]
        failed = []
        for p, job in zip(nbs, jobs):
            try:
                name, secs, cached = job.result()
                how = "" if run[p] else " (structural)"
                print(f"  {name}{how}: {'cached' if cached else f'{secs:.1f}s'}", flush=True)
            except Exception as e:
                failed.append(p); print(f"FAILED {p}:\n{e}", file=sys.stderr, flush=True)
    if failed: raise SystemExit(f"docs/build.py: {len(failed)} notebook(s) failed: " + ", ".join(map(str, failed)))
    pages = [page_name(p) for p in nbs]
    fix_anchors(pages_dir)
    add_navigation(pages_dir, pages)
    if (cfg.nbs_path / "images").is_dir():  # pictures the pages link (e.g. the README's demo grid), at the same place
        shutil.copytree(cfg.nbs_path / "images", pages_dir / "images", dirs_exist_ok=True)
    sphinx(pages_dir, out, a.strict)
    print(f"docs/build.py: {len(nbs)} pages in {out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
