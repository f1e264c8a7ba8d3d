"""MAC units as Amaranth RTL, with their weight decoders generated from ``w4a8_dint.formats``.

Every unit has the same ports, so simulation, synthesis and the gate-level
power model treat them alike:

* ``w``     weight operand, raw bits: a 4-bit code, an int8, or an fp16 bit pattern;
* ``a``     activation operand: int8 (two's complement), or fp16 bits for the FP unit;
* ``first`` (MAC only) start a new dot product: ``acc <= product`` instead of ``acc + product``;
* ``y``     MAC: the accumulator register; multiplier-only: the combinational product.

Scales stay out of the datapath on purpose: per-channel / per-group scales are
applied once per dot product in the epilogue (see ``reference.w4a8_epilogue``),
so the unit that runs K times per output is only ``code x int8 + acc``.

Table-driven units compute in *half units* (the int8 expansion, ``2 * value``),
exactly what ``formats.expand_to_int8`` defines; the extra factor 2 is one more
accumulator LSB that the epilogue folds into ``scale / 2``. Three decoder styles
exist because the paper only says special codes are handled "through simple
shift operations", and the cheapest form is a synthesis question, not a guess:

* ``twos``    code -> two's-complement half value ``h`` (5 bits for every table here); ``h x a`` on a
  signed 5x8 multiplier;
* ``signmag`` code -> (sign, 4-bit ``|h|``); unsigned 4x8 multiplier, the sign folded into the
  accumulator as add/subtract (``acc + (q ^ s) + s``);
* ``shift``   code -> (sign, half, 3-bit integer magnitude); ``half ? a : (m x a) << 1`` -- the
  denormal ``+-1/2`` is the activation itself in half units (the paper's "shift") -- on a 3x8
  multiplier, sign folded into the accumulator. Only for tables of integers plus ``+-1/2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from amaranth.hdl import Cat, Const, Elaboratable, Module, Mux, Signal, signed, unsigned

from w4a8_dint.formats import CodeTable, bits_needed_for_expansion, get_format

ACT_BITS = 8
DEFAULT_K = 4096  # dot-product length the accumulators are sized for (LLaMA-7B hidden size)
FP16_BITS = 16
FP32_BITS = 32
STYLES = ("native", "twos", "signmag", "shift", "fp")


class UnitError(ValueError):
    """A unit that cannot be built as asked (style does not fit the table, bad K)."""


# -- widths ---------------------------------------------------------------------------

def signed_bits(lo: int, hi: int) -> int:
    """Fewest two's-complement bits holding every integer in ``[lo, hi]``."""
    need = max(hi, -lo - 1, 0)
    return need.bit_length() + 1


def accumulator_bits(max_abs_product: int, k: int) -> int:
    """Width that never wraps for ``k`` products of magnitude ``<= max_abs_product``."""
    if k < 1:
        raise UnitError(f"dot-product length must be >= 1, got {k}")
    return signed_bits(-k * max_abs_product, k * max_abs_product)


# -- decoders generated from a code table -----------------------------------------------

@dataclass(frozen=True)
class ShiftCode:
    """One code for the ``shift`` style: ``value = (-1)**negative * (1/2 if half else magnitude)``."""

    negative: bool
    half: bool
    magnitude: int


def twos_decode(table: CodeTable) -> tuple[int, ...]:
    """Code -> signed half value, for every one of the 16 codes (unused codes decode as the table says)."""
    return tuple(table.half_values)


def signmag_decode(table: CodeTable) -> tuple[tuple[bool, int], ...]:
    """Code -> ``(negative, |half value|)``; ``|h|`` must fit 4 unsigned bits."""
    out = tuple((h < 0, abs(h)) for h in table.half_values)
    if max(m for _, m in out) > 15:
        raise UnitError(f"{table.name}: |half value| > 15 does not fit the 4-bit sign-magnitude decoder")
    return out


def shift_decode(table: CodeTable) -> tuple[ShiftCode, ...]:
    """Code -> (sign, half flag, 3-bit integer magnitude); refuses tables with other fractions."""
    out = []
    for c, h in enumerate(table.half_values):
        if abs(h) == 1:
            out.append(ShiftCode(h < 0, True, 0))
        elif h % 2 == 0 and abs(h) // 2 <= 7:
            out.append(ShiftCode(h < 0, False, abs(h) // 2))
        else:
            raise UnitError(
                f"{table.name}: code {c} has value {h / 2}, not an integer in [-7, 7] or +-1/2; "
                "the shift style needs integers plus the +-1/2 denormal (use twos or signmag)"
            )
    return tuple(out)


# -- unit specification --------------------------------------------------------------------

@dataclass(frozen=True)
class UnitSpec:
    """What to build: weight kind x decoder style, MAC (with accumulator) or multiplier only."""

    weight: str  # "int8", "int4" (native two's complement), "fp16", or a formats table name
    style: str
    accumulate: bool = True
    k: int = DEFAULT_K

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise UnitError(f"unknown style {self.style!r}; expected one of {STYLES}")
        if self.weight == "int8" and self.style != "native":
            raise UnitError("int8 units are native two's-complement multipliers (style 'native')")
        if self.style == "native" and self.weight not in ("int8", "int4"):
            raise UnitError(f"style 'native' is for int8/int4 two's complement, not {self.weight!r}")
        if (self.weight == "fp16") != (self.style == "fp"):
            raise UnitError("fp16 goes with style 'fp' and only with it")
        if self.style in ("twos", "signmag", "shift"):
            get_format(self.weight)
            self.decoder  # noqa: B018 -- validates that the style fits the table
        if self.k < 1:
            raise UnitError(f"k must be >= 1, got {self.k}")

    # names ----------------------------------------------------------------------
    @property
    def design(self) -> str:
        """Weight x style, without the MAC/multiplier suffix (the row in the report)."""
        return self.weight if self.style in ("native", "fp") else f"{self.weight}/{self.style}"

    @property
    def key(self) -> str:
        return f"{self.design}/{'mac' if self.accumulate else 'mul'}"

    @property
    def label(self) -> str:
        if self.style in ("native", "fp"):
            base = {"int8": "INT8 x INT8", "int4": "INT4 x INT8", "fp16": "FP16 x FP16 (+FP32)"}[self.weight]
        else:
            name = self.weight.replace("dint4", "dINT4").replace("fp4", "FP4").replace("int4", "INT4")
            style = "sign-mag." if self.weight == "int4" else self.style  # no +-1/2 codes: nothing to shift
            base = f"{name} x INT8 ({style})"
        return base + ("" if self.accumulate else " mult.")

    # arithmetic -------------------------------------------------------------------
    @property
    def table(self) -> CodeTable | None:
        return get_format(self.weight) if self.style in ("twos", "signmag", "shift") else None

    @cached_property
    def decoder(self):
        t = self.table
        return {"twos": twos_decode, "signmag": signmag_decode, "shift": shift_decode}[self.style](t)

    @property
    def weight_bits(self) -> int:
        return {"int8": 8, "fp16": FP16_BITS}.get(self.weight, 4)

    @property
    def act_bits(self) -> int:
        return FP16_BITS if self.style == "fp" else ACT_BITS

    @property
    def product_unit(self) -> str:
        """What one LSB of ``y`` is worth: the integer product, or half units (int8 expansion)."""
        return {"native": "integer", "fp": "fp32"}.get(self.style, "half")

    @property
    def max_abs_product(self) -> int:
        a = 1 << (ACT_BITS - 1)  # |-128|: the hardware takes the full int8 range
        if self.weight == "int8":
            return 128 * a
        if self.style == "native":  # int4 nibble, -8 included
            return 8 * a
        if self.style == "fp":
            raise UnitError("fp16 has no integer product range")
        return max(abs(h) for h in self.table.half_values) * a

    @property
    def product_bits(self) -> int:
        if self.style == "fp":
            return FP32_BITS
        m = self.max_abs_product
        return signed_bits(-m, m)

    @property
    def out_bits(self) -> int:
        if self.style == "fp":
            return FP32_BITS
        return accumulator_bits(self.max_abs_product, self.k) if self.accumulate else self.product_bits

    def build(self) -> "MacUnit":
        return MacUnit(self)


# -- RTL ------------------------------------------------------------------------------------

class MacUnit(Elaboratable):
    """One MAC (or multiplier-only) unit as described by a :class:`UnitSpec`."""

    def __init__(self, spec: UnitSpec):
        self.spec = spec
        self.w = Signal(unsigned(spec.weight_bits), name="w")
        if spec.style == "fp":
            self.a = Signal(unsigned(FP16_BITS), name="a")
            self.y = Signal(unsigned(FP32_BITS), name="y", reset_less=True)
        else:
            self.a = Signal(signed(ACT_BITS), name="a")
            self.y = Signal(signed(spec.out_bits), name="y", reset_less=True)
        self.first = Signal(name="first")

    @property
    def ports(self) -> list[Signal]:
        return [self.w, self.a, self.first, self.y] if self.spec.accumulate else [self.w, self.a, self.y]

    def elaborate(self, platform) -> Module:
        m = Module()
        s = self.spec
        if s.style == "fp":
            self._fp16_fma(m)
            return m
        if s.style in ("native", "twos"):
            # Signed product; the accumulator adds it.
            product = Signal(signed(s.product_bits), name="product")
            if s.style == "native":
                m.d.comb += product.eq(self.w.as_signed() * self.a)
            else:
                h = Signal(signed(bits_needed_for_expansion(s.table)), name="h")
                with m.Switch(self.w):
                    for code, v in enumerate(s.decoder):
                        with m.Case(code):
                            m.d.comb += h.eq(v)
                m.d.comb += product.eq(h * self.a)
            if s.accumulate:
                base = Mux(self.first, 0, self.y)
                m.d.sync += self.y.eq(base + product)
            else:
                m.d.comb += self.y.eq(product)
            return m
        # signmag / shift: magnitude product q and a sign; the sign is a conditional negate that a
        # MAC folds into its adder as subtract (one's complement + carry-in), never a separate negator.
        negative = Signal(name="negative")
        q = Signal(signed(s.product_bits), name="q")
        if s.style == "signmag":
            mag = Signal(unsigned(4), name="mag")
            with m.Switch(self.w):
                for code, (neg, mg) in enumerate(s.decoder):
                    with m.Case(code):
                        m.d.comb += [negative.eq(neg), mag.eq(mg)]
            m.d.comb += q.eq(mag * self.a)
        else:
            mag = Signal(unsigned(3), name="mag")
            half = Signal(name="half")
            with m.Switch(self.w):
                for code, sc in enumerate(s.decoder):
                    with m.Case(code):
                        m.d.comb += [negative.eq(sc.negative), half.eq(sc.half), mag.eq(sc.magnitude)]
            # +-1/2 * a in half units is +-a: the activation passes through; integers are (m*a) << 1.
            m.d.comb += q.eq(Mux(half, self.a, (mag * self.a) << 1))
        flip = Signal(signed(s.out_bits), name="flip")
        m.d.comb += flip.eq(q ^ negative.replicate(len(q)).as_signed())
        if s.accumulate:
            base = Mux(self.first, 0, self.y)
            m.d.sync += self.y.eq(base + flip + negative)
        else:
            m.d.comb += self.y.eq(flip + negative)
        return m

    # FP16 x FP16 -> FP32 accumulate ---------------------------------------------------------
    def _fp16_fma(self, m: Module) -> None:
        """``acc = fl32(acc + a*w)``. The fp16 product is exact in fp32 (11x11-bit significands,
        exponents within fp32 range), so this equals a fused multiply-add with an fp32 addend.

        Finite inputs only (no Inf/NaN logic); fp16 subnormals are handled. Products are never
        below 2**-48, so sums never reach fp32 subnormals and the adder needs no subnormal path.
        """
        prod = Signal(unsigned(FP32_BITS), name="prod")
        _fp16_mul_to_fp32(m, self.a, self.w, prod)
        if not self.spec.accumulate:
            m.d.comb += self.y.eq(prod)
            return
        acc_plus = Signal(unsigned(FP32_BITS), name="acc_plus")
        _fp32_add(m, self.y, prod, acc_plus)
        m.d.sync += self.y.eq(Mux(self.first, prod, acc_plus))


def _leading_zeros(m: Module, x, name: str) -> Signal:
    """Leading zeros of ``x`` (= len(x) when x == 0) as a priority encoder."""
    n = len(x)
    lz = Signal(range(n + 1), name=name)
    m.d.comb += lz.eq(n)
    for i in range(n):  # later (higher) bits win
        with m.If(x[i]):
            m.d.comb += lz.eq(n - 1 - i)
    return lz


def _fp16_mul_to_fp32(m: Module, a: Signal, b: Signal, out: Signal) -> None:
    def unpack(x, tag):
        exp = x[10:15]
        sub = exp == 0
        sig = Signal(11, name=f"sig_{tag}")
        eff = Signal(5, name=f"exp_{tag}")
        m.d.comb += [sig.eq(Cat(x[0:10], ~sub)), eff.eq(Mux(sub, 1, exp))]
        return x[15], eff, sig

    sa, ea, ma = unpack(a, "a")
    sb, eb, mb = unpack(b, "b")
    mp = Signal(22, name="mp")
    m.d.comb += mp.eq(ma * mb)  # value = mp * 2**(ea + eb - 30 - 20)
    lz = _leading_zeros(m, mp, "lz_mul")
    norm = Signal(24, name="norm")
    m.d.comb += norm.eq((mp << (lz + 2))[0:24])  # leading one at bit 23
    exp32 = Signal(8, name="exp32")
    m.d.comb += exp32.eq(ea + eb + 98 - lz)  # fp32 biased exponent (always 79..158 when mp != 0)
    sign = sa ^ sb
    m.d.comb += out.eq(Mux(mp == 0, Cat(Const(0, 31), sign), Cat(norm[0:23], exp32, sign)))


def _fp32_add(m: Module, x: Signal, p: Signal, out: Signal) -> None:
    """Round-to-nearest-even fp32 addition of two normal-or-zero operands (3 guard bits + sticky)."""
    swap = p[0:31] > x[0:31]  # magnitude order of non-negative floats is their bit order
    big = Signal(32, name="big")
    small = Signal(32, name="small")
    m.d.comb += [big.eq(Mux(swap, p, x)), small.eq(Mux(swap, x, p))]
    eb, es = big[23:31], small[23:31]
    mb = Cat(big[0:23], eb != 0)
    ms = Cat(small[0:23], es != 0)
    d = Signal(8, name="d")
    m.d.comb += d.eq(eb - es)
    # Align: B' = mb << 3, S' = floor(ms * 2**(3 - d)) with everything shifted out OR-ed into bit 0.
    shifted = Signal(51, name="shifted")
    m.d.comb += shifted.eq(Cat(Const(0, 27), ms) >> d[0:5])
    far = d > 26
    aligned = Signal(27, name="aligned")
    m.d.comb += aligned.eq(Mux(far, Cat(ms != 0, Const(0, 26)), Cat(shifted[24] | (shifted[0:24] != 0), shifted[25:51])))
    eff_sub = big[31] ^ small[31]
    # One adder for both: B' + ~S' + 1 = B' - S' (>= 0 since |B| >= |S|); a subtract's carry-out is dropped.
    total = Signal(28, name="total")
    b3 = Cat(Const(0, 3), mb)
    m.d.comb += total.eq(b3 + (aligned ^ eff_sub.replicate(27)) + eff_sub)
    raw = Signal(28, name="raw")
    m.d.comb += raw.eq(Mux(eff_sub, total[0:27], total))
    # Normalize: a carry shifts right once (keeping sticky), otherwise shift left by the leading zeros.
    lz = _leading_zeros(m, raw[0:27], "lz_add")
    v = Signal(27, name="v")
    e = Signal(signed(10), name="e")
    with m.If(raw[27]):
        m.d.comb += [v.eq(Cat(raw[0] | raw[1], raw[2:28])), e.eq(eb + 1)]
    with m.Else():
        m.d.comb += [v.eq((raw[0:27] << lz)[0:27]), e.eq(eb - lz)]
    # Round to nearest, ties to even.
    lsb, guard, rest = v[3], v[2], v[1] | v[0]
    rounded = Signal(25, name="rounded")
    m.d.comb += rounded.eq(v[3:27] + (guard & (rest | lsb)))
    frac = Signal(23, name="frac")
    e_out = Signal(8, name="e_out")
    with m.If(rounded[24]):
        m.d.comb += [frac.eq(rounded[1:24]), e_out.eq(e + 1)]
    with m.Else():
        m.d.comb += [frac.eq(rounded[0:23]), e_out.eq(e)]
    zero = raw == 0
    # Exact cancellation gives +0; -0 only from (-0) + (-0).
    m.d.comb += out.eq(Mux(zero, Cat(Const(0, 31), x[31] & p[31]), Cat(frac, e_out, big[31])))


# -- the catalogue the report synthesizes ------------------------------------------------------

# (weight, style): every design is built twice, as a MAC and as a multiplier only.
DESIGNS: tuple[tuple[str, str], ...] = (
    ("int8", "native"),
    ("int4", "native"),
    ("int4", "shift"),  # int4 table through the same sign-magnitude datapath (no +-1/2 codes)
    ("dint4-a", "shift"),
    ("dint4-a", "signmag"),
    ("dint4-a", "twos"),
    ("dint4-b", "shift"),
    ("dint4-c", "shift"),
    ("fp4", "signmag"),
    ("fp16", "fp"),
)
BASELINE = "int8"  # ratios are "INT8 x INT8 cost / unit cost" (the paper's direction: bigger = saves more)
FP_REFERENCE = "fp16"


def all_specs(k: int = DEFAULT_K) -> list[UnitSpec]:
    return [UnitSpec(w, s, acc, k) for w, s in DESIGNS for acc in (True, False)]


def spec_from_key(key: str, k: int = DEFAULT_K) -> UnitSpec:
    """Inverse of :attr:`UnitSpec.key` (``int8/mac``, ``dint4-a/shift/mul``)."""
    parts = key.split("/")
    if len(parts) not in (2, 3) or parts[-1] not in ("mac", "mul"):
        raise UnitError(f"bad unit key {key!r}; expected WEIGHT[/STYLE]/(mac|mul)")
    weight = parts[0]
    style = parts[1] if len(parts) == 3 else ("fp" if weight == "fp16" else "native")
    return UnitSpec(weight, style, parts[-1] == "mac", k)

