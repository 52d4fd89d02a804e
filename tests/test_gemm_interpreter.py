"""fp8/gemm.py's fused MLP kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, in a subprocess: the
variable must be set before Triton loads), so their tile logic is checked where there is no GPU: every epilogue
layout (warp specialization on/off, the epilogue in two column halves) gives the identical result, close to the
unfused computation; masked tails (M, N not multiples of the tile) included. On a GPU, tests/test_cuda.py checks the
compiled kernels."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from fp8 import gemm
from fp8.formats import E4M3
g = torch.Generator().manual_seed(0)
M, K, N = 200, 256, 400   # one full and one masked tile each way at 128 x 256
xq = torch.randn(M, K, generator=g).mul(40).clamp(-448, 448).to(E4M3)
w8 = torch.randn(N, K, generator=g).mul(40).clamp(-448, 448).to(E4M3)
sx, sw = torch.tensor(0.025), torch.tensor(0.0005)
bias = torch.randn(N, generator=g).to(torch.bfloat16) * 0.1
inv = torch.tensor(40.0)
res = torch.randn(M, N, generator=g).to(torch.bfloat16)
gate = torch.randn(2, N, generator=g).to(torch.bfloat16)
configs = [(128, 256, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3, False, True), (128, 256, 128, 8, 8, 3, True, True),
           gemm.FC1_CONFIG, gemm.FC2_CONFIG]
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
