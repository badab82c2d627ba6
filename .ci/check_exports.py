"Lint the exported library: undefined names (notebook globals leaking into exports), star imports, unsafe torch.load."
import re, subprocess, sys
from pathlib import Path

files = sorted(str(p) for p in Path("flux2_kit").rglob("*.py"))
out = subprocess.run([sys.executable, "-m", "pyflakes", *files], capture_output=True, text=True).stdout
errors = [l for l in out.splitlines() if "undefined name" in l or "import *" in l]
for p in files + sorted(str(p) for d in ("tests", "examples", "benchmarks") for p in Path(d).rglob("*.py")):
    for i, line in enumerate(Path(p).read_text().splitlines(), 1):
        if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
            errors.append(f"{p}:{i}: torch.load without weights_only=True")
print("\n".join(errors) or f"exports lint clean ({len(files)} files)")
sys.exit(1 if errors else 0)
