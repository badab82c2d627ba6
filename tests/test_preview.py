"Previews from cached embeds equal the real pipelines' output with their text encoders (klein CFG, edit references)."
import numpy as np
import pytest
import torch
from PIL import Image

from flux2_kit.lora import build_lora
from flux2_kit.preview import make_grid, preview, validation_pipeline
from flux2_kit.tiny import pipeline_class

torch.set_num_threads(1)  # the test box's cores are shared; oversubscribed threads are much slower

LIB = {"house": "a red house", "boat": "a boat at sea"}


def _pipe(path, flavour):
    pipe = pipeline_class(flavour).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    build_lora(pipe.transformer, "all", rank=4, alpha=32, init=False)
    return pipe


def _embeds(pipe, prompts):
    return {p: pipe.encode_prompt(p, max_sequence_length=64)[0][0] for p in prompts}


def test_klein_cfg_preview_equals_pipeline_with_text_encoder(tiny_klein):
    full = _pipe(tiny_klein, "klein")
    embeds = _embeds(full, list(LIB.values()) + [""])  # "" is klein's negative prompt
    pipe = validation_pipeline(full.transformer, full.vae, full.scheduler)
    assert type(pipe).__name__ == "Flux2KleinPipeline" and pipe.text_encoder is None
    imgs = preview(pipe, LIB, embeds, seed=5, guidance=4.0, resolution="64x64", steps=3)
    for name, prompt in LIB.items():
        ref = full(prompt=prompt, max_sequence_length=64, height=64, width=64, num_inference_steps=3,
                   guidance_scale=4.0, generator=torch.Generator().manual_seed(5)).images[0]
        assert np.array_equal(np.asarray(imgs[name]), np.asarray(ref)), name
    no_neg = {p: e for p, e in embeds.items() if p}
    with pytest.raises(KeyError, match="cache embeds for ''"):
        preview(pipe, LIB, no_neg, guidance=4.0, resolution=64, steps=2)
    preview(pipe, LIB, no_neg, guidance=1.0, resolution=64, steps=2)  # no CFG, no negative needed


def test_edit_preview_with_reference_equals_pipeline(tiny_dev):
    full = _pipe(tiny_dev, "dev")
    embeds = _embeds(full, LIB.values())
    rng = np.random.default_rng(0)
    ref_img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    pipe = validation_pipeline(full.transformer, full.vae, full.scheduler)
    imgs = preview(pipe, {"house": LIB["house"]}, embeds, seed=1, guidance=2.0, resolution=64, steps=2,
                   ref_images={"house": [ref_img]})
    ref = full(prompt=LIB["house"], image=[ref_img], max_sequence_length=64, height=64, width=64,
               num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(1)).images[0]
    assert np.array_equal(np.asarray(imgs["house"]), np.asarray(ref))
    plain = preview(pipe, {"house": LIB["house"]}, embeds, seed=1, guidance=2.0, resolution=64, steps=2)
    assert not np.array_equal(np.asarray(plain["house"]), np.asarray(imgs["house"]))  # the reference mattered


def test_grid_rows_base_first_then_steps(tiny_dev, tmp_path):
    full = _pipe(tiny_dev, "dev")
    embeds = _embeds(full, LIB.values())
    pipe = validation_pipeline(full.transformer, full.vae, full.scheduler)
    kw = dict(seed=0, guidance=4.0, resolution=(64, 32), steps=2)
    rows = [("base", preview(pipe, LIB, embeds, use_lora=False, **kw)), ("step 10", preview(pipe, LIB, embeds, **kw))]
    grid = make_grid(rows)
    grid.save(tmp_path / "grid.png")
    g = np.asarray(Image.open(tmp_path / "grid.png"))
    assert rows[0][1]["house"].size == (64, 32)
    h, w = g.shape[:2]
    # cells are laid out right of the label column and below the header, 4 px apart: the last one is "step 10"/"boat"
    assert np.array_equal(g[h - 36:h - 4, w - 68:w - 4], np.asarray(rows[1][1]["boat"]))
    assert np.array_equal(g[h - 72:h - 40, w - 136:w - 72], np.asarray(rows[0][1]["house"]))
    assert not np.array_equal(np.asarray(rows[0][1]["boat"]), np.asarray(rows[1][1]["boat"]))
    full.transformer.train()
    preview(pipe, LIB, embeds, **kw)
    assert full.transformer.training  # preview put it back in train mode
