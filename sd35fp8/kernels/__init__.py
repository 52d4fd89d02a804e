"""Kernels, one op per file: a public function, its PyTorch reference and (on CUDA) its Triton kernel.

``gemv``: BF16-activation x FP8-weight linear for few rows; ``matmul``: FP8 / INT8 scaled matmuls;
``mlp``: the fused MLP GEMMs; ``norm``: (residual +) LayerNorm + modulation + quantization; ``attention``: FP8
attention and the SDPA backends; ``joint``: the SD3 joint-attention prologue. They import only ``core`` (and
``common``, the Triton helpers they share).
"""
