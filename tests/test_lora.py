"LoRA exports reproduce the in-memory model's images through diffusers' own loaders (dev and klein)."
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flux2_kit.lora import (build_lora, from_comfyui, lora_deltas, lora_scales, lora_state_dict, save_comfyui,
                            save_lora, to_comfyui)
from flux2_kit.tiny import pipeline_class

torch.set_num_threads(1)  # the test box's cores are shared; oversubscribed threads are much slower

CALL = dict(height=64, width=64, num_inference_steps=3, max_sequence_length=64)


def _images(pipe, seed=3):
    return pipe(prompt="a red house", guidance_scale=3.5, generator=torch.Generator().manual_seed(seed),
                output_type="np", **CALL).images


def _trained_pipe(path, flavour, preset="all", alpha=32):
    "A pipeline whose transformer carries a LoRA with random, non-zero weights (scale 8: a visible change)."
    pipe = pipeline_class(flavour).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    build_lora(pipe.transformer, preset, rank=4, alpha=alpha, init=False)
    return pipe


@pytest.fixture(scope="module", params=["dev", "klein"])
def trained(request, tiny_dev, tiny_klein):
    path = tiny_dev if request.param == "dev" else tiny_klein
    pipe = _trained_pipe(path, request.param)
    return request.param, path, pipe, _images(pipe)


def _fresh(flavour, path):
    pipe = pipeline_class(flavour).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_lora_changes_images(trained):
    flavour, path, pipe, imgs = trained
    base = _images(_fresh(flavour, path))
    assert np.abs(base - imgs).mean() > 1e-2  # otherwise the reproduction tests below prove nothing


def test_diffusers_export_reproduces_images(trained, tmp_path):
    flavour, path, pipe, imgs = trained
    f = save_lora(pipe.transformer, tmp_path)
    fresh = _fresh(flavour, path)
    fresh.load_lora_weights(str(tmp_path), weight_name=f.name)
    np.testing.assert_allclose(_images(fresh), imgs, atol=1e-5)
    cfg = fresh.transformer.peft_config[next(iter(fresh.transformer.peft_config))]
    assert (cfg.r, cfg.lora_alpha) == (4, 32)  # rank and alpha travelled as metadata


def test_comfyui_export_reproduces_images_through_diffusers_converter(trained, tmp_path):
    flavour, path, pipe, imgs = trained
    f = save_comfyui(pipe.transformer, tmp_path / "lora_comfy.safetensors")
    sd = load_file(f)
    assert all(k.startswith("diffusion_model.") for k in sd)
    assert "diffusion_model.double_blocks.1.img_attn.qkv.lora_A.weight" in sd
    assert "diffusion_model.single_blocks.0.linear1.lora_B.weight" in sd
    assert not any(k.endswith(".alpha") for k in sd)  # diffusers' converter refuses alpha keys
    fresh = _fresh(flavour, path)
    fresh.load_lora_weights(str(f))  # diffusers detects the BFL layout and converts it itself
    np.testing.assert_allclose(_images(fresh), imgs, atol=1e-4)


def test_comfyui_round_trip_is_lossless(trained):
    flavour, path, pipe, imgs = trained
    sd, scales = lora_state_dict(pipe.transformer), lora_scales(pipe.transformer)
    assert set(scales.values()) == {8.0}
    back = from_comfyui(to_comfyui(sd, scales))
    assert set(back) == set(sd)
    want, got = lora_deltas(sd, scales), lora_deltas(back)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
        assert want[k].abs().max() > 1e-3


def test_round_trip_through_file_with_alpha_keys(tiny_dev, tmp_path):
    pipe = _trained_pipe(tiny_dev, "dev", preset="attention", alpha=2)
    sd, scales = lora_state_dict(pipe.transformer), lora_scales(pipe.transformer)
    f = save_comfyui(pipe.transformer, tmp_path / "with_alpha.safetensors", write_alpha=True)
    loaded = load_file(f)
    assert float(loaded["diffusion_model.double_blocks.0.img_attn.qkv.alpha"]) == pytest.approx(3 * 2.0)
    got, want = lora_deltas(from_comfyui(loaded)), lora_deltas(sd, scales)
    for k in want: torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_partial_qkv_fuses_exactly(tiny_dev):
    "Only to_q and to_v targeted: the fused qkv has zero rows for k, and converts back to the same deltas."
    pipe = _trained_pipe(tiny_dev, "dev", preset=["attn.to_q", "attn.to_v"])
    sd, scales = lora_state_dict(pipe.transformer), lora_scales(pipe.transformer)
    c = to_comfyui(sd, scales)
    assert c["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"].shape == (8, 64)
    fused = lora_deltas(c)["double_blocks.0.img_attn.qkv"]
    want = lora_deltas(sd, scales)
    torch.testing.assert_close(fused[:64], want["transformer_blocks.0.attn.to_q"])
    assert not fused[64:128].any()
    torch.testing.assert_close(fused[128:], want["transformer_blocks.0.attn.to_v"])
    got = lora_deltas(from_comfyui(c))
    for k in want: torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert not got["transformer_blocks.0.attn.to_k"].any()
