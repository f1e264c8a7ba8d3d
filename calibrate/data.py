"""Calibration batches: ``samples`` windows of ``seq_len`` tokens, drawn deterministically from a text.

Held-out rule, so calibration never sees evaluation text: ``ptb`` calibrates on the PTB *train*
split (perplexity is measured on test); ``c4`` and ``wiki`` calibrate on the *second half* of the
shipped sample (perplexity evaluations read from the start). A path (.txt / .jsonl) is used whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from w4a8_dint.embedded import load_text, ptb_text

# Tokenize at most this multiple of the tokens we sample (random windows need room to vary),
# so a large text file is not tokenized whole.
_TOKEN_HEADROOM = 8
_MIN_TOKENS = 100_000
_PIECE_CHARS = 200_000


class CalibrationDataError(ValueError):
    """The calibration text cannot provide the requested windows."""


@dataclass(frozen=True)
class CalibrationData:
    input_ids: torch.Tensor  # long [samples, seq_len]
    dataset: str
    tokens_available: int  # tokens the windows were drawn from

    @property
    def samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def calibration_text(dataset: str) -> str:
    """The text calibration may read for ``dataset`` (held-out parts, see the module docstring)."""
    if dataset == "ptb":
        return ptb_text("train")
    text = load_text(dataset)
    if dataset in ("c4", "wiki"):
        return text[len(text) // 2:]
    return text


def adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def tokenize_text(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """Token ids (1-D long) of the text, without special tokens, stopping once ``max_tokens`` are reached.

    The text is cut into pieces at line breaks, so a long file costs only what is needed.
    """
    ids: list[int] = []
    start = 0
    while start < len(text) and len(ids) < max_tokens:
        end = min(len(text), start + _PIECE_CHARS)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        ids.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return torch.tensor(ids[:max_tokens] if len(ids) > max_tokens else ids, dtype=torch.long)


def sample_windows(token_ids: torch.Tensor, samples: int, seq_len: int, seed: int,
                   bos_token_id: int | None = None, what: str = "text") -> torch.Tensor:
    """``[samples, seq_len]`` windows at random offsets (a ``torch.Generator`` seeded with ``seed``).

    With ``bos_token_id`` every window starts with it (models such as Gemma expect one).
    """
    body = seq_len - (1 if bos_token_id is not None else 0)
    n = token_ids.numel()
    if n < body:
        raise CalibrationDataError(f"{what} has only {n} tokens; a calibration window needs {body}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - body + 1, (samples,), generator=gen)
    windows = torch.stack([token_ids[s: s + body] for s in starts.tolist()])
    if bos_token_id is not None:
        windows = torch.cat([torch.full((samples, 1), bos_token_id, dtype=torch.long), windows], dim=1)
    return windows


def calibration_data(tokenizer, dataset: str, samples: int, seq_len: int, seed: int) -> CalibrationData:
    """Tokenize ``dataset`` (held-out part) and sample the calibration windows."""
    text = calibration_text(dataset)
    if not text.strip():
        raise CalibrationDataError(f"dataset {dataset!r} is empty")
    budget = max(_MIN_TOKENS, _TOKEN_HEADROOM * samples * seq_len)
    ids = tokenize_text(tokenizer, text, budget)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    windows = sample_windows(ids, samples, seq_len, seed, bos, what=f"dataset {dataset!r}")
    return CalibrationData(windows, dataset, ids.numel())
