"""Offline rotation folded into the weights (QuaRot / SpinQuant style, no online op): ``--rotate hadamard``.

An orthogonal change of basis that the model cannot see (its float logits stay the same) but the
quantizer can: activation outliers concentrated in a few channels are spread over all of them,
so per-token INT8 scales and 4-bit weight scales cover less empty range. Only rotations that can
be **folded into existing weights** are applied, so the result is a standard architecture (same
``config.json`` class, no new runtime op) that the calibrator, HF and vLLM load as usual.

What is valid where (the logits check in :func:`rotate_model_dir` enforces it on every run):

* **Residual stream** ``x -> x Q`` (hidden x hidden). Valid when every write into the residual
  stream comes straight from a linear (o_proj, down_proj: rotate their output rows) and every read
  goes through an RMSNorm whose elementwise weight is first folded into the linears after it
  (RMS is rotation invariant; the elementwise weight is not, so it must go). Llama-family
  (llama, mistral, qwen2/3): pre-norm only -> valid. The embedding is rotated too (a scalar
  embedding scale, Gemma's ``sqrt(hidden)``, commutes); the final norm is folded into ``lm_head``,
  which therefore has to be **untied** from the embedding when they were tied (SmolLM2 is).
  **Gemma3: invalid.** Its ``post_attention_layernorm`` / ``post_feedforward_layernorm`` act on the
  sublayer outputs *before* the residual add: ``out = x_hat * (1 + w)`` with no linear after it,
  so a rotated ``out Q`` would need ``(1 + w)`` to commute with ``Q``, i.e. a uniform weight. No
  residual rotation is done there, and therefore no norm folding either (it is needed only to let
  a residual rotation through; on its own it would just move the norm's scale from the
  activations into the weight columns).
* **Per head, v_proj -> o_proj**: ``V_h -> V_h H`` and the o_proj columns of every head reading
  it ``-> H^T``; attention mixes tokens, not head dimensions, so this is exact (GQA: the same
  ``H`` for every head). Valid for both families (neither has a norm on v).
* **Not done (each would need an online op):** the down_proj input (the SiLU/GELU product does
  not commute with a rotation: QuaRot's online Hadamard R4), q/k (RoPE sits between the
  projection and the dot product; Gemma3's per-head q_norm/k_norm weights likewise), Gemma3's
  q_norm/k_norm and post-norms (no linear to fold into).

The matrices: ``Q = diag(s) H / sqrt(n)`` with random signs ``s`` (seeded) and ``H`` a Hadamard
matrix: Sylvester for powers of two, else a Kronecker product ``H_b x Sylvester(n / b)`` with ``b``
from Paley's construction I (order ``q + 1``, ``q`` a prime = 3 mod 4) or the matrices the
``exllamav3`` package ships (52, 92, 100, ...: none of them fits 576 or 640). SmolLM2's 576 =
Paley(72) x Sylvester(8); Gemma3's 640 = Paley(20) x Sylvester(32) (not rotated, see above).
Where no Hadamard matrix of that order is found, the odd factor gets a seeded random orthogonal
matrix (QR of a Gaussian) instead; the record says which was used.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

ROTATIONS = ("none", "hadamard")
PROBE_TOKENS = 64  # random token ids of the built-in logits check
PROBE_TOLERANCE = 1e-3  # max |d logits| / max |logits| in float32; a wrong fold gives O(1)
_LLAMA_PARTS = {"attn_in": ("q_proj", "k_proj", "v_proj"), "mlp_in": ("gate_proj", "up_proj")}


class RotationError(ValueError):
    """A model the rotation cannot handle, or a rotation that changed the float model's output."""


# -- orthogonal matrices -------------------------------------------------------------------------

def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def sylvester(n: int) -> torch.Tensor:
    """The +-1 Sylvester Hadamard matrix of order ``n`` (a power of two)."""
    if not _is_power_of_two(n):
        raise RotationError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h, base)
    return h


def paley(order: int) -> torch.Tensor:
    """Paley construction I: a +-1 Hadamard matrix of order ``q + 1`` for a prime ``q = 3 (mod 4)``."""
    q = order - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise RotationError(f"Paley construction I needs order q + 1 with q a prime = 3 mod 4, got {order}")
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in residues else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i), skew-symmetric
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(order, dtype=torch.float64)


@lru_cache(maxsize=None)
def _exllamav3_sizes() -> dict[int, Path]:
    from w4a8_dint.embedded import DataUnavailable, package_dir

    try:
        folder = package_dir("exllamav3") / "util" / "hadamard_data"
    except DataUnavailable:
        return {}
    return {int(p.stem.split("_")[1]): p for p in folder.glob("hadamard_*.txt") if p.stem.split("_")[1].isdigit()}


def _exllamav3_hadamard(n: int) -> torch.Tensor:
    rows = [line.strip() for line in _exllamav3_sizes()[n].read_text().splitlines() if line.strip()]
    return torch.tensor([[1.0 if c == "+" else -1.0 for c in row] for row in rows], dtype=torch.float64)


def _hadamard_bases(n: int) -> list[tuple[int, str]]:
    """Orders ``b`` (not powers of two) with a known Hadamard matrix such that ``n / b`` is a power of two."""
    bases = {b: "exllamav3" for b in _exllamav3_sizes() if b > 1}
    bases.update({q + 1: "Paley" for q in range(3, n, 4) if _is_prime(q)})
    return sorted((b, src) for b, src in bases.items()
                  if not _is_power_of_two(b) and n % b == 0 and _is_power_of_two(n // b))


def hadamard(n: int) -> tuple[torch.Tensor, str] | None:
    """A +-1 Hadamard matrix of order ``n`` and how it was built, or None when none is known here."""
    if _is_power_of_two(n):
        return sylvester(n), f"Sylvester({n})"
    for b, src in _hadamard_bases(n):  # the smallest base: any Hadamard matrix spreads equally well
        base = paley(b) if src == "Paley" else _exllamav3_hadamard(b)
        return torch.kron(base, sylvester(n // b)), f"{src}({b}) x Sylvester({n // b})"
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed so the draw is unique)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def random_hadamard(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """Orthogonal ``Q = diag(s) H / sqrt(n)`` (float64) with seeded random signs ``s``, and its description.

    Without a Hadamard matrix of order ``n``: ``H = Sylvester(2^a) x R`` with ``R`` a seeded random
    orthogonal matrix of the odd factor (not a Hadamard matrix: its entries are not all equal in size).
    """
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    found = hadamard(n)
    if found is not None:
        h, how = found
        return signs[:, None] * h / n**0.5, f"random-sign Hadamard {n} = {how}"
    two = n & -n
    odd = n // two
    h = torch.kron(sylvester(two) / two**0.5, random_orthogonal(odd, generator))
    return signs[:, None] * h, f"random-sign Sylvester({two}) x seeded random orthogonal({odd}) (no Hadamard of order {n} known here)"


# -- the model's parts ---------------------------------------------------------------------------

@dataclass
class _Layer:
    attn_norm: nn.Module
    attn_in: list[nn.Linear]  # q, k, v
    v: nn.Linear
    o: nn.Linear
    mlp_norm: nn.Module  # the norm before the MLP (Llama: post_attention_layernorm; Gemma3: pre_feedforward_layernorm)
    mlp_in: list[nn.Linear]  # gate, up
    down: nn.Linear
    head_dim: int


def _get(module: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        raise RotationError(f"{where}: no module {path!r}; rotation supports Llama-family and Gemma3 layouts "
                            "(self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, RMSNorms)") from None


def _layer(layer: nn.Module, where: str) -> _Layer:
    attn = _get(layer, "self_attn", where)
    if hasattr(attn, "v_norm"):
        raise RotationError(f"{where}: a norm on v (v_norm) blocks the v/o rotation")
    lin = {name: _get(layer, f"{part}.{name}", where)
           for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
           for name in names}
    for name, m in lin.items():
        if not isinstance(m, nn.Linear):
            raise RotationError(f"{where}.{name} is a {type(m).__name__}, not an nn.Linear")
    pre_mlp = "pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm") else "post_attention_layernorm"
    head_dim = int(getattr(attn, "head_dim", 0) or 0)
    if head_dim <= 0 or lin["v_proj"].out_features % head_dim or lin["o_proj"].in_features % head_dim:
        raise RotationError(f"{where}: cannot read the head size (self_attn.head_dim = {head_dim})")
    return _Layer(_get(layer, "input_layernorm", where), [lin[n] for n in _LLAMA_PARTS["attn_in"]], lin["v_proj"],
                  lin["o_proj"], _get(layer, pre_mlp, where), [lin[n] for n in _LLAMA_PARTS["mlp_in"]], lin["down_proj"],
                  head_dim)


def _has_post_norms(layer: nn.Module) -> bool:
    """Gemma2/3-style sandwich norms: a norm on each sublayer's output before the residual add."""
    return hasattr(layer, "post_feedforward_layernorm")


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float:
    """1.0 for a norm computing ``x_hat * (1 + w)`` (Gemma), 0.0 for ``x_hat * w`` (Llama), measured.

    Only RMSNorms with one weight vector are accepted: a mean-centring LayerNorm or a bias would
    need more than a fold (QuaRot's LayerNorm -> RMSNorm conversion is not done here).
    """
    params = dict(norm.named_parameters())
    if set(params) != {"weight"} or params["weight"].dim() != 1:
        raise RotationError(f"{type(norm).__name__}: only RMSNorms with a single weight vector can be folded, "
                            f"found parameters {sorted(params)}")
    probe = copy.deepcopy(norm).float()
    probe.weight.zero_()
    x = torch.randn(4, params["weight"].numel(), generator=torch.Generator().manual_seed(0))
    y = probe(x).float()
    rms_normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    if y.abs().max() < 1e-6:
        return 0.0
    if torch.allclose(y, rms_normed, rtol=1e-4, atol=1e-5):
        return 1.0
    raise RotationError(f"{type(norm).__name__} is neither x_hat * w nor x_hat * (1 + w): not an RMSNorm this fold understands")


# -- the transforms (float64 math, written back in the parameter's dtype) --------------------------

def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def fold_norm(norm: nn.Module, linears: list[nn.Module], offset: float) -> None:
    """``linear(norm(x)) == linear'(norm'(x))`` with the norm's elementwise weight moved into the linears' columns."""
    scale = offset + norm.weight.detach().double()
    for lin in linears:
        _assign(lin.weight, lin.weight.detach().double() * scale[None, :])
    _assign(norm.weight, torch.full_like(scale, 1.0 - offset))


def _rotate_input(lin: nn.Linear, q: torch.Tensor) -> None:
    """The linear now reads ``x Q``: ``W -> W Q``."""
    _assign(lin.weight, lin.weight.detach().double() @ q)


def _rotate_output(lin: nn.Module, q: torch.Tensor) -> None:
    """The linear (or embedding row) now writes ``y Q``: ``W -> Q^T W`` (embedding ``E -> E Q``), bias ``b -> b Q``."""
    w = lin.weight.detach().double()
    _assign(lin.weight, w @ q if isinstance(lin, nn.Embedding) else q.T @ w)
    if getattr(lin, "bias", None) is not None:
        _assign(lin.bias, lin.bias.detach().double() @ q)


def _rotate_heads(layer: _Layer, h: torch.Tensor) -> None:
    """``V_h -> V_h H`` for every kv head, and o_proj's columns of every attention head ``-> H^T`` (exact: per head)."""
    d = layer.head_dim
    wv = layer.v.weight.detach().double()
    _assign(layer.v.weight, torch.einsum("ji,njk->nik", h, wv.reshape(-1, d, wv.shape[1])).reshape(wv.shape))
    if layer.v.bias is not None:
        _assign(layer.v.bias, (layer.v.bias.detach().double().reshape(-1, d) @ h).reshape(-1))
    wo = layer.o.weight.detach().double()
    _assign(layer.o.weight, (wo.reshape(wo.shape[0], -1, d) @ h).reshape(wo.shape))


def _untie(model: nn.Module) -> bool:
    """Give lm_head its own weight when it shares the embedding's; True when it did."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is not emb.weight and head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    return True


def _parts(model: nn.Module) -> tuple[nn.Module, list[_Layer]]:
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise RotationError(f"{type(model).__name__}: expected a decoder-only LM with .model.layers and .model.norm")
    return base, [_layer(layer, f"model.layers.{i}") for i, layer in enumerate(base.layers)]


@torch.no_grad()
def rotate_residual(model: nn.Module, generator: torch.Generator) -> dict[str, Any]:
    """Fold every pre-norm into the linears after it, untie lm_head if needed, rotate the residual stream.

    Exact only without post-norms (``rotate_model`` checks; the tests call this on Gemma3 to show
    that it is not exact there).
    """
    base, layers = _parts(model)
    offset = norm_offset(base.norm)
    untied = _untie(model)
    for layer in layers:
        fold_norm(layer.attn_norm, layer.attn_in, offset)
        fold_norm(layer.mlp_norm, layer.mlp_in, offset)
    fold_norm(base.norm, [model.get_output_embeddings()], offset)
    hidden = base.norm.weight.numel()
    q, how = random_hadamard(hidden, generator)
    _rotate_output(model.get_input_embeddings(), q)
    for layer in layers:
        for lin in (*layer.attn_in, *layer.mlp_in):
            _rotate_input(lin, q)
        _rotate_output(layer.o, q)
        _rotate_output(layer.down, q)
    _rotate_input(model.get_output_embeddings(), q)
    return {"residual": {"rotated": True, "size": hidden, "matrix": how},
            "folded_norms": ["input_layernorm -> q_proj, k_proj, v_proj", "pre-MLP norm -> gate_proj, up_proj",
                             "model.norm -> lm_head"],
            "norm_weight_offset": offset, "untied_embeddings": untied}


@torch.no_grad()
def rotate_heads(model: nn.Module, generator: torch.Generator) -> dict[str, Any]:
    """The per-head Hadamard between v_proj and o_proj, in every layer."""
    _, layers = _parts(model)
    heads = {d: random_hadamard(d, generator) for d in sorted({layer.head_dim for layer in layers})}
    for layer in layers:
        _rotate_heads(layer, heads[layer.head_dim][0])
    return {"per_head": {"where": "v_proj -> o_proj", "matrix": "; ".join(how for _, how in heads.values())}}


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Rotate an HF causal LM in place (see the module docstring); returns the record for quantization_config."""
    base, _ = _parts(model)
    gen = torch.Generator().manual_seed(seed)
    record: dict[str, Any] = {"method": "hadamard", "seed": seed}
    if any(_has_post_norms(layer) for layer in base.layers):
        record.update(residual={"rotated": False, "reason": (
            "post_attention_layernorm / post_feedforward_layernorm scale the sublayer outputs elementwise before the "
            "residual add with no linear after them; a residual rotation would need an online op")},
            folded_norms=[], untied_embeddings=False)
    else:
        record.update(rotate_residual(model, gen))
    record.update(rotate_heads(model, gen))
    record["not_rotated"] = ["down_proj input (needs an online Hadamard after the activation)",
                             "q/k (RoPE between projection and dot product: needs an online op)"]
    return record


# -- directories ---------------------------------------------------------------------------------

def _source_dtype(model_dir: Path) -> torch.dtype:
    from w4a8_dint.contract import read_hf_config  # the one config reader (errors name the file)

    cfg = read_hf_config(model_dir)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _probe_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def max_rel_logit_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |a|``: the invariance measure the tests and the built-in check use."""
    return float((a - b).abs().max() / a.abs().max())


@torch.no_grad()
def rotate_model_dir(src: str | Path, out: str | Path, method: str = "hadamard", seed: int = 0,
                     trust_remote_code: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Rotate the float HF model in ``src`` and write it to ``out`` (safetensors, written atomically).

    The math runs in float64 on a float32 copy; a probe of random tokens checks that the float32
    logits did not move (``PROBE_TOLERANCE``) before anything is written. Weights are saved in
    the source dtype. Returns the record (also what ``quantization_config.rotation`` holds).
    """
    if method != "hadamard":
        raise RotationError(f"rotation must be one of {ROTATIONS[1:]} here, got {method!r}")
    from transformers import AutoModelForCausalLM

    from w4a8_dint.checkpoint import SIDE_FILES, atomic_directory

    src = Path(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(seed))
    before = _probe_logits(model, ids)
    record = rotate_model(model, seed)
    err = max_rel_logit_error(before, _probe_logits(model, ids))
    if not err < PROBE_TOLERANCE:
        raise RotationError(f"rotation changed the float logits of {src} by {err:.2e} (relative), over {PROBE_TOLERANCE}: "
                            "this architecture has an op the rotation does not commute with")
    record["probe_max_rel_logit_error"] = float(f"{err:.3g}")
    model.to(_source_dtype(src))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        for name in SIDE_FILES:
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)
    return record


@contextlib.contextmanager
def rotated_source(model_dir: Path, out: Path, method: str, seed: int,
                   trust_remote_code: bool = False) -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """For ``calibrate``: yield ``(dir to calibrate, rotation record)``; the rotated copy is a temp dir
    next to ``out`` (named like the calibrator's layer spill, so a killed run's leftover is
    cleaned up by the next run's preflight) and is removed on exit. ``none`` yields the source."""
    if method not in ROTATIONS:
        raise RotationError(f"rotation must be one of {ROTATIONS}, got {method!r}")
    if method == "none":
        yield model_dir, None
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.layers-rotated-", dir=out.parent))
    try:
        record = rotate_model_dir(model_dir, tmp / "model", method, seed, trust_remote_code)
        yield tmp / "model", record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
