"""SD3.5 FP8 node pack for ComfyUI: calibrated FP8 E4M3 MMDiT, fp8_autocast sampling.

ComfyUI imports this package and calls ``comfy_entrypoint`` (V3 node API, ComfyUI >= 0.3.48).
``NODE_CLASS_MAPPINGS`` is deliberately not exported: ComfyUI would then ignore ``comfy_entrypoint``.

The FP8 library beside the nodes has one import name everywhere, ``sd35fp8`` (tests, benchmarks and ComfyUI alike):
ComfyUI imports this pack under its folder's name, so the library is registered under its own name here, once.
"""
import importlib.util
import os
import sys

_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd35fp8")


def _register_library() -> None:
    """Make ``import sd35fp8`` find the library in this folder (without putting the folder on sys.path, which
    would expose ``nodes``, ``tests`` and ``scripts`` as top-level names)."""
    have = sys.modules.get("sd35fp8")
    if have is not None:
        where = os.path.dirname(os.path.abspath(getattr(have, "__file__", "") or ""))
        if where != _LIB:
            raise ImportError(f"another copy of the sd35fp8 library is already loaded from {where}; this pack's is "
                              f"{_LIB}. Remove one of the two SD3.5 FP8 packs from custom_nodes/")
        return
    spec = importlib.util.spec_from_file_location("sd35fp8", os.path.join(_LIB, "__init__.py"),
                                                  submodule_search_locations=[_LIB])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sd35fp8"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["sd35fp8"]
        raise


_register_library()

WEB_DIRECTORY = "./web"  # web/docs/<NodeId>.md: each node's help page in ComfyUI's node docs panel

if importlib.util.find_spec("comfy") is not None:
    # inside ComfyUI: let any import error surface, so ComfyUI logs "IMPORT FAILED" with its cause
    from .nodes.schemas import comfy_entrypoint  # noqa: F401
    from .nodes.routes import register_with_server

    register_with_server()  # the generation service's routes on ComfyUI's own server (docs/api.md)
