"""The analytic (Horowitz 45 nm, bit-product) model shown beside the synthesized numbers."""

import pytest

from w4a8_dint.hw_model import analytic as A
from w4a8_dint.hw_model.units import spec_from_key


def test_horowitz_anchor_points_and_scaling():
    assert A.int_add_pj(8) == pytest.approx(0.03) and A.int_add_pj(32) == pytest.approx(0.1)
    assert A.int_mult_pj(8, 8) == pytest.approx(0.2)
    assert A.int_mult_pj(32, 32) == pytest.approx(3.2)  # Horowitz measured 3.1: the b_a*b_w rule holds
    assert A.int_mult_pj(8, 4) == pytest.approx(0.1)


def test_unit_energies_and_areas():
    assert A.energy_pj(spec_from_key("int8/mac")) == pytest.approx(0.2 + A.int_add_pj(28))
    assert A.energy_pj(spec_from_key("int8/mul")) == pytest.approx(0.2)
    # the dINT4 shift datapath multiplies a 3-bit magnitude; the two's-complement one a 5-bit half value
    assert A.energy_pj(spec_from_key("dint4-a/shift/mul")) == pytest.approx(0.2 * 3 / 8)
    assert A.energy_pj(spec_from_key("dint4-a/twos/mul")) == pytest.approx(0.2 * 5 / 8)
    assert A.energy_pj(spec_from_key("fp16/mac")) == pytest.approx(1.1 + 0.9)
    assert A.area_fa(spec_from_key("int8/mul")) == 64
    assert A.area_fa(spec_from_key("int8/mac")) == pytest.approx(64 + 28 * (1 + 16 / 28))
    assert A.area_fa(spec_from_key("fp16/mac")) is None
