"""LayerNorm + adaLN modulation + static E4M3 quantization (sd35fp8/kernels/norm.py): the torch path on the CPU against
the unfused formula; the Triton kernel against it on a CUDA GPU (NaN visible, out-of-range clamped)."""
import pytest
import torch

from sd35fp8.core.formats import E4M3_MAX
from sd35fp8.kernels.norm import ln_modulate_quant, reference, residual_ln_modulate_quant

from tests.support.markers import cuda  # noqa: E402


def inputs(b=2, l=37, c=2432, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, l, c, generator=g) * 4 + 1).to(device, torch.bfloat16)
    y = torch.randn(b, l, c, generator=g).to(device, torch.bfloat16)
    mods = torch.randn(b, 6 * c, generator=g).to(device, torch.bfloat16)
    gate, shift, scale = (t for t in mods.chunk(6, dim=1)[:3])  # strided views, as the adaLN output's chunks
    return x, y, gate, shift, scale, torch.tensor(1 / 0.02, device=device)


def unfused(x, y, gate, shift, scale, inv):
    if y is not None:
        x = x + gate.unsqueeze(1) * y
    h = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=1e-6) * (1 + scale.float().unsqueeze(1)) \
        + shift.float().unsqueeze(1)
    return x, (h * inv).clamp(-E4M3_MAX, E4M3_MAX).reshape(-1, x.shape[-1])


def test_cpu_path_is_the_unfused_layernorm_modulation_and_quantization():
    x, y, gate, shift, scale, inv = inputs()
    h8 = ln_modulate_quant(x, shift, scale, inv, 1e-6)
    _, h = unfused(x, None, None, shift, scale, inv)
    assert h8.dtype == torch.float8_e4m3fn and h8.shape == (2 * 37, 2432)
    assert torch.equal(h8, h.to(torch.float8_e4m3fn))
    xr, h8r = residual_ln_modulate_quant(x, y, gate, shift, scale, inv, 1e-6)
    xu, hu = unfused(x, y, gate, shift, scale, inv)
    assert xr.dtype == x.dtype
    assert float((xr.float() - xu.float()).abs().max()) <= float(xu.float().abs().max()) * 2 ** -7
    mismatch = (h8r.float() != hu.to(torch.float8_e4m3fn).float()).float().mean()
    assert mismatch < 0.03  # the residual's own rounding (fp32 math, rounded once) moves a few E4M3 roundings
    assert float(h8r.float().abs().max()) == E4M3_MAX  # scale 0.02: the largest values saturate, never inf


def test_nan_stays_visible_and_huge_values_saturate():
    x, y, gate, shift, scale, inv = inputs(l=3, c=64)
    x[0, 1, 5] = float("nan")
    h8 = ln_modulate_quant(x, shift, scale, torch.tensor(1e6), 1e-6).float()
    assert torch.isnan(h8[1]).all() and torch.isfinite(h8[0]).all() and torch.isfinite(h8[3:]).all()
    assert float(h8[3:].abs().max()) == E4M3_MAX


@cuda
@pytest.mark.parametrize("c", [2432, 1536, 64])
def test_kernel_matches_the_reference(c):
    x, y, gate, shift, scale, inv = inputs(b=2, l=333, c=c, device="cuda", seed=c)
    _, ref = reference(x, None, None, shift, scale, inv, 1e-6)
    h8 = ln_modulate_quant(x, shift, scale, inv, 1e-6)
    assert h8.shape == ref.shape and (h8.float() != ref.float()).float().mean() < 1e-3
    rx, rh = reference(x, y, gate, shift, scale, inv, 1e-6)
    xr, h8r = residual_ln_modulate_quant(x, y, gate, shift, scale, inv, 1e-6)
    assert (xr != rx).float().mean() < 1e-3 and torch.allclose(xr.float(), rx.float(), rtol=2 ** -7, atol=1e-6)
    assert (h8r.float() != rh.float()).float().mean() < 2e-3
    # out of range on CUDA: NaN unless clamped first; a NaN input stays NaN
    x[0, 0, 3] = float("nan")
    big = ln_modulate_quant(x, shift, scale, torch.tensor(1e6, device="cuda"), 1e-6).float()
    assert torch.isnan(big[0]).all() and torch.isfinite(big[1:]).all() and float(big[1:].abs().max()) == E4M3_MAX
    # compiled as the runtime calls it: one opaque op, same result
    f = torch.compile(lambda a, s, t: ln_modulate_quant(a * 1.0, s, t, inv, 1e-6), dynamic=False)
    assert torch.equal(f(x[1:], shift[1:], scale[1:]).float().nan_to_num(), big.new_tensor(
        ln_modulate_quant(x[1:], shift[1:], scale[1:], inv, 1e-6).float()).nan_to_num())


def test_int8_variant_on_the_cpu_is_the_reference_and_per_token():
    from sd35fp8.kernels.norm import reference_int8, residual_ln_modulate_quant_int8
    x, y, gate, shift, scale, _ = inputs()
    xr, h8, rs = residual_ln_modulate_quant_int8(x, y, gate, shift, scale, 1e-6)
    rx, rh, rrs = reference_int8(x, y, gate, shift, scale, 1e-6)
    assert torch.equal(xr, rx) and torch.equal(h8, rh) and torch.equal(rs, rrs)
    assert h8.dtype == torch.int8 and rs.shape == (x.shape[0] * x.shape[1],)
    assert int(h8.abs().amax(1).min()) == 127  # every row uses its own full range
    h = unfused(xr, None, None, shift, scale, torch.tensor(1.0))[1]
    assert float((h8.float() * rs[:, None] - h).norm() / h.norm()) < 0.02  # E4M3 rounds to ~0.027


@cuda
@pytest.mark.parametrize("c", [2432, 1536])
def test_int8_kernel_matches_the_reference(c):
    from sd35fp8.kernels.norm import reference_int8, residual_ln_modulate_quant_int8
    x, y, gate, shift, scale, _ = inputs(b=2, l=333, c=c, device="cuda", seed=c)
    xr, h8, rs = residual_ln_modulate_quant_int8(x, y, gate, shift, scale, 1e-6)
    rx, rh, rrs = reference_int8(x, y, gate, shift, scale, 1e-6)
    assert (xr != rx).float().mean() < 1e-3 and torch.allclose(xr.float(), rx.float(), rtol=2 ** -7, atol=1e-6)
    assert h8.dtype == torch.int8 and int((h8.int() - rh.int()).abs().max()) <= 1
    assert (h8 != rh).float().mean() < 2e-3 and torch.allclose(rs, rrs, rtol=1e-4)
    x[0, 0, 3] = float("nan")
    _, h8n, rsn = residual_ln_modulate_quant_int8(x, y, gate, shift, scale, 1e-6)
    assert torch.isnan(rsn[0]) and torch.isfinite(rsn[1:]).all()
