"""w4a8_dint.kernels"""
