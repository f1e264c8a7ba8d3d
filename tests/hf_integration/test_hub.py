"""Hub push, offline: the commit operations HfApi would send, the generated card, refusal of bad checkpoints."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

from w4a8_dint import formats as F
from w4a8_dint.checkpoint import SAFE_INDEX, CheckpointError, load_tensors, read_config, write_safetensors_shards
from w4a8_dint.hf_integration.hub import EVAL_RESULTS_FILE, build_model_card, push_to_hub


class RecordingHub:
    """Captures what ``push_to_hub`` hands to ``HfApi.create_repo`` / ``create_commit``."""

    def __init__(self) -> None:
        self.repos: list[tuple[str, dict]] = []
        self.commits: list[tuple[str, list, dict]] = []

    def create_repo(self, repo_id, **kw):
        self.repos.append((repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kw):
        self.commits.append((repo_id, list(operations), kw))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/0"

        return Info()


@pytest.fixture
def hub(monkeypatch) -> RecordingHub:
    """Patch the real ``huggingface_hub.HfApi`` (what push_to_hub uses by default): no network."""
    import huggingface_hub

    rec = RecordingHub()
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")  # a token exists; the patched API never sends it
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: rec.create_repo(repo_id, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit",
                        lambda self, repo_id, operations, **kw: rec.create_commit(repo_id, operations, **kw))
    return rec


@pytest.fixture(scope="module")
def sharded_ckpt(ckpt_g64, tmp_path_factory) -> Path:
    """The g64 checkpoint re-written as several shards + index, with an eval_results.json next to it."""
    out = tmp_path_factory.mktemp("push") / "sharded"
    out.mkdir()
    shards = write_safetensors_shards(out, load_tensors(ckpt_g64), max_shard_bytes=50_000_000)
    assert len(shards) >= 3
    for f in ckpt_g64.iterdir():
        if not f.name.startswith("model"):
            shutil.copy2(f, out / f.name)
    results = {"runs": [
        {"model": "smollm2-135m-instruct", "quantization": None, "settings": {"seq_len": 512, "limit": 40},
         "results": {"ptb": {"ppl": 83.16}, "piqa": {"acc": 0.725, "acc_norm": 0.70}}},
        {"model": str(out), "quantization": {"format": "dint4-a"}, "settings": {"seq_len": 512, "limit": 40},
         "results": {"ptb": {"ppl": 160.8}, "piqa": {"acc": 0.70, "acc_norm": 0.65}}},
    ]}
    (out / EVAL_RESULTS_FILE).write_text(json.dumps(results))
    return out


def _op_bytes(op) -> bytes:
    src = op.path_or_fileobj
    return src if isinstance(src, bytes) else Path(src).read_bytes()


def test_push_sends_every_shard_config_tokenizer_and_card_in_one_commit(hub, sharded_ckpt):
    plan = push_to_hub(sharded_ckpt, "someone/smollm2-w4a8", token="hf_fake", private=True)
    assert [r for r, _ in hub.repos] == ["someone/smollm2-w4a8"] and hub.repos[0][1]["private"] is True
    assert len(hub.commits) == 1
    repo, ops, kw = hub.commits[0]
    by_name = {op.path_in_repo: op for op in ops}
    shards = set(json.loads((sharded_ckpt / SAFE_INDEX).read_text())["weight_map"].values())
    expected = shards | {SAFE_INDEX, "config.json", "tokenizer.json", "tokenizer_config.json",
                         "generation_config.json", EVAL_RESULTS_FILE, "README.md"}
    assert expected <= set(by_name), expected - set(by_name)
    for name in shards | {"config.json", "tokenizer.json"}:
        assert _op_bytes(by_name[name]) == (sharded_ckpt / name).read_bytes()  # uploaded byte for byte
    uploaded_cfg = json.loads(_op_bytes(by_name["config.json"]))
    assert uploaded_cfg["quantization_config"] == read_config(sharded_ckpt)["quantization_config"]
    assert plan.extra["commit"].endswith("/commit/0")


def test_model_card_keeps_quantization_config_and_documents_the_format(sharded_ckpt):
    card = build_model_card(sharded_ckpt, "someone/smollm2-w4a8", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    front = yaml.safe_load(card.split("---")[1])
    qcfg = read_config(sharded_ckpt)["quantization_config"]
    assert front["quantization_config"] == qcfg  # the card carries it too, not only config.json
    assert front["library_name"] == "transformers" and "w4a8-dint" in front["tags"]
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["base_model_relation"] == "quantized"
    table = F.get_format("dint4-a")
    value_row = next(line for line in card.splitlines() if line.startswith("| value |"))
    assert [c.strip() for c in value_row.strip("|").split("|")[1:]] == [f"{v:g}" for v in table.values]
    assert "group" in card and "64" in card and "rtn" in card  # method + calibration settings
    assert "83.16" in card and "160.80" in card and "72.5" in card  # measured metrics from eval_results.json
    assert "from_pretrained(\"someone/smollm2-w4a8\")" in card and "vllm serve someone/smollm2-w4a8" in card
    assert json.loads(card.split("```json")[1].split("```")[0]) == qcfg


def test_push_refuses_a_broken_checkpoint_and_sends_nothing(hub, sharded_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_ckpt, broken)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        push_to_hub(broken, "someone/x")
    assert not hub.repos and not hub.commits


def test_push_cli_dry_run_lists_files_and_card(hub, sharded_ckpt):
    from w4a8_dint.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["push", str(sharded_ckpt), "someone/smollm2-w4a8", "--dry-run"]) == 0
    out = buf.getvalue()
    assert "config.json" in out and "README.md" in out and "model-00001-of-" in out and "quantization_config" in out
    assert not hub.repos and not hub.commits


# -- issue 12: push validates with the contract first; Hub failures are one line; base_model only for Hub ids ---

def _tiny():
    import importlib.util

    from .conftest import REPO

    spec = importlib.util.spec_from_file_location("tiny_checkpoints", REPO / "tests" / "w4a8_dint" / "tiny_checkpoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    tiny = _tiny()
    root = tmp_path_factory.mktemp("tiny-push")
    return tiny.rtn_checkpoint(tiny.tiny_model_dir("llama", root), root / "ckpt")


def _push_cli(*args: str) -> tuple[int, str]:
    from w4a8_dint.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["push", *args])
    return rc, buf.getvalue().strip()


@pytest.mark.parametrize("case,needle", [
    ("quantized_lm_head", "lm_head.qweight: lm_head is quantized while it is in modules_to_not_convert"),
    ("missing_norm", "tensors missing from the checkpoint (loaders would randomly initialise them): ['model.norm.weight']"),
    ("input_scale_on_per_token", "model.layers.1.self_attn.o_proj.input_scale: present"),
    ("absurd_scale", "model.layers.0.mlp.down_proj.weight_scale: 1 value(s) above the bound 10000"),
])
def test_push_refuses_what_the_contract_refuses_and_uploads_nothing(hub, tiny_ckpt, tmp_path, case, needle):
    from w4a8_dint import formats as F

    def edit(t):
        if case == "quantized_lm_head":
            qw = F.quantize_weight(t["model.embed_tokens.weight"].float(), F.get_format("dint4-a"), 32)
            t["lm_head.qweight"], t["lm_head.weight_scale"] = qw.packed, qw.scales
        elif case == "missing_norm":
            del t["model.norm.weight"]
        elif case == "input_scale_on_per_token":
            t["model.layers.1.self_attn.o_proj.input_scale"] = torch.tensor([0.1])
        else:
            t["model.layers.0.mlp.down_proj.weight_scale"] = t["model.layers.0.mlp.down_proj.weight_scale"].clone()
            t["model.layers.0.mlp.down_proj.weight_scale"][0, 0] = 3e38

    bad = _tiny().edited_copy(tiny_ckpt, tmp_path / "bad", edit)
    rc, out = _push_cli(str(bad), "someone/x")
    assert rc == 1 and out.startswith("refusing to push: ") and needle in out and "\n" not in out, out
    assert not hub.repos and not hub.commits


def _raise(exc):
    def api_call(self, *a, **kw):
        raise exc
    return api_call


def _hub_errors():
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    unauthorized = httpx.Response(401, request=request, text="Invalid credentials in Authorization header")
    return {
        "offline": (OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is "
                                         "enabled. To disable it, please unset the `HF_HUB_OFFLINE` environment "
                                         "variable."), "offline mode is on (HF_HUB_OFFLINE=1)"),
        "no_token": (LocalTokenNotFoundError("Token is required (`token=True`), but no token found."),
                     "no Hugging Face token (pass --token, set HF_TOKEN or run `hf auth login`)"),
        "bad_token": (HfHubHTTPError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create",
                                     response=unauthorized), "the Hub refused the token (401 Unauthorized"),
        "network": (httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
                    "cannot reach the Hub (ConnectError: [Errno -3] Temporary failure in name resolution)"),
    }


@pytest.mark.parametrize("case", ["offline", "no_token", "bad_token", "network"])
def test_push_hub_failures_are_one_line_and_nonzero(monkeypatch, tiny_ckpt, case):
    import huggingface_hub

    exc, needle = _hub_errors()[case]
    commits = []
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", _raise(exc))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, *a, **kw: commits.append(a))
    rc, out = _push_cli(str(tiny_ckpt), "someone/x")
    assert rc == 1 and "\n" not in out and "Traceback" not in out, out
    assert out.startswith("push failed: push to someone/x: ") and needle in out and "nothing was uploaded" in out
    assert not commits


def test_push_without_any_token_stops_before_the_network(monkeypatch, tiny_ckpt):
    import huggingface_hub

    calls = []
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **kw: calls.append(a))
    rc, out = _push_cli(str(tiny_ckpt), "someone/x")
    assert rc == 1 and out == ("push failed: push to someone/x: no Hugging Face token (pass --token, set HF_TOKEN or "
                               "run `hf auth login`); nothing was uploaded")
    assert not calls


@pytest.mark.parametrize("source,expected", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("/root/.cache/w4a8_dint/smollm2-135m-instruct", None),
    ("./models/llama", None),
    ("~/models/llama", None),
])
def test_card_base_model_only_for_hub_ids(tiny_ckpt, tmp_path, source, expected):
    ckpt = _tiny().edited_copy(tiny_ckpt, tmp_path / "ck", edit_config=lambda c: c["quantization_config"][
        "calibration"].update(source_model=source))
    front = yaml.safe_load(build_model_card(ckpt, "someone/x").split("---")[1])
    assert front.get("base_model") == expected
    assert ("base_model_relation" in front) == (expected is not None)


def test_card_base_model_not_for_an_existing_local_dir(tiny_ckpt, tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # "org/model" is valid Hub syntax, but here it names a local directory
    ckpt = _tiny().edited_copy(tiny_ckpt, tmp_path / "ck", edit_config=lambda c: c["quantization_config"][
        "calibration"].update(source_model="org/model"))
    assert "base_model" not in yaml.safe_load(build_model_card(ckpt, "someone/x").split("---")[1])
