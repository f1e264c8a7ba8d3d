"""Names of the calibration methods and weight-rounding steps a checkpoint may record.

The one list of names. It lives in the core package (and imports nothing) because a
checkpoint reader validates ``quantization_config.method`` / ``.rounding`` without the
calibrator installed. ``w4a8_dint.calibrate.methods`` loads one plug-in module per name
(``calibrate/methods/<name>.py``), so adding a method is its module plus its name here.
"""

METHODS: tuple[str, ...] = ("rtn", "smoothquant", "awq", "aqas", "fptq")
ROUNDINGS: tuple[str, ...] = ("rtn", "gptq")
