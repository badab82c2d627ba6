"""Generate README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which CI cannot install).

Markdown cells are copied; code cells become ```python blocks; cells marked `#| hide` are dropped, as nbdev does.
Relative links (`tutorials/quickstart.ipynb`, relative to nbs/ as the docs site needs) are rewritten to point from the
repository root (`nbs/tutorials/quickstart.ipynb`).
`--check` fails when README.md is not what index.ipynb generates.
"""
import json, re, sys
from pathlib import Path

_LINK = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:|#|/)([^()\s]+)\)")  # a relative markdown link target


def relink(md: str, nb_dir: str = "nbs") -> str:
    "Links relative to the notebook's folder -> relative to the repository root."
    return _LINK.sub(lambda m: f"]({nb_dir}/{m[1]})", md)

def render(nb_path="nbs/index.ipynb"):
    nb = json.loads(Path(nb_path).read_text())
    out = []
    for c in nb["cells"]:
        src = "".join(c["source"]).rstrip()
        lines = src.splitlines()
        if any(l.strip().replace(" ", "") in ("#|hide", "#|exec_doc:false") for l in lines): continue
        if c["cell_type"] == "markdown": out.append(relink(src, Path(nb_path).parent.as_posix()))
        elif c["cell_type"] == "code":
            code = "\n".join(l for l in lines if not l.startswith("#|")).strip()
            if code: out.append(f"```python\n{code}\n```")
    return "<!-- generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file -->\n\n" + "\n\n".join(out) + "\n"

if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if Path("README.md").read_text() != text:
            sys.exit("README.md is out of date: run `python .ci/readme.py` (it is generated from nbs/index.ipynb)")
        print("README.md up to date")
    else:
        Path("README.md").write_text(text); print("wrote README.md")
