"""Scale and clip computations as pure functions over tensors.

Smoothing identity: ``X W^T == (X / s) (W * s)^T`` for a per-input-channel ``s`` (``W`` is
``[N, K]``, ``s`` is ``[K]``). Methods differ in how they pick ``s``:

* **SmoothQuant** ``s = max|X_j|^a / max|W_j|^(1-a)`` with a fixed ``a`` (0.5);
* **AWQ** searches ``a`` on the grid for ``s = mean|X_j|^a / mean|W_j|^(1-a)`` ("duo scaling",
  ``W`` normalized by its group absmax first, as AutoAWQ does), loss with the *weights* quantized;
* **AQAS** searches both families (mean- and max-based) plus ``s = 1`` with a loss in which the
  weights are quantized to the 4-bit format *and* the input to INT8 in the deployed mode;
* **FPTQ LAE** ``s = max|X_j| / log2(2 + max|X_j|)``, no weight term, no search.

Every ``s`` is sanitized (finite, in ``[1e-4, 1e4]``) and, except LAE, normalized by
``sqrt(max(s) min(s))`` like AWQ: both quantizers are scale-equivariant, so a common factor
changes nothing but keeps folded norm weights in a sane range.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from w4a8_dint.formats import CodeTable, QuantizedWeight, absmax_scales, quantize_weight, resolve_group_size
from w4a8_dint.reference import INT8_MAX, act_scale_from_absmax

_EPS = 1e-8


# -- statistics -------------------------------------------------------------------------------

def weight_channel_stats(weights: Sequence[torch.Tensor], group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input channel ``(mean |W_hat|, max |W|)`` over the rows of all weights sharing the input.

    ``W_hat`` is ``|W|`` divided by its quantization group's absmax (AutoAWQ's normalization):
    it measures how large a channel is *relative to what the quantizer's scale must cover*.
    """
    w = torch.cat([x.float() for x in weights], dim=0)
    n, k = w.shape
    g = resolve_group_size(k, group_size)
    a = w.abs().reshape(n, k // g, g)
    normalized = (a / a.amax(dim=-1, keepdim=True).clamp(min=_EPS)).reshape(n, k)
    return normalized.mean(dim=0), w.abs().amax(dim=0)


# -- scale families ------------------------------------------------------------------------------

def sanitize(s: torch.Tensor) -> torch.Tensor:
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.clamp(1e-4, 1e4)


def normalize(s: torch.Tensor) -> torch.Tensor:
    s = sanitize(s)
    return s / (s.max() * s.min()).sqrt()


def awq_scale(x_absmean: torch.Tensor, w_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    return normalize(x_absmean.clamp(min=_EPS).pow(alpha) / w_absmean.clamp(min=_EPS).pow(1.0 - alpha))


def smoothquant_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    return normalize(x_absmax.clamp(min=_EPS).pow(alpha) / w_absmax.clamp(min=_EPS).pow(1.0 - alpha))


def lae_scale(x_absmax: torch.Tensor) -> torch.Tensor:
    """FPTQ's logarithmic activation equalization: after it, channel j's range is ``log2(2 + max|X_j|)``."""
    m = x_absmax.float().clamp(min=_EPS)
    return sanitize(m / torch.log2(2.0 + m))


@dataclass(frozen=True)
class ScaleStats:
    """What the scale families need about one smoothing group."""

    x_absmean: torch.Tensor  # [K]
    x_absmax: torch.Tensor  # [K]
    w_absmean: torch.Tensor  # [K] (group-normalized, see weight_channel_stats)
    w_absmax: torch.Tensor  # [K]


def family_scale(family: str, alpha: float, st: ScaleStats) -> torch.Tensor:
    if family == "mean":
        return awq_scale(st.x_absmean, st.w_absmean, alpha)
    if family == "max":
        return smoothquant_scale(st.x_absmax, st.w_absmax, alpha)
    raise ValueError(f"unknown scale family {family!r}")


# -- the alpha search ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ScaleChoice:
    family: str  # "mean" | "max" | "none" (s = 1)
    alpha: float
    scale: torch.Tensor  # [K]
    loss: float
    identity_loss: float  # loss of s = 1 under the same objective (how much smoothing bought)
    evaluations: int


def coarse_points(n: int) -> list[int]:
    """Grid indices evaluated first: every other point, always including both ends (all when n <= 6)."""
    if n <= 6:
        return list(range(n))
    return sorted(set(range(0, n, 2)) | {n - 1})


def search_scale(
    families: Sequence[str], grid: Sequence[float], stats: ScaleStats,
    loss: Callable[[torch.Tensor], float], constrain: Callable[[torch.Tensor], torch.Tensor] = lambda s: s,
    full_grid: bool = False,
) -> ScaleChoice:
    """Pick ``s`` minimizing ``loss(s)`` over ``s = 1`` and, per family, the alpha grid.

    Coarse-to-fine (default): the coarse points, then the two grid neighbours of the best of them.
    """
    grid = sorted(set(float(a) for a in grid))
    ones = torch.ones_like(stats.x_absmax, dtype=torch.float32)
    identity_loss = loss(ones)
    best = ScaleChoice("none", 0.0, ones, identity_loss, identity_loss, 1)
    evaluations = 1
    for family in families:
        losses: dict[int, float] = {}

        def evaluate(indices) -> None:
            nonlocal best, evaluations
            for i in indices:
                if i in losses or not 0 <= i < len(grid):
                    continue
                s = normalize(constrain(family_scale(family, grid[i], stats)))
                losses[i] = loss(s)
                evaluations += 1
                if losses[i] < best.loss:
                    best = ScaleChoice(family, grid[i], s, losses[i], identity_loss, 0)

        evaluate(range(len(grid)) if full_grid else coarse_points(len(grid)))
        i_best = min(losses, key=losses.get)
        evaluate((i_best - 1, i_best + 1))
    return replace(best, evaluations=evaluations)


# -- weights --------------------------------------------------------------------------------------

def row_clip_scales(w: torch.Tensor, table: CodeTable, group_size: int, row_clip: torch.Tensor | None) -> torch.Tensor:
    """Absmax group scales ``[N, K // G]`` with row ``n`` shrunk by ``row_clip[n]``."""
    scales = absmax_scales(w, table, group_size)
    if row_clip is not None:
        scales = scales * row_clip.to(scales.device, scales.dtype)[:, None]
    return scales


@functools.lru_cache(maxsize=None)
def _rounding_grid(table: CodeTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted used values and the midpoints between them, derived from the format's table."""
    vals = torch.tensor(sorted(table.values[c] for c in table.used_codes), dtype=torch.float32)
    return vals, (vals[1:] + vals[:-1]) / 2


def fake_quantize_weight(w: torch.Tensor, table: CodeTable, group_size: int, row_clip: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize (float32) with optional per-row clip ratios; the search's hot path.

    Bit-identical to ``quantize_rows(...).dequantize()`` (a test checks every format and group
    size) with a third of the memory passes: scales from one ``aminmax`` with the same
    arithmetic as ``formats.absmax_scales``, one ``bucketize`` straight to values, and the
    tie rule of ``formats.round_to_codes`` (an exact tie goes toward zero) obtained by nudging
    negative inputs one ulp up, so that their ties land on the upper (smaller-magnitude) value.
    The weights were checked finite when loaded, so no finiteness pass here.
    """
    n, k = w.shape
    g = resolve_group_size(k, group_size)
    wg = w.float().reshape(n, k // g, g)
    lo, hi = torch.aminmax(wg, dim=-1)
    scales = torch.maximum(hi.clamp(min=0) / table.max_positive, (-lo).clamp(min=0) / table.max_negative) * 1.0
    if row_clip is not None:
        scales = scales * row_clip.to(scales.device, scales.dtype)[:, None]
    scales = scales.unsqueeze(-1)
    vals, mids = (t.to(w.device) for t in _rounding_grid(table))
    x = wg / torch.where(scales > 0, scales, torch.ones_like(scales))
    x = torch.where(x < 0, torch.nextafter(x, torch.tensor(math.inf, device=x.device)), x)
    return (vals[torch.bucketize(x, mids, out_int32=True)] * scales).reshape(n, k)


def quantize_rows(w: torch.Tensor, table: CodeTable, group_size: int, row_clip: torch.Tensor | None = None) -> QuantizedWeight:
    g = resolve_group_size(w.shape[1], group_size)
    return quantize_weight(w.float(), table, g, scales=row_clip_scales(w.float(), table, g, row_clip))


def search_row_clip(
    x: torch.Tensor, w: torch.Tensor, y_ref: torch.Tensor, table: CodeTable, group_size: int, grid: Sequence[float],
) -> tuple[torch.Tensor, float, float]:
    """Per output channel clip ratio minimizing ``||x @ Q(w, r)^T - y_ref||^2`` over the tokens.

    ``x [T, K]`` is what the deployed linear sees (INT8-fake-quantized for AQAS, float for AWQ),
    ``w [N, K]`` the smoothed float weight, ``y_ref [T, N]`` the float output. Output channels
    are independent given ``x``, so every row takes its own best ratio from one pass per ratio.
    Returns ``(ratios [N], loss at ratio 1, loss at the chosen ratios)``.
    """
    best_err = None
    best = torch.ones(w.shape[0], dtype=torch.float32, device=w.device)
    no_clip = math.nan
    for r in sorted(set(float(v) for v in grid), reverse=True):
        wq = fake_quantize_weight(w, table, group_size, torch.full((w.shape[0],), r, device=w.device))
        err = ((x @ wq.t()) - y_ref).pow(2).sum(dim=0)
        if r == 1.0:
            no_clip = float(err.sum())
        if best_err is None:
            best_err = err
            best[:] = r
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, r), best)
    return best, no_clip, float(best_err.sum())


# -- activations ----------------------------------------------------------------------------------

def static_input_scale(x_absmax: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tensor INT8 scale ``[1]`` of the smoothed input: ``max_j (max|X_j| / s_j) / 127``."""
    m = x_absmax.float() if s is None else x_absmax.float() / s.float()
    v = float(m.max())
    if not math.isfinite(v) or v <= 0:
        v = 1.0  # an input that is always zero: any positive scale quantizes it exactly
    return torch.tensor([v / INT8_MAX], dtype=torch.float32)


def fake_quantize_activation_fast(x: torch.Tensor, act_mode: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``reference.fake_quantize_activation`` with fewer passes (bit-identical; a test checks it).

    round(x / s) clamped to +-127 times s equals the reference's int8 round trip exactly, because
    the int8 cast of an already rounded, clamped value is exact.
    """
    xf = x.float()
    if act_mode == "per-token":
        s = act_scale_from_absmax(xf.abs().amax(dim=-1, keepdim=True))
    elif act_mode == "per-tensor":
        if input_scale is None:
            raise ValueError("per-tensor activation mode needs a calibrated input_scale")
        s = input_scale.float().reshape(())
    else:
        raise ValueError(f"unknown activation mode {act_mode!r}")
    q = (xf / s).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.mul_(s).to(x.dtype)

