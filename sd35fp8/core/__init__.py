"""The bottom layer: FP8 formats and clamped casts, weight quantization, calibration observers, the layer
policy and the ``fp8_autocast`` recipe. Imports nothing else of this package."""
