"""``calibrate(model, out_dir, cfg) -> Path``: the Python entry point (the CLI, the demo and the
accuracy study call it).

Flow: build the model skeleton on meta -> check the group size against every K -> tokenize the
calibration windows (SLAC picks their length from the target task) -> record how the model
calls each decoder layer -> for each layer: materialize it from the shards, infer its smoothing
groups, calibrate it (``layer.py``), spill its tensors, free it -> write the checkpoint atomically.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from w4a8_dint import __version__
from w4a8_dint.checkpoint import write_checkpoint
from w4a8_dint.contract import structure_from_model
from w4a8_dint.config import LayerPolicy, W4A8Config
from w4a8_dint.embedded import DEFAULT_MODEL_NAME, resolve_model
from w4a8_dint.formats import CodeTable, get_format

from . import preflight
from .arch import infer_structure
from .data import calibration_data
from .layer import LayerCalibrator, search_precision
from .recipe import DEFAULT_SEQ_LEN, CalibrationConfig, resolve_group_size
from .rotate import rotated_source
from .stream import (
    CalibrationError, LayerCall, LayerSpill, LayerStream, LazyTensors, ModelSkeleton, build_skeleton, passthrough_entries,
    read_hf_config,
)

PROBE_TOKENS = 64  # tokens of the structure probe (a traced forward per layer)
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]  # never pickles


def resolve_model_dir(model: str | Path | None) -> Path:
    """The embedded model (default), a local HF directory, or a Hub id fetched as safetensors only."""
    resolved = resolve_model(None if model is None else str(model))
    if isinstance(resolved, Path):
        if not (resolved / "config.json").is_file():
            raise CalibrationError(f"{resolved}: not a Hugging Face model directory (no config.json)")
        return resolved
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise CalibrationError(f"{resolved!r} is neither a local directory nor a reachable Hub model: {e}") from e


def _device(cfg: CalibrationConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _say(cfg: CalibrationConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


def _resolve_seq_len(cfg: CalibrationConfig, tokenizer) -> tuple[int, dict[str, Any]]:
    if cfg.seq_len is not None:
        return cfg.seq_len, {}
    if cfg.target_task:
        from .slac import task_length

        length = task_length(cfg.target_task, tokenizer)
        return length, {"target_task": cfg.target_task, "task_length": length}
    return DEFAULT_SEQ_LEN, {}


def calibrate(model: str | Path | None, out_dir: str | Path, cfg: CalibrationConfig | None = None,
              rotate: str = "none") -> Path:
    """Quantize ``model`` with ``cfg`` and write a w4a8-dint checkpoint to ``out_dir``; returns its path.

    ``rotate="hadamard"`` first folds an offline rotation into a float copy of the model
    (``rotate.py``, seeded with ``cfg.seed``) and calibrates that copy."""
    cfg = cfg or CalibrationConfig()
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        with preflight.stop_on_signals():  # SIGTERM/SIGINT unwind through the temp-dir cleanup
            return _calibrate(model, out_dir, cfg, rotate)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Run:
    """What a run resolved before any layer is touched."""

    model_dir: Path
    skeleton: ModelSkeleton
    quantized_layers: int
    rules: W4A8Config  # only its modules_to_not_convert matters here
    group_size: int
    table: CodeTable
    notes: list[str]
    rotation: dict[str, Any] | None = None  # rotate.py's record when the source was rotated first

    def skip(self, layer_name: str) -> Callable[[str], bool]:
        return lambda linear: self.rules.is_skipped(f"{layer_name}.{linear}")


def _prepare(model: str | Path | None, out: Path, cfg: CalibrationConfig) -> _Run:
    """Skeleton, scope and group size: everything that can fail fast, before data is read."""
    model_dir = resolve_model_dir(model)
    preflight.check_output_vs_source(out, model_dir)
    skeleton = build_skeleton(model_dir, cfg.trust_remote_code)
    n = skeleton.num_layers if cfg.max_layers is None else min(cfg.max_layers, skeleton.num_layers)
    not_convert = list(cfg.modules_to_not_convert) + [skeleton.layer_prefix(i) for i in range(n, skeleton.num_layers)]
    rules = W4A8Config(modules_to_not_convert=not_convert)
    preflight.check_architecture(skeleton, rules, n)
    in_features = [m.in_features for i in range(n) for name, m in skeleton.layers[i].named_modules()
                   if isinstance(m, torch.nn.Linear) and not rules.is_skipped(f"{skeleton.layer_prefix(i)}.{name}")]
    notes: list[str] = []
    group_size = resolve_group_size(cfg, in_features, notes)  # an explicit size that does not divide K fails here
    for note in notes:
        _say(cfg, f"note: {note}")
    return _Run(model_dir, skeleton, n, rules, group_size, get_format(cfg.format), notes)


@dataclass
class _Batches:
    hidden: list[torch.Tensor]  # layer input per calibration batch (the first is the search batch)
    calls: list[list[LayerCall]]  # [batch][layer]
    probe: torch.Tensor  # a short sequence for the structure probe
    probe_calls: list[LayerCall]


def _record_batches(stream: LayerStream, input_ids: torch.Tensor, cfg: CalibrationConfig) -> _Batches:
    # Batches of whole sequences; the first one (about search_tokens tokens) is the search batch.
    # A run that needs no activations records only the probe (the structure trace's few tokens).
    seq_len = input_ids.shape[1]
    batch = max(1, min(input_ids.shape[0], math.ceil(cfg.search_tokens / seq_len)))
    hidden, calls = [], []
    for ids in input_ids.split(batch) if cfg.needs_activations else ():
        h, c = stream.record_calls(ids)
        hidden.append(h)
        calls.append(c)
    probe, probe_calls = stream.record_calls(input_ids[:1, :min(PROBE_TOKENS, seq_len)])
    return _Batches(hidden, calls, probe, probe_calls)


def _quantize_layers(run: _Run, stream: LayerStream, batches: _Batches, cfg: CalibrationConfig,
                     spill: LayerSpill) -> tuple[dict[str, LayerPolicy], dict[str, Any]]:
    """Layer by layer: materialize, infer groups, calibrate, spill, free. Returns policies and records."""
    from tqdm.auto import tqdm

    policies: dict[str, LayerPolicy] = {}
    records: dict[str, Any] = {}
    hidden, probe = batches.hidden, batches.probe
    bar = tqdm(range(run.quantized_layers), desc=f"calibrate {cfg.method}", unit="layer", disable=not cfg.progress,
               file=sys.stderr)
    for i in bar:
        name = run.skeleton.layer_prefix(i)
        layer = stream.materialize(i)
        structure = infer_structure(layer, lambda: batches.probe_calls[i](layer, probe), probe, name)
        result = LayerCalibrator(cfg, run.table, run.group_size, run.skip(name)).calibrate(
            layer, name, structure, hidden, [c[i] for c in batches.calls], probe, batches.probe_calls[i])
        spill.add(i, {k: v.to(stream.source_dtypes.get(k, v.dtype)) for k, v in result.tensors.items()})
        policies.update(result.policies)
        records[name] = {"structure": [g.describe() for g in structure.groups], **result.record}
        hidden, probe = result.next_hidden, result.next_probe
        stream.release(i)
        if "layer_rel_error" in result.record:
            bar.set_postfix(rel_err=f"{result.record['layer_rel_error']:.2e}")
    bar.close()
    if stream.stats.peak_layers_resident > 1:
        raise CalibrationError(f"internal: {stream.stats.peak_layers_resident} decoder layers were resident at once")
    return policies, records


@torch.no_grad()
def _calibrate(model: str | Path | None, out_dir: str | Path, cfg: CalibrationConfig, rotate: str = "none") -> Path:
    out = Path(out_dir).resolve()
    preflight.check_output(out, cfg.overwrite)
    preflight.check_dataset(cfg.dataset)
    start = time.perf_counter()
    run = _prepare(model, out, cfg)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.model_dir, trust_remote_code=cfg.trust_remote_code)
    seq_len, slac_record = _resolve_seq_len(cfg, tokenizer)
    preflight.check_seq_len(seq_len, run.skeleton.config)
    with preflight.claim_output(out, cfg.overwrite, lambda line: print(line, file=sys.stderr, flush=True)), \
            rotated_source(run.model_dir, out, rotate, cfg.seed, cfg.trust_remote_code) as (source, rotation):
        if rotation is not None:  # calibrate the rotated float copy: same architecture, tokenizer, layers
            run = replace(run, model_dir=source, skeleton=build_skeleton(source, cfg.trust_remote_code), rotation=rotation)
        return _run(run, out, cfg, model, tokenizer, seq_len, slac_record, start)


def _run(run: _Run, out: Path, cfg: CalibrationConfig, model, tokenizer, seq_len: int, slac_record: dict[str, Any],
         start: float) -> Path:
    # Without activations only the probe's tokens are used: one window is enough.
    data = calibration_data(tokenizer, cfg.dataset, cfg.samples if cfg.needs_activations else 1, seq_len, cfg.seed)
    device = _device(cfg)
    stream = LayerStream(run.skeleton, run.model_dir, device)
    stream.load_outer_modules()
    batches = _record_batches(stream, data.input_ids, cfg)
    stream.release_outer_modules()  # every call is recorded: only the hidden states are needed from here on

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.layers-", dir=out.parent) as spill_dir:
        spill = LayerSpill(Path(spill_dir))
        policies, layer_records = _quantize_layers(run, stream, batches, cfg, spill)
        calibration = {
            **cfg.to_record(),
            "seq_len": seq_len,
            "samples": data.samples,
            "tokens": data.samples * seq_len,
            "search_tokens_used": int(batches.hidden[0].shape[0] * seq_len) if batches.hidden else 0,
            "activations_collected": cfg.needs_activations,
            "search_matmul_precision": search_precision(device) if cfg.method_impl.searches_scales else None,
            **slac_record,
            "source_model": DEFAULT_MODEL_NAME if model in (None, "", "default") else str(model),
            "w4a8_dint_version": __version__,
            "quantized_layers": run.quantized_layers,
            "stream": {"peak_resident_layers": stream.stats.peak_layers_resident,
                       "source_tensors_loaded": stream.stats.tensors_loaded, "device": str(device)},
            "notes": run.notes,
            "layers": layer_records,
        }
        qconfig = W4A8Config(
            format=run.table.name, group_size=run.group_size, scale_scheme=cfg.scale_scheme,
            act_mode=cfg.method_impl.checkpoint_act_mode(cfg),
            layers=policies, modules_to_not_convert=list(run.rules.modules_to_not_convert), method=cfg.method,
            rounding=cfg.rounding, calibration=calibration, rotation=run.rotation,
        )
        entries = {**passthrough_entries(run.skeleton, run.model_dir, run.quantized_layers), **spill.entries}
        # write_checkpoint runs the checkpoint contract on the temp dir before its rename; a custom-code model
        # cannot be rebuilt from config.json there (trust_remote_code is off), so it is checked against our skeleton.
        structure = structure_from_model(run.skeleton.model) if cfg.trust_remote_code else None
        write_checkpoint(out, LazyTensors(entries), read_hf_config(run.model_dir), qconfig,
                         source_dir=run.model_dir, overwrite=cfg.overwrite, model_structure=structure)
    _say(cfg, f"wrote {out} ({cfg.method}, {cfg.rounding} rounding, {run.table.name}, group {run.group_size}, {run.quantized_layers} layers, "
              f"{time.perf_counter() - start:.0f} s, peak resident decoder layers: {stream.stats.peak_layers_resident})")
    return out
