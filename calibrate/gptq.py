"""GPTQ onto any 4-bit code table, as pure functions (gpt-fast style).

``H = 2 X^T X / n`` over the inputs the deployed kernel sees (``accumulate_hessian`` streams it
batch by batch), then columns are rounded one at a time, each column's error
``(w - q) / [H^-1]_jj`` pushed onto the columns not yet rounded through the upper Cholesky factor
of ``H^-1`` (Frantar et al., 2022), in blocks of ``block_size`` with lazy updates of the rest.

Rounding is *the* rule of ``formats.round_to_codes`` (nearest table value, ties toward zero) with
group scales fixed before the column loop (GPTQ's static groups: the scales are those of RTN,
or of the method's clip search), so the codes and scales are an ordinary checkpoint the kernels
already run. With ``act_order`` columns are visited in decreasing ``diag(H)``; each keeps its own
(contiguous) group's scale, so the layout does not change.
"""

from __future__ import annotations

import torch

from w4a8_dint.formats import CodeTable, resolve_group_size, round_to_codes

DEFAULT_DAMP = 0.1  # fraction of mean(diag H) added to the diagonal (GPTQ paper: 0.01; see docs/calibrate.md)
DEFAULT_BLOCK = 128


def accumulate_hessian(h_sum: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``h_sum + X^T X`` for inputs ``x [..., K]`` (float32; call :func:`finalize_hessian` after the last batch)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    xtx = x2.t() @ x2
    return xtx if h_sum is None else h_sum.add_(xtx)


def finalize_hessian(h_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    return h_sum * (2.0 / max(tokens, 1))


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, in float64 for stability."""
    h = h.double()
    d = torch.diagonal(h)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    bump = damp * float(d.mean().clamp(min=1e-12))
    for _ in range(8):  # a rank-deficient H (few tokens, K large) may need more than the nominal damping
        chol, info = torch.linalg.cholesky_ex(h + bump * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        bump *= 10
    raise ValueError("GPTQ: the Hessian is not positive definite even with 10^8 x the damping")


def gptq_codes(
    w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, table: CodeTable, group_size: int,
    block_size: int = DEFAULT_BLOCK, damp: float = DEFAULT_DAMP, act_order: bool = False,
) -> torch.Tensor:
    """Codes ``uint8 [N, K]`` for ``w [N, K]`` with fixed ``scales [N, K // G]`` and Hessian ``[K, K]``.

    Deterministic: no randomness, ties in ``act_order`` broken by column index (stable sort).
    """
    n, k = w.shape
    g = resolve_group_size(k, group_size)
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's K={k}")
    if scales.shape != (n, k // g):
        raise ValueError(f"scales shape {tuple(scales.shape)} != {(n, k // g)}")
    w = w.float().clone()
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0  # an input channel that was always zero: its weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp).float()
    col_scale = scales.float()[:, perm // g]  # each column keeps its own (static, contiguous) group's scale
    safe = torch.where(col_scale > 0, col_scale, torch.ones_like(col_scale))
    values = table.value_lut(w.device)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s = w1[:, i], col_scale[:, i1 + i]
            # zero-scale group (all-zero weights): the code nearest zero, exactly as formats.quantize_to_codes
            c = round_to_codes(torch.where(s > 0, col / safe[:, i1 + i], torch.zeros_like(col)), table)
            codes[:, i1 + i] = c
            err = (col - values[c.long()] * s) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


__all__ = ["accumulate_hessian", "finalize_hessian", "gptq_codes", "DEFAULT_DAMP", "DEFAULT_BLOCK"]
