"""w4a8_dint.calibrate"""
