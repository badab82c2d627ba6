"flux2_kit.cache on flux2-tiny: cached embeds/latents equal the pipelines', keys re-encode exactly what changed."
import dataclasses, json, os, subprocess, sys, warnings

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_kit.cache import (INDEX_NAME, LatentRequest, ShardStore, cache_latents, cache_text_embeds, load_rgb,
                             request_pixels, vae_identity)
from flux2_kit.models import load_text_encoder, load_vae

PROMPTS = ["a photo of a cat", "a red bicycle at dusk", "", "a photo of a cat", "a bowl of ramen, top view",
           "an old map of a harbour with ships"]


def counter(model):
    "Record the batch size of every forward call of `model` (a hook: observing, not mocking)."
    calls = []
    h = model.register_forward_hook(lambda m, a, kw, o: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    return calls, h


@pytest.fixture(scope="module")
def klein_enc(tiny_klein): return load_text_encoder(tiny_klein, "klein", max_length=64, device="cpu")


@pytest.fixture(scope="module")
def dev_enc(tiny_dev): return load_text_encoder(tiny_dev, "dev", max_length=64, device="cpu")


@pytest.mark.parametrize("flavour", ["dev", "klein"])
def test_cached_embeds_equal_pipeline(flavour, tiny_dev, tiny_klein, dev_enc, klein_enc, tmp_path):
    from flux2_kit.tiny import pipeline_class
    path, enc = (tiny_dev, dev_enc) if flavour == "dev" else (tiny_klein, klein_enc)
    pipe = pipeline_class(flavour).from_pretrained(path, transformer=None, vae=None)
    cache = cache_text_embeds(enc, PROMPTS, tmp_path, write_batch_size=2, progress=False)
    assert (cache.stats.unique, cache.stats.misses, cache.stats.shards_written) == (5, 5, 3)
    assert torch.equal(cache.batch(PROMPTS), pipe.encode_prompt(PROMPTS, max_sequence_length=64)[0])
    # and once at the pipelines' default 512 tokens
    enc512 = dataclasses.replace(enc, max_length=512)
    c512 = cache_text_embeds(enc512, PROMPTS[:2], tmp_path, progress=False)
    assert c512.stats.misses == 2 and c512["a photo of a cat"].shape == (512, 48)
    assert torch.equal(c512.batch(PROMPTS[:2]), pipe.encode_prompt(PROMPTS[:2])[0])


def test_second_run_in_a_new_process_encodes_nothing(tiny_klein, klein_enc, tmp_path):
    calls, h = counter(klein_enc.model)
    try:
        first = cache_text_embeds(klein_enc, PROMPTS, tmp_path, write_batch_size=4, progress=False)
        assert calls == [4, 1]  # 5 distinct prompts in batches of 4
    finally: h.remove()
    code = f"""
import json, torch
from flux2_kit.models import load_text_encoder
from flux2_kit.cache import cache_text_embeds
enc = load_text_encoder({str(tiny_klein)!r}, "klein", max_length=64, device="cpu")
calls = []
enc.model.register_forward_hook(lambda m, a, kw, o: calls.append(1), with_kwargs=True)
c = cache_text_embeds(enc, {PROMPTS!r}, {str(tmp_path)!r}, progress=False)
print(json.dumps(dict(calls=len(calls), hits=c.stats.hits, misses=c.stats.misses, sum=float(c.batch({PROMPTS!r}).double().sum()))))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env=env).stdout.strip().splitlines()[-1])
    assert (out["calls"], out["hits"], out["misses"]) == (0, 5, 0)
    assert out["sum"] == float(first.batch(PROMPTS).double().sum())


def test_each_key_part_reencodes_only_what_changed(tiny_klein, klein_enc, tmp_path):
    cache_text_embeds(klein_enc, PROMPTS, tmp_path, progress=False)
    q8 = load_text_encoder(tiny_klein, "klein", precision="int8-quanto", max_length=64, device="cpu")
    for changed in (q8, dataclasses.replace(klein_enc, layers=(9, 18, 26)),
                    dataclasses.replace(klein_enc, max_length=63),
                    dataclasses.replace(klein_enc, template_id="another-template"),
                    dataclasses.replace(klein_enc, identity=klein_enc.identity + "x")):
        calls, h = counter(changed.model)
        try: c = cache_text_embeds(changed, PROMPTS, tmp_path, write_batch_size=8, progress=False)
        finally: h.remove()
        assert (c.stats.hits, c.stats.misses, calls) == (0, 5, [5])
    calls, h = counter(klein_enc.model)
    try: c = cache_text_embeds(klein_enc, PROMPTS + ["one new prompt"], tmp_path, progress=False)
    finally: h.remove()
    assert (c.stats.hits, c.stats.misses, calls) == (5, 1, [1])


def test_corrupt_shards_and_index(klein_enc, tmp_path):
    first = cache_text_embeds(klein_enc, PROMPTS, tmp_path, write_batch_size=2, progress=False)
    ref = first.batch(PROMPTS)
    entries = ShardStore(tmp_path, "text_embeds").index["entries"]
    shards = [tmp_path / entries[first.keys[p]] for p in (PROMPTS[0], PROMPTS[2])]  # two shards of two prompts
    assert shards[0] != shards[1]
    raw = bytearray(shards[0].read_bytes()); raw[-3] ^= 0x01; shards[0].write_bytes(bytes(raw))  # one bit, same size
    shards[1].write_bytes(shards[1].read_bytes()[: len(shards[1].read_bytes()) // 2])  # truncated
    calls, h = counter(klein_enc.model)
    try: c = cache_text_embeds(klein_enc, PROMPTS, tmp_path, write_batch_size=2, progress=False)
    finally: h.remove()
    assert (c.stats.corrupt_shards, c.stats.misses, c.stats.hits, sum(calls)) == (2, 4, 1, 4)
    assert torch.equal(c.batch(PROMPTS), ref)
    # a torn index: everything is encoded again, nothing stale is trusted
    (tmp_path / INDEX_NAME).write_text((tmp_path / INDEX_NAME).read_text()[:40])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        c = cache_text_embeds(klein_enc, PROMPTS, tmp_path, progress=False)
    assert c.stats.misses == 5 and any("unreadable" in str(x.message) for x in w)
    assert torch.equal(c.batch(PROMPTS), ref)
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_header_verification_catches_truncation_not_bitflips(klein_enc, tmp_path):
    cache_text_embeds(klein_enc, PROMPTS[:2], tmp_path, progress=False)
    shard = next(tmp_path.glob("*.safetensors"))
    raw = bytearray(shard.read_bytes()); raw[-3] ^= 0x01; shard.write_bytes(bytes(raw))
    assert cache_text_embeds(klein_enc, PROMPTS[:2], tmp_path, verify="header", progress=False).stats.misses == 0
    assert cache_text_embeds(klein_enc, PROMPTS[:2], tmp_path, verify="sha256", progress=False).stats.misses == 2
    shard = next(tmp_path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert cache_text_embeds(klein_enc, PROMPTS[:2], tmp_path, verify="header", progress=False).stats.misses == 2


def test_truncated_prompts_reported(dev_enc, tmp_path):
    long = "a very long description of a sunlit kitchen, " * 20
    with pytest.warns(UserWarning, match="exceed max_length=64"):
        c = cache_text_embeds(dev_enc, [long, "short"], tmp_path, progress=False)
    assert c.stats.truncated == 1 and "1 prompt(s) truncated" in str(c.stats)


# ---- latents ----

def _image(path, w, h, seed, **save):
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    a = np.stack([np.sin(7 * xx + seed), np.cos(5 * yy - seed), np.sin(3 * (xx - yy) + 1)], -1) * 0.4 + 0.5
    img = Image.fromarray((np.clip(a + g.normal(0, 0.02, a.shape), 0, 1) * 255).astype(np.uint8))
    img.save(path, **save)
    return path


@pytest.fixture()
def images(tmp_path):
    d = tmp_path / "imgs"; d.mkdir()
    exif = Image.Exif(); exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    return [_image(d / "a.png", 96, 80, 0), _image(d / "b.jpg", 80, 128, 1, quality=95),
            _image(d / "c.png", 64, 64, 2), _image(d / "rot.jpg", 128, 64, 3, exif=exif, quality=95)]


@pytest.mark.parametrize("flavour", ["dev", "klein"])
def test_latents_equal_pipeline_and_decode_round_trip(flavour, tiny_dev, tiny_klein, images, tmp_path):
    from flux2_kit.tiny import pipeline_class
    P = pipeline_class(flavour)
    path = tiny_dev if flavour == "dev" else tiny_klein
    vae = load_vae(path, device="cpu")
    pipe = P.from_pretrained(path, text_encoder=None, tokenizer=None, transformer=None)
    reqs = [LatentRequest(images[0], (0, 0, 96, 80), (96, 80)), LatentRequest(images[1], (0, 24, 80, 104), (64, 64)),
            LatentRequest(images[2], (0, 0, 64, 64), (64, 64)), LatentRequest(images[3], (0, 0, 64, 128), (32, 64))]
    shapes = []
    h = vae.encoder.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
    try: lc = cache_latents(vae, reqs, tmp_path / "vae", vae_batch_size=2, write_batch_size=3, progress=False)
    finally: h.remove()
    assert sorted(shapes) == sorted([(1, 3, 64, 32), (2, 3, 64, 64), (1, 3, 80, 96)])  # only same sizes batched
    assert lc.stats.shards_written == 2 and lc[reqs[3]].shape == (128, 4, 2)
    for group in ([reqs[0]], reqs[1:3], [reqs[3]]):  # the pipeline's own encoding of the same pixels and batches
        with torch.no_grad():
            ref = pipe._encode_vae_image(torch.stack([request_pixels(r) for r in group]), generator=None)
        assert torch.equal(torch.stack([lc[r] for r in group]), ref)
    # un-normalise and decode as Flux2Pipeline.__call__ does; compare with a plain VAE round trip
    z = torch.stack([lc[r] for r in reqs[1:3]])
    ids = P._prepare_latent_ids(z)
    z = P._unpack_latents_with_ids(P._pack_latents(z), ids)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    with torch.no_grad():
        img = pipe.vae.decode(P._unpatchify_latents(z * std + mean), return_dict=False)[0]
        x = torch.stack([request_pixels(r) for r in reqs[1:3]])
        direct = vae.decode(vae.encode(x).latent_dist.mode(), return_dict=False)[0]
    torch.testing.assert_close(img, direct, rtol=1e-4, atol=1e-4)


def test_exif_orientation_is_applied(images):
    img = load_rgb(images[3])
    assert img.size == (64, 128)  # stored 128x64, displayed rotated
    with pytest.raises(ValueError, match="outside the 64x128 image"):
        request_pixels(LatentRequest(images[3], (0, 0, 128, 64), (32, 16)))


def test_latent_keys_reencode_only_what_changed(tiny_dev, images, tmp_path):
    vae = load_vae(tiny_dev, device="cpu")
    reqs = [LatentRequest(p, (0, 0, 64, 64), (32, 32)) for p in images]
    shapes = []
    h = vae.encoder.register_forward_hook(lambda m, a, o: shapes.append(a[0].shape[0]))
    try:
        def run(rs, **kw):
            shapes.clear()
            return cache_latents(vae, rs, tmp_path / "vae", vae_batch_size=4, progress=False, **kw).stats
        assert run(reqs).misses == 4 and shapes == [4]
        s = run(reqs); assert (s.hits, s.misses, shapes) == (4, 0, [])
        s = run(reqs[:3] + [LatentRequest(images[3], (0, 8, 64, 72), (32, 32))]); assert (s.misses, shapes) == (1, [1])
        s = run(reqs[:3] + [LatentRequest(images[3], (0, 0, 64, 64), (48, 48))]); assert (s.misses, shapes) == (1, [1])
        _image(images[2], 64, 64, 99)  # new bytes under the same name
        s = run(reqs); assert (s.hits, s.misses, shapes) == (3, 1, [1])
        s = run(reqs, identity="another vae"); assert (s.misses, shapes) == (4, [4])
    finally: h.remove()


def test_vae_identity_without_summary_hashes_weights(tiny_dev):
    from diffusers import AutoencoderKLFlux2
    a = AutoencoderKLFlux2.from_pretrained(tiny_dev, subfolder="vae")
    b = AutoencoderKLFlux2.from_pretrained(tiny_dev, subfolder="vae")
    assert vae_identity(a) == vae_identity(b)
    with torch.no_grad(): b.decoder.conv_out.bias[0] += 1e-3
    assert vae_identity(a) != vae_identity(b)


def test_latent_corrupt_shard_reencoded(tiny_dev, images, tmp_path):
    vae = load_vae(tiny_dev, device="cpu")
    reqs = [LatentRequest(p, (0, 0, 64, 64), (32, 32)) for p in images]
    first = cache_latents(vae, reqs, tmp_path, vae_batch_size=2, write_batch_size=2, progress=False)
    ref = {r: first[r].clone() for r in reqs}
    store = ShardStore(tmp_path, "latents")
    shard = store.index["entries"][first.key(reqs[0])]
    (tmp_path / shard).write_bytes(b"")  # zero bytes
    again = cache_latents(vae, reqs, tmp_path, vae_batch_size=2, write_batch_size=2, progress=False)
    assert (again.stats.corrupt_shards, again.stats.misses, again.stats.hits) == (1, 2, 2)
    for r in reqs: assert torch.equal(again[r], ref[r])
    with pytest.raises(ValueError, match="holds a 'latents' cache"):
        cache_text_embeds(None, [], tmp_path)
