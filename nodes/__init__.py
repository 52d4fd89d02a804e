"""ComfyUI adapter for the fp8 library (imported only inside ComfyUI)."""
from .sd35_nodes import NODES, comfy_entrypoint

__all__ = ["NODES", "comfy_entrypoint"]
