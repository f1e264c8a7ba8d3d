"""Layer-by-layer execution straight from safetensors shards: the whole model is never in memory.

* The model is built from its config with every **parameter on the meta device** (buffers such
  as rotary ``inv_freq`` stay real: they are computed at construction, not loaded).
* The modules outside the decoder layers (embeddings, positional embeddings; never the output
  head) are loaded once; one forward per calibration batch with each decoder layer replaced by a
  recorder captures what the model passes every layer (masks, position embeddings, per layer,
  so Gemma's sliding/full attention layers get their own), and the first layer's input.
* Then decoder layer ``i`` is materialized from the shards (``safe_open`` reads only its
  tensors), worked on, its outputs written to a spill file, and it goes back to meta.

Resident: non-layer modules + one layer + the calibration activations (+ the small spill).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from w4a8_dint.checkpoint import CheckpointError, load_tensors, shard_files
from w4a8_dint.formats import FormatError

from .arch import UnsupportedArchitecture, call_with_input, first_tensor, input_locator


class CalibrationError(RuntimeError):
    """Calibration cannot go on (bad weights, missing tensors, NaN activations)."""


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on ``meta`` but real buffers (like accelerate's ``init_empty_weights``)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, pname = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    mod._parameters[pname] = nn.Parameter(value, requires_grad=False)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


# -- the skeleton -----------------------------------------------------------------------------

@dataclass
class ModelSkeleton:
    model: nn.Module
    config: Any  # transformers PretrainedConfig
    layers: nn.ModuleList
    layers_name: str  # e.g. "model.layers" or "model.decoder.layers"
    checkpoint_names: dict[str, str]  # skeleton parameter name -> tensor name in the source shards
    source_names: dict[str, str]  # name in the source shards -> file

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_name}.{i}"


def _find_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == num_layers and num_layers > 0
             and all(list(b.parameters()) for b in m)]
    if not found:
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: found no nn.ModuleList of {num_layers} decoder layers (config.num_hidden_layers)"
        )
    return found[0]


def _lazy_roc_curve(*args, **kwargs):
    from sklearn.metrics import roc_curve

    return roc_curve(*args, **kwargs)


def import_transformers_without_sklearn() -> None:
    """Import transformers' generation code with its scikit-learn import deferred.

    ``transformers.generation.candidate_generator`` imports ``sklearn.metrics`` (scipy, pandas) at import
    time whenever scikit-learn is installed (lm-eval installs it), only for assisted decoding's
    ``roc_curve``: 3.5 s and ~330 MB of RSS in every calibration process. It is imported here with
    sklearn hidden, then given back the real availability check and a ``roc_curve`` that imports on
    first use, so assisted decoding behaves as before.
    """
    import sys

    if "transformers.generation.candidate_generator" in sys.modules:
        return
    import transformers.utils as tu

    real = tu.is_sklearn_available
    tu.is_sklearn_available = lambda: False
    try:
        import transformers.generation.candidate_generator as cg
    finally:
        tu.is_sklearn_available = real
    cg.is_sklearn_available = real
    if real() and not hasattr(cg, "roc_curve"):
        cg.roc_curve = _lazy_roc_curve


def build_skeleton(model_dir: str | Path, trust_remote_code: bool = False) -> ModelSkeleton:
    """The model on meta (parameters only) plus the map from its parameter names to shard tensors."""
    import_transformers_without_sklearn()
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UnsupportedArchitecture(f"{model_dir}: cannot build a config ({e}); custom code needs --trust-remote-code") from e
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", type(qc).__name__)
        raise CalibrationError(f"{model_dir}: the model is already quantized (quant_method={method!r}); calibrate a float model")
    kwargs = dict(dtype=torch.float32, trust_remote_code=trust_remote_code)
    try:
        with parameters_on_meta():
            try:
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **kwargs)
            except (ValueError, ImportError):
                model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", **kwargs)
    except ValueError as e:
        raise UnsupportedArchitecture(f"{model_dir}: {type(config).__name__} is not a causal LM transformers can build: {e}") from e
    model.eval()
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers_name, layers = _find_layers(model, int(getattr(text_cfg, "num_hidden_layers", 0) or 0))
    try:
        source_names = shard_files(model_dir)  # missing/corrupt shards and pickle-only models fail here, by name
    except CheckpointError as e:
        raise CalibrationError(str(e)) from e
    prefix = getattr(model, "base_model_prefix", "") or ""
    mapping: dict[str, str] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        for cand in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                     f"{prefix}.{name}" if prefix else None):
            if cand and cand in source_names:
                mapping[name] = cand
                break
    return ModelSkeleton(model, config, layers, layers_name, mapping, source_names)


# -- streaming ---------------------------------------------------------------------------------

class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``idx``: records how the model calls it, passes the input on."""

    def __init__(self, idx: int, last: int, store: dict):
        super().__init__()
        self.idx, self.last, self.store = idx, last, store

    def forward(self, *args, **kwargs):
        found = input_locator(args, kwargs)
        if found is None:
            raise UnsupportedArchitecture(f"decoder layer {self.idx} is called without a hidden-state tensor")
        locator, hidden = found
        kind, where = locator
        # keep the call without its main input (that one changes layer by layer)
        args = tuple(None if (kind == "arg" and i == where) else a for i, a in enumerate(args))
        kwargs = {k: (None if (kind == "kwarg" and k == where) else v) for k, v in kwargs.items()}
        self.store[self.idx] = (locator, args, kwargs, hidden if self.idx == 0 else None)
        if self.idx == self.last:
            raise _StopForward
        return hidden


@dataclass
class LayerCall:
    """How the model calls one decoder layer for one batch (everything but the hidden states)."""

    locator: tuple[str, int | str]
    args: tuple
    kwargs: dict

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = first_tensor(call_with_input(layer, self.locator, hidden, self.args, self.kwargs))
        if out is None:
            raise UnsupportedArchitecture(f"decoder layer {type(layer).__name__} returned no tensor")
        return out


@dataclass
class StreamStats:
    layers_loaded: int = 0
    peak_layers_resident: int = 0  # most decoder layers holding real (non-meta) parameters at once
    tensors_loaded: int = 0


@dataclass
class LayerStream:
    skeleton: ModelSkeleton
    model_dir: Path
    device: torch.device
    stats: StreamStats = field(default_factory=StreamStats)
    source_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # skeleton name -> dtype in the shards

    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        sk = self.skeleton
        missing = [n for n in names if n not in sk.checkpoint_names]
        if missing:
            raise CalibrationError(f"{self.model_dir}: checkpoint lacks tensor(s) for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        try:
            raw = load_tensors(self.model_dir, [sk.checkpoint_names[n] for n in names])
        except CheckpointError as e:
            raise CalibrationError(str(e)) from e
        out = {}
        for n in names:
            t = raw[sk.checkpoint_names[n]]
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise FormatError(f"{sk.checkpoint_names[n]}: {bad} non-finite value(s) (NaN/Inf) in the source weights; refusing to quantize")
            self.source_dtypes[n] = t.dtype
            out[n] = t
        self.stats.tensors_loaded += len(names)
        return out

    def load_outer_modules(self) -> None:
        """Materialize every parameter outside the decoder layers except the output head."""
        model = self.skeleton.model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        layer_prefix = self.skeleton.layers_name + "."
        names = []
        for mname, mod in model.named_modules():
            if mod is head or mname.startswith(layer_prefix) or mname == self.skeleton.layers_name:
                continue
            for pname, p in mod.named_parameters(recurse=False):
                if p.device.type == "meta":
                    names.append(f"{mname}.{pname}" if mname else pname)
        for n, t in self._load(names).items():
            _set_param(model, n, t.float().to(self.device))
        self.outer_names = names

    def release_outer_modules(self) -> None:
        """Put the outer modules' parameters back on meta once every call is recorded: the layers only need
        the recorded hidden states, and the token embedding is the largest tensor of a small model
        (SmolLM2: 113 MB in float32 of 513; Gemma3-270m: 671 MB of 1073)."""
        for n in getattr(self, "outer_names", []):
            mod_name, _, pname = n.rpartition(".")
            mod = self.skeleton.model.get_submodule(mod_name) if mod_name else self.skeleton.model
            _set_param(self.skeleton.model, n, torch.empty_like(mod._parameters[pname], device="meta"))
        self.outer_names = []

    @torch.no_grad()
    def record_calls(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
        """One model forward with recorders in place of the layers: layer-0 input and every layer's call."""
        layers = self.skeleton.layers
        originals = list(layers)
        store: dict[int, tuple] = {}
        for i in range(len(layers)):
            layers[i] = _Recorder(i, len(layers) - 1, store)
        try:
            self.skeleton.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for i, m in enumerate(originals):
                layers[i] = m
        if len(store) != len(layers):
            raise UnsupportedArchitecture(f"the model forward called {len(store)} of {len(layers)} decoder layers")
        hidden = store[0][3]
        calls = [LayerCall(store[i][0], store[i][1], store[i][2]) for i in range(len(layers))]
        return hidden.float(), calls

    def materialize(self, i: int) -> nn.Module:
        layer = self.skeleton.layers[i]
        prefix = self.skeleton.layer_prefix(i) + "."
        names = [prefix + n for n, _ in layer.named_parameters()]
        for n, t in self._load(names).items():
            _set_param(layer, n[len(prefix):], t.float().to(self.device))
        self.stats.layers_loaded += 1
        resident = sum(any(p.device.type != "meta" for p in lay.parameters()) for lay in self.skeleton.layers)
        self.stats.peak_layers_resident = max(self.stats.peak_layers_resident, resident)
        return layer

    def release(self, i: int) -> None:
        self.skeleton.layers[i].to("meta")


# -- spill + lazy mapping for the writer -----------------------------------------------------------

class LayerSpill:
    """Each quantized layer's output tensors go to their own safetensors file as soon as they exist."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.entries: dict[str, tuple[Path, str]] = {}

    def add(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        path = self.directory / f"layer-{index:05d}.safetensors"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
        for k in tensors:
            self.entries[k] = (path, k)


class LazyTensors(Mapping):
    """``name -> tensor`` read from safetensors on access, so the writer holds one shard at a time."""

    def __init__(self, entries: Mapping[str, tuple[Path, str]]):
        self.entries = dict(entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        path, key = self.entries[name]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def passthrough_entries(skeleton: ModelSkeleton, model_dir: Path, quantized_layers: int) -> dict[str, tuple[Path, str]]:
    """Source tensors copied unchanged: everything outside the first ``quantized_layers`` decoder layers.

    Output names follow the model's module names (a shard key without the base-model prefix gets it back).
    """
    to_skeleton = {v: k for k, v in skeleton.checkpoint_names.items()}
    done = tuple(skeleton.layer_prefix(i) + "." for i in range(quantized_layers))
    out = {}
    for src_name, fname in skeleton.source_names.items():
        name = to_skeleton.get(src_name, src_name)
        if name.startswith(done):
            continue
        out[name] = (Path(model_dir) / fname, src_name)
    return out


def read_hf_config(model_dir: Path) -> dict:
    """config.json via the checkpoint contract's one config reader (errors name the file)."""
    from w4a8_dint.contract import read_hf_config as read

    return read(model_dir)
