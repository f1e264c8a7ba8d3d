"""The accuracy study's report: tables, verdicts, plots and the summary JSON, from the cached run records.

Nothing here computes a run: ``res`` is ``{part: [(RunSpec, record or None)]}`` as ``run.run_study``
returns it, so the report of a partly run study lists what is missing instead of failing.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .plan import (DINT_FORMATS, G64_FORMATS, G64_METHODS, MAIN_FORMATS, MAIN_METHODS, NO_LAE_BOUNDS, STATIC_LEN,
                   TOTAL_LAYERS, StudySettings, run_key)


def ppl(record: dict | None, dataset: str) -> float:
    if record is None or dataset not in record["results"]:
        return float("nan")
    return record["results"][dataset]["ppl"]


def acc(record: dict | None, task: str, metric: str = "acc") -> float:
    if record is None or task not in record["results"]:
        return float("nan")
    return record["results"][task][metric]


# -- verdicts, tables, plots ----------------------------------------------------------------------

def _find(rows: list, method: str | None, fmt: str | None, **kw) -> dict | None:
    kw.setdefault("group_size", None)
    kw.setdefault("scale_families", None)
    kw.setdefault("fptq_bounds", None)
    kw.setdefault("act_mode", "per-token")
    kw.setdefault("calib_len", None)
    kw.setdefault("seed", None)
    kw.setdefault("eval", "ppl")
    kw.setdefault("rounding", "rtn")
    kw.setdefault("rotate", "none")
    kw.setdefault("scale_scheme", "float")
    for spec, rec in rows:
        if spec.method == method and spec.format == fmt and all(getattr(spec, k) == v for k, v in kw.items()):
            return rec
    return None


def _all_rows(res: dict[str, list]) -> list:
    return [row for rows in res.values() for row in rows]


def _verdict(claim: str, wins: int, total: int, detail: list[str]) -> dict[str, Any]:
    if total == 0:
        v = "not tested (runs missing)"
    elif wins == total:
        v = f"holds here ({wins}/{total})"
    elif wins == 0:
        v = f"does not hold here (0/{total})"
    else:
        v = f"mixed: holds in {wins}/{total}"
    return {"claim": claim, "verdict": v, "detail": detail}


def slac_verdict(res: dict[str, list], study: StudySettings) -> dict[str, Any]:
    """Short eval window: does calibrating at the shortest length beat calibrating at the longest?

    One comparison per dataset; the long-window comparison is reported alongside (not counted).
    """
    rows = _all_rows(res)
    short_L, long_L = min(study.slac_lengths), max(study.slac_lengths)
    short_e, long_e = min(study.slac_eval_lengths), max(study.slac_eval_lengths)
    cs, cl = _slac_seeds(rows, short_L), _slac_seeds(rows, long_L)
    claim = "SLAC helps when the target task is short"
    if not cs or not cl:
        return _verdict(claim, 0, 0, [])
    seeds = f" (geo. mean of {len(cs)} / {len(cl)} seeds)" if len(cs) > 1 or len(cl) > 1 else ""
    wins, total, detail = 0, 0, []
    for d in study.ppl_sets:
        a, b = _mean_ppl(cs, (f"{d}@{short_e}",)), _mean_ppl(cl, (f"{d}@{short_e}",))
        total += 1
        wins += a < b
        detail.append(f"{d.upper()} eval {short_e}: calib {short_L} {a:.2f} vs calib {long_L} {b:.2f}{seeds}")
    for d in study.ppl_sets:
        a, b = _mean_ppl(cs, (f"{d}@{long_e}",)), _mean_ppl(cl, (f"{d}@{long_e}",))
        detail.append(f"(long target) {d.upper()} eval {long_e}: calib {short_L} {a:.2f} vs calib {long_L} {b:.2f}{seeds}")
    return _verdict(claim + f" (static per-tensor activations; eval window {short_e})", wins, total, detail)


def _slac_seeds(rows: list, length: int) -> list[dict]:
    """The SLAC runs at one calibration length, every seed that ran."""
    recs = [_find(rows, "aqas", "dint4-a", act_mode="per-tensor", calib_len=length, eval="slac", seed=s) for s in (None, 1, 2)]
    return [r for r in recs if r is not None]


def verdicts(res: dict[str, list], study: StudySettings | None = None) -> list[dict[str, Any]]:
    study = study or StudySettings()
    main = res.get("main", [])
    out = []
    # dINT beats INT4 and FP4 at W4A8: per method and dataset, dint4-a (default table) vs the other two
    wins, total, detail = 0, 0, []
    for m in MAIN_METHODS:
        for d in study.ppl_sets:
            x = {f: ppl(_find(main, m, f), d) for f in ("dint4-a", "int4", "fp4")}
            if all(math.isfinite(v) for v in x.values()):
                total += 1
                wins += x["dint4-a"] < min(x["int4"], x["fp4"])
                detail.append(f"{m} {d.upper()}: dint4-a {x['dint4-a']:.2f} / int4 {x['int4']:.2f} / fp4 {x['fp4']:.2f}")
    out.append(_verdict("dINT4 beats INT4 and FP4 at W4A8 (per channel, per method and dataset)", wins, total, detail))
    # the two halves separately, per channel and at g64 (where those runs exist)
    rows = _all_rows(res)
    for other in ("int4", "fp4"):
        wins, total, detail = 0, 0, []
        for group, methods in ((None, MAIN_METHODS), (64, G64_METHODS)):
            for m in methods:
                for d in study.ppl_sets:
                    a, b = ppl(_find(rows, m, "dint4-a", group_size=group), d), ppl(_find(rows, m, other, group_size=group), d)
                    if math.isfinite(a) and math.isfinite(b):
                        total += 1
                        wins += a < b
                        detail.append(f"{m} {'g64' if group else 'pc'} {d.upper()}: {a:.2f} vs {b:.2f}")
        out.append(_verdict(f"... dINT4 (dint4-a) beats {other.upper()} alone (per channel and g64)", wins, total, detail))
    # AQAS beats AWQ and SmoothQuant at W4A8
    wins, total, detail = 0, 0, []
    for f in MAIN_FORMATS:
        for d in study.ppl_sets:
            x = {m: ppl(_find(main, m, f), d) for m in ("aqas", "awq", "smoothquant")}
            if all(math.isfinite(v) for v in x.values()):
                total += 1
                wins += x["aqas"] < min(x["awq"], x["smoothquant"])
                detail.append(f"{f} {d.upper()}: aqas {x['aqas']:.2f} / awq {x['awq']:.2f} / smoothquant {x['smoothquant']:.2f}")
    out.append(_verdict("AQAS beats AWQ and SmoothQuant at W4A8 (per channel, per format and dataset)", wins, total, detail))
    wins, total, detail = 0, 0, []
    rows = _all_rows(res)
    st = {m: _find(rows, m, "dint4-a", act_mode="per-tensor", calib_len=STATIC_LEN, eval="slac")
          for m in ("aqas", "awq", "smoothquant")}
    if all(r is not None for r in st.values()):
        for e in study.slac_eval_lengths:
            for d in study.ppl_sets:
                x = {m: ppl(r, f"{d}@{e}") for m, r in st.items()}
                total += 1
                wins += x["aqas"] < min(x["awq"], x["smoothquant"])
                detail.append(f"{d.upper()} eval {e}: aqas {x['aqas']:.2f} / awq {x['awq']:.2f} / smoothquant {x['smoothquant']:.2f}")
    out.append(_verdict("... AQAS beats AWQ and SmoothQuant with static per-tensor activations (dint4-a, per channel)",
                        wins, total, detail))
    out.append(slac_verdict(res, study))
    g = res.get("g64", [])
    lae, no_lae = _find(g, "fptq", "dint4-a"), _find(g, "fptq", "dint4-a", fptq_bounds=NO_LAE_BOUNDS)
    wins, total, detail = 0, 0, []
    if lae is not None and no_lae is not None:
        for d in study.ppl_sets:
            total += 1
            wins += ppl(lae, d) < ppl(no_lae, d)
            detail.append(f"{d.upper()}: LAE+static (bounds 15/150) {ppl(lae, d):.2f} / static without LAE (150/150) "
                          f"{ppl(no_lae, d):.2f}")
    out.append(_verdict("FPTQ's LAE helps the intractable layers (15 <= max abs X < 150)", wins, total, detail))
    return out


def _mean_ppl(recs: list[dict | None], datasets: tuple[str, ...]) -> float:
    """Mean over datasets of log-ppl, back to ppl (a geometric mean: PTB and C4 differ 2x in scale)."""
    vals = [ppl(r, d) for r in recs for d in datasets]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals and all(math.isfinite(v) for v in vals) else float("nan")


def dint_ranking(res: dict[str, list], study: StudySettings | None = None) -> list[tuple[str, float]]:
    """dINT tables ranked by geometric-mean perplexity (PTB and C4) over rtn and aqas (best first)."""
    study = study or StudySettings()
    rows = _all_rows(res)
    mean = {f: _mean_ppl([_find(rows, m, f) for m in ("rtn", "aqas")], study.ppl_sets) for f in DINT_FORMATS}
    if not all(math.isfinite(v) for v in mean.values()):
        return []
    return sorted(mean.items(), key=lambda kv: kv[1])


def defaults_from_data(res: dict[str, list], study: StudySettings | None = None) -> dict[str, Any]:
    """What the numbers say the calibrate defaults should be (geometric mean of PTB and C4 ppl)."""
    study = study or StudySettings()
    main, rows = res.get("main", []), _all_rows(res)
    out: dict[str, Any] = {}
    fmt = {f: _mean_ppl([_find(main, m, f) for m in MAIN_METHODS], study.ppl_sets) for f in MAIN_FORMATS}
    if all(math.isfinite(v) for v in fmt.values()):
        out["format_family"] = sorted(fmt.items(), key=lambda kv: kv[1])
    g64 = {f: _mean_ppl([_find(rows, m, f, group_size=64) for m in ("aqas", "awq")], study.ppl_sets) for f in G64_FORMATS}
    if all(math.isfinite(v) for v in g64.values()):
        out["format_family_g64"] = sorted(g64.items(), key=lambda kv: kv[1])
    meth = {m: _mean_ppl([_find(main, m, f) for f in MAIN_FORMATS], study.ppl_sets) for m in MAIN_METHODS}
    if all(math.isfinite(v) for v in meth.values()):
        out["method"] = sorted(meth.items(), key=lambda kv: kv[1])
    ranking = dint_ranking(res, study)
    if ranking:
        out["dint_table"] = ranking
    fam = {"mean+max": _find(main, "aqas", "dint4-a"), "mean": _find(rows, "aqas", "dint4-a", scale_families=("mean",)),
           "max": _find(rows, "aqas", "dint4-a", scale_families=("max",))}
    if all(r is not None for r in fam.values()):
        out["scale_families"] = sorted(((k, _mean_ppl([r], study.ppl_sets)) for k, r in fam.items()), key=lambda kv: kv[1])
    grp = {"per channel": _find(main, "aqas", "dint4-a"), "g64": _find(rows, "aqas", "dint4-a", group_size=64)}
    if all(r is not None for r in grp.values()):
        out["group_aqas_dint4a"] = sorted(((k, _mean_ppl([r], study.ppl_sets)) for k, r in grp.items()), key=lambda kv: kv[1])
    return out


def seed_spread(res: dict[str, list], study: StudySettings | None = None) -> list[dict[str, Any]]:
    """Relative perplexity change between seed 0 and seed 1 of the same calibration."""
    study = study or StudySettings()
    rows, out = _all_rows(res), []
    for m, fam in (("aqas", None), ("awq", None), ("aqas", ("max",))):
        a, b = _find(rows, m, "dint4-a", scale_families=fam), _find(rows, m, "dint4-a", scale_families=fam, seed=1)
        if a is not None and b is not None:
            for d in study.ppl_sets:
                out.append({"run": f"{m} dint4-a" + (f" fam={'+'.join(fam)}" if fam else ""), "dataset": d,
                            "seed0": ppl(a, d), "seed1": ppl(b, d), "rel": abs(ppl(a, d) - ppl(b, d)) / ppl(a, d)})
    return out


def _cell(rec: dict | None, key: str) -> str:
    v = ppl(rec, key)
    return "—" if not math.isfinite(v) else f"{v:.2f}"


def _acc_cell(rec: dict | None, task: str, metric: str) -> str:
    v = acc(rec, task, metric)
    return "—" if not math.isfinite(v) else f"{100 * v:.1f}"


def mean_layer_error(rec: dict | None) -> float:
    errs = [] if rec is None else [e for e in rec.get("calibration", {}).get("layer_rel_error", {}).values() if e is not None]
    return sum(errs) / len(errs) if errs else float("nan")


def _err_cell(rec: dict | None) -> str:
    v = mean_layer_error(rec)
    return "—" if not math.isfinite(v) else f"{v:.4f}"


def runtime_rows(res: dict[str, list]) -> list[tuple[str, int, tuple | None, tuple | None]]:
    """(run type, count, (min, max) calibrate s, (min, max) eval s) over the cached runs (load varies a lot)."""
    groups: dict[str, list[dict]] = {}
    for spec, rec in _all_rows(res):
        if rec is None:
            continue
        if spec.method is None:
            kind = f"fp32 [{spec.eval}]"
        else:
            g = "g64" if spec.group_size == 64 or spec.method == "fptq" else "pc"
            g = "g32" if spec.group_size == 32 else g
            extra = "".join(f" {v}" for v in (spec.rounding, spec.rotate, spec.scale_scheme) if v not in ("rtn", "none", "float"))
            kind = f"{spec.method} {g}{extra}" + (f" L={spec.calib_len} static" if spec.calib_len else "") + \
                   ("" if spec.eval == "ppl" else f" [{spec.eval}]")
        groups.setdefault(kind, []).append(rec)
    out = []
    for kind, recs in groups.items():
        cs = [r["calibrate_s"] for r in recs if r.get("calibrate_s") is not None]
        es = [r["eval_s"] for r in recs if r.get("eval_s") is not None]
        out.append((kind, len(recs), (min(cs), max(cs)) if cs else None, (min(es), max(es)) if es else None))
    return out


# A block another script owns inside accuracy.md: ``<!-- name: ... -->`` ... ``<!-- /name -->``
# (benchmarks/peer_llmcompressor.py --report writes one); regenerating the study's text keeps it.
FOREIGN_BLOCK = re.compile(r"<!-- (?P<name>[\w-]+):.*?-->.*?<!-- /(?P=name) -->", re.S)


def keep_foreign_blocks(text: str, old: str) -> str:
    """``text`` with the marked blocks of ``old`` (the file it replaces) appended unchanged."""
    blocks = [m.group(0) for m in FOREIGN_BLOCK.finditer(old)]
    return text.rstrip("\n") + "".join(f"\n\n{b}" for b in blocks) + "\n" if blocks else text


# -- GPTQ / rotation recipes and two-level scales ----------------------------------------------------

# The recipes of the rounding/rotation comparison (dint4-a, per-token activations): (name, method, rounding, rotate)
RECIPES = (("RTN", "rtn", "rtn", "none"), ("GPTQ", "rtn", "gptq", "none"), ("rotation + GPTQ", "rtn", "gptq", "hadamard"),
           ("AQAS", "aqas", "rtn", "none"), ("AQAS + GPTQ", "aqas", "gptq", "none"),
           ("rotation + AQAS + GPTQ", "aqas", "gptq", "hadamard"))
GRANULARITIES = (("per channel", None), ("g64", 64))
# Accuracy targets (issue 15): % perplexity over FP32, on PTB and on C4
TARGETS = {None: 12.0, 64: 6.0}


def over_fp(rec: dict | None, fp: dict | None, dataset: str) -> float:
    """Perplexity increase over the float model, in %."""
    a, b = ppl(rec, dataset), ppl(fp, dataset)
    return 100 * (a / b - 1) if math.isfinite(a) and math.isfinite(b) else float("nan")


def _pct(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:+.1f}%"


def recipe_rows(res: dict[str, list], study: StudySettings) -> list[dict[str, Any]]:
    """One row per (recipe, granularity) with its perplexities, % over FP32 and whether it meets the target."""
    rows, fp = _all_rows(res), _find(res.get("main", []), None, None)
    out = []
    for gname, group in GRANULARITIES:
        for name, method, rounding, rotate in RECIPES:
            rec = _find(rows, method, "dint4-a", group_size=group, rounding=rounding, rotate=rotate)
            pct = {d: over_fp(rec, fp, d) for d in study.ppl_sets}
            met = all(math.isfinite(v) and v <= TARGETS[group] for v in pct.values()) if rec is not None else None
            out.append({"recipe": name, "granularity": gname, "ppl": {d: ppl(rec, d) for d in study.ppl_sets},
                        "over_fp32_pct": pct, "target_pct": TARGETS[group], "meets_target": met,
                        "geo_mean": _mean_ppl([rec], study.ppl_sets), "calibration": calib_cost(rec)})
    return out


def best_recipes(res: dict[str, list], study: StudySettings) -> dict[str, dict[str, Any]]:
    """The best measured recipe per granularity (geometric mean of PTB and C4 perplexity)."""
    best: dict[str, dict[str, Any]] = {}
    for r in recipe_rows(res, study):
        if math.isfinite(r["geo_mean"]) and (r["granularity"] not in best or r["geo_mean"] < best[r["granularity"]]["geo_mean"]):
            best[r["granularity"]] = r
    return best


def calib_cost(rec: dict | None) -> dict[str, float | None]:
    """Calibration wall s, CPU s and peak RSS MiB (the last two only for runs measured in a child process)."""
    keys = ("calibrate_s", "calibrate_cpu_s", "calibrate_peak_rss_mib", "calibrate_maxrss_incl_parent_mib")
    return {k: None if rec is None else rec.get(k) for k in keys}


def two_level_rows(res: dict[str, list], study: StudySettings) -> list[dict[str, Any]]:
    """AQAS: per channel vs float vs two-level group scales, for dint4-a and int4 at g64 and g32 (rtn rounding),
    and AQAS + GPTQ dint4-a at g64."""
    rows, fp = _all_rows(res), _find(res.get("main", []), None, None)
    cells = [(f, "rtn", gname, group, scheme) for f in ("dint4-a", "int4")
             for gname, group, scheme in (("per channel", None, "float"), ("g64", 64, "float"), ("g64", 64, "two-level"),
                                          ("g32", 32, "float"), ("g32", 32, "two-level"))]
    cells += [("dint4-a", "gptq", gname, group, scheme)
              for gname, group, scheme in (("per channel", None, "float"), ("g64", 64, "float"), ("g64", 64, "two-level"))]
    out = []
    for f, rounding, gname, group, scheme in cells:
        rec = _find(rows, "aqas", f, group_size=group, scale_scheme=scheme, rounding=rounding)
        out.append({"format": f, "rounding": rounding, "granularity": gname, "scales": scheme if group else "per channel",
                    "ppl": {d: ppl(rec, d) for d in study.ppl_sets},
                    "over_fp32_pct": {d: over_fp(rec, fp, d) for d in study.ppl_sets}, "calibration": calib_cost(rec)})
    return out


def two_level_gaps(res: dict[str, list], study: StudySettings) -> list[dict[str, Any]]:
    """Two-level vs float group scales: relative perplexity change (two-level / float - 1), per format, group,
    rounding and dataset."""
    rows, out = _all_rows(res), []
    for f, group, rounding in (("dint4-a", 64, "rtn"), ("int4", 64, "rtn"), ("dint4-a", 32, "rtn"), ("int4", 32, "rtn"),
                               ("dint4-a", 64, "gptq")):
        a = _find(rows, "aqas", f, group_size=group, rounding=rounding)
        b = _find(rows, "aqas", f, group_size=group, scale_scheme="two-level", rounding=rounding)
        for d in study.ppl_sets:
            if math.isfinite(ppl(a, d)) and math.isfinite(ppl(b, d)):
                out.append({"format": f, "group_size": group, "rounding": rounding, "dataset": d, "float": ppl(a, d),
                            "two_level": ppl(b, d), "rel": ppl(b, d) / ppl(a, d) - 1})
    return out


def g64_seed_noise(res: dict[str, list], study: StudySettings) -> list[dict[str, Any]]:
    """Seed 0 vs seed 1 of the float-scale AQAS dint4-a g64 run: the noise the two-level gap is read against."""
    rows = _all_rows(res)
    a, b = _find(rows, "aqas", "dint4-a", group_size=64), _find(rows, "aqas", "dint4-a", group_size=64, seed=1)
    return [{"dataset": d, "seed0": ppl(a, d), "seed1": ppl(b, d), "rel": abs(ppl(b, d) / ppl(a, d) - 1)}
            for d in study.ppl_sets if math.isfinite(ppl(a, d)) and math.isfinite(ppl(b, d))]


def _cost_cells(c: dict[str, float | None]) -> str:
    f = lambda v, fmt: "—" if v is None else fmt.format(v)  # noqa: E731
    rss = f(c["calibrate_peak_rss_mib"], "{:.0f}")
    if c["calibrate_peak_rss_mib"] is None and c.get("calibrate_maxrss_incl_parent_mib") is not None:
        rss = f"≤ {c['calibrate_maxrss_incl_parent_mib']:.0f}"  # an upper bound (see the section text)
    return f"{f(c['calibrate_s'], '{:.0f}')} | {f(c['calibrate_cpu_s'], '{:.0f}')} | {rss}"


def gptq_section(res: dict[str, list], study: StudySettings) -> list[str]:
    ds = study.ppl_sets
    L = ["## GPTQ rounding and Hadamard rotation (dint4-a, per-token activations)", "",
         "GPTQ = `--rounding gptq` (method rtn: no scale search); AQAS + GPTQ = AQAS's searched scales and clips, then "
         "GPTQ rounding; rotation = `--rotate hadamard` (an offline Hadamard rotation folded into a float copy first). "
         f"% = perplexity over FP32. Targets: per channel within +{TARGETS[None]:.0f}%, g64 within +{TARGETS[64]:.0f}% "
         "(PTB and C4). Calibration cost: wall s, CPU s (user + system, all threads) and peak RSS MiB of the calibration "
         "process (imports and model load included; wall time on the shared box, load average in each run's JSON; "
         "— = run from before these were measured; ≤ N = an upper bound: the first runs of this round took "
         "wait4's ru_maxrss, which on Linux includes the spawning parent's high-water mark, now the child's own VmHWM). GPTQ's Hessian comes from this study's calibration budget "
         f"({study.samples} x {study.seq_len} tokens; the recipe default is 32 x 512), which is small for a 576- and "
         "1536-wide Hessian (`benchmarks/peer_llmcompressor.py` runs ours at 32 samples).", "",
         "| recipe | granularity | " + " | ".join(f"{d.upper()} | {d.upper()} %" for d in ds)
         + " | target met | calib s | CPU s | peak RSS MiB |", "|---|---|" + "---:|" * (2 * len(ds)) + "---|---:|---:|---:|"]
    for r in recipe_rows(res, study):
        met = {None: "—", True: "yes", False: "no"}[r["meets_target"]]
        L.append(f"| {r['recipe']} | {r['granularity']} | " + " | ".join(
            f"{'—' if not math.isfinite(r['ppl'][d]) else format(r['ppl'][d], '.2f')} | {_pct(r['over_fp32_pct'][d])}"
            for d in ds) + f" | {met} | {_cost_cells(r['calibration'])} |")
    best = best_recipes(res, study)
    if best:
        L += [""]
        for gname, r in best.items():
            L.append(f"**Best measured {gname} (dint4-a): {r['recipe']}**, " + ", ".join(
                f"{d.upper()} {r['ppl'][d]:.2f} ({_pct(r['over_fp32_pct'][d])})" for d in ds)
                + f"; target +{r['target_pct']:.0f}%: " + ("met." if r["meets_target"] else "**not met**."))
    return L + [""]


def two_level_section(res: dict[str, list], study: StudySettings) -> list[str]:
    ds = study.ppl_sets
    L = ["## Two-level vs float group scales vs per channel (AQAS, per-token activations)", "",
         "Two-level = `--scale-scheme two-level`: each group's scale is a small integer multiplier times one float "
         "scale per output channel, so the CPU kernel runs one INT8 GEMM per layer instead of one per group. "
         "Per channel rows come from the main table, float g64 from the g64 part.", "",
         "| format | rounding | granularity | scales | " + " | ".join(f"{d.upper()} | {d.upper()} %" for d in ds)
         + " | calib s | CPU s | peak RSS MiB |", "|---|---|---|---|" + "---:|" * (2 * len(ds)) + "---:|---:|---:|"]
    for r in two_level_rows(res, study):
        L.append(f"| {r['format']} | {r['rounding']} | {r['granularity']} | {r['scales']} | " + " | ".join(
            f"{'—' if not math.isfinite(r['ppl'][d]) else format(r['ppl'][d], '.2f')} | {_pct(r['over_fp32_pct'][d])}"
            for d in ds) + f" | {_cost_cells(r['calibration'])} |")
    gaps, noise = two_level_gaps(res, study), g64_seed_noise(res, study)
    if gaps:
        L += ["", "Two-level vs float group scales (two-level / float - 1): " + "; ".join(
            f"{g['format']} g{g['group_size']}{' + GPTQ' if g['rounding'] == 'gptq' else ''} {g['dataset'].upper()} "
            f"{g['float']:.2f} -> {g['two_level']:.2f} "
            f"({100 * g['rel']:+.1f}%)" for g in gaps) + "."]
    if noise:
        L += ["", "Seed noise at the same setting (AQAS dint4-a float g64, calibration seed 0 vs 1): " + "; ".join(
            f"{n['dataset'].upper()} {n['seed0']:.2f} vs {n['seed1']:.2f} ({100 * n['rel']:.1f}%)" for n in noise)
            + ". A two-level vs float gap smaller than this is not a measured difference."]
    elif gaps:
        L += ["", "The float g64 seed repeat did not run: read the gaps against the per-channel seed spread above."]
    return L + [""]


def markdown(res: dict[str, list], study: StudySettings) -> str:
    main, rows = res.get("main", []), _all_rows(res)
    fp = _find(main, None, None)
    L = ["# Accuracy study (generated by `python benchmarks/accuracy.py`; do not edit by hand)", ""]
    L += [f"Model: embedded SmolLM2-135M-Instruct (fp32 from its Q4_1 GGUF), **{study.layers_text}**. "
          f"Calibration budget (CPU): {study.samples} x {study.seq_len} tokens of C4 (held-out half), search on "
          f"{study.search_tokens} tokens, alpha grid {list(study.alpha_grid)}, clip grid {list(study.clip_grid)}, seed "
          f"{study.seed} (recipe defaults: 32 samples, 1024 search tokens, 0.05-step alphas, clips 1.0..0.7). "
          f"Perplexity: first {study.ppl_tokens} tokens of PTB test and of the C4 sample, seq 512, non-overlapping "
          f"windows. W4A8 = 4-bit weights (per channel unless noted) x INT8 per-token dynamic activations (unless "
          f"noted), evaluated through the HF quantizer (the bit-exact CPU int8 path). Lower perplexity is better.", ""]
    L += [f"FP32 baseline: PTB {_cell(fp, 'ptb')}, C4 {_cell(fp, 'c4')}.", ""]
    spread = seed_spread(res, study)
    if spread:
        worst = max(s["rel"] for s in spread)
        L += ["**Noise.** Measured seed spread (calibration seed 0 vs 1, same settings): " + "; ".join(
            f"{s['run']} {s['dataset'].upper()} {s['seed0']:.2f} vs {s['seed1']:.2f} ({100 * s['rel']:.1f}%)" for s in spread)
            + f". Per-token runs: treat differences below about {100 * worst:.1f}% as ties (two seeds only, so "
            "this is a floor on the noise, not a confidence interval).", ""]
    else:
        L += ["**Noise.** Seed repeats did not run, so no noise level was measured. Treat differences of a "
              "few percent as ties.", ""]
    slac_spread = []
    for Lc in sorted(study.slac_lengths):
        recs = _slac_seeds(rows, Lc)
        if len(recs) > 1:
            for c in (f"{d}@{e}" for e in study.slac_eval_lengths for d in study.ppl_sets):
                v = [ppl(r, c) for r in recs]
                slac_spread.append((Lc, c, min(v), max(v)))
    if slac_spread:
        worst = max(hi / lo - 1 for _, _, lo, hi in slac_spread)
        L += [f"Static per-tensor activations are far noisier: over {len(_slac_seeds(rows, slac_spread[0][0]))} seeds the "
              f"SLAC runs' perplexity moves by up to {100 * worst:.0f}% (max/min - 1; "
              + "; ".join(f"L={Lc} {c.upper()} {lo:.1f}-{hi:.1f}" for Lc, c, lo, hi in slac_spread) + ").", ""]
    for d in study.ppl_sets:
        L += [f"## Main table: {d.upper()} perplexity, methods x formats (per channel, per-token activations)", "",
              "| method | " + " | ".join(MAIN_FORMATS) + " |", "|---|" + "---:|" * len(MAIN_FORMATS)]
        for m in MAIN_METHODS:
            L.append(f"| {m} | " + " | ".join(_cell(_find(main, m, f), d) for f in MAIN_FORMATS) + " |")
        L.append("| *geo. mean over methods* | " + " | ".join(
            (lambda v: "—" if not math.isfinite(v) else f"{v:.2f}")(_mean_ppl([_find(main, m, f) for m in MAIN_METHODS], (d,)))
            for f in MAIN_FORMATS) + " |")
        L.append("")
    L += ["Mean per-layer relative output error over the 30 layers (from each calibration's record, measured on "
          "its search batch, relative to the layer's float residual update; the quantity the searches fit):", "",
          "| method | " + " | ".join(MAIN_FORMATS) + " |", "|---|" + "---:|" * len(MAIN_FORMATS)]
    for m in MAIN_METHODS:
        L.append(f"| {m} | " + " | ".join(_err_cell(_find(main, m, f)) for f in MAIN_FORMATS) + " |")
    L.append("")
    g = res.get("g64", [])
    L += ["## Group-wise g64 (128 does not divide K=576), per-token activations unless FPTQ", "",
          "| run | PTB | C4 |", "|---|---:|---:|"]
    for spec, rec in g:
        L.append(f"| {spec.label} | {_cell(rec, 'ptb')} | {_cell(rec, 'c4')} |")
    L += ["", "FPTQ picks an activation policy per layer from max|X| (bounds v0/v1): static per-tensor below v0, "
          "LAE + static between, per-token above. `v=150-150` removes the LAE band (static without LAE up to 150).", ""]
    L += gptq_section(res, study)
    L += two_level_section(res, study)
    sl = res.get("slac", [])
    ev = study.slac_eval_lengths
    cols = [f"{d}@{e}" for e in ev for d in study.ppl_sets]
    L += ["## SLAC: calibration length vs target length (AQAS dint4-a per channel, **static per-tensor** activations)", "",
          f"Each calibration length sees {study.slac_tokens} C4 tokens (samples = {study.slac_tokens} / length); the search "
          f"batch is the first ceil({study.search_tokens} / length) windows. Each model is scored on the first "
          f"{study.slac_eval_tokens} tokens of PTB and C4 with windows of {' and '.join(map(str, ev))} tokens.", "",
          "| calibration length | " + " | ".join(c.upper().replace("@", " eval ") for c in cols) + " |",
          "|---|" + "---:|" * len(cols)]
    fps = _find(sl, None, None, eval="slac")
    L.append("| fp32 | " + " | ".join(_cell(fps, c) for c in cols) + " |")
    for Lc in sorted(study.slac_lengths):
        r = _find(sl, "aqas", "dint4-a", act_mode="per-tensor", calib_len=Lc, eval="slac")
        L.append(f"| {Lc} | " + " | ".join(_cell(r, c) for c in cols) + " |")
    for Lc in sorted(study.slac_lengths):
        for seed in (1, 2):
            r = _find(rows, "aqas", "dint4-a", act_mode="per-tensor", calib_len=Lc, eval="slac", seed=seed)
            if r is not None:
                L.append(f"| {Lc} (seed {seed}) | " + " | ".join(_cell(r, c) for c in cols) + " |")
    stat = [(m, _find(rows, m, "dint4-a", act_mode="per-tensor", calib_len=STATIC_LEN, eval="slac"))
            for m in ("rtn", "smoothquant", "awq", "aqas")]
    if any(r is not None for _, r in stat):
        L += ["", f"Methods with static per-tensor activations (dint4-a per channel, calibrated on "
              f"{study.slac_tokens // STATIC_LEN} x {STATIC_LEN} tokens, same windows as above):", "",
              "| method | " + " | ".join(c.upper().replace("@", " eval ") for c in cols) + " |", "|---|" + "---:|" * len(cols)]
        for m, r in stat:
            L.append(f"| {m} | " + " | ".join(_cell(r, c) for c in cols) + " |")
    rng = _find(sl, None, None, eval="range")
    if rng is not None:
        curve = rng["results"]["range_vs_length"]
        names = list(curve[0]["ranges"])
        L += ["", f"Activation range vs window length (float model, max |X| over all {TOTAL_LAYERS} layers at each linear "
              f"input, {study.range_tokens} C4 tokens per length):", "",
              "| length | " + " | ".join(names) + " | max |", "|---:|" + "---:|" * (len(names) + 1)]
        for row in curve:
            L.append(f"| {row['length']} | " + " | ".join(f"{row['ranges'][n]:.1f}" for n in names) + f" | {row['max']:.1f} |")
    L += ["", "## dINT value-table ablation (per channel, per-token activations)", "",
          "| method | " + " | ".join(f"{f} PTB / C4" for f in DINT_FORMATS) + " |", "|---|" + "---:|" * len(DINT_FORMATS)]
    for m in ("rtn", "aqas"):
        L.append(f"| {m} | " + " | ".join(f"{_cell(r, 'ptb')} / {_cell(r, 'c4')}" for r in
                                          (_find(rows, m, f) for f in DINT_FORMATS)) + " |")
    ranking = dint_ranking(res, study)
    if ranking:
        L += ["", "Geometric mean of PTB and C4 perplexity over rtn and aqas: " + ", ".join(f"{f} {v:.2f}" for f, v in ranking)
              + f". **Best table here: {ranking[0][0]}.**"]
    z = res.get("zeroshot", [])
    L += ["", f"## Zero-shot accuracy (%; first {study.zs_limit} docs per task, per channel)", "",
          f"With {study.zs_limit} docs one standard error is about {100 * math.sqrt(0.25 / study.zs_limit):.0f} points "
          "at 50% accuracy, so only large gaps mean anything.", "",
          "| model | " + " | ".join(f"{t} acc / acc_norm" for t in study.zs_tasks) + " | mean acc |",
          "|---|" + "---:|" * (len(study.zs_tasks) + 1)]
    for spec, rec in z:
        name = "fp32" if spec.method is None else f"{spec.method} {spec.format}"
        accs = [acc(rec, t) for t in study.zs_tasks]
        mean = "—" if not all(math.isfinite(a) for a in accs) else f"{100 * sum(accs) / len(accs):.1f}"
        L.append(f"| {name} | " + " | ".join(f"{_acc_cell(rec, t, 'acc')} / {_acc_cell(rec, t, 'acc_norm')}"
                                              for t in study.zs_tasks) + f" | {mean} |")
    L += ["", "## AQAS scale-family ablation (dint4-a per channel)", "", "| families | PTB | C4 |", "|---|---:|---:|"]
    for name, rec in (("mean+max (default)", _find(main, "aqas", "dint4-a")),
                      ("mean", _find(rows, "aqas", "dint4-a", scale_families=("mean",))),
                      ("max", _find(rows, "aqas", "dint4-a", scale_families=("max",))),
                      ("max (seed 1)", _find(rows, "aqas", "dint4-a", scale_families=("max",), seed=1))):
        L.append(f"| {name} | {_cell(rec, 'ptb')} | {_cell(rec, 'c4')} |")
    L += ["", "## Claims (verdicts computed from the numbers above)", "", "| claim | verdict | numbers |", "|---|---|---|"]
    for v in verdicts(res, study):
        L.append(f"| {v['claim']} | {v['verdict']} | {'; '.join(v['detail']) or '—'} |")
    dd = defaults_from_data(res, study)
    L += ["", "## What the data say about the calibrate defaults", "",
          "Ranked by the geometric mean of PTB and C4 perplexity (lower is better):", ""]
    names = {"format_family": "4-bit format, per channel (mean over the 4 methods)",
             "format_family_g64": "4-bit format, g64 (mean over aqas, awq)", "method": "method (mean over the 3 formats)",
             "dint_table": "dINT table (mean over rtn, aqas)", "scale_families": "AQAS scale families (dint4-a)",
             "group_aqas_dint4a": "AQAS dint4-a weight groups"}
    for k, label in names.items():
        if k in dd:
            L.append(f"- {label}: " + ", ".join(f"{n} {v:.2f}" for n, v in dd[k]))
    if not dd:
        L.append("- (runs missing)")
    L += ["", "## Measured runtime (shared 2-core CPU, one torch thread per run; the gptq / twolevel parts ran one at a time, the rest 2 in parallel)", "",
          "Wall seconds per run, min-max over the runs of each type. The box was shared: other engineers' vLLM "
          "tests and calibrations ran at the same time, so the same run type varied up to 2-3x.", "",
          "| run type | runs | calibrate s | eval s |", "|---|---:|---:|---:|"]
    span = lambda t: "—" if t is None else (f"{t[0]:.0f}" if round(t[0]) == round(t[1]) else f"{t[0]:.0f}-{t[1]:.0f}")  # noqa: E731
    for kind, n, c, e in runtime_rows(res):
        L.append(f"| {kind} | {n} | {span(c)} | {span(e)} |")
    missing = [f"{part}: {s.label}" for part, rs in res.items() for s, r in rs if r is None]
    L += ["", "## Not run / cut", ""]
    L += [f"- {m}" for m in missing] or ["- nothing missing from the planned grid"]
    L += ["- the recipe's full calibration budget (32 samples, 1024 search tokens, full alpha/clip grids): "
          "cut for CPU time (budget above)", ""]
    L += ["Plots: `results/accuracy_main.png`, `results/accuracy_g64.png`, `results/accuracy_dint.png`, "
          "`results/accuracy_slac.png`, `results/accuracy_range_vs_length.png`, `results/accuracy_gptq.png`, "
          "`results/accuracy_two_level.png`. Per-run JSON (settings, timings, "
          "searched alphas/families, per-layer relative error): `results/accuracy_runs/`.", ""]
    return "\n".join(L)


def _bars(ax, groups: list[str], series: dict[str, list[float]], base: float) -> None:
    width = 0.8 / max(1, len(series))
    for j, (name, vals) in enumerate(series.items()):
        ax.bar([i + j * width for i in range(len(groups))], [v - base for v in vals], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.legend(fontsize=8)


def plots(res: dict[str, list], study: StudySettings, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    main, rows = res.get("main", []), _all_rows(res)
    fp = _find(main, None, None)

    def save(fig, name):
        fig.tight_layout()
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    def base(d):  # plot the loss vs float: absolute bars hide the gaps
        v = ppl(fp, d)
        return v if math.isfinite(v) else 0.0

    fig, axes = plt.subplots(1, len(study.ppl_sets), figsize=(6 * len(study.ppl_sets), 4), squeeze=False)
    for ax, d in zip(axes[0], study.ppl_sets):
        _bars(ax, list(MAIN_METHODS), {f: [ppl(_find(main, m, f), d) for m in MAIN_METHODS] for f in MAIN_FORMATS}, base(d))
        ax.set_ylabel(f"{d.upper()} ppl increase over fp32 ({base(d):.2f})")
        ax.set_title(f"W4A8 per channel, {study.layers_text.split(' quantized')[0]}")
    save(fig, "accuracy_main.png")

    fig, axes = plt.subplots(1, len(study.ppl_sets), figsize=(6 * len(study.ppl_sets), 4), squeeze=False)
    g = res.get("g64", [])
    for ax, d in zip(axes[0], study.ppl_sets):
        fptq = [ppl(_find(g, "fptq", "dint4-a"), d), ppl(_find(g, "fptq", "dint4-a", fptq_bounds=NO_LAE_BOUNDS), d)]
        series = {f: [ppl(_find(g, m, f, group_size=64), d) for m in G64_METHODS] for f in G64_FORMATS}
        for f in G64_FORMATS:
            if f != "dint4-a":
                series[f] += [float("nan")] * 2  # FPTQ ran on dint4-a only
        series["dint4-a"] += fptq
        _bars(ax, list(G64_METHODS) + ["fptq\n(LAE)", "fptq\n(no LAE)"], series, base(d))
        ax.set_ylabel(f"{d.upper()} ppl increase over fp32 ({base(d):.2f})")
        ax.set_title("W4A8 group-wise g64")
    save(fig, "accuracy_g64.png")

    fig, axes = plt.subplots(1, len(study.ppl_sets), figsize=(6 * len(study.ppl_sets), 4), squeeze=False)
    for ax, d in zip(axes[0], study.ppl_sets):
        _bars(ax, ["rtn", "aqas"], {f: [ppl(_find(rows, m, f), d) for m in ("rtn", "aqas")] for f in DINT_FORMATS}, base(d))
        ax.set_ylabel(f"{d.upper()} ppl increase over fp32 ({base(d):.2f})")
        ax.set_yscale("log")  # dint4-b with RTN is ~100x worse than the others
        ax.set_title("dINT4 value tables (per channel)")
    save(fig, "accuracy_dint.png")

    sl = res.get("slac", [])
    fps = _find(sl, None, None, eval="slac")
    fig, axes = plt.subplots(1, len(study.ppl_sets), figsize=(6 * len(study.ppl_sets), 4), squeeze=False)
    lengths = sorted(study.slac_lengths)
    for ax, d in zip(axes[0], study.ppl_sets):
        for e in study.slac_eval_lengths:
            key = f"{d}@{e}"
            f0 = ppl(fps, key)
            vals = [ppl(_find(sl, "aqas", "dint4-a", act_mode="per-tensor", calib_len=c, eval="slac"), key) for c in lengths]
            # relative to the float model at the same window: the two eval lengths have different ppl scales
            line, = ax.plot(lengths, [v / f0 if math.isfinite(f0) else v for v in vals], "o-", label=f"eval window {e}")
            rep = [(c, ppl(_find(rows, "aqas", "dint4-a", act_mode="per-tensor", calib_len=c, eval="slac", seed=sd), key))
                   for c in lengths for sd in (1, 2)]
            rep = [(c, v / f0 if math.isfinite(f0) else v) for c, v in rep if math.isfinite(v)]
            if rep:  # the seed repeats: how far one calibration length moves by chance
                ax.plot(*zip(*rep), "x", color=line.get_color(), markersize=9, label=f"eval window {e}, other seeds")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration window length (tokens)")
        ax.set_ylabel(f"{d.upper()} ppl / fp32 ppl at the same window")
        ax.set_title("SLAC: AQAS dint4-a, static per-tensor acts")
        ax.legend(fontsize=8)
    save(fig, "accuracy_slac.png")

    rng = _find(sl, None, None, eval="range")
    if rng is not None:
        curve = rng["results"]["range_vs_length"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in curve[0]["ranges"]:
            ax.plot([r["length"] for r in curve], [r["ranges"][n] for r in curve], "o-", label=n)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("window length (tokens), same token budget per length")
        ax.set_ylabel(f"max |X| over all {TOTAL_LAYERS} layers")
        ax.set_title("Activation range vs sequence length (float model, C4)")
        ax.legend(fontsize=8)
        save(fig, "accuracy_range_vs_length.png")

    recipes = recipe_rows(res, study)
    if any(math.isfinite(r["geo_mean"]) for r in recipes if r["recipe"] not in ("RTN", "AQAS")):
        fig, axes = plt.subplots(1, len(study.ppl_sets), figsize=(7 * len(study.ppl_sets), 4.5), squeeze=False)
        names = [n for n, *_ in RECIPES]
        for ax, d in zip(axes[0], study.ppl_sets):
            for j, (gname, group) in enumerate(GRANULARITIES):
                vals = [next(r["over_fp32_pct"][d] for r in recipes if r["recipe"] == n and r["granularity"] == gname)
                        for n in names]
                bars = ax.bar([i + 0.4 * j for i in range(len(names))], vals, 0.4, label=gname)
                ax.axhline(TARGETS[group], color=bars.patches[0].get_facecolor(), ls="--", lw=1,
                           label=f"{gname} target +{TARGETS[group]:.0f}%")
            ax.set_xticks([i + 0.2 for i in range(len(names))], [n.replace(" + ", "\n+ ") for n in names], fontsize=8)
            ax.set_ylabel(f"{d.upper()} ppl over fp32 (%)")
            ax.set_title("dint4-a W4A8: rounding and rotation")
            ax.legend(fontsize=8)
        save(fig, "accuracy_gptq.png")

    two = two_level_rows(res, study)
    if any(r["scales"] == "two-level" and math.isfinite(r["ppl"][study.ppl_sets[0]]) for r in two):
        fig, axes = plt.subplots(1, len(study.ppl_sets), figsize=(6 * len(study.ppl_sets), 4), squeeze=False)
        cells = [(f, g) for f in ("dint4-a", "int4") for g in ("g64", "g32")]
        for ax, d in zip(axes[0], study.ppl_sets):
            for j, scheme in enumerate(("float", "two-level")):
                vals = [next((r["over_fp32_pct"][d] for r in two
                              if (r["format"], r["granularity"], r["scales"], r["rounding"]) == (f, g, scheme, "rtn")),
                             float("nan")) for f, g in cells]
                ax.bar([i + 0.4 * j for i in range(len(cells))], vals, 0.4, label=f"{scheme} group scales")
            for i, (f, _) in enumerate(cells):  # per channel of the same format, for reference
                pc = next(r["over_fp32_pct"][d] for r in two
                          if (r["format"], r["granularity"], r["rounding"]) == (f, "per channel", "rtn"))
                ax.plot([i - 0.2, i + 0.6], [pc, pc], "k:", lw=1, label="per channel" if i == 0 else None)
            ax.set_xticks([i + 0.2 for i in range(len(cells))], [f"{f}\n{g}" for f, g in cells])
            ax.set_ylabel(f"{d.upper()} ppl over fp32 (%)")
            ax.set_title("AQAS W4A8: two-level vs float group scales")
            ax.legend(fontsize=8)
        save(fig, "accuracy_two_level.png")
    return written


def summary_json(res: dict[str, list], study: StudySettings, quick: bool) -> dict[str, Any]:
    def results(r):
        if r is None:
            return None
        return {k: (v["ppl"] if "ppl" in v else {m: v[m] for m in ("acc", "acc_norm", "n") if m in v})
                for k, v in r["results"].items() if isinstance(v, dict)} if "range_vs_length" not in r["results"] \
            else {"range_vs_length": r["results"]["range_vs_length"]}

    return {
        "study": asdict(study), "quick": quick,
        "runs": {part: [{"label": s.label, "spec": run_key(s, study)["spec"],
                         "ppl": None if r is None else {d: ppl(r, d) for d in study.ppl_sets if d in r["results"]},
                         "results": results(r),
                         "calibrate_s": None if r is None else r.get("calibrate_s"),
                         "calibrate_cpu_s": None if r is None else r.get("calibrate_cpu_s"),
                         "calibrate_peak_rss_mib": None if r is None else r.get("calibrate_peak_rss_mib"),
                         "eval_s": None if r is None else r.get("eval_s"),
                         "layer_rel_error": None if r is None else r.get("calibration", {}).get("layer_rel_error")}
                        for s, r in rows] for part, rows in res.items()},
        "verdicts": [] if quick else verdicts(res, study),
        "dint_ranking": [] if quick else dint_ranking(res, study),
        "defaults_from_data": {} if quick else defaults_from_data(res, study),
        "seed_spread": [] if quick else seed_spread(res, study),
        "recipes": [] if quick else recipe_rows(res, study),
        "best_recipes": {} if quick else best_recipes(res, study),
        "two_level": [] if quick else two_level_rows(res, study),
        "two_level_gaps": [] if quick else two_level_gaps(res, study),
        "g64_seed_noise": [] if quick else g64_seed_noise(res, study),
    }

