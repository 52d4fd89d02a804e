"""SD3.5 FP8 node pack for ComfyUI: calibrated FP8 E4M3 MMDiT, fp8_autocast sampling.

ComfyUI imports this package and calls ``comfy_entrypoint`` (V3 node API, ComfyUI >= 0.3.48).
``NODE_CLASS_MAPPINGS`` is deliberately not exported: ComfyUI would then ignore ``comfy_entrypoint``.
Outside ComfyUI (e.g. using the ``fp8`` library on its own) nothing is imported from ComfyUI.
"""
import importlib.util

if importlib.util.find_spec("comfy") is not None:
    # inside ComfyUI: let any import error surface, so ComfyUI logs "IMPORT FAILED" with its cause
    from .nodes import comfy_entrypoint  # noqa: F401
