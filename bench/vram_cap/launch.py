"""Start ComfyUI's main.py as a card of SD35FP8_VRAM_CAP_GIB GiB would (bench/e2e_bench.py --vram-cap-gib):

    cd ComfyUI && python3 /path/to/bench/vram_cap/launch.py main.py --listen ... (main.py's own arguments)

main.py runs as ``__main__`` unchanged (its allocator and DynamicVRAM set-up happen before torch loads, as
always); right after it imports ``comfy.model_management`` every CUDA allocation of the process is capped
(``torch.cuda.set_per_process_memory_fraction``): one past the cap raises torch.OutOfMemoryError as on the smaller
card. ComfyUI's own planning is told the same size by the caller (``--reserve-vram``)."""
import importlib.abc
import importlib.util
import os
import runpy
import sys


def cap():
    import torch
    gib = float(os.environ["SD35FP8_VRAM_CAP_GIB"])
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), 0)
    print(f"[vram_cap] torch CUDA allocations capped at {gib:g} GiB of {total / 2**30:.1f}", flush=True)


class AfterModelManagement(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "comfy.model_management":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            cap()
        spec.loader.exec_module = exec_module
        return spec


script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.getcwd())
sys.meta_path.insert(0, AfterModelManagement())
runpy.run_path(script, run_name="__main__")
