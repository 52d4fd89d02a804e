"""sd35fp8/kernels/mlp.py's fused MLP kernels (E4M3 and INT8 operands) and sd35fp8/kernels/norm.py's INT8 output run
through Triton's CPU interpreter (TRITON_INTERPRET=1, in a subprocess: the variable must be set before Triton loads), so
their tile logic is checked where there is no GPU: every epilogue layout (warp specialization on/off, the epilogue in
two column halves) gives the identical result, close to the unfused computation; masked tails (M, N not multiples of the
tile) included. On a GPU, tests/test_cuda.py and tests/test_norm.py check the compiled kernels."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from sd35fp8.kernels import mlp as gemm
from sd35fp8.core.formats import E4M3
g = torch.Generator().manual_seed(0)
M, K, N = 200, 256, 400   # one full and one masked tile each way at 128 x 256 (more at the 64-row tiles)
xq = torch.randn(M, K, generator=g).mul(40).clamp(-448, 448).to(E4M3)
w8 = torch.randn(N, K, generator=g).mul(40).clamp(-448, 448).to(E4M3)
sx, sw = torch.tensor(0.025), torch.tensor(0.0005)
bias = torch.randn(N, generator=g).to(torch.bfloat16) * 0.1
inv = torch.tensor(40.0)
res = torch.randn(M, N, generator=g).to(torch.bfloat16)
gate = torch.randn(2, N, generator=g).to(torch.bfloat16)
configs = [(128, 256, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3, False, True), (128, 256, 128, 8, 8, 3, True, True),
           gemm.FC1_CONFIG, gemm.FC2_CONFIG, (64, 128, 128, 8, 4, 4), (64, 64, 128, 8, 4, 6)]  # + few-tile configs
ref1 = gemm.reference(xq, w8, sx, sw, bias, inv).float()
ref2 = gemm.residual_reference(xq, w8, sx, sw, bias, res, gate).float()
out = {"fc1": [], "fc2": []}
base1 = base2 = None
for cfg in configs:
    o1 = gemm._launch(xq, w8, sx, sw, bias, inv, "tanh", cfg).float()
    o2 = gemm._launch_residual(xq, w8, sx, sw, bias, res, gate, False, cfg).float()
    base1 = o1 if base1 is None else base1
    base2 = o2 if base2 is None else base2
    out["fc1"].append({"equal": bool(torch.equal(o1, base1)),
                       "mismatch": float((o1 - ref1).abs().gt(ref1.abs() * 0.13 + 1e-2).float().mean())})
    out["fc2"].append({"equal": bool(torch.equal(o2, base2)),
                       "off_by_more_than_a_bf16_step":
                           float(((o2 - ref2).abs() > ref2.abs() * 2**-7 + 1e-3).float().mean())})
# INT8 (W8A8): per-token input scales into fc1, INT8 out at a static scale (some values saturate); fc2 per tensor
from sd35fp8.core.quant import quantize_weight
x = torch.randn(M, K, generator=g) * 2
sx8 = (x.abs().amax(1) / 127).clamp_min(1e-8)
x8 = (x / sx8[:, None]).round().clamp(-127, 127).to(torch.int8)
w1, s1 = quantize_weight(torch.randn(N, K, generator=g) * 0.02, "int8_per_channel")
inv8 = torch.tensor(127 / 1.5)
r1 = gemm.reference(x8, w1, sx8, s1, bias, inv8).int()
r2 = gemm.residual_reference(x8, w1, torch.tensor(0.02), s1, bias, res, gate).float()
out["int8"] = []
for cfg in configs:
    o1 = gemm._launch(x8, w1, sx8, s1, bias, inv8, "tanh", cfg)
    o2 = gemm._launch_residual(x8, w1, torch.tensor(0.02), s1, bias, res, gate, False, cfg).float()
    out["int8"].append({"dtype": str(o1.dtype), "max_step": int((o1.int() - r1).abs().max()),
                        "differ": float((o1.int() != r1).float().mean()),
                        "saturated": int((r1.abs() == 127).sum()),
                        "fc2_off": float(((o2 - r2).abs() > r2.abs() * 2**-7 + 1e-3).float().mean())})
print(json.dumps(out))
"""


def test_every_epilogue_layout_gives_the_same_result_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", SCRIPT, REPO], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for row in out["fc1"]:
        assert row["equal"], out
        assert row["mismatch"] < 0.05, out  # E4M3 output: values one step apart where rounding differs
    for row in out["fc2"]:
        assert row["equal"], out
        assert row["off_by_more_than_a_bf16_step"] == 0.0, out  # one BF16 rounding of res + gate·fc2(h)
    for row in out["int8"]:  # exact int32 accumulation: at most one INT8 step where fp32 rounding ties differ
        assert row["dtype"] == "torch.int8" and row["max_step"] <= 1 and row["saturated"] > 0, out
        assert row["differ"] < 1e-3, out  # rounds to nearest (a truncating cast alone differs in ~half)
        assert row["fc2_off"] == 0.0, out


def test_int8_quantization_rounds_half_to_even_clamps_and_zeroes_nan():
    import torch
    from sd35fp8.core.formats import quantize_inv_int8
    x = torch.tensor([0.5, -0.5, 1.5, 1.49, -2.5, -2.51, 300.0, -300.0, float("nan"), 0.0])
    assert quantize_inv_int8(x, torch.tensor(1.0)).tolist() == [0, 0, 2, 1, -2, -3, 127, -127, 0, 0]
    assert quantize_inv_int8(torch.tensor([0.3]), torch.tensor(10.0)).tolist() == [3]


NORM_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from sd35fp8.kernels import norm
g = torch.Generator().manual_seed(0)
B, L, C = 2, 5, 96   # C not a power of two: masked columns
x = torch.randn(B, L, C, generator=g).bfloat16()
y = torch.randn(B, L, C, generator=g).bfloat16()
gate, shift, scale = (torch.randn(B, 3 * C, generator=g).bfloat16()[:, i * C:(i + 1) * C] for i in range(3))
xo, h8, rs = norm._launch_int8(x, y, gate, shift, scale, 1e-6)
# from the kernel's own residual (the interpreter rounds fp32 -> BF16 its own way): LayerNorm, modulation, INT8
_, rh, rrs = norm.reference_int8(xo, None, None, shift, scale, 1e-6)
x[1, 2, 5] = float("nan")
_, h8n, rsn = norm._launch_int8(x, y, gate, shift, scale, 1e-6)
others = rsn[torch.arange(10) != 7]
print(json.dumps({"dtype": str(h8.dtype), "differ": float((h8 != rh).float().mean()),
                  "scale_rel": float((rs - rrs).abs().max() / rrs.abs().max()),
                  "saturated": int((h8.abs() == 127).sum()), "nan_scale": bool(torch.isnan(rsn[7])),
                  "others_finite": bool(torch.isfinite(others).all())}))
"""


def test_norm_kernel_int8_output_in_the_interpreter():
    """sd35fp8.kernels.norm's residual + LayerNorm + modulation kernel with the W8A8 MLP's INT8 output: one scale per
    row (amax / 127) and the INT8 row exactly as the reference quantizes it; a row with NaN gets a NaN scale (the NaN
    stays visible in fc1's product), the other rows are untouched."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", NORM_SCRIPT, REPO], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "torch.int8" and out["differ"] == 0.0 and out["scale_rel"] < 1e-6, out
    assert out["saturated"] >= 10 and out["nan_scale"] and out["others_finite"], out  # each row's max is ±127


def test_small_outputs_take_the_few_tile_config():
    """Both MLP kernels switch to their FEW_TILES config where the default tiles would leave SMs idle (the text
    stream's 308 rows): that is the config the text-stream sweeps set (CPU tensors count 4 SMs)."""
    import torch
    from sd35fp8.kernels import mlp as gemm
    cpu = torch.device("cpu")
    main, few = (128, 256, 128, 8, 8, 4), (64, 128, 128, 8, 4, 4)
    assert gemm._default_config(100, 200, cpu, main, few) == few  # 1 tile < 4 SMs
    assert gemm._default_config(256, 512, cpu, main, few) == main  # 4 tiles
    assert gemm._default_config(129, 512, cpu, main, few) == main  # 2 x 2 tiles, a masked tail row tile


def test_int8_operands_take_their_own_configs_and_the_benchmarks_can_override_them():
    """INT8 (W8A8) launches read the *_INT8 configs, E4M3 launches the plain ones; bench/tune/gemm_configs.py (what
    bench/tune/fc1_sweep.py --text/--int8-configs prints) overrides them for benchmarks; unknown names or malformed
    configs are refused with the name in the message."""
    import subprocess as sp
    import pytest
    from sd35fp8.kernels import mlp as gemm
    old = gemm.FC1_CONFIG_INT8, gemm.FC2_CONFIG_FEW_TILES_INT8
    try:
        gemm.FC1_CONFIG_INT8 = (256, 128, 128, 8, 8, 3, True, False)
        gemm.FC2_CONFIG_FEW_TILES_INT8 = (64, 64, 128, 8, 4, 6)
        assert gemm._configs(True)[0] == (256, 128, 128, 8, 8, 3, True, False)
        assert gemm._configs(True)[3] == (64, 64, 128, 8, 4, 6)
        assert gemm._configs(False)[0] == gemm.FC1_CONFIG and gemm._configs(False)[3] == gemm.FC2_CONFIG_FEW_TILES
    finally:
        gemm.FC1_CONFIG_INT8, gemm.FC2_CONFIG_FEW_TILES_INT8 = old
    from bench.tune import gemm_configs
    got = gemm_configs.configs_from_env('{"FC2_CONFIG_INT8": [128, 128, 128, 8, 8, 4, true, true]}')
    assert got == {"FC2_CONFIG_INT8": (128, 128, 128, 8, 8, 4, True, True)}
    assert gemm_configs.configs_from_env("") == {}
    for bad, what in (('{"FC9": [1, 2, 3, 4, 5, 6]}', "unknown config 'FC9'"),
                      ('{"FC1_CONFIG": [128, 256]}', "FC1_CONFIG"),
                      ("[1]", "JSON object"), ("{", "not JSON")):
        with pytest.raises(ValueError, match=what):
            gemm_configs.configs_from_env(bad)
    try:
        gemm_configs.apply('{"FC1_CONFIG_FEW_TILES_INT8": [64, 256, 128, 8, 4, 4]}')
        assert gemm._configs(True)[1] == (64, 256, 128, 8, 4, 4) and gemm._configs(False)[1] == gemm.FC1_CONFIG
    finally:
        gemm.FC1_CONFIG_FEW_TILES_INT8 = gemm.FC1_CONFIG_FEW_TILES
    # the product reads no environment variable for its kernels (the sweeps' configs are a benchmark option only)
    code = "import sd35fp8.kernels.mlp as g; print(g.FC1_CONFIG_FEW_TILES_INT8)"
    env = dict(os.environ, SD35FP8_GEMM_CONFIGS='{"FC1_CONFIG_FEW_TILES_INT8": [64, 256, 128, 8, 4, 4]}')
    r = sp.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == str(gemm.FC1_CONFIG_FEW_TILES_INT8), r.stderr[-2000:]
