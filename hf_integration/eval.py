"""Offline evaluation: perplexity (PTB, C4, ...) and zero-shot accuracy, for float and W4A8 models alike.

Everything reduces to one primitive, :meth:`Scorer.score`: the summed log-probability
of ``token_ids[score_from:]`` given the tokens before each of them, and whether every
one of them was the argmax. Perplexity windows and multiple-choice answers are both
such requests, and the float model, the W4A8 model, the ``hf`` backend and the
``vllm`` backend all answer the same requests, so their numbers compare.

* Perplexity: the text is tokenized once (no BOS unless ``add_bos``), cut to
  ``max_tokens``, and split into **full** windows of ``seq_len`` tokens starting
  every ``stride`` tokens. The first window scores all its tokens but the first; a
  later window scores only the tokens no earlier window scored (with ``stride ==
  seq_len``: the GPTQ convention, non-overlapping windows, trailing partial window dropped).
* Zero-shot: lm-eval-harness conventions (see ``tasks.py``): ``acc`` = argmax of
  the choices' log-likelihoods, ``acc_norm`` = argmax of log-likelihood / choice
  length in characters, LAMBADA ``acc`` = every target token greedy, ``ppl`` =
  exp(-mean log-likelihood); context and continuation are tokenized the lm-eval way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from w4a8_dint.hf_integration.tasks import TASKS, Doc, get_task, load_docs

PPL_DATASETS = ("ptb", "c4", "wiki")
DEFAULT_TASKS = ("ptb", "c4", "piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "boolq", "lambada")
BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class ScoreRequest:
    token_ids: tuple[int, ...]
    score_from: int  # index of the first scored token (>= 1: token 0 has no context)

    def __post_init__(self) -> None:
        if not 1 <= self.score_from < len(self.token_ids):
            raise ValueError(f"score_from={self.score_from} must be in [1, {len(self.token_ids)})")


@dataclass(frozen=True)
class Score:
    logprob: float  # sum over the scored tokens
    n_tokens: int
    greedy: bool  # every scored token was the model's argmax


class Scorer(Protocol):
    backend: str

    def score(self, requests: Sequence[ScoreRequest], desc: str = "") -> list[Score]: ...

    def close(self) -> None: ...


# -- request building -------------------------------------------------------------------------

def perplexity_requests(ids: Sequence[int], seq_len: int, stride: int | None = None) -> list[ScoreRequest]:
    """Full windows of ``seq_len`` starting every ``stride`` tokens; each token is scored at most once."""
    stride = stride or seq_len
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 2 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    if len(ids) < seq_len:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    requests, scored_until = [], 0
    for begin in range(0, len(ids) - seq_len + 1, stride):
        end = begin + seq_len
        requests.append(ScoreRequest(tuple(ids[begin:end]), max(1, scored_until - begin)))
        scored_until = end
    return requests


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """lm-eval's tokenization: trailing context spaces move to the continuation; the
    continuation's tokens are those of ``context + continuation`` past the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = whole[len(ctx):]
    if add_bos and tokenizer.bos_token_id is not None:
        ctx = [tokenizer.bos_token_id] + ctx
    if not ctx:  # an empty context still needs one token to condition on
        ctx = [tokenizer.eos_token_id]
    return ctx, cont


def choice_request(ctx: list[int], cont: list[int], max_len: int) -> ScoreRequest:
    """``ctx + cont`` left-truncated to ``max_len`` tokens (the continuation always kept)."""
    if not cont:
        raise ValueError("empty continuation")
    ids = (ctx + cont)[-max_len:]
    return ScoreRequest(tuple(ids), max(1, len(ids) - len(cont)))


# -- metrics ------------------------------------------------------------------------------------

def as_scorer(model_or_scorer) -> Scorer:
    """A :class:`Scorer` as is; a transformers causal LM wrapped in :class:`HfScorer`."""
    return model_or_scorer if hasattr(model_or_scorer, "score") else HfScorer(model_or_scorer)


def perplexity(model, tokenizer, text: str, seq_len: int = 512, stride: int | None = None,
               max_tokens: int | None = None, add_bos: bool = False, desc: str = "ppl") -> dict[str, Any]:
    """Perplexity of ``text`` for a model or scorer (see the module docstring for the windowing)."""
    scorer = as_scorer(model)
    if max_tokens is not None:
        # Tokenizing a 1-2 MB text takes seconds; a generous character prefix gives the same first tokens.
        text = text[: max_tokens * 16]
    ids = tokenizer.encode(text, add_special_tokens=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    requests = perplexity_requests(ids, seq_len, stride)
    if add_bos and tokenizer.bos_token_id is not None:
        requests = [ScoreRequest((tokenizer.bos_token_id, *r.token_ids), r.score_from + 1) for r in requests]
    scores = scorer.score(requests, desc=desc)
    nll = -sum(s.logprob for s in scores)
    n = sum(s.n_tokens for s in scores)
    return {"ppl": math.exp(nll / n), "nll_per_token": nll / n, "tokens": n, "windows": len(requests),
            "seq_len": seq_len, "stride": stride or seq_len}


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def score_docs(docs: Sequence[Doc], scores: Sequence[Score], metrics: Sequence[str]) -> dict[str, Any]:
    """Accuracy metrics from per-choice scores (in doc order, choices flattened)."""
    it = iter(scores)
    correct = {m: 0 for m in metrics if m.startswith("acc")}
    loglik_sum = 0.0
    for doc in docs:
        s = [next(it) for _ in doc.continuations]
        ll = [x.logprob for x in s]
        if "ppl" in metrics:  # single-target task (LAMBADA)
            correct["acc"] += int(all(x.greedy for x in s))
            loglik_sum += ll[0]
            continue
        correct["acc"] += int(max(range(len(ll)), key=ll.__getitem__) == doc.gold)
        if "acc_norm" in correct:
            normed = [v / n for v, n in zip(ll, doc.norm_lengths)]
            correct["acc_norm"] += int(max(range(len(ll)), key=normed.__getitem__) == doc.gold)
    n = len(docs)
    out: dict[str, Any] = {"n": n}
    for m, c in correct.items():
        out[m] = c / n
        out[f"{m}_stderr"] = _stderr(c / n, n)
    if "ppl" in metrics:
        out["ppl"] = math.exp(-loglik_sum / n)
    return out


def zero_shot(model, tokenizer, task: str, limit: int | None = None, max_len: int = 2048,
              add_bos: bool = False) -> dict[str, Any]:
    """Zero-shot accuracy of a model or scorer on ``task`` (first ``limit`` docs)."""
    scorer = as_scorer(model)
    spec = get_task(task)
    docs = load_docs(task, limit)
    requests = [
        choice_request(*encode_pair(tokenizer, c, k, add_bos), max_len)
        for doc in docs for c, k in zip(doc.contexts, doc.continuations)
    ]
    return score_docs(docs, scorer.score(requests, desc=task), spec.metrics)


# -- backends -------------------------------------------------------------------------------------

class HfScorer:
    """transformers forward passes, right-padded batches of up to ``batch_tokens`` tokens."""

    backend = "hf"

    def __init__(self, model, batch_tokens: int = 2048, progress: bool = True) -> None:
        self.model = model
        self.batch_tokens = batch_tokens
        self.progress = progress

    def _batches(self, order: list[int], requests: Sequence[ScoreRequest]) -> list[list[int]]:
        batches: list[list[int]] = [[]]
        for i in order:  # longest first, so a batch's padded length is its first element's
            width = len(requests[batches[-1][0]].token_ids) if batches[-1] else len(requests[i].token_ids)
            if batches[-1] and width * (len(batches[-1]) + 1) > self.batch_tokens:
                batches.append([])
            batches[-1].append(i)
        return [b for b in batches if b]

    def score(self, requests: Sequence[ScoreRequest], desc: str = "") -> list[Score]:
        import torch
        from tqdm.auto import tqdm

        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].token_ids))
        out: list[Score | None] = [None] * len(requests)
        device = next(self.model.parameters()).device
        bar = tqdm(total=len(requests), desc=desc or "scoring", disable=not self.progress, leave=False)
        with torch.inference_mode():
            for batch in self._batches(order, requests):
                width = len(requests[batch[0]].token_ids)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, i in enumerate(batch):
                    t = requests[i].token_ids
                    ids[row, : len(t)] = torch.tensor(t)
                    mask[row, : len(t)] = 1
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                for row, i in enumerate(batch):
                    r = requests[i]
                    # logits at position p predict token p + 1
                    lp = torch.log_softmax(logits[row, r.score_from - 1: len(r.token_ids) - 1].float(), dim=-1)
                    target = torch.tensor(r.token_ids[r.score_from:], device=lp.device)
                    tok_lp = lp.gather(-1, target[:, None])[:, 0]
                    greedy = bool((lp.argmax(-1) == target).all())
                    out[i] = Score(float(tok_lp.double().sum()), len(target), greedy)
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None


class VllmScorer:
    """``vllm.LLM`` with ``prompt_logprobs``: the engine scores the prompt, generates one token.

    vLLM starts its engine in a spawned process, so the calling script needs an
    ``if __name__ == "__main__":`` guard (the ``w4a8`` console script has one). On CPU set
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB; defaulted to 1 here) or vLLM tries to reserve most of RAM.
    """

    backend = "vllm"

    def __init__(self, model_path: str, dtype: str = "auto", max_model_len: int = 2048, progress: bool = True,
                 **llm_kwargs: Any) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.max_model_len = max_model_len
        self.progress = progress
        self.llm = LLM(model=str(model_path), dtype=dtype, max_model_len=max_model_len, seed=0, **llm_kwargs)

    def score(self, requests: Sequence[ScoreRequest], desc: str = "") -> list[Score]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        too_long = [len(r.token_ids) for r in requests if len(r.token_ids) >= self.max_model_len]
        if too_long:
            raise ValueError(f"{len(too_long)} requests need more than max_model_len={self.max_model_len} tokens")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        prompts = [TokensPrompt(prompt_token_ids=list(r.token_ids)) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=self.progress)
        scores = []
        for r, o in zip(requests, outputs):
            total, greedy = 0.0, True
            for pos in range(r.score_from, len(r.token_ids)):
                entry = o.prompt_logprobs[pos][r.token_ids[pos]]
                total += entry.logprob
                greedy &= entry.rank == 1
            scores.append(Score(total, len(r.token_ids) - r.score_from, greedy))
        return scores

    def close(self) -> None:
        import gc

        llm, self.llm = self.llm, None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort: the engine also exits with its parent
            pass
        del llm
        gc.collect()


# -- whole-model evaluation -------------------------------------------------------------------------

@dataclass
class EvalSettings:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = None  # zero-shot docs per task
    seq_len: int = 512
    stride: int | None = None  # default: seq_len (non-overlapping)
    max_tokens: int | None = None  # perplexity tokens per dataset
    backend: str = "hf"
    dtype: str = "auto"
    device: str = "cpu"
    batch_tokens: int = 2048
    max_len: int = 2048  # zero-shot context cap / vLLM max_model_len
    add_bos: bool = False
    enforce_eager: bool = False  # vllm: skip torch.compile / graph capture (faster start, slower run)
    progress: bool = True

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in PPL_DATASETS and t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; perplexity: {list(PPL_DATASETS)}, zero-shot: {list(TASKS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


def load_hf(model_path: str | Path, dtype: str = "auto", device: str = "cpu"):
    """Model + tokenizer through plain transformers (a w4a8-dint checkpoint loads via the registered quantizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, trust_remote_code=False)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(model_path)


def quantization_summary(model_path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's quantization_config essentials, or None for a float model."""
    from w4a8_dint.contract import read_hf_config  # the one config reader (errors name the file)

    if not (Path(model_path) / "config.json").is_file():
        return None
    q = read_hf_config(model_path).get("quantization_config")
    if not q:
        return None
    keys = ("quant_method", "method", "group_size", "act_mode")
    out = {k: q.get(k) for k in keys}
    out["format"] = (q.get("format") or {}).get("name") if isinstance(q.get("format"), dict) else q.get("format")
    return out


def make_scorer(model_path: str | Path, settings: EvalSettings):
    """``(scorer, tokenizer)`` for the chosen backend."""
    if settings.backend == "vllm":
        from transformers import AutoTokenizer

        scorer = VllmScorer(str(model_path), dtype=settings.dtype, max_model_len=settings.max_len + 1,
                            progress=settings.progress, enforce_eager=settings.enforce_eager)
        return scorer, AutoTokenizer.from_pretrained(model_path)
    model, tok = load_hf(model_path, settings.dtype, settings.device)
    return HfScorer(model, settings.batch_tokens, settings.progress), tok


def evaluate(model_path: str | Path, tasks: Sequence[str] = DEFAULT_TASKS, limit: int | None = None,
             backend: str = "hf", settings: EvalSettings | None = None) -> dict[str, Any]:
    """Evaluate one model directory on perplexity datasets and zero-shot tasks; JSON-ready dict."""
    from w4a8_dint.embedded import load_text

    settings = settings or EvalSettings(tasks=tuple(tasks), limit=limit, backend=backend)
    scorer, tok = make_scorer(model_path, settings)
    results: dict[str, Any] = {}
    try:
        for task in settings.tasks:
            if task in PPL_DATASETS:
                results[task] = perplexity(scorer, tok, load_text(task), settings.seq_len, settings.stride,
                                           settings.max_tokens, settings.add_bos, desc=task)
            else:
                results[task] = zero_shot(scorer, tok, task, settings.limit, settings.max_len, settings.add_bos)
    finally:
        scorer.close()
    return {"model": str(model_path), "quantization": quantization_summary(model_path),
            "settings": {k: v for k, v in asdict(settings).items() if k != "progress"}, "results": results}


@dataclass
class Comparison:
    """Several models' results side by side (the first is the baseline)."""

    runs: list[dict[str, Any]] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str, list[float | None]]]:
        """``(task, metric, [value per model])`` in task order."""
        out = []
        tasks = list(dict.fromkeys(t for r in self.runs for t in r["results"]))
        for task in tasks:
            metrics = ["ppl"] if task in PPL_DATASETS else list(get_task(task).metrics)
            for m in metrics:
                out.append((task, m, [r["results"].get(task, {}).get(m) for r in self.runs]))
        return out

    def table(self) -> str:
        names = [_short_name(r) for r in self.runs]
        header = ["task", "metric", *names] + (["delta"] if len(self.runs) == 2 else [])
        lines = [header]
        for task, metric, values in self.rows():
            cells = [task, metric] + ["-" if v is None else _fmt(metric, v) for v in values]
            if len(values) == 2 and None not in values:
                cells.append(_fmt_delta(metric, values[1] - values[0]))
            elif len(self.runs) == 2:
                cells.append("-")
            lines.append(cells)
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        fmt_row = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
        sep = "  ".join("-" * w for w in widths)
        return "\n".join([fmt_row(lines[0]), sep, *map(fmt_row, lines[1:])])


def _short_name(run: dict[str, Any]) -> str:
    q = run.get("quantization")
    base = Path(run["model"]).name or run["model"]
    return f"{base} ({'W4A8 ' + str(q.get('format')) if q else 'FP'})"


def _fmt(metric: str, v: float) -> str:
    return f"{v:.2f}" if metric == "ppl" else f"{100 * v:.1f}"


def _fmt_delta(metric: str, d: float) -> str:
    return f"{d:+.2f}" if metric == "ppl" else f"{100 * d:+.1f}"
