"The Trainer's reliability cases on flux2-tiny, in real processes (DESIGN.md §Reliability 1-4, 10-13)."
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux2_kit.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from flux2_kit.runlog import read_events
from flux2_kit.trainer import Callback, Trainer, TrainingError, tiny_config

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
