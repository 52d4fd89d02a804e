"""Tile/pipelining sweep for the adaLN GEMV (BF16 activations x FP8 weights, fp32 accumulation).

    python3 bench/gemv_tune.py [--all-layers] [--quick]

Prints, per SD3.5 adaLN shape, µs and achieved weight bandwidth of the current GEMV_CONFIG, of the best
config found, and of cuBLAS BF16 F.linear (BF16 weight) for reference.

``--quick``: only the Large batch-2 shape, then ``--all-layers`` for the current and that shape's best config.
``--all-layers``: every adaLN modulation layer of SD3.5 Large (38 blocks x 2 streams, the same input c in all of
them) as today, one launch per layer back to back, against one launch over all their weights concatenated (per-row
scales): what computing every block's modulation at once would buy (full-depth profile, 2026-12-02: 76 launches,
1.42 ms per call, ~1.9 TB/s of FP8 weight).
"""
from __future__ import annotations

import itertools
import os
import sys

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/

import torch  # noqa: E402
import triton.testing  # noqa: E402

from sd35fp8.kernels.gemv import GEMV_CONFIG, gemv_launch  # noqa: E402
from sd35fp8.core.quant import quantize_weight  # noqa: E402

SHAPES = [("Large adaLN, batch 2", 2, 2432, 6 * 2432), ("Large last context adaLN", 2, 2432, 2 * 2432),
          ("Medium adaLN (x, MMDiT-X)", 2, 1536, 9 * 1536), ("Large adaLN, batch 8", 8, 2432, 6 * 2432)]
CONFIGS = [c for c in itertools.product((16, 32, 64, 128), (64, 128, 256, 512), (4, 8), (2, 3, 4, 6))
           if c[0] * c[1] <= 64 * 512]


def all_layers(depth: int = 38, hidden: int = 2432, configs=None) -> None:
    """76 per-layer launches (the model's adaLN GEMVs, the last block's context layer 2·hidden wide) vs one launch
    over the concatenated weights, for the current config and the best of CONFIGS."""
    torch.manual_seed(0)
    outs = [6 * hidden] * (2 * depth - 1) + [2 * hidden]
    layers = [quantize_weight(torch.randn(n, hidden, device="cuda") * 0.02) for n in outs]
    biases = [torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.02 for n in outs]
    x = torch.randn(2, hidden, device="cuda", dtype=torch.bfloat16)
    w_all = torch.cat([w for w, _ in layers])
    s_all = torch.cat([s.expand(w.shape[0]) for w, s in layers]).contiguous()
    b_all = torch.cat(biases)
    nbytes = w_all.numel()

    def per_layer(c):
        return [gemv_launch(x, w, s, b, c) for (w, s), b in zip(layers, biases)]

    ref = torch.cat(per_layer(GEMV_CONFIG), 1).float()
    print(f"| config | {len(layers)} launches µs (TB/s) | one launch µs (TB/s) | max abs diff |\n|---|---|---|---|")
    best = None
    for c in [GEMV_CONFIG] + [c for c in (configs or CONFIGS) if c != GEMV_CONFIG]:
        try:
            y = gemv_launch(x, w_all, s_all, b_all, c)
            t_one = triton.testing.do_bench(lambda: gemv_launch(x, w_all, s_all, b_all, c)) * 1e3
            t_many = triton.testing.do_bench(lambda: per_layer(c)) * 1e3
        except Exception:  # noqa: BLE001 - configs that do not compile/fit
            continue
        diff = float((y.float() - ref).abs().max())
        print(f"| {c} | {t_many:.0f} ({nbytes / t_many / 1e6:.2f}) | {t_one:.0f} ({nbytes / t_one / 1e6:.2f}) | "
              f"{diff:.2e} |", flush=True)
        if best is None or t_one < best[1]:
            best = (c, t_one)
    if best is None:  # every config failed (the kernel's int32 row offsets overflow past 2^31 weight bytes)
        print(f"no config ran one launch over {nbytes / 2**30:.2f} GiB of FP8 weights")
        return
    print(f"best one-launch config {best[0]}: {best[1]:.0f} µs for {nbytes / 2**30:.2f} GiB of FP8 weights")


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    if "--all-layers" in sys.argv:
        return all_layers()
    best_overall = {}
    rows = []
    quick = "--quick" in sys.argv
    for name, m, k, n in SHAPES[:1] if quick else SHAPES:
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
        print(f"| {name} | {m} x {k} -> {n} | {cur:.1f} ({gbs(cur):.0f}) | {best} | {tb:.1f} ({gbs(tb):.0f}) "
              f"| {t16:.1f} |")
    pick = min(best_overall, key=best_overall.get)
    print(f"best config summed over the shapes: {pick} (current {GEMV_CONFIG})")
    if quick:
        all_layers(configs=[pick])


if __name__ == "__main__":
    main()
