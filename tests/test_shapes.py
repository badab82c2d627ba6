"The procedural shapes dataset: deterministic, exactly captioned, held-back shapes kept out, shapes told apart."
import json
import numpy as np
import pytest
from PIL import Image

from flux2_kit.shapes import (SHAPES, HELD_BACK, PRETRAIN_SHAPES, COLOURS, BACKGROUNDS, POSITIONS, SIZES, Spec,
                              make_specs, random_spec, render, shape_mask, shapes_dataset, concept_dataset)


def test_render_is_deterministic_per_spec_size_seed():
    for spec in make_specs(20, seed=7, shapes=SHAPES):
        a = np.asarray(render(spec, 64, seed=3))
        assert (a == np.asarray(render(spec, 64, seed=3))).all()
        assert (a != np.asarray(render(spec, 64, seed=4))).any()
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8


def test_every_caption_round_trips():
    specs = [Spec(sh, c, p, z, b) for sh in SHAPES for c in COLOURS for p in POSITIONS for z in SIZES for b in BACKGROUNDS]
    assert len({s.caption() for s in specs}) == len(specs) == 7 * 6 * 5 * 2 * 4
    for s in specs: assert Spec.from_caption(s.caption()) == s
    assert Spec("triangle", "red", "top left", "small", "light blue").caption() == \
        "a small red triangle at the top left on a light blue background"
    for bad in ["", "a small red triangle", "a small red triangle at the center on a white background",
                "a small red triangle in the center on a light background"]:
        with pytest.raises(ValueError, match="not a shapes caption"): Spec.from_caption(bad)


def test_held_back_shapes_never_in_pretraining_specs(tmp_path):
    assert set(PRETRAIN_SHAPES) | set(HELD_BACK) == set(SHAPES) and not set(PRETRAIN_SHAPES) & set(HELD_BACK)
    for seed in range(5): assert not {s.shape for s in make_specs(300, seed=seed)} & set(HELD_BACK)
    rng = np.random.default_rng(0)
    assert not {random_spec(rng).shape for _ in range(500)} & set(HELD_BACK)
    d = shapes_dataset(tmp_path, n=40)
    assert not any(h in p.read_text() for p in d.glob("*.txt") for h in HELD_BACK)


def test_specs_are_balanced():
    specs = make_specs(700, seed=1)
    for field, values in [("shape", PRETRAIN_SHAPES), ("colour", COLOURS), ("position", POSITIONS), ("size", SIZES),
                          ("background", BACKGROUNDS)]:
        counts = [sum(getattr(s, field) == v for s in specs) for v in values]
        assert max(counts) - min(counts) <= 1, (field, counts)


def _canon(m):
    ys, xs = np.nonzero(m)
    return np.asarray(Image.fromarray(m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]).resize((32, 32))) > 0


def test_shapes_are_distinguishable_and_sizes_differ():
    for size, pos in [("large", "center"), ("small", "top left")]:
        masks = {sh: _canon(shape_mask(Spec(sh, "green", pos, size, "black"))) for sh in SHAPES}
        for i, x in enumerate(SHAPES):
            for y in SHAPES[i + 1:]:
                iou = (masks[x] & masks[y]).sum() / (masks[x] | masks[y]).sum()
                assert iou < 0.85, (size, x, y, iou)
    for sh in SHAPES:
        small, large = (shape_mask(Spec(sh, "red", "center", z, "white"), seed=2).sum() for z in SIZES)
        assert large > 2.5 * small, sh


def test_positions_put_the_shape_in_its_place():
    for spec in make_specs(60, seed=2, shapes=SHAPES):
        ys, xs = np.nonzero(shape_mask(spec))
        cx, cy = xs.mean() / 64, ys.mean() / 64
        if spec.position == "center": assert abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1, spec
        else:
            assert (cx < 0.5) == ("left" in spec.position) and (cy < 0.5) == ("top" in spec.position), spec


def test_datasets_are_atomic_reused_and_exact(tmp_path):
    d = shapes_dataset(tmp_path, n=12, seed=4)
    rows = [json.loads(l) for l in (d / "specs.jsonl").read_text().splitlines()]
    assert [Spec.from_caption((d / r["file"]).with_suffix(".txt").read_text().strip()) for r in rows] == make_specs(12, seed=4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert shapes_dataset(tmp_path, n=12, seed=4) == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
    c = concept_dataset(tmp_path, "star", n=12)
    specs = [Spec.from_caption(p.read_text().strip()) for p in sorted(c.glob("*.txt"))]
    assert {s.shape for s in specs} == {"star"} and len({s.colour for s in specs}) == len(COLOURS)
    assert len({s.position for s in specs}) == len(POSITIONS) and len({s.background for s in specs}) == len(BACKGROUNDS)
