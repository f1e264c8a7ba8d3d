"""Gate-level simulation of a synthesized netlist, bit-parallel over independent lanes, with toggle counts.

Two jobs: (1) check that the netlist Yosys produced computes what the RTL does
(the numbers we report are for *that* netlist), (2) count how often every net
switches when the unit is fed real operands -- the dynamic-power proxy.

Each net holds a Python int whose bit ``l`` is the net's value in lane ``l``;
one gate evaluation is one big-int operation for all lanes at once. A lane is one
MAC unit running its own operand stream (one dot product after another).

Energy model (a switched-capacitance proxy, in "gate loads": one transistor gate
charged or discharged once):

* a net that toggles costs ``self_load + sum of the input-pin loads it drives``;
  pin loads: 2 (one NMOS + one PMOS gate) for plain gates and DFF D, 4 for XOR/XNOR
  inputs and a MUX select (they also drive an internal inverter);
* every flip-flop burns ``CLOCK_LOAD_PER_FLOP`` per cycle on its clock pin (2 edges x 8 gates)
  whether its data changes or not.

Limits, on purpose: zero-delay by default (no glitches; ``delay="unit"`` adds the
glitches of a unit-delay model), no wire capacitance beyond ``self_load``, no leakage,
no clock tree. It ranks designs by switched capacitance; it is not a power sign-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SELF_LOAD = 2
CLOCK_LOAD_PER_FLOP = 16
_PIN_LOAD_DEFAULT = 2
_PIN_LOAD: dict[tuple[str, str], int] = {
    ("$_XOR_", "A"): 4, ("$_XOR_", "B"): 4, ("$_XNOR_", "A"): 4, ("$_XNOR_", "B"): 4,
    ("$_MUX_", "S"): 4, ("$_NMUX_", "S"): 4,
}
# Gate functions on lane-packed ints; M is the all-lanes mask (for inversion).
_EXPR: dict[str, str] = {
    "$_BUF_": "{A}",
    "$_NOT_": "M ^ {A}",
    "$_AND_": "{A} & {B}",
    "$_NAND_": "M ^ ({A} & {B})",
    "$_OR_": "{A} | {B}",
    "$_NOR_": "M ^ ({A} | {B})",
    "$_XOR_": "{A} ^ {B}",
    "$_XNOR_": "M ^ {A} ^ {B}",
    "$_ANDNOT_": "{A} & (M ^ {B})",
    "$_ORNOT_": "{A} | (M ^ {B})",
    "$_MUX_": "{A} ^ (({A} ^ {B}) & {S})",
    "$_NMUX_": "M ^ ({A} ^ (({A} ^ {B}) & {S}))",
    "$_AOI3_": "M ^ (({A} & {B}) | {C})",
    "$_OAI3_": "M ^ (({A} | {B}) & {C})",
    "$_AOI4_": "M ^ (({A} & {B}) | ({C} & {D}))",
    "$_OAI4_": "M ^ (({A} | {B}) & ({C} | {D}))",
}
_DFF = "$_DFF_P_"
DELAY_MODELS = ("zero", "unit")


class NetlistError(ValueError):
    pass


@dataclass
class SimResult:
    outputs: dict[str, np.ndarray]  # port -> [T, lanes] int64 (signed ports sign-extended by caller)
    toggles: np.ndarray  # per net, summed over lanes and cycles (first cycle excluded)
    energy: float  # gate loads, summed over lanes and counted cycles
    cycles: int  # counted cycles per lane
    lanes: int

    @property
    def energy_per_mac(self) -> float:
        return self.energy / max(1, self.cycles * self.lanes)


class GateNetlist:
    """A compact netlist (see ``synth.compact_netlist``) compiled into Python step functions."""

    def __init__(self, netlist: dict):
        self.ports = {k: (d, list(b)) for k, (d, b) in netlist["ports"].items()}
        self.num_nets = int(netlist["num_nets"])
        cells = [(t, dict(c)) for t, c in netlist["cells"]]
        self.dffs = [(c["D"], c["Q"]) for t, c in cells if t == _DFF]
        gates = [(t, c) for t, c in cells if t != _DFF]
        for t, c in cells:
            if t != _DFF and t not in _EXPR:
                raise NetlistError(f"gate type {t} is not supported by the gate simulator")
        self.gates = self._topo_sort(gates)
        self.loads = self._net_loads(cells)
        self._settle = self._compile_settle()
        self._unit_step = self._compile_unit_step()

    # structure ------------------------------------------------------------------------
    def _topo_sort(self, gates):
        driver = {c["Y"]: i for i, (_, c) in enumerate(gates)}
        sources = {0, 1} | {q for _, q in self.dffs}
        for d, bits in self.ports.values():
            if d == "input":
                sources.update(bits)
        order, state = [], [0] * len(gates)  # 0 new, 1 visiting, 2 done

        def visit(i):
            stack = [(i, False)]
            while stack:
                j, done = stack.pop()
                if done:
                    state[j] = 2
                    order.append(j)
                    continue
                if state[j] == 2:
                    continue
                if state[j] == 1:
                    raise NetlistError("combinational loop in netlist")
                state[j] = 1
                stack.append((j, True))
                for pin, n in gates[j][1].items():
                    if pin != "Y" and n not in sources and state[driver[n]] != 2:
                        if n not in driver:
                            raise NetlistError(f"net {n} has no driver")
                        stack.append((driver[n], False))

        for i in range(len(gates)):
            if state[i] == 0:
                visit(i)
        return [gates[i] for i in order]

    def _net_loads(self, cells) -> np.ndarray:
        load = np.full(self.num_nets, SELF_LOAD, dtype=np.float64)
        for t, c in cells:
            for pin, n in c.items():
                if pin in ("Y", "Q", "C"):
                    continue
                load[n] += _PIN_LOAD.get((t, pin), _PIN_LOAD_DEFAULT)
        load[:2] = 0  # constants never toggle anyway
        return load

    def _compile_settle(self):
        """Zero delay: evaluate in topological order, reading fresh values (settles in one pass)."""
        lines = ["def step(v, M):"]
        for t, c in self.gates:
            expr = _EXPR[t].format(**{p: f"v[{n}]" for p, n in c.items() if p != "Y"})
            lines.append(f"    v[{c['Y']}] = {expr}")
        lines.append("    return v")
        ns: dict = {}
        exec(compile("\n".join(lines), "<netlist>", "exec"), ns)
        return ns["step"]

    def _compile_unit_step(self):
        """Unit delay: one step recomputes every gate from the previous step's values ``o`` (one gate
        delay), counts its toggles into ``tg`` and says whether anything moved."""
        lines = ["def step(o, tg, M):", "    v = o[:]", "    moved = False"]
        for t, c in self.gates:
            y = c["Y"]
            expr = _EXPR[t].format(**{p: f"o[{n}]" for p, n in c.items() if p != "Y"})
            lines += [f"    d = ({expr}) ^ o[{y}]", "    if d:",
                      f"        v[{y}] ^= d; tg[{y}] += d.bit_count(); moved = True"]
        lines.append("    return v, moved")
        ns: dict = {}
        exec(compile("\n".join(lines), "<netlist>", "exec"), ns)
        return ns["step"]

    @property
    def num_flops(self) -> int:
        return len(self.dffs)

    def port_bits(self, name: str) -> list[int]:
        if name not in self.ports:
            raise NetlistError(f"netlist has no port {name!r}; ports: {sorted(self.ports)}")
        return self.ports[name][1]

    # simulation ---------------------------------------------------------------------------
    def run(self, inputs: dict[str, np.ndarray], delay: str = "zero", record: tuple[str, ...] = ("y",)) -> SimResult:
        """Clock ``T`` cycles of ``[T, lanes]`` integer inputs (two's complement bits as given).

        Outputs of ``record`` are sampled after each clock edge (registered outputs) or after
        the combinational settle (combinational outputs). Toggles of the first cycle are not
        counted (they depend on the arbitrary power-up state).
        """
        if delay not in DELAY_MODELS:
            raise NetlistError(f"delay model must be one of {DELAY_MODELS}")
        arrays = {k: np.asarray(v, dtype=np.int64) for k, v in inputs.items()}
        shapes = {v.shape for v in arrays.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise NetlistError(f"inputs must all be [T, lanes]; got {shapes}")
        t_cycles, lanes = next(iter(shapes))
        mask = (1 << lanes) - 1
        packed = {k: self._pack_port(k, a) for k, a in arrays.items()}
        for name, (d, bits) in self.ports.items():
            if d == "input" and name not in arrays and name not in ("clk", "rst"):
                raise NetlistError(f"input port {name!r} not driven")
        v = [0] * self.num_nets
        v[1] = mask
        toggles = np.zeros(self.num_nets, dtype=np.int64)
        recorded = {k: np.zeros((t_cycles, lanes), dtype=np.int64) for k in record}
        flops_q = [q for _, q in self.dffs]
        flops_d = [d for d, _ in self.dffs]
        q_set = set(flops_q)
        registered = {k: all(b in q_set or b < 2 for b in self.port_bits(k)) for k in record}
        settled_before_edge: list[int] | None = None
        for t in range(t_cycles):
            # time 0 of cycle t: new inputs arrive, flops already hold last edge's D
            for name, per_bit in packed.items():
                for n, word in zip(self.port_bits(name), per_bit[t]):
                    v[n] = word
            count = settled_before_edge is not None  # the power-up cycle is not counted
            if delay == "zero":
                self._settle(v, mask)
                if count:
                    toggles += self._diff(v, settled_before_edge)
            else:
                if count:  # inputs and Q outputs switching at time 0
                    toggles += self._diff(v, settled_before_edge)
                tg = [0] * self.num_nets
                for _ in range(len(self.gates) + 1):  # one gate delay per step, until stable
                    v, moved = self._unit_step(v, tg, mask)
                    if not moved:
                        break
                if count:
                    toggles += np.asarray(tg, dtype=np.int64)
            settled_before_edge = list(v)
            for k in record:
                if not registered[k]:
                    recorded[k][t] = self._unpack(v, self.port_bits(k), lanes)
            for q, val in zip(flops_q, [v[d] for d in flops_d]):  # clock edge
                v[q] = val
            for k in record:
                if registered[k]:
                    recorded[k][t] = self._unpack(v, self.port_bits(k), lanes)
        counted = max(t_cycles - 1, 0)
        energy = float(toggles @ self.loads) + CLOCK_LOAD_PER_FLOP * self.num_flops * counted * lanes
        return SimResult(recorded, toggles, energy, counted, lanes)

    def _diff(self, a: list[int], b: list[int]) -> np.ndarray:
        return np.fromiter(((x ^ y).bit_count() for x, y in zip(a, b)), np.int64, self.num_nets)

    def _pack_port(self, name: str, a: np.ndarray) -> list[list[int]]:
        bits = self.port_bits(name)
        per_t = []
        for t in range(a.shape[0]):
            row = a[t]
            words = []
            for j in range(len(bits)):
                b = ((row >> j) & 1).astype(np.uint8)
                words.append(int.from_bytes(np.packbits(b, bitorder="little").tobytes(), "little"))
            per_t.append(words)
        return per_t

    @staticmethod
    def _unpack(v: list[int], bits: list[int], lanes: int) -> np.ndarray:
        nbytes = (lanes + 7) // 8
        out = np.zeros(lanes, dtype=np.int64)
        for j, n in enumerate(bits):
            b = np.unpackbits(np.frombuffer(v[n].to_bytes(nbytes, "little"), dtype=np.uint8), bitorder="little")[:lanes]
            out |= b.astype(np.int64) << j
        return out


def to_signed(x: np.ndarray, bits: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.int64)
    return np.where(x >= (1 << (bits - 1)), x - (1 << bits), x)
