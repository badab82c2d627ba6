"The Trainer's reliability cases on flux2-tiny, in real processes (DESIGN.md §Reliability 1-4, 10-13)."
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux2_kit.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from flux2_kit.runlog import read_events
from flux2_kit.trainer import Callback, Trainer, TrainingError
from flux2_kit.tiny import tiny_config

HERE = Path(__file__).parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def child(tmp_path, name, workdir, **spec):
    spec = dict(workdir=str(workdir), **spec)
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(spec))
    return [sys.executable, str(HERE / "trainer_child.py"), str(p)]


def run_child(tmp_path, name, workdir, **spec):
    r = subprocess.run(child(tmp_path, name, workdir, **spec), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


SCHED = dict(max_train_steps=6, lr_scheduler="cosine", lr_warmup_steps=2, learning_rate=2e-3, checkpointing_steps=3,
             flux_guidance_mode="random-range", flux_guidance_min=1.0, flux_guidance_max=5.0)


def test_bit_exact_resume_in_a_new_process(tmp_path):
    # N steps straight
    run_child(tmp_path, "a", tmp_path / "a", overrides=SCHED, out=str(tmp_path / "a.safetensors"))
    # k steps, stop (checkpoint), then a new process resumes for N-k
    run_child(tmp_path, "b1", tmp_path / "b", overrides=SCHED, stop_after=3)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "output" / "checkpoints")] == ["checkpoint-000003"]
    run_child(tmp_path, "b2", tmp_path / "b", overrides=dict(SCHED, resume_from_checkpoint="latest"),
              out=str(tmp_path / "b.safetensors"))
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"not bit-exact: {diff[:5]}"
    ja, jb = json.loads((tmp_path / "a.safetensors.json").read_text()), json.loads((tmp_path / "b.safetensors.json").read_text())
    names = lambda keys: [[Path(k).name for k in ks] for ks in keys]
    assert names(ja["keys"])[3:] == names(jb["keys"]) and ja["lrs"][3:] == jb["lrs"]  # data order and LR after resume
    assert ja["last_lr"] == jb["last_lr"] and ja["step"] == jb["step"] == 6
    assert len(set(ja["lrs"])) > 2  # the schedule really moved


def test_sigkill_mid_run_leaves_a_usable_latest_checkpoint(tmp_path):
    wd = tmp_path / "k"
    over = dict(max_train_steps=40, checkpointing_steps=2, checkpoints_total_limit=2)
    proc = subprocess.Popen(child(tmp_path, "k", wd, overrides=over, sleep=0.2), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck_root = wd / "output" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len(list_checkpoints(ck_root)) < 2: time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = latest_checkpoint(ck_root)
    assert latest is not None
    ck = load_checkpoint(latest)  # verified against its manifest
    assert ck["step"] >= 4 and torch.isfinite(torch.stack([v.float().sum() for v in ck["tensors"].values()])).all()
    assert len(list_checkpoints(ck_root)) <= 2  # retention
    t = Trainer(tiny_config(wd, **dict(over, max_train_steps=ck["step"] + 2, resume_from_checkpoint="latest")),
                progress=False)
    t.fit()
    assert t.step == ck["step"] + 2


def test_retention_keeps_exactly_k_and_skips_junk(tmp_path):
    cfg = tiny_config(tmp_path, max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2)
    root = Path(cfg.output_dir) / "checkpoints"
    (root / "checkpoint-000099").mkdir(parents=True)  # no completion marker: junk
    (root / "notes").mkdir()
    Trainer(cfg, progress=False).fit()
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-000004", "checkpoint-000005"]
    assert latest_checkpoint(root).name == "checkpoint-000005"
    assert (root / "checkpoint-000099").exists() and (root / "notes").exists()  # never deleted


class Boom(Callback):
    "Raises the error a GPU would raise, at a given step."
    def __init__(self, at, exc): self.at, self.exc = at, exc
    def before_step(self, t):
        if t.step == self.at: raise self.exc


def test_out_of_memory_reports_advice_and_no_partial_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, max_train_steps=6, checkpointing_steps=2)
    t = Trainer(cfg, callbacks=[Boom(3, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))],
                progress=False)
    with pytest.raises(TrainingError, match="out of memory at step 4") as e:
        t.fit()
    assert "gradient_checkpointing" in str(e.value) and "int8-quanto" in str(e.value)
    root = Path(cfg.output_dir) / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-000002"]
    assert not [p for p in root.iterdir() if ".tmp" in p.name]
    ev = read_events(Path(cfg.output_dir) / "events.jsonl")
    err = [e for e in ev if e["type"] == "error"][0]
    assert err["kind"] == "oom" and "train_batch_size" in err["advice"]
    assert ev[-1]["type"] == "run_end" and ev[-1]["status"] == "error"


def test_inf_loss_stops_with_step_and_files(tmp_path):
    class Inf(Callback):
        def before_step(self, t):
            if t.step == 2: t.batch["prompt_embeds"] = t.batch["prompt_embeds"] * float("inf")
    cfg = tiny_config(tmp_path, max_train_steps=6, checkpointing_steps=1)
    t = Trainer(cfg, callbacks=[Inf()], progress=False)
    with pytest.raises(TrainingError, match="non-finite loss .* at step 3; batch files") as e:
        t.fit()
    assert e.value.files and Path(e.value.files[0]).exists()
    assert [p.name for p in list_checkpoints(Path(cfg.output_dir) / "checkpoints")] == ["checkpoint-000001", "checkpoint-000002"]
    for p in list_checkpoints(Path(cfg.output_dir) / "checkpoints"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(p)["tensors"].values())


def test_resume_with_changed_dataset_fails_clearly(tmp_path):
    cfg = tiny_config(tmp_path, max_train_steps=2, checkpointing_steps=2)
    Trainer(cfg, progress=False).fit()
    ds = json.loads(Path(cfg.data_backend_config).read_text())
    ds[0]["max_num_samples"] = 3  # one image fewer
    Path(cfg.data_backend_config).write_text(json.dumps(ds))
    t = Trainer(tiny_config(tmp_path, max_train_steps=4, resume_from_checkpoint="latest", datasets=ds), progress=False)
    with pytest.raises(Exception, match=r"dataset \(fingerprint\): saved"):
        t.fit()


def test_cell_by_cell_equals_fit(tmp_path):
    over = dict(max_train_steps=5, seed=3)
    a = Trainer(tiny_config(tmp_path / "a", **over), progress=False, default_callbacks=False)
    a.prepare_data(); a.load_encoders(); a.cache(); a.build_lora()
    while a.step < a.max_steps: a.train_epoch()
    b = Trainer(tiny_config(tmp_path / "b", **over), progress=False)
    b.fit()
    from flux2_kit.lora import lora_state_dict
    sa, sb = lora_state_dict(a.transformer), lora_state_dict(b.transformer)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_missing_tracker_is_a_clear_error(tmp_path):
    from accelerate.utils import is_tensorboard_available
    if is_tensorboard_available(): pytest.skip("tensorboard is installed here")
    t = Trainer(tiny_config(tmp_path, report_to="tensorboard"), progress=False)
    with pytest.raises(Exception, match="pip install tensorboard"):
        t.accelerator


def test_cli_and_script_train_the_tiny_config(tmp_path):
    from flux2_kit.sample import sample_dataset
    repo = HERE.parent
    sample_dataset(tmp_path / "datasets")  # the tiny config's relative instance_data_dir
    cfg = repo / "examples" / "configs" / "tiny" / "config.json"
    r = subprocess.run([sys.executable, "-m", "flux2_kit.cli", "train", "--config", str(cfg), "--base_dir", str(tmp_path),
                        "--quiet", "--max_train_steps", "2", "--validation_steps", "0", "--checkpointing_steps", "0"],
                       env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained 2 steps" in r.stdout
    assert (tmp_path / "output" / "flux2-tiny" / "lora" / "pytorch_lora_weights.safetensors").exists()
    r = subprocess.run([sys.executable, str(repo / "examples" / "train_tiny.py"), "--workdir", str(tmp_path / "script"),
                        "--steps", "2"], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "script" / "output" / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_cell_by_cell_with_default_callbacks_logs_events_and_checkpoints(tmp_path):
    # the notebook workflow, each method its own cell, with the default callbacks (run dir, checkpoints, progress ...)
    t = Trainer(tiny_config(tmp_path, max_train_steps=4, checkpointing_steps=2), progress=False)
    t.prepare_data(); t.load_encoders(); t.cache(); t.build_lora()
    res = t.train_epoch(max_steps=2)
    assert t.step == 2 and len(res) == 2
    t.preview()
    ck = t.save()
    ev = read_events(t.rundir.events_path)
    assert [e["step"] for e in ev if e["type"] == "step"] == [1, 2]
    assert [e["loss"] for e in ev if e["type"] == "step"] == [r.loss for r in res]
    assert [e["type"] for e in ev].count("run_start") == 1 and t.rundir.run_json.exists()
    assert ck.name == "checkpoint-000002" and latest_checkpoint(t.rundir.checkpoints_dir) == ck
    assert load_checkpoint(ck)["step"] == 2
    t.fit()  # goes on from step 2: before_fit is not run again
    ev = read_events(t.rundir.events_path)
    assert [e["step"] for e in ev if e["type"] == "step"] == [1, 2, 3, 4]
    assert [e["type"] for e in ev].count("run_start") == 1 and [e["type"] for e in ev].count("run_end") == 1
    assert t.status == "completed" and latest_checkpoint(t.rundir.checkpoints_dir).name == "checkpoint-000004"
    assert (t.rundir.root / "lora" / "pytorch_lora_weights.safetensors").exists()


def _bytes_dataset(path):
    "A `datasets.Dataset` whose Image column holds encoded bytes only (built from in-memory PIL images), saved to disk."
    import datasets
    import numpy as np
    from PIL import Image
    g = np.random.default_rng(0)
    ims = [Image.fromarray(g.integers(0, 256, (64 + 16 * i, 80, 3), dtype=np.uint8)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": ims, "caption": ["a red square", "a blue circle", "a green line"]},
                                    features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(path))
    raw = datasets.load_from_disk(str(path)).cast_column("image", datasets.Image(decode=False))
    assert all(r["image"]["bytes"] and not r["image"]["path"] for r in raw)  # no file behind any image
    return path


def test_huggingface_bytes_dataset_trains_and_hits_the_latent_cache(tmp_path):
    data = _bytes_dataset(tmp_path / "hfds")
    def cfg(name):  # no caption_strategy: type huggingface reads the caption column by default
        return tiny_config(tmp_path / name, max_train_steps=2, datasets=[
            dict(id="hf", type="huggingface", dataset_name=str(data), crop=True, crop_aspect="square", resolution=64,
                 resolution_type="pixel_area", minimum_image_size=32, cache_dir_vae=str(tmp_path / "cache" / "vae")),
            dict(id="text-embeds", type="local", dataset_type="text_embeds", default=True,
                 cache_dir=str(tmp_path / "cache" / "text"))])
    a = Trainer(cfg("a"), progress=False)
    assert a.cfg.dataset("hf").caption_strategy == "huggingface"
    items = a.prepare_data()["hf"].items
    assert len(items) == 3 and all(it.path.startswith("hf://hf/") and it.source is not None for it in items)
    assert sorted(it.caption for it in items) == ["a blue circle", "a green line", "a red square"]
    a.fit()
    (d, lc), = a.latent_caches.items()
    assert (lc.stats.misses, lc.stats.hits, lc.stats.failed) == (3, 0, [])
    assert a.step == 2 and a.status == "completed" and all(r.finite for r in a.history)
    b = Trainer(cfg("b"), progress=False)  # a second run: the same images, from the cache
    b.cache()
    lb = b.latent_caches[d]
    assert (lb.stats.misses, lb.stats.hits) == (0, 3)
    from flux2_kit.trainer import _latent_request
    za = [lc[_latent_request(it)] for it in items]
    assert all(torch.equal(x, lb[_latent_request(it)]) for x, it in zip(za, b.tables["hf"].items))
    assert not torch.equal(za[0], za[1])
    b.fit()
    assert b.step == 2 and [e["step"] for e in read_events(b.rundir.events_path, types=["step"])] == [1, 2]


def test_cell_by_cell_finish_ends_the_run_like_fit(tmp_path):
    # train_epoch cells then finish(): final checkpoint, export and run_end, as fit writes them
    t = Trainer(tiny_config(tmp_path / "a", max_train_steps=3), progress=False)
    t.train_epoch(max_steps=3)
    assert read_events(t.rundir.events_path)[-1]["type"] == "step"  # still open: the panels see a live run
    ex = t.finish()
    ev = read_events(t.rundir.events_path)
    assert (ev[-1]["type"], ev[-1]["status"], ev[-1]["step"]) == ("run_end", "completed", 3) and t.status == "completed"
    assert [e["type"] for e in ev].count("run_end") == 1 and t.finish() is None  # once
    assert [p.name for p in list_checkpoints(t.rundir.checkpoints_dir)] == ["checkpoint-000003"]
    lora = load_file(ex["diffusers"])
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
    f = Trainer(tiny_config(tmp_path / "b", max_train_steps=3), progress=False)
    f.fit()
    ref = load_file(f.rundir.lora_dir / "pytorch_lora_weights.safetensors")
    assert lora.keys() == ref.keys() and all(torch.equal(lora[k], ref[k]) for k in ref)  # the same weights as fit


def test_bare_train_epoch_logs_its_error_once(tmp_path):
    t = Trainer(tiny_config(tmp_path, max_train_steps=4),
                callbacks=[Boom(1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))], progress=False)
    with pytest.raises(TrainingError, match="out of memory at step 2") as e:
        t.train_epoch()
    assert "gradient_checkpointing" in str(e.value) and t.status == "error"
    errs = [x for x in read_events(t.rundir.events_path) if x["type"] == "error"]
    assert [(x["kind"], x["step"]) for x in errs] == [("oom", 2)] and "train_batch_size" in errs[0]["advice"]
    with pytest.raises(TrainingError, match="out of memory at step 2"):
        t.fit()  # goes on in the open run: fit logs its own error, train_epoch does not log it again
    ev = read_events(t.rundir.events_path)
    assert [x["type"] for x in ev].count("error") == 2 and [x["type"] for x in ev].count("run_start") == 1
    assert (ev[-1]["type"], ev[-1]["status"]) == ("run_end", "error")
    t.callbacks = [cb for cb in t.callbacks if not isinstance(cb, Boom)]
    t.train_epoch(max_steps=3)  # a new run segment after the ended one: a run_start again, no error
    t.finish("stopped")
    ev = read_events(t.rundir.events_path)
    assert [x["type"] for x in ev].count("run_start") == 2 and [x["type"] for x in ev].count("error") == 2
    assert (ev[-1]["type"], ev[-1]["status"], ev[-1]["step"]) == ("run_end", "stopped", t.step) and t.step > 1
