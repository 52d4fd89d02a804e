"""The tests' hardware markers: each GPU requirement is a skip condition plus the ``gpu`` marker (``pytest -m gpu``
selects what only a GPU can run; ``-m "not gpu"`` what a CPU machine checks)."""
import pytest
import torch

import sd35fp8


def _gpu(needed: bool, reason: str):
    def mark(f):
        return pytest.mark.gpu(pytest.mark.skipif(not needed, reason=reason)(f))
    return mark


CUDA = torch.cuda.is_available()
cuda = _gpu(CUDA, "needs a CUDA GPU")
fp8_gpu = _gpu(CUDA and sd35fp8.device_supports_fp8_matmul("cuda"),
               "needs a GPU with FP8 tensor cores (compute capability >= 8.9)")
hopper = _gpu(CUDA and torch.cuda.get_device_capability()[0] == 9,
              "the fused FP8 MLP kernel needs a Hopper GPU (TMA)")


def te_gpu(available: bool):
    """TransformerEngine tests: TE installed and usable on a GPU with FP8."""
    return _gpu(CUDA and available, "needs TransformerEngine and a GPU with FP8")
