"One run, one directory (issue 16): the lock, used directories, damaged checkpoints, path-safe names, control.json, previews."
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest

from flux2_kit.check import CheckError
from flux2_kit.checkpoint import list_checkpoints, read_checkpoint_meta
from flux2_kit.config import ConfigError
from flux2_kit.runlog import RunDir, read_events
from flux2_kit.trainer import Callback, Trainer
from flux2_kit.tiny import tiny_config

HERE = Path(__file__).parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def child(tmp_path, name, workdir, **spec):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(dict(workdir=str(workdir), **spec)))
    return subprocess.Popen([sys.executable, str(HERE / "trainer_child.py"), str(p)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(pred, timeout=300):  # like test_panels._until: each test file stays self-contained
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred(): return True
        time.sleep(0.05)
    raise TimeoutError


def steps_of(out): return [e["step"] for e in read_events(Path(out) / "events.jsonl", types=["step"])]


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    "Two processes fit on one output_dir: the second is refused with the holder's pid; the first finishes intact."
    wd = tmp_path / "w"
    tiny_config(wd)  # the dataset and config files, before two processes race to make them
    over = dict(max_train_steps=8, checkpointing_steps=2, checkpoints_total_limit=2)
    a = child(tmp_path, "a", wd, overrides=over, sleep=0.3)
    out = wd / "output"
    wait_for(lambda: steps_of(out) if (out / "events.jsonl").exists() else False)
    b = child(tmp_path, "b", wd, overrides=over)
    _, err = b.communicate(timeout=600)
    assert b.returncode != 0 and f"is in use by another run (pid {a.pid} on {socket.gethostname()}" in err, err[-2000:]
    _, err = a.communicate(timeout=600)
    assert a.returncode == 0, err[-2000:]
    assert steps_of(out) == list(range(1, 9))  # never interleaved
    cks = list_checkpoints(out / "checkpoints")
    assert [p.name for p in cks] == ["checkpoint-000006", "checkpoint-000008"]
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert {read_checkpoint_meta(p)["run_id"] for p in cks} == {run_id}
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_a_sigkilled_run_leaves_no_lock(tmp_path):
    wd = tmp_path / "k"
    tiny_config(wd)
    p = child(tmp_path, "k", wd, overrides=dict(max_train_steps=50, checkpointing_steps=2), sleep=0.2)
    out = wd / "output"
    wait_for(lambda: len(list_checkpoints(out / "checkpoints")) >= 1)
    with pytest.raises(Exception, match=f"pid {p.pid}"): RunDir(out).lock()
    p.send_signal(signal.SIGKILL); p.wait()
    rd = RunDir(out).lock()  # free at once: the OS released it with the process
    assert rd.locked and rd.lock_holder()["pid"] == os.getpid()
    rd.unlock()


def test_a_finished_config_run_again(tmp_path):
    cfg = tiny_config(tmp_path, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=2)
    first = Trainer(cfg, progress=False); first.fit()
    out = Path(cfg.output_dir)
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".flux2_kit.lock"}
    with pytest.raises(CheckError, match=r"already holds a run \(checkpoints 2, 3, an exported LoRA in lora/, run.json"):
        Trainer(cfg, progress=False).fit()
    assert {p: p.stat().st_mtime_ns for p in snapshot} == snapshot  # nothing touched
    again = Trainer(cfg.replace(resume_from_checkpoint="latest"), progress=False)
    again.fit()  # nothing left to train: it says so by finishing at once, without a new checkpoint
    assert again.step == 3 and steps_of(out) == [1, 2, 3]
    fresh = Trainer(cfg.replace(overwrite_output_dir=True), progress=False)
    fresh.fit()
    assert steps_of(out) == [1, 2, 3] and fresh.claim.run_id != first.claim.run_id
    assert {read_checkpoint_meta(p)["run_id"] for p in list_checkpoints(out / "checkpoints")} == {fresh.claim.run_id}


def test_damaged_checkpoints_with_latest(tmp_path):
    cfg = tiny_config(tmp_path, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=3)
    Trainer(cfg, progress=False).fit()
    ck = Path(cfg.output_dir) / "checkpoints"
    (ck / "checkpoint-000003" / "state.safetensors").write_bytes(b"\0" * 10)  # the newest one damaged
    t = Trainer(cfg.replace(resume_from_checkpoint="latest", max_train_steps=4), progress=False)
    rep = t.check()
    assert any(p.message.startswith("skipped damaged checkpoint-000003: ") for p in rep.problems)
    t.fit()
    assert t.resumed_from.name == "checkpoint-000002" and t.step == 4
    msgs = [e["text"] for e in read_events(t.rundir.events_path, types=["message"])]
    assert any("skipped damaged checkpoint-000003" in m for m in msgs)
    for p in ck.glob("checkpoint-*"): (p / "COMPLETE").write_text("{}")  # now every one of them is damaged
    before = sorted(p.name for p in ck.iterdir())
    with pytest.raises(CheckError, match="'resume_from_checkpoint' = 'latest' but no checkpoint in .* is usable"):
        Trainer(cfg.replace(resume_from_checkpoint="latest", max_train_steps=6), progress=False).fit()
    assert sorted(p.name for p in ck.iterdir()) == before  # nothing pruned, nothing overwritten


def test_a_traversal_dataset_id_is_refused(tmp_path):
    base = tiny_config(tmp_path)
    ds = json.loads(Path(base.data_backend_config).read_text())
    ds[0] = {k: v for k, v in ds[0].items() if k != "cache_dir_vae"}  # the default cache folder is named after the id
    with pytest.raises(ConfigError, match=r"'id' = '\.\./\.\./\.\./\.\./victim' names cache folders"):
        tiny_config(tmp_path, datasets=[{**ds[0], "id": "../../../../victim"}, ds[1]])
    assert not (tmp_path.parent.parent / "victim").exists()


class Write(Callback):
    "Writes control.json (or a FIFO in its place) once, after step `at`, as a broken panel or a user might."
    order = 65  # after the preview callback, before the control callback reads it
    def __init__(self, at, what): self.at, self.what = at, what
    def after_step(self, t):
        if t.step != self.at: return
        p = t.rundir.control_path
        p.unlink(missing_ok=True)
        if self.what == "fifo": os.mkfifo(p)
        else: p.write_text(self.what)


@pytest.mark.parametrize("what,expected", [
    ("fifo", "is not a regular file (a FIFO"),
    ('{"stop": false, "pad": "' + "x" * 400_000 + '"}', "over the 65,536-byte limit"),
    ('{"stop": "yes"}', "'stop' must be true or false, got 'yes'"),
    ('{"preview_now": {"id": 1, "guidance": ' + json.dumps(list(range(1, 51))) + "}}", "asks for 50 guidance values; at most 8"),
])
def test_bad_control_files_are_answered_and_training_goes_on(tmp_path, what, expected):
    t = Trainer(tiny_config(tmp_path, max_train_steps=4), callbacks=[Write(1, what)], progress=False)
    signal.alarm(120)  # a FIFO that blocked the reader would hang: fail instead
    try: t.fit()
    finally: signal.alarm(0)
    assert t.step == 4 and t.status == "completed"
    errs = [e for e in read_events(t.rundir.events_path, types=["error"]) if e.get("kind") == "control"]
    assert len(errs) == 1 and expected in errs[0]["message"] and errs[0]["message"].startswith("control.json ignored: ")
    assert not read_events(t.rundir.events_path, types=["preview"])  # nothing rendered for the refused request


def test_previews_stay_per_step(tmp_path):
    "Each validation writes its own grid (the base row and that step's row): disk and memory grow linearly, not quadratically."
    from PIL import Image
    t = Trainer(tiny_config(tmp_path, max_train_steps=6, validation_steps=1, validation_num_inference_steps=1), progress=False)
    t.fit()
    grids = sorted(t.rundir.previews_dir.glob("step-*/grid.png"))
    assert len(grids) == 7
    sizes = {Image.open(g).size for g in grids[1:]}
    assert len(sizes) == 1  # every later grid: two rows, whatever the step
    assert Image.open(grids[0]).size[1] < next(iter(sizes))[1]  # step 0: the base row is step 0's row, shown once
    assert set(vars(t)) >= {"base_preview"} and "preview_rows" not in vars(t)  # only the base row is kept


def test_the_dashboard_escapes_what_it_reads(tmp_path):
    from flux2_kit.panels import Dashboard
    rd = RunDir(tmp_path / "run")
    rd.log_event("run_start", step=0, max_steps="<b>x</b>")
    rd.log_event("step", step="<img src=x onerror=alert(1)>", loss=1.0, max_steps=3)
    db = Dashboard(rd.root)
    db.refresh()
    assert "<img" not in db.header.value and "&lt;img src=x onerror=alert(1)&gt;" in db.header.value
    assert "<img" not in db.monitor.header.value


def test_a_failed_save_is_reported_at_the_step_it_saved(tmp_path):
    "A write that fails (here: the process may not write files over 200 kB, the checkpoint's optimizer state is bigger)."
    wd = tmp_path / "d"
    cfg = tiny_config(wd, max_train_steps=3, checkpointing_steps=2)
    t = Trainer(cfg.replace(output_dir=str(wd / "warm")), progress=False); t.cache(); t.finish()  # caches: written by now
    code = f"""
import resource, signal
from flux2_kit.trainer import Trainer, TrainingError
from flux2_kit.tiny import tiny_config
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
t = Trainer(tiny_config({str(wd)!r}, max_train_steps=3, checkpointing_steps=2), progress=False)
try: t.fit()
except TrainingError as e: print("ERR", e.kind, e.step)
"""
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=600)
    assert "ERR io 2" in r.stdout, r.stderr[-2000:]
    out = wd / "output"
    err = [e for e in read_events(out / "events.jsonl", types=["error"])][0]
    assert err["step"] == 2 and "the checkpoint of step 2 could not be written" in err["message"]
    assert list_checkpoints(out / "checkpoints") == [] and not list((out / "checkpoints").glob("*tmp*"))
