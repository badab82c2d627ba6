"Cross-module tests of flux2_kit.buckets: resume in a new process, edit/reference pairs on the sample edit set, DataLoader batches."
import json, math, os, subprocess, sys, textwrap

import numpy as np
import pytest
from PIL import Image

from flux2_kit.buckets import BucketBatchSampler, batch_references, make_buckets, prepare_datasets, target_size
from flux2_kit.data import DataError, image_tensor, latent_requests, scan_dataset


def _folder(root, sizes):
    root.mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i * 20 % 256, 90, 160)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"picture {i}")
    return root


_SIZES = [(640, 480)] * 5 + [(480, 640)] * 4 + [(512, 512)] * 6 + [(1280, 720)] * 3


_SCRIPT = textwrap.dedent("""
    import json, sys
    from flux2_kit.data import scan_dataset
    from flux2_kit.buckets import make_buckets, BucketBatchSampler
    root, mode, k, state_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    spec = {"id": "r", "instance_data_dir": root, "caption_strategy": "textfile", "resolution": 256, "repeats": 1,
            "crop": True, "crop_style": "random", "crop_aspect": "preserve"}
    items, report = scan_dataset(spec)
    s = BucketBatchSampler(make_buckets(items, spec, report=report, seed=11), batch_size=2, seed=7)
    if mode == "full":
        print(json.dumps(list(s) + list(s)))
    elif mode == "head":
        it = iter(s)
        print(json.dumps([next(it) for _ in range(k)]))
        json.dump(s.state_dict(), open(state_file, "w"))
    else:
        s.load_state_dict(json.load(open(state_file)))
        print(json.dumps(list(s) + list(s)))
""")


def _run(*args, hashseed):
    env = {**os.environ, "PYTHONHASHSEED": str(hashseed)}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, *map(str, args)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_sampler_resumes_exactly_in_a_new_process(tmp_path):
    root = _folder(tmp_path / "ds", _SIZES)
    state = tmp_path / "state.json"
    full = _run(root, "full", 0, state, hashseed=1)
    head = _run(root, "head", 5, state, hashseed=2)
    rest = _run(root, "rest", 0, state, hashseed=3)
    assert head + rest == full
    assert json.load(open(state))["position"] == 5
    assert len(full) == 2 * (5 * 2 // 2 + 4 * 2 // 2 + 6 * 2 // 2 + 3 * 2 // 2)  # repeats=1, batch 2, no remainder


def test_sample_edit_dataset_pairs_strictly(tmp_path):
    from flux2_kit.sample import sample_edit_dataset
    edits, refs = sample_edit_dataset(tmp_path / "samples")
    specs = [{"id": "edits", "instance_data_dir": str(edits), "caption_strategy": "textfile", "resolution": 256,
              "crop": True, "crop_aspect": "preserve", "crop_style": "random", "conditioning_data": ["refs"]},
             {"id": "refs", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
              "instance_data_dir": str(refs)},
             {"id": "text", "dataset_type": "text_embeds", "default": True}]
    table = prepare_datasets(specs, seed=4)["edits"]
    assert len(table) > 0 and not table.report.skipped
    for it in table.items:
        (ref,) = it.refs
        assert ref.key == it.key and ref.dataset_id == "refs"
        assert (ref.crop, ref.target) == (it.crop, it.target)  # identical crop box and target size
        x, r = image_tensor(it), image_tensor(ref)
        assert x.shape == r.shape == (3, it.target[1], it.target[0])
        grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])  # the reference is the greyscale of the same crop
        assert (r[0] - grey).abs().mean() < 0.05, it.key
    assert len(latent_requests(table.items)) == 2 * len(table)
    assert all(c.startswith("colourise this photograph:") for c in table.prompts())


def test_unmatched_pairs_fail_with_the_list(tmp_path):
    from flux2_kit.sample import sample_edit_dataset
    edits, refs = sample_edit_dataset(tmp_path / "samples")
    names = sorted(p.name for p in refs.glob("*.png"))[:2]
    for n in names: (refs / n).unlink()
    specs = [{"id": "edits", "instance_data_dir": str(edits), "caption_strategy": "textfile", "resolution": 256,
              "conditioning_data": "refs"},
             {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": str(refs)}]
    with pytest.raises(DataError, match="2 image\\(s\\) have no reference in conditioning dataset 'refs': "
                                        + ", ".join(names).replace(".", "\\.")):
        prepare_datasets(specs)


def test_dataloader_batches_stack_and_never_mix_sizes(tmp_path):
    import torch
    root = _folder(tmp_path / "ds", _SIZES)
    spec = {"id": "dl", "instance_data_dir": str(root), "caption_strategy": "textfile", "resolution": 128}
    items, report = scan_dataset(spec)
    table = make_buckets(items, spec, report=report)

    class _DS(torch.utils.data.Dataset):
        def __len__(self): return len(table)
        def __getitem__(self, i): return image_tensor(table.items[i])

    sampler = BucketBatchSampler(table, batch_size=2, seed=3)
    batches = list(torch.utils.data.DataLoader(_DS(), batch_sampler=sampler))
    assert len(batches) == len(sampler) == 2 + 2 + 3 + 1  # 5, 4, 6, 3 images in batches of 2
    assert {tuple(b.shape[2:]) for b in batches} == {(112, 144), (144, 112), (128, 128), (96, 176)}
    # 640x480 (5 images) and 1280x720 (3) leave one image out per epoch; that is reported
    assert sorted((w.path, w.code) for w in report.warnings) == [("144x112", "bucket_remainder"), ("176x96", "bucket_remainder")]


@pytest.mark.parametrize("res", [512, 768, 1024])
def test_pixel_area_sweep(res):
    rng = np.random.default_rng(res)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(200, 4000, 2))
        if not 0.25 <= w / h <= 4: continue
        tw, th = target_size((w, h), res, "pixel_area")
        assert tw % 16 == 0 and th % 16 == 0
        assert abs(tw * th / res ** 2 - 1) < 0.08, (w, h, tw, th)
        assert abs(math.log((tw / th) / (w / h))) < 0.08, (w, h, tw, th)
        pw, ph = target_size((w, h), res, "pixel")
        assert min(pw, ph) == res and pw % 16 == 0 and ph % 16 == 0


def test_random_conditioning_choice_is_per_step(tmp_path):
    a = _folder(tmp_path / "a", [(256, 256)] * 4)
    b = _folder(tmp_path / "b", [(256, 256)] * 4)
    c = _folder(tmp_path / "c", [(320, 160)] * 4)
    specs = [{"id": "a", "instance_data_dir": str(a), "caption_strategy": "textfile", "resolution": 128,
              "conditioning_data": ["b", "c"], "conditioning_multidataset_sampling": "random"},
             {"id": "b", "dataset_type": "conditioning", "instance_data_dir": str(b)},
             {"id": "c", "dataset_type": "conditioning", "conditioning_type": "reference_loose", "instance_data_dir": str(c)}]
    t = prepare_datasets(specs)["a"]
    assert t.conditioning_sampling == "random" and [b.label for b in t.buckets] == ["128x128 | refs 128x128,176x96"]
    batch = [t.items[i] for i in t.buckets[0].indices[:2]]
    picks = [batch_references(batch, t.conditioning_sampling, seed=0, step=k)[0][0].dataset_id for k in range(30)]
    assert set(picks) == {"b", "c"}
    assert [len(s) for s in batch_references(batch, "combined")] == [2, 2]
