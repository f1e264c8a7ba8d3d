"""vLLM entry point (``vllm.general_plugins`` -> ``w4a8_dint.vllm_w4a8.plugin:register``).

vLLM calls :func:`register` in every process it starts (front end, engine core,
workers). Importing :mod:`w4a8_dint.vllm_w4a8.method` registers the ``w4a8-dint``
quantization config and its linear method. The kernel list (``kernels.linear.KERNELS``)
is static: vLLM-CPU's oneDNN int8 kernel is in it and runs wherever vLLM is loaded;
the Triton kernel imports Triton only when a layer on a CUDA device asks for it, so
CPU processes never pay for that import.
Calling it twice is harmless (module imports are cached).
"""

from __future__ import annotations


def register() -> None:
    from w4a8_dint.vllm_w4a8 import method  # noqa: F401 - registration happens on import
