"""w4a8_dint.hf_integration"""
