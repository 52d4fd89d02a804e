"""SD3.5 FP8 node pack for ComfyUI: calibrated FP8 E4M3 MMDiT, fp8_autocast sampling.

ComfyUI imports this package and calls ``comfy_entrypoint`` (V3 node API). ``NODE_CLASS_MAPPINGS`` is
deliberately not exported: ComfyUI would then ignore ``comfy_entrypoint``.
"""
try:
    from .nodes import comfy_entrypoint  # noqa: F401
except ImportError as e:  # imported outside ComfyUI (e.g. pytest collecting the repo root)
    if "comfy" not in str(e):
        raise
