"The first hour (issue 15): every mistake caught before the models load, one line each, the right exit code; dtypes that work."
import contextlib, io, itertools, json, os, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest

from flux2_kit.check import CheckError
from flux2_kit.cli import main
from flux2_kit.config import ConfigError, load_config
from flux2_kit.runlog import read_events
from flux2_kit.sample import sample_dataset
from flux2_kit.trainer import Callback, Trainer
from flux2_kit.tiny import tiny_config

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def simpletuner_folder(root: Path, *, backend=None, prompts=None, **config) -> Path:
    "A folder laid out as SimpleTuner users have it: config/{config,multidatabackend,user_prompt_library}.json, datasets/, run from root."
    data = sample_dataset(root / "datasets")
    (root / "config").mkdir(parents=True, exist_ok=True)
    backend = backend or [
        {"id": "photos", "type": "local", "instance_data_dir": str(data.relative_to(root)), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel_area", "minimum_image_size": 32, "cache_dir_vae": "cache/vae"},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"}]
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backend, indent=1))
    (root / "config" / "user_prompt_library.json").write_text(json.dumps(prompts or {"a photo": "a photo of a cat"}))
    cfg = {"model_family": "flux2", "model_type": "lora", "model_flavour": "dev", "pretrained_model_name_or_path": "flux2-tiny:dev",
           "output_dir": "output", "max_train_steps": 2, "validation_steps": 1, "validation_resolution": "64x64",
           "validation_num_inference_steps": 1, "lora_rank": 4, "tokenizer_max_length": 64, **config}
    (root / "config" / "config.json").write_text(json.dumps(cfg, indent=1))
    return root


def cli(root, *argv):
    "`flux2-kit ...` in-process from `root` (the SimpleTuner layout): (exit status, stdout, stderr)."
    out, err, old = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main(list(argv))
    finally: os.chdir(old)
    return code, out.getvalue(), err.getvalue()


# ---- the CLI -------------------------------------------------------------------------------------------------------

def test_natural_config_trains_from_the_shell_and_exits_0(tmp_path):
    "A SimpleTuner-style folder (bf16 defaults, previews on, no data_backend_config key) through the real command."
    root = simpletuner_folder(tmp_path, mixed_precision="no")
    r = subprocess.run([sys.executable, "-m", "flux2_kit.cli", "train", "--config", "config/config.json"], cwd=root, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "trained 2 steps" in r.stdout
    assert "data_backend_config: using " in r.stdout and "found beside config.json, as SimpleTuner does" in r.stdout
    assert "photos      10     10" in r.stdout  # the data table, before anything loaded
    ev = read_events(root / "output" / "events.jsonl")
    assert (ev[-1]["type"], ev[-1]["status"]) == ("run_end", "completed")
    grids = sorted((root / "output" / "previews").glob("step-*/grid.png"))
    assert [g.parent.name for g in grids] == ["step-000000", "step-000001", "step-000002"]
    # the same command again: the used output_dir is refused, in one line, with status 2 and nothing changed
    before = (root / "output" / "events.jsonl").read_bytes()
    r2 = subprocess.run([sys.executable, "-m", "flux2_kit.cli", "train", "--config", "config/config.json", "--quiet"], cwd=root,
                        env=ENV, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 2 and r2.stdout == "" and len(r2.stderr.splitlines()) == 1, r2.stderr
    assert r2.stderr.startswith("flux2-kit: error: ") and "already holds a run" in r2.stderr
    assert (root / "output" / "events.jsonl").read_bytes() == before


def test_config_mistakes_are_one_line_each_before_anything_loads(tmp_path):
    root = simpletuner_folder(tmp_path)
    backend = json.loads((root / "config" / "multidatabackend.json").read_text())
    backend[0]["instance_data_dir"] = "datasets/typo"
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backend))
    t0 = time.time()
    code, out, err = cli(root, "train", "--pretrained_model_name_or_path", "models/flux2-dev", "--validation_resolution", "8192",
                         "--quiet")
    assert time.time() - t0 < 5  # nothing loaded (seconds include the data scan of 10 photos)
    lines = err.splitlines()
    assert code == 2 and out == "" and all(l.startswith("flux2-kit: error: ") for l in lines), err
    assert any("'pretrained_model_name_or_path' = 'models/flux2-dev': the folder" in l and "does not exist" in l for l in lines)
    assert any("'instance_data_dir' =" in l and "datasets/typo does not exist" in l for l in lines)
    assert any("'validation_resolution' = '8192'" in l for l in lines)
    assert len(lines) == 3, err  # the missing folder is named once (its scan is not repeated)
    assert not (root / "output").exists()  # a refused run writes nothing
    code, _, err = cli(root, "train", "--debug", "--validation_resolution", "8192", "--quiet")
    assert code == 2 and "Traceback" in err


def test_duplicate_json_keys_and_help(tmp_path):
    root = simpletuner_folder(tmp_path)
    p = root / "config" / "config.json"
    p.write_text(p.read_text().replace('"lora_rank": 4,', '"lora_rank": 4,\n "lora_rank": 8,'))
    code, _, err = cli(root, "train")
    assert code == 2 and "key 'lora_rank' is written twice in one object (lines" in err and str(p.name) in err
    r = subprocess.run([sys.executable, "-m", "flux2_kit.cli", "train", "--help"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and "--learning_rate 5e-5" in r.stdout and "flux2-tiny:dev" in r.stdout and "Exit status" in r.stdout


def test_check_command_loads_nothing(tmp_path):
    root = simpletuner_folder(tmp_path)
    code, out, err = cli(root, "check")
    assert code == 0 and "check passed: nothing was loaded" in out and not (root / "output").exists()


# ---- what the data scan decides -------------------------------------------------------------------------------------

def quickstart_backend(data):
    "The SimpleTuner quickstart's dataset entry, with only the path changed."
    return [{"id": "my-dataset", "type": "local", "crop": True, "crop_aspect": "square", "crop_style": "center", "resolution": 1024,
             "minimum_image_size": 1024, "maximum_image_size": 1024, "resolution_type": "pixel_area",
             "cache_dir_vae": "cache/vae/flux2/my-dataset", "instance_data_dir": str(data), "caption_strategy": "textfile",
             "metadata_backend": "discovery", "repeats": 10},
            {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text/flux2",
             "write_batch_size": 64}]


def test_quickstart_minimum_image_size_stops_with_counts_and_fix(tmp_path):
    data = sample_dataset(tmp_path / "datasets")
    (data / "retina.jpg").unlink()  # the one photo over 1 MP: the others are ordinary photos
    (data / "notes.jpg").write_text("not an image")  # a text file saved as .jpg
    root = simpletuner_folder(tmp_path, backend=quickstart_backend(data))
    t0 = time.time()
    code, out, err = cli(root, "train")
    assert time.time() - t0 < 5
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "dataset 'my-dataset': no image can train: all 10 files were skipped (too_small 9, not_an_image 1)" in err
    assert "Fix: lower 'minimum_image_size'" in err and "multidatabackend.json" in err
    assert "my-dataset     10      0" in out  # the summary table on the terminal


def test_skipped_files_are_summarised_on_the_terminal_and_training_goes_on(tmp_path, capsys):
    cfg = tiny_config(tmp_path, max_train_steps=1)
    data = Path(cfg.datasets[0].instance_data_dir)
    (data / "broken.jpg").write_text("a text file saved as .jpg")
    (data / "broken.txt").write_text("a caption")
    cfg = tiny_config(tmp_path, max_train_steps=1, datasets=[{**json.loads(Path(cfg.data_backend_config).read_text())[0],
                                                              "max_num_samples": None}, json.loads(Path(cfg.data_backend_config).read_text())[1]])
    t = Trainer(cfg, progress=True)
    t.check()
    out = capsys.readouterr().out
    assert "flux2-kit check, before loading anything:" in out and "not_an_image 1" in out
    assert t.report.datasets[0]["kept"] == 10 and t.report.datasets[0]["found"] == 11
    t.finish()


def test_prompt_names_become_safe_file_names(tmp_path):
    t = Trainer(tiny_config(tmp_path, prompt_library={"my cat": "a ginger cat", "../../etc": "a cup of coffee"}), progress=False)
    ims = t.preview()
    assert sorted(p.name for p in t.rundir.preview_dir(0).iterdir()) == ["base__etc.png", "base__my_cat.png", "etc.png",
                                                                         "grid.png", "my_cat.png"]
    assert sorted(ims) == ["base__etc", "base__my_cat", "etc", "my_cat"]
    t.finish()
    with pytest.raises(CheckError, match="prompt names 'my cat' and 'my_cat' are both saved as my_cat.png"):
        Trainer(tiny_config(tmp_path / "b", prompt_library={"my cat": "a", "my_cat": "b"}), progress=False).check()


def test_resolution_bounds_and_off_grid_notice(tmp_path):
    base = tiny_config(tmp_path)
    ds = json.loads(Path(base.data_backend_config).read_text())
    with pytest.raises(CheckError, match=r"'resolution' = 100000 \(pixel_area\) trains at 100000x100000 px"):
        Trainer(tiny_config(tmp_path, datasets=[{**ds[0], "resolution": 100000}, ds[1]]), progress=False).check()
    t = Trainer(tiny_config(tmp_path, datasets=[{**ds[0], "resolution": 72}, ds[1]]), progress=False)
    rep = t.check()
    assert any("'resolution' = 72 is not a multiple of 16" in p.message and "train at 80x80" in p.message for p in rep.problems)
    t.finish()


def test_an_image_that_fails_to_encode_is_left_out_and_training_goes_on(tmp_path, capsys):
    t = Trainer(tiny_config(tmp_path, max_train_steps=4), progress=False)
    t.check()
    gone = t.tables["sample"].items[0].path
    os.unlink(gone)  # scanned, then removed before caching (a network share, a user cleaning up)
    t.fit()
    assert t.step == 4 and t.status == "completed"
    assert gone not in [it.path for it in t.tables["sample"].items] and len(t.tables["sample"].items) == 3
    assert f"warning: 1 image(s) could not be encoded and are left out: {Path(gone).name}" in capsys.readouterr().out
    msgs = [e for e in read_events(t.rundir.events_path, types=["message"]) if e.get("level") == "warning"]
    assert msgs and gone in msgs[-1]["files"]


# ---- errors are never masked --------------------------------------------------------------------------------------

def test_an_error_in_before_fit_reaches_the_user_and_run_end(tmp_path):
    class Bad(Callback):
        order = 5  # before the progress bar exists
        def before_fit(self, t): raise RuntimeError("the original error")
    t = Trainer(tiny_config(tmp_path, max_train_steps=2), callbacks=[Bad()], progress=True)
    with pytest.raises(RuntimeError, match="the original error"):
        t.fit()
    ev = read_events(t.rundir.events_path)
    assert [e["message"] for e in ev if e["type"] == "error"] == ["the original error"]
    assert (ev[-1]["type"], ev[-1]["status"]) == ("run_end", "error")
    assert not t.rundir.locked  # the run is over: the directory is free


# ---- precision x device: every accepted combination trains and previews; the others are refused before loading -------

MIXED, DEFAULT = ("no", "bf16", "fp16"), ("bf16", "fp16", "fp32")
PRECISION = ("no_change", "bf16", "fp16", "fp32", "int8-quanto", "int4-quanto", "fp8-quanto")
REFUSED_ON_CPU = {  # (mixed_precision, base_model_default_dtype, base_model_precision) -> the key the error names
    **{(m, d, p): "mixed_precision" for m in ("fp16",) for d in DEFAULT for p in PRECISION},
    **{("bf16", d, p): "base_model_default_dtype" for d in ("fp16", "fp32") for p in PRECISION if p.endswith("quanto")},
    **{(m, "bf16", "int8-quanto"): "base_model_precision" for m in ("no", "bf16")},
}


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory): return tmp_path_factory.mktemp("matrix")


@pytest.mark.parametrize("mp,dd,bp", list(itertools.product(MIXED, DEFAULT, PRECISION)))
def test_precision_matrix(matrix_dir, mp, dd, bp):
    cfg = tiny_config(matrix_dir / "w", mixed_precision=mp, base_model_default_dtype=dd, base_model_precision=bp,
                      max_train_steps=1, validation_steps=1, validation_num_inference_steps=1, checkpointing_steps=0,
                      output_dir=str(matrix_dir / "out" / f"{mp}-{dd}-{bp}"), lora_export_formats=["diffusers"])
    t = Trainer(cfg, progress=False)
    key = REFUSED_ON_CPU.get((mp, dd, bp))
    if key is not None:
        with pytest.raises(CheckError) as e: t.fit()
        assert key in [p.key for p in e.value.problems], e.value
        assert t.transformer is None and t.vae is None and not Path(cfg.output_dir).exists()
        return
    t.fit()
    assert t.status == "completed" and all(np.isfinite(r.loss) for r in t.history)
    grids = sorted(Path(cfg.output_dir, "previews").glob("step-*/grid.png"))
    assert len(grids) == 2
    img = np.asarray(t.preview(write=False)["cat"], dtype=float)
    assert img.std() > 1  # an image was decoded, not a constant


def test_base_row_is_rendered_once_at_step_0(tmp_path):
    t = Trainer(tiny_config(tmp_path, validation_num_inference_steps=2), progress=False)
    t.cache(); t.build_lora()
    calls = []
    from flux2_kit.lora import unwrap_model
    h = unwrap_model(t.transformer).register_forward_hook(lambda *a: calls.append(1))
    ims = t.preview()
    h.remove()
    assert len(calls) == 2 * 2  # 2 prompts x 2 steps: the base row is the step-0 row (the adapter starts as a no-op)
    assert ims["cat"] is ims["base__cat"]
    from PIL import Image
    g = Image.open(t.rundir.preview_dir(0) / "grid.png")
    assert g.size[1] < 2 * 64 + 40  # one row of images plus the header
    t.finish()


# ---- SimpleTuner parity -----------------------------------------------------------------------------------------------

def test_simpletuner_values(tmp_path):
    c = load_config({"optimizer": "adamw_bf16", "validation_negative_prompt": "blurry"})
    assert (c.optimizer, c.validation_negative_prompt) == ("adamw_bf16", "blurry")
    with pytest.raises(ConfigError, match="'fp8-torchao' needs torchao's CUDA kernels, .* the nearest supported setting is 'fp8-quanto'"):
        load_config({"base_model_precision": "fp8-torchao"})
    assert load_config({"lora_format": "comfyui"}).lora_export_formats == ["comfyui"]


def test_klein_previews_use_the_negative_prompt(tmp_path):
    over = dict(validation_guidance=4.0, validation_num_inference_steps=2)
    a = Trainer(tiny_config(tmp_path / "a", "klein", **over), progress=False)
    b = Trainer(tiny_config(tmp_path / "b", "klein", validation_negative_prompt="blurry, low quality", **over), progress=False)
    ia, ib = (np.asarray(t.preview(write=False)["cat"], dtype=float) for t in (a, b))
    assert "blurry, low quality" in b.text_cache and np.abs(ia - ib).mean() > 0.5
    for t in (a, b): t.finish()


def test_runtime_requirements_cover_what_the_library_imports():
    "Every third-party package flux2_kit imports is a runtime requirement (a plain pip install is enough)."
    import ast, configparser, importlib.metadata as md, re
    root = Path(__file__).parent.parent
    ini = configparser.ConfigParser(delimiters=["="]); ini.read(root / "settings.ini")
    norm = lambda r: re.split(r"[<>=!~\[ ;]", r)[0].lower().replace("_", "-")
    reqs, todo = set(), [norm(r) for r in ini["DEFAULT"]["requirements"].split()]
    while todo:  # what `pip install flux2_kit` brings: the requirements and theirs (not their extras)
        r = todo.pop()
        if r in reqs: continue
        reqs.add(r)
        try: todo += [norm(x) for x in (md.requires(r) or []) if "extra ==" not in x]
        except md.PackageNotFoundError: pass
    dist_of = {k: [d.lower().replace("_", "-") for d in v] for k, v in md.packages_distributions().items()}
    optional = {"bitsandbytes", "tensorboard", "wandb", "tomli", "torchvision", "IPython", "ipykernel"}  # imported behind a check
    missing = set()
    for f in (root / "flux2_kit").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for n in names:
                top = n.split(".")[0]
                if top in sys.stdlib_module_names or top in optional or top == "flux2_kit": continue
                if not set(dist_of.get(top, [top])) & reqs: missing.add((f.name, top))
    assert not missing, missing
