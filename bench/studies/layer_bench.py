#!/usr/bin/env python3
"""Per-layer eager timing of our FP8 linear vs BF16 at SD3.5 Large shapes (1024², CFG batch 2).

    python3 bench/layer_bench.py [--out bench/results/FILE.md]

This is the *unfused* eager path of the foundation (activation quantization is a separate pass); it
is the baseline the fused runtime must beat. CUDA events, median of 20 after 5 warm-up calls.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/
from sd35fp8 import FP8Linear, fp8_autocast  # noqa: E402

SHAPES = [  # (name, tokens M, in, out)
    ("img qkv", 8192, 2432, 7296), ("img proj", 8192, 2432, 2432), ("img fc1", 8192, 2432, 9728),
    ("img fc2", 8192, 9728, 2432), ("txt fc1", 308, 2432, 9728), ("adaLN", 2, 2432, 14592),
]


def timed(fn, n=20, warm=5):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, M, K, N in SHAPES:
        lin = torch.nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
        q = FP8Linear.from_linear(lin, name=name)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        with fp8_autocast(calibrating=True) as s:
            q(x)
        q.fp8_set_input_amax(s.amax()[name])
        with torch.no_grad():
            t_bf16 = timed(lambda: lin(x))
            t_wo = timed(lambda: q(x))
            with fp8_autocast():
                t_fp8 = timed(lambda: q(x))
                err = float((q(x).float() - lin(x).float()).norm() / lin(x).float().norm())
                nan = bool(torch.isnan(q(x)).any())
        rows.append((name, M, K, N, t_bf16, t_wo, t_fp8, err, nan))
    head = "| layer | M | K | N | BF16 µs | FP8 weight-only µs | FP8 static eager µs | FP8/BF16 | rel err | NaN |"
    lines = [head, "|" + "---|" * 10]
    for name, M, K, N, a, b, c, e, nan in rows:
        lines.append(f"| {name} | {M} | {K} | {N} | {a:.0f} | {b:.0f} | {c:.0f} | {c / a:.2f}x | {e:.4f} | {nan} |")
    table = "\n".join(lines)
    meta = (f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
            f"date {datetime.date.today().isoformat()}; command: python3 bench/layer_bench.py")
    print(meta)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Eager FP8 linear vs BF16, per layer (SD3.5 Large shapes)\n\n{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
