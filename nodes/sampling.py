"""Sampling wrappers: what runs around every ComfyUI sampling call and denoiser call of an FP8 MODEL.

The OUTER_SAMPLE wrapper puts the MODEL's state (its calibrated scales, the static runtime or TransformerEngine)
on the shared diffusion model at the start of every sampling run, so two MODELs that share weights (the loader's
uncalibrated output, a calibrated clone) never see each other's scales, then samples inside ``fp8_autocast``.
APPLY_MODEL wrappers run the diffusion model through ``torch.compile`` and/or CUDA graphs (or TE's graphs), and
the attention override picks the attention backend. What the adapter keeps on the diffusion model lives in its
``sd35fp8.core.marks`` record (``adapter``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import torch

import comfy.patcher_extension

from sd35fp8 import DelayedScaling, fp8_autocast, fp8_layers
from sd35fp8.core.centering import center_vector
from sd35fp8.core.marks import marks
from sd35fp8.core.quant import PerChannelWeightsError
from sd35fp8.kernels.attention import attention, fp8_attention
from sd35fp8.runtime.graphs import GraphedModule, quick_version
from sd35fp8.runtime.static import RuntimeConfig, clear_static, refresh_center_biases, set_static, static_key
from sd35fp8.runtime.te import set_te, te_autocast, te_recipe, te_step

from . import state as st

log = logging.getLogger("sd35fp8")
AUTOCAST_KEY = "sd35fp8_autocast"
COMPILE_KEY = "sd35fp8_compile"
TE_KEY = "sd35fp8_te"
OVERRIDE = "optimized_attention_override"
# keys of the adapter's entries in a diffusion model's marks record
AMAX, COMPILED, GRAPHS, TE_GRAPHS, TE_ON = "amax", "compiled", "cuda_graphs", "te_graphs", "te_on"
CENTERS, CORRECTIONS = "centers", "corrections"
HP_FILE = "hp_file"  # (path, key prefix) of the high-precision file the FP8 weights were quantized from
SEEN = "seen_shapes"  # the denoiser input shapes compiled so far (first_run)


def _adapter(dm: torch.nn.Module) -> dict:
    return marks(dm).adapter


def require_fp8_model(model) -> torch.nn.Module:
    """The diffusion model of an FP8 MODEL of this pack; a clear error for any other MODEL."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dm is None or st.get(model) is None or not fp8_layers(dm):
        raise ValueError("this MODEL has no FP8 layers: load it with SD35FP8CheckpointLoader "
                         "(stock loaders give a BF16/FP16 model)")
    return dm


def install_scales(diffusion_model: torch.nn.Module, amax, centers: dict | None = None,
                   corrections=None) -> None:
    """Set every FP8 layer's static input scale from ``amax`` (None: uncalibrated) and its input center from
    ``centers`` (a calibration record's ``centers``: sd35fp8.core.centering; None: none). A no-op when these very
    tables are already installed (re-queues of the same MODEL), so no per-run rebuild of scales. ``corrections``:
    {layer: bias correction} (the weight rounding at the centers)."""
    ad = _adapter(diffusion_model)
    if amax is not None and ad.get(AMAX) is amax and ad.get(CENTERS) is centers \
            and ad.get(CORRECTIONS) is corrections:
        return
    for name, layer in fp8_layers(diffusion_model).items():
        layer.fp8_set_input_amax(None if amax is None else amax.get(name))
        entry = None if amax is None or not centers else centers.get(name)
        layer.fp8_set_input_center(None if entry is None else center_vector(entry, layer.in_features),
                                   None if entry is None else entry["amax"])
        layer.fp8_set_bias_correction(None if amax is None or not corrections else corrections.get(name))
    ad[AMAX], ad[CENTERS], ad[CORRECTIONS] = amax, centers, corrections


def hp_source(dm: torch.nn.Module, source: tuple[str, str] | None = None):
    """The (path, key prefix) of the high-precision file ``dm``'s FP8 weights were quantized from (the loader records
    it with ``source``); None for weights loaded as FP8."""
    if source is not None:
        _adapter(dm)[HP_FILE] = source
    return _adapter(dm).get(HP_FILE)


def prepare_run(patcher) -> tuple[bool, DelayedScaling]:
    """Put this MODEL's FP8 state on the (shared) diffusion model: its calibrated scales, and the
    static runtime or the TransformerEngine backend when enabled. Returns ``(enabled, recipe)``;
    :func:`run_context` turns them into the context the sampling runs in."""
    s = st.get(patcher) or st.FP8State()
    recipe, rt, enabled = s.sampling_recipe, s.runtime, s.enabled
    dm = patcher.model.diffusion_model
    ad = _adapter(dm)
    install_scales(dm, s.input_amax, (s.calibration or {}).get("centers"), s.corrections)
    te = enabled and rt.backend == "transformer_engine"
    if ad.pop(TE_ON, False):  # a walk over every module: only where a run put TE on
        set_te(dm, None)
    graphs = rt.cudagraphs and enabled
    # graphs this run will not replay hold a memory pool each: free them
    drop_graphs(dm, te=not (te and graphs), compiled=not (not te and graphs and rt.compile))
    if rt.static and enabled and not te and s.calibrated:
        # the LayerNorm kernels cost a Python custom-op call each: only where the model replays as CUDA graphs
        set_static(dm, RuntimeConfig(fast_accum=rt.fast_accum, adaln=rt.adaln, margin=recipe.margin,
                                     fp32_accum=rt.fp32_accum, fuse_mlp=rt.fuse_mlp,
                                     fuse_attention=rt.fuse_attention, fuse_norm=rt.cudagraphs and rt.fuse_norm))
    else:
        clear_static(dm)
    if te:
        try:
            set_te(dm, recipe, rt.scaling, rt.adaln)
        except PerChannelWeightsError as e:  # the library speaks of scales; the user chooses the nodes' options
            raise ValueError(f"SD35FP8Autocast backend=transformer_engine: {e}. Load the model with "
                             "SD35FP8CheckpointLoader's weight_scaling=fastest (per-tensor scales), or choose "
                             "backend=torch.") from None
        ad[TE_ON] = True
    # the graphs check every weight's address once per run, on the first call (the sampler loads and patches the
    # model after this, before that call), and per call only cheaply (sd35fp8.runtime.graphs.quick_version)
    for runner in graph_runners(dm).values():
        runner.recheck()
    if not s.calibrated and enabled and s.recipe is not None:
        log.warning("sd35fp8: this MODEL is not calibrated; its FP8 layers use delayed scaling from their own "
                    "amax history. Put SD35FP8Calibrate before SD35FP8Autocast for static calibrated scales.")
    return enabled, recipe


@contextlib.contextmanager
def run_context(patcher, enabled: bool, recipe: DelayedScaling):
    """``fp8_autocast`` with this MODEL's recipe, inside TransformerEngine's autocast for that backend."""
    s = st.get(patcher) or st.FP8State()
    with contextlib.ExitStack() as stack:
        if enabled and s.runtime.backend == "transformer_engine":
            stack.enter_context(te_autocast(te_recipe(recipe, s.runtime.scaling)))
        stack.enter_context(fp8_autocast(enabled=enabled, recipe=recipe))
        yield


def calibration_mismatch(record, guider, noise, sampler, sigmas, model_sampling) -> list[str]:
    """The sampling settings of this call that the MODEL's calibration did not cover: size, steps, cfg, sampler,
    scheduler (seen as other sigmas at the same steps)."""
    import comfy.samplers
    if not record or not torch.is_tensor(noise) or not torch.is_tensor(sigmas):
        return []
    out = []
    if noise.dim() == 4 and record.get("width") and record.get("height"):
        w, h = int(noise.shape[-1]) * 8, int(noise.shape[-2]) * 8
        if (w, h) != (record["width"], record["height"]):
            out.append(f"size {w}x{h} (calibrated at {record['width']}x{record['height']})")
    steps = int(sigmas.numel()) - 1
    if record.get("steps") and steps != record["steps"]:
        out.append(f"{steps} steps (calibrated with {record['steps']})")
    cfg = getattr(guider, "cfg", None)
    rcfg = record.get("cfg")
    if isinstance(cfg, (int, float)) and isinstance(rcfg, (int, float)) and abs(cfg - rcfg) > 1e-6:
        out.append(f"cfg {cfg:g} (calibrated with {record['cfg']:g})")
    name = getattr(getattr(sampler, "sampler_function", None), "__name__", "").removeprefix("sample_")
    if name in comfy.samplers.KSampler.SAMPLERS and record.get("sampler") and name != record["sampler"]:
        out.append(f"sampler {name} (calibrated with {record['sampler']})")
    sched = record.get("scheduler")
    if sched in comfy.samplers.KSampler.SCHEDULERS and steps == record.get("steps") and model_sampling is not None:
        expected = comfy.samplers.calculate_sigmas(model_sampling, sched, steps).float().cpu()
        if expected.shape != sigmas.shape or not torch.allclose(expected, sigmas.float().cpu(), rtol=1e-3, atol=1e-4):
            out.append(f"a schedule other than {sched}'s (another scheduler or denoise)")
    return out


_mismatch_said: set[str] = set()


def warn_mismatch(patcher, guider, args) -> None:
    """One log line (once per distinct case) and a status line on the sampler node when this call samples with
    settings the calibration did not cover. Never raises: a warning must not stop sampling."""
    try:
        s = st.get(patcher)
        if s is None or not s.calibrated or len(args) < 4:
            return
        diffs = calibration_mismatch(s.calibration, guider, args[0], args[2], args[3],
                                     patcher.get_model_object("model_sampling"))
        if not diffs:
            return
        text = ("sd35fp8: sampling with settings the calibration did not cover: " + "; ".join(diffs) + ". The FP8 "
                "scales fit these less well (more error, rarely NaN): give SD35FP8Calibrate the same size, steps, "
                "cfg, sampler and scheduler as the sampler (the bundled workflows share one set of values)")
        show_status(text)
        if text not in _mismatch_said and len(_mismatch_said) < 1000:
            _mismatch_said.add(text)
            log.warning(text)
    except Exception as e:  # noqa: BLE001
        log.debug("sd35fp8: calibration/sampling comparison skipped: %s", e)


def outer_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: run the whole sampling call inside ``fp8_autocast`` with this MODEL's
    calibrated scales, recipe and runtime; fail clearly if the result holds NaN/Inf."""
    patcher = executor.class_obj.model_patcher
    warn_mismatch(patcher, executor.class_obj, args)
    enabled, recipe = prepare_run(patcher)
    with run_context(patcher, enabled, recipe):
        out = executor(*args, **kwargs)
    check_finite(out, "FP8 sampling")
    return out


def check_finite(t, what: str) -> None:
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise FloatingPointError(
                f"{what} produced {bad} NaN/Inf values out of {t.numel()} in the latent. The image would be "
                "black. Re-run SD35FP8Calibrate with these sampler settings (method 'max'), raise the "
                "autocast margin, or disable FP8 in SD35FP8Autocast to compare.")


def sampler_sample_wrapper(executor, *args, **kwargs):
    """SAMPLER_SAMPLE wrapper (after ComfyUI has loaded and patched the weights, before the first step): centered
    layers recompute their static bias ``bias + W·center`` from the weights as patched (a LoRA, or none after one),
    once per sampling run (sd35fp8.runtime.static.refresh_center_biases)."""
    guider = args[0] if args else None  # inner_sample passes the guider first
    dm = getattr(getattr(getattr(guider, "model_patcher", None), "model", None), "diffusion_model", None)
    if isinstance(dm, torch.nn.Module) and _adapter(dm).get(CENTERS):
        refresh_center_biases(dm)
    return executor(*args, **kwargs)


def with_wrapper(model):
    """Add the OUTER_SAMPLE and SAMPLER_SAMPLE wrappers to ``model`` (a clone the caller owns), replacing ours if
    present."""
    for kind, fn in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
                     (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, sampler_sample_wrapper)):
        model.remove_wrappers_with_key(kind, AUTOCAST_KEY)
        model.add_wrapper_with_key(kind, AUTOCAST_KEY, fn)


def set_autocast(model, enabled: bool, recipe: DelayedScaling | None, runtime: st.Runtime | None = None, **changes):
    """A clone of ``model`` that samples with the given switch, recipe and runtime (None keeps the MODEL's) and any
    other state ``changes`` (e.g. ``input_amax``)."""
    m = model.clone()
    s = st.get(m) or st.FP8State()
    s = dataclasses.replace(s, enabled=bool(enabled), recipe=recipe or DelayedScaling(),
                            runtime=runtime or s.runtime, **changes)
    st.put(m, s)
    with_wrapper(m)
    apply_runtime_options(m, s.runtime if enabled else None)
    return m


def on_gpu(t: torch.Tensor) -> bool:
    """Whether the attention override handles this call (on CPU ComfyUI's own attention is as good)."""
    return t.device.type == "cuda"


def attention_override(backend: str):
    """ComfyUI ``optimized_attention_override``: SDPA with ``backend`` (or our FP8 kernel) for the plain
    [B, S, H*D] calls (the MMDiT's joint attention); anything else goes to ComfyUI's own function."""
    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        if mask is not None or skip_reshape or skip_output_reshape or q.dim() != 3 or not on_gpu(q):
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        if backend == "fp8":  # ComfyUI's [B, S, H*D] layout in and out; cuDNN SDPA where FP8 cannot run
            return fp8_attention(q, k, v, heads)
        b, _, hd = q.shape
        d = hd // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        return attention(q, k, v, backend).transpose(1, 2).reshape(b, -1, hd)
    override.sd35fp8_backend = backend  # read by sd35fp8.runtime.joint: our override decides the attention
    return override


def apply_runtime_options(m, rt: st.Runtime | None) -> None:
    """Install (or, with None, remove) the attention override and the torch.compile / TE APPLY_MODEL wrappers."""
    to = m.model_options.setdefault("transformer_options", {})
    if getattr(to.get(OVERRIDE), "sd35fp8_backend", None) is not None:
        del to[OVERRIDE]
    backend = rt.attention if rt is not None else "auto"
    if backend == "auto":
        backend = "cudnn" if torch.cuda.is_available() and torch.backends.cudnn.is_available() else "auto"
    if backend != "auto" and OVERRIDE not in to:
        to[OVERRIDE] = attention_override(backend)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TE_KEY)
    if rt is None:
        return
    if rt.backend == "transformer_engine":  # TE modules run eager (no torch.compile)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TE_KEY, te_wrapper(rt.cudagraphs))
    elif rt.compile:
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY,
                               compile_wrapper(rt.cudagraphs))


_compile_broken: set[str] = set()


def graph_runners(dm: torch.nn.Module) -> dict:
    """This diffusion model's CUDA-graph runners (``sd35fp8.runtime.graphs.GraphedModule``) that exist:
    "compiled" (the torch runtime's) and "TE"."""
    ad = _adapter(dm)
    found = {"compiled": ad.get(COMPILED, {}).get(GRAPHS), "TE": ad.get(TE_GRAPHS)}
    return {k: v for k, v in found.items() if v is not None}


def drop_graphs(dm: torch.nn.Module, te: bool = True, compiled: bool = True) -> None:
    """Free captured CUDA graphs (and their memory pools) of this diffusion model: the TE backend's
    and/or those of the compiled torch runtime."""
    ad = _adapter(dm)
    if te:
        ad.pop(TE_GRAPHS, None)
    if compiled:
        ad.get(COMPILED, {}).pop(GRAPHS, None)


@contextlib.contextmanager
def _swapped(base, module: torch.nn.Module):
    """ComfyUI's model runs ``module`` as its diffusion model for one call only, so its loading and
    offloading always see the plain module."""
    dm = base.diffusion_model
    base.diffusion_model = module
    try:
        yield
    finally:
        base.diffusion_model = dm


def _on_cuda(dm: torch.nn.Module) -> bool:
    return torch.cuda.is_available() and next(dm.parameters()).device.type == "cuda"


def te_wrapper(graphs: bool):
    """APPLY_MODEL wrapper for the TransformerEngine backend: TE's delayed-scaling update after every
    denoiser call (``te_step``) and, with ``graphs``, the whole diffusion model replayed as CUDA graphs,
    one per resolution/batch (``sd35fp8.runtime.graphs``; TE modules cannot go through torch.compile, and eager
    they spend ~150 µs of host time per Linear call). Graphs are re-captured when ComfyUI replaces
    weights (LoRA merge, offload/reload); a model that cannot be captured runs eager with a warning."""
    def wrapper(executor, *args, **kwargs):
        dm = executor.class_obj.diffusion_model
        if not graphs or not _on_cuda(dm):
            out = executor(*args, **kwargs)
            te_step()
            return out
        ad = _adapter(dm)
        runner = ad.get(TE_GRAPHS)
        if runner is None:
            runner = ad[TE_GRAPHS] = GraphedModule(dm, after=te_step, quick=quick_version)
        with _swapped(executor.class_obj, runner):
            return executor(*args, **kwargs)
    return wrapper


def show_status(text: str) -> None:
    """``text`` on the running node in the editor (ComfyUI's progress text), best effort: a status line must never
    break sampling."""
    try:
        import server
        from comfy_execution.utils import get_executing_context
        ctx, inst = get_executing_context(), getattr(server.PromptServer, "instance", None)
        if ctx is not None and inst is not None:
            inst.send_progress_text(text, ctx.node_id, inst.client_id)
    except Exception as e:  # noqa: BLE001
        log.debug("sd35fp8: no status line in the editor: %s", e)


def first_run(cache: dict, x, graphs: bool) -> str | None:
    """The message for the first denoiser call of a shape (which compiles, and with ``graphs`` captures): logged
    once and shown on the node, since the sampler's progress bar sits at 0 meanwhile. None for a shape seen
    before."""
    seen = cache.setdefault(SEEN, set())
    key = (tuple(x.shape), bool(graphs))
    if key in seen:
        return None
    seen.add(key)
    h, w = (int(x.shape[-2]) * 8, int(x.shape[-1]) * 8) if x.dim() >= 4 else (0, 0)
    return (f"sd35fp8: first FP8 run at {w}x{h}, denoiser batch {int(x.shape[0])}: compiling"
            f"{' and capturing CUDA graphs' if graphs else ''} once for this size (about a minute on a GPU; the "
            "sampler's progress waits meanwhile, later runs at this size start at once)")


def compile_wrapper(graphs: bool):
    """APPLY_MODEL wrapper running the diffusion model through ``torch.compile`` (swapped in per call, as
    ComfyUI's TorchCompileModel does). One compiled module per diffusion model, specialised per shape
    (``dynamic=False``: each resolution/batch compiles once). With ``graphs`` and the static FP8 runtime
    (calibrated scales, no run-time state on the host), the compiled model is replayed whole as CUDA
    graphs (``sd35fp8.runtime.graphs.GraphedModule``, one per resolution/batch): a denoiser call is then one graph
    launch, with no guard checks and no per-kernel launches on the host (cheaper than torch.compile's
    reduce-overhead mode: see bench/results). If compilation is impossible here (no Triton, no C
    compiler, an unsupported GPU), it warns once and runs eager: same results, slower."""
    def wrapper(executor, *args, **kwargs):
        dm = executor.class_obj.diffusion_model
        if COMPILED in _compile_broken or not _on_cuda(dm):
            return executor(*args, **kwargs)
        cache = _adapter(dm).setdefault(COMPILED, {})
        run = cache.get(COMPILED)
        if run is None:
            run = cache[COMPILED] = torch.compile(dm, dynamic=False)
        if graphs and static_key(dm) is not None:  # the static FP8 runtime only
            if GRAPHS not in cache:
                cache[GRAPHS] = GraphedModule(run, quick=quick_version)
            run = cache[GRAPHS]
        notice = first_run(cache, args[0], graphs and GRAPHS in cache) if args and torch.is_tensor(args[0]) else None
        if notice:
            log.info(notice)
            show_status(notice)
            t0 = time.perf_counter()
        try:
            with _swapped(executor.class_obj, run):
                out = executor(*args, **kwargs)
            if notice:
                done = f"sd35fp8: compiled for this size in {time.perf_counter() - t0:.0f} s"
                log.info(done)
                show_status(done)
            return out
        except Exception as e:  # noqa: BLE001
            import torch._dynamo.exc as dexc
            if not isinstance(e, (dexc.BackendCompilerFailed, dexc.TorchRuntimeError, dexc.Unsupported,
                                  ImportError, OSError)) and "triton" not in str(e).lower():
                raise
            _compile_broken.add(COMPILED)
            cache.pop(GRAPHS, None)
            log.warning("sd35fp8: torch.compile is not usable here (%s: %s); running the FP8 model eager "
                        "(same results, slower)", type(e).__name__, str(e).splitlines()[0][:300])
        return executor(*args, **kwargs)
    return wrapper
