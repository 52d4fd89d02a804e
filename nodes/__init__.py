"""The ComfyUI adapter over the ``sd35fp8`` library: the only code of the pack that imports ComfyUI.

Split by ComfyUI concern: ``schemas`` (the nodes the user sees), ``state`` (the typed, immutable record a MODEL
carries), ``ops`` (the custom_operations Linear: load-time quantization, LoRA hooks), ``checkpoints`` (model
lists, load, save), ``calibration``, ``sampling`` (the sampling wrappers: autocast, compile, CUDA graphs,
attention). Importing this package imports nothing: ComfyUI enters through ``schemas.comfy_entrypoint``.
"""
