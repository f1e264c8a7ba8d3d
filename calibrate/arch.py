"""Smoothing groups of one decoder layer, inferred from how data flows through it.

Nothing here is keyed on architecture or module names. One traced forward of the layer on a
few probe tokens tells us

* which linears read the **same input tensor** (q/k/v, gate/up, OPT's fc1 alone ...): they
  form a smoothing group and share one per-input-channel scale ``s``;
* which module **produced** that tensor. A norm (LayerNorm / RMSNorm-like: a leaf whose class
  name says "norm" and whose parameters are 1-D) is the first fold candidate; otherwise earlier
  linears whose output size divides the group's input size (v_proj for o_proj, up_proj for
  down_proj, OPT's fc1 for fc2) are tried, latest first;
* the **block** whose output the search loss compares: the innermost module holding all the
  group's linears that takes their input as its own (the attention module for q/k/v, the MLP
  for gate/up); single linears are compared on their own output.

A fold candidate is accepted only if folding a random scale into it leaves the layer's output
unchanged (relative error < 1e-3 on the probe tokens), so a fold that would be wrong (a norm
whose output also feeds the residual, a gate behind a non-homogeneous SiLU, a GELU between two
linears) falls back to an explicit ``smooth_scale`` instead of silently changing the model.
For a linear source the input-channel -> source-row map is measured, not assumed: the source
rows are scaled by distinct factors and the ratio seen on every input channel names its row.
With grouped-query attention one v_proj row feeds several heads' o_proj channels, so those
channels must share a scale; :func:`constrain` enforces it (geometric mean per source row).
Norms of the form ``x_hat * (1 + w)`` (Gemma) are recognised the same way (offset 1 passes the
check, offset 0 does not).

Modules that hold parameters but are neither ``nn.Linear`` nor a norm (GPT-2's ``Conv1D``,
embeddings inside a layer, ...) are refused with their names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

FOLD_NORM = "norm"
FOLD_LINEAR = "linear"
FOLD_EXPLICIT = "explicit"
NORM_OFFSETS = (0.0, 1.0)  # y = x_hat * (offset + w): 0 for LayerNorm/RMSNorm, 1 for Gemma's RMSNorm
_FOLD_TOLERANCE = 1e-3


class UnsupportedArchitecture(ValueError):
    """A decoder layer this tool cannot quantize; the message names the offending modules."""


@dataclass(eq=False)
class SmoothingGroup:
    """Linears that read one input tensor, and where their shared input scale goes."""

    linears: tuple[str, ...]  # names relative to the decoder layer, in execution order
    fold: str  # FOLD_NORM | FOLD_LINEAR | FOLD_EXPLICIT
    source: str | None = None  # norm or linear the scale is folded into
    norm_offset: float = 0.0
    channel_map: torch.Tensor | None = None  # long [K]: input channel -> source row (FOLD_LINEAR)
    block: str | None = None  # module whose output the search compares; None -> the linears' outputs
    block_input: tuple[str, int | str] | None = None  # ("arg", i) or ("kwarg", name) of the block call

    @property
    def name(self) -> str:
        return self.linears[0] if len(self.linears) == 1 else "+".join(self.linears)

    def describe(self) -> str:
        src = f"{self.fold}:{self.source}" if self.source else self.fold
        if self.fold == FOLD_NORM and self.norm_offset:
            src += f" (x_hat*({self.norm_offset:g}+w))"
        return f"{src} -> [{', '.join(self.linears)}]" + (f" (loss on {self.block})" if self.block else "")


@dataclass(eq=False)
class LayerStructure:
    linears: tuple[str, ...]  # execution order
    norms: tuple[str, ...]
    groups: tuple[SmoothingGroup, ...] = field(default_factory=tuple)

    def group_of(self, linear: str) -> SmoothingGroup:
        for g in self.groups:
            if linear in g.linears:
                return g
        raise KeyError(linear)


# -- small helpers -------------------------------------------------------------------------

def first_tensor(x: Any) -> torch.Tensor | None:
    """The first tensor in a module output (a tensor, a tuple, or a ModelOutput)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(x, dict):
        for v in x.values():
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def input_locator(args: tuple, kwargs: dict) -> tuple[tuple[str, int | str], torch.Tensor] | None:
    """Where a module call takes its main input: first positional tensor, else ``hidden_states``."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return ("arg", i), a
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return ("kwarg", "hidden_states"), kwargs["hidden_states"]
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return ("kwarg", k), v
    return None


def call_with_input(module: nn.Module, locator: tuple[str, int | str], x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    """Call ``module`` as it was called, with its main input replaced by ``x``."""
    kind, where = locator
    if kind == "arg":
        args = tuple(x if i == where else a for i, a in enumerate(args))
    else:
        kwargs = {**kwargs, where: x}
    return module(*args, **kwargs)


def is_norm(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return "norm" in type(module).__name__.lower() and all(p.dim() == 1 for p in params)


def check_supported(layer: nn.Module, layer_name: str) -> None:
    """Raise naming every parameter-holding module that is neither ``nn.Linear`` nor a norm."""
    bad = []
    for name, m in layer.named_modules():
        if not list(m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Linear) or is_norm(m):
            continue
        bad.append(f"{layer_name}.{name} ({type(m).__name__})")
    if bad:
        raise UnsupportedArchitecture(
            f"unsupported module(s) in decoder layer {layer_name}: {', '.join(bad)}. "
            "w4a8-dint quantizes nn.Linear layers and folds scales into LayerNorm/RMSNorm-like norms only"
        )


def _module(layer: nn.Module, name: str) -> nn.Module:
    return layer.get_submodule(name)


# -- folds (used both to verify a candidate and to apply the chosen scales) ---------------------

def constrain(s: torch.Tensor, channel_map: torch.Tensor | None) -> torch.Tensor:
    """Make channels fed by the same source row share one scale (geometric mean of theirs)."""
    if channel_map is None:
        return s
    rows = int(channel_map.max()) + 1
    logs = torch.zeros(rows, dtype=torch.float64, device=s.device)
    counts = torch.zeros(rows, dtype=torch.float64, device=s.device)
    cm = channel_map.to(s.device)
    logs.index_add_(0, cm, s.double().log())
    counts.index_add_(0, cm, torch.ones_like(s, dtype=torch.float64))
    per_row = (logs / counts.clamp(min=1)).exp()
    return per_row[cm].to(s.dtype)


def source_row_scale(s: torch.Tensor, channel_map: torch.Tensor, rows: int) -> torch.Tensor:
    """Per source row scale ``u`` with ``u[map[c]] == s[c]`` (``s`` already constrained)."""
    u = torch.ones(rows, dtype=s.dtype, device=s.device)
    u[channel_map.to(s.device)] = s
    return u


@torch.no_grad()
def fold_into_source(layer: nn.Module, group: SmoothingGroup, s: torch.Tensor) -> None:
    """Make the group's input ``X / s`` by rescaling the module that produces it."""
    if group.fold == FOLD_EXPLICIT:
        return
    src = _module(layer, group.source)
    if group.fold == FOLD_NORM:
        w = src.weight
        w.copy_(((group.norm_offset + w.float()) / s.to(w.device) - group.norm_offset).to(w.dtype))
        if getattr(src, "bias", None) is not None:
            src.bias.copy_((src.bias.float() / s.to(w.device)).to(src.bias.dtype))
    elif group.fold == FOLD_LINEAR:
        u = source_row_scale(s.float(), group.channel_map, src.out_features).to(src.weight.device)
        src.weight.copy_((src.weight.float() / u[:, None]).to(src.weight.dtype))
        if src.bias is not None:
            src.bias.copy_((src.bias.float() / u).to(src.bias.dtype))
    else:
        raise ValueError(f"unknown fold kind {group.fold!r}")


@torch.no_grad()
def scale_linear_inputs(layer: nn.Module, group: SmoothingGroup, s: torch.Tensor) -> None:
    """``W[:, j] *= s_j`` for every linear of the group (the other half of the smoothing identity)."""
    for name in group.linears:
        w = _module(layer, name).weight
        w.copy_((w.float() * s.to(w.device)[None, :]).to(w.dtype))


# -- inference ----------------------------------------------------------------------------------

@dataclass
class _Call:
    name: str
    args: tuple
    kwargs: dict
    output: Any


def _trace(layer: nn.Module, run: Callable[[], Any]) -> list[_Call]:
    calls: list[_Call] = []
    handles = []
    for name, m in layer.named_modules():
        if not name:
            continue

        def hook(mod, args, kwargs, output, name=name):
            calls.append(_Call(name, args, kwargs, output))

        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _capture_input(layer: nn.Module, run: Callable[[], Any], name: str) -> torch.Tensor:
    box: list[torch.Tensor] = []
    h = _module(layer, name).register_forward_pre_hook(lambda m, a: box.append(a[0].detach().clone()))
    try:
        run()
    finally:
        h.remove()
    return box[0]


class _Restore:
    """Snapshot some parameters and put them back on exit (probes must not change the layer)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.params]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, v in zip(self.params, self.saved):
                p.copy_(v)
        return False


def _group_params(layer: nn.Module, group: SmoothingGroup) -> list[torch.nn.Parameter]:
    mods = [_module(layer, n) for n in group.linears]
    if group.source:
        mods.append(_module(layer, group.source))
    return [p for m in mods for p in m.parameters(recurse=False)]


def _random_scale(k: int, device, channel_map: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.rand(k, generator=gen) - 0.5).to(device)
    return constrain(s, channel_map)


def _fold_preserves_output(layer, run, probe_in, reference_out, group: SmoothingGroup) -> bool:
    k = _module(layer, group.linears[0]).in_features
    s = _random_scale(k, probe_in.device, group.channel_map)
    with _Restore(_group_params(layer, group)):
        fold_into_source(layer, group, s)
        scale_linear_inputs(layer, group, s)
        out = first_tensor(run())
    ref_delta = (reference_out - probe_in).float()
    err = (out - reference_out).float().norm() / ref_delta.norm().clamp(min=1e-30)
    return bool(torch.isfinite(err)) and float(err) < _FOLD_TOLERANCE


@torch.no_grad()
def _measure_channel_map(layer, run, src_name: str, dst_name: str) -> torch.Tensor | None:
    """Scale the source's output rows by distinct factors; each input channel's ratio names its row."""
    src, dst = _module(layer, src_name), _module(layer, dst_name)
    rows, k = src.out_features, dst.in_features
    if k % rows:
        return None
    x0 = _capture_input(layer, run, dst_name).reshape(-1, k).float()
    gen = torch.Generator().manual_seed(1)
    t = 1.0 + (torch.randperm(rows, generator=gen).double() + 1.0) / rows  # distinct, spacing 1/rows
    with _Restore(list(src.parameters(recurse=False))):
        src.weight.mul_(t.to(src.weight.device, src.weight.dtype)[:, None])
        if src.bias is not None:
            src.bias.mul_(t.to(src.bias.device, src.bias.dtype))
        x1 = _capture_input(layer, run, dst_name).reshape(-1, k).float()
    big = x0.abs() > 1e-3 * x0.abs().amax(dim=0, keepdim=True).clamp(min=1e-30)
    ratio = torch.where(big, x1.double() / x0.double(), torch.full_like(x0, float("nan"), dtype=torch.float64))
    med = ratio.nanmedian(dim=0).values
    if not torch.isfinite(med).all():
        return None  # a channel never carried signal on the probe tokens: cannot tell its row
    order = torch.argsort(t)
    pos = torch.searchsorted(t[order].to(med.device), med).clamp(1, rows - 1)
    lo, hi = order[(pos - 1).cpu()], order[pos.cpu()]
    cand = torch.where((t[lo] - med.cpu()).abs() <= (t[hi] - med.cpu()).abs(), lo, hi)
    if ((t[cand] - med.cpu()).abs() > 0.25 / rows).any():
        return None
    consistent = ((ratio - med[None, :]).abs() <= 1e-3 * med[None, :])[big]
    if consistent.float().mean() < 0.99:
        return None
    return cand.long()


def infer_structure(layer: nn.Module, run: Callable[[], Any], probe_in: torch.Tensor, layer_name: str) -> LayerStructure:
    """Trace one forward (``run`` calls the layer on ``probe_in``) and build its smoothing groups."""
    check_supported(layer, layer_name)
    linear_names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    if not linear_names:
        raise UnsupportedArchitecture(f"decoder layer {layer_name} has no nn.Linear modules to quantize")
    with torch.no_grad():
        calls = _trace(layer, run)
        reference_out = first_tensor(run())
    by_name: dict[str, list[_Call]] = {}
    for c in calls:
        by_name.setdefault(c.name, []).append(c)
    for n in linear_names:
        count = len(by_name.get(n, []))
        if count != 1:
            raise UnsupportedArchitecture(
                f"{layer_name}.{n} is called {count} times in one forward; w4a8-dint needs each linear called exactly once"
            )
    order = [c.name for c in calls if c.name in set(linear_names)]
    norm_names = tuple(n for n, m in layer.named_modules() if n and is_norm(m) and n in by_name)

    # Linears reading the same tensor object share one input, hence one scale.
    inputs: list[torch.Tensor] = []
    members: list[list[str]] = []
    for n in order:
        x = by_name[n][0].args[0]
        for i, t in enumerate(inputs):
            if t is x:
                members[i].append(n)
                break
        else:
            inputs.append(x)
            members.append([n])

    groups = []
    for x, names in zip(inputs, members):
        block, locator = _find_block(names, by_name, x)
        group = _choose_fold(layer, run, probe_in, reference_out, names, x, by_name, norm_names, order)
        group.block, group.block_input = block, locator
        groups.append(group)
    return LayerStructure(tuple(order), norm_names, tuple(groups))


def _find_block(names: list[str], by_name: dict[str, list[_Call]], x: torch.Tensor):
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    lca = ".".join(common)
    if not lca or lca in names or len(by_name.get(lca, [])) != 1:
        return None, None
    call = by_name[lca][0]
    found = input_locator(call.args, call.kwargs)
    if found is None or found[1] is not x:
        return None, None
    return lca, found[0]


def _choose_fold(layer, run, probe_in, reference_out, names, x, by_name, norm_names, order) -> SmoothingGroup:
    linears = tuple(names)
    producer = next((n for n in norm_names if any(first_tensor(c.output) is x for c in by_name[n])), None)
    if producer is not None:
        if getattr(_module(layer, producer), "weight", None) is not None:
            for offset in NORM_OFFSETS:
                g = SmoothingGroup(linears, FOLD_NORM, producer, norm_offset=offset)
                if _fold_preserves_output(layer, run, probe_in, reference_out, g):
                    return g
        return SmoothingGroup(linears, FOLD_EXPLICIT)
    k = _module(layer, names[0]).in_features
    first = order.index(names[0])
    for cand in reversed(order[:first]):
        src = _module(layer, cand)
        if cand in linears or k % src.out_features:
            continue
        cmap = _measure_channel_map(layer, run, cand, names[0])
        if cmap is None:
            continue
        g = SmoothingGroup(linears, FOLD_LINEAR, cand, channel_map=cmap)
        if _fold_preserves_output(layer, run, probe_in, reference_out, g):
            return g
    return SmoothingGroup(linears, FOLD_EXPLICIT)
