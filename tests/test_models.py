"flux2_kit.models on flux2-tiny: encoder diet parity with the real pipelines, precision, offloading, freeing memory."
import json, shutil
from types import SimpleNamespace

import pytest
import torch

from flux2_kit.models import (encode_prompts, free, load_text_encoder, load_text_encoder_from_config, load_transformer,
                              load_transformer_from_config, load_vae, load_vae_from_config, rss_bytes, token_lengths)

PROMPTS = ["a photo of a cat", "", "a red bicycle leaning on a wall at dusk, film grain, 35mm, shallow depth of field, "
           "a street cafe behind it with people reading newspapers under striped awnings " * 3]


def _pipe(path, flavour):
    from flux2_kit.tiny import pipeline_class
    return pipeline_class(flavour).from_pretrained(path)  # the whole pipeline, loaded independently of flux2_kit


@pytest.fixture(scope="module")
def dev_pipe(tiny_dev): return _pipe(tiny_dev, "dev")


@pytest.fixture(scope="module")
def klein_pipe(tiny_klein): return _pipe(tiny_klein, "klein")


@pytest.mark.parametrize("max_length", [64, 512])
def test_dev_diet_equals_pipeline(tiny_dev, dev_pipe, max_length):
    enc = load_text_encoder(tiny_dev, "dev", max_length=max_length, device="cpu")
    assert type(enc.model).__name__ == "MistralModel" and len(enc.model.layers) == 30
    ref = dev_pipe.encode_prompt(PROMPTS, max_sequence_length=max_length)[0]
    out = encode_prompts(enc, PROMPTS)
    assert out.shape == (3, max_length, 48)
    assert torch.equal(out, ref)  # bit for bit
    if max_length == 64: assert token_lengths(enc, PROMPTS)[2] > 64  # the long prompt really is truncated


@pytest.mark.parametrize("max_length", [64, 512])
def test_klein_diet_equals_pipeline(tiny_klein, klein_pipe, max_length):
    enc = load_text_encoder(tiny_klein, "klein-4b", max_length=max_length, device="cpu")
    assert type(enc.model).__name__ == "Qwen3Model" and len(enc.model.layers) == 27
    assert torch.equal(encode_prompts(enc, PROMPTS), klein_pipe.encode_prompt(PROMPTS, max_sequence_length=max_length)[0])


def test_diet_keeps_final_norm_when_last_layer_is_read(tiny_dev, tiny_klein, dev_pipe, klein_pipe):
    enc = load_text_encoder(tiny_dev, "dev", layers=(10, 20, 40), max_length=64, device="cpu")
    assert not isinstance(enc.model.norm, torch.nn.Identity)
    ref = dev_pipe.encode_prompt(PROMPTS, max_sequence_length=64, text_encoder_out_layers=(10, 20, 40))[0]
    assert torch.equal(encode_prompts(enc, PROMPTS), ref)
    k = load_text_encoder(tiny_klein, "klein", layers=(5, 36), max_length=64, device="cpu")
    ref = klein_pipe.encode_prompt(PROMPTS, max_sequence_length=64, text_encoder_out_layers=(5, 36))[0]
    assert torch.equal(encode_prompts(k, PROMPTS), ref)


def test_diet_summary_counts(tiny_dev, tiny_klein):
    for path, flavour, layers, depth in ((tiny_dev, "dev", 30, 40), (tiny_klein, "klein", 27, 36)):
        diet = load_text_encoder(path, flavour, device="cpu")
        full = load_text_encoder(path, flavour, diet=False, device="cpu")
        s = diet.summary
        assert (s.layers_loaded, s.layers_full) == (layers, depth)
        assert s.params_full == full.summary.params_loaded == full.summary.params_full
        assert s.params_loaded < s.params_full
        assert f"{s.params_loaded:,} of {s.params_full:,} params" in str(s)
        print(f"\n{flavour}: {s}\n{flavour} full: {full.summary}")


def test_newer_mistral3_checkpoint_layout(tiny_dev, dev_pipe, tmp_path):
    "Checkpoints saved as `model.language_model.*` (newer transformers) load under the diet too."
    from safetensors.torch import load_file, save_file
    dst = tmp_path / "m"
    shutil.copytree(tiny_dev, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    sd = load_file(str(tiny_dev / "text_encoder" / "model.safetensors"))
    ren = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
           "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}
    new = {}
    for k, v in sd.items():
        pre = next(p for p in ren if k.startswith(p))
        new[ren[pre] + k[len(pre):]] = v
    assert any(k.startswith("model.language_model.layers.") for k in new)
    save_file(new, str(dst / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    enc = load_text_encoder(dst, "dev", max_length=64, device="cpu")
    assert torch.equal(encode_prompts(enc, PROMPTS), dev_pipe.encode_prompt(PROMPTS, max_sequence_length=64)[0])


@pytest.mark.parametrize("flavour", ["dev", "klein"])
def test_quantised_encoders_error(tiny_dev, tiny_klein, flavour):
    path = tiny_dev if flavour == "dev" else tiny_klein
    ref = encode_prompts(load_text_encoder(path, flavour, max_length=64, device="cpu"), PROMPTS)
    errs = {}
    for prec in ("int8-quanto", "int4-quanto"):
        enc = load_text_encoder(path, flavour, precision=prec, max_length=64, device="cpu")
        assert type(enc.model.layers[0].mlp.up_proj).__name__ == "QLinear"
        out = encode_prompts(enc, PROMPTS)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        errs[prec] = ((out - ref).norm() / ref.norm()).item()
    print(f"\n{flavour} embeds relative L2 error vs fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in errs.items()))
    assert 0 < errs["int8-quanto"] < 0.05  # measured ~0.007 on random tiny weights
    assert errs["int8-quanto"] < errs["int4-quanto"] < 0.5  # measured ~0.13-0.2


def test_bf16_and_default_dtype(tiny_klein):
    enc = load_text_encoder(tiny_klein, "klein", default_dtype="bf16", max_length=32, device="cpu")
    assert enc.model.dtype == torch.bfloat16 and encode_prompts(enc, ["a"]).dtype == torch.bfloat16
    q = load_text_encoder(tiny_klein, "klein", precision="int8-quanto", default_dtype="bf16", max_length=32, device="cpu")
    assert q.model.embed_tokens.weight.dtype == torch.bfloat16
    assert "bfloat16" in q.identity and q.identity != enc.identity


def test_group_offload_leaf_level(tiny_klein, klein_pipe):
    enc = load_text_encoder(tiny_klein, "klein", max_length=64, device="cpu", group_offload=True,
                            group_offload_type="leaf_level")
    from diffusers.hooks.group_offloading import _is_group_offload_enabled
    assert _is_group_offload_enabled(enc.model)
    assert torch.equal(encode_prompts(enc, PROMPTS), klein_pipe.encode_prompt(PROMPTS, max_sequence_length=64)[0])
    with pytest.raises(ValueError, match="group_offload_blocks_per_group=0"):
        load_text_encoder(tiny_klein, "klein", device="cpu", group_offload=True, group_offload_blocks_per_group=0)


def test_from_config_objects(tiny_dev):
    cfg = SimpleNamespace(pretrained_model_name_or_path=str(tiny_dev), model_flavour="dev",
                          text_encoder_1_precision="int8-quanto", base_model_precision="int4-quanto",
                          base_model_default_dtype="bf16", tokenizer_max_length=77, quantize_via="accelerator",
                          enable_group_offload=True, group_offload_text_encoder=True, group_offload_vae=True,
                          group_offload_blocks_per_group=2, offload_during_startup=True, vae_dtype="default")
    enc = load_text_encoder_from_config(cfg, device="cpu")
    assert (enc.max_length, enc.summary.precision) == (77, "int8-quanto")
    assert any("quantize_via='accelerator'" in n for n in enc.summary.notes)
    assert any("group offloading" in n for n in enc.summary.notes)
    tr = load_transformer_from_config(cfg, device="cpu")
    assert tr.flux2_kit_summary.precision == "int4-quanto" and tr.dtype == torch.bfloat16
    vae = load_vae_from_config(cfg, device="cpu")
    assert vae.dtype == torch.float32 and any("group offloading" in n for n in vae.flux2_kit_summary.notes)
    empty = SimpleNamespace(pretrained_model_name_or_path=str(tiny_dev))  # every other key at its default
    assert load_text_encoder_from_config(empty, device="cpu").layers == (10, 20, 30)


def test_clear_errors(tiny_dev, tiny_klein):
    with pytest.raises(ValueError, match="set model_flavour to klein-4b/klein-9b"):
        load_text_encoder(tiny_klein, "dev", device="cpu")
    with pytest.raises(ValueError, match="text_encoder_1_precision='int3-quanto'"):
        load_text_encoder(tiny_dev, "dev", precision="int3-quanto")
    with pytest.raises(ValueError, match="base_model_precision='nf4-bnb'.*optimum-quanto only"):
        load_transformer(tiny_dev, precision="nf4-bnb")
    with pytest.raises(ValueError, match="model_flavour 'schnell'"):
        load_text_encoder(tiny_dev, "schnell")
    with pytest.raises(ValueError, match="layers="):
        load_text_encoder(tiny_dev, "dev", layers=(-1, 10))
    with pytest.raises(OSError, match="cannot read the text encoder config from 'no-such-org/no-such-model'"):
        load_text_encoder("no-such-org/no-such-model", "dev")  # offline hub id: a clear error, not a traceback maze
    with pytest.raises(OSError, match="cannot load the VAE"):
        load_vae(tiny_dev, subfolder="nope")


def test_free_returns_memory(tiny_dev):
    "RSS falls back after `free` (flux2-small dev, full Mistral3: ~34 MB of weights)."
    from flux2_kit.tiny import flux2_tiny
    path = flux2_tiny("dev", "small")
    free(load_text_encoder(path, "dev", diet=False, device="cpu"))  # warm-up: imports, tokenizer, allocator arenas
    before = rss_bytes()
    enc = load_text_encoder(path, "dev", diet=False, device="cpu")
    sum(float(w.sum()) for w in enc.model.parameters())  # page every weight in
    loaded = rss_bytes()
    n = free(enc)
    after = rss_bytes()
    print(f"\nweights {n / 2**20:.1f} MiB: RSS +{(loaded - before) / 2**20:.1f} MiB loaded, "
          f"+{(after - before) / 2**20:.1f} MiB after free")
    assert enc.model is None
    assert loaded - before > 0.7 * n
    assert after - before < 0.2 * (loaded - before)


def test_transformer_offload_during_startup_and_quantised_forward(tiny_klein):
    tr = load_transformer(tiny_klein, device="cpu", offload_during_startup=True)
    q = load_transformer(tiny_klein, precision="int8-quanto", device="cpu")
    from diffusers import Flux2KleinPipeline as P
    x, txt = torch.randn(1, 16, 128), torch.randn(1, 8, 48)
    kw = dict(hidden_states=x, encoder_hidden_states=txt, timestep=torch.tensor([0.5]), guidance=None,
              img_ids=P._prepare_latent_ids(torch.zeros(1, 128, 4, 4))[0], txt_ids=P._prepare_text_ids(txt)[0],
              return_dict=False)
    with torch.no_grad(): a, b = tr(**kw)[0], q(**kw)[0]
    rel = ((a - b).norm() / a.norm()).item()
    print(f"\nklein transformer int8-quanto output relative error {rel:.4f}")
    assert 0 < rel < 0.05
    assert json.dumps(str(tr.flux2_kit_summary))
