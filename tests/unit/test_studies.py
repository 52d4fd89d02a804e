"""The studies under bench/studies that carry code (not product: nothing in the nodes reaches them)."""
import torch

from test_attention import fp8_gpu, joint_inputs, rel


@fp8_gpu
def test_joint_attention_writes_the_projections_e4m3_inputs_like_quantizing_its_output():
    """The attention_fp8_out study (bench/studies/attention_fp8_out): the kernel's split E4M3 epilogue (context rows
    with one scale, image rows with another) against the BF16 output quantized afterwards with the same scales (one BF16
    rounding apart); saturates."""
    from bench.studies.attention_fp8_out.split import joint_fp8_attention_split
    from sd35fp8.kernels.joint import joint_fp8_attention
    ctx, x, ws = joint_inputs(2, 154, 333, 3, 64, True, "cuda", seed=4)
    out = joint_fp8_attention(ctx, x, *ws, 1e-6, 3)
    inv_c, inv_x = (448.0 / out[:, :154].float().abs().amax(), 448.0 / out[:, 154:].float().abs().amax())
    c8, x8 = joint_fp8_attention_split(ctx, x, *ws, 1e-6, 3, inv_c, inv_x)
    assert c8.dtype == x8.dtype == torch.float8_e4m3fn and c8.shape == (2 * 154, 192) and x8.shape == (2 * 333, 192)
    for got, part, inv in ((c8, out[:, :154], inv_c), (x8, out[:, 154:], inv_x)):
        want = (part.reshape(-1, 192).float() * inv).clamp(-448, 448)
        assert (got.float() != want.to(torch.float8_e4m3fn).float()).float().mean() < 0.1
        assert rel(got.float() / inv, part.reshape(-1, 192)) < 0.04
    c8, x8 = joint_fp8_attention_split(ctx, x, *ws, 1e-6, 3, inv_c * 1e3, inv_x * 1e3)  # far out of range
    assert float(c8.float().abs().max()) == 448.0 and torch.isfinite(x8.float()).all()
