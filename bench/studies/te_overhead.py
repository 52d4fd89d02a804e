"""Per-layer cost of the TransformerEngine backend vs ours at SD3.5 Large shapes (GPU, no ComfyUI).

For each shape: GPU time per call (CUDA events, back-to-back calls) and host time per call (wall clock
of 200 calls with one synchronize: when it exceeds the GPU time, the layer is launch/CPU bound).
A Large denoiser call makes ~377 such FP8 Linear calls, so host microseconds per call x 377 is the
per-step CPU cost that has to hide behind GPU work.

    python3 bench/te_overhead.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/

import torch  # noqa: E402

import sd35fp8 as fp8  # noqa: E402
import common  # noqa: E402  (bench/, this script's folder)
from sd35fp8.runtime import te as te_backend  # noqa: E402
from sd35fp8.runtime.static import RuntimeConfig, set_static  # noqa: E402

SHAPES = [  # (name, rows, in, out): Large, 1024², CFG batch 2
    ("adaLN modulation (x)", 2, 2432, 6 * 2432),
    ("qkv (context, 154 tokens)", 2 * 154, 2432, 3 * 2432),
    ("qkv (x, 4096 tokens)", 2 * 4096, 2432, 3 * 2432),
    ("mlp fc1 (x)", 2 * 4096, 2432, 4 * 2432),
    ("mlp fc2 (x)", 2 * 4096, 4 * 2432, 2432),
]


def host_and_gpu_us(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e6
    return wall, common.back_to_back_ms(fn, n) * 1e3


def main():
    ok, why = te_backend.availability()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {why}")
    rows = []
    for name, m, k, n in SHAPES:
        torch.manual_seed(0)
        lin = fp8.FP8Linear.from_linear(torch.nn.Linear(k, n).cuda(), name="blk.adaLN_modulation.1"
                                        if "adaLN" in name else "blk.mlp.fc1")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        lin.fp8_set_input_amax(float(x.abs().amax()))
        model = torch.nn.Sequential(lin)
        set_static(model, RuntimeConfig())
        with torch.no_grad():
            ours = host_and_gpu_us(lambda: lin(x))
            set_static(model, RuntimeConfig(adaln="fp8"))  # FP8 activations for every shape (as TE does)
            ours_fp8 = host_and_gpu_us(lambda: lin(x))
        from sd35fp8.runtime.static import clear_static
        clear_static(model)
        te = None
        if ok:
            te_backend.set_te(model, fp8.DelayedScaling(), adaln="fp8")  # every shape through TE here
            with te_backend.te_autocast(te_backend.te_recipe(fp8.DelayedScaling())):
                te = host_and_gpu_us(lambda: lin(x))
        rows.append((name, m, k, n, ours, ours_fp8, te))
    print("| layer | rows x in -> out | ours static (host / GPU µs) | ours, FP8 activations | TE delayed |")
    print("|---|---|---|---|---|")
    for name, m, k, n, ours, ofp8, te in rows:
        te_s = f"{te[0]:.0f} / {te[1]:.0f}" if te else "n/a"
        print(f"| {name} | {m} x {k} -> {n} | {ours[0]:.0f} / {ours[1]:.0f} | {ofp8[0]:.0f} / {ofp8[1]:.0f} | {te_s} |")


if __name__ == "__main__":
    main()
