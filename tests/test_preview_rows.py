"Where the LoRA goes next (issue 19): previews on a second base model, strength sweeps, strength in live requests and panels."
import numpy as np
import pytest

from flux2_kit.lora import unwrap_model
from flux2_kit.panels import ValidationGrid, checkpoint_renderer
from flux2_kit.runlog import read_events, request_preview
from flux2_kit.trainer import Callback, Trainer
from flux2_kit.tiny import tiny_config

arr = lambda im: np.asarray(im, dtype=float)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "A klein-base LoRA run previewed on flux2-tiny's distilled klein sibling, with a strength sweep, after 2 steps."
    tmp = tmp_path_factory.mktemp("rows")
    t = Trainer(tiny_config(tmp, "klein", validation_lora_scales=[0, 0.5, 1.5], validation_model="flux2-tiny:klein-distilled",
                            validation_num_inference_steps=3, max_train_steps=2, learning_rate=5e-2), progress=False)
    t.cache(); t.build_lora(); t.train_epoch()
    t.preview()  # builds the second model's pipeline
    calls = {"base": 0, "second": 0}
    hooks = [unwrap_model(t.transformer).register_forward_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1)),
             t._second["pipe"].transformer.register_forward_hook(lambda *a: calls.__setitem__("second", calls["second"] + 1))]
    t.base_preview = t.base_preview_on = None  # render everything once more, counting the forwards
    ims = t.preview()
    for h in hooks: h.remove()
    yield t, ims, calls
    t.finish()


def test_previews_on_a_second_base_use_its_own_steps_and_differ(run):
    t, ims, calls = run
    assert t._second["steps"] == 4 and t._second["guidance"] == 1.0  # a distilled klein: 4 steps, no CFG
    assert calls["second"] == 2 * 2 * 4  # 2 prompts x (base row + LoRA row) x its 4 steps, without CFG
    # the trained base: 2 prompts x 3 steps x 2 (CFG at guidance 4) x (LoRA, base, 3 strengths)
    assert calls["base"] == 2 * 3 * 2 * 5
    on, on_base, here = arr(ims["on-klein-distilled__cat"]), arr(ims["base__on-klein-distilled__cat"]), arr(ims["cat"])
    assert np.abs(on - here).mean() > 1 and np.abs(on - on_base).mean() > 0.05  # another model; the LoRA is applied there


def test_strength_zero_is_the_base_model_and_the_grid_shows_every_row(run):
    t, ims, _ = run
    assert np.array_equal(arr(ims["cat__s0"]), arr(ims["base__cat"]))
    assert not np.array_equal(arr(ims["cat__s1p5"]), arr(ims["cat"]))
    from PIL import Image
    grid = Image.open(t.rundir.preview_dir(2) / "grid.png")
    assert grid.size[1] > 7 * 64  # base, step, x0, x0.5, x1.5, second base, second + LoRA
    vg = ValidationGrid(t.rundir.root)
    vg.refresh()
    assert list(vg.extra_rows(2)) == ["LoRA x0", "LoRA x0.5", "LoRA x1.5", "klein-distilled + LoRA", "klein-distilled base"]
    assert sorted(vg.extra_rows(2)["LoRA x0.5"]) == ["cat", "cup"]


def test_a_live_request_carries_the_strength(tmp_path):
    class Ask(Callback):
        order = 65
        def after_step(self, t):
            if t.step == 1: request_preview(t.rundir.control_path, [4.0], scale=0.5)
    t = Trainer(tiny_config(tmp_path, max_train_steps=2), callbacks=[Ask()], progress=False)
    t.fit()
    ev = [e for e in read_events(t.rundir.events_path, types=["preview"]) if e.get("request_id") == 1]
    assert ev and ev[0]["scale"] == 0.5
    assert sorted(i for i in ev[0]["images"] if not i.startswith("base__")) == ["cat__g4__s0p5.png", "cup__g4__s0p5.png"]
    render = checkpoint_renderer(t.cfg)  # and after the run, from its checkpoint
    a, b = render([4.0]), render([4.0], scale=0.0)
    assert sorted(a) == ["cat__g4", "cup__g4"] and sorted(b) == ["cat__g4__s0", "cup__g4__s0"]
