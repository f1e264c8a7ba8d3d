"""w4a8-dint: W4A8 post-training quantization with dINT4 weights and INT8 activations.

Subpackages (each a top-level folder of the repository, installed under this namespace):
``calibrate`` (AQAS, SLAC, FPTQ, baselines), ``kernels`` (Triton + CPU W4A8 GEMM),
``hf_integration`` (transformers quantizer), ``vllm_w4a8`` (vLLM quantization method),
``hw_model`` (MAC-unit RTL cost model). The format itself lives in :mod:`w4a8_dint.formats`.

Importing this package is cheap (no torch import).
"""

__version__ = "0.1.0"
