"""Publish a w4a8-dint checkpoint to the Hugging Face Hub with a generated model card.

``push_to_hub`` validates the checkpoint first (a broken upload is worse than none),
builds the card, and uploads everything in **one commit** through
``huggingface_hub.HfApi.create_commit``: every weight shard (+ index),
``config.json`` byte for byte (so ``quantization_config`` travels intact -- the
GPTQModel#1211 failure mode), tokenizer and generation files, ``eval_results.json``
when present, and the ``README.md`` card. ``dry_run=True`` returns the same plan
without touching the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from w4a8_dint.config import QUANT_METHOD, W4A8Config
from w4a8_dint.contract import check, read_checkpoint_config, weight_map
from w4a8_dint.formats import FORMATS

EVAL_RESULTS_FILE = "eval_results.json"
CARD_FILE = "README.md"
# Never uploaded: our atomic-write leftovers and editor/OS noise.
_SKIP_PREFIXES = (".",)


@dataclass
class PushPlan:
    """What one push uploads: ``files`` maps path in repo -> local path; the card is generated text."""

    repo_id: str
    files: dict[str, Path]
    card: str
    commit_message: str
    private: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def operations(self):
        from huggingface_hub import CommitOperationAdd

        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in sorted(self.files.items())]
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=self.card.encode("utf-8")))
        return ops


class PushError(RuntimeError):
    """The upload did not happen (no token, offline, the Hub refused); the message is one line for the user."""


def hub_model_id(name: str | None) -> str | None:
    """``name`` if it can only be a Hub model id (``org/name`` syntax, not a path on this machine), else None.

    The card's ``base_model`` links to the Hub; a local path there is a broken link and leaks the path.
    """
    if not name or name.startswith((".", "/", "~")) or "\\" in name or Path(name).expanduser().exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


# -- model card ---------------------------------------------------------------------------------

def _load_eval_results(model_dir: Path, eval_results: dict | list | None) -> list[dict[str, Any]]:
    """Runs to show: an explicit dict/list, else ``eval_results.json`` next to the weights (as ``w4a8 eval`` writes)."""
    if eval_results is None:
        path = model_dir / EVAL_RESULTS_FILE
        if not path.is_file():
            return []
        eval_results = json.loads(path.read_text())
    if isinstance(eval_results, dict):
        eval_results = eval_results.get("runs", [eval_results])
    return [r for r in eval_results if isinstance(r, dict) and "results" in r]


def _metrics_section(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return ("Not measured yet. Run `w4a8 eval <dir> --baseline <float model> --write-results` "
                "before pushing to include perplexity and zero-shot accuracy here.\n")
    from w4a8_dint.hf_integration.eval import Comparison

    comp = Comparison(runs)
    s = runs[-1].get("settings", {})
    lines = [f"Measured with `w4a8 eval` (backend `{s.get('backend', 'hf')}`; perplexity: seq_len {s.get('seq_len')}, "
             f"stride {s.get('stride') or s.get('seq_len')}, max_tokens {s.get('max_tokens') or 'all'}; "
             f"zero-shot: limit {s.get('limit') or 'none'} docs per task, lm-eval-style log-likelihood scoring). "
             "Perplexity: lower is better; accuracy in %.\n",
             "```", comp.table(), "```", ""]
    return "\n".join(lines)


def _format_table(qcfg: W4A8Config) -> str:
    table = FORMATS[qcfg.format]
    used = set(table.used_codes)
    rows = ["| code | " + " | ".join(str(c) for c in range(16)) + " |", "|---" * 17 + "|"]
    rows.append("| value | " + " | ".join(f"{v:g}" + ("" if c in used else " (unused)") for c, v in enumerate(table.values)) + " |")
    return "\n".join(rows)


def build_model_card(model_dir: str | Path, repo_id: str, base_model: str | None = None,
                     eval_results: dict | list | None = None) -> str:
    """README.md text: YAML front matter + format, method, calibration, metrics, loading instructions."""
    from huggingface_hub import ModelCardData

    model_dir = Path(model_dir)
    cfg, qcfg = read_checkpoint_config(model_dir)
    qdict = cfg["quantization_config"]
    table = FORMATS[qcfg.format]
    base_model = hub_model_id(base_model or qcfg.calibration.get("base_model") or qcfg.calibration.get("source_model"))
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        tags=[QUANT_METHOD, "quantized", "4-bit", "w4a8", "int8-activations", qcfg.format, f"method:{qcfg.method}"],
        base_model_relation="quantized" if base_model else None,
        quantization_config=qdict,
    )
    static = sorted(k for k, p in qcfg.layers.items() if p.act_mode == "per-tensor")
    smooth = sorted(k for k, p in qcfg.layers.items() if p.smooth)
    group = "per output channel" if qcfg.group_size == -1 else f"groups of {qcfg.group_size} input channels"
    calib = "\n".join(f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in sorted(qcfg.calibration.items()))
    name = repo_id.split("/")[-1]
    arch = ", ".join(cfg.get("architectures") or [cfg.get("model_type", "?")])
    return f"""---
{data.to_yaml()}
---

# {name}

W4A8 quantization of {f'`{base_model}`' if base_model else 'a ' + arch + ' model'} made with
the `w4a8-dint` toolkit: **4-bit `{qcfg.format}` weights, INT8 activations**.
Linear layers run as integer GEMMs (INT8 x 4-bit expanded to INT8, INT32 accumulation); nothing is
dequantized to 16-bit at run time.

## Format

* Weights: `{qcfg.format}` ({table.description}), symmetric scales in float32, {group}.
  Each code means `value * scale`; the 16 code points:

{_format_table(qcfg)}

* Packing: `qweight` is `uint8 [out, in/2]`, two codes per byte (even input column in the low nibble);
  `weight_scale` is `float32 [out, in/group]`.
* Activations: INT8, `{qcfg.act_mode}` by default{'' if qcfg.act_mode == 'per-tensor' else ' (dynamic, one scale per token)'};
  {len(static)} layer(s) use a static per-tensor `input_scale`, {len(smooth)} layer(s) divide their input by a `smooth_scale`.
* Kept in float: {', '.join(f'`{m}`' for m in qcfg.modules_to_not_convert) or 'nothing'}.

## Method and calibration

Method: `{qcfg.method}`.

| setting | value |
|---|---|
{calib or '| (none recorded) | |'}

## Results

{_metrics_section(_load_eval_results(model_dir, eval_results))}
## How to use

```bash
pip install w4a8-dint   # registers the `w4a8-dint` quantizer with transformers and vLLM
```

Transformers (no import of `w4a8_dint` needed; the package hooks itself into transformers):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
out = model.generate(**tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=20)
print(tokenizer.decode(out[0]))
```

vLLM (the plugin registers through the `vllm.general_plugins` entry point):

```bash
vllm serve {repo_id} --quantization w4a8-dint
```

```python
from vllm import LLM, SamplingParams

llm = LLM(model="{repo_id}", quantization="w4a8-dint")
print(llm.generate(["The capital of France is"], SamplingParams(max_tokens=20))[0].outputs[0].text)
```

Without `w4a8-dint` installed, transformers does not know this `quant_method` and would load random
weights (it only warns): install the package first.

## quantization_config

```json
{json.dumps(qdict, indent=2, sort_keys=True)}
```
"""


# -- push ----------------------------------------------------------------------------------------

def plan_push(model_dir: str | Path, repo_id: str, private: bool = False, base_model: str | None = None,
              eval_results: dict | list | None = None) -> PushPlan:
    """Validate the checkpoint and list what a push uploads (no network)."""
    model_dir = Path(model_dir)
    check(model_dir)  # the whole checkpoint contract, before anything else
    qcfg = read_checkpoint_config(model_dir)[1]
    files = {
        p.name: p for p in sorted(model_dir.iterdir())
        if p.is_file() and not p.name.startswith(_SKIP_PREFIXES) and p.name != CARD_FILE
        and p.suffix not in (".bin", ".pt", ".pth", ".pkl")
    }
    weights = set(weight_map(model_dir).values())
    missing = sorted(weights - set(files))
    if missing:
        raise FileNotFoundError(f"{model_dir}: shards {missing} are not plain files in the directory")
    card = build_model_card(model_dir, repo_id, base_model, eval_results)
    msg = f"Upload {qcfg.format} W4A8 checkpoint (w4a8-dint, method {qcfg.method})"
    return PushPlan(repo_id=repo_id, files=files, card=card, commit_message=msg, private=private)


def push_to_hub(model_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                eval_results: dict | list | None = None, base_model: str | None = None, dry_run: bool = False,
                api=None) -> PushPlan:
    """Create (or reuse) ``repo_id`` and upload the checkpoint + generated card in one commit.

    ``api``: an ``HfApi``-compatible object (tests pass a recorder); default ``HfApi(token=token)``.
    """
    plan = plan_push(model_dir, repo_id, private, base_model, eval_results)
    if dry_run:
        return plan
    import huggingface_hub

    if api is None:
        if not (token or huggingface_hub.get_token()):
            raise PushError(f"push to {repo_id}: no Hugging Face token (pass --token, set HF_TOKEN or run "
                            "`hf auth login`); nothing was uploaded")
        api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        info = api.create_commit(repo_id, plan.operations(), commit_message=plan.commit_message, repo_type="model",
                                 token=token)
    except Exception as e:  # noqa: BLE001 -- every Hub/network failure becomes one line; nothing half-uploaded
        raise PushError(f"push to {repo_id}: {_hub_failure(e)}; nothing was uploaded (the commit is atomic)") from e
    plan.extra["commit"] = getattr(info, "commit_url", None) or str(info)
    return plan


def _hub_failure(e: Exception) -> str:
    """What went wrong talking to the Hub, in words (huggingface_hub and httpx raise these)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(e, LocalTokenNotFoundError):
        return "no Hugging Face token (pass --token, set HF_TOKEN or run `hf auth login`)"
    if isinstance(e, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1), the Hub cannot be reached"
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if status == 401:
            return f"the Hub refused the token (401 Unauthorized: {first})"
        return f"the Hub answered {status or 'an error'}: {first}"
    if isinstance(e, (ConnectionError, TimeoutError, OSError)) or type(e).__module__.startswith(("httpx", "httpcore")):
        return f"cannot reach the Hub ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
    raise e
