"The judge reads shapes pictures back into their captions' words; measured on fresh and degraded renders."
import numpy as np
import pytest
from PIL import Image

from flux2_kit.shapes import SHAPES, HELD_BACK, Spec, make_specs, render
from flux2_kit.judge import ATTRIBUTES, degrade, judge, judge_accuracy, score, train_judge, _asset


def test_clean_renders_are_judged_right():
    acc = judge_accuracy(n=700, seed=123)
    assert acc["n"] == 700 and acc["empty"] == 0
    for k in ATTRIBUTES: assert acc[k] >= 0.95, acc


def test_degraded_renders_are_judged_right():
    acc = judge_accuracy(n=700, seed=321, degrade=True)
    for k in ATTRIBUTES: assert acc[k] >= 0.90, acc


def test_held_back_shapes_and_other_resolutions():
    specs = make_specs(140, seed=9, shapes=HELD_BACK)
    assert score([render(s, 128, i) for i, s in enumerate(specs)], specs)["all"] >= 0.95
    rng = np.random.default_rng(0)
    assert score([degrade(render(s, 64, i), rng) for i, s in enumerate(specs)], specs)["shape"] >= 0.90


def test_blank_and_noise_images():
    for blank in [Image.new("RGB", (64, 64), (245, 245, 245)), np.zeros((64, 64, 3), np.uint8), np.full((32, 32, 3), 0.5),
                  degrade(Image.new("RGB", (64, 64), (120, 120, 120)), np.random.default_rng(1), 2.0)]:
        got = judge(blank)
        assert got["empty"] and got["shape"] is None and got["confidence"] == 0.0
    rng = np.random.default_rng(0)
    noise = [judge(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8))["confidence"] for _ in range(20)]
    shapes = [judge(render(s, 64, i))["confidence"] for i, s in enumerate(make_specs(20, seed=4, shapes=SHAPES))]
    assert max(noise) < 0.5 < min(shapes), (max(noise), min(shapes))


def test_score_counts_each_attribute():
    spec = Spec("heart", "purple", "bottom right", "small", "white")
    wrong = [Spec("circle", "purple", "bottom right", "small", "white"), Spec("heart", "red", "bottom right", "small", "white"),
             Spec("heart", "purple", "top left", "small", "white"), Spec("heart", "purple", "bottom right", "large", "white")]
    got = score([render(spec)] * 5, [spec] + wrong)
    assert got == dict(shape=0.8, colour=0.8, position=0.8, size=0.8, all=0.2, empty=0.0, n=5)
    assert score([render(spec)], [spec.caption()])["all"] == 1.0
    with pytest.raises(ValueError, match="not a shapes caption"): score([render(spec)], ["a cat"])


def test_judge_is_deterministic_and_train_judge_rebuilds_the_shipped_weights(tmp_path):
    im = degrade(render(Spec("star", "yellow", "center", "large", "black")), np.random.default_rng(2))
    assert judge(im) == judge(im)
    assert _asset().exists() and _asset().stat().st_size < 30_000
    rebuilt = train_judge(tmp_path / "judge.npz")
    with np.load(_asset()) as a, np.load(rebuilt) as b:
        np.testing.assert_allclose(a["W"], b["W"], atol=1e-4)
        np.testing.assert_allclose(a["b"], b["b"], atol=1e-4)
    assert judge_accuracy(200, seed=77, degrade=True, weights=rebuilt) == judge_accuracy(200, seed=77, degrade=True)
