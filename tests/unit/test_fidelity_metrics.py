"""The image and latent metrics of the fidelity protocol and the A/B compare node (sd35fp8.core.fidelity)."""
import math
import os
import sys

import pytest
import torch

from sd35fp8.core import fidelity

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "scripts"))


def images(seed, n=2, h=32, w=40):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_psnr_is_the_definition_and_infinite_for_equal_images():
    a = images(0)
    b = a.clone()
    b[0] = (b[0] + 0.1).clamp(0, 1)
    mse0 = float((a[0].double() - b[0].double()).square().mean())
    p = fidelity.psnr(a, b)
    assert p[0] == pytest.approx(10 * math.log10(1 / mse0), rel=1e-9) and math.isinf(p[1])


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    a = images(1, n=1, h=64, w=64)
    small = (a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    big = (a + 0.2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    assert fidelity.ssim(a, a)[0] == pytest.approx(1.0)
    s_small, s_big = fidelity.ssim(a, small)[0], fidelity.ssim(a, big)[0]
    assert 1.0 > s_small > s_big > 0.0


def test_ssim_matches_an_independent_reference():
    """The same numbers as the formula evaluated pixel by pixel (uniform 7x7 windows over the luma)."""
    a, b = images(4, n=1, h=12, w=11), images(5, n=1, h=12, w=11)
    luma = torch.tensor(fidelity.LUMA, dtype=torch.float64)
    x, y = a[0].double() @ luma, b[0].double() @ luma
    vals = []
    for i in range(12 - 6):
        for j in range(11 - 6):
            px, py = x[i:i + 7, j:j + 7], y[i:i + 7, j:j + 7]
            mx, my = px.mean(), py.mean()
            vx, vy = (px * px).mean() - mx * mx, (py * py).mean() - my * my
            cxy = (px * py).mean() - mx * my
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    assert fidelity.ssim(a, b)[0] == pytest.approx(float(torch.stack(vals).mean()), rel=1e-9)


def test_one_image_compares_with_every_image_of_a_batch_and_mismatches_are_named():
    a, b = images(6, n=1), images(7, n=3)
    assert len(fidelity.psnr(a, b)) == 3
    with pytest.raises(ValueError, match="differ in size"):
        fidelity.psnr(images(0, h=32), images(0, h=48))
    with pytest.raises(ValueError, match="2 vs 3 images"):
        fidelity.ssim(images(0, n=2), images(0, n=3))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        fidelity.psnr(torch.zeros(4, 4), torch.zeros(4, 4))


def test_heatmap_is_black_where_equal_and_white_at_the_largest_difference():
    a = torch.zeros(1, 8, 8, 3)
    b = a.clone()
    b[0, 2, 3] = 0.5
    b[0, 5, 5, 1] = 0.25
    heat, top = fidelity.heatmap(a, b)
    assert heat.shape == (1, 8, 8, 3) and top == pytest.approx(0.5)
    assert heat[0, 2, 3].tolist() == [1.0, 1.0, 1.0] and heat[0, 0, 0].tolist() == [0.0, 0.0, 0.0]
    assert 0 < float(heat[0, 5, 5].sum()) < 3
    fixed, top = fidelity.heatmap(a, b, scale=1.0)
    assert top == 1.0 and fixed[0, 2, 3].tolist() == [1.0, 0.5, 0.0]  # half way: red to yellow
    same, top = fidelity.heatmap(a, a)
    assert top == 0 and float(same.abs().max()) == 0


def test_compare_reports_every_pair_and_the_mean():
    a = images(8, n=2)
    b = (a + 0.01).clamp(0, 1)
    r = fidelity.compare(a, b)
    assert len(r["psnr"]) == len(r["ssim"]) == len(r["max_diff"]) == 2
    assert r["mean"]["psnr"] == pytest.approx(sum(r["psnr"]) / 2)
    assert r["lines"][1].startswith("image 0: PSNR ") and r["lines"][-1].startswith("mean: PSNR ")
    assert "identical" in fidelity.compare(a, a)["lines"][-1]


def test_relative_error():
    x = torch.ones(10)
    assert fidelity.relative_error(x * 1.01, x) == pytest.approx(0.01)


def test_the_demo_judge_reads_colour_and_position():
    import random
    import demo_scenes
    scene = ("red", "circle", "top left", "white")
    img = demo_scenes.render(scene, random.Random(0))
    j = demo_scenes.judge(img, demo_scenes.prompt_of(*scene))
    assert j["colour_ok"] and j["position_ok"]
    wrong = demo_scenes.render(("blue", "circle", "bottom right", "white"), random.Random(0))
    j = demo_scenes.judge(wrong, demo_scenes.prompt_of(*scene))
    assert not j["colour_ok"] and not j["position_ok"] and j["colour"] == "blue" and j["position"] == "bottom right"
    blank = demo_scenes.render(scene, random.Random(0)) * 0 + 245
    assert not demo_scenes.judge(blank, demo_scenes.prompt_of(*scene))["colour_ok"]
    with pytest.raises(ValueError, match="not a demo-scene prompt"):
        demo_scenes.parse("a fox in the snow")
    train, held = demo_scenes.split()
    assert held and not set(train) & set(held)
