"""Drive a unit's RTL in the Amaranth simulator (the behavioural check before synthesis)."""

from __future__ import annotations

import numpy as np
from amaranth.sim import Simulator

from w4a8_dint.hw_model.units import UnitSpec


def _as_port_values(spec: UnitSpec, w: np.ndarray, a: np.ndarray) -> tuple[list[int], list[int]]:
    wv = [int(x) & ((1 << spec.weight_bits) - 1) for x in np.asarray(w).ravel()]
    if spec.style == "fp":
        av = [int(x) & 0xFFFF for x in np.asarray(a).ravel()]
    else:
        av = [int(x) for x in np.asarray(a).ravel()]
        if any(not -128 <= x <= 127 for x in av):
            raise ValueError("activations must be int8 values in [-128, 127]")
    return wv, av


def simulate_products(spec: UnitSpec, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Multiplier-only unit: ``y`` for each ``(w[i], a[i])`` pair (combinational, settles per pair)."""
    if spec.accumulate:
        raise ValueError(f"{spec.key} has an accumulator; use simulate_accumulate")
    unit = spec.build()
    wv, av = _as_port_values(spec, w, a)
    out: list[int] = []

    async def bench(ctx):
        for x, y in zip(wv, av):
            ctx.set(unit.w, x)
            ctx.set(unit.a, y)
            out.append(ctx.get(unit.y))

    sim = Simulator(unit)
    sim.add_testbench(bench)
    sim.run()
    return np.array(out, dtype=np.uint32 if spec.style == "fp" else np.int64)


def simulate_accumulate(spec: UnitSpec, w: np.ndarray, a: np.ndarray, first: np.ndarray) -> np.ndarray:
    """MAC unit: the accumulator after each clock for a single stream of ``T`` cycles."""
    if not spec.accumulate:
        raise ValueError(f"{spec.key} is multiplier-only; use simulate_products")
    unit = spec.build()
    wv, av = _as_port_values(spec, w, a)
    fv = [bool(x) for x in np.asarray(first).ravel()]
    if not (len(wv) == len(av) == len(fv)):
        raise ValueError("w, a and first must have the same length")
    out: list[int] = []

    async def bench(ctx):
        for x, y, f in zip(wv, av, fv):
            ctx.set(unit.w, x)
            ctx.set(unit.a, y)
            ctx.set(unit.first, f)
            await ctx.tick()
            out.append(ctx.get(unit.y))

    sim = Simulator(unit)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return np.array(out, dtype=np.uint32 if spec.style == "fp" else np.int64)
