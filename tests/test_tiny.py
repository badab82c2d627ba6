"flux2-tiny loads through the real diffusers pipelines, offline, like black-forest-labs/FLUX.2-dev would."
import json, os
import pytest
import torch
from safetensors.torch import load_file

from flux2_kit.tiny import build_flux2_tiny, pipeline_class, TEXT_LAYERS

assert os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.mark.parametrize("flavour", ["dev", "klein"])
def test_pipeline_loads_and_generates(flavour, tiny_dev, tiny_klein):
    path = tiny_dev if flavour == "dev" else tiny_klein
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == ("Flux2Pipeline" if flavour == "dev" else "Flux2KleinPipeline")
    pipe = pipeline_class(flavour).from_pretrained(path)
    te = pipe.text_encoder.config
    hidden = te.text_config.hidden_size if flavour == "dev" else te.hidden_size
    depth = te.text_config.num_hidden_layers if flavour == "dev" else te.num_hidden_layers
    assert depth > max(TEXT_LAYERS[flavour])  # more layers than it stacks: the encoder diet is testable
    embeds, text_ids = pipe.encode_prompt("a photo of a cat", device="cpu", max_sequence_length=64)
    assert embeds.shape == (1, 64, 3 * hidden)
    assert text_ids.shape == (1, 64, 4) and text_ids[0, :, 3].tolist() == list(range(64))
    assert pipe.transformer.config.joint_attention_dim == 3 * hidden
    assert pipe.transformer.config.guidance_embeds == (flavour == "dev")
    # latents: 32 channels at H/8 from the VAE, 128 after the 2x2 patchify, at H/16
    image = torch.rand(1, 3, 64, 96) * 2 - 1
    raw = pipe.vae.encode(image).latent_dist.mode()
    assert raw.shape == (1, 32, 8, 12)
    lat = pipe._encode_vae_image(image, generator=None)
    assert lat.shape == (1, 128, 4, 6)
    bn = pipe.vae.bn
    assert bn.running_mean.abs().max() > 1e-3 and (bn.running_var - 1).abs().max() > 1e-2  # non-identity stats
    # normalisation really moves values: normalised != raw patchified
    assert not torch.allclose(lat, pipe._patchify_latents(raw))
    kw = dict(guidance_scale=4.0) if flavour == "dev" else {}
    out = pipe(prompt="a photo of a cat", height=64, width=96, num_inference_steps=2, max_sequence_length=64,
               generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    assert out.shape == (1, 64, 96, 3) and torch.isfinite(torch.from_numpy(out)).all()
    assert out.std() > 0.01  # not a constant image


def test_same_seed_same_files(tmp_path):
    a = build_flux2_tiny(tmp_path / "a", "klein", seed=7)
    b = build_flux2_tiny(tmp_path / "b", "klein", seed=7)
    for sub in ("transformer", "vae", "text_encoder"):
        fa, fb = sorted((a / sub).glob("*.safetensors")), sorted((b / sub).glob("*.safetensors"))
        assert [f.name for f in fa] == [f.name for f in fb] and fa
        for x, y in zip(fa, fb):
            sa, sb = load_file(x), load_file(y)
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), sub
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_flux2_tiny(tmp_path / "a", "klein", seed=7)


def test_small_size_has_tens_of_millions_of_parameters():
    from flux2_kit.tiny import build_components
    parts = build_components("dev", "small")
    n = sum(p.numel() for p in parts["transformer"].parameters())
    assert 10e6 < n < 100e6, n
