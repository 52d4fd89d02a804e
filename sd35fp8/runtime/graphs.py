"""Whole-forward CUDA graphs for models that cannot go through ``torch.compile`` (TransformerEngine
modules run eager, with ~150 µs of host time per Linear call): capture the forward once per input
signature, then replay it, so a denoiser call costs one graph launch instead of hundreds of kernel
launches from Python.

``GraphedModule(module, after=...)`` stands in for ``module`` (attribute reads fall through to it).
Per call it flattens the arguments; the signature is every tensor's shape/dtype/device plus the
plain values (numbers, strings, callables by identity) that can steer Python control flow. A new
signature runs ``warmup`` eager calls (lazy module builds, workspaces, library handles), then is
captured into a private memory pool shared by this module's graphs; later calls copy their tensors
into the captured inputs and replay. The output is cloned (the next replay overwrites the graph's).
``after`` (e.g. TE's delayed-scaling amax/scale update) runs after the forward, inside the graph.
A graph holds raw pointers to every weight: ``version`` (default :func:`state_version`) is checked at
every call, and when a parameter or buffer was replaced (a LoRA merge, offloading and reloading) or
a TE module rebuilt, all graphs are dropped and re-captured. In-place weight updates need nothing.
That full check reads every tensor's address (~2300 at SD3.5 Large: 1.6 ms of host time per call on
an H200 machine, all of it GPU idle time in a synced call). With ``quick`` (e.g. :func:`quick_version`)
the full check runs only when ``quick``'s cheap fingerprint changes or after :meth:`~GraphedModule.recheck`;
callers that know when weights can move (ComfyUI loads and patches a model before each sampling run)
call ``recheck()`` then.

Anything that cannot be captured (a host sync, a CPU tensor, a data-dependent branch) makes the
capture fail: that signature then runs eager for good, with one warning, and results are unchanged
(the device's RNG, which a failed capture leaves in capture mode, is given back a clean state).
"""
from __future__ import annotations

import collections
import logging
import time
from itertools import chain

import torch
from torch.utils import _pytree as pytree

from ..core.marks import ATTR, marks
from .static import static_key

log = logging.getLogger("sd35fp8")
PLAIN = (int, float, bool, str, bytes, type(None))
_DATA_PTR = torch.Tensor.data_ptr
# parameters and buffers registered on any module since import: replacing a weight with setattr (ComfyUI's
# comfy.utils.set_attr_param, which LoRA merges and hook patches use) registers a new Parameter
_registrations = [0]


def _registered(module, name, value):  # returns None: the registered tensor is kept as it is
    _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
torch.nn.modules.module.register_module_buffer_registration_hook(_registered)


def signature(args: tuple, kwargs: dict):
    """Hashable description of a call: tensors by shape/dtype/device, plain values by value, other
    objects by type (callables by identity: the key keeps them alive), plus the argument structure."""
    return _signature(*pytree.tree_flatten((args, kwargs)))


def _signature(leaves: list, spec):
    sig = []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            sig.append(("T", tuple(v.shape), v.dtype, v.device, v.requires_grad))
        elif isinstance(v, PLAIN):
            sig.append(("V", v))
        elif callable(v):  # by identity, holding it: a freed function's id could come back as another's
            try:
                sig.append(("F", v, hash(v)))
            except TypeError:
                sig.append(("F", id(v)))
        else:
            sig.append(("O", type(v).__qualname__))
    return str(spec), tuple(sig)


def state_version(module: torch.nn.Module):
    """A cheap fingerprint of where ``module``'s tensors live: every parameter's and buffer's storage
    address, the identity of per-layer TE modules (``Marks.te_modules``), and the static FP8 runtime's
    configuration (``sd35fp8.runtime.static.static_key``: plain attributes such as fast accumulation steer the
    captured code without changing any tensor). It runs on every call (once per run with ``quick``), so
    the parameter/buffer dicts of the modules that hold tensors are cached (modules are not replaced;
    their tensors are)."""
    dicts, te_layers = _tensor_dicts(module)
    try:  # C-level iteration: ~25% less host time than a comprehension (2280 tensors at Large: ~0.35 ms on a CPU)
        out = list(map(_DATA_PTR, chain.from_iterable(map(dict.values, dicts))))
    except TypeError:  # a None parameter or buffer somewhere (e.g. bias=None registered as a parameter)
        out = [0 if t is None else t.data_ptr() for d in dicts for t in d.values()]
    for d in te_layers:
        mk = d.get(ATTR)
        if mk is not None and mk.te_modules:
            out.extend(id(v) for v in mk.te_modules.values())
    out.append(static_key(module))
    return tuple(out)


def _tensor_dicts(module: torch.nn.Module):
    """The parameter/buffer dicts of ``module``'s modules that hold tensors, and those modules' ``__dict__``s (where
    their sd35fp8.core.marks record, with any TransformerEngine modules, lives); cached on ``module`` (modules are not
    replaced, their tensors are)."""
    mk = marks(module)
    if mk.tensor_dicts is None:
        mods = [m for m in module.modules() if m._parameters or m._buffers]
        mk.tensor_dicts = ([d for m in mods for d in (m._parameters, m._buffers) if d], [m.__dict__ for m in mods])
    return mk.tensor_dicts


def quick_version(module: torch.nn.Module, probes: int = 16):
    """A per-call fingerprint for ``GraphedModule(quick=...)``, a few µs: the count of parameter/buffer
    registrations on any module (a weight replaced with setattr), the static FP8 runtime's config, and the
    addresses of ``probes`` tensors spread over the module (plus its last), which see a whole model moved
    (offloaded and reloaded). A tensor moved alone with ``.data =`` is not seen: that is what
    ``recheck()`` (the full :func:`state_version` on the next call) is for."""
    mk = marks(module)
    probe = mk.probe
    if probe is None:
        pairs = [(d, k) for d in _tensor_dicts(module)[0] for k in d]
        probe = mk.probe = pairs[::max(1, len(pairs) // probes)] + pairs[-1:]
    return (_registrations[0], static_key(module),
            *[0 if t is None else t.data_ptr() for t in (d.get(k) for d, k in probe)])


class _Graph:
    __slots__ = ("graph", "inputs", "output", "calls")

    def __init__(self):
        self.graph, self.inputs, self.output, self.calls = None, None, None, 0


class GraphedModule(torch.nn.Module):
    """Replays ``module``'s forward as CUDA graphs, one per call signature (at most ``max_graphs``,
    least recently used dropped). Not registered as a child: parameters stay ``module``'s own."""

    def __init__(self, module: torch.nn.Module, after=None, warmup: int = 2, max_graphs: int = 4,
                 version=state_version, quick=None):
        super().__init__()
        self.__dict__["module"] = module
        self.__dict__["after"] = after
        self.__dict__["version"] = version
        self.__dict__["seen_version"] = None
        # None: ``version`` at every call; else ``version`` only when quick(module) changed or after recheck()
        self.__dict__["quick"] = quick
        self.__dict__["seen_quick"] = None
        self.__dict__["stale"] = True
        self.__dict__["full_checks"] = 0
        self.__dict__["warmup"] = max(1, int(warmup))
        self.__dict__["max_graphs"] = max(1, int(max_graphs))
        self.__dict__["graphs"] = collections.OrderedDict()
        self.__dict__["failed"] = set()
        self.__dict__["pool"] = None
        self.__dict__["replays"] = 0
        # a list to append each replayed call's host timestamps to (perf_counter s: entry, weight version checked,
        # signature looked up, inputs copied, replay launched, output cloned), or None (off): bench/sd35_bench.py
        # --host-profile reads it to say where a synced call's host time before the GPU's work goes; with it on, each
        # replay also appends (event before, event after) to ``trace_events``: the graph's own GPU time, apart from
        # the GPU's idle time and ComfyUI's kernels around it
        self.__dict__["trace"] = None
        self.__dict__["trace_events"] = []

    def __getattr__(self, name):  # dtype, config, ... of the wrapped model
        return getattr(self.__dict__["module"], name)

    def _eager(self, args, kwargs):
        out = self.module(*args, **kwargs)
        if self.after is not None:
            self.after()
        return out

    def recheck(self) -> None:
        """Run the full weight check (``version``) on the next call: weights may have moved since the last."""
        self.__dict__["stale"] = True

    def _weights_moved(self) -> bool:
        """Whether the module's tensors moved since the graphs were captured (the per-call check)."""
        if self.version is None:
            return False
        if self.quick is not None:
            q = self.quick(self.module)
            if not self.stale and q == self.seen_quick:
                return False
            self.__dict__["seen_quick"], self.__dict__["stale"] = q, False
        self.__dict__["full_checks"] += 1
        v = self.version(self.module)
        if v == self.seen_version:
            return False
        self.__dict__["seen_version"] = v
        return True

    def reset(self) -> None:
        """Drop every captured graph (and its memory pool)."""
        self.graphs.clear()
        self.__dict__["pool"] = None

    def forward(self, *args, **kwargs):
        trace = self.trace
        t0 = time.perf_counter() if trace is not None else 0.0
        leaves, spec = pytree.tree_flatten((args, kwargs))
        dev = next((t.device for t in leaves if isinstance(t, torch.Tensor) and t.is_cuda), None)
        if dev is None:
            return self._eager(args, kwargs)
        if self._weights_moved():
            self.reset()
        t1 = time.perf_counter() if trace is not None else 0.0
        key = _signature(leaves, spec)
        if key in self.failed:
            return self._eager(args, kwargs)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = _Graph()
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        if g.graph is None:
            g.calls += 1
            if g.calls <= self.warmup:
                return self._eager(args, kwargs)
            di = dev.index if dev.index is not None else torch.cuda.current_device()
            gen = torch.cuda.default_generators[di]
            rng = gen.clone_state()
            try:
                self._capture(g, leaves, spec)
            except Exception as e:  # noqa: BLE001 - whatever broke the capture, eager still works
                self.graphs.pop(key, None)
                self.failed.add(key)
                # a failed capture leaves the device's RNG in capture mode (torch skips its epilogue): every
                # later random op would fail ("Offset increment outside graph capture"); give it a clean state
                gen.graphsafe_set_state(rng)
                # ... and the allocator still routing this thread's allocations to the pool: the next capture
                # would fail ("already recording to mempool_id"). Close it; later captures get a new pool
                try:
                    torch._C._cuda_endAllocateToPool(di, self.pool)
                except Exception:  # noqa: BLE001 - it was not recording (the capture failed before that)
                    pass
                self.__dict__["pool"] = None
                torch.cuda.synchronize()
                log.warning("sd35fp8: this model cannot be captured as a CUDA graph (%s: %s); running it eager "
                            "for this input shape (same results, slower)", type(e).__name__,
                            str(e).splitlines()[0][:300] if str(e) else "")
                return self._eager(args, kwargs)
        t2 = time.perf_counter() if trace is not None else 0.0
        dsts, srcs = [], []
        for dst, src in zip(g.inputs, leaves):
            if isinstance(dst, torch.Tensor) and dst.data_ptr() != src.data_ptr():
                dsts.append(dst)
                srcs.append(src)
        if dsts:  # one call for all (on a slow host each copy_ costs ~30 µs)
            torch._foreach_copy_(dsts, srcs)
        t3 = time.perf_counter() if trace is not None else 0.0
        if trace is not None:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
            g.graph.replay()
            ev[1].record()
            self.trace_events.append(ev)
        else:
            g.graph.replay()
        t4 = time.perf_counter() if trace is not None else 0.0
        self.__dict__["replays"] += 1
        out = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, g.output)
        if trace is not None:
            trace.append((t0, t1, t2, t3, t4, time.perf_counter()))
        return out

    def _capture(self, g: _Graph, leaves: list, spec) -> None:
        static = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        s_args, s_kwargs = pytree.tree_unflatten(static, spec)
        if self.pool is None:
            self.__dict__["pool"] = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()  # capture needs a warmed-up side stream (torch.cuda.graphs docs)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the forward only: ``after`` must run once per call, as eager
            self.module(*s_args, **s_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        s_args, s_kwargs = pytree.tree_unflatten(static, spec)  # fresh containers (forward may mutate dicts)
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._eager(s_args, s_kwargs)
        g.graph, g.inputs, g.output = graph, static, out
