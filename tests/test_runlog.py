"Run directory across real processes: atomic writes seen by a concurrent reader, an event log followed while written, a writer killed mid-line, control.json from a panel process."
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest

from flux2_kit.runlog import (ControlPoller, EventReader, EventWriter, RunDir, atomic_write_json, read_events,
                              request_preview, write_control)


def _child(code: str, *args, **kw) -> subprocess.Popen:
    "Start `code` in a fresh Python process (argv[1:] = args)."
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_atomic_write_never_shows_a_partial_file(tmp_path):
    "A reader polling while another process rewrites the file (sizes 0-200 kB) only ever sees whole, valid JSON."
    target = tmp_path / "state.json"
    atomic_write_json(target, {"n": -1, "pad": ""})
    writer = _child("""
        import sys, time
        from flux2_kit.runlog import atomic_write_json
        end, n = time.time() + float(sys.argv[2]), 0
        while time.time() < end:
            atomic_write_json(sys.argv[1], {"n": n, "pad": "x" * ((n % 50) * 4000)}, fsync=n % 4 == 0)
            n += 1
        print(n)
    """, target, 1.5)
    seen, reads = set(), 0
    try:
        while writer.poll() is None:
            data = json.loads(target.read_bytes())  # raises on a partial file
            assert len(data["pad"]) == (data["n"] % 50) * 4000 if data["n"] >= 0 else True, data["n"]
            seen.add(data["n"]); reads += 1
    finally:
        out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err
    assert int(out) > 20 and len(seen) > 10, (out, len(seen), reads)  # the reader really raced many rewrites
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary files left behind


def test_event_reader_follows_a_writer_in_another_process(tmp_path):
    "Every event a child appends arrives exactly once, in order, while the file grows; partial lines are never parsed."
    rd = RunDir(tmp_path / "out")
    child = _child("""
        import sys, time
        from flux2_kit.runlog import RunDir
        rd = RunDir(sys.argv[1])
        rd.log_event("run_start", step=0)
        for i in range(400):
            rd.log_event("step", step=i, loss=1.0 / (i + 1), lr=1e-4, sigma=[0.5], text="é" * (i % 7))
            if i % 50 == 0: time.sleep(0.01)
        rd.log_event("run_end", status="completed", step=399)
        rd.close()
    """, rd.root)
    r, got = rd.reader(), []
    deadline = time.time() + 60
    while not (got and got[-1]["type"] == "run_end"):
        got += r.poll()
        assert time.time() < deadline, "the child never finished"
    child.communicate(timeout=30)
    assert child.returncode == 0
    steps = [e["step"] for e in got if e["type"] == "step"]
    assert steps == list(range(400))
    assert got[0]["type"] == "run_start" and r.skipped == 0
    assert got[5]["text"] == "é" * 4 and got[5]["loss"] == pytest.approx(1 / 5)
    assert r.poll() == [] and r.offset == rd.events_path.stat().st_size


def test_writer_killed_mid_line_then_the_run_goes_on(tmp_path):
    "A process SIGKILLed after writing half a line: readers skip the fragment, and a new writer starts on a fresh line."
    log = tmp_path / "events.jsonl"
    child = _child("""
        import os, sys, time
        from flux2_kit.runlog import EventWriter
        w = EventWriter(sys.argv[1])
        for i in range(3): w.write("step", step=i, loss=0.5)
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
        os.write(fd, b'{"time": 1.0, "type": "step", "step": 3, "lo')  # the first half of a line...
        print("half", flush=True)
        time.sleep(60)  # ... and the process dies before the rest
    """, log)
    assert child.stdout.readline().strip() == "half"
    r = EventReader(log)
    assert [e["step"] for e in r.poll()] == [0, 1, 2]
    assert r.poll() == []  # the half line is not returned
    child.send_signal(signal.SIGKILL); child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    w = EventWriter(log)  # the resumed run appends
    w.write("run_start", step=3); w.write("step", step=3, loss=0.25); w.close()
    assert [(e["type"], e["step"]) for e in r.poll()] == [("run_start", 3), ("step", 3)]
    assert r.skipped == 1
    assert [e["step"] for e in read_events(log, types=["step"])] == [0, 1, 2, 3]


def test_control_from_a_panel_process_reaches_the_training_loop(tmp_path):
    "A 'panel' process requests a preview and then stop; the 'trainer' loop polls between steps and sees each once."
    rd = RunDir(tmp_path / "out")
    rd.reset_control()
    poller = rd.control_poller()
    panel = _child("""
        import sys, time
        from flux2_kit.runlog import request_preview, write_control
        time.sleep(0.2)
        print(request_preview(sys.argv[1], [1.0, 4.0]), flush=True)
        time.sleep(0.3)
        write_control(sys.argv[1], stop=True)
    """, rd.control_path)
    previews, step, deadline = [], 0, time.time() + 60
    while not poller.poll()["stop"]:
        step += 1
        if (req := poller.take_preview()) is not None: previews.append((step, req))
        time.sleep(0.005)  # a training step
        assert time.time() < deadline
    panel.communicate(timeout=30)
    assert panel.returncode == 0
    assert len(previews) == 1 and previews[0][1] == {"id": 1, "guidance": [1.0, 4.0]}
    assert 0 < previews[0][0] < step
    assert poller.error is None
    # a new run resets the stale stop
    rd.reset_control()
    assert ControlPoller(rd.control_path, served_id=1).poll()["stop"] is False


def test_only_rank_zero_writes(tmp_path):
    "Two processes run the same logging code with is_main from their rank; only rank 0 creates files."
    code = """
        import sys
        from flux2_kit.runlog import RunDir
        rank = int(sys.argv[2])
        rd = RunDir(sys.argv[1], is_main=rank == 0)
        rd.write_run_json({"lr": 1.0}, seed=1, world_size=2, rank=rank)
        for i in range(5): rd.log_event("step", step=i, loss=float(rank))
        rd.write_control(pause=True)
        rd.close()
    """
    procs = [_child(code, tmp_path / "out", rank) for rank in (0, 1)]
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == 0
    rd = RunDir(tmp_path / "out")
    assert rd.read_run_json()["rank"] == 0
    assert [e["loss"] for e in rd.events()] == [0.0] * 5
    assert rd.read_control()["pause"] is True
    assert sorted(p.name for p in rd.root.iterdir()) == ["control.json", "events.jsonl", "run.json"]
