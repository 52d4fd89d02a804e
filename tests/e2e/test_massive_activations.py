"""Massive activations through ComfyUI's model code, in-process on the CPU: the demo model, and the same model with
outlier channels planted 100x and 300x its layers' median range in the residual stream's (modulated) inputs of qkv
and fc1 and in the MLP hidden channels (scripts/massive_fixture.py). Every weight format is calibrated and sampled by
ComfyUI's own sampler; the final latents are compared with the unquantized model's (docs/fidelity.md)."""
import os

import pytest
import torch

from comfy_harness import comfy_dir

from tests.support.outliers import FORMATS, Fixture, rel_error

pytestmark = pytest.mark.comfy
BOUND = 1.5  # the planted model's error may be at most this many times the clean model's


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from run_batch import demo_calibration_prompts
    d = tmp_path_factory.mktemp("massive")
    f = Fixture(comfy_dir(), str(d / "models"), demo_calibration_prompts(2), size=64, steps=8)
    ch = f.channel_amax(f.base)
    f.paths = {"clean": f.base, **{f"x{k}": f.planted(str(d / f"planted_{k}.safetensors"), k, ch) for k in (100, 300)}}
    f.refs = {name: f.latents(f.reference(p)) for name, p in f.paths.items()}
    f.dir = d
    return f


@pytest.fixture(scope="module")
def errors(fx):
    """{(model, format, centering on): final-latent error against the unquantized model}."""
    out = {}
    for name, path in fx.paths.items():
        for fmt in FORMATS:
            for center in (False, True):
                out[name, fmt, center] = rel_error(fx.latents(fx.fp8(path, fmt, center=center)[0]), fx.refs[name])
    return out


def test_planted_outliers_bite_without_the_handling(errors):
    """The fixture is hard: without centering every format's error grows past the bound (1.9-16x here), and the
    fidelity format (INT8 MLP) is no longer the most faithful one."""
    for fmt in FORMATS:
        assert errors["x100", fmt, False] > 2 * errors["clean", fmt, False], fmt
    worst = max(FORMATS, key=lambda f: errors["x300", f, False])
    assert worst == "most faithful (INT8 MLP)"


@pytest.mark.parametrize("planted", ["x100", "x300"])
def test_every_format_stays_within_1_5x_of_the_clean_model(errors, planted):
    """With centering (and the centered weight columns' rounding corrected in the bias), every weight format's
    final-latent error on the planted model is at most 1.5x its error on the clean model, and finite."""
    for fmt in FORMATS:
        e, clean = errors[planted, fmt, True], errors["clean", fmt, True]
        assert e != float("inf") and e <= BOUND * clean, (planted, fmt, e, clean)


def test_the_clean_model_is_not_made_worse(errors):
    """On the clean demo model centering changes one layer (a learned offset channel, 4x): the errors stay where
    they were (within the sampling noise of 2 prompts at 64 px: ±10% a format, ±3% on average; measured on 12 images
    at 128 px: ±2%, docs/fidelity.md)."""
    on = [errors["clean", f, True] for f in FORMATS]
    off = [errors["clean", f, False] for f in FORMATS]
    assert all(a <= 1.1 * b for a, b in zip(on, off)), (on, off)
    assert sum(on) <= 1.03 * sum(off), (on, off)


def test_the_report_names_the_centered_layers_and_the_correction(fx):
    _, text = fx.fp8(fx.paths["x300"], FORMATS[0])
    line = next(ln for ln in text.splitlines() if ln.startswith("input centering"))
    assert "in 15 of 27 FP8 layers" in line and "corrected in 15 layer biases (from planted_300.safetensors)" in line
    _, text = fx.fp8(fx.paths["x300"], FORMATS[0], center=False)
    assert "input centering" not in text


def test_saved_files_keep_the_handling_and_stock_comfyui_reads_them(fx, errors):
    """A calibrated planted model saved as an FP8 file: the centers travel in the file's calibration record and the
    weight correction in its biases, so the pack's loader samples it as before the save; stock ComfyUI loads the same
    file (per-tensor input scales of the uncentered range, which it reads correctly) and samples it."""
    import comfy.sd
    import folder_paths
    ck = fx.adapter.checkpoints
    folder_paths.add_model_folder_path("diffusion_models", str(fx.dir / "diffusion_models"), is_default=True)
    ref = fx.refs["x300"]
    cal, _ = fx.fp8(fx.paths["x300"], FORMATS[0])
    before = rel_error(fx.latents(cal), ref)
    path, report = ck.save_fp8_checkpoint(cal, "planted_centered")
    plain, _ = ck.save_fp8_checkpoint(fx.fp8(fx.paths["x300"], FORMATS[0], center=False)[0], "planted_plain")
    model, _, _, text = ck.load_sd35_fp8(path)
    s = fx.adapter.state.get(model)
    assert s.calibrated and len(s.calibration["centers"]) == 15
    assert "input centering" in text
    after = rel_error(fx.latents(model), ref)
    assert after <= 1.05 * before and after <= BOUND * errors["clean", FORMATS[0], True], (before, after)
    # stock ComfyUI loads both files and samples finite latents; how close they are is an open finding (on this
    # CPU stock 0.3.75 is ~1.7 off on the planted x300 model with either file: docs/fidelity.md)
    for f in (path, plain):
        assert torch.isfinite(fx.latents(comfy.sd.load_diffusion_model(f))).all()
    assert os.path.isfile(path)


def test_each_sampling_run_recomputes_the_centered_bias_from_the_weights_as_patched(fx):
    """The centered layers' bias (bias + W·center) is recomputed once per sampling run after ComfyUI has patched the
    weights (the SAMPLER_SAMPLE wrapper): a weight changed in place between runs (as a merged LoRA) is seen."""
    cal, _ = fx.fp8(fx.paths["x100"], FORMATS[0])
    fx.latents(cal)
    layers = fx.adapter.sampling.fp8_layers(cal.model.diffusion_model)
    name = sorted(fx.adapter.state.get(cal).calibration["centers"])[0]
    layer = layers[name]
    buf = layer.fp8_center_bias
    before = buf.clone()
    with torch.no_grad():
        layer.weight.data.copy_((layer.weight.float() * 0.5).to(layer.weight.dtype))
    fx.latents(cal)
    assert layer.fp8_center_bias is buf and not torch.equal(buf, before)
    c = layer.fp8_in_center
    expect = layer.fp8_bias().float() + layer.fp8_dequantized_weight(torch.float32) @ c
    assert torch.allclose(buf.float(), expect, atol=1e-3)
