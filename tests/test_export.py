"""Adapter exports (diffusers, ComfyUI, kohya/musubi) on flux2-tiny: diffusers' own loaders reproduce the in-memory
peft output; the ComfyUI and kohya files give peft's merged weights under each target's merge rule (written out here
as our own code from comfy/weight_adapter and musubi-tuner's lora_utils) and convert back losslessly; the load
report's counts are the ones the loaders really give."""
import copy
import warnings

import pytest
import torch
from diffusers import Flux2Pipeline, Flux2Transformer2DModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from flux2_kit.export import (FILE_NAMES, adapter_delta, adapter_modules, bfl_linears, comfy_key_map, export_lora,
                              from_bfl, load_report, split_key, to_bfl)
from flux2_kit.lora import _from_bfl, build_lora, lora_scales, lora_state_dict

torch.set_num_threads(1)  # the test box's cores are shared
EPS32 = torch.finfo(torch.float32).eps


def _adapted(path, kind="lora", preset="all", alpha=32, **kw):
    "flux2-tiny's transformer with a random, non-zero adapter (rank 4; alpha 32: scale 8, far from 1)."
    torch.manual_seed(0)
    t = Flux2Transformer2DModel.from_pretrained(path / "transformer")
    build_lora(t, preset, rank=4, alpha=alpha, init=False, lora_type=kind, **kw)
    if kw.get("use_dora"):
        with torch.no_grad():
            for n, p in t.named_parameters():
                if "lora_magnitude_vector" in n: p.mul_(1 + 0.3 * torch.rand_like(p))  # not the initial norms
    return t


def _forward(t):
    "The transformer's output on a fixed small input (what a pipeline step computes)."
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 16, 128, generator=g), torch.randn(1, 8, 48, generator=g)
    guidance = torch.tensor([3.5]) if t.config.guidance_embeds else None  # klein has no guidance embedder
    with torch.no_grad():
        return t(hidden_states=x, encoder_hidden_states=txt, timestep=torch.tensor([0.5]), guidance=guidance,
                 img_ids=Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 128, 4, 4))[0],
                 txt_ids=Flux2Pipeline._prepare_text_ids(txt)[0], return_dict=False)[0]


def _diffusers_loaded(path, file, pipeline=Flux2Pipeline):
    "A fresh flux2-tiny pipeline after diffusers' own `load_lora_weights(file)`."
    pipe = pipeline.from_pretrained(path)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    return pipe


def _merged_bfl(t):
    "peft's own merge of the adapter, as BFL weights {module: W} (Q/K/V rows stacked)."
    m = copy.deepcopy(t)
    for layer in m.modules():
        if isinstance(layer, BaseTunerLayer): layer.merge()
    return _bfl_weights(m)


def _bfl_weights(t):
    def w(name):
        layer = t.get_submodule(name)
        return (layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer).weight.detach().float()
    return {b: torch.cat([w(n) for n in _from_bfl(b)]) for b in bfl_linears(2, 2)}


_QKV_ROW = {"to_q": 0, "to_k": 1, "to_v": 2, "add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}


def _comfy_merge(base, sd, profile="comfyui"):
    """ComfyUI's merge (comfy/weight_adapter: lora, lokr, loha, DoRA's weight_decompose), strength 1, float32, written
    here as our own code: each mapped module patches its BFL weight, diffusers Q/K/V names a row slice of it."""
    km, W = comfy_key_map(2, 2, profile), {k: v.clone() for k, v in base.items()}
    for x, p in adapter_modules(sd).items():
        target, rows = km[x], slice(None)
        if x.startswith("transformer.") and x.rsplit(".", 1)[-1] in _QKV_ROW:
            h = W[target].shape[0] // 3
            rows = slice(_QKV_ROW[x.rsplit(".", 1)[-1]] * h, (_QKV_ROW[x.rsplit(".", 1)[-1]] + 1) * h)
        alpha, w = p.get("alpha"), W[target][rows]
        if "lora_B.weight" in p or "lora_up.weight" in p:
            up = p.get("lora_B.weight", p.get("lora_up.weight"))
            down = p.get("lora_A.weight", p.get("lora_down.weight"))
            a, diff = (float(alpha) / down.shape[0] if alpha is not None else 1.0), up.float() @ down.float()
        elif "lokr_w1" in p or "lokr_w1_a" in p:
            dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
            a, diff = (float(alpha) / dim if alpha is not None and dim else 1.0), torch.kron(w1, w2)
        else:
            a = float(alpha) / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
            diff = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        if "dora_scale" in p:
            d = p["dora_scale"]
            assert d.shape[0] == w.shape[0]  # the output-axis branch
            W[target][rows] = (w + a * diff) * (d / (w.norm(dim=1, keepdim=True) + EPS32))
        else:
            W[target][rows] = w + a * diff
    return W


def _musubi_merge(base, sd):
    "musubi-tuner's LoRA/LoKr/LoHa merge (utils/lora_utils.py and networks/lokr.py, loha.py), multiplier 1."
    W = {k: v.clone() for k, v in base.items()}
    for b in W:
        x = "lora_unet_" + b.replace(".", "_")
        g = lambda t: sd.get(f"{x}.{t}")
        if g("lora_down.weight") is not None:
            W[b] += g("lora_up.weight") @ g("lora_down.weight") * (float(g("alpha")) / g("lora_down.weight").shape[0])
        elif g("lokr_w1") is not None:
            low = g("lokr_w2_a") is not None
            w2 = g("lokr_w2_a") @ g("lokr_w2_b") if low else g("lokr_w2")
            W[b] += torch.kron(g("lokr_w1"), w2) * (float(g("alpha")) / g("lokr_w2_a").shape[1] if low else 1.0)
        elif g("hada_w1_a") is not None:
            scale = float(g("alpha")) / g("hada_w1_b").shape[0]
            W[b] += (g("hada_w1_a") @ g("hada_w1_b")) * (g("hada_w2_a") @ g("hada_w2_b")) * scale
    return W


def _assert_weights(got, want, tol=1e-5):
    for k in want: torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=k)


def _assert_round_trip(back, t):
    "Every module's delta (DoRA: and magnitude) that `from_bfl` gives back equals peft's."
    sd, sc = lora_state_dict(t), lora_scales(t)
    b = adapter_modules(back)
    for m, p in adapter_modules(sd).items():
        torch.testing.assert_close(adapter_delta(b[m]), adapter_delta(p, sc[m]), rtol=1e-5, atol=1e-6, msg=m)
        if "lora_magnitude_vector" in p:
            torch.testing.assert_close(b[m]["lora_magnitude_vector"], p["lora_magnitude_vector"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def lora(tiny_dev, tmp_path_factory):
    t = _adapted(tiny_dev)
    out = tmp_path_factory.mktemp("lora")
    return t, export_lora(t, out), _forward(t)


def test_lora_is_visible(tiny_dev, lora):
    t, files, want = lora
    base = _forward(Flux2Transformer2DModel.from_pretrained(tiny_dev / "transformer"))
    assert (want - base).abs().max() > 1e-2  # otherwise reproducing it proves nothing


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya"])
def test_diffusers_loads_each_lora_file_and_reproduces(tiny_dev, lora, fmt):
    "diffusers reads all three layouts itself (kohya `lora_unet_` and BFL names through its FLUX.2 converters)."
    t, files, want = lora
    pipe = _diffusers_loaded(tiny_dev, files[fmt])
    torch.testing.assert_close(_forward(pipe.transformer), want, rtol=0, atol=1e-5)


def test_kohya_names_and_alpha(lora):
    t, files, want = lora
    sd = load_file(files["kohya"])
    assert len(sd) == 3 * (2 * 8 + 2 * 2)
    assert {split_key(k)[0] for k in sd if "_blocks_1_" in k} == {
        "lora_unet_double_blocks_1_" + n for n in ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
                                                    "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2")} | {
        "lora_unet_single_blocks_1_linear1", "lora_unet_single_blocks_1_linear2"}
    assert sd["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].shape == (12, 64)
    alpha = sd["lora_unet_double_blocks_0_txt_attn_qkv.alpha"]
    assert alpha.shape == () and float(alpha) == 96.0  # 3 x 32 over the fused rank 12: scale 8
    assert float(sd["lora_unet_double_blocks_0_img_mlp_2.alpha"]) == 32.0
    assert torch.equal(sd["lora_unet_double_blocks_0_img_mlp_2.lora_up.weight"],  # the trained tensor, not rescaled
                       lora_state_dict(t)["transformer_blocks.0.ff.linear_out.lora_B.weight"])


@pytest.mark.parametrize("fmt", ["comfyui", "kohya"])
def test_bfl_files_convert_back_losslessly(lora, fmt):
    t, files, want = lora
    _assert_round_trip(from_bfl(load_file(files[fmt])), t)


def test_comfyui_and_musubi_merges_give_peft_weights(tiny_dev, lora):
    t, files, want = lora
    base, merged = _bfl_weights(Flux2Transformer2DModel.from_pretrained(tiny_dev / "transformer")), _merged_bfl(t)
    for f in ("comfyui", "kohya"):
        for profile in ("comfyui", "comfyui-0.8"):
            _assert_weights(_comfy_merge(base, load_file(files[f]), profile), merged)
    _assert_weights(_musubi_merge(base, load_file(files["kohya"])), merged)
    assert max((merged[k] - base[k]).abs().max() for k in base) > 1e-2


def test_load_report_default_preset(tiny_dev, lora):
    "The report's counts; the diffusers column against diffusers' real load (adapter layers that got weights)."
    t, files, want = lora
    rows = {(r.format, r.target): r for r in load_report(files["diffusers"].parent)}
    assert {k: (r.loaded, r.keys) for k, r in rows.items()} == {
        ("diffusers", "diffusers"): (56, 56), ("diffusers", "comfyui"): (56, 56),
        ("diffusers", "comfyui-0.8"): (32, 56), ("diffusers", "musubi"): (0, 56),
        ("comfyui", "diffusers"): (40, 40), ("comfyui", "comfyui"): (40, 40),
        ("comfyui", "comfyui-0.8"): (40, 40), ("comfyui", "musubi"): (0, 40),
        ("kohya", "diffusers"): (60, 60), ("kohya", "comfyui"): (60, 60),
        ("kohya", "comfyui-0.8"): (60, 60), ("kohya", "musubi"): (60, 60)}
    lost = rows["diffusers", "comfyui-0.8"].dropped
    assert sum(".ff." in k or ".ff_context." in k for k in lost) == 16  # 4 modules x A, B x 2 double blocks
    assert sum("single_transformer_blocks" in k for k in lost) == 8  # 2 modules x A, B x 2 single blocks
    notes = [len(rows["diffusers", t].notes) for t in ("diffusers", "comfyui", "comfyui-0.8")]
    assert notes == [0, 1, 1]  # ComfyUI ignores the alpha in the metadata
    for fmt in ("diffusers", "comfyui", "kohya"):
        pipe = _diffusers_loaded(tiny_dev, files[fmt])
        assert sum(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules()) == 28
    text = files["readme"].read_text()
    assert "loads only 32 of 56 keys in ComfyUI 0.8.0 and older" in text
    assert "| ComfyUI 0.8.0 and older | `comfyui_lora.safetensors` |" in text


def test_klein_files(tiny_klein, tmp_path):
    "klein (no guidance embedder): Flux2KleinPipeline reproduces the diffusers and kohya files; same counts."
    from diffusers import Flux2KleinPipeline
    t = _adapted(tiny_klein)
    files, want = export_lora(t, tmp_path), _forward(t)
    for fmt in ("diffusers", "kohya"):
        got = _forward(_diffusers_loaded(tiny_klein, files[fmt], Flux2KleinPipeline).transformer)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    counts = {(r.format, r.target): r.loaded for r in load_report(tmp_path)}
    assert (counts["diffusers", "comfyui-0.8"], counts["kohya", "musubi"], counts["comfyui", "comfyui"]) == (32, 60, 40)


def test_dora(tiny_dev, tmp_path):
    "DoRA: diffusers loads the peft file exactly; ComfyUI's rule on the converted dora_scale gives peft's merge."
    t = _adapted(tiny_dev, use_dora=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = export_lora(t, tmp_path)
    assert set(files) == {"diffusers", "comfyui", "readme"}
    assert any("DoRA has no kohya" in str(w.message) for w in caught)
    want = _forward(t)
    got = _forward(_diffusers_loaded(tiny_dev, files["diffusers"]).transformer)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    sd = load_file(files["comfyui"])
    assert sd["diffusion_model.double_blocks.0.img_attn.qkv.dora_scale"].shape == (192, 1)
    base = Flux2Transformer2DModel.from_pretrained(tiny_dev / "transformer")
    _assert_weights(_comfy_merge(_bfl_weights(base), sd), _merged_bfl(t))
    _assert_round_trip(from_bfl(sd, base=base), t)
    rows = {(r.format, r.target): r for r in load_report(tmp_path)}
    dropped = rows["comfyui", "diffusers"].dropped  # diffusers filters dora_scale out: one per BFL module
    assert len(dropped) == 20 and all(k.endswith(".dora_scale") for k in dropped)
    assert not rows["comfyui", "comfyui"].dropped
    assert len(rows["diffusers", "comfyui"].dropped) == 28  # ComfyUI has no lora_magnitude_vector
    plain = _diffusers_loaded(tiny_dev, files["comfyui"])  # diffusers really drops dora_scale: not the trained DoRA
    assert (_forward(plain.transformer) - want).abs().max() > 1e-3


def test_lokr(tiny_dev, tmp_path):
    "LoKr: diffusers reproduces its file; ComfyUI's merge gives peft's; no kohya form on Q/K/V, one on the MLP preset."
    t = _adapted(tiny_dev, "lokr", alpha=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = export_lora(t, tmp_path / "all")
    assert set(files) == {"diffusers", "comfyui", "readme"} and "no kohya file" in files["readme"].read_text()
    got = _forward(_diffusers_loaded(tiny_dev, files["diffusers"]).transformer)
    torch.testing.assert_close(got, _forward(t), rtol=0, atol=1e-5)
    sd = load_file(files["comfyui"])
    assert "transformer.transformer_blocks.0.attn.to_q.lokr_w1" in sd  # Q/K/V: ComfyUI's row-slice names
    assert "diffusion_model.single_blocks.1.linear1.lokr_w2_a" in sd
    assert "transformer.transformer_blocks.0.attn.to_q.alpha" not in sd  # both factors full: scale baked into w1
    assert float(sd["diffusion_model.single_blocks.1.linear1.alpha"]) == 8.0
    base = _bfl_weights(Flux2Transformer2DModel.from_pretrained(tiny_dev / "transformer"))
    for profile in ("comfyui", "comfyui-0.8"): _assert_weights(_comfy_merge(base, sd, profile), _merged_bfl(t))
    _assert_round_trip(from_bfl(sd), t)
    tm = _adapted(tiny_dev, "lokr", preset="mlp", alpha=8)
    k = export_lora(tm, tmp_path / "mlp", formats=("kohya",), readme=False)["kohya"]
    _assert_weights(_musubi_merge(base, load_file(k)), _merged_bfl(tm))
    _assert_round_trip(from_bfl(load_file(k)), tm)


def test_loha(tiny_dev, tmp_path):
    "LoHa: Q/K/V fused exactly; ComfyUI's and musubi's merges give peft's; diffusers has no LoHa loader (reported)."
    t = _adapted(tiny_dev, "loha", alpha=8)
    files = export_lora(t, tmp_path)
    base, merged = _bfl_weights(Flux2Transformer2DModel.from_pretrained(tiny_dev / "transformer")), _merged_bfl(t)
    for f in ("comfyui", "kohya"):
        _assert_weights(_comfy_merge(base, load_file(files[f])), merged)
        _assert_round_trip(from_bfl(load_file(files[f])), t)
    _assert_weights(_musubi_merge(base, load_file(files["kohya"])), merged)
    assert float(load_file(files["kohya"])["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * 8.0
    with pytest.raises(ValueError, match="support LoRA and LoKr"):
        _diffusers_loaded(tiny_dev, files["diffusers"])
    rows = {(r.format, r.target): r for r in load_report(tmp_path)}
    assert all(rows[f, "diffusers"].loaded == 0 for f in ("diffusers", "comfyui", "kohya"))
    assert "| diffusers `load_lora_weights` | ⚠️ none of these files loads whole |" in files["readme"].read_text()


def test_export_refuses_unknown_format_and_names_files(tiny_dev, lora, tmp_path):
    t, files, want = lora
    assert {k: v.name for k, v in files.items()} == {**FILE_NAMES, "readme": "README.md"}
    with pytest.raises(ValueError, match="unknown: choose from"):
        export_lora(t, tmp_path, formats=("diffusers", "onnx"))
    assert not any(tmp_path.iterdir())  # checked before anything is written
    with pytest.raises(ValueError, match="'kohya'"):
        to_bfl(lora_state_dict(t), lora_scales(t), naming="musubi")
