"""sd35fp8.runtime.graphs: whole-forward CUDA graph replay (used by the TransformerEngine backend). The keying,
versioning and eager paths run on the CPU; capture and replay run on the GPU machine."""
import logging

import pytest
import torch

from sd35fp8.core.marks import marks
from sd35fp8.runtime.graphs import GraphedModule, quick_version, signature, state_version

from tests.support.markers import cuda  # noqa: E402


class Net(torch.nn.Module):
    """Shaped like ComfyUI's diffusion-model call: tensors plus a transformer_options dict."""

    def __init__(self, d=64):
        super().__init__()
        self.a = torch.nn.Linear(d, 4 * d)
        self.b = torch.nn.Linear(4 * d, d)
        self.register_buffer("scale", torch.tensor(0.5))
        self.calls = 0

    @property
    def dtype(self):
        return self.a.weight.dtype

    def forward(self, x, t, context=None, transformer_options=None):
        self.calls += 1
        transformer_options["block_index"] = 0  # ComfyUI's blocks write into the options dict
        h = torch.nn.functional.gelu(self.a(x + t[:, None, None] + context.mean(1, keepdim=True)))
        out = self.b(h) * self.scale
        return -out if transformer_options.get("flip") else out


def args(b=2, s=16, d=64, device="cpu", seed=0, flip=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, d, generator=g).to(device)
    t = torch.rand(b, generator=g).to(device)
    ctx = torch.randn(b, 5, d, generator=g).to(device)
    return (x, t), {"context": ctx, "transformer_options": {"cond_or_uncond": [1, 0], "flip": flip}}


def test_signature_keys_on_shapes_dtypes_and_plain_values_not_tensor_values():
    a, k = args()
    a2, k2 = args(seed=1)
    assert signature(a, k) == signature(a2, k2)  # same shapes, other values: one graph
    assert signature(*args(b=4)) != signature(a, k)  # batch
    assert signature(*args(s=8)) != signature(a, k)  # resolution
    assert signature(*args(flip=True)) != signature(a, k)  # a plain value that steers control flow
    a3 = (a[0].to(torch.bfloat16), a[1])
    assert signature(a3, k) != signature(a, k)  # dtype
    f, g = (lambda: 0), (lambda: 0)
    k_f, k_g = dict(k, fn=f), dict(k, fn=g)
    assert signature(a, k_f) == signature(a, dict(k, fn=f)) and signature(a, k_f) != signature(a, k_g)


def test_state_version_sees_replaced_tensors_not_in_place_updates():
    net = Net()
    v0 = state_version(net)
    with torch.no_grad():
        net.a.weight.add_(1.0)  # in place: a captured graph reads the new values by itself
    assert state_version(net) == v0
    net.a.weight = torch.nn.Parameter(net.a.weight.detach().clone())  # what a LoRA merge / offload does
    v1 = state_version(net)
    assert v1 != v0
    net.scale = torch.tensor(2.0)
    assert state_version(net) != v1
    marks(net.a).te_modules = {torch.bfloat16: object()}  # a (re)built TE module
    assert state_version(net) != state_version(Net())
    nb = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4))  # a None parameter
    v2 = state_version(nb)
    assert v2 == state_version(nb) and 0 in v2[:-1]  # None counts as address 0 (the comprehension's fallback)
    nb[1].weight = torch.nn.Parameter(torch.zeros(4, 4))
    assert state_version(nb) != v2


def test_cpu_calls_run_eager_with_after_once_per_call_and_attributes_fall_through():
    net = Net()
    seen = []
    gm = GraphedModule(net, after=lambda: seen.append(1))
    a, k = args()
    ref = net(*a, **args()[1])
    net.calls = 0
    for _ in range(4):
        assert torch.equal(gm(*a, **k), ref)
    assert net.calls == 4 and len(seen) == 4 and gm.replays == 0 and not gm.graphs
    assert gm.dtype == torch.float32 and gm.scale is net.scale  # read through to the wrapped model
    assert not list(gm.parameters())  # not a child module: the weights stay the wrapped model's own


@cuda
def test_replay_matches_eager_per_shape_and_outputs_are_not_aliased():
    torch.manual_seed(0)
    net = Net().cuda()
    counter = torch.zeros((), device="cuda")
    gm = GraphedModule(net, after=lambda: counter.add_(1), warmup=2)
    runs = [args(seed=i, device="cuda") for i in range(6)]
    with torch.no_grad():
        refs = [net(*a, **k) for a, k in runs]
        counter.zero_()
        net.calls = 0
        outs = [gm(*a, **k) for a, k in runs]
    torch.cuda.synchronize()
    for o, r in zip(outs, refs):
        assert torch.allclose(o, r, rtol=1e-5, atol=1e-6)  # earlier outputs survive later replays
    assert gm.replays == 4 and len(gm.graphs) == 1
    assert net.calls == 4  # 2 eager warm-ups, the side-stream warm-up, the capture itself; then replays only
    assert float(counter) == 6  # ``after`` ran once per call, captured in the graph
    with torch.no_grad():  # another batch size: its own graph; the first one is kept
        a, k = args(b=4, device="cuda", seed=9)
        ref4 = net(*a, **k)
        out4 = [gm(*a, **k) for _ in range(4)][-1]
        assert torch.allclose(out4, ref4, rtol=1e-5, atol=1e-6) and len(gm.graphs) == 2
        a, k = runs[0]
        assert torch.allclose(gm(*a, **k), refs[0], rtol=1e-5, atol=1e-6)
        gm.__dict__["trace"] = []  # host timestamps of each replayed call, in order
        for _ in range(3):
            gm(*a, **k)
        assert len(gm.trace) == 3 and all(len(t) == 6 and list(t) == sorted(t) for t in gm.trace)
        torch.cuda.synchronize()
        assert len(gm.trace_events) == 3 and all(b.elapsed_time(e) > 0 for b, e in gm.trace_events)


@cuda
def test_replaced_weights_are_recaptured_and_uncapturable_models_run_eager(caplog):
    torch.manual_seed(0)
    net = Net().cuda()
    gm = GraphedModule(net, warmup=1)
    a, k = args(device="cuda")
    with torch.no_grad():
        for _ in range(3):
            gm(*a, **k)
        assert gm.replays >= 1
        net.b.weight = torch.nn.Parameter(net.b.weight * 3)  # new storage: the old graph would read freed memory
        ref = net(*a, **k)
        assert torch.allclose(gm(*a, **k), ref, rtol=1e-5, atol=1e-6)
        for _ in range(3):
            assert torch.allclose(gm(*a, **k), ref, rtol=1e-5, atol=1e-6)

    class Syncs(Net):
        def forward(self, x, t, context=None, transformer_options=None):
            out = super().forward(x, t, context, transformer_options)
            return out * float(out.abs().max())  # host sync: not capturable

    bad = Syncs().cuda()
    gb = GraphedModule(bad, warmup=1)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="sd35fp8"):
        ref = bad(*a, **k)
        outs = [gb(*a, **k) for _ in range(4)]
    assert all(torch.allclose(o, ref, rtol=1e-5, atol=1e-6) for o in outs)
    assert gb.replays == 0 and len(gb.failed) == 1
    assert sum("cannot be captured as a CUDA graph" in r.message for r in caplog.records) == 1
    class SyncsAtBatch2(Net):
        def forward(self, x, t, context=None, transformer_options=None):
            out = super().forward(x, t, context, transformer_options)
            return out * float(out.abs().max()) if x.shape[0] == 2 else out

    part = SyncsAtBatch2().cuda()
    gp = GraphedModule(part, warmup=1)
    a4, k4 = args(b=4, device="cuda", seed=3)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="sd35fp8"):
        for _ in range(3):
            gp(*a, **k)  # batch 2: the capture fails, eager from then on
        ref4 = part(*a4, **k4)
        outs = [gp(*a4, **k4) for _ in range(3)]  # batch 4 must still capture after that failure
    assert len(gp.failed) == 1 and gp.replays == 2 and len(gp.graphs) == 1
    assert all(torch.allclose(o, ref4, rtol=1e-5, atol=1e-6) for o in outs)
    torch.manual_seed(1)  # the failed capture must not leave the device unusable: RNG and kernels still work
    a = torch.randn(64, 64, device="cuda")
    torch.nn.init.normal_(torch.empty(8, device="cuda"))
    assert torch.isfinite(a @ a).all()


class Deep(torch.nn.Module):
    def __init__(self, n=40, d=32):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))

    def forward(self, x, t, context=None, transformer_options=None):
        for layer in self.layers:
            x = x + torch.tanh(layer(x)) * t[:, None, None]
        return x


def test_quick_version_sees_replaced_and_moved_weights_and_the_runtime_config_not_in_place_updates():
    from sd35fp8.runtime.static import RuntimeConfig, set_static
    from test_runtime import quantized_block
    net = Deep()
    q0 = quick_version(net)
    assert len(q0) == 2 + 16 + 1 and q0 == quick_version(net)  # 80 tensors: every 5th + the last
    with torch.no_grad():
        net.layers[7].weight.mul_(2)  # in place: the graphs still read the right memory
    assert quick_version(net) == q0
    net.layers[7].weight = torch.nn.Parameter(net.layers[7].weight.detach().clone())  # as ComfyUI's set_attr_param
    q1 = quick_version(net)
    assert q1 != q0
    net.layers[3].register_buffer("extra", torch.zeros(1))  # any registration counts
    assert quick_version(net) != q1
    q2 = quick_version(net)
    for p in net.parameters():  # the whole model offloaded and reloaded: new storage everywhere, no registration
        p.data = p.data.clone()
    assert quick_version(net) != q2
    q3, v3 = quick_version(net), state_version(net)
    net.layers[2].weight.data = net.layers[2].weight.data.clone()  # one tensor that no probe covers
    assert quick_version(net) == q3 and state_version(net) != v3  # what recheck() is for
    b, _, _, _ = quantized_block()
    qb = quick_version(b)
    set_static(b, RuntimeConfig(fast_accum=False))
    assert quick_version(b) != qb


@cuda
def test_quick_checked_graphs_run_the_full_check_once_and_recheck_on_request():
    torch.manual_seed(0)
    net = Deep().cuda()
    gm = GraphedModule(net, warmup=1, quick=quick_version)
    a, k = args(d=32, device="cuda")
    with torch.no_grad():
        ref = net(*a, **k)
        outs = [gm(*a, **k) for _ in range(6)]
        assert all(torch.allclose(o, ref, rtol=1e-5, atol=1e-6) for o in outs) and gm.replays >= 4
        assert gm.full_checks == 1  # the first call only: later calls compare the quick fingerprint
        net.layers[5].weight = torch.nn.Parameter(net.layers[5].weight * 2)  # replaced: seen at the next call
        ref2 = net(*a, **k)
        assert torch.allclose(gm(*a, **k), ref2, rtol=1e-5, atol=1e-6) and gm.full_checks == 2
        old = net.layers[2].weight.data
        net.layers[2].weight.data = old * 3  # moved alone, no probe on it: the caller says so
        del old
        ref3 = net(*a, **k)
        gm.recheck()
        outs = [gm(*a, **k) for _ in range(4)]
        assert all(torch.allclose(o, ref3, rtol=1e-5, atol=1e-6) for o in outs) and gm.full_checks == 3


def test_state_version_follows_the_static_fp8_runtime_config():
    """Plain attributes (fast accumulation, adaLN mode) steer the captured code without changing a tensor:
    the static runtime's config is part of the version; the same config again (every run sets it) is not
    a change, even when a new calibration updated the scales in place."""
    from sd35fp8.runtime.static import RuntimeConfig, clear_static, set_static
    from test_runtime import quantized_block
    b, _, x, c = quantized_block()
    set_static(b, RuntimeConfig(fast_accum=True))
    v0 = state_version(b)
    set_static(b, RuntimeConfig(fast_accum=True))
    assert state_version(b) == v0
    set_static(b, RuntimeConfig(fast_accum=False))
    v1 = state_version(b)
    assert v1 != v0
    set_static(b, RuntimeConfig(fast_accum=False, adaln="fp8"))
    assert state_version(b) != v1
    clear_static(b)
    assert state_version(b) not in (v0, v1)


@cuda
def test_compiled_static_fp8_model_replays_whole_and_recaptures_on_a_new_runtime_config():
    """What ``cuda_graphs`` does on the torch backend: torch.compile's module (static FP8 runtime) captured
    by GraphedModule; replays match the compiled eager calls; a changed runtime config re-captures."""
    from sd35fp8.runtime.static import RuntimeConfig, set_static
    from test_runtime import quantized_block
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores")
    b, _, x, c = quantized_block()
    b = b.cuda()  # FP8 weights stay FP8 (a .to(dtype) would upcast them too)
    x, c = x.cuda(), c.cuda()
    set_static(b, RuntimeConfig(fast_accum=True))
    compiled = torch.compile(b, dynamic=False)
    gm = GraphedModule(compiled, warmup=2)
    with torch.no_grad():
        ref = compiled(x, c)
        outs = [gm(x, c) for _ in range(5)]
        assert gm.replays == 3 and len(gm.graphs) == 1
        assert all(torch.equal(o, ref) for o in outs)
        x2 = x * 2  # new values, same shapes: copied into the captured input
        assert torch.equal(gm(x2, c), compiled(x2, c))
        set_static(b, RuntimeConfig(fast_accum=False))  # another config: re-captured, not replayed stale
        ref_exact = compiled(x, c)
        outs = [gm(x, c) for _ in range(4)]
        assert all(torch.equal(o, ref_exact) for o in outs)
        assert gm.replays == 6 and torch.isfinite(ref_exact).all()
