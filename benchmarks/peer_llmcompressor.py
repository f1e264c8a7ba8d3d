"""llm-compressor 0.14's W4A8 recipes, side by side with ours, on the same windows and the same scorer.

The peer is installed into its OWN folder (``pip install --target DIR --no-deps``) and run with our
venv's torch/transformers on ``PYTHONPATH``, so it never touches our venv (llm-compressor pins
transformers<=5.17; a separate venv would pull a multi-GB CUDA torch). Verified here with
llmcompressor 0.14.0.1 + compressed-tensors 0.19.0.

What is compared, for each granularity (per channel, group G):

* the peer's W4A8: int4 symmetric weights at the same granularity as ours, int8 symmetric dynamic
  per-token activations (``input_activations`` strategy "token"), lm_head left float, in four
  recipes: QuantizationModifier (RTN), GPTQModifier, SmoothQuantModifier(0.8) + GPTQModifier,
  AWQModifier + QuantizationModifier;
* calibrated on OUR calibration windows (``calibrate.data.calibration_data``: same dataset, count,
  length, seed as ``w4a8 calibrate``), passed to ``oneshot`` as a tokenized dataset;
* scored with OUR perplexity harness (``hf_integration.eval.perplexity``, same windows) on the model
  ``oneshot`` returns, whose linears run compressed-tensors' quantize-dequantize forward (weights
  and the dynamic per-token input quantization);
* proof that the activations really are quantized: the same weights re-scored with input
  quantization switched off (W4A16) must give a different perplexity (``act_quant_effect``).

Usage::

    python benchmarks/peer_llmcompressor.py [--model smollm2|PATH] [--groups -1,64] [--recipes rtn,gptq]
    python benchmarks/peer_llmcompressor.py --plan        # print the recipes, run nothing

Results: ``benchmarks/results/peer_llmcompressor.json`` (merged per model/granularity/recipe)
and a printed table. Not part of the test run (minutes per recipe); ``tests/benchmarks`` checks
the recipe construction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PEER_VERSION = "0.14.0.1"
PEER_PACKAGES = (f"llmcompressor=={PEER_VERSION}", "compressed-tensors==0.19.0", "nvidia-ml-py", "datasets",
                 "pandas", "xxhash", "multiprocess<0.70.20")
RESULTS = Path(__file__).resolve().parent / "results" / "peer_llmcompressor.json"
RECIPES = ("rtn", "gptq", "sq-gptq", "awq")
# Our side, run in the same invocation on the same windows: name -> CalibrationConfig overrides.
OURS = {
    "ours-rtn": {"method": "rtn"},
    "ours-aqas": {"method": "aqas"},
    "ours-gptq": {"method": "rtn", "rounding": "gptq"},
    "ours-aqas-gptq": {"method": "aqas", "rounding": "gptq"},
}
SMOOTHQUANT_STRENGTH = 0.8
BASELINE = "fp32"  # the unquantized model on the same windows: the reference for "% over FP32"


# -- plan (pure: what the test checks) -------------------------------------------------------------

def w4a8_scheme(group_size: int) -> dict[str, Any]:
    """compressed-tensors config group: int4 symmetric weights (channel or group), int8 dynamic per-token acts."""
    weights: dict[str, Any] = {"num_bits": 4, "type": "int", "symmetric": True}
    if group_size == -1:
        weights.update(strategy="channel")
    else:
        weights.update(strategy="group", group_size=group_size)
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}


def recipe_spec(name: str, group_size: int) -> list[tuple[str, dict[str, Any]]]:
    """``[(modifier class name, kwargs), ...]`` for one peer recipe; lm_head stays float as in ours."""
    quant = {"config_groups": w4a8_scheme(group_size), "ignore": ["lm_head"]}
    if name == "rtn":
        return [("QuantizationModifier", quant)]
    if name == "gptq":
        return [("GPTQModifier", quant)]
    if name == "sq-gptq":
        return [("SmoothQuantModifier", {"smoothing_strength": SMOOTHQUANT_STRENGTH}), ("GPTQModifier", quant)]
    if name == "awq":
        return [("AWQModifier", {}), ("QuantizationModifier", quant)]
    raise ValueError(f"unknown peer recipe {name!r}; known: {RECIPES}")


MODIFIER_MODULES = {
    "QuantizationModifier": "llmcompressor.modifiers.quantization",
    "GPTQModifier": "llmcompressor.modifiers.gptq",
    "SmoothQuantModifier": "llmcompressor.modifiers.smoothquant",
    "AWQModifier": "llmcompressor.modifiers.transform.awq",
}


def build_modifiers(spec: list[tuple[str, dict[str, Any]]]) -> list:
    """Instantiate a recipe spec (needs llm-compressor importable: the worker's PYTHONPATH)."""
    import importlib

    return [getattr(importlib.import_module(MODIFIER_MODULES[cls]), cls)(**kw) for cls, kw in spec]


def peer_dir(cache: Path | None = None) -> Path:
    root = cache or Path(os.environ.get("W4A8_CACHE", Path.home() / ".cache" / "w4a8-dint"))
    return root / "peer" / f"llmcompressor-{PEER_VERSION}"


def install_peer(target: Path) -> Path:
    """``pip install --target`` (idempotent): never into our venv."""
    if (target / "llmcompressor").is_dir() and (target / "compressed_tensors").is_dir():
        return target
    import shutil

    tmp = target.with_name(f"{target.name}.partial{os.getpid()}")  # per process: two installers may race
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--target", str(tmp), *PEER_PACKAGES], check=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: keep its complete copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- worker (runs with the peer on PYTHONPATH) --------------------------------------------------------

def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _act_quant(model, enabled: bool) -> int:
    """Switch compressed-tensors' input (activation) quantization on/off on every quantized linear."""
    n = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        if not hasattr(module, "_w4a8_peer_acts"):
            module._w4a8_peer_acts = scheme.input_activations
        module.quantization_scheme = scheme.model_copy(update={"input_activations": module._w4a8_peer_acts if enabled else None})
        n += module._w4a8_peer_acts is not None
    return n


def ours_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Our calibrator on the same windows, scored through our HF quantizer with the same harness."""
    import tempfile

    import torch

    from w4a8_dint.calibrate.api import calibrate
    from w4a8_dint.calibrate.recipe import CalibrationConfig
    from w4a8_dint.embedded import load_text
    from w4a8_dint.hf_integration.eval import load_hf, perplexity

    cfg = CalibrationConfig(dataset=job["dataset"], samples=job["samples"], seq_len=job["seq_len"], seed=job["seed"],
                            group_size=job["group_size"], num_threads=job.get("threads"), progress=False,
                            **OURS[job["recipe"]])
    with tempfile.TemporaryDirectory(prefix="w4a8-ours-") as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        calibrate(job["model"], Path(tmp) / "ckpt", cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        model, tok = load_hf(Path(tmp) / "ckpt", "float32")
        with torch.no_grad():
            ppl = {d: perplexity(model, tok, load_text(d), job["eval_seq_len"], max_tokens=job["eval_tokens"],
                                 add_bos=job["add_bos"], desc=d)["ppl"] for d in job["datasets"]}
    return {"ppl": ppl, "calib_wall_s": wall, "calib_cpu_s": cpu, "peak_rss_mb": _rss_mb()}


def _no_pinning_without_accelerator() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations for faster H2D copies; on a CPU-only
    torch ``pin_memory()`` raises "Cannot access accelerator device". Pinning changes no value, so
    it is skipped here (a CPU-only run has no H2D copy to speed up)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def baseline_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The float model itself, scored by the same harness on the same windows."""
    import torch

    from w4a8_dint.embedded import load_text
    from w4a8_dint.hf_integration.eval import load_hf, perplexity

    model, tok = load_hf(job["model"], "float32")
    with torch.no_grad():
        ppl = {d: perplexity(model, tok, load_text(d), job["eval_seq_len"], max_tokens=job["eval_tokens"],
                             add_bos=job["add_bos"], desc=d)["ppl"] for d in job["datasets"]}
    return {"ppl": ppl, "calib_wall_s": 0.0, "calib_cpu_s": 0.0, "peak_rss_mb": _rss_mb()}


def worker(job: dict[str, Any]) -> dict[str, Any]:
    if job["recipe"] == BASELINE:
        return baseline_worker(job)
    if job["recipe"] in OURS:
        return ours_worker(job)
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from w4a8_dint.calibrate.data import calibration_data
    from w4a8_dint.embedded import load_text
    from w4a8_dint.hf_integration.eval import perplexity

    if not torch.cuda.is_available():
        _no_pinning_without_accelerator()
    torch.manual_seed(job["seed"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    data = calibration_data(tok, job["dataset"], job["samples"], job["seq_len"], job["seed"])
    ids = data.input_ids
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=ds, recipe=build_modifiers(recipe_spec(job["recipe"], job["group_size"])),
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()

    def score() -> dict[str, float]:
        with torch.no_grad():
            return {d: perplexity(model, tok, load_text(d), job["eval_seq_len"], max_tokens=job["eval_tokens"],
                                  add_bos=job["add_bos"], desc=d)["ppl"] for d in job["datasets"]}

    quantized_inputs = _act_quant(model, True)
    w4a8 = score()
    out = {"ppl": w4a8, "linears_with_act_quant": quantized_inputs,
           "calib_wall_s": wall, "calib_cpu_s": cpu, "peak_rss_mb": _rss_mb()}
    if job.get("acts_off_check", True):  # the W4A16 control doubles the scoring time
        _act_quant(model, False)
        w4a16 = score()
        out.update(ppl_w4a16_same_weights=w4a16, act_quant_effect={d: w4a8[d] / w4a16[d] - 1 for d in w4a8})
    return out


# -- driver ------------------------------------------------------------------------------------

def _model_path(name: str) -> str:
    """``smollm2`` / ``gemma3`` (the offline models the package ships) or a local directory."""
    from w4a8_dint.embedded import embedded_model_dir, gemma3_model_dir

    return str({"smollm2": embedded_model_dir, "gemma3": gemma3_model_dir}.get(name, lambda: name)())


def run_job(job: dict[str, Any], peer: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if job["recipe"] in RECIPES:  # the peer's compressed-tensors 0.19 must not shadow ours in our runs
        env["PYTHONPATH"] = os.pathsep.join([str(peer), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        # the last line that is not a progress bar; a negative code is a signal (9: e.g. the kernel's OOM killer)
        lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"error": f"{why}: {lines[-1]}" if lines else why, "returncode": proc.returncode,
                "stderr_tail": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_result(out_json: Path, key: str, row: dict[str, Any]) -> None:
    """Replace one ``model|gG|recipe`` entry, re-reading the file first so that other runs' entries
    (another model, another invocation finished meanwhile) are kept; written atomically."""
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"runs": {}}
    results.setdefault("runs", {})[key] = row
    results.update(peer=f"llmcompressor {PEER_VERSION} (compressed-tensors 0.19.0)",
                   machine=platform.processor() or platform.machine())
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(out_json)


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| model | group | recipe | PTB | C4 | PTB (acts off) | act-quant effect | calib wall s | peak RSS MB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r["result"]:
            out.append(f"| {r['model_name']} | {r['group_size']} | {r['recipe']} | error: {r['result']['error'][:60]} |||||")
            continue
        res = r["result"]
        p, p16 = res["ppl"], res.get("ppl_w4a16_same_weights", {})
        effect = res.get("act_quant_effect", {}).get("ptb")
        out.append(f"| {r['model_name']} | {r['group_size']} | {r['recipe']} | {p.get('ptb', float('nan')):.2f} | "
                   f"{p.get('c4', float('nan')):.2f} | {p16.get('ptb', float('nan')):.2f} | "
                   f"{'-' if effect is None else f'{100 * effect:+.1f}%'} | {res['calib_wall_s']:.0f} | "
                   f"{res['peak_rss_mb']:.0f} |")
    return "\n".join(out)


# -- report: the llm-compressor section of benchmarks/accuracy.md, computed from the JSON -------------

REPORT_MD = Path(__file__).resolve().parent / "accuracy.md"
SECTION_BEGIN = ("<!-- peer_llmcompressor: generated by `python benchmarks/peer_llmcompressor.py --report` from "
                 "benchmarks/results/peer_llmcompressor.json; edit the script, not this block -->")
SECTION_END = "<!-- /peer_llmcompressor -->"
# Issue 14's targets: our best W4A8 within this fraction of FP32 perplexity (PTB and C4), per model/granularity.
TARGETS = {("smollm2", 64): 0.06, ("smollm2", -1): 0.12, ("gemma3", 128): 0.05, ("gemma3", -1): 0.10}
PPL_SETS = ("ptb", "c4")


def _gran(g: int) -> str:
    return "per channel" if g == -1 else f"g{g}"


def _excess(ppl: dict[str, float], fp32: dict[str, float]) -> dict[str, float]:
    return {d: ppl[d] / fp32[d] - 1 for d in PPL_SETS}


def _score(ppl: dict[str, float], fp32: dict[str, float]) -> float:
    """One number to pick a "best" recipe by: geometric mean of the PTB and C4 ratios to FP32."""
    r = 1.0
    for d in PPL_SETS:
        r *= ppl[d] / fp32[d]
    return r ** (1 / len(PPL_SETS))


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def report_section(results: dict[str, Any]) -> str:
    """Markdown for every model in the JSON: all runs, then peer best vs ours best against the targets."""
    runs = [r for r in results.get("runs", {}).values()]
    models = sorted({r["model_name"] for r in runs}, key=lambda m: (m != "smollm2", m))
    ok = lambda r: "error" not in r["result"]  # noqa: E731
    out = [SECTION_BEGIN, "", "## llm-compressor 0.14 side by side (same calibration windows, same scorer)", "",
           f"Peer: {results.get('peer', 'llmcompressor')} installed in its own `--target` folder, run with our torch/"
           "transformers on CPU. Both sides: int4 symmetric weights (per channel or group G), int8 symmetric dynamic "
           "per-token activations, lm_head float; calibrated on the same windows (C4, 32 x 512 tokens, seed 0 = "
           "`calibrate.data.calibration_data`); perplexity from `hf_integration.eval.perplexity` on the first 4096 "
           "tokens of PTB test and of the C4 sample, seq 512 (Gemma3 with BOS). Ours is scored through our HF "
           "quantizer (the integer path); the peer through compressed-tensors' fake-quant forward. "
           "Peer recipes: `rtn` = QuantizationModifier, `gptq` = GPTQModifier, `sq-gptq` = SmoothQuant(0.8) + GPTQ, "
           "`awq` = AWQModifier + QuantizationModifier. Ours: `ours-rtn`, `ours-aqas`, `ours-gptq` (RTN scales + "
           "GPTQ rounding), `ours-aqas-gptq`. \"acts off\" = the peer's same weights re-scored with its input "
           "quantization disabled (W4A16): a different perplexity proves the peer's activations are really quantized. "
           "Wall times are from a shared 2-core box (loadavg in the JSON), not a speed comparison.", ""]
    summary = ["| model | granularity | FP32 PTB / C4 | peer best | ours best | ours vs peer (PTB / C4) | "
               "target (ours vs FP32) | verdict: target | verdict: ours < peer |", "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        fp = next((r["result"]["ppl"] for r in runs if r["model_name"] == m and r["recipe"] == BASELINE and ok(r)), None)
        out += [f"### {m}" + ("" if fp is None else f" (FP32: PTB {fp['ptb']:.2f}, C4 {fp['c4']:.2f})"), "",
                "| granularity | recipe | PTB | C4 | PTB vs FP32 | C4 vs FP32 | PTB acts off (W4A16) | act-quant effect PTB / C4 "
                "| calib wall s | loadavg (1 min) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        order = {n: i for i, n in enumerate((*RECIPES, *OURS))}
        groups = sorted({r["group_size"] for r in runs if r["model_name"] == m and r["recipe"] != BASELINE}
                        | {g for mm, g in TARGETS if mm == m}, key=lambda g: (g == -1, g))
        for g in groups:
            rs = sorted((r for r in runs if r["model_name"] == m and r["group_size"] == g and r["recipe"] != BASELINE),
                        key=lambda r: order.get(r["recipe"], 99))
            for r in rs:
                res = r["result"]
                if not ok(r):
                    out.append(f"| {_gran(g)} | {r['recipe']} | error: `{res['error'][:170]}` ||||||||")
                    continue
                p = res["ppl"]
                ex = _excess(p, fp) if fp else None
                eff = res.get("act_quant_effect")
                out.append(f"| {_gran(g)} | {r['recipe']} | {p['ptb']:.2f} | {p['c4']:.2f} | "
                           f"{_pct(ex['ptb']) if ex else '-'} | {_pct(ex['c4']) if ex else '-'} | "
                           f"{res['ppl_w4a16_same_weights']['ptb']:.2f} | " if "ppl_w4a16_same_weights" in res else
                           f"| {_gran(g)} | {r['recipe']} | {p['ptb']:.2f} | {p['c4']:.2f} | "
                           f"{_pct(ex['ptb']) if ex else '-'} | {_pct(ex['c4']) if ex else '-'} | - | ")
                out[-1] += (f"{_pct(eff['ptb'])} / {_pct(eff['c4'])} | " if eff else "- | ")
                out[-1] += f"{res['calib_wall_s']:.0f} | {r.get('loadavg', ['?'])[0]} |"
            if not rs:
                out.append(f"| {_gran(g)} | not run yet ||||||||||")
            if fp is None:
                summary.append(f"| {m} | {_gran(g)} | not run | - | - | - | - | not scored (no FP32 run) | - |")
                continue
            peer = [r for r in rs if r["recipe"] in RECIPES and ok(r)]
            ours = [r for r in rs if r["recipe"] in OURS and ok(r)]
            pb = min(peer, key=lambda r: _score(r["result"]["ppl"], fp), default=None)
            ob = min(ours, key=lambda r: _score(r["result"]["ppl"], fp), default=None)
            cell = lambda r: "not run" if r is None else (  # noqa: E731
                f"{r['recipe']}: {r['result']['ppl']['ptb']:.2f} / {r['result']['ppl']['c4']:.2f} "
                f"({' / '.join(_pct(v) for v in _excess(r['result']['ppl'], fp).values())})")
            target = TARGETS.get((m, g))
            if ob is None or target is None:
                v_target = "not run" if ob is None else "no target"
            else:
                ex = _excess(ob["result"]["ppl"], fp)
                v_target = ("**met**" if all(v <= target for v in ex.values()) else "**missed**") + \
                    f" ({' / '.join(_pct(v) for v in ex.values())} vs {_pct(target)})"
            if ob is None or pb is None:
                vs, v_peer = "-", "not run (" + " and ".join(n for n, b in (("peer", pb), ("ours", ob)) if b is None) + " missing)"
            else:
                rel = {d: ob["result"]["ppl"][d] / pb["result"]["ppl"][d] - 1 for d in PPL_SETS}
                vs = " / ".join(_pct(v) for v in rel.values())
                v_peer = "**met**" if all(v < 0 for v in rel.values()) else (
                    "**missed**" if all(v >= 0 for v in rel.values()) else "**split**") + " (PTB / C4)"
            missing = [n for n in (*RECIPES, *OURS) if n not in {r["recipe"] for r in peer + ours}]
            if missing and (pb or ob):  # a verdict over an incomplete set says so
                v_peer += f"; not run or failed: {', '.join(missing)}"
            summary.append(f"| {m} | {_gran(g)} | {fp['ptb']:.2f} / {fp['c4']:.2f} | {cell(pb)} | {cell(ob)} | {vs} | "
                           f"{'-' if target is None else f'within {_pct(target)}'} | {v_target} | {v_peer} |")
        out.append("")
    out += ["### Verdicts: our best vs the peer's best, and vs the issue's targets", "",
            "\"Best\" = lowest geometric mean of the PTB and C4 ratios to FP32 among the recipes run; percentages "
            "are PTB / C4. A target is met only when both PTB and C4 are within it. A missing row is run (and this "
            "block rebuilt) with `python benchmarks/peer_llmcompressor.py --model M --groups G --recipes R "
            "[--skip-acts-off]` then `--report`.", "", *summary, "", SECTION_END]
    return "\n".join(out)


def write_report(results_json: Path = RESULTS, md: Path = REPORT_MD) -> str:
    """Replace (or append) only the marked llm-compressor block of accuracy.md; the rest is another script's."""
    section = report_section(json.loads(results_json.read_text()))
    text = md.read_text() if md.is_file() else ""
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        text = head + section + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md.write_text(text)
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 (offline packages) or a local HF model dir")
    p.add_argument("--add-bos", action="store_true", help="prepend BOS when scoring (default: on for gemma3, which needs it)")
    p.add_argument("--groups", default="-1,64", help="comma list of group sizes (-1 = per channel)")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help=f"comma list of peer recipes {RECIPES}, ours {tuple(OURS)} and/or {BASELINE!r}")
    p.add_argument("--dataset", default="c4")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=4096, help="perplexity tokens per dataset (the study uses 4096)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", type=Path, default=RESULTS, help=f"JSON to merge results into (default {RESULTS})")
    p.add_argument("--skip-acts-off", action="store_true",
                   help="skip the W4A16 control (same peer weights, activation quantization off): halves the peer's "
                        "scoring time once one recipe per model has proved the activations are quantized")
    p.add_argument("--plan", action="store_true", help="print the recipes and exit")
    p.add_argument("--report", action="store_true",
                   help="rewrite the llm-compressor block of benchmarks/accuracy.md from the results JSON and exit")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.report:
        print(write_report(args.results))
        return 0
    groups = [int(g) for g in args.groups.split(",")]
    recipes = [r for r in args.recipes.split(",") if r]
    if args.plan:
        for g in groups:
            for r in recipes:
                print(g, r, json.dumps(OURS[r] if r in OURS else {} if r == BASELINE else recipe_spec(r, g)))
        return 0
    peer = install_peer(peer_dir())
    model = _model_path(args.model)
    out_json: Path = args.results
    rows = []
    for g in groups:
        for r in recipes:
            job = {"model": model, "recipe": r, "group_size": g, "dataset": args.dataset, "samples": args.samples,
                   "seq_len": args.seq_len, "seed": args.seed, "eval_seq_len": 512, "eval_tokens": args.eval_tokens,
                   "datasets": ["ptb", "c4"], "add_bos": args.add_bos or args.model == "gemma3", "threads": args.threads,
                   "acts_off_check": not args.skip_acts_off}
            print(f"[peer] {args.model} g{g} {r} ...", file=sys.stderr, flush=True)
            res = run_job(job, peer)
            row = {"model_name": args.model, "group_size": g, "recipe": r, "job": job, "result": res,
                   "loadavg": Path("/proc/loadavg").read_text().split()[:3], "finished": time.strftime("%Y-%m-%d %H:%M")}
            rows.append(row)
            merge_result(out_json, f"{args.model}|g{g}|{r}", row)
            print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
