#!/usr/bin/env python3
"""cuDNN's fused FP8 attention (``sdpa_fp8`` through the cuDNN frontend's Python API) vs our FP8 kernel and
cuDNN BF16 at SD3.5's attention shapes: time, TFLOP/s, error. A lead for the attention (30 of ~80 ms of a
Large step): cuDNN's Hopper FP8 prefill kernel is warp-specialized, which our Triton kernel is not.

    python3 -m pip install --target /tmp/site nvidia-cudnn-frontend   # or a carried wheel, --no-index
    PYTHONPATH=/tmp/site python3 bench/cudnn_fp8_attn.py

Scaling as cuDNN's FP8 SDPA takes it: one scale per tensor for Q, K, V (amax / 448, from the data here; a
runtime would use calibrated or QK-norm-bounded static scales), P at 448 (softmax ≤ 1), the output in E4M3 at
448 / max|V| (|O| ≤ max|V|: a convex combination of V rows), which the projection GEMM could take as its FP8
input. Inputs as bench/attn_bench.py's (Q/K RMS-normed with a learned weight, V normal); error = relative L2 of
the dequantized output vs an fp32 reference. The quantization of Q/K/V to E4M3 is timed apart ("quant").
"""
from __future__ import annotations

import math
import os
import sys

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/

import torch  # noqa: E402
import triton.testing  # noqa: E402

from attn_bench import D, SHAPES, bshd_sdpa, inputs, rel  # noqa: E402
from sd35fp8.kernels.attention import fp8_attention, reference_attention  # noqa: E402
from sd35fp8.core.formats import E4M3, E4M3_MAX, MIN_SCALE, saturating_cast  # noqa: E402


def per_tensor_e4m3(t: torch.Tensor):
    """``t`` as E4M3 at one scale (amax / 448; sd35fp8.core.formats' saturating cast) and that scale (fp32 [1,1,1,1]).
    No host sync (sd35fp8.core.formats.scale_from_amax checks finiteness on the host): the quantization is timed."""
    s = (t.float().abs().amax() / E4M3_MAX).clamp_min(MIN_SCALE)
    return saturating_cast(t, s), s.reshape(1, 1, 1, 1)


class CudnnFp8Attention:
    """One cuDNN FP8 SDPA graph for [B, S, H·D] E4M3 q/k/v (BSHD strides, as ComfyUI's layout) with per-tensor
    descales; ``__call__`` runs it and returns the E4M3 output [B, S, H·D] and its descale."""

    def __init__(self, b: int, s: int, h: int, d: int, device):
        import cudnn
        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                          handle=self.handle)
        shape, stride = (b, h, s, d), (s * h * d, d, h * d, 1)
        self.q, self.k, self.v = (g.tensor(name=n, dim=shape, stride=stride, data_type=e4m3) for n in "qkv")
        scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
        self.scales = [g.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
        o, _, amax_s, amax_o = g.sdpa_fp8(q=self.q, k=self.k, v=self.v, descale_q=self.scales[0],
                                          descale_k=self.scales[1], descale_v=self.scales[2],
                                          descale_s=self.scales[3], scale_s=self.scales[4],
                                          scale_o=self.scales[5], is_inference=True,
                                          attn_scale=1.0 / math.sqrt(d), use_causal_mask=False)
        o.set_output(True).set_dim(shape).set_stride(stride).set_data_type(e4m3)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph, self.o, self.amax_s, self.amax_o = g, o, amax_s, amax_o
        self.out = torch.empty((b, s, h * d), device=device, dtype=E4M3)
        self.amax = torch.empty((2, 1, 1, 1, 1), device=device, dtype=torch.float32)
        self.workspace = torch.empty(g.get_workspace_size(), device=device, dtype=torch.uint8)
        # P = softmax ≤ 1: stored at 448 (scale_s), read back at 1/448 (descale_s)
        self.p_scales = [torch.full((1, 1, 1, 1), v, device=device) for v in (1 / E4M3_MAX, E4M3_MAX)]

    def __call__(self, q8, k8, v8, sq, sk, sv, so):
        """E4M3 q/k/v with their descales (``sq`` etc., fp32 [1,1,1,1]) and the output's scale ``so``
        (448 / max|V| is always safe: |O| ≤ max|V|); returns the E4M3 output [B, S, H·D] (times ``so``)."""
        # the caller's current stream (a CUDA-graph capture runs on its own)
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: self.out, self.amax_s: self.amax[0],
                self.amax_o: self.amax[1]}
        for t, val in zip(self.scales, (sq, sk, sv, *self.p_scales, so)):
            pack[t] = val
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return self.out


def graph_replay_matches(att, *args) -> str:
    """Whether the cuDNN call captures into a CUDA graph (our runtime replays whole models as graphs) and its
    replay gives the eager result."""
    try:
        want = att(*args).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            att(*args)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = att(*args)
        att.out.zero_()
        g.replay()
        torch.cuda.synchronize()
        return "yes" if torch.equal(got.view(torch.uint8), want.view(torch.uint8)) else "replay differs"
    except Exception as e:  # noqa: BLE001 - a capture failure is the result
        return f"no ({type(e).__name__}: {str(e)[:80]})"


def main():
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    try:
        import cudnn
    except ImportError as e:
        raise SystemExit(f"the cuDNN frontend's Python package is not importable ({e}): "
                         "pip install nvidia-cudnn-frontend") from e
    print(f"cudnn frontend {getattr(cudnn, '__version__', '?')}, backend {cudnn.backend_version()}", flush=True)
    rows = []
    for name, b, h, s in SHAPES:
        q, k, v = inputs(b, h, s)
        ref = reference_attention(q.float(), k.float(), v.float(), h)
        flops = 4 * b * h * s * s * D
        (q8, sq), (k8, sk), (v8, sv) = (per_tensor_e4m3(t) for t in (q, k, v))
        try:
            att = CudnnFp8Attention(b, s, h, D, q.device)
            so = 1.0 / sv  # 448 / max|V|
            out = att(q8, k8, v8, sq, sk, sv, so).float() / so.reshape(())
            t_fp8 = triton.testing.do_bench(lambda: att(q8, k8, v8, sq, sk, sv, so), warmup=25, rep=200)
            fp8 = (t_fp8, rel(out, ref), bool(torch.isfinite(out).all()), graph_replay_matches(att, q8, k8, v8, sq,
                                                                                             sk, sv, so))
        except Exception as e:  # noqa: BLE001 - an unsupported shape or backend is a result here
            print(f"{name}: cuDNN FP8 SDPA not available: {type(e).__name__}: {str(e)[:300]}", flush=True)
            fp8 = None
        t_quant = triton.testing.do_bench(lambda: [per_tensor_e4m3(t) for t in (q, k, v)], warmup=10, rep=50)
        t_bf16 = triton.testing.do_bench(lambda: bshd_sdpa(q, k, v, h, "cudnn"), warmup=25, rep=200)
        ours = fp8_attention(q, k, v, h)
        t_ours = triton.testing.do_bench(lambda: fp8_attention(q, k, v, h), warmup=25, rep=200)
        rows.append((name, t_bf16, rel(bshd_sdpa(q, k, v, h, "cudnn"), ref), t_ours, rel(ours, ref), fp8, t_quant,
                     flops))
        print(rows[-1], flush=True)
    print("\n| shape | cuDNN BF16 µs (err) | ours FP8 µs (err) | cuDNN FP8 µs (TF/s, err) | cuDNN FP8 / ours "
          "| per-tensor quant of Q/K/V µs (unfused, here) | cuDNN FP8 in a CUDA graph |")
    print("|---|---|---|---|---|---|---|")
    for name, tb, eb, to, eo, fp8, tq, flops in rows:
        c = (f"{fp8[0] * 1e3:.0f} ({flops / fp8[0] / 1e9:.0f}, {fp8[1]:.4f}{'' if fp8[2] else ', NaN!'})"
             if fp8 else "n/a")
        ratio = f"{fp8[0] / to:.2f}" if fp8 else "-"
        print(f"| {name} | {tb * 1e3:.0f} ({eb:.4f}) | {to * 1e3:.0f} ({eo:.4f}) | {c} | {ratio} | {tq * 1e3:.0f} "
              f"| {fp8[3] if fp8 else '-'} |")


if __name__ == "__main__":
    main()
