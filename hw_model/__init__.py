"""w4a8_dint.hw_model"""
