"""vLLM entry point (``vllm.general_plugins`` -> ``w4a8_dint.vllm_w4a8.plugin:register``).

vLLM calls :func:`register` in every process it starts (front end, engine core,
workers). Importing :mod:`w4a8_dint.vllm_w4a8.method` registers the ``w4a8-dint``
quantization config and its linear method; kernels that exist register
themselves in front of the generic ones in ``kernels.linear.KERNELS``.
Calling it twice is harmless (module imports are cached; registration checks).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

logger = logging.getLogger("vllm.w4a8_dint")  # vLLM configures the "vllm" logger tree

# Optional kernel modules: imported when present so their kernels join the registry.
_OPTIONAL_KERNEL_MODULES = ("w4a8_dint.kernels.triton_w4a8",)


def register() -> None:
    from w4a8_dint.vllm_w4a8 import cpu_kernel, method  # noqa: F401 - registration happens on import

    cpu_kernel.register()
    for name in _OPTIONAL_KERNEL_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                continue
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a broken optional kernel must not take vLLM down
            logger.warning("w4a8-dint: optional kernel module %s failed to import: %s", name, e)
