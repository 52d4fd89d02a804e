#!/usr/bin/env python3
"""Host cost of one CUDA-graph denoiser call's pieces, on the machine that runs it (no model weights needed).

    python3 bench/host_overhead.py

A module shaped like SD3.5 Large's tensor census (38 blocks x 12 linears, each with a weight, a bias and three
scale buffers: 2280 tensors) on the GPU: ``sd35fp8.runtime.graphs.state_version`` (the per-call weight-address check) against
the comprehension it replaced; ``torch.cuda.CUDAGraph.replay`` of an 800-kernel graph (the Large call's kernel
count) with the GPU idle; and ``GraphedModule`` end to end (flatten, version, signature, input copies, replay,
output clone) around a forward of 800 small kernels: host ms until each returns, and the GPU's idle time before its
first kernel (synced call minus back to back).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/

import torch  # noqa: E402

import common  # noqa: E402

from sd35fp8.runtime.graphs import GraphedModule, state_version  # noqa: E402


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(16, 16), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(16), requires_grad=False)
        for n in ("weight_scale", "input_scale", "amax"):
            self.register_buffer(n, torch.zeros(()))


class Model(torch.nn.Module):
    def __init__(self, kernels: int = 800):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleList([Lin() for _ in range(12)]) for _ in range(38)])
        self.kernels = kernels

    def forward(self, x):
        for _ in range(self.kernels):
            x = x * 1.0001
        return x


def host_ms(fn, n: int = 50) -> float:
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(ts)


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    m = Model().cuda()
    dicts = [d for mod in m.modules() for d in (mod._parameters, mod._buffers) if d]
    n = sum(len(d) for d in dicts)

    def comprehension():
        return tuple([0 if t is None else t.data_ptr() for d in dicts for t in d.values()])

    state_version(m)
    rows = [(f"state_version ({n} tensors)", host_ms(lambda: state_version(m), 200)),
            ("the comprehension it replaced", host_ms(comprehension, 200))]
    x = torch.randn(2, 16, 128, 128, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(x)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        m(x)
    g.replay()
    rows.append((f"CUDAGraph.replay, {m.kernels} kernels", host_ms(g.replay)))
    gm = GraphedModule(m)
    for _ in range(4):
        gm(x)
    rows.append(("GraphedModule call (until return)", host_ms(lambda: gm(x))))
    rows.append(("GraphedModule call, GPU ms synced", common.time_cuda(lambda: gm(x), n=20)[0]))
    rows.append(("GraphedModule call, GPU ms back to back", common.back_to_back_ms(lambda: gm(x), 20)))
    print("\n| what | ms |\n|---|---|")
    for what, ms in rows:
        print(f"| {what} | {ms:.3f} |")


if __name__ == "__main__":
    main()
