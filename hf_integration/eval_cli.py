"""``w4a8 eval MODEL [MODEL ...]``: perplexity and zero-shot accuracy, several models side by side.

Examples::

    w4a8 eval out/smollm2-w4a8 --baseline default --tasks ptb,c4,piqa --limit 200
    w4a8 eval out/smollm2-w4a8 --baseline default --json > results.json
    w4a8 eval out/smollm2-w4a8 --backend vllm --tasks ptb --max-tokens 8192

``default`` names the embedded SmolLM2-135M (float). Every model goes through the
same scoring code, so the float and W4A8 columns compare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager

# Light imports only (``w4a8 --help`` must stay instant): eval.py and tasks.py import torch lazily.
from w4a8_dint.hf_integration import eval as D
from w4a8_dint.hf_integration.tasks import TASKS


def _tasks(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="checkpoint directory, 'default' (embedded SmolLM2), or a Hub id (needs network)")
    p.add_argument("--baseline", metavar="MODEL", help="evaluate this (float) model first, as the reference column")
    p.add_argument("--baseline-results", metavar="PATH",
                   help="reuse a baseline evaluated earlier: the first run of a JSON written by --output with the same "
                        "settings (instead of --baseline)")
    p.add_argument("--tasks", type=_tasks, default=list(D.DEFAULT_TASKS),
                   help=f"comma list; perplexity: {','.join(D.PPL_DATASETS)}; zero-shot: {','.join(TASKS)} "
                        f"(default: {','.join(D.DEFAULT_TASKS)})")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: first N docs per task (default: all)")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window length (default 512)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: seq-len, no overlap)")
    p.add_argument("--max-tokens", type=int, default=None, help="perplexity: first N tokens of each text (default: all)")
    p.add_argument("--backend", choices=D.BACKENDS, default="hf", help="hf (default) or vllm")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (config), float32, bfloat16, float16")
    p.add_argument("--device", default="cpu", help="hf backend device (cpu, cuda)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="hf backend: tokens per forward batch")
    p.add_argument("--max-len", type=int, default=2048, help="zero-shot context cap; vLLM max_model_len")
    p.add_argument("--add-bos", action="store_true", help="prepend BOS (models trained with it, e.g. Gemma)")
    p.add_argument("--enforce-eager", action="store_true", help="vllm backend: no torch.compile/graphs (faster start)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--output", metavar="PATH", help="also write the JSON document to PATH")
    p.add_argument("--write-results", action="store_true",
                   help="also write eval_results.json into each evaluated checkpoint directory (read by `w4a8 push`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from w4a8_dint.embedded import resolve_model
    from w4a8_dint.hf_integration.eval import Comparison, EvalSettings, evaluate
    from w4a8_dint.hf_integration.hub import EVAL_RESULTS_FILE

    settings = EvalSettings(
        tasks=tuple(args.tasks), limit=args.limit, seq_len=args.seq_len, stride=args.stride,
        max_tokens=args.max_tokens, backend=args.backend, dtype=args.dtype, device=args.device,
        batch_tokens=args.batch_tokens, max_len=args.max_len, add_bos=args.add_bos, progress=not args.no_progress,
        enforce_eager=args.enforce_eager,
    )
    if args.baseline and args.baseline_results:
        print("error: give --baseline or --baseline-results, not both", file=sys.stderr)
        return 2
    try:
        earlier = [_earlier_baseline(Path(args.baseline_results), settings)] if args.baseline_results else []
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    has_baseline = bool(args.baseline or earlier)
    names = ([args.baseline] if args.baseline else []) + list(args.models)
    with _stdout_to_stderr():  # vLLM (and its engine processes) log to stdout; keep stdout for the result
        runs = earlier + [evaluate(resolve_model(name), settings=settings) for name in names]
    comparison = Comparison(runs)
    if args.write_results:
        for run_ in runs[1:] if has_baseline else runs:
            if run_["quantization"] and Path(run_["model"]).is_dir():
                doc = {"runs": [runs[0], run_] if has_baseline else [run_]}
                _atomic_write(Path(run_["model"]) / EVAL_RESULTS_FILE, json.dumps(doc, indent=2))
    doc = json.dumps({"runs": runs}, indent=2)
    if args.output:
        _atomic_write(Path(args.output), doc)
    print(doc if args.json else comparison.table())
    return 0


def _earlier_baseline(path, settings) -> dict:
    """The first run of an ``--output`` document, if it was evaluated with exactly these settings."""
    from dataclasses import asdict

    try:
        run_ = json.loads(path.read_text(encoding="utf-8"))["runs"][0]
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"--baseline-results {path}: not a `w4a8 eval --output` document ({e})") from e
    want = json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k != "progress"}))  # tuples as lists
    got = run_.get("settings", {})
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
        raise ValueError(f"--baseline-results {path} was evaluated with other settings: "
                         + ", ".join(f"{k}={got.get(k)!r} (now {want.get(k)!r})" for k in diff))
    return run_


@contextmanager
def _stdout_to_stderr():
    """Point file descriptor 1 at stderr (children started meanwhile inherit it), then restore."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _atomic_write(path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
