"""The checkpoint contract: every bad checkpoint of issue 12 refused with a message naming the problem.

Bad checkpoints are edited copies of a valid RTN checkpoint of a tiny random model (Llama, GPT-NeoX,
BERT built locally). Each case below passed the old ``validate_checkpoint`` (it derived the
expected shapes from the tensors themselves and never looked at the architecture).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import stat
import struct
from pathlib import Path

import pytest
import torch

from w4a8_dint import checkpoint as C
from w4a8_dint import contract as K
from w4a8_dint import validate_cli

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tiny_checkpoints", HERE / "tiny_checkpoints.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def llama(root) -> Path:
    return tiny.rtn_checkpoint(tiny.tiny_model_dir("llama", root), root / "ck-llama")


def _validate(path: Path, capsys) -> tuple[int, str]:
    rc = validate_cli.run(argparse.Namespace(model_dir=str(path), trust_remote_code=False))
    return rc, capsys.readouterr().out.strip()


def _refused(path: Path, capsys, *needles: str) -> str:
    """``w4a8 validate`` exits 1 with one line naming every needle."""
    rc, out = _validate(path, capsys)
    assert rc == 1 and out.startswith("invalid: ") and "\n" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in {out!r}"
    return out


def test_valid_checkpoint_passes(llama, capsys):
    rc, out = _validate(llama, capsys)
    assert rc == 0
    report = json.loads(out)
    assert report["valid"] and report["layers"] == 14 and report["per_tensor"] == 1 and report["smooth"] == 2


# -- the cases of issue 12 ("validate says valid: true for checkpoints both loaders refuse") ----------

def test_packed_weight_of_the_wrong_width_is_refused(llama, tmp_path, capsys):
    # K=64 -> 32 bytes; 16 bytes (K=32) with a matching per-group scale is self-consistent, so only the
    # architecture (in_features=64) can tell it is wrong.
    p = "model.layers.1.self_attn.q_proj"

    def narrow(t):
        t[f"{p}.qweight"] = t[f"{p}.qweight"][:, :16].contiguous()
        t[f"{p}.weight_scale"] = t[f"{p}.weight_scale"][:, :1].contiguous()

    bad = tiny.edited_copy(llama, tmp_path / "bad", narrow)
    _refused(bad, capsys, f"{p}.qweight", "expected U8 [64, 32]", "in_features=64", "got U8 [64, 16]")


def test_quantized_lm_head_listed_as_float_is_refused(llama, tmp_path, capsys):
    def quantize_head(t):
        from w4a8_dint import formats as F
        qw = F.quantize_weight(t["model.embed_tokens.weight"].float(), F.get_format("dint4-a"), 32)
        t["lm_head.qweight"], t["lm_head.weight_scale"] = qw.packed, qw.scales

    bad = tiny.edited_copy(llama, tmp_path / "bad", quantize_head)
    _refused(bad, capsys, "lm_head.qweight", "while it is in modules_to_not_convert", "output embedding",
             "must stay float")


def test_input_scale_on_a_per_token_layer_is_refused(llama, tmp_path, capsys):
    p = "model.layers.1.self_attn.o_proj"
    bad = tiny.edited_copy(llama, tmp_path / "bad", lambda t: t.__setitem__(f"{p}.input_scale", torch.tensor([0.1])))
    _refused(bad, capsys, f"{p}.input_scale", "per-tensor (static) layers only", "act_mode='per-token'")


def test_missing_per_tensor_input_scale_is_refused(llama, tmp_path, capsys):
    bad = tiny.edited_copy(llama, tmp_path / "bad", lambda t: t.pop(f"{tiny.STATIC_LAYER}.input_scale"))
    _refused(bad, capsys, tiny.STATIC_LAYER, "input_scale missing", "act_mode='per-tensor'")


def test_missing_final_norm_is_refused(llama, tmp_path, capsys):
    bad = tiny.edited_copy(llama, tmp_path / "bad", lambda t: t.pop("model.norm.weight"))
    _refused(bad, capsys, "tensors missing from the checkpoint", "model.norm.weight")


def test_float_tensor_of_the_wrong_shape_is_refused(llama, tmp_path, capsys):
    bad = tiny.edited_copy(llama, tmp_path / "bad", lambda t: t.__setitem__("model.norm.weight", torch.ones(32)))
    _refused(bad, capsys, "model.norm.weight", "expected a float tensor [64]", "got F32 [32]")


@pytest.mark.parametrize("value,needle", [
    (3e38, "above the bound 10000"), (float("nan"), "non-finite"), (-1.0, "below 0"),
])
def test_absurd_weight_scales_are_refused(llama, tmp_path, capsys, value, needle):
    p = "model.layers.0.mlp.down_proj"

    def poison(t):
        t[f"{p}.weight_scale"] = t[f"{p}.weight_scale"].clone()
        t[f"{p}.weight_scale"][3, 1] = value

    bad = tiny.edited_copy(llama, tmp_path / "bad", poison)
    _refused(bad, capsys, f"{p}.weight_scale", needle)


@pytest.mark.parametrize("suffix,value,needle", [
    ("input_scale", 0.0, "below 1.17549e-38"), ("input_scale", 3e38, "above the bound 10000"),
    ("smooth_scale", 1e-9, "below 0.0001"),
])
def test_absurd_input_and_smooth_scales_are_refused(llama, tmp_path, capsys, suffix, value, needle):
    p = tiny.STATIC_LAYER if suffix == "input_scale" else tiny.SMOOTH_SITE[0]

    def poison(t):
        t[f"{p}.{suffix}"] = t[f"{p}.{suffix}"].clone()
        t[f"{p}.{suffix}"][0] = value
        if suffix == "smooth_scale":  # keep the fused pair equal so the bound is what trips
            t[f"{tiny.SMOOTH_SITE[1]}.{suffix}"] = t[f"{p}.{suffix}"].clone()

    bad = tiny.edited_copy(llama, tmp_path / "bad", poison)
    _refused(bad, capsys, f"{p}.{suffix}", needle)


def test_fused_parts_must_agree_on_act_mode(llama, tmp_path, capsys):
    q = "model.layers.1.self_attn.q_proj"

    def static_q(c):
        c["quantization_config"]["layers"][q] = {"act_mode": "per-tensor", "smooth": False}

    bad = tiny.edited_copy(llama, tmp_path / "bad", lambda t: t.__setitem__(f"{q}.input_scale", torch.tensor([0.1])),
                           static_q)
    _refused(bad, capsys, "fused into one GEMM", f"{q}: act_mode='per-tensor'",
             "model.layers.1.self_attn.k_proj: act_mode='per-token'")


def test_fused_parts_must_share_the_smoothing_vector(llama, tmp_path, capsys):
    up = tiny.SMOOTH_SITE[1]
    bad = tiny.edited_copy(llama, tmp_path / "bad",
                           lambda t: t.__setitem__(f"{up}.smooth_scale", t[f"{up}.smooth_scale"] * 1.5))
    _refused(bad, capsys, "smooth_scale differs between the fused parts", up)


def test_quantized_layer_listed_in_modules_to_not_convert_is_refused(llama, tmp_path, capsys):
    bad = tiny.edited_copy(llama, tmp_path / "bad", edit_config=lambda c: c["quantization_config"][
        "modules_to_not_convert"].append("model.layers.0.mlp.down_proj"))
    _refused(bad, capsys, "model.layers.0.mlp.down_proj.qweight", "listed in modules_to_not_convert")


# -- modules_to_not_convert derived from the model: GPT-NeoX and BERT ---------------------------------

def test_neox_and_bert_float_modules_are_derived(root):
    neox = K.structure_from_config(K.read_hf_config(tiny.tiny_model_dir("gpt_neox", root)))
    bert = K.structure_from_config(K.read_hf_config(tiny.tiny_model_dir("bert", root)))
    assert set(neox.float_modules) == {"lm_head", "gpt_neox.embed_in"}
    assert neox.model_name("embed_out.weight") == "lm_head.weight"  # the name save_pretrained writes
    assert set(bert.float_modules) == {"cls.predictions.decoder", "cls.predictions.transform.dense",
                                       "bert.embeddings.word_embeddings"}
    assert bert.decoder_layers == "bert.encoder.layer"


def test_neox_checkpoint_with_the_derived_list_passes_and_a_quantized_head_is_refused(root, tmp_path, capsys):
    good = tiny.rtn_checkpoint(tiny.tiny_model_dir("gpt_neox", root), tmp_path / "neox")
    assert "embed_out.weight" in K.weight_map(good)
    assert K.check(good)["layers"] == 8

    def quantize_head(t):
        from w4a8_dint import formats as F
        qw = F.quantize_weight(t.pop("embed_out.weight").float(), F.get_format("dint4-a"), 32)
        t["embed_out.qweight"], t["embed_out.weight_scale"] = qw.packed, qw.scales

    bad = tiny.edited_copy(good, tmp_path / "bad", quantize_head)
    _refused(bad, capsys, "embed_out.qweight", "lm_head is quantized", "output embedding", "must stay float")


def test_bert_head_transform_must_be_listed_as_float(root, tmp_path, capsys):
    src = tiny.tiny_model_dir("bert", root)
    good = tiny.rtn_checkpoint(src, tmp_path / "bert")
    bad = tiny.edited_copy(good, tmp_path / "bad",
                           edit_config=lambda c: c["quantization_config"].update(
                               modules_to_not_convert=["lm_head", "cls.predictions.decoder"]))
    _refused(bad, capsys, "does not name cls.predictions.transform.dense (a linear outside the decoder layers "
             "(bert.encoder.layer))", "cls.predictions.transform.dense.qweight")


def test_write_checkpoint_refuses_before_the_rename(root, tmp_path):
    """calibrate's writer: a checkpoint breaking the contract never appears at --out, no temp dir is left."""
    with pytest.raises(K.CheckpointError, match=r"does not name .*cls.predictions.transform.dense"):
        tiny.rtn_checkpoint(tiny.tiny_model_dir("bert", root), tmp_path / "out", modules_to_not_convert=["lm_head"])
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


# -- the one reader: truncated / corrupt / missing shards, bad index, duplicates ----------------------

def test_truncated_and_corrupt_shards_name_the_file(llama, tmp_path, capsys):
    bad = tiny.edited_copy(llama, tmp_path / "trunc")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _refused(bad, capsys, str(f), "truncated safetensors file")
    f.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    _refused(bad, capsys, str(f), "corrupt or truncated")
    f.write_bytes(struct.pack("<Q", 5) + b"{nope")
    _refused(bad, capsys, str(f), "corrupt safetensors header")


def _two_shards(src: Path, dst: Path) -> Path:
    from safetensors.torch import save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = K.read_tensors(src)
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, ns in half.items():
        save_file({n: tensors[n] for n in ns}, str(dst / fname))
    wmap = {n: f for f, ns in half.items() for n in ns}
    (dst / K.SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return dst


def test_sharded_checkpoint_and_index_errors(llama, tmp_path, capsys):
    d = _two_shards(llama, tmp_path / "sharded")
    assert K.check(d)["layers"] == 14
    index = json.loads((d / K.SAFE_INDEX).read_text())
    # a tensor in both shards
    from safetensors.torch import save_file
    shard2 = d / "model-00002-of-00002.safetensors"
    t2 = K.read_tensors(d, [n for n, f in index["weight_map"].items() if f == shard2.name])
    dup = next(n for n, f in index["weight_map"].items() if f != shard2.name)
    save_file({**t2, dup: K.read_tensors(d, [dup])[dup]}, str(shard2))
    _refused(d, capsys, f"tensor {dup} is in two shards", "model-00001-of-00002.safetensors", shard2.name)
    # the index names a tensor the file does not hold
    save_file(t2, str(shard2))
    index["weight_map"]["model.extra.weight"] = shard2.name
    (d / K.SAFE_INDEX).write_text(json.dumps(index))
    _refused(d, capsys, "model.extra.weight", shard2.name, "does not hold it")
    # a shard the index names is missing
    del index["weight_map"]["model.extra.weight"]
    (d / K.SAFE_INDEX).write_text(json.dumps(index))
    shard2.unlink()
    _refused(d, capsys, "missing shard", shard2.name)


def test_config_errors_name_the_file(llama, tmp_path, capsys):
    bad = tiny.edited_copy(llama, tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    _refused(bad, capsys, str(bad / "config.json"), "invalid JSON")
    (bad / "config.json").unlink()
    _refused(bad, capsys, "no config.json")


def test_header_reader_matches_safetensors(llama):
    from safetensors import safe_open

    headers = K.read_headers(llama)
    with safe_open(str(llama / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(headers)
        for n in f.keys():
            sl = f.get_slice(n)
            assert (sl.get_dtype(), tuple(sl.get_shape())) == (headers[n].dtype, headers[n].shape)


# -- permissions like save_pretrained -----------------------------------------------------------------

@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_written_checkpoint_permissions_follow_the_umask(root, tmp_path, umask, dir_mode, file_mode):
    src = tiny.tiny_model_dir("llama", root)
    (src / "tokenizer_config.json").write_text("{}")
    os.chmod(src / "tokenizer_config.json", 0o600)  # a side file copied from a private source
    old = os.umask(umask)
    try:
        out = tiny.rtn_checkpoint(src, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    files = list(out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in files}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: file_mode for p in files}
