"""The Dashboard in a real browser: Voila serves tests/panels_browser.ipynb on 127.0.0.1, Debian's Chromium (driven by
Python Playwright) watches a 2-process flux2-tiny run started with `launch(block=False)` and steers it.

The page must show loss points and a validation grid; moving the preview guidance slider and pressing Preview must
bring a new side-by-side preview rendered by the live run at that guidance (control.json, rank 0 between steps);
Stop must end the run with a committed checkpoint. Screenshots go to build/screenshots/ (the test prints the folder).
Without /usr/bin/chromium or voila the test skips, except under CI (or FLUX2_KIT_REQUIRE_CHROMIUM=1), where it fails:
install Chromium with `apt-get install -y chromium` (never `playwright install`) and voila with the dev requirements.
"""
import os, re, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest

from browser_util import ARGS, CHROMIUM, need as _need

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "tests" / "panels_browser.ipynb"
SCREENS = ROOT / "build" / "screenshots"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc, timeout: float = 60) -> bool:
    "True once the server accepts connections (a GET of the page would already start the notebook's kernel)."
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None: return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1): return True
        except OSError: time.sleep(0.3)
    return False


@pytest.fixture
def voila(tmp_path):
    "Voila serving the notebook; the run's work folder is tmp_path/work. Ends the run and the server afterwards."
    try: import voila  # noqa: F401
    except ImportError: _need(False, "voila is not installed (pip install voila)")
    work = tmp_path / "work"
    port = _free_port()
    env = dict(os.environ, FLUX2_KIT_PANELS_WORKDIR=str(work), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "voila.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}",
                             "--Voila.ip=127.0.0.1", "--show_tracebacks=True", "--VoilaConfiguration.theme=light"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert _wait_listening(port, proc), "voila did not start:\n" + (tmp_path / "voila.log").read_text()[-3000:]
        yield dict(url=f"http://127.0.0.1:{port}/", work=work, log=tmp_path / "voila.log")
    finally:
        run = work / "output"
        pid_file = work / "launcher.pid"
        if pid_file.exists():  # the run this test started: ask it to stop, then end its process group
            pid = int(pid_file.read_text())
            if _alive(pid):
                from flux2_kit.runlog import write_control
                write_control(run / "control.json", stop=True)
                t = time.time()
                while _alive(pid) and time.time() - t < 30: time.sleep(0.5)
                if _alive(pid):
                    try: os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError: pass
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(20)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    try:  # a zombie (exited, not reaped by the dead kernel) counts as ended
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError: return False


def test_dashboard_in_browser_steers_two_process_run(voila):
    _need(Path(CHROMIUM).exists(), f"{CHROMIUM} not found: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright
    from flux2_kit.checkpoint import latest_checkpoint, load_checkpoint
    from flux2_kit.runlog import read_events
    SCREENS.mkdir(parents=True, exist_ok=True)
    for f in SCREENS.glob("panels-*.png"): f.unlink()  # no stale screenshot from an earlier run
    print(f"\nscreenshots: {SCREENS}")
    t0 = time.time()
    run = voila["work"] / "output"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(voila["url"], timeout=180_000, wait_until="load")
            tabs = page.locator(".lm-TabBar-tabLabel")
            tabs.filter(has_text="Training").wait_for(timeout=180_000)

            # loss points: the monitor's header shows the loss of step >= 3 and the plot
            header = page.locator(".widget-html", has_text="ETA").first
            page.wait_for_function("""() => [...document.querySelectorAll('.widget-html')].some(
                e => /step (\\d+)\\/100000/.test(e.textContent) && +e.textContent.match(/step (\\d+)\\/100000/)[1] >= 3
                     && /loss \\d/.test(e.textContent))""", timeout=180_000)
            assert "running" in header.inner_text()
            page.wait_for_function("""() => [...document.querySelectorAll('.widget-html')].some(
                e => /(\\d+) loss points/.test(e.textContent) && +e.textContent.match(/(\\d+) loss points/)[1] >= 3)""",
                timeout=60_000)  # the plot on display holds >= 3 points
            page.screenshot(path=str(SCREENS / "panels-1-training.png"), full_page=True)

            # the validation grid: thumbnails of at least one checkpoint plus the base model's row
            tabs.filter(has_text="Validation").click()
            page.wait_for_function("""() => [...document.querySelectorAll('.widget-html')].some(
                e => /([2-9]|\\d\\d+) checkpoint\\(s\\) with previews · 2 prompt\\(s\\)/.test(e.textContent))""", timeout=120_000)
            page.get_by_role("button", name="base · cat").wait_for(timeout=30_000)
            page.get_by_role("button", name="cat", exact=True).first.click()  # enlarge
            page.locator(".widget-html", has_text="previews/step-").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENS / "panels-2-validation.png"), full_page=True)

            # move the preview guidance slider, press Preview: the live run renders at that guidance
            tabs.filter(has_text="Guidance").click()
            slider = page.locator(".widget-slider", has_text="guidance").first
            readout = slider.locator(".widget-readout")
            before = float(readout.inner_text())
            handle = slider.locator(".noUi-handle")
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 60, box["y"] + box["height"] / 2, steps=6)
            page.mouse.up()
            page.wait_for_function("(b) => parseFloat(document.querySelector('.widget-slider .widget-readout')"
                                   ".textContent) !== b", arg=before, timeout=10_000)
            assert float(readout.inner_text()) > before
            page.wait_for_timeout(1_000)  # let the slider's last value reach the kernel (updates are throttled)
            page.get_by_role("button", name="Preview").click()
            # the kernel's request line says which guidance it asked the run for (the slider value it had on the click)
            req = page.locator(".widget-html", has_text="request #1").first
            req.wait_for(timeout=60_000)
            g = float(re.search(r"guidance ([\d.]+)", req.inner_text()).group(1))
            assert g > before, (g, before)
            page.get_by_text(f"cat · g={g:g}", exact=True).wait_for(timeout=120_000)
            page.get_by_text(f"cup · g={g:g}", exact=True).wait_for(timeout=10_000)
            page.screenshot(path=str(SCREENS / "panels-3-guidance.png"), full_page=True)

            # Stop: the run checkpoints and ends; the monitor says so
            tabs.filter(has_text="Training").click()
            page.get_by_role("button", name="Stop").click()
            page.wait_for_function("""() => [...document.querySelectorAll('.widget-html')].some(
                e => /^stopped · step \\d+/.test(e.textContent.trim()))""", timeout=180_000)
            page.screenshot(path=str(SCREENS / "panels-4-stopped.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(SCREENS / "panels-failure.png"), full_page=True)
            print(voila["log"].read_text()[-6000:])
            raise
        finally:
            browser.close()
    assert errors == [], errors
    # the run directory agrees with what the page showed
    ev = read_events(run / "events.jsonl")
    end = [e for e in ev if e["type"] == "run_end"][-1]
    assert end["status"] == "stopped"
    ck = latest_checkpoint(run / "checkpoints")
    assert ck is not None and load_checkpoint(ck)["step"] == end["step"]
    ans = [e for e in ev if e["type"] == "preview" and e.get("request_id") == 1]
    assert len(ans) == 1 and ans[0]["guidance"] == [g]
    assert [e["action"] for e in ev if e["type"] == "control" and e["action"] != "preview_now"] == ["stop"]
    print(f"browser test: {time.time() - t0:.0f} s, stopped at step {end['step']}, checkpoint {ck.name}")
