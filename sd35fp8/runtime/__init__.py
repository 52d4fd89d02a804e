"""The runtimes over a quantized model: ``static`` (calibrated static scales, the fused MLP and SD3 joint-block
forwards it installs: ``mlp``, ``joint``), ``graphs`` (whole-forward CUDA graphs) and ``te`` (TransformerEngine, an
optional backend that installs its own layer forward). They sit above the FP8 linear and model layer."""
