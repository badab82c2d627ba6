"Cross-module tests of flux2_kit.data: folder vs `datasets` sources, parquet/jsonl metadata, in-memory images, specs as objects."
import io, json, os, shutil
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from flux2_kit.data import (DataError, Item, image_array, image_tensor, item_bytes, latent_requests, load_image,
                            scan_dataset, scan_hf_dataset)
from flux2_kit.buckets import make_buckets


def _photo(size, seed):
    "A non-flat RGB image (gradient + noise) so resizes and crops change values."
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    noise = np.random.default_rng(seed).integers(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(np.stack([x, y, 255 - x], -1) + noise, 0, 255).astype(np.uint8))


def _tiny_folder(root):
    "Four images (PNG, JPEG with EXIF orientation 6, RGBA, nested) + .txt captions + an imagefolder metadata.jsonl."
    root.mkdir(parents=True, exist_ok=True); (root / "sub").mkdir(exist_ok=True)
    caps = {"wide.png": "a wide gradient", "tall.jpg": "a tall gradient", "alpha.png": "a translucent gradient",
            "sub/square.png": "a square gradient"}
    _photo((96, 64), 0).save(root / "wide.png")
    ex = Image.Exif(); ex[0x0112] = 6
    _photo((80, 48), 1).save(root / "tall.jpg", exif=ex, quality=95)
    a = _photo((64, 64), 2).convert("RGBA"); a.putalpha(128); a.save(root / "alpha.png")
    _photo((72, 72), 3).save(root / "sub/square.png")
    with open(root / "metadata.jsonl", "w") as f:
        for name, cap in caps.items():
            (root / name).with_suffix(".txt").write_text(cap + "\n", encoding="utf-8")
            f.write(json.dumps({"file_name": name, "text": cap}) + "\n")
    return root, caps


def _same(a, b):
    return [(i.path, i.key, i.size, i.captions) for i in a] == [(i.path, i.key, i.size, i.captions) for i in b]


def test_folder_and_datasets_give_the_same_items(tmp_path):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # conftest: nothing here may reach the hub
    root, caps = _tiny_folder(tmp_path / "ds")
    local, lrep = scan_dataset({"id": "d", "instance_data_dir": str(root), "caption_strategy": "textfile"})
    hf, hrep = scan_dataset({"id": "d", "type": "huggingface", "dataset_name": str(root), "caption_strategy": "huggingface",
                             "caption_column": "text", "cache_dir": str(tmp_path / "hf-cache")})
    hf_txt, _ = scan_dataset({"id": "d", "type": "huggingface", "dataset_name": str(root), "caption_strategy": "textfile",
                              "cache_dir": str(tmp_path / "hf-cache")})
    assert len(local) == 4 and not lrep.skipped and not hrep.skipped
    assert sorted(local, key=lambda i: i.key) == local
    hf, hf_txt = sorted(hf, key=lambda i: i.key), sorted(hf_txt, key=lambda i: i.key)
    assert _same(local, hf) and _same(local, hf_txt)
    assert {i.key: i.size for i in local}["tall"] == (48, 80)  # EXIF 6 through both sources
    assert {i.key: i.captions for i in local}["sub/square"] == ("a square gradient",)
    spec = {"id": "d", "resolution": 64, "crop": True, "crop_aspect": "preserve", "crop_style": "center"}
    ta, tb = make_buckets(local, spec), make_buckets(hf, spec)
    assert ta.rows() == tb.rows()
    for x, y in zip(ta.items, tb.items):
        assert (image_tensor(x) == image_tensor(y)).all()


def test_sample_dataset_loads_from_folder_and_datasets(tmp_path):
    from flux2_kit.sample import sample_dataset, SAMPLES
    src = sample_dataset(tmp_path / "samples")
    root = tmp_path / "copy"; shutil.copytree(src, root)
    with open(root / "metadata.jsonl", "w") as f:
        for p in sorted(root.glob("*.txt")):
            img = next(q for q in root.iterdir() if q.stem == p.stem and q.suffix != ".txt")
            f.write(json.dumps({"file_name": img.name, "text": p.read_text().strip()}) + "\n")
    local, lrep = scan_dataset({"id": "s", "instance_data_dir": str(root), "caption_strategy": "textfile"})
    hf, hrep = scan_dataset({"id": "s", "type": "huggingface", "dataset_name": str(root), "caption_strategy": "huggingface",
                             "caption_column": "text", "cache_dir": str(tmp_path / "hf-cache")})
    assert len(local) == len(SAMPLES) and not lrep.skipped and not hrep.skipped
    assert _same(local, sorted(hf, key=lambda i: i.key))
    assert {i.key: i.caption for i in local}["chelsea"] == SAMPLES["chelsea"][2]
    assert lrep.ignored == []  # LICENSES.json and metadata.jsonl are side files


def test_datasets_with_images_stored_as_bytes(tmp_path):
    import datasets
    good = io.BytesIO(); _photo((40, 30), 4).save(good, format="PNG")
    rgba = io.BytesIO(); Image.new("RGBA", (8, 8), (0, 0, 255, 0)).save(rgba, format="PNG")
    rows = {"image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"\x00garbage" * 10, "path": None},
                      {"bytes": rgba.getvalue(), "path": None}],
            "caption": ["a gradient", "broken", None], "alt": ["", "", "a clear square"]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        image=datasets.Image(), caption=datasets.Value("string"), alt=datasets.Value("string")))
    items, rep = scan_hf_dataset(ds, {"id": "mem", "caption_column": "caption", "fallback_caption_column": "alt"})
    assert [(i.path, i.key, i.size, i.captions) for i in items] == [
        ("hf://mem/0", "000000", (40, 30), ("a gradient",)), ("hf://mem/2", "000002", (8, 8), ("a clear square",))]
    assert [(s.path, s.code) for s in rep.skipped] == [("hf://mem/1", "not_an_image")]
    assert item_bytes(items[0]) == good.getvalue()
    t = make_buckets(items, {"id": "mem", "resolution": 64})
    assert image_array(t.items[1]).reshape(-1, 3).tolist() == [[255, 255, 255]] * (64 * 64)  # transparent -> white
    assert tuple(image_tensor(t.items[0]).shape) == (3, 48, 80)  # 40x30 (1.33) at 64^2: 73.8 -> 80, 55.5 -> 48
    with pytest.raises(DataError, match="image_column 'img' is not a column"):
        scan_hf_dataset(ds, {"id": "mem", "image_column": "img"})


def test_parquet_and_jsonl_metadata_agree(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    root, caps = _tiny_folder(tmp_path / "ds")
    names = list(caps)
    table = {"id": [n.rsplit(".", 1)[0] for n in names], "caption": [[caps[n], "variant"] for n in names],
             "width": [1] * 4, "height": [1] * 4}
    pq.write_table(pa.table(table), root / "meta.parquet")
    with open(root / "meta.jsonl", "w") as f:
        for i in range(4): f.write(json.dumps({k: v[i] for k, v in table.items()}) + "\n")
    base = {"id": "m", "instance_data_dir": str(root), "caption_strategy": "parquet"}
    pq_items, pq_rep = scan_dataset({**base, "metadata_backend": "parquet",
                                     "parquet": {"path": str(root / "meta.parquet"), "filename_column": "id"}})
    js_items, _ = scan_dataset({**base, "metadata_backend": "parquet", "parquet": {"path": "meta.jsonl", "filename_column": "id"}})
    assert len(pq_items) == 4 and not pq_rep.skipped
    assert pq_items == js_items
    assert {i.key: i.captions for i in pq_items}["wide"] == ("a wide gradient", "variant")
    assert [i.path for i in pq_items] == [str(root / n) for n in names]  # table order, extension found on disk


@dataclass
class _Spec:  # an attribute-style spec whose unset keys are None, like flux2_kit.config.DatasetSpec
    id: str
    instance_data_dir: str = None
    caption_strategy: str = None
    resolution: int = None
    crop: bool = None


def test_specs_as_objects(tmp_path):
    root, _ = _tiny_folder(tmp_path / "ds")
    as_dict, _ = scan_dataset({"id": "o", "instance_data_dir": str(root), "caption_strategy": "textfile"})
    as_obj, _ = scan_dataset(_Spec("o", str(root), "textfile"))
    assert as_dict == as_obj
    assert make_buckets(as_obj, _Spec("o", resolution=64)).rows() == make_buckets(as_dict, {"id": "o", "resolution": 64}).rows()
    from flux2_kit.config import DatasetSpec
    as_cfg, _ = scan_dataset(DatasetSpec(id="o", instance_data_dir=str(root), caption_strategy="textfile"))
    assert as_cfg == as_dict


def test_image_tensor_is_the_recorded_crop_at_the_recorded_size(tmp_path):
    p = tmp_path / "g.png"; _photo((300, 200), 5).save(p)
    items, _ = scan_dataset({"id": "g", "instance_data_dir": str(tmp_path), "caption_strategy": "filename"})
    t = make_buckets(items, {"id": "g", "resolution": 128, "crop": True, "crop_aspect": "square", "crop_style": "corner"})
    it = t.items[0]
    assert (it.target, it.crop) == ((128, 128), (0, 0, 200, 200))
    x = image_tensor(it)
    assert tuple(x.shape) == (3, 128, 128) and x.dtype.is_floating_point and -1 <= x.min() and x.max() <= 1
    want = np.asarray(load_image(p).crop(it.crop).resize(it.target, Image.Resampling.LANCZOS), dtype=np.float32)
    got = (x.permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(got - want)[8:-8, 8:-8].max() < 0.51  # identical inside; Lanczos taps at the box edge may differ
    assert np.abs(got - want).mean() < 1.0
    assert latent_requests(t.items)[0][:3] == (str(p), (0, 0, 200, 200), (128, 128))
