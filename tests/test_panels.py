"Panels driven through widget state against run directories written with the real runlog/checkpoint API and real bucket tables."
import io, json, os, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
from PIL import Image

from flux2_kit.buckets import make_buckets
from flux2_kit.data import scan_dataset
from flux2_kit.panels import (BucketInspector, Dashboard, GuidancePanel, TrainingMonitor, ValidationGrid,
                              draw_crop, scan_previews)
from flux2_kit.runlog import BASE_PREFIX, guidance_image_name, parse_preview_name  # the preview-name contract
from flux2_kit.runlog import ControlPoller, RunDir, read_control
from flux2_kit.sample import sample_dataset

NAMES = ["chelsea", "coffee", "camera", "grace_hopper", "rocket"]


def _spec(d, **kw):
    return {"id": "s", "type": "local", "instance_data_dir": str(d), "caption_strategy": "textfile", "resolution": 64,
            "resolution_type": "pixel_area", "crop": True, "crop_aspect": "square", "minimum_image_size": 32, **kw}


@pytest.fixture
def dataset(tmp_path):
    d = sample_dataset(tmp_path / "data", names=NAMES)
    (d / "empty.png").write_bytes(b"")
    (d / "noise.jpg").write_bytes(os.urandom(600))
    Image.new("RGB", (20, 20), (1, 2, 3)).save(d / "tiny.png")  # below minimum_image_size
    return d


@pytest.fixture
def table(dataset):
    spec = _spec(dataset, crop_aspect="preserve")
    items, rep = scan_dataset(spec)
    return make_buckets(items, spec, report=rep)


def _img(c, size=(64, 64)): return Image.new("RGB", size, c)


def _decode(png: bytes) -> Image.Image: return Image.open(io.BytesIO(png)).convert("RGB")


@pytest.fixture
def run(tmp_path, table):
    "A run directory as a trainer writes it: run.json, buckets, caches, steps, previews, a checkpoint, an error."
    import torch
    from flux2_kit.checkpoint import save_checkpoint
    r = RunDir(tmp_path / "out")
    r.write_run_json({"max_train_steps": 8, "flux_guidance_mode": "constant"}, seed=0)
    r.log_event("buckets", dataset=table.dataset_id, buckets=table.rows(), items=table.item_rows(),
                report=table.report.to_dict())
    r.log_event("cache", kind="text", done=5, total=5)
    r.log_event("cache", kind="latents", done=2, total=5)
    r.reset_control()
    r.log_event("run_start", step=0, world_size=2)
    r.save_previews(0, {f"{BASE_PREFIX}cat": _img((0, 0, 0)), f"{BASE_PREFIX}dog": _img((0, 0, 9))})
    for s in range(1, 5):
        r.log_event("step", step=s, loss=0.4 + 0.1 * s, lr=1e-4 * s / 4, sigma=[0.15, 0.55, 0.85],
                    losses=[0.1 * s, 0.2 * s, 0.3 * s], grad_norm=0.5, samples_per_s=3.0, eta_s=(8 - s) * 2.0,
                    epoch=0, max_steps=8)
        if s % 2 == 0:
            r.save_previews(s, {"cat": _img((s, 0, 0)), "dog": _img((s, 0, 9))}, grid=_img((s, s, s), (128, 64)))
    ck = save_checkpoint(r.checkpoints_dir, 4, {"lora.a": torch.full((2, 3), 2.0), "lora.b": torch.ones(3)},
                         meta={"base_model": "flux2-tiny:dev"})
    r.log_event("checkpoint", step=4, path=os.path.relpath(ck, r.root))
    return r


# --- names ----------------------------------------------------------------------------------------------------------

def test_preview_names_round_trip():
    from flux2_kit.runlog import preview_image_name, slug
    for prompt, g in [("cat", 1.0), ("a_b-c.d", 3.5), ("x__y", 12.25), ("tiny", 1e-5), ("my cat", 2.0)]:
        n = guidance_image_name(prompt, g)
        assert n == preview_image_name(prompt, guidance=g)  # the name the trainer writes
        assert parse_preview_name(n + ".png") == dict(prompt=slug(prompt), base=False, guidance=g, scale=None, model=None,
                                                      grid=False)
    assert parse_preview_name("cat__g3.5.png")["guidance"] == 3.5
    assert parse_preview_name(BASE_PREFIX + "cat.png")["base"]
    with pytest.raises(ValueError, match=">= 0"): guidance_image_name("cat", -1)


# --- BucketInspector -------------------------------------------------------------------------------------------------

def test_inspector_table(table, dataset):
    bi = BucketInspector(table, thumb_size=96, large_size=200)
    bi.refresh()
    rows = table.rows()
    assert bi.histogram() == [(r["bucket"], r["images"]) for r in rows]
    assert sum(n for _, n in bi.histogram()) == 5 and len(rows) == 2
    assert _decode(bi.histogram_image.value).size[0] > 100
    codes = sorted(r["code"] for r in bi.report_rows(level="skip"))
    assert "empty_file" in codes and len(codes) == 3, codes
    for r in bi.report_rows(level="skip"): assert Path(r["path"]).name in bi.report.value
    assert "5 images in 2 buckets" in bi.summary.value and "3 skipped" in bi.summary.value
    # the 80x48 bucket: chelsea, coffee, rocket; each thumbnail shows the crop box in red
    bi.bucket.value = "80x48"
    assert [Path(p).stem for p in bi.shown_thumbnails()] == ["chelsea", "coffee", "rocket"]
    thumb = _decode(bi.thumb_box.children[0].children[0].value)
    it = next(r for r in table.item_rows() if r["key"] == "chelsea")
    sx = thumb.width / it["width"]
    x = round(it["crop"][0] * sx)
    assert thumb.getpixel((x, thumb.height // 2)) == (255, 0, 0)
    # selection shows the caption (button click and Select alike)
    bi.thumb_box.children[2].children[1].click()
    assert bi.selected()["key"] == "rocket" and "launch pad" in bi.caption_html.value
    assert bi.thumb_box.children[1].children[1].tooltip.startswith("a cup of coffee")
    bi.item.value = str(dataset / "coffee.png")
    assert "a cup of coffee" in bi.caption_html.value
    assert _decode(bi.large.value).width == 200
    bi.select_item(str(dataset / "camera.png"))  # another bucket: the bucket follows
    assert bi.bucket.value == "64x64" and "camera on a tripod" in bi.caption_html.value
    assert bi.errors == []


def test_draw_crop_box_matches_geometry():
    im = Image.new("RGB", (600, 400), (0, 50, 0))
    t = draw_crop(im, (150, 0, 550, 400), size=300)  # scale 0.5
    assert t.size == (300, 200)
    assert t.getpixel((75, 100)) == (255, 0, 0) and t.getpixel((274, 100)) == (255, 0, 0)
    assert t.getpixel((60, 100)) == (0, 50, 0) and t.getpixel((150, 100)) == (0, 50, 0)


def test_inspector_from_spec_and_config(dataset, tmp_path):
    bi = BucketInspector.from_spec(_spec(dataset))
    bi.refresh()
    assert bi.histogram() == [("64x64", 5)]
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        {"id": "photos", "type": "local", "instance_data_dir": str(dataset), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel_area", "minimum_image_size": 32},
        {"id": "te", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "te")}]))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": "multidatabackend.json",
                                                      "output_dir": "out"}))
    bi = BucketInspector.from_config(tmp_path / "config.json")
    bi.refresh()
    assert bi.datasets() == ["photos"] and sum(n for _, n in bi.histogram()) == 5
    assert "tabby" in bi.caption("chelsea")


def test_inspector_reads_bucket_events(run, table):
    bi = BucketInspector(output_dir=run.root)
    assert bi.datasets() == []
    bi.refresh()
    assert bi.datasets() == ["s"] and bi.histogram() == [(r["bucket"], r["images"]) for r in table.rows()]
    assert bi.caption("coffee").startswith("a cup of coffee")
    assert sorted(r["code"] for r in bi.report_rows(level="skip")) == sorted(s.code for s in table.report.skipped)
    # rows only (no items): thumbnails from the rows' paths and crops, no captions
    r2 = RunDir(run.root.parent / "rows-only")
    r2.log_event("buckets", buckets=table.rows(max_paths=2))
    bi2 = BucketInspector(output_dir=r2.root); bi2.refresh()
    assert bi2.datasets() == ["run"] and len(bi2.shown_thumbnails()) == 2 and bi2.errors == []


# --- TrainingMonitor -------------------------------------------------------------------------------------------------

def test_monitor(run):
    m = TrainingMonitor(run.root, plot_interval=0)
    assert m.refresh() > 0 and m.errors == []
    assert [s for s, _ in m.losses()] == [1, 2, 3, 4]
    assert [l for _, l in m.losses()] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    bins = m.sigma_bins()
    assert len(bins) == 10
    assert (bins[1]["count"], bins[5]["count"], bins[8]["count"], bins[0]["count"]) == (4, 4, 4, 0)
    assert bins[1]["mean"] == pytest.approx(0.1 * (1 + 2 + 3 + 4) / 4)
    assert bins[8]["mean"] == pytest.approx(0.3 * 2.5) and bins[0]["mean"] is None
    sm = m.smoothed(0.9)
    assert sm[0][1] == pytest.approx(0.5) and 0.5 < sm[-1][1] < 0.8
    assert m.series("lr")[-1] == (4, pytest.approx(1e-4))
    d = m.latest()
    assert (d["step"], d["max_steps"], d["samples_per_s"], d["eta_s"]) == (4, 8, 3.0, 8.0)
    assert (m.progress.value, m.progress.max) == (4, 8)
    assert m.cache_progress() == {"text": (5, 5), "latents": (2, 5)}
    assert [(b.value, b.max, b.bar_style) for b in m.cache_box.children] == [(5, 5, "success"), (2, 5, "info")]
    assert "ETA 0:08" in m.header.value and "running" in m.header.value
    assert _decode(m.plot.value).width > 300
    # buttons write control.json
    m.pause_button.click(); assert read_control(run.control_path)["pause"] is True
    m.resume_button.click(); assert read_control(run.control_path)["pause"] is False
    m.stop_button.click(); assert read_control(run.control_path)["stop"] is True
    assert "stop requested" in m.control_note.value
    # a training error is shown in red; the run's end disables the buttons
    run.log_event("error", message="loss is nan at step 5", kind="nonfinite", step=5, advice="lower the learning rate",
                  file="chelsea.png")
    run.log_event("run_end", status="error", step=5)
    m.refresh()
    assert "loss is nan" in m.train_alert.value and "#b00020" in m.train_alert.value and "chelsea.png" in m.train_alert.value
    assert m.status == "error" and m.progress.bar_style == "danger" and m.stop_button.disabled
    assert m.errors == []


def test_monitor_scalar_sigma_and_nonfinite(tmp_path):
    r = RunDir(tmp_path / "o")
    r.log_event("run_start", step=0)
    r.log_event("step", step=1, loss=float("nan"), sigma=0.05)
    r.log_event("step", step=2, loss=1.0, sigma=[0.95, 0.96])  # no per-sample losses: the batch loss for both
    m = TrainingMonitor(r.root); m.refresh()
    assert [s for s, _ in m.losses()] == [1, 2]
    assert m.sigma_bins()[9] == dict(lo=0.9, hi=1.0, mean=1.0, count=2) and m.sigma_bins()[0]["count"] == 0
    assert m.smoothed()[-1][1] == pytest.approx(1.0)
    assert "step 2/?" in m.header.value


# --- ValidationGrid --------------------------------------------------------------------------------------------------

def test_validation_grid(run):
    g = ValidationGrid(run.root, thumb_size=32, large_size=96)
    g.refresh()
    assert g.available_steps() == [2, 4] and g.prompts() == ["cat", "dog"] and g.step.value == 4
    assert [c[0] for c in g.cards["step"]] == ["cat", "dog"]
    assert [c[1].name for c in g.cards["base"]] == ["base__cat.png", "base__dog.png"]
    assert [c[0] for c in g.cards["prompt"]] == ["base model", "step 2", "step 4"]
    assert _decode(g.step_row.children[0].children[0].value).getpixel((5, 5)) == (4, 0, 0)
    g.step.value = 2
    assert _decode(g.step_row.children[1].children[0].value).getpixel((5, 5)) == (2, 0, 9)
    g.cards["step"][1][2].click()  # enlarge dog at step 2
    assert g.enlarged[1] == run.preview_dir(2) / "dog.png" and _decode(g.large.value).size == (64, 64)
    assert g.large.width == "96"  # the browser scales small previews up
    assert "previews/step-000002/dog.png" in g.large_label.value
    g.compare_a.value, g.compare_b.value = -1, 2
    g.prompt.value = "dog"
    c = g.comparison()
    assert c == dict(prompt="dog", a=(-1, str(run.preview_dir(0) / "base__dog.png")), b=(2, str(run.preview_dir(2) / "dog.png")))
    assert "A: base model" in g.compare_box.children[0].children[0].value
    assert _decode(g.compare_box.children[1].children[1].value).getpixel((3, 3)) == (2, 0, 9)
    assert g.table()["cat"] == {-1: str(run.preview_dir(0) / "base__cat.png"), 2: str(run.preview_dir(2) / "cat.png"),
                                4: str(run.preview_dir(4) / "cat.png")}
    # guidance previews are not validation images; a new checkpoint's previews show up on refresh
    run.save_previews(6, {guidance_image_name("cat", 2.0): _img((6, 2, 0))}, request_id=1, guidance=[2.0])
    run.save_previews(8, {"cat": _img((8, 0, 0))})
    g.refresh()
    assert g.available_steps() == [2, 4, 8] and g.step.value == 2  # the user chose step 2: not moved
    assert list(scan_previews(run.previews_dir)[6]["guidance"]) == ["cat__g2"]
    assert g.errors == []


def test_handler_errors_are_shown_not_raised(run):
    g = ValidationGrid(run.root); g.refresh()
    victim = g.cards["step"][0]
    victim[1].unlink()  # the file vanished after the grid was drawn
    victim[2].click()  # must not raise
    assert "FileNotFoundError" in g.errors[-1] and "FileNotFoundError" in g.alert.value
    assert "Traceback" in "".join(o.get("text", "") for o in g.out.outputs)
    # control.json replaced by a folder: the Stop button fails visibly, the panel keeps working
    run.control_path.unlink(); run.control_path.mkdir()
    m = TrainingMonitor(run.root); m.refresh()
    m.stop_button.click()
    assert "IsADirectoryError" in m.errors[-1] and m.losses()[-1][0] == 4
    # garbage and a partial line in the event log are skipped
    with open(run.events_path, "ab") as f: f.write(b"not json\n{\"type\": \"step\", \"st")
    m.refresh()
    assert m.reader.skipped == 1 and len(m.errors) == 1


# --- GuidancePanel ---------------------------------------------------------------------------------------------------

def _config(tmp_path, **keys):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"--model_flavour": "dev", "--output_dir": str(tmp_path / "out"), "--learning_rate": 3e-4,
                             **keys}, indent=1))
    return p


def test_guidance_training_keys_written_back(tmp_path):
    from flux2_kit.config import load_config
    p = _config(tmp_path, **{"--flux_guidance_value": 2.0})
    gp = GuidancePanel(config=p)
    assert (gp.mode.value, gp.value.value) == ("constant", 2.0) and not gp.save_button.disabled
    gp.value.value = 3.5
    gp.save_button.click()
    raw = json.loads(p.read_text())
    assert raw["--flux_guidance_value"] == 3.5 and raw["--learning_rate"] == 3e-4 and "flux_guidance_value" not in raw
    assert load_config(p).flux_guidance_value == 3.5 and gp.config.flux_guidance_value == 3.5
    gp.mode.value = "random-range"
    gp.gmin.value, gp.gmax.value = 1.5, 4.5
    gp.save_button.click()
    c = load_config(p)
    assert (c.flux_guidance_mode, c.flux_guidance_min, c.flux_guidance_max) == ("random-range", 1.5, 4.5)
    before = p.read_text()
    gp.gmin.value = 9.0  # above max
    gp.save_button.click()
    assert p.read_text() == before and "flux_guidance_min" in gp.alert.value and len(gp.errors) == 1
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temp files left


def test_guidance_klein_and_no_config(tmp_path):
    gp = GuidancePanel(config=_config(tmp_path, **{"--model_flavour": "klein-4b"}))
    assert gp.save_button.disabled and "klein" in gp.config_note.value
    gp = GuidancePanel()
    assert gp.save_button.disabled
    gp.save_button.click(); gp.preview_button.click()  # disabled in a browser; a direct click still must not raise
    assert "no config file" in gp.errors[0] and "no render function" in gp.errors[1]


def test_guidance_live_request(run):
    gp = GuidancePanel(run.root, guidance=[1.0, 4.0])
    gp.refresh()
    assert gp.live
    gp.slider.value = 2.5; gp.add_button.click(); gp.add_button.click()
    assert gp.values.value == [1.0, 4.0, 2.5]
    gp.preview_button.click()
    assert [r["guidance"] for r in gp.pending_requests()] == [[1.0, 4.0, 2.5]]
    # rank 0's side, between steps, with the real runlog API
    poll = ControlPoller(run.control_path)
    req = poll.take_preview()
    assert req == {"id": 1, "guidance": [1.0, 4.0, 2.5]} and poll.take_preview() is None
    run.save_previews(5, {guidance_image_name(p, g): _img((int(g * 10), i, 0)) for i, p in enumerate(["cat", "dog"])
                          for g in req["guidance"]}, request_id=req["id"], guidance=req["guidance"])
    gp.refresh()
    assert gp.pending_requests() == []
    s = gp.shown()
    assert (s["source"], s["id"], s["step"], s["guidance"]) == ("run", 1, 5, [1.0, 4.0, 2.5])
    assert s["names"] == ["cat__g1", "cat__g4", "cat__g2p5", "dog__g1", "dog__g4", "dog__g2p5"]
    labels = [c.children[1].value for c in gp.images.children]
    assert labels[:2] == ["cat · g=1", "cat · g=4"]
    assert _decode(gp.images.children[2].children[0].value).getpixel((0, 0)) == (25, 0, 0)
    # a second request; the run ends before serving it
    rid = gp.request(3.0)
    assert rid == 2 and read_control(run.control_path)["preview_now"] == {"id": 2, "guidance": [3.0]}
    run.log_event("run_end", status="stopped", step=5)
    gp.refresh()
    assert not gp.live and gp.pending_requests() == [] and 2 in gp.unserved and "ended" in gp.preview_note.value
    assert gp.errors == []


def test_guidance_after_run_renders_from_latest_checkpoint(run):
    from flux2_kit.checkpoint import latest_checkpoint, load_checkpoint

    def render(gs):  # what the lead builds from flux2_kit.preview: here the checkpoint's LoRA sum sets the colour
        ck = load_checkpoint(latest_checkpoint(run.checkpoints_dir))
        v = int(sum(float(t.sum()) for t in ck["tensors"].values()))
        return {guidance_image_name("cat", g): _img((v, int(g * 10), ck["step"])) for g in gs}

    run.log_event("run_end", status="completed", step=4)
    gp = GuidancePanel(run.root, render=render, guidance=[1.0, 3.0])
    gp.refresh()
    gp.preview_button.click()
    gp.wait(30)
    assert gp.errors == []
    s = gp.shown()
    assert (s["source"], s["step"], s["names"]) == ("render", 4, ["cat__g1", "cat__g3"])
    assert _decode(gp.images.children[1].children[0].value).getpixel((0, 0)) == (15, 30, 4)  # 2*6 + 3 = 15
    assert "checkpoint-000004" in gp.preview_note.value
    assert read_control(run.control_path)["preview_now"] is None  # nothing was asked of a finished run
    gp.render = lambda gs: {"cat": "not an image"}
    gp.preview_button.click(); gp.wait(30)
    assert "render" in gp.errors[-1] and gp.shown()["names"] == ["cat__g1", "cat__g3"]  # the last good result stays


# --- Dashboard, background refresh against a live writer process ------------------------------------------------------

CHILD = textwrap.dedent(r'''
    import sys, time
    from PIL import Image
    from flux2_kit.runlog import RunDir
    from flux2_kit.runlog import guidance_image_name
    run = RunDir(sys.argv[1]); poll = run.control_poller()
    run.log_event("run_start", step=0)
    for step in range(1, 3000):
        c = poll.poll()
        if c["stop"]:
            run.log_event("control", action="stop"); run.log_event("run_end", status="stopped", step=step - 1); break
        req = poll.take_preview()
        if req:
            run.save_previews(step, {guidance_image_name("cat", g): Image.new("RGB", (16, 16), (int(g), 0, 0))
                                     for g in req["guidance"]}, request_id=req["id"], guidance=req["guidance"])
        if step % 10 == 0: run.save_previews(step, {"cat": Image.new("RGB", (16, 16), (step % 256, 0, 0))})
        run.log_event("step", step=step, loss=1.0 / step, sigma=[0.5], max_steps=3000)
        time.sleep(0.01)
    run.close()
''')


def _until(cond, timeout=30.0):
    t = time.time()
    while time.time() - t < timeout:
        if cond(): return True
        time.sleep(0.05)
    return False


def test_dashboard_live_run_in_another_process(tmp_path, table):
    out = tmp_path / "live"
    RunDir(out).log_event("buckets", dataset="s", buckets=table.rows())
    db = Dashboard(out, tables=table)
    db.start(interval=0.1)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], cwd=Path(__file__).parent.parent)
    try:
        assert _until(lambda: len(db.monitor.losses()) >= 25 and db.grid.available_steps())
        assert db.guidance.live and db.running
        rid = db.guidance.request([7.0, 9.0])
        assert _until(lambda: (db.guidance.shown() or {}).get("id") == rid)
        assert db.guidance.shown()["names"] == ["cat__g7", "cat__g9"]
        db.monitor.stop_button.click()
        assert child.wait(30) == 0
        assert _until(lambda: db.monitor.status == "stopped")
    finally:
        db.stop()
        if child.poll() is None: child.kill()
    assert not db.running
    n = db.monitor.losses()[-1][0]
    assert db.monitor.ended == {**db.monitor.ended, "status": "stopped", "step": n}
    assert db.inspector.histogram() == [(r["bucket"], r["images"]) for r in table.rows()]
    assert db.all_errors() == [] and "stopped" in db.header.value


def test_import_is_light():
    code = "import sys, flux2_kit.panels; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --- a real flux2-tiny run: 2 gloo processes, steered through the Dashboard's widgets ------------------------------------

def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(run_dir, kind):
    from flux2_kit.runlog import read_events
    return read_events(Path(run_dir) / "events.jsonl", types=[kind])


def test_dashboard_steers_a_real_two_process_run(tmp_path):
    "`launch(num_processes=2, block=False)` (gloo): loss, grid, a guidance preview, pause/resume, stop, render after."
    from flux2_kit.checkpoint import latest_checkpoint, load_checkpoint
    from flux2_kit.launch import launch
    from flux2_kit.tiny import tiny_config
    cfg = tiny_config(tmp_path, validation_steps=5, checkpointing_steps=20, checkpoints_total_limit=2,
                      max_train_steps=100000)
    cfg.save(tmp_path / "config.json")
    out = Path(cfg.output_dir)
    db = Dashboard(out, config=tmp_path / "config.json", guidance=[1.0, 4.0])
    assert db.inspector.histogram() == [("64x64", 4)]  # scanned from the config before any model is loaded
    h = launch(tmp_path / "config.json", num_processes=2, block=False)
    db.start(interval=0.2)  # after the fork: the children get no refresh thread
    try:
        assert _until(lambda: len(db.monitor.losses()) >= 3 and db.grid.available_steps() or h.done,
                      180) and not h.done, f"the run did not start: {h.results()}"
        assert db.guidance.live and db.monitor.status == "running"
        rid = db.guidance.request()  # the preview list [1, 4] -> control.json; rank 0 renders between steps
        assert _until(lambda: (db.guidance.shown() or {}).get("id") == rid, 60)
        db.monitor.pause_button.click()
        assert _until(lambda: db.monitor.status == "paused", 30)
        paused_at = db.monitor.latest()["step"]
        time.sleep(1.5); db.refresh()
        assert db.monitor.latest()["step"] == paused_at  # no step while paused
        db.monitor.resume_button.click()
        assert _until(lambda: db.monitor.latest()["step"] >= paused_at + 3, 30)
        db.monitor.stop_button.click()
        res = h.wait(120)
        assert [r["status"] for r in res] == ["stopped", "stopped"] and res[0]["lora_sha256"] == res[1]["lora_sha256"]
        assert _until(lambda: db.monitor.status == "stopped", 10)
    finally:
        db.stop()
        if not h.done: h.kill()
    assert db.all_errors() == [] and db.monitor.training_errors == []
    # the monitor shows exactly what the run logged
    steps = _events(out, "step")
    assert db.monitor.losses() == [(e["step"], pytest.approx(e["loss"])) for e in steps]
    assert sum(b["count"] for b in db.monitor.sigma_bins()) == sum(len(e["sigma"]) for e in steps)
    d = db.monitor.latest()
    assert (d["step"], d["max_steps"]) == (steps[-1]["step"], 100000) and d["samples_per_s"] > 0
    assert db.monitor.cache_progress() == {"text": (7, 7), "latents": (4, 4)}
    assert [e["action"] for e in _events(out, "control") if e["action"] != "preview_now"] == ["pause", "resume", "stop"]
    # Stop ended the run with a committed checkpoint of its last step
    end = _events(out, "run_end")[-1]
    ck = latest_checkpoint(out / "checkpoints")
    assert end["status"] == "stopped" and ck is not None and load_checkpoint(ck)["step"] == end["step"] == d["step"]
    assert db.monitor.stop_button.disabled
    # the grid: every validation step folder, the base row, the prompt library
    val = [e["step"] for e in _events(out, "preview") if e["request_id"] is None]
    assert db.grid.available_steps() == val and val[0] == 0 and db.grid.prompts() == ["cat", "cup"]
    assert db.grid.table()["cat"][-1] == str(out / "previews" / "step-000000" / "base__cat.png")
    # the live guidance preview: the trainer's request answer, side by side
    ans = next(e for e in _events(out, "preview") if e["request_id"] == rid)
    s = db.guidance.shown()
    assert (s["source"], s["step"], s["guidance"]) == ("run", ans["step"], [1.0, 4.0])
    assert sorted(s["names"]) == sorted(Path(n).stem for n in ans["images"]) and "cat__g4" in s["names"]
    g1, g4 = (_decode(c.children[0].value) for c in db.guidance.images.children if "cat ·" in c.children[1].value)
    assert g1.size == (64, 64) and g1.tobytes() != g4.tobytes()  # guidance changes the image
    # buckets: histogram, the 6 files max_num_samples left out, captions from the scan
    assert db.inspector.histogram() == [("64x64", 4)]
    assert [r["code"] for r in db.inspector.report_rows(level="skip")] == ["max_num_samples"] * 6
    assert db.inspector.caption("astronaut") == (tmp_path / "datasets" / "flux2-sample" / "astronaut.txt").read_text().strip()
    # after the run: Preview renders from the latest checkpoint in this process, writing nothing into the run
    n_events = len(_events(out, "message"))
    db.guidance.values.value = [2.5]
    db.guidance.preview_button.click(); db.guidance.wait(180)
    assert db.all_errors() == []
    s = db.guidance.shown()
    assert (s["source"], s["step"], sorted(s["names"])) == ("render", end["step"], ["cat__g2p5", "cup__g2p5"])
    assert ck.name in db.guidance.preview_note.value and len(_events(out, "message")) == n_events


def test_sigkilled_run_is_seen_dead_and_preview_falls_back_to_its_checkpoint(tmp_path):
    # a real flux2-tiny run in another process, frozen with a preview request pending, then killed outright (no run_end)
    import signal
    from flux2_kit.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints
    from flux2_kit.runlog import read_events
    from flux2_kit.tiny import tiny_config
    wd = tmp_path / "k"
    over = dict(max_train_steps=400, checkpointing_steps=2, checkpoints_total_limit=1)
    cfg = tiny_config(wd, **over)
    spec = tmp_path / "k.json"
    spec.write_text(json.dumps(dict(workdir=str(wd), overrides=over, sleep=0.2)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "trainer_child.py"), str(spec)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out, ck_root = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    mon, gp = TrainingMonitor(out), GuidancePanel(out, config=cfg, threaded=False)
    try:
        assert _until(lambda: bool(list_checkpoints(ck_root)) and mon.refresh() >= 0 and len(mon.losses()) >= 2, 300), \
            proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint"
        gp.refresh()
        assert mon.status == "running" and mon.lost is None and gp.live
        os.kill(proc.pid, signal.SIGSTOP)  # frozen (still alive): the request is sent and stays pending
        rid = gp.request(2.0)
        assert [r["id"] for r in gp.pending_requests()] == [rid]
        proc.send_signal(signal.SIGKILL); proc.wait()
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "run_end" not in [e["type"] for e in read_events(out / "events.jsonl")]
    mon.refresh(); gp.refresh()
    assert mon.lost == "dead" and mon.status == "stopped unexpectedly (no run_end)"
    assert mon.stop_button.disabled and mon.progress.bar_style == "danger"
    assert not gp.live and gp.pending_requests() == [] and rid in gp.unserved
    assert "unanswered" in gp.preview_note.value and "latest checkpoint" in gp.preview_note.value
    assert gp.request(2.0) is None  # not sent to the dead run: rendered from its latest checkpoint here
    shown = gp.shown()
    assert shown["source"] == "render" and shown["guidance"] == [2.0] and shown["names"]
    assert shown["step"] == checkpoint_step(latest_checkpoint(ck_root)) >= 2
    assert gp.errors == [] and mon.errors == []
