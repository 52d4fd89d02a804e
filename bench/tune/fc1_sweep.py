#!/usr/bin/env python3
"""Tile/pipeline sweep of the fused MLP kernels (sd35fp8/kernels/mlp.py) at SD3.5 shapes, against cuBLAS's FP8 GEMM
(``torch._scaled_mm``, BF16 out): fc1's kernel replaces that GEMM plus a GELU+cast pass, so it wins where it is
within that pass's time of cuBLAS; fc2's (``--fc2``) replaces the GEMM plus the gated residual add, timed here
as cuBLAS + that add compiled.

    python3 bench/fc1_sweep.py [--fc2]    # Large (hidden 2432) and Medium (1536), CFG batch 2
    python3 bench/fc1_sweep.py --int8     # the W8A8 INT8 kernels vs the E4M3 ones: µs and the MLP's error
    python3 bench/fc1_sweep.py --int8 --large-int8   # only Large's INT8 kernels, every config
    python3 bench/fc1_sweep.py --gelu     # fc1's epilogue GELU instructions (sd35fp8.kernels.mlp.GELU_IMPL 0/1/2), both
    formats python3 bench/fc1_sweep.py --text [--both] [--int8-configs] [--json FILE]
        # CUDA-graph-timed picks: the text stream's few-tile configs (INT8; --both: E4M3 too), the INT8 image-stream
        # configs; prints (and writes to FILE) the JSON that sd35fp8.kernels.mlp's SD35FP8_GEMM_CONFIGS takes

``--int8`` times fc1 and fc2 with INT8 operands (per-token input scales into fc1, INT8 output at a static scale,
per-row weight scales) against the same kernels with E4M3 operands, for a few configs each, and the MLP's relative
error (fc1 → GELU → fc2 with the gated residual, branch only) vs fp32 for both formats: the speed question the INT8
MLP for the fidelity target has to answer first.
"""
from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/

import torch  # noqa: E402
import triton.testing  # noqa: E402

from sd35fp8.core.formats import E4M3  # noqa: E402
from sd35fp8.kernels.mlp import FC1_CONFIG, FC2_CONFIG, _launch, _launch_residual, reference, residual_reference  # noqa: E402,E501

# tiles and pipelining, then the default tiles with warp specialization and/or the epilogue in two halves (the 7th
# and 8th fields of the kernels' configs)
CONFIGS = [FC1_CONFIG, (128, 256, 128, 8, 8, 4), (128, 256, 64, 8, 8, 4), (256, 128, 128, 8, 8, 3),
           (128, 128, 128, 8, 8, 4), (128, 256, 128, 16, 8, 3)]
CONFIGS += [(*c, ws, sub) for c in ((128, 256, 128, 8, 8, 3), (128, 256, 128, 8, 8, 4), (128, 256, 64, 8, 8, 4),
                                    (128, 128, 128, 8, 4, 4), (256, 128, 128, 8, 8, 3))
            for ws, sub in ((False, True), (True, False), (True, True))]
# 64-row tiles (one warpgroup): for the text stream's 308 rows, whose 128-row tiles leave most SMs idle
FEW_TILE_CONFIGS = [(64, 128, 128, 8, 4, 4), (64, 256, 128, 8, 4, 4), (64, 128, 128, 8, 4, 6, True, False),
                    (64, 64, 128, 8, 4, 6)]
CONFIGS += FEW_TILE_CONFIGS


def sweep(name, cub, run, ref):
    """Time ``run(cfg)`` for every config; print each; return (best config, ms)."""
    best = None
    for cfg in CONFIGS:
        try:
            out = run(cfg)
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=10, rep=100)
        except Exception as e:  # noqa: BLE001 - configs that do not fit are skipped
            print(f"  {cfg}: failed ({type(e).__name__})", flush=True)
            continue
        bad = float((out.float() - ref).abs().gt(ref.abs() * 0.13 + 1e-2).float().mean())
        print(f"  {cfg}: {ms * 1e3:.1f} us (x{ms / cub:.3f} cuBLAS) mismatch {bad:.2e}", flush=True)
        if best is None or ms < best[1]:
            best = (cfg, ms)
    return best


def gemm_data(m: int, k: int, n: int):
    """(generator, E4M3 x [m, k], E4M3 w [n, k], x scale, w scale, BF16 bias [n]) on the GPU, seeded."""
    g = torch.Generator(device="cuda").manual_seed(0)
    xq = torch.randn(m, k, device="cuda", generator=g).mul(40).clamp(-448, 448).to(E4M3)
    w8 = torch.randn(n, k, device="cuda", generator=g).mul(40).clamp(-448, 448).to(E4M3)
    sx, sw = torch.tensor(0.025, device="cuda"), torch.tensor(0.0005, device="cuda")
    return g, xq, w8, sx, sw, torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) * 0.1


def print_table(what: str, table: list, current) -> None:
    print(f"\n| shape | {what} µs | best fused µs | config | current |")
    print("|---|---|---|---|---|")
    for name, cub, (cfg, ms) in table:
        print(f"| {name} | {cub * 1e3:.1f} | {ms * 1e3:.1f} | {cfg} | {current} |")


def fc2_main():
    table = []
    for name, m, n in (("Large fc2", 8192, 2432), ("Medium fc2", 8192, 1536), ("Large fc2 text", 308, 2432)):
        k = 4 * n
        g, xq, w8, sx, sw, bias = gemm_data(m, k, n)
        res = torch.randn(m, n, device="cuda", generator=g).to(torch.bfloat16)
        gate = torch.randn(2, 6 * n, device="cuda", generator=g).to(torch.bfloat16)[:, 5 * n:]
        ref = residual_reference(xq, w8, sx, sw, bias, res, gate).float()
        add = torch.compile(lambda r, gt, y: (r.view(2, -1, n) + gt.unsqueeze(1) * y.view(2, -1, n)).view(m, n))

        def unfused():
            return add(res, gate, torch._scaled_mm(xq, w8.t(), sx, sw, bias=bias, out_dtype=torch.bfloat16,
                                                   use_fast_accum=True))
        unfused()
        cub = triton.testing.do_bench(unfused, warmup=25, rep=200)
        print(f"{name}: cuBLAS _scaled_mm + compiled gated add {cub * 1e3:.1f} us", flush=True)
        best = sweep(name, cub, lambda cfg: _launch_residual(xq, w8, sx, sw, bias, res, gate, False, cfg), ref)
        table.append((name, cub, best))
    print_table("cuBLAS GEMM + add", table, FC2_CONFIG)


# BLOCK_K 256: Triton never pipelines an INT8 (int32-accumulator) MMA across loop iterations (its WGMMA pipeliner
# makes only fp32-accumulator dots "properly async"; the SASS waits for every MMA before the next load/issue), so
# each K step pays a bubble; twice the K per step halves the bubbles (2 stages fit in 227 KB of shared memory).
# Measured slower (H200, 2026-12-02: Large fc1 491.9 / fc2 494.6 µs at 128x256x256 vs 349.6 / 330.5 for the
# defaults; bench/results/2026-12-02_h200_sd35_bench_int8_mlp_full_depth.md): two stages do not hide the loads
INT8_CONFIGS = [FC1_CONFIG, FC2_CONFIG, (128, 256, 128, 8, 8, 3), (128, 256, 128, 8, 8, 4, True, True),
                (128, 128, 128, 8, 8, 4, True, True), (128, 256, 256, 8, 8, 2, True, False),
                (128, 256, 256, 8, 8, 2, True, True), (128, 128, 256, 8, 8, 3, True, True),
                (128, 128, 256, 8, 4, 3, True, True), *FEW_TILE_CONFIGS]


def mlp_operands(fmt: str, x, w1, w2):
    """(x_q, x_scale, fc1 weight and scale, fc2 weight and scale, h scale) of one format: INT8 per token / per row,
    or E4M3 per tensor; fc2's input scale from the exact hidden activation's amax (a calibrated static scale)."""
    from sd35fp8.core.formats import saturating_cast
    from sd35fp8.linear import int8_quantize_rows
    from sd35fp8.core.quant import quantize_weight
    h_amax = torch.nn.functional.gelu(torch.nn.functional.linear(x, w1), approximate="tanh").abs().amax()
    if fmt == "int8":
        return (*int8_quantize_rows(x), *quantize_weight(w1, "int8_per_channel"),
                *quantize_weight(w2, "int8_per_channel"), (h_amax / 127).reshape(()))
    sx = (x.abs().amax() / 448).reshape(())
    return saturating_cast(x, sx), sx, *quantize_weight(w1), *quantize_weight(w2), (h_amax / 448).reshape(())


def mlp_data(m: int, c: int):
    """Seeded fp32 MLP data on the GPU: x [m, c], w1 [4c, c], w2 [c, 4c], BF16 biases, residual and per-sample gate
    (2 samples), and the exact gated MLP branch gate·fc2(gelu(fc1(x))) in fp32."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, c, device="cuda", generator=g)
    w1 = torch.randn(4 * c, c, device="cuda", generator=g) * 0.02
    w2 = torch.randn(c, 4 * c, device="cuda", generator=g) * 0.02
    b1, b2 = (torch.randn(n, device="cuda", generator=g).bfloat16() * 0.02 for n in (4 * c, c))
    res = torch.randn(m, c, device="cuda", generator=g).bfloat16()
    gate = torch.randn(2, c, device="cuda", generator=g).bfloat16()
    h = torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1.float()), approximate="tanh")
    exact = (gate.float()[:, None] * torch.nn.functional.linear(h, w2, b2.float()).view(2, -1, c)).view(m, c)
    return x, w1, w2, b1, b2, res, gate, exact


def int8_main(shapes=("Large", "Medium"), formats=("e4m3", "int8")):
    print("| shape | format | fc1 µs (best config) | fc2 µs (best config) | MLP branch err vs fp32 |")
    print("|---|---|---|---|---|")
    for name, m, c in (("Large", 8192, 2432), ("Medium", 8192, 1536), ("Large text", 308, 2432)):
        if name not in shapes:
            continue
        x, w1, w2, b1, b2, res, gate, exact = mlp_data(m, c)
        for fmt in formats:
            xq, sx, q1, s1, q2, s2, sh = mlp_operands(fmt, x, w1, w2)
            t1, t2 = {}, {}
            for cfg in INT8_CONFIGS:
                try:
                    h8 = _launch(xq, q1, sx, s1, b1, 1 / sh, "tanh", cfg)
                    t1[cfg] = triton.testing.do_bench(lambda: _launch(xq, q1, sx, s1, b1, 1 / sh, "tanh", cfg))
                    _launch_residual(h8, q2, sh, s2, b2, res, gate, False, cfg)
                    t2[cfg] = triton.testing.do_bench(
                        lambda: _launch_residual(h8, q2, sh, s2, b2, res, gate, False, cfg))
                except Exception as e:  # noqa: BLE001 - configs that do not fit are skipped
                    print(f"  {fmt} {cfg}: failed ({type(e).__name__}: {str(e)[:120]})", flush=True)
            h8 = _launch(xq, q1, sx, s1, b1, 1 / sh, "tanh")
            out = _launch_residual(h8, q2, sh, s2, b2, res, gate)
            err = float((out.float() - res.float() - exact).norm() / exact.norm())
            c1, c2 = min(t1, key=t1.get), min(t2, key=t2.get)
            print(f"| {name} | {fmt} | {t1[c1] * 1e3:.1f} {c1} | {t2[c2] * 1e3:.1f} {c2} | {err:.4f} |", flush=True)
            for cfg in INT8_CONFIGS:
                if cfg in t1 and cfg in t2:
                    print(f"  {fmt} {cfg}: fc1 {t1[cfg] * 1e3:.1f} µs, fc2 {t2[cfg] * 1e3:.1f} µs", flush=True)


def gelu_main():
    """fc1 with each of sd35fp8.kernels.mlp.GELU_IMPL's epilogue GELUs (default config), E4M3 and INT8: µs, the share of
    outputs that differ from the unfused fp32 reference (E4M3 by more than a step's tolerance, INT8 by any step) and the
    MLP branch's error vs fp32 (what the model sees)."""
    from sd35fp8.kernels.mlp import reference as fc1_reference
    print("| shape | format | GELU_IMPL | fc1 µs | outputs off the reference | INT8 max step diff | MLP err vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, m, c in (("Large", 8192, 2432), ("Medium", 8192, 1536)):
        x, w1, w2, b1, b2, res, gate, exact = mlp_data(m, c)
        for fmt in ("e4m3", "int8"):
            xq, sx, q1, s1, q2, s2, sh = mlp_operands(fmt, x, w1, w2)
            ref = fc1_reference(xq, q1, sx, s1, b1, 1 / sh).float()
            for impl in (0, 1, 2):
                h8 = _launch(xq, q1, sx, s1, b1, 1 / sh, "tanh", gelu_impl=impl)
                ms = triton.testing.do_bench(lambda: _launch(xq, q1, sx, s1, b1, 1 / sh, "tanh", gelu_impl=impl),
                                             warmup=25, rep=200)
                d = (h8.float() - ref).abs()
                off = float((d > (0 if fmt == "int8" else ref.abs() * 0.13 + 1e-2)).float().mean())
                out = _launch_residual(h8, q2, sh, s2, b2, res, gate)
                err = float((out.float() - res.float() - exact).norm() / exact.norm())
                step = f"{float(d.max()):.0f}" if fmt == "int8" else "-"
                print(f"| {name} | {fmt} | {impl} | {ms * 1e3:.1f} | {off:.2e} | {step} | {err:.5f} |", flush=True)


# the text stream (CFG batch 2 x 154 tokens = 308 rows): 128-row tiles give 3 row tiles, so fc2's 2432 (Large) or
# 1536 (Medium) columns make 18-57 tiles for 132 SMs, each over all of K = 4 x hidden; 64-row tiles give 5 row tiles
TEXT_CONFIGS = [(128, 256, 128, 8, 8, 4, True, False), (128, 128, 128, 8, 8, 4), (128, 64, 128, 8, 4, 4),
                (64, 128, 128, 8, 4, 4), (64, 256, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4, True, False),
                (64, 64, 128, 8, 4, 6), (64, 64, 256, 8, 4, 4)]
# INT8 (W8A8) image-stream candidates: Triton waits for every int32-accumulator MMA, so more consumer warpgroups
# per tile (256-row tiles, 16 warps) may hide those waits behind each other
INT8_IMAGE_CONFIGS = [(128, 256, 128, 8, 8, 4, True, False), (128, 256, 128, 8, 8, 3, True, True),
                      (256, 128, 128, 8, 8, 3, True, False), (256, 128, 128, 8, 8, 4, True, True),
                      (256, 128, 128, 8, 16, 4, True, False), (256, 256, 64, 8, 16, 3, True, False),
                      (128, 256, 128, 8, 16, 4, True, False), (128, 128, 128, 8, 8, 5, True, False)]


def graph_us(fn, reps: int = 10) -> float:
    """µs per call of ``fn`` replayed from a CUDA graph (no host launch cost: small kernels are not timed as the
    Python that launches them), with L2 flushed before each call as in the model (other layers' weights evict
    these); the flush's own time is measured alone and subtracted."""
    import statistics
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def timed(body):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                body()
        g.replay()
        ts = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / reps)
        return statistics.median(ts)

    both = timed(lambda: (flush.zero_(), fn()))
    return both - timed(flush.zero_)


def _pick(name: str, times: dict, default: tuple, picks: dict, margin: float = 0.02) -> None:
    """Set ``picks[name]`` to the fastest config where it beats ``default`` by more than ``margin`` (noise)."""
    best = min(times, key=times.get)
    if default in times and best != default and times[best] < times[default] * (1 - margin):
        picks[name] = list(best)


def _time_configs(label: str, configs, run, ref, exact: bool) -> dict:
    """µs of ``run(cfg)`` per config (CUDA-graph timing); configs that fail or differ from ``ref`` are left out
    (INT8: must be bit-identical; E4M3: within one E4M3 step's tolerance)."""
    t = {}
    for cfg in configs:
        try:
            out = run(cfg)
            ok = bool(torch.equal(out, ref)) if exact else bool(
                (out.float() - ref.float()).abs().le(ref.float().abs() * 0.13 + 1e-2).all())
            if not ok:
                print(f"  {label} {cfg}: differs from the default's output, left out", flush=True)
                continue
            t[cfg] = graph_us(lambda: run(cfg))
        except Exception as e:  # noqa: BLE001 - configs that do not fit are skipped
            print(f"  {label} {cfg}: failed ({type(e).__name__}: {str(e)[:100]})", flush=True)
            continue
        print(f"  {label} {cfg}: {t[cfg]:.1f} us", flush=True)
    return t


def tune_main(text: bool, image_int8: bool, formats=("int8",), out_json: str | None = None):
    """CUDA-graph-timed sweeps that pick sd35fp8.kernels.mlp's configs: the text stream's few-tile configs (``text``)
    and the INT8 image-stream configs (``image_int8``), SD3.5 Large shapes. Prints a table and the picks as the JSON
    that ``SD35FP8_GEMM_CONFIGS`` takes (only configs more than 2% faster than the current default)."""
    import json
    from sd35fp8.kernels import mlp as gemm
    rows, picks = [], {}
    shapes = ([("Large text", 308, 2432)] if text else []) + ([("Large", 8192, 2432)] if image_int8 else [])
    for name, m, c in shapes:
        x, w1, w2, b1, b2, res, gate, exact = mlp_data(m, c)
        for fmt in (formats if m < 1024 else ("int8",)):
            int8 = fmt == "int8"
            xq, sx, q1, s1, q2, s2, sh = mlp_operands(fmt, x, w1, w2)
            h8 = _launch(xq, q1, sx, s1, b1, 1 / sh, "tanh")
            sfx = "_INT8" if int8 else ""
            few = m < 1024
            layers = (("fc1", 4 * c, lambda cfg: _launch(xq, q1, sx, s1, b1, 1 / sh, "tanh", cfg)),
                      ("fc2", c, lambda cfg: _launch_residual(h8, q2, sh, s2, b2, res, gate, False, cfg)))
            for layer, n, run in layers:
                cname = f"{layer.upper()}_CONFIG{'_FEW_TILES' if few else ''}{sfx}"
                cfgs = gemm._configs(int8)  # (fc1 main, fc1 few-tile, fc2 main, fc2 few-tile)
                main_cfg, few_cfg = cfgs[:2] if layer == "fc1" else cfgs[2:]
                default = gemm._config(gemm._default_config(m, n, x.device, main_cfg, few_cfg))
                configs = [default] + [gemm._config(cf) for cf in (TEXT_CONFIGS if few else INT8_IMAGE_CONFIGS)]
                configs = list(dict.fromkeys(configs))
                t = _time_configs(f"{name} {fmt} {layer}", configs, run, run(default), int8)
                if not t:
                    continue
                _pick(cname, t, default, picks)
                b = min(t, key=t.get)
                rows.append((name, fmt, layer, cname, default, t.get(default, float("nan")), b, t[b]))
    print("\n| shape | format | layer | config name | default | default µs | best | best µs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.1f} | {r[6]} | {r[7]:.1f} |")
    text_json = json.dumps(picks)
    print(f"picks ({gemm.CONFIG_ENV}): {text_json}", flush=True)
    if out_json:
        with open(out_json, "w") as f:
            f.write(text_json)


def main():
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if "--text" in sys.argv or "--int8-configs" in sys.argv:  # --json FILE: write the picks there
        out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
        fmts = ("e4m3", "int8") if "--both" in sys.argv else ("int8",)
        return tune_main("--text" in sys.argv, "--int8-configs" in sys.argv, fmts, out)
    if "--gelu" in sys.argv:
        return gelu_main()
    if "--fc2" in sys.argv:
        return fc2_main()
    if "--int8" in sys.argv:  # --large-int8: Large's INT8 kernels only (a short run)
        return int8_main(("Large", "Large text"), ("int8",)) if "--large-int8" in sys.argv else int8_main(
            ("Large", "Medium", "Large text"))
    table = []
    for name, m, k in (("Large fc1", 8192, 2432), ("Medium fc1", 8192, 1536), ("Large fc1 text", 308, 2432),
                       ("Medium fc1 text", 308, 1536)):
        n = 4 * k
        _, xq, w8, sx, sw, bias = gemm_data(m, k, n)
        inv = torch.tensor(40.0, device="cuda")
        ref = reference(xq, w8, sx, sw, bias, inv).float()
        cub = triton.testing.do_bench(lambda: torch._scaled_mm(xq, w8.t(), sx, sw, bias=bias,
                                                               out_dtype=torch.bfloat16), warmup=25, rep=200)
        print(f"{name}: cuBLAS _scaled_mm (GEMM only) {cub * 1e3:.1f} us", flush=True)
        best = sweep(name, cub, lambda cfg: _launch(xq, w8, sx, sw, bias, inv, "tanh", cfg), ref)
        table.append((name, cub, best))
    print_table("cuBLAS GEMM", table, FC1_CONFIG)


if __name__ == "__main__":
    main()
