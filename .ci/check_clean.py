"Fail when a notebook is not as `nbdev_clean` leaves it (execution counts, outputs metadata, stray metadata)."
import copy, json, sys
from pathlib import Path
from nbdev.clean import clean_nb

bad = []
for p in sorted(Path("nbs").rglob("*.ipynb")):
    if ".ipynb_checkpoints" in p.parts: continue
    try: nb = json.loads(p.read_text())
    except Exception as e: bad.append(f"{p}: not valid JSON ({e})"); continue
    cleaned = copy.deepcopy(nb)
    clean_nb(cleaned)
    if cleaned != nb: bad.append(f"{p}: not clean (run `nbdev_clean`)")
print("\n".join(bad) or f"notebooks clean")
sys.exit(1 if bad else 0)
