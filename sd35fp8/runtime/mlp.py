"""The fused MLP of the static runtime: fc1 + GELU + the quantization of fc2's input as one kernel, and fc2 with
the block's gated residual add in its epilogue (``sd35fp8.kernels.mlp``), installed as the forward of each eligible
``Mlp`` module (timm/ComfyUI layout). INT8-weight MLPs run W8A8 (per-token INT8 into fc1, static INT8 into fc2)."""
from __future__ import annotations

import torch

from ..core.marks import install_forward, installed, restore_forward
from ..kernels.mlp import fp8_linear_gelu, fp8_linear_residual, fused_supported
from ..linear import FP8LinearMixin


def _installed(mod: torch.nn.Module) -> bool:
    return installed(mod) == FUSED


FUSED = "fused_mlp"  # the installed forward's kind (sd35fp8.core.marks)
# the static modes of an MLP's two layers that its fused forward takes: E4M3, or INT8 W8A8 (per-token input into
# fc1, whose kernel writes fc2's input as INT8 at fc2's static scale)
FUSED_MODES = (("fp8", "fp8"), ("int8_token", "int8_static"))


def int8_mlp_modes(model: torch.nn.Module) -> dict:
    """{layer: static mode} for the MLPs whose fc1 and fc2 both hold INT8 weights (W8A8: fc1 per token, fc2 at
    its calibrated static scale); other INT8 layers run weight-only."""
    modes = {}
    for mod in model.modules():
        parts = mlp_parts(mod)
        if parts is not None and parts[0].fp8_int8 and parts[2].fp8_int8:
            modes[parts[0]], modes[parts[2]] = "int8_token", "int8_static"
    return modes


def mlp_parts(mod: torch.nn.Module):
    """(fc1, act, fc2) of a timm/ComfyUI-style ``Mlp`` (fc1 → GELU → dropout/identity → fc2) with two FP8
    layers; None for anything else."""
    fc1, act, fc2 = (mod._modules.get(n) for n in ("fc1", "act", "fc2"))
    if type(mod).__name__ != "Mlp" or not isinstance(act, torch.nn.GELU) or not all(
            isinstance(f, FP8LinearMixin) and f.fp8_quantized for f in (fc1, fc2)):
        return None
    for n in ("drop1", "norm", "drop2"):
        m = mod._modules.get(n)
        if not (m is None or isinstance(m, torch.nn.Identity) or (isinstance(m, torch.nn.Dropout) and m.p == 0)):
            return None
    return fc1, act, fc2


def fused_mlp_ready(mlp: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``mlp`` (an installed fused MLP) runs its fused kernel for activations ``x``."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    return _installed(mlp) and (fc1.fp8_static, fc2.fp8_static) in FUSED_MODES \
        and fc1.fp8_static_ready(x) and fc2.fp8_static_ready(x) and fused_supported(fc1.weight, x.device)


def _fc1_gelu(mlp: torch.nn.Module, h8: torch.Tensor, h_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fc1 + GELU + the quantization of fc2's input, one kernel (sd35fp8.kernels.mlp), from fc1's quantized input (its
    scale: fc1's static one unless given, e.g. INT8 per-token scales)."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    return fp8_linear_gelu(h8, fc1.weight, fc1.fp8_in_scale if h_scale is None else h_scale, fc1.weight_scale,
                           fc1.fp8_static_bias(), fc2.fp8_in_inv, mlp.act.approximate, fc2.fp8_in_shift)


def fused_mlp_quantized(mlp: torch.nn.Module, h8: torch.Tensor, out_dtype: torch.dtype,
                        h_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fc2(GELU(fc1(h))) of a fused MLP from fc1's input already quantized (``fc1.fp8_static_input``: [M, K]
    E4M3 or INT8, ``h_scale`` its scale): fc1 + GELU + the quantization of fc2's input in one kernel, then fc2;
    returns [M, out]."""
    return mlp.fc2.fp8_static_matmul(_fc1_gelu(mlp, h8, h_scale), out_dtype)


def fused_mlp_residual(mlp: torch.nn.Module, h8: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
                       h_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x + gate·mlp(h)`` for a DiT block's MLP branch, from fc1's quantized input ``h8`` ([B·L, K] E4M3 or
    INT8, ``h_scale`` its scale where not fc1's static one), the residual stream ``x`` [B, L, C] and the
    per-sample gate [B, C]: fc1's kernel, then fc2 with the gated residual add in its epilogue (sd35fp8.kernels.mlp;
    computed unfused in fp32 where that kernel does not run)."""
    fc2 = mlp.fc2
    out = fp8_linear_residual(_fc1_gelu(mlp, h8, h_scale), fc2.weight, fc2.fp8_in_scale, fc2.weight_scale,
                              fc2.fp8_static_bias(), x.reshape(-1, x.shape[-1]), gate, precise=not fc2.fp8_fast_accum)
    return out.view(x.shape)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``Mlp.forward`` with fc1 + GELU + fc2's input quantization in one kernel (sd35fp8.kernels.mlp); the module's
    own forward wherever the static FP8 path or that kernel does not apply to ``x``."""
    if not fused_mlp_ready(self, x):
        return type(self).forward(self, x)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    h8, hs = self.fc1.fp8_static_input(x.reshape(-1, self.fc1.in_features))
    out = fused_mlp_quantized(self, h8, out_dtype, hs)
    return out.reshape(*x.shape[:-1], self.fc2.out_features).to(x.dtype)


def set_fused_mlps(model: torch.nn.Module, on: bool) -> None:
    """Install (or remove) the fused forward on every MLP of ``model`` whose layers are both static FP8."""
    for mod in model.modules():
        parts = mlp_parts(mod)
        if on and parts is not None and (parts[0].fp8_static, parts[2].fp8_static) in FUSED_MODES:
            install_forward(mod, FUSED, _fused_mlp_forward)
        else:
            restore_forward(mod, FUSED)


def fused_mlps(model: torch.nn.Module) -> int:
    """How many MLPs of ``model`` run the fused forward."""
    return sum(1 for m in model.modules() if _installed(m))
