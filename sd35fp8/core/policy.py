"""Which Linear layers become FP8: the policy is data, and every decision is reported back."""
from __future__ import annotations

import dataclasses
import re

from .quant import GRANULARITIES, INT8_ROWS

# Every Linear of the MMDiT joint blocks: attention qkv/proj (attn and MMDiT-X attn2), the MLP, and
# the adaLN modulation (a third of SD3.5's weight bytes: FP8 storage matters there).
SD3_INCLUDE = (r"^joint_blocks\.\d+\.(x_block|context_block)\.(attn|attn2|mlp|adaLN_modulation)\.",)
# Embedders and the final layer stay in high precision (ModelOpt/TensorRT exclude the same).
SD3_EXCLUDE = (r"^(x_embedder|t_embedder|y_embedder|context_embedder|final_layer|pos_embed)\b",)
# The layers that run weight-only by default (one token per sample): INT8 rows are an option for them
ADALN_LAYERS = r"adaLN_modulation"
INT8_REASON = "int8 weights, per-channel scales (weight-only: BF16 activations)"
# The MLP's two layers: INT8 weights there run W8A8 (INT8 activations too) in the static runtime
MLP_LAYERS = r"\.mlp\.fc[12]$"
INT8_MLP_REASON = "int8 weights, per-channel scales (W8A8 INT8 matmul in the static runtime)"


@dataclasses.dataclass
class LayerDecision:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    fp8: bool
    reason: str


@dataclasses.dataclass
class QuantPolicy:
    include: tuple[str, ...] = SD3_INCLUDE
    exclude: tuple[str, ...] = SD3_EXCLUDE
    granularity: str = "per_tensor"
    multiple_of: int = 16
    decisions: list[LayerDecision] = dataclasses.field(default_factory=list)
    # adaLN modulation weights as INT8 with per-row scales (sd35fp8.core.quant.INT8_ROWS) instead of E4M3
    adaln_int8: bool = False
    # the MLP's fc1/fc2 weights as INT8 per row too (the static runtime then runs them W8A8)
    mlp_int8: bool = False

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown weight granularity {self.granularity!r}; use one of {GRANULARITIES}")
        self._inc = [re.compile(p) for p in self.include]
        self._exc = [re.compile(p) for p in self.exclude]
        self._adaln = re.compile(ADALN_LAYERS)
        self._mlp = re.compile(MLP_LAYERS)

    def granularity_for(self, name: str) -> str:
        """The weight format of one selected layer: ``granularity``, or INT8 rows for adaLN (``adaln_int8``) and
        MLP (``mlp_int8``) layers."""
        name = name.rstrip(".")
        if (self.adaln_int8 and self._adaln.search(name)) or (self.mlp_int8 and self._mlp.search(name)):
            return INT8_ROWS
        return self.granularity

    def decide(self, name: str, out_features: int, in_features: int, record: bool = True) -> bool:
        name = name.rstrip(".")
        if any(p.search(name) for p in self._exc):
            fp8, why = False, "excluded (embedder / final layer)"
        elif not any(p.search(name) for p in self._inc):
            fp8, why = False, "not in the FP8 layer set"
        elif in_features % self.multiple_of or out_features % self.multiple_of:
            fp8, why = False, f"dims {out_features}x{in_features} not divisible by {self.multiple_of}"
        elif self.granularity_for(name) != self.granularity:
            fp8, why = True, INT8_MLP_REASON if self._mlp.search(name) else INT8_REASON
        else:
            fp8, why = True, f"fp8 e4m3, {self.granularity} weight scale"
        if record:
            self.decisions = [d for d in self.decisions if d.name != name]
            self.decisions.append(LayerDecision(name, (out_features, in_features), fp8, why))
        return fp8

    def to_dict(self) -> dict:
        return {
            "include": list(self.include), "exclude": list(self.exclude),
            "granularity": self.granularity, "multiple_of": self.multiple_of, "adaln_int8": self.adaln_int8,
            "mlp_int8": self.mlp_int8,
            "layers": [dataclasses.asdict(d) for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantPolicy":
        """Inverse of :meth:`to_dict`, decisions included."""
        p = cls(tuple(d["include"]), tuple(d["exclude"]), d["granularity"], d["multiple_of"],
                adaln_int8=bool(d.get("adaln_int8", False)), mlp_int8=bool(d.get("mlp_int8", False)))
        p.decisions = [LayerDecision(x["name"], tuple(x["shape"]), x["fp8"], x["reason"]) for x in d.get("layers", [])]
        return p

    def summary(self) -> str:
        fp8 = [d for d in self.decisions if d.fp8]
        kept = [d for d in self.decisions if not d.fp8]
        int8 = sum(1 for d in fp8 if d.reason == INT8_REASON)
        int8_mlp = sum(1 for d in fp8 if d.reason == INT8_MLP_REASON)
        lines = [f"FP8 layers: {len(fp8)} ({self.granularity} weight scales"
                 + (f"; {int8} adaLN layers with INT8 per-channel weights" if int8 else "")
                 + (f"; {int8_mlp} MLP layers with INT8 per-channel weights (W8A8)" if int8_mlp else "")
                 + f"); kept high precision: {len(kept)}"]
        for d in kept:
            lines.append(f"  kept {d.name} {d.shape[0]}x{d.shape[1]}: {d.reason}")
        return "\n".join(lines)
