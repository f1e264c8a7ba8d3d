"""Calibrate one decoder layer: capture, choose scales / clips / activation policy, fold, quantize.

Order inside a layer (every smoothing group is searched on the layer's float inputs, as AWQ does):

1. one float pass over all calibration batches: per input channel ``max|X|`` and ``mean|X|`` of
   every group's input, plus the first batch's inputs, block calls and float block outputs (the
   search data: about ``search_tokens`` tokens). Skipped when neither the method nor the rounding
   needs activations (RTN with per-token activations): then no calibration forward runs at all;
2. per group, the run's method object (``calibrate/methods/``) picks ``s`` and the activation
   mode, then searching methods (AWQ/AQAS) pick a clip ratio per output channel on the same tokens;
3. all folds are applied (norm weights, source-linear rows), then every linear is rounded by the
   run's rounding step (``rtn`` or ``gptq``). GPTQ first runs one more float pass over all batches
   to accumulate each group's Hessian from the inputs as the kernel sees them (after the smoothing
   divisor, and INT8-fake-quantized unless ``gptq_hessian_inputs="float"``); the linears of a
   group share it. One layer's Hessians are alive at a time.
   Folding into a source linear rescales whole output rows of it, which leaves its quantization
   unchanged, so the order of groups does not matter;
4. with ``propagate="quantized"`` the layer is run again with fake-quantized weights and INT8
   fake-quantized inputs to produce the next layer's inputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from w4a8_dint.config import INPUT_SCALE, SMOOTH_SCALE, LayerPolicy, quantized_weight_tensors
from w4a8_dint.formats import CodeTable

from .arch import FOLD_EXPLICIT, LayerStructure, SmoothingGroup, call_with_input, constrain, first_tensor, fold_into_source, scale_linear_inputs
from .gptq import accumulate_hessian, finalize_hessian
from .recipe import CalibrationConfig
from .methods import GroupContext
from .search import (
    BATCH_ELEMENTS, ScaleStats, candidate_inputs, fake_quantize_activation_fast, fake_quantize_weight, leading_slice,
    linear_losses, search_row_clip, static_input_scale, weight_channel_stats,
)
from .stream import CalibrationError, LayerCall

# Fraction of the search batch's sequences the alpha-search loss sees (the clip search sees all).
# 1.0: half of 2 x 512 tokens saves ~25% CPU but changed 6 of 24 alphas on 6 SmolLM2 layers and the
# mean layer error by +0.7% (ablation in docs/calibrate.md), so the default keeps every sequence.
SEARCH_LOSS_SUBSET = 1.0

# Precision of the matmuls inside the alpha and clip searches (the losses that rank candidates); the
# capture, propagate and final rounding passes stay float32. "bfloat16" runs them on the CPU's bf16
# units (AMX / AVX512-BF16: ~7x the float32 rate on the dev box); "auto" picks it where such units exist.
# float32 by default: on 3 SmolLM2 layers bf16 saved 17% CPU but moved 1 of 12 alphas (layer error +0.1%);
# the full-model ablation (alphas, layer errors, perplexity) is still to run (docs/calibrate.md).
SEARCH_MATMUL_PRECISION = "float32"


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def search_precision(device: torch.device | str) -> str:
    """``SEARCH_MATMUL_PRECISION`` resolved for ``device``: "bfloat16" or "float32" (recorded in the checkpoint)."""
    mode = SEARCH_MATMUL_PRECISION
    if mode != "auto":
        return mode
    kind = torch.device(device).type
    return "bfloat16" if kind == "cuda" or (kind == "cpu" and _cpu_has_fast_bf16()) else "float32"


def search_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The context the searches run in: bf16 autocast where chosen (see SEARCH_MATMUL_PRECISION), else nothing."""
    if search_precision(device) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@dataclass
class GroupCapture:
    """Statistics over all calibration tokens + the search batch of one smoothing group."""

    name: str = ""  # "<layer>.<first linear>", for error messages
    absmax: torch.Tensor | None = None  # [K]
    abssum: torch.Tensor | None = None  # [K] (float64)
    count: int = 0
    x: torch.Tensor | None = None  # the search batch's input [..., K]
    block_call: tuple[tuple, dict] | None = None  # (args, kwargs) of the block on the search batch
    target: torch.Tensor | None = None  # float output the loss compares against

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).float().abs()
        m, s = a.amax(dim=0), a.sum(dim=0, dtype=torch.float64)
        if not torch.isfinite(m).all():  # amax propagates NaN and Inf: no extra pass over the activations
            raise CalibrationError(f"non-finite activations (NaN/Inf) at the input of {self.name}: the float model itself overflows")
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        self.abssum = s if self.abssum is None else self.abssum + s
        self.count += a.shape[0]

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.count, 1)).float()


@dataclass
class GroupPlan:
    """What calibration decided for one group."""

    scale: torch.Tensor | None  # None: no smoothing
    act_mode: str
    row_clip: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]  # checkpoint tensors of this layer (full names)
    policies: dict[str, LayerPolicy]  # full linear name -> policy
    record: dict[str, Any]  # JSON-safe summary for quantization_config.calibration
    next_hidden: list[torch.Tensor]  # empty when the run collects no activations
    next_probe: torch.Tensor


@contextlib.contextmanager
def swapped_weights(layer: nn.Module, weights: dict[str, torch.Tensor]):
    mods = {n: layer.get_submodule(n) for n in weights}
    saved = {n: m.weight.data for n, m in mods.items()}
    try:
        for n, m in mods.items():
            m.weight.data = weights[n]
        yield
    finally:
        for n, m in mods.items():
            m.weight.data = saved[n]


def _round(x: float, nd: int = 4) -> float:
    return float(f"{x:.{nd}g}")


class LayerCalibrator:
    def __init__(self, cfg: CalibrationConfig, table: CodeTable, group_size: int, skip: Callable[[str], bool]):
        self.cfg, self.table, self.group_size, self.skip = cfg, table, group_size, skip

    # -- 1. capture ---------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, layer: nn.Module, layer_name: str, structure: LayerStructure, hidden: list[torch.Tensor],
                calls: list[LayerCall], keep_outputs: bool) -> tuple[dict[str, GroupCapture], list[torch.Tensor], torch.Tensor]:
        caps = {g.name: GroupCapture(name=f"{layer_name}.{g.linears[0]}") for g in structure.groups}
        state = {"search": True}
        handles = []
        for g in structure.groups:
            cap = caps[g.name]

            def pre(mod, args, cap=cap):
                cap.update(args[0])
                if state["search"]:
                    cap.x = args[0].detach()

            handles.append(layer.get_submodule(g.linears[0]).register_forward_pre_hook(pre))
            if g.block is not None:
                def post(mod, args, kwargs, output, cap=cap):
                    if state["search"]:
                        cap.block_call = (args, kwargs)
                        cap.target = first_tensor(output).detach()

                handles.append(layer.get_submodule(g.block).register_forward_hook(post, with_kwargs=True))
        outputs = []
        first_output = None
        try:
            for i, (h, call) in enumerate(zip(hidden, calls)):
                state["search"] = i == 0
                out = call(layer, h)
                if i == 0:
                    first_output = out
                if keep_outputs:
                    outputs.append(out)
        finally:
            for hd in handles:
                hd.remove()
        for g in structure.groups:
            cap = caps[g.name]
            if g.block is None:  # the linears' own float outputs
                cap.target = torch.cat([self._linear_out(layer.get_submodule(n), cap.x) for n in g.linears], dim=-1)
        return caps, outputs, first_output

    @staticmethod
    def _linear_out(lin: nn.Linear, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, lin.weight if weight is None else weight, lin.bias)

    # -- 2. decide --------------------------------------------------------------------------------
    def _loss_batch(self, layer: nn.Module, g: SmoothingGroup, cap: GroupCapture) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(x, target, block_call)`` for the alpha-search loss: the first ``SEARCH_LOSS_SUBSET`` of the
        search batch's sequences (the clip search keeps them all). A block's sliced call is checked to
        reproduce the captured output, else the whole batch is used."""
        b = cap.x.shape[0] if cap.x.dim() > 2 else 1
        keep = max(1, math.ceil(b * SEARCH_LOSS_SUBSET))
        if keep >= b:
            return cap.x, cap.target, cap.block_call
        x, target = cap.x[:keep], cap.target[:keep]
        if g.block is None:
            return x, target, None
        call = leading_slice(cap.block_call, b, keep)
        with torch.autocast(x.device.type, enabled=False):  # a float32 check, also inside a bf16 search
            out = first_tensor(call_with_input(layer.get_submodule(g.block), g.block_input, x, *call)).float()
        if out.shape != target.shape or float((out - target.float()).norm()) > 1e-4 * float(target.float().norm()):
            return cap.x, cap.target, cap.block_call
        return x, target, call

    def _loss_fn(self, layer: nn.Module, g: SmoothingGroup, cap: GroupCapture, act_mode: str, quantize_act: bool):
        weights = {n: layer.get_submodule(n).weight.detach().float() for n in g.linears}
        x, target, block_call = self._loss_batch(layer, g, cap)

        def loss(s: torch.Tensor) -> float:
            xs = x / s
            if quantize_act:
                scale = static_input_scale(cap.absmax, s).to(xs.device) if act_mode == "per-tensor" else None
                xs = fake_quantize_activation_fast(xs, act_mode, scale)
            wq = {n: fake_quantize_weight(w * s[None, :], self.table, self.group_size) for n, w in weights.items()}
            if g.block is not None:
                args, kwargs = block_call
                with swapped_weights(layer, wq):
                    out = first_tensor(call_with_input(layer.get_submodule(g.block), g.block_input, xs, args, kwargs))
            else:
                out = torch.cat([self._linear_out(layer.get_submodule(n), xs, wq[n]) for n in g.linears], dim=-1)
            return float((out.float() - target.float()).pow(2).sum())

        def many(scales: torch.Tensor) -> torch.Tensor:  # [C, K] -> [C]: a single-linear group's candidates batched
            biases = [layer.get_submodule(n).bias for n in g.linears]
            per = max(x.numel(), target.numel(), *(w.numel() for w in weights.values()))
            return torch.cat([
                linear_losses(candidate_inputs(x, part, act_mode if quantize_act else None, cap.absmax), part,
                              list(weights.values()), biases, target, self.table, self.group_size)
                for part in scales.split(max(1, BATCH_ELEMENTS // per))])

        if g.block is None:  # a block (attention, MLP) is a module call per candidate: no batched form
            loss.many = many
        return loss

    def plan(self, layer: nn.Module, g: SmoothingGroup, cap: GroupCapture | None) -> GroupPlan:
        """The method's choice for one group; ``cap`` is None when the run collects no activations."""
        method = self.cfg.method_impl
        record: dict[str, Any] = {"linears": list(g.linears), "fold": g.fold, "source": g.source}
        stats, v = None, float("nan")
        if cap is not None:
            weights = [layer.get_submodule(n).weight.detach().float() for n in g.linears]
            w_absmean, w_absmax = weight_channel_stats(weights, self.group_size)
            stats = ScaleStats(cap.absmean, cap.absmax, w_absmean, w_absmax)
            v = float(cap.absmax.max())
            record["max_abs_x"] = _round(v)
        ctx = GroupContext(
            cfg=self.cfg, stats=stats, max_abs_x=v, can_smooth=not any(self.skip(n) for n in g.linears),
            constrain=lambda s: constrain(s, g.channel_map),
            loss=lambda act_mode, quantize_act: self._loss_fn(layer, g, cap, act_mode, quantize_act))
        device = next(layer.parameters()).device
        with search_autocast(device):
            choice = method.choose(ctx)
        record.update(choice.record)
        plan = GroupPlan(choice.scale, choice.act_mode, record=record)
        if method.searches_scales:
            with search_autocast(device):
                self._search_clips(layer, g, cap, plan)
        record["act_mode"] = choice.act_mode
        return plan

    def _search_clips(self, layer: nn.Module, g: SmoothingGroup, cap: GroupCapture, plan: GroupPlan) -> None:
        x = cap.x.reshape(-1, cap.x.shape[-1]).float()
        s = plan.scale
        xs = x if s is None else x / s
        if self.cfg.method_impl.loss_quantizes_activations:
            inp = static_input_scale(cap.absmax, s).to(x.device) if plan.act_mode == "per-tensor" else None
            xs = fake_quantize_activation_fast(xs, plan.act_mode, inp)
        clips = {}
        for n in g.linears:
            if self.skip(n):
                continue
            w = layer.get_submodule(n).weight.detach().float()
            with torch.autocast(x.device.type, enabled=False):  # the reference stays float32
                y_ref = x @ w.t()
            ws = w if s is None else w * s[None, :]
            ratios, before, after = search_row_clip(xs, ws, y_ref, self.table, self.group_size, self.cfg.clip_grid)
            plan.row_clip[n] = ratios
            clips[n] = {"mean": _round(float(ratios.mean())), "loss_vs_no_clip": _round(after / max(before, 1e-30))}
        plan.record["clip"] = clips

    # -- 3. GPTQ's Hessians (after the folds) ------------------------------------------------------
    @torch.no_grad()
    def hessians(self, layer: nn.Module, structure: LayerStructure, plans: dict[str, GroupPlan],
                 caps: dict[str, GroupCapture | None], hidden: list[torch.Tensor], calls: list[LayerCall]) -> dict[str, torch.Tensor]:
        """``2 X^T X / n`` per group over every calibration batch, ``X`` as the deployed kernel sees it."""
        from w4a8_dint.reference import fake_quantize_activation

        quantized = self.cfg.gptq_hessian_inputs == "quantized"
        sums: dict[str, torch.Tensor] = {}
        tokens: dict[str, int] = {}
        handles = []
        for g in structure.groups:
            if all(self.skip(n) for n in g.linears):
                continue
            p = plans[g.name]
            smooth = p.scale if p.scale is not None and g.fold == FOLD_EXPLICIT else None  # folded scales are in x already
            input_scale = static_input_scale(caps[g.name].absmax, p.scale) if p.act_mode == "per-tensor" else None

            def pre(mod, args, name=g.name, smooth=smooth, input_scale=input_scale, act_mode=p.act_mode):
                x = args[0].float()
                if smooth is not None:
                    x = x / smooth.to(x.device)
                if quantized:
                    x = fake_quantize_activation(x, act_mode, None if input_scale is None else input_scale.to(x.device))
                sums[name] = accumulate_hessian(sums.get(name), x)
                tokens[name] = tokens.get(name, 0) + x.numel() // x.shape[-1]

            handles.append(layer.get_submodule(g.linears[0]).register_forward_pre_hook(pre))
        try:
            for h, call in zip(hidden, calls):
                call(layer, h)
        finally:
            for hd in handles:
                hd.remove()
        return {name: finalize_hessian(sums[name], tokens[name]) for name in sums}

    # -- 4. apply + 5. propagate --------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, layer: nn.Module, layer_name: str, structure: LayerStructure, hidden: list[torch.Tensor],
                  calls: list[LayerCall], probe: torch.Tensor, probe_call: LayerCall) -> LayerResult:
        collect = self.cfg.needs_activations
        keep_fp = self.cfg.propagate == "float" or not collect
        next_probe_fp = probe_call(layer, probe) if keep_fp else None  # float output, before any change
        if collect:
            caps, fp_outputs, fp_first = self.capture(layer, layer_name, structure, hidden, calls, keep_fp)
        else:  # nothing to measure: no calibration forward (the probe above feeds the next layer's structure)
            caps, fp_outputs, fp_first = {g.name: None for g in structure.groups}, [], None
        plans = {g.name: self.plan(layer, g, caps[g.name]) for g in structure.groups}

        for g in structure.groups:
            p = plans[g.name]
            if p.scale is not None:
                fold_into_source(layer, g, p.scale)
                scale_linear_inputs(layer, g, p.scale)

        hessians = self.hessians(layer, structure, plans, caps, hidden, calls) if self.cfg.rounding_impl.needs_hessian else {}
        tensors: dict[str, torch.Tensor] = {}
        policies: dict[str, LayerPolicy] = {}
        hooks = []
        quantized_weights: set[str] = set()
        for g in structure.groups:
            p = plans[g.name]
            explicit = p.scale is not None and g.fold == FOLD_EXPLICIT
            input_scale = static_input_scale(caps[g.name].absmax, p.scale) if p.act_mode == "per-tensor" else None
            weights = {n: layer.get_submodule(n).weight.detach() for n in g.linears if not self.skip(n)}
            rounded = self.cfg.rounding_impl.quantize_group(weights, self.table, self.group_size, p.row_clip,
                                                            hessians.get(g.name), self.cfg)
            for n, qw in rounded.items():
                lin = layer.get_submodule(n)
                full = f"{layer_name}.{n}"
                tensors.update(quantized_weight_tensors(full, qw))  # + weight_group_mult for two-level scales
                if input_scale is not None:
                    tensors[f"{full}.{INPUT_SCALE}"] = input_scale.clone()
                if explicit:
                    tensors[f"{full}.{SMOOTH_SCALE}"] = p.scale.float().cpu().clone()
                policies[full] = LayerPolicy(act_mode=p.act_mode, smooth=explicit)
                quantized_weights.add(f"{n}.weight")
                lin.weight.data = qw.dequantize(torch.float32).to(lin.weight.device)
                hooks.append(lin.register_forward_pre_hook(
                    _act_quant_hook(p.act_mode, input_scale, p.scale if explicit else None)))
        for n, prm in layer.named_parameters():
            if n not in quantized_weights:
                tensors[f"{layer_name}.{n}"] = prm.detach().cpu().clone()

        quantized_probe = self.cfg.propagate == "quantized" or not collect
        try:
            if not collect:
                next_hidden, q_first = [], None
            elif self.cfg.propagate == "quantized":
                next_hidden = [call(layer, h) for h, call in zip(hidden, calls)]
                q_first = next_hidden[0]
            else:
                next_hidden = fp_outputs
                q_first = calls[0](layer, hidden[0])
            next_probe = probe_call(layer, probe) if quantized_probe else next_probe_fp
        finally:
            for hd in hooks:
                hd.remove()
        for h in next_hidden:
            if not torch.isfinite(h).all():
                raise CalibrationError(f"{layer_name}: non-finite outputs after quantization")
        record: dict[str, Any] = {}
        if collect:
            delta_fp = (fp_first - hidden[0]).float()
            rel = float((q_first.float() - fp_first.float()).pow(2).sum() / delta_fp.pow(2).sum().clamp(min=1e-30))
            record["layer_rel_error"] = _round(rel)
        else:  # the probe (a few tokens, traced for structure) is all this run computed
            delta_fp = (next_probe_fp - probe).float()
            rel = float((next_probe.float() - next_probe_fp.float()).pow(2).sum() / delta_fp.pow(2).sum().clamp(min=1e-30))
            record["probe_rel_error"] = _round(rel)
        record["groups"] = [plans[g.name].record for g in structure.groups]
        return LayerResult(tensors, policies, record, next_hidden, next_probe)


def _act_quant_hook(act_mode: str, input_scale: torch.Tensor | None, smooth: torch.Tensor | None):
    def hook(mod, args):
        x = args[0]
        if smooth is not None:
            x = x / smooth.to(x.device, x.dtype)
        scale = None if input_scale is None else input_scale.to(x.device)
        return (fake_quantize_activation_fast(x, act_mode, scale), *args[1:])

    return hook
