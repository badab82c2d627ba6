"""The SimpleTuner quickstart's own files, only paths changed, run through the CLI from SimpleTuner's folder layout."""
import json, os, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN, VERBATIM = ROOT / "examples/configs/quickstart", ROOT / "examples/configs/simpletuner"
PATH_KEYS = {"pretrained_model_name_or_path", "output_dir", "instance_data_dir"}
CLI = [sys.executable, "-c", "import sys; from flux2_kit.cli import main; sys.exit(main())"]


def _diff(a, b, where=""):
    "Keys whose values differ between two parsed JSON documents (lists compared item by item)."
    if isinstance(a, list): return [k for x, y in zip(a, b) for k in _diff(x, y, where)] + (["len"] if len(a) != len(b) else [])
    assert set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b)}"
    return [k for k in a if a[k] != b[k]]


def test_only_paths_changed():
    for name in ("config.json", "multidatabackend.json", "user_prompt_library.json"):
        changed = _diff(json.loads((VERBATIM / name).read_text()), json.loads((RUN / name).read_text()), name)
        assert set(changed) <= PATH_KEYS, f"{name}: {changed}"
    cfg = json.loads((RUN / "config.json").read_text())
    assert "data_backend_config" not in cfg and "user_prompt_library" not in cfg  # found beside it, as SimpleTuner does
    data = ROOT / json.loads((RUN / "multidatabackend.json").read_text())[0]["instance_data_dir"]
    assert len(list(data.glob("*.png"))) == 12 and len(list(data.glob("*.txt"))) == 12


def _run(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_quickstart_runs(tmp_path):
    shutil.copytree(RUN, tmp_path / "examples/configs/quickstart")  # relative paths resolve against the cwd
    cfg = "examples/configs/quickstart/config.json"
    r = _run(["check", "--config", cfg], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "data_backend_config: using examples/configs/quickstart/multidatabackend.json (found beside config.json" in r.stdout + r.stderr
    assert "my-dataset     12     12" in r.stdout and "check passed: nothing was loaded" in r.stdout
    r = _run(["train", "--config", cfg, "--max_train_steps", "2", "--validation_resolution", "64x64",
              "--validation_num_inference_steps", "2"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "output/quickstart"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    events = [json.loads(l) for l in (out / "events.jsonl").read_text().splitlines()]
    end = [e for e in events if e["type"] == "run_end"]
    assert end and end[-1]["status"] == "completed" and end[-1]["step"] == 2, end
    assert (tmp_path / "cache/vae/flux2/my-dataset").is_dir()  # the quickstart's own relative cache path
