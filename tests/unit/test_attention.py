"""FP8 attention (sd35fp8/kernels/attention.py): the SDPA fallback on the CPU; on an FP8 GPU the Triton kernels
against an fp32 reference (error bounds, sequence tails, no NaN/Inf however large the inputs)."""
import pytest
import torch

from sd35fp8.kernels.attention import (ATTN_CONFIG, EXP_MODES, attention_launch, fp8_attention, reference_attention,
                                       supported)
from sd35fp8.kernels.attention import ATTENTION_BACKENDS, attention

from tests.support.markers import fp8_gpu


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def qkv(b, s, h, d=64, device="cpu", seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h * d, generator=g).to(device, dtype) for _ in range(3))
    return q, k, v


def test_cpu_and_unsupported_shapes_fall_back_to_sdpa_exactly():
    q, k, v = qkv(2, 37, 3)
    assert "fp8" in ATTENTION_BACKENDS and not supported(q, 3)
    ref = reference_attention(q, k, v, 3)
    assert torch.equal(fp8_attention(q, k, v, 3), ref)
    assert not supported(qkv(1, 8, 2, d=48)[0], 2)  # head dim 48: no kernel
    b, s, h, d = 2, 37, 3, 64
    q4, k4, v4 = (t.view(b, s, h, d).transpose(1, 2) for t in (q, k, v))
    assert torch.equal(attention(q4, k4, v4, "fp8"), attention(q4, k4, v4, "auto"))
    # ComfyUI's convention: k/v may come as [B, S, H, D] (SD3 passes v so)
    assert torch.equal(fp8_attention(q, k.view(b, s, h, d), v.view(b, s, h, d), 3), ref)


def test_fp8_attention_traces_once_under_torch_compile():
    """No Python side effects in the traced path: a mutated global (a call counter) made Dynamo guard on
    its value and recompile on every call, which broke CUDA-graph capture of the compiled model."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    cnt = CompileCounter()
    f = torch.compile(lambda a, b, c: fp8_attention(a * 1.0, b, c, 3), backend=cnt, dynamic=False)
    q, k, v = qkv(2, 37, 3)
    for i in range(4):
        f(q * (i + 1), k, v)
    assert cnt.frame_count == 1


@fp8_gpu
@pytest.mark.parametrize("s", [333, 4250, 128])
@pytest.mark.parametrize("pv_fp8", [True, False])
def test_fp8_attention_matches_fp32_reference_within_fp8_error(s, pv_fp8):
    q, k, v = qkv(2, s, 4, device="cuda", seed=s)
    ref = reference_attention(q.float(), k.float(), v.float(), 4)
    bf16 = rel(reference_attention(q, k, v, 4), ref)
    out = attention_launch(q, k, v, 4, pv_fp8=pv_fp8)
    err = rel(out, ref)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and torch.isfinite(out).all()
    assert err < (0.08 if pv_fp8 else 0.05), err  # E4M3: 3 mantissa bits on Q, K (and P, V)
    assert err > bf16  # it is FP8: not secretly the BF16 path
    if s == 4250:  # tail keys (4250 = 33 x 128 + 26) are masked, not attended as zeros
        q2, k2, v2 = q[:, :4200], k[:, :4200], v[:, :4200]
        ref2 = reference_attention(q2.float(), k2.float(), v2.float(), 4)
        assert rel(attention_launch(q2, k2, v2, 4, pv_fp8=pv_fp8), ref2) < 0.08


@fp8_gpu
@pytest.mark.parametrize("exp", EXP_MODES)
@pytest.mark.parametrize("tiles", [(64, 64), (64, 128), (128, 128)])
def test_every_exp_mode_and_tile_matches_the_reference_like_the_default(exp, tiles):
    """The exp2 variants only change P below E4M3's resolution: the same error as the default kernel, masked
    tails included, never NaN; a token with huge scores (most keys at exp2 of a large negative number)
    gives what the default gives (its softmax is near one-hot, so both are far from fp32 alike)."""
    q, k, v = qkv(2, 4250, 4, device="cuda", seed=5)
    q[0, 7] *= 30.0
    ref = reference_attention(q.float(), k.float(), v.float(), 4)
    default = attention_launch(q, k, v, 4)
    out = attention_launch(q, k, v, 4, (*tiles, 4, 3, False, exp))
    assert torch.isfinite(out).all()
    base = rel(default[:, 8:], ref[:, 8:])
    assert abs(rel(out[:, 8:], ref[:, 8:]) - base) < 0.15 * base, (rel(out[:, 8:], ref[:, 8:]), base)
    if tiles[1] == ATTN_CONFIG[64][1]:  # same K/V blocks and scales: only the exponentials differ
        assert rel(out[0, 7], default[0, 7]) < 0.02


@fp8_gpu
def test_fp8_attention_takes_sd3s_layouts_views_into_a_packed_qkv():
    """What SD3's MMDiT-X attention passes: q/k as [B, S, H·D] and v as a [B, S, H, D] view into the packed
    qkv projection (row stride 3·H·D): the same result as contiguous copies, on the FP8 path."""
    b, s, h, d = 2, 333, 4, 64
    packed = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = packed.movedim(2, 0)  # [B, S, H, D] views, row stride 3·H·D
    q3, k3 = q.reshape(b, s, h * d), k.reshape(b, s, h * d)
    assert v.stride(1) == 3 * h * d
    out = fp8_attention(q3, k3, v, h)
    dense = attention_launch(q3.contiguous(), k3.contiguous(), v.reshape(b, s, h * d).contiguous(), h)
    assert torch.equal(out, dense)
    ref = reference_attention(q3.float(), k3.float(), v.reshape(b, s, h * d).float(), h)
    assert rel(out, ref) < 0.08


@fp8_gpu
def test_fp8_attention_never_overflows_and_follows_each_token_scale():
    q, k, v = qkv(1, 300, 2, device="cuda", seed=3)
    big = fp8_attention(q * 1e4, k * 3e4, v * 5e4, 2)  # far past E4M3's 448: scales are found at run time
    assert torch.isfinite(big).all()
    # scores past 2^32 in log2 units (q = k, 1e5): the softmax shift must be exact for each row's maximum (an
    # FMA'd s·c - m gave inf or all-zero rows there: NaN; found on an H100)
    huge = fp8_attention(q * 1e5, q * 1e5, v, 2)
    assert torch.isfinite(huge).all()
    assert rel(huge, reference_attention((q * 1e5).float(), (q * 1e5).float(), v.float(), 2)) < 0.08
    # a convex combination of V rows, up to E4M3's rounding of P and V (2^-4 each, plus l from unrounded P):
    # bounded by max|V|, never blown up (measured on the H200: 1.16x)
    assert float(big.float().abs().max()) <= 1.25 * float((v * 5e4).float().abs().max())
    qs = q * torch.logspace(-2, 1, 300, device="cuda", dtype=torch.bfloat16)[None, :, None]  # per-token ranges
    ref = reference_attention(qs.float(), k.float(), v.float(), 2)
    out = fp8_attention(qs, k, v, 2)
    assert torch.isfinite(out).all()
    assert rel(out[:, :100], ref[:, :100]) < 0.08  # rows with q x 0.01..0.1 keep their precision (per-row scales)
    # compiled, as the runtime calls it: one opaque op, same result
    f = torch.compile(lambda a, b, c: fp8_attention(a * 1.0, b, c, 2), dynamic=False)
    assert torch.allclose(f(qs, k, v).float(), out.float(), rtol=1e-2, atol=1e-2 * float(out.abs().max()))


@pytest.mark.comfy
def test_every_attention_of_comfyuis_mmdit_reaches_the_fp8_kernel_and_the_fused_joint_forward():
    """Through ComfyUI's real SD3 model code (tiny Large and Medium, CPU, the two hardware checks set as on
    an FP8 GPU): with attention=fp8 every joint (and MMDiT-X) attention call reaches the FP8 kernel with
    Q, K, V as [B, S, H·D] and nothing falls back to SDPA. SD3's MMDiT passes v as [B, S, H, D]: before
    that was handled, every call silently fell back to cuDNN."""
    import json
    import os
    import subprocess
    from comfy_harness import comfy_dir, comfy_python
    if not os.path.isdir(os.path.join(comfy_dir(), "comfy")):
        pytest.skip("ComfyUI is not set up (scripts/setup_env.sh)")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([comfy_python(), os.path.join(here, "support", "comfy_attention_check.py"), comfy_dir()],
                       capture_output=True, text=True, timeout=900)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stderr[-3000:]
    rep = json.loads(line[7:])
    for variant, expect in (("large", 2), ("medium", 3)):  # 2 joint blocks; Medium's block 0 has attn2 too
        got = rep[variant]
        assert got["sdpa_fallbacks"] == 0 and len(got["kernel_calls"]) == expect, got
        for q, k, v, heads, contiguous_last in got["kernel_calls"]:
            assert len(q) == 3 and q == k == v and heads == 2 and contiguous_last
        assert got["max_abs_diff"] < 1e-5 * got["ref_max"]  # the stand-in kernel is exact: same model output
        # the fused joint-block forward (sd35fp8.runtime.joint) is installed on every block and taken for every
        # attention (FP8: its fused op, nothing through the per-call override; SDPA backends: its fused q/k/v op); on
        # the CPU its ops run their torch references, so the model's output is ComfyUI's own
        assert got["joint_installed"] == got["joint_blocks"] and got["joint_removed"], got
        assert got["joint_fp8"]["fp8_calls"] == expect and got["joint_fp8"]["stock_calls"] == 0, got
        # (Medium's image-only attention with a BF16 backend: torch ops, which Inductor fuses faster than our op)
        assert got["joint_math"]["qkv_calls"] == 2 and got["joint_math"]["fp8_calls"] == 0, got
        for backend in ("joint_fp8", "joint_math"):
            assert got[backend]["max_abs_diff"] < 1e-5 * got["ref_max"], (backend, got)
        assert got["joint_no_override_equal"]  # no override of ours in transformer_options: ComfyUI's forward
    # a calibrated static-FP8 model: the joint forward's LayerNorm+modulation+quantization ops (sd35fp8.kernels.norm)
    # run for both streams of every block (the last block's context is pre-only: no post-attention), each MLP's gated
    # residual add runs in fc2's op (sd35fp8.kernels.mlp), and it computes what the static runtime computes through
    # ComfyUI's block code (up to the add's rounding: one fp32 epilogue instead of BF16 GEMM output + BF16 add)
    # Medium: its MMDiT-X image blocks (0-1) take ComfyUI's LayerNorm before their two attentions, and their
    # post-attention (two gated residuals, the MLP) the same fused ops as the joint blocks
    for st in (rep["static"], rep["static_medium"]):
        n, x2 = st["blocks"], st["attn2_blocks"]
        assert st["ln_calls"] == 2 * n - x2 and st["res_calls"] == 2 * n - 1, st
        assert st["fc2_res_calls"] == 2 * n - 1, st
        assert st["finite"] and st["rel_diff"] < 1e-3, st
    assert rep["static"]["attn2_blocks"] == 0 and rep["static_medium"]["attn2_blocks"] == 2
    for st in (rep["static"], rep["static_medium"]):
        assert st["res_int8_calls"] == 0 and st["mlp_modes"] == [["fp8", "fp8"]], st
    # INT8-weight MLPs (W8A8): the per-token INT8 norm op replaces the E4M3 one before every
    # fc1, fc2 still takes the gated residual; the same model output as through ComfyUI's block code
    st = rep["static_int8_mlp"]
    n, x2 = st["blocks"], st["attn2_blocks"]
    assert st["mlp_modes"] == [["int8_token", "int8_static"]] and x2 == 2, st
    assert st["res_int8_calls"] == 2 * n - 1 and st["res_calls"] == 0 and st["ln_calls"] == 2 * n - x2, st
    assert st["fc2_res_calls"] == 2 * n - 1 and st["finite"] and st["rel_diff"] < 1e-3, st


def joint_inputs(b, lc, lx, h, d, norm, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    c = h * d
    ctx = (torch.randn(b, lc, 3 * c, generator=g) * 3 * scale).to(device, torch.bfloat16)
    # the image stream as a strided view (a slice of a wider buffer), as a fused projection could hand it over
    wide = (torch.randn(b, lx, 3 * c + 64, generator=g) * scale).to(device, torch.bfloat16)
    ws = [(torch.rand(d, generator=g) * 2 + 0.2).to(device, torch.bfloat16) if norm else None for _ in range(4)]
    return ctx, wide[..., :3 * c], ws


@fp8_gpu
@pytest.mark.parametrize("lc,lx,d", [(154, 4096, 64), (0, 333, 64), (77, 256, 128)])
@pytest.mark.parametrize("norm", [True, False])
def test_fused_joint_prologue_computes_comfyuis_split_norm_concat(lc, lx, d, norm):
    """sd35fp8.kernels.joint's kernel against the torch reference (ComfyUI's split + per-head RMSNorm with each stream's
    weight + concat): q/k/v for SDPA, and the FP8 attention over them; an empty context (MMDiT-X's image-only
    attention) included."""
    from sd35fp8.kernels.attention import CALLS
    from sd35fp8.kernels.joint import joint_fp8_attention, joint_qkv, joint_qkv_reference
    h = 3
    ctx, x, ws = joint_inputs(2, lc, lx, h, d, norm, "cuda", seed=lc + lx)
    ref = joint_qkv_reference(ctx, x, *ws, 1e-6, h)
    got = joint_qkv(ctx, x, *ws, 1e-6, h)
    for r, t in zip(ref, got):
        assert t.shape == r.shape and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert torch.equal(got[2], ref[2])  # V is a copy
    for r, t in zip(ref[:2], got[:2]):  # q, k: fp32 math, one BF16 rounding each
        assert rel(t, r) < (4e-3 if norm else 1e-7), rel(t, r)
    before = CALLS["joint_kernel"]
    out = joint_fp8_attention(ctx, x, *ws, 1e-6, h)
    assert CALLS["joint_kernel"] == before + 1 and torch.isfinite(out).all()
    unfused = attention_launch(*ref, h)  # the same kernel after the unfused prologue
    exact = reference_attention(*(t.float() for t in ref), h)
    # K is quantized from fp32 here, from BF16 there: P's E4M3 rounding then differs (noise of the size of the
    # FP8 error itself), so the two are compared by their error against the exact attention
    e_fused, e_unfused = rel(out, exact), rel(unfused, exact)
    # (bound: 0.12, not the 0.08 of unit-RMS inputs: the context rows are 3x larger and the norm weights reach
    # 2.2, so scores and P's peaks are larger; measured 0.085-0.094 on an H100, the unfused prologue alike)
    assert e_fused < 0.12 and abs(e_fused - e_unfused) < 0.2 * e_unfused, (e_fused, e_unfused, rel(out, unfused))


@fp8_gpu
@pytest.mark.parametrize("block_n", [64, 128])
def test_fused_joint_attention_with_either_key_block_matches_the_unfused_prologue(monkeypatch, block_n):
    """Both key-block sizes (the default 128 and the earlier 64, ``sd35_bench --attn-config 64,64,4,3,0,1``): the
    joint prologue's K/V scale blocks follow ATTN_CONFIG's BLOCK_N; at SD3.5 Large's joint shape (154 + 4096
    tokens: a partial tail block) the fused path and the unfused prologue + kernel are equally close to the exact
    attention."""
    from sd35fp8.kernels import attention as fa
    from sd35fp8.kernels.joint import joint_fp8_attention, joint_qkv_reference
    monkeypatch.setitem(fa.ATTN_CONFIG, 64, (64, block_n, 4, 3, False, 1))
    h = 3
    ctx, x, ws = joint_inputs(2, 154, 4096, h, 64, True, "cuda", seed=12)
    ref = joint_qkv_reference(ctx, x, *ws, 1e-6, h)
    out = joint_fp8_attention(ctx, x, *ws, 1e-6, h)
    exact = reference_attention(*(t.float() for t in ref), h)
    e_fused, e_unfused = rel(out, exact), rel(attention_launch(*ref, h), exact)
    assert torch.isfinite(out).all()
    assert e_fused < 0.12 and abs(e_fused - e_unfused) < 0.2 * e_unfused, (e_fused, e_unfused)


@fp8_gpu
def test_fused_joint_attention_never_overflows_and_compiles_once():
    from torch._dynamo.testing import CompileCounter
    from sd35fp8.kernels.joint import joint_fp8_attention, joint_qkv_reference
    # no norm: far past 448, and scores past 2^32 (log2 units), where exp2 of the FMA'd shift used to give inf
    # for the row's maximum (the product's rounding): NaN in the output, found by this test on an H100
    ctx, x, ws = joint_inputs(1, 20, 300, 2, 64, False, "cuda", seed=9, scale=3e4)
    out = joint_fp8_attention(ctx, x, *ws, 1e-6, 2)
    assert torch.isfinite(out).all()
    q, k, v = (t.float() for t in joint_qkv_reference(ctx, x, *ws, 1e-6, 2))
    # a convex combination of V rows up to E4M3's rounding of P and V: bounded by max|V|, never blown up
    assert float(out.float().abs().max()) <= 1.25 * float(v.abs().max())
    # scores ~1e9 make the softmax one-hot, and E4M3's 2^-4 rounding of Q and K moves scores by far more than the
    # gaps between a row's top keys, so rows pick other keys than fp32 does (0.28 on the H200): not a precision
    # test (the normalized inputs of SD3.5 are, above), only "not garbage" (unrelated rows give ~1.4)
    assert rel(out, reference_attention(q, k, v, 2)) < 0.5
    torch._dynamo.reset()
    cnt = CompileCounter()
    f = torch.compile(lambda a, b: joint_fp8_attention(a * 1.0, b, *ws, 1e-6, 2), backend=cnt, dynamic=False)
    for i in range(3):
        f(ctx * (i + 1), x)
    assert cnt.frame_count == 1
