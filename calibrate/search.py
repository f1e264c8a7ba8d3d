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
from typing import Any

import torch

from w4a8_dint.formats import CodeTable, QuantizedWeight, absmax_scales, pack_codes, resolve_group_size
from w4a8_dint.reference import INT8_MAX, act_scale_from_absmax

_EPS = 1e-8
# Elements per intermediate when candidates / clip ratios are batched (16 MiB of float32): the
# batching saves Python overhead, not arithmetic, so small chunks cost little and bound peak RSS.
BATCH_ELEMENTS = 1 << 22


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


def evaluate_losses(loss: Callable[[torch.Tensor], float], scales: Sequence[torch.Tensor]) -> list[float]:
    """``[loss(s) for s in scales]``, in one batched call when ``loss`` offers ``loss.many([C, K]) -> [C]``.

    ``many`` is an optional attribute of the loss callable, so a plain function stays a valid loss.
    """
    many = getattr(loss, "many", None)
    if many is None or not scales:
        return [loss(s) for s in scales]
    return [float(v) for v in many(torch.stack(list(scales)))]


def search_scale(
    families: Sequence[str], grid: Sequence[float], stats: ScaleStats,
    loss: Callable[[torch.Tensor], float], constrain: Callable[[torch.Tensor], torch.Tensor] = lambda s: s,
    full_grid: bool = False,
) -> ScaleChoice:
    """Pick ``s`` minimizing ``loss(s)`` over ``s = 1`` and, per family, the alpha grid.

    Coarse-to-fine (default): the coarse points, then the two grid neighbours of the best of them.
    Candidates are evaluated in two batches (``s = 1`` and every family's coarse points, then
    every family's refinements; see :func:`evaluate_losses`); the choice is the one a sequential
    scan (s = 1, then family by family, coarse then refinement) makes: the first strict minimum.
    """
    grid = sorted(set(float(a) for a in grid))
    ones = torch.ones_like(stats.x_absmax, dtype=torch.float32)
    first = range(len(grid)) if full_grid else coarse_points(len(grid))

    def candidates(points: dict[str, Sequence[int]]) -> list[tuple[str, int, torch.Tensor]]:
        return [(f, i, normalize(constrain(family_scale(f, grid[i], stats)))) for f in families for i in points[f]]

    coarse = candidates({f: first for f in families})
    coarse_losses = evaluate_losses(loss, [ones] + [c[2] for c in coarse])
    identity_loss, coarse_losses = coarse_losses[0], coarse_losses[1:]
    by_family: dict[str, dict[int, float]] = {f: {} for f in families}
    for (f, i, _), v in zip(coarse, coarse_losses):
        by_family[f][i] = v
    refine = {}
    for f, losses in by_family.items():
        i_best = min(losses, key=losses.get)
        refine[f] = [i for i in (i_best - 1, i_best + 1) if 0 <= i < len(grid) and i not in losses]
    fine = candidates(refine)
    fine_losses = evaluate_losses(loss, [c[2] for c in fine])
    # sequential order: family by family, its coarse points then its refinements
    scanned = sorted(zip(coarse + fine, coarse_losses + fine_losses),
                     key=lambda cv: (families.index(cv[0][0]), cv[0][1] not in by_family[cv[0][0]]))
    best = ScaleChoice("none", 0.0, ones, identity_loss, identity_loss, 1 + len(scanned))
    for (f, i, scale), v in scanned:
        if v < best.loss:
            best = replace(best, family=f, alpha=grid[i], scale=scale, loss=v)
    return best


# -- weights --------------------------------------------------------------------------------------

def row_clip_scales(w: torch.Tensor, table: CodeTable, group_size: int, row_clip: torch.Tensor | None) -> torch.Tensor:
    """Absmax group scales ``[N, K // G]`` with row ``n`` shrunk by ``row_clip[n]``."""
    scales = absmax_scales(w, table, group_size)
    if row_clip is not None:
        scales = scales * row_clip.to(scales.device, scales.dtype)[:, None]
    return scales


@functools.lru_cache(maxsize=None)
def _rounding_grid(table: CodeTable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Used values sorted, their codes, and the midpoints between them, derived from the format's table."""
    order = sorted(table.used_codes, key=lambda c: table.values[c])
    vals = torch.tensor([table.values[c] for c in order], dtype=torch.float32)
    return vals, torch.tensor(order, dtype=torch.uint8), (vals[1:] + vals[:-1]) / 2


@functools.lru_cache(maxsize=None)
def _rounding_lut(table: CodeTable) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Value and code lookups for ``x`` by ``c = ceil(4 |x|)`` (``+ L`` for negative ``x``): ``(values [2L], codes [2L], L)``.

    Values are multiples of 1/2 (``half_values`` are integers), so every midpoint ``m`` is a
    multiple of 1/4 and ``4 m`` an integer: with ``u = 4 x`` (exact), rounding to the nearest
    value with ties toward zero picks index ``#{m : 4m < u}`` for ``x >= 0`` and ``#{m : 4m <= u}``
    for ``x < 0``, i.e. ``#{4m <= c - 1}`` resp. ``#{4m <= -c}``: a function of ``c`` and the sign.
    """
    vals, codes, mids = _rounding_grid(table)
    m4 = mids * 4
    if not torch.equal(m4, m4.round()):
        raise ValueError(f"{table.name}: values must be multiples of 1/2")
    L = int(m4.abs().max()) + 2  # c >= L - 1 is beyond every midpoint on both sides
    c = torch.arange(L, dtype=torch.float32)
    index = torch.cat([(m4[None, :] <= (c - 1)[:, None]).sum(dim=1), (m4[None, :] <= -c[:, None]).sum(dim=1)])
    return vals[index], codes[index], L


def _lut_index_(x: torch.Tensor, L: int) -> torch.Tensor:
    """``ceil(4 |x|)`` saturated at ``L - 1``, ``+ L`` where ``x < 0``, as int32; overwrites ``x``."""
    negative = x < 0
    c = x.abs_().mul_(4).ceil_().clamp_(max=L - 1)
    c.add_(negative, alpha=L)
    return c.to(torch.int32)


def _round_to_values_(x: torch.Tensor, table: CodeTable) -> torch.Tensor:
    """Nearest table value of ``x`` (ties toward zero, beyond the table saturates); overwrites ``x``.

    Same result as ``formats.round_to_codes`` + decode (a test checks every format and every tie)
    at about a quarter of the cost of ``bucketize``: a few in-place passes and one gather.
    """
    lut, _, L = _rounding_lut(table)
    return lut.to(x.device)[_lut_index_(x, L)]


def _round_to_codes_(x: torch.Tensor, table: CodeTable) -> torch.Tensor:
    """``formats.round_to_codes(x)`` (uint8 codes) by the same lookup; overwrites ``x``."""
    _, lut, L = _rounding_lut(table)
    return lut.to(x.device)[_lut_index_(x, L)]


def fake_quantize_weight(w: torch.Tensor, table: CodeTable, group_size: int, row_clip: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize (float32) with optional per-row clip ratios; the search's hot path.

    ``w`` is ``[..., N, K]`` (leading dims: candidates evaluated in one call) and ``row_clip``
    broadcasts to ``[..., N]``. Bit-identical to ``quantize_rows(...).dequantize()`` per
    ``[N, K]`` slice (a test checks every format and group size) with far fewer memory passes:
    scales from one ``aminmax`` with the same arithmetic as ``formats.absmax_scales`` and a
    table lookup instead of ``bucketize`` (:func:`_round_to_values_`). The weights were checked
    finite when loaded, so no finiteness pass here.
    """
    *lead, n, k = w.shape
    g = resolve_group_size(k, group_size)
    wg = w.float().reshape(*lead, n, k // g, g)
    lo, hi = torch.aminmax(wg, dim=-1)
    scales = torch.maximum(hi.clamp(min=0) / table.max_positive, (-lo).clamp(min=0) / table.max_negative) * 1.0
    if row_clip is not None:
        scales = scales * row_clip.to(scales.device, scales.dtype)[..., None]
    scales = scales.unsqueeze(-1)
    x = wg / torch.where(scales > 0, scales, torch.ones_like(scales))
    return _round_to_values_(x, table).mul_(scales).reshape(w.shape)


def quantize_rows(w: torch.Tensor, table: CodeTable, group_size: int, row_clip: torch.Tensor | None = None) -> QuantizedWeight:
    """``formats.quantize_weight(w, scales=row_clip_scales(...))`` with the codes from the lookup of
    :func:`_round_to_codes_` instead of ``bucketize`` (bit-identical; a test checks every format)."""
    wf = w.float()
    n, k = wf.shape
    g = resolve_group_size(k, group_size)
    scales = row_clip_scales(wf, table, g, row_clip)
    s = scales.unsqueeze(-1)
    positive = s > 0
    x = wf.reshape(n, k // g, g) / torch.where(positive, s, torch.ones_like(s))
    x = torch.where(positive, x, torch.zeros_like(x))  # a zero-scale group takes the code nearest zero, as formats does
    return QuantizedWeight(pack_codes(_round_to_codes_(x, table).reshape(n, k)), scales.float().contiguous(), table, g)


def search_row_clip(
    x: torch.Tensor, w: torch.Tensor, y_ref: torch.Tensor, table: CodeTable, group_size: int, grid: Sequence[float],
    max_elements: int = BATCH_ELEMENTS,
) -> tuple[torch.Tensor, float, float]:
    """Per output channel clip ratio minimizing ``||x @ Q(w, r)^T - y_ref||^2`` over the tokens.

    ``x [T, K]`` is what the deployed linear sees (INT8-fake-quantized for AQAS, float for AWQ),
    ``w [N, K]`` the smoothed float weight, ``y_ref [T, N]`` the float output. Output channels
    are independent given ``x``, so every row takes its own best ratio. All ratios are quantized
    in one batched call and multiplied in one matmul (chunks of at most ``max_elements`` per
    intermediate); among equal errors the largest ratio wins.
    Returns ``(ratios [N], loss at ratio 1, loss at the chosen ratios)``.
    """
    ratios = sorted(set(float(v) for v in grid), reverse=True)
    (t, k), n = x.shape, w.shape[0]
    per_ratio = max(n * k, t * n)
    errors = []
    for start in range(0, len(ratios), max(1, max_elements // per_ratio)):
        r = torch.tensor(ratios[start:start + max(1, max_elements // per_ratio)], dtype=torch.float32, device=w.device)
        wq = fake_quantize_weight(w.float().expand(len(r), n, k), table, group_size, r[:, None].expand(-1, n))
        y = (x @ wq.reshape(-1, k).t()).float().view(t, len(r), n)  # float: a bf16 search autocasts the matmul
        errors.append(y.sub_(y_ref[:, None, :]).pow_(2).sum(dim=0))
    err = torch.cat(errors)  # [R, N]
    best_err, best = err.min(dim=0)  # the first minimum: the largest ratio among equal errors
    no_clip = float(err[ratios.index(1.0)].sum()) if 1.0 in ratios else math.nan
    return torch.tensor(ratios, dtype=torch.float32, device=w.device)[best], no_clip, float(best_err.sum())


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

    Per tensor, ``input_scale`` is ``[1]`` or, for candidates stacked on a leading dim of ``x``,
    one scale per candidate shaped to broadcast (``[C, 1, ..., 1]``).

    round(x / s) clamped to +-127 times s equals the reference's int8 round trip exactly, because
    the int8 cast of an already rounded, clamped value is exact.
    """
    xf = x.float()
    if act_mode == "per-token":
        s = act_scale_from_absmax(xf.abs().amax(dim=-1, keepdim=True))
    elif act_mode == "per-tensor":
        if input_scale is None:
            raise ValueError("per-tensor activation mode needs a calibrated input_scale")
        # one scale, or one per leading index (candidates) that broadcasts against x
        s = input_scale.float().reshape(()) if input_scale.numel() == 1 else input_scale.float()
    else:
        raise ValueError(f"unknown activation mode {act_mode!r}")
    q = (xf / s).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.mul_(s).to(x.dtype)



# -- candidates in one batch ------------------------------------------------------------------------

def candidate_inputs(x: torch.Tensor, scales: torch.Tensor, act_mode: str | None, x_absmax: torch.Tensor) -> torch.Tensor:
    """``[C, *x.shape]``: ``x / s`` for every candidate ``s`` (rows of ``scales [C, K]``), INT8
    fake-quantized in ``act_mode`` (None: left in float), each exactly as a single candidate's
    ``fake_quantize_activation_fast(x / s, act_mode, static_input_scale(x_absmax, s))``."""
    c, k = scales.shape
    xs = x.float().unsqueeze(0) / scales.float().view(c, *([1] * (x.dim() - 1)), k)
    if act_mode is None:
        return xs
    input_scale = None
    if act_mode == "per-tensor":
        input_scale = torch.cat([static_input_scale(x_absmax, s) for s in scales]).to(x.device).view(c, *([1] * x.dim()))
    return fake_quantize_activation_fast(xs, act_mode, input_scale)


def linear_losses(
    xs: torch.Tensor, scales: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
    target: torch.Tensor, table: CodeTable, group_size: int,
) -> torch.Tensor:
    """Per candidate ``||cat_i(xs_c @ Q(W_i * s_c)^T + b_i) - target||^2``: ``[C]``.

    ``xs [C, ..., K]`` from :func:`candidate_inputs`, ``scales [C, K]``, ``target [..., sum N_i]``.
    Every candidate's weights are quantized in one batched call and multiplied in one batched
    matmul per linear.
    """
    c, k = scales.shape
    x2 = xs.reshape(c, -1, k)
    outs = []
    for w, b in zip(weights, biases):
        wq = fake_quantize_weight(w.float().unsqueeze(0) * scales.float()[:, None, :], table, group_size)
        y = torch.bmm(x2, wq.transpose(1, 2)).float()  # float: a bf16 search autocasts the matmul
        outs.append(y if b is None else y.add_(b.float()))
    out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
    return out.sub_(target.float().reshape(1, -1, out.shape[-1])).pow_(2).sum(dim=(1, 2))


def leading_slice(tree: Any, size: int, keep: int) -> Any:
    """``tree`` (tensors in tuples / lists / dicts) with every tensor whose first dim is ``size``
    cut to its first ``keep`` entries: a call's arguments restricted to its first ``keep``
    sequences. Whoever uses it checks the result (a tensor may have ``size`` rows by chance)."""
    if isinstance(tree, torch.Tensor):
        return tree[:keep] if tree.dim() > 0 and tree.shape[0] == size else tree
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # named tuple
        return type(tree)(*(leading_slice(t, size, keep) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(leading_slice(t, size, keep) for t in tree)
    if isinstance(tree, dict):
        return {k: leading_slice(v, size, keep) for k, v in tree.items()}
    return tree
