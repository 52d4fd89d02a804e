"""Tile/pipelining sweep for the adaLN GEMV (BF16 activations x FP8 weights, fp32 accumulation).

    python3 bench/gemv_tune.py

Prints, per SD3.5 adaLN shape, µs and achieved weight bandwidth of the current GEMV_CONFIG, of the best
config found, and of cuBLAS BF16 F.linear (BF16 weight) for reference.
"""
from __future__ import annotations

import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from fp8.kernels import GEMV_CONFIG, gemv_launch  # noqa: E402
from fp8.quant import quantize_weight  # noqa: E402

SHAPES = [("Large adaLN, batch 2", 2, 2432, 6 * 2432), ("Large last context adaLN", 2, 2432, 2 * 2432),
          ("Medium adaLN (x, MMDiT-X)", 2, 1536, 9 * 1536), ("Large adaLN, batch 8", 8, 2432, 6 * 2432)]
CONFIGS = [c for c in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8), (2, 3, 4))
           if c[0] * c[1] <= 64 * 256]


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    best_overall = {}
    rows = []
    for name, m, k, n in SHAPES:
        torch.manual_seed(0)
        w8, s = quantize_weight(torch.randn(n, k, device="cuda") * 0.02)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), w8.float() * s, b.float())
        wb = w8.to(torch.bfloat16) * s.to(torch.bfloat16)
        t_bf16 = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, wb, b)) * 1e3
        res = {}
        for c in CONFIGS:
            try:
                y = gemv_launch(x, w8, s, b, c)
                if float((y.float() - ref).norm() / ref.norm()) > 1e-2:
                    continue
                res[c] = triton.testing.do_bench(lambda: gemv_launch(x, w8, s, b, c)) * 1e3
            except Exception:  # noqa: BLE001 - configs that do not compile/fit
                continue
        for c, t in res.items():
            best_overall[c] = best_overall.get(c, 0.0) + t
        best = min(res, key=res.get)
        gbs = lambda t: n * k / t / 1e3  # noqa: E731  (weight bytes / µs -> GB/s)
        rows.append((name, m, k, n, res.get(GEMV_CONFIG), best, res[best], t_bf16, gbs))
    print("| shape | rows x in -> out | current config µs (GB/s) | best config | best µs (GB/s) | cuBLAS BF16 µs |")
    print("|---|---|---|---|---|---|")
    for name, m, k, n, cur, best, tb, t16, gbs in rows:
        print(f"| {name} | {m} x {k} -> {n} | {cur:.1f} ({gbs(cur):.0f}) | {best} | {tb:.1f} ({gbs(tb):.0f}) | {t16:.1f} |")
    pick = min(best_overall, key=best_overall.get)
    print(f"best config summed over the shapes: {pick} (current {GEMV_CONFIG})")


if __name__ == "__main__":
    main()
