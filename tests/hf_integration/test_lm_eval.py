"""lm-evaluation-harness (the pinned ``lm-eval``) on our checkpoints, through its own Python API and stock
``hf`` backend, on a local PTB task (``lm_eval_tasks/w4a8_ptb.yaml``: documents from the offline ``treebank``
package, no Hub access).

What it shows: lm-eval loads a w4a8-dint checkpoint by itself (the registered quantizer), runs our W4A8
modules and kernel, and its scores equal our own harness's on the same tokens; the W4A8 score is close to the
float model's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from w4a8_dint.hf_integration import eval as E

from .conftest import offline_env

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (requirements/cpu.txt)")

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK = "w4a8_ptb"
DOCS = 4  # ~360 tokens each: enough to separate FP from W4A8, small enough for 2 CPU cores
MAX_LENGTH = 512  # every document fits one window, so lm-eval scores it in one forward pass


@dataclass
class LmEvalRun:
    metrics: dict
    samples: list[dict]
    lm: object  # the HFLM lm-eval built from model_args
    log: str
    w4a8_forward_calls: int  # calls of W4A8Linear.forward during the evaluation


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_lm_eval(model_dir: Path) -> LmEvalRun:
    """``lm_eval.simple_evaluate(model="hf", model_args="pretrained=DIR,...")`` offline, keeping the LM it built."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from w4a8_dint.hf_integration.modules import W4A8Linear

    built: list = []
    calls = [0]
    original_init = HFLM.__init__

    def init_and_keep(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(self)
        for m in self.model.modules():
            if isinstance(m, W4A8Linear):
                m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    handler = _Collect()
    ours = logging.getLogger("w4a8_dint")
    old_level = ours.level
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setenv("HF_DATASETS_OFFLINE", "1")
            mp.setenv("TRANSFORMERS_OFFLINE", "1")
            mp.setattr(HFLM, "__init__", init_and_keep)
            out = lm_eval.simple_evaluate(
                model="hf", model_args=f"pretrained={model_dir},dtype=float32,max_length={MAX_LENGTH}",
                tasks=[TASK], task_manager=TaskManager(include_path=str(TASK_DIR)), limit=DOCS, batch_size=1,
                device="cpu", log_samples=True, bootstrap_iters=0,
            )
    finally:
        ours.removeHandler(handler)
        ours.setLevel(old_level)
    assert len(built) == 1
    return LmEvalRun(out["results"][TASK], out["samples"][TASK], built[0], "\n".join(handler.lines), calls[0])


@pytest.fixture(scope="module")
def fp_run(fp_dir) -> LmEvalRun:
    return run_lm_eval(fp_dir)


@pytest.fixture(scope="module")
def w4a8_run(ckpt_g64) -> LmEvalRun:
    return run_lm_eval(ckpt_g64)


def test_local_task_reads_offline_ptb():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ptb_docs", TASK_DIR / "ptb_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    docs = mod.load()["test"]["text"]
    assert len(docs) == math.ceil(3761 / 12)  # PTB test: 3761 sentences, 12 per document
    assert docs[0].startswith("no it was n't black monday but while the new york stock exchange")
    with pytest.raises(ValueError, match="lines_per_doc"):
        mod.load(lines_per_doc=0)


def test_w4a8_path_ran_inside_lm_eval(w4a8_run, fp_run):
    from w4a8_dint.hf_integration.modules import w4a8_modules

    modules = w4a8_modules(w4a8_run.lm.model)
    assert len(modules) == 30 * 7  # every q/k/v/o/gate/up/down of the 30 layers
    assert {type(m).__name__ for m in modules.values()} == {"W4A8Linear"}
    assert w4a8_run.w4a8_forward_calls >= len(modules) * DOCS  # each layer ran on every document
    kernels = {m.kernel_name for m in modules.values()}
    assert len(kernels) == 1 and None not in kernels
    (kernel,) = kernels
    assert f"w4a8-dint: kernels {{'{kernel}': {len(modules)}}}" in w4a8_run.log
    assert not w4a8_modules(fp_run.lm.model) and "w4a8-dint" not in fp_run.log


@pytest.mark.parametrize("which", ["fp", "w4a8"])
def test_lm_eval_scores_equal_our_harness(which, request):
    """Same model object, same tokens: lm-eval's rolling log-likelihood = ``HfScorer``'s, document by document.

    Each document is one window (prefix token + text), so both score exactly the same positions. Tolerance
    1e-4 relative: lm-eval calls the model without an attention mask, we pass one of ones, so float sums may
    differ in the last bits; a windowing or tokenization difference would be off by whole tokens (~5 nats).
    """
    run = request.getfixturevalue(f"{which}_run")
    lm = run.lm
    assert len(run.samples) == DOCS
    requests = []
    for s in run.samples:
        ids = lm.tok_encode(s["doc"]["text"])
        assert len(ids) + 1 <= MAX_LENGTH
        requests.append(E.ScoreRequest((lm.prefix_token_id, *ids), score_from=1))
    ours = E.HfScorer(lm.model, batch_tokens=MAX_LENGTH, progress=False).score(requests)
    theirs = [s["filtered_resps"][0] for s in run.samples]
    for o, t in zip(ours, theirs):
        assert o.logprob == pytest.approx(t, rel=1e-4)
    words = sum(len(s["doc"]["text"].split()) for s in run.samples)
    assert run.metrics["word_perplexity,none"] == pytest.approx(math.exp(-sum(theirs) / words), rel=1e-9)


def test_w4a8_score_close_to_float(fp_run, w4a8_run):
    """W4A8 perplexity within [1.0, 1.6] x float's (lm-eval's word perplexity, same documents).

    The checkpoint is plain RTN dINT4-a g64 (tests/hf_integration/rtn_checkpoint.py), which measured
    1.42x the float PTB perplexity over 16 windows (docs/eval.md); per-channel RTN doubles it, and a broken
    kernel or scale layout gives 10x-1000x. Quantization never helps on average (lower bound 1.0).
    """
    fp = fp_run.metrics["word_perplexity,none"]
    q = w4a8_run.metrics["word_perplexity,none"]
    assert 1.0 <= q / fp <= 1.6, (fp, q)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_runs_our_plugin_and_matches_hf(ckpt_g64, w4a8_run, tmp_path):
    """``lm_eval --model vllm`` (the documented command, in a fresh process) on the same checkpoint and documents.

    vLLM loads the checkpoint through our registered quantization method and runs our kernel (its log says
    which); each document's log-likelihood is within 3% of the hf backend's (vLLM's attention and norm kernels
    differ from HF's in the last float bits, which per-token INT8 rounding amplifies through 30 layers: 0.8%
    perplexity apart measured, docs/eval.md), and the word perplexity within 2%.
    """
    import json
    import subprocess
    import sys

    pytest.importorskip("vllm")

    out = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "vllm", "--model_args",
           f"pretrained={ckpt_g64},quantization=w4a8-dint,dtype=float32,max_model_len={MAX_LENGTH},enforce_eager=True",
           "--include_path", str(TASK_DIR), "--tasks", TASK, "--limit", str(DOCS), "--batch_size", "auto",
           "--log_samples", "--output_path", str(out)]
    env = offline_env(HF_DATASETS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "'quantization': 'w4a8-dint'" in log
    assert "w4a8-dint: checkpoint matches its config" in log
    assert "w4a8-dint: per-token layers run the '" in log and "w4a8-dint: per-tensor layers run the '" in log
    (samples_file,) = out.rglob(f"samples_{TASK}_*.jsonl")
    vllm_samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    hf_samples = sorted(w4a8_run.samples, key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in vllm_samples] == [s["doc_id"] for s in hf_samples] == list(range(DOCS))
    for v, h in zip(vllm_samples, hf_samples):
        assert v["doc"]["text"] == h["doc"]["text"]
        # lm-eval writes the vLLM run's per-sample responses to JSON as strings
        assert float(v["filtered_resps"][0]) == pytest.approx(float(h["filtered_resps"][0]), rel=0.03)
    (results_file,) = out.rglob("results_*.json")
    vllm_ppl = json.loads(results_file.read_text())["results"][TASK]["word_perplexity,none"]
    assert vllm_ppl == pytest.approx(w4a8_run.metrics["word_perplexity,none"], rel=0.02)
