"""w4a8_dint.vllm_w4a8"""
