"""The SD3.5 FP8 nodes (V3 schema): what the user sees. Node IDs and input order are public API: never change them;
the work is done in the modules beside this one."""
from __future__ import annotations

import logging
import math
import os

from typing_extensions import override

import comfy.model_management
import comfy.samplers
import comfy.utils
from comfy_api.latest import ComfyExtension, io, ui

from sd35fp8 import METHODS, DelayedScaling, Format
from sd35fp8.kernels.attention import ATTENTION_BACKENDS
from sd35fp8.runtime.te import BACKENDS, SCALINGS, availability, preload, resolve_backend

from . import batching, calibration, checkpoints, metrics, sampling
from . import state as st

log = logging.getLogger("sd35fp8")


def check_widgets(cls, values: dict) -> bool | str:
    """Queue-time check of a node's widget values against its own schema: a combo value must be one of its options,
    a number finite and within its range. ComfyUI 0.3.75 does not check V3 combos at all and lets NaN through its
    range checks; a node that names inputs in ``validate_inputs`` also turns ComfyUI's own checks off for them, so
    what is named there is checked here in full. Linked inputs (None here: not known at queue time) are left to the
    node that produces them."""
    node = cls.define_schema()
    for inp in node.inputs:
        v = values.get(inp.id)
        if v is None:
            continue
        if isinstance(inp, io.Combo.Input):
            if v not in inp.options:
                shown = ", ".join(map(str, inp.options[:12])) + (", ..." if len(inp.options) > 12 else "")
                return f"{node.node_id}: {inp.id} {v!r} is not one of its options ({shown})"
        elif isinstance(inp, (io.Int.Input, io.Float.Input)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return f"{node.node_id}: {inp.id} must be a finite number (got {v!r})"
            if inp.min is not None and v < inp.min or inp.max is not None and v > inp.max:
                return f"{node.node_id}: {inp.id} = {v} is outside {inp.min}..{inp.max}"
    return True

preload()  # TransformerEngine, when installed, must load before torch's cuDNN (see sd35fp8/runtime/te.py)

# the Autocast node's defaults are the state record's (nodes/state.py: one place)
RUNTIME, RECIPE = st.Runtime(), DelayedScaling()
PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration_prompts.txt")
with open(PROMPTS_FILE, encoding="utf-8") as _f:
    DEFAULT_PROMPTS = _f.read().strip()  # the shipped default calibration set, one prompt per line


def advanced(inp):
    """Mark a rarely used input advanced (the frontend keeps it behind its advanced toggle). ComfyUI 0.30 reads the
    input's ``advanced``; 0.3.75 has no such field, so it also travels in the input's extra dict (object_info)."""
    inp.advanced = True
    inp.extra_dict = {**(getattr(inp, "extra_dict", None) or {}), "advanced": True}
    return inp


def text_ui(text: str):
    """The node's text shown on it in the editor (ComfyUI's PreviewText where it exists, the plain dict before)."""
    preview = getattr(ui, "PreviewText", None)
    return preview(text) if preview else {"text": (text,)}


def prompt_lines(prompts: str | None) -> list[str]:
    """The calibration prompts: one per non-empty line."""
    return [p.strip() for p in (prompts or "").splitlines() if p.strip()]


class SD35FP8CheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SD35FP8CheckpointLoader",
            display_name="Load SD3.5 Checkpoint (FP8)",
            category="loaders/sd35 fp8",
            description="Loads an SD3.5 Large / Large Turbo / Medium checkpoint (from checkpoints/ or "
                        "diffusion_models/). A BF16/FP16 file is quantized to FP8 E4M3 tensor by tensor while "
                        "loading (joint-block Linear layers; embedders and the final layer stay high precision). "
                        "An FP8 file (saved by SD35FP8SaveCheckpoint, or a stock scaled-FP8 file) loads as "
                        "stored; with calibrated input scales it needs no re-calibration. CLIP and VAE are "
                        "returned when the file holds them (otherwise use TripleCLIPLoader / VAELoader).",
            inputs=[
                io.Combo.Input("ckpt_name", options=checkpoints.model_file_list(),
                               tooltip="SD3.5 .safetensors from models/checkpoints or models/diffusion_models"),
                io.Combo.Input("weight_scaling", options=list(checkpoints.WEIGHT_FORMATS), default="fastest",
                               tooltip="per_tensor: fastest; per_tensor_int8_mlp: most faithful (see the help page)"),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="the FP8 model: calibrate it, then Autocast"),
                io.Clip.Output(display_name="CLIP", tooltip="the file's text encoders, when it has them"),
                io.Vae.Output(display_name="VAE", tooltip="the file's VAE, when it has one"),
                io.String.Output(display_name="info", tooltip="what was loaded: file, format, memory"),
            ],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name=None, weight_scaling=None):
        """At queue time: a file that is not in the model folders, an unknown weight format."""
        # the formats' own names (the options before 0.3) are the same choices: saved workflows keep theirs
        return check_widgets(cls, {"ckpt_name": ckpt_name,
                                   "weight_scaling": checkpoints.CHOICE_OF.get(weight_scaling, weight_scaling)})

    @classmethod
    def execute(cls, ckpt_name, weight_scaling="fastest") -> io.NodeOutput:
        path = checkpoints.resolve_model_file(ckpt_name)
        model, clip, vae, text = checkpoints.load_sd35_fp8(path, weight_scaling)
        metrics.count_model_load()
        return io.NodeOutput(model, clip, vae, text)


class SD35FP8Calibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SD35FP8Calibrate",
            display_name="Calibrate SD3.5 FP8",
            category="sampling/sd35 fp8",
            description="Samples the calibration prompts with ComfyUI's own sampler (all steps, cond and "
                        "uncond), records every FP8 layer's input range and returns a MODEL with static "
                        "calibrated FP8 activation scales that samples inside fp8_autocast, plus a report.",
            inputs=[
                io.Model.Input("model", tooltip="the FP8 model from Load SD3.5 Checkpoint (FP8)"),
                io.Clip.Input("clip", tooltip="the text encoders for the calibration prompts"),
                io.String.Input("prompts", multiline=True, default=DEFAULT_PROMPTS,
                                tooltip="one calibration prompt per line; add prompts like yours"),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="as in your KSampler"),
                io.Float.Input("cfg", default=4.5, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="as in your KSampler"),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="as in your KSampler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="sgm_uniform",
                               tooltip="as in your KSampler"),
                io.Int.Input("width", default=1024, min=64, max=8192, step=16, tooltip="as your latent image"),
                io.Int.Input("height", default=1024, min=64, max=8192, step=16, tooltip="as your latent image"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="noise of the calibration runs (fixed: a new seed calibrates again)"),
                advanced(io.Combo.Input("method", options=list(METHODS), default="max",
                               tooltip="max: largest |x| seen; percentile: clip rare outliers")),
                advanced(io.Float.Input("percentile", default=99.99, min=90.0, max=100.0, step=0.001, round=0.0001,
                               tooltip="used by method=percentile")),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="the calibrated model: connect it to Autocast"),
                     io.String.Output(display_name="report", tooltip="ranges, time, and the calibration id"),
                     # the settings calibrated for, to feed KSampler and the latent image: one set of values
                     io.Int.Output(display_name="steps", tooltip="connect to KSampler's steps"),
                     io.Float.Output(display_name="cfg", tooltip="connect to KSampler's cfg"),
                     io.Combo.Output(display_name="sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                                     tooltip="connect to KSampler's sampler_name"),
                     io.Combo.Output(display_name="scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                                     tooltip="connect to KSampler's scheduler"),
                     io.Int.Output(display_name="width", tooltip="connect to the latent image's width"),
                     io.Int.Output(display_name="height", tooltip="connect to the latent image's height")],
        )

    @classmethod
    def validate_inputs(cls, prompts=None, cfg=None, sampler_name=None, scheduler=None, method=None,
                        percentile=None):
        """At queue time: no prompt or thousands of them, an unknown sampler, scheduler or method (they ran as
        euler/simple), a NaN cfg. (ComfyUI lists a failure under each input named here; the message names the one
        that is wrong.)"""
        if prompts is not None:
            try:
                calibration.check_prompt_count(len(prompt_lines(prompts)))
            except ValueError as e:
                return f"SD35FP8Calibrate: prompts: {e}"
        return check_widgets(cls, dict(cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, method=method,
                                       percentile=percentile))

    @classmethod
    def execute(cls, model, clip, prompts, steps, cfg, sampler_name, scheduler, width, height, seed,
                method="max", percentile=99.99) -> io.NodeOutput:
        sampling.require_fp8_model(model)
        if clip is None:
            raise ValueError("SD35FP8Calibrate needs a CLIP (the checkpoint had none: use TripleCLIPLoader)")
        lines = prompt_lines(prompts)
        calibration.check_prompt_count(len(lines))
        pbar = comfy.utils.ProgressBar(len(lines) * (steps + 1))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        out, text = calibration.calibrate_cached(
            model, lines, negative, steps, cfg, sampler_name, scheduler, width, height, seed, method, percentile,
            progress=lambda done, total: pbar.update_absolute(done, total),
            encode=lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t)),
            conditioning_id=calibration.clip_fingerprint(clip))
        # the report shows on the node itself: no separate preview output that ComfyUI would queue (and calibrate
        # for) when the sampling half of a graph is invalid
        return io.NodeOutput(out, text, steps, cfg, sampler_name, scheduler, width, height, ui=text_ui(text))


class SD35FP8Autocast(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SD35FP8Autocast",
            display_name="SD3.5 FP8 Autocast",
            category="sampling/sd35 fp8",
            description="Samples this MODEL inside fp8_autocast with the given recipe (TransformerEngine's "
                        "DelayedScaling fields). Calibrated layers use their static scales (with 2^margin "
                        "headroom); uncalibrated ones delayed scaling over amax_history_len calls. "
                        "enabled=false runs weight-only FP8 (BF16 compute) for comparison.",
            inputs=[
                io.Model.Input("model", tooltip="the calibrated model from Calibrate SD3.5 FP8"),
                io.Boolean.Input("enabled", default=True, tooltip="off: weight-only FP8, BF16 compute (to compare)"),
                advanced(io.Combo.Input("fp8_format", options=[f.value for f in Format],
                                        default=RECIPE.fp8_format.value,
                               tooltip="E4M3 and HYBRID are the same for inference")),
                advanced(io.Int.Input("amax_history_len", default=RECIPE.amax_history_len, min=1, max=1024,
                             tooltip="uncalibrated layers and TransformerEngine only")),
                advanced(io.Int.Input("margin", default=RECIPE.margin, min=0, max=8,
                             tooltip="2^margin headroom on activation scales; raise to 1 if you see NaN")),
                advanced(io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                               tooltip="torch: ours; transformer_engine: TE; auto: the faster one installed")),
                io.Boolean.Input("compile", default=RUNTIME.compile, optional=True,
                                 tooltip="torch.compile the FP8 model (first run per size compiles, ~1 min)"),
                advanced(io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default=RUNTIME.attention,
                                        optional=True,
                               tooltip="auto: cuDNN on NVIDIA; fp8: our FP8 attention (faster, a little error)")),
                io.Boolean.Input("cuda_graphs", default=RUNTIME.cudagraphs, optional=True,
                                 tooltip="replay the denoiser as CUDA graphs, one per size (fastest)"),
                advanced(io.Combo.Input("scaling", options=list(SCALINGS), default=RUNTIME.scaling, optional=True,
                               tooltip="transformer_engine only: delayed or current scaling")),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="samples in FP8: connect it to KSampler")],
        )

    @classmethod
    def validate_inputs(cls, backend=None, fp8_format=None, attention=None, scaling=None):
        """At queue time: every option (check_widgets), and transformer_engine where it cannot run. (ComfyUI lists a
        failure under each input named here; the message names the one that is wrong.)"""
        ok = check_widgets(cls, dict(backend=backend, fp8_format=fp8_format, attention=attention, scaling=scaling))
        if ok is not True:
            return ok
        if backend == "transformer_engine":
            ok, why = availability()
            if not ok:
                return f"backend=transformer_engine: {why}. Or choose backend=torch (our own FP8 path)."
        return True

    @classmethod
    def execute(cls, model, enabled=True, fp8_format=RECIPE.fp8_format.value,
                amax_history_len=RECIPE.amax_history_len, margin=RECIPE.margin, backend="auto",
                compile=RUNTIME.compile, attention=RUNTIME.attention, cuda_graphs=RUNTIME.cudagraphs,
                scaling=RUNTIME.scaling) -> io.NodeOutput:
        sampling.require_fp8_model(model)
        backend = resolve_backend(backend, comfy.model_management.get_torch_device())
        if backend == "transformer_engine":
            ok, why = availability()
            if not ok:
                raise RuntimeError(why)
        recipe = DelayedScaling(fp8_format=fp8_format, amax_history_len=amax_history_len, margin=margin)
        runtime = st.Runtime(compile=bool(compile), attention=attention,
                             cudagraphs=bool(cuda_graphs and (compile or backend == "transformer_engine")),
                             backend=backend, scaling=scaling)
        return io.NodeOutput(sampling.set_autocast(model, enabled, recipe, runtime))


class SD35FP8SaveCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SD35FP8SaveCheckpoint",
            display_name="Save SD3.5 FP8 Checkpoint",
            category="advanced/model_merging/sd35 fp8",
            description="Saves a calibrated FP8 MODEL (LoRAs merged) as a .safetensors that reloads in seconds "
                        "with no re-calibration: into models/diffusion_models, or, given CLIP and/or VAE, an "
                        "all-in-one file into models/checkpoints. The FP8 layout (weight_scale/input_scale plus "
                        "the legacy scaled_fp8 keys) also loads in stock ComfyUI's UNETLoader / "
                        "CheckpointLoaderSimple. An existing file is never replaced unless overwrite is on.",
            inputs=[
                io.Model.Input("model", tooltip="a MODEL from SD35FP8Calibrate (or a calibrated FP8 file)"),
                io.String.Input("filename", default="sd35_fp8/sd3.5_fp8_calibrated",
                                tooltip="in models/diffusion_models (checkpoints with CLIP/VAE); .safetensors added"),
                io.Boolean.Input("overwrite", default=False, tooltip="replace an existing file of that name"),
                io.Clip.Input("clip", optional=True, tooltip="include the text encoders (all-in-one checkpoint)"),
                io.Vae.Input("vae", optional=True, tooltip="include the VAE (all-in-one checkpoint)"),
            ],
            outputs=[io.String.Output(display_name="info", tooltip="the file written, its size and contents")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename=None):
        """At queue time: a file name a loader would not list, control characters, an over-long name."""
        if filename is None:
            return True
        try:
            checkpoints.save_target(filename, all_in_one=False)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, filename, overwrite=False, clip=None, vae=None) -> io.NodeOutput:
        _, text = checkpoints.save_fp8_checkpoint(model, filename, overwrite=overwrite, clip=clip, vae=vae)
        return io.NodeOutput(text, ui=text_ui(text))


class SD35FP8PromptBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SD35FP8PromptBatch",
            display_name="SD3.5 Prompt Batch (many prompts, one sampler call)",
            category="advanced/model_merging/sd35 fp8",
            description="Several different prompts, each with its own seed, denoised together in one sampler call: "
                        "connect positive/negative to CFGGuider, latent and noise to SamplerCustomAdvanced. Each image "
                        "is the one the same prompt and seed give alone with KSampler (deterministic samplers).",
            inputs=[
                io.Clip.Input("clip", tooltip="the text encoders (TripleCLIPLoader or the checkpoint's CLIP)"),
                io.String.Input("prompts", multiline=True, default="", tooltip="one prompt per line"),
                io.String.Input("negative", multiline=True, default="", tooltip="the negative prompt, for all items"),
                io.String.Input("seeds", default="", tooltip="one seed per prompt, comma separated; empty: from seed"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="the base seed the items' seeds are derived from when seeds is empty"),
                io.Int.Input("width", default=1024, min=64, max=8192, step=16, tooltip="image width"),
                io.Int.Input("height", default=1024, min=64, max=8192, step=16, tooltip="image height"),
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="the prompts, batched"),
                     io.Conditioning.Output(display_name="negative", tooltip="the negative prompt"),
                     io.Latent.Output(display_name="latent", tooltip="an empty latent, one per prompt"),
                     io.Noise.Output(display_name="noise", tooltip="each item's noise from its own seed"),
                     io.String.Output(display_name="report", tooltip="the items' seeds and any padding")],
        )

    @classmethod
    def validate_inputs(cls, prompts=None, seeds=None, seed=None, width=None, height=None):
        if prompts is not None:
            n = len(prompt_lines(prompts))
            if not n:
                return "SD35FP8PromptBatch: prompts: give at least one prompt (one per line)"
            if n > batching.MAX_ITEMS:
                return f"SD35FP8PromptBatch: prompts: {n} lines; at most {batching.MAX_ITEMS} per sampler call"
            if seeds is not None:
                try:
                    batching.item_seeds(n, seeds, 0)
                except ValueError as e:
                    return str(e)
        return check_widgets(cls, dict(seed=seed, width=width, height=height))

    @classmethod
    def execute(cls, clip, prompts, negative, seeds, seed, width, height) -> io.NodeOutput:
        lines = prompt_lines(prompts)
        pos, neg, latent, noise, report = batching.prompt_batch(clip, lines, negative,
                                                                batching.item_seeds(len(lines), seeds, seed),
                                                                width, height)
        return io.NodeOutput(pos, neg, latent, noise, report)


class SD35FP8CompareImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SD35FP8CompareImages",
            display_name="Compare Images (A/B fidelity)",
            category="advanced/model_merging/sd35 fp8",
            description="What FP8 changes, on your own model: two IMAGE batches of the same prompts and seeds (e.g. "
                        "stock BF16 and the pack) in; PSNR, SSIM and the largest difference per image and their mean, "
                        "and a difference heat map (black: equal, white: the largest difference) out.",
            inputs=[
                io.Image.Input("image_a", tooltip="the reference images (e.g. stock ComfyUI in BF16)"),
                io.Image.Input("image_b", tooltip="the images to compare (e.g. the pack in FP8), same size"),
                io.Float.Input("heatmap_scale", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="the difference shown white (0-1); 0: the largest one found"),
            ],
            outputs=[io.Image.Output(display_name="heatmap", tooltip="where the images differ, per pair"),
                     io.String.Output(display_name="report", tooltip="PSNR, SSIM and max difference per image")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, heatmap_scale=None):
        return check_widgets(cls, dict(heatmap_scale=heatmap_scale))

    @classmethod
    def execute(cls, image_a, image_b, heatmap_scale=0.0) -> io.NodeOutput:
        from sd35fp8.core import fidelity
        try:
            res = fidelity.compare(image_a, image_b, ("image_a", "image_b"))
            heat, top = fidelity.heatmap(image_a, image_b, heatmap_scale or None)
        except ValueError as e:
            raise ValueError(f"SD35FP8CompareImages: {e}") from None
        text = "\n".join(res["lines"] + [f"heat map: white = a difference of {top * 255:.1f}/255"])
        log.info("SD35FP8CompareImages: %s", res["lines"][-1])
        return io.NodeOutput(heat, text, ui=text_ui(text))


NODES = [SD35FP8CheckpointLoader, SD35FP8Calibrate, SD35FP8Autocast, SD35FP8SaveCheckpoint, SD35FP8PromptBatch,
         SD35FP8CompareImages]


class SD35FP8Extension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> SD35FP8Extension:
    return SD35FP8Extension()
