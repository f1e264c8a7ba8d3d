"""quantization_config schema and checkpoint I/O: round trips, atomicity, clear errors."""

import json

import pytest
import torch

from w4a8_dint import checkpoint as C
from w4a8_dint import formats as F
from w4a8_dint.config import ConfigError, LayerPolicy, W4A8Config
from w4a8_dint.contract import ModelStructure

# The architecture these synthetic checkpoints claim (the contract checks tensors against it); the
# contract's own tests (test_contract.py) use real tiny transformers models instead.
STRUCTURE = ModelStructure(linears={"a.proj": (16, 64, False), "b.proj": (16, 64, False)},
                           params={"a.proj.weight": (16, 64), "b.proj.weight": (16, 64), "embed.weight": (10, 64)})


def _layer_tensors(prefix, n=16, k=64, group=32, seed=0, smooth=False, static=False):
    g = torch.Generator().manual_seed(seed)
    qw = F.quantize_weight(torch.randn(n, k, generator=g), F.get_format("dint4-a"), group)
    t = {f"{prefix}.qweight": qw.packed, f"{prefix}.weight_scale": qw.scales}
    if smooth:
        t[f"{prefix}.smooth_scale"] = torch.rand(k, generator=g) + 0.5
    if static:
        t[f"{prefix}.input_scale"] = torch.tensor([0.05])
    return t


def _write(tmp_path, name="ckpt", **kw):
    qcfg = W4A8Config(group_size=32, layers={"a.proj": LayerPolicy("per-tensor", smooth=True)})
    tensors = {**_layer_tensors("a.proj", smooth=True, static=True), **_layer_tensors("b.proj", seed=1),
               "embed.weight": torch.randn(10, 64)}
    return C.write_checkpoint(tmp_path / name, tensors, {"model_type": "llama"}, qcfg, model_structure=STRUCTURE,
                              **kw), tensors


def test_config_round_trip_keeps_the_table():
    cfg = W4A8Config(format="dint4-b", group_size=64, layers={"x": LayerPolicy("per-tensor", True)}, method="aqas",
                     calibration={"seq_len": 128})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["quant_method"] == "w4a8-dint" and d["format"]["values"] == list(F.get_format("dint4-b").values)
    back = W4A8Config.from_dict(d)
    assert back == cfg and back.policy("x").smooth and back.policy("y").act_mode == "per-token"


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(quant_method="awq"), "quant_method"),
    (lambda d: d.update(version=99), "newer"),
    (lambda d: d.update(format={"name": "dint4-a", "values": [0.0] * 16}), "does not match"),
    (lambda d: d.update(format="dint4-a"), "format must be"),
    (lambda d: d.update(group_size=0), "group_size"),
    (lambda d: d.update(act_mode="per-row"), "act_mode"),
    (lambda d: d["layers"].update(z={"act_mode": "per-token", "bogus": 1}), "malformed"),
])
def test_bad_configs_are_refused(mutate, match):
    d = W4A8Config().to_dict()
    mutate(d)
    with pytest.raises((ConfigError, F.FormatError), match=match):
        W4A8Config.from_dict(d)


def test_skip_matching():
    cfg = W4A8Config(modules_to_not_convert=["lm_head", "model.layers.3"])
    assert cfg.is_skipped("lm_head") and cfg.is_skipped("model.layers.3.mlp.up_proj")
    assert not cfg.is_skipped("model.layers.30.mlp.up_proj") and not cfg.is_skipped("model.layers.0.q_proj")


def test_write_read_validate_round_trip(tmp_path):
    out, tensors = _write(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    back = C.load_tensors(out)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert C.validate_checkpoint(out, STRUCTURE) == {"layers": 2, "tensors": 7, "format": "dint4-a", "group_size": 32,
                                                     "per_tensor": 1, "smooth": 1}
    assert not list(tmp_path.glob(".*partial*"))


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    out, tensors = _write(tmp_path, max_shard_bytes=1500)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / C.SAFE_INDEX).is_file()
    assert C.validate_checkpoint(out, STRUCTURE)["tensors"] == len(tensors)
    shards[-1].unlink()
    with pytest.raises(C.CheckpointError, match="missing shard"):
        C.load_tensors(out)


@pytest.mark.parametrize("max_shard_bytes", [2 * 1024**3, 1500])
def test_same_tensors_same_bytes(tmp_path, max_shard_bytes):
    # safetensors writes __metadata__ (format + quant_method) in a random order per save; 12 writes would
    # all agree by chance with probability 2^-11 without the writer's canonical header
    from safetensors import safe_open

    files = []
    for i in range(12):
        with torch.random.fork_rng():  # _write's embedding is torch.randn: the same tensors every time
            torch.manual_seed(0)
            out, tensors = _write(tmp_path, name=f"c{i}", max_shard_bytes=max_shard_bytes)
        files.append({p.name: p.read_bytes() for p in out.glob("*.safetensors")})
    assert (len(files[0]) == 1) == (max_shard_bytes > 1500) and all(f == files[0] for f in files)
    for name, data in files[0].items():
        n = int.from_bytes(data[:8], "little")
        assert data[8:8 + n].startswith(b'{"__metadata__":{"format":"pt","quant_method":"w4a8-dint"},')
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata() == {"format": "pt", "quant_method": "w4a8-dint"}
    back = C.load_tensors(out)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_truncated_and_corrupt_files_are_reported(tmp_path):
    out, _ = _write(tmp_path)
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(C.CheckpointError, match="truncated safetensors file"):
        C.validate_checkpoint(out, STRUCTURE)
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(C.CheckpointError, match="corrupt or truncated"):
        C.load_tensors(out)


def test_config_weight_mismatches(tmp_path):
    qcfg = W4A8Config(group_size=32)
    good = _layer_tensors("p", group=32)
    C.check_layer_tensors("p", good, qcfg)
    with pytest.raises(C.CheckpointError, match="p.weight_scale: expected F32"):
        C.check_layer_tensors("p", _layer_tensors("p", group=16), qcfg)  # scales for another group size
    bad = dict(good, **{"p.qweight": good["p.qweight"].to(torch.int8)})
    with pytest.raises(C.CheckpointError, match="p.qweight: expected U8"):
        C.check_layer_tensors("p", bad, qcfg)
    nan = dict(good, **{"p.weight_scale": good["p.weight_scale"].clone().fill_(float("nan"))})
    with pytest.raises(C.CheckpointError, match="non-finite"):
        C.check_layer_tensors("p", nan, qcfg)
    with pytest.raises(C.CheckpointError, match=r"p.input_scale: missing; it belongs to per-tensor"):
        C.check_layer_tensors("p", good, W4A8Config(group_size=32, layers={"p": LayerPolicy("per-tensor")}))
    with pytest.raises(C.CheckpointError, match=r"p.smooth_scale: present; it belongs to layers with smooth=true"):
        C.check_layer_tensors("p", _layer_tensors("p", smooth=True), qcfg)
    with pytest.raises(C.CheckpointError, match="does not divide"):
        C.check_layer_tensors("p", good, W4A8Config(group_size=48))


def test_failed_write_leaves_nothing(tmp_path):
    qcfg = W4A8Config(group_size=32)
    bad = _layer_tensors("p", group=16)  # validator refuses it inside the atomic block
    with pytest.raises(C.CheckpointError):
        C.write_checkpoint(tmp_path / "out", bad, {}, qcfg)
    assert list(tmp_path.iterdir()) == []


def test_existing_target_needs_overwrite(tmp_path):
    out, _ = _write(tmp_path)
    with pytest.raises(FileExistsError):
        _write(tmp_path)
    _write(tmp_path, overwrite=True)
    assert C.validate_checkpoint(out, STRUCTURE)["layers"] == 2


def test_pickle_only_dir_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": W4A8Config().to_dict()}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(C.CheckpointError, match="safetensors only"):
        C.validate_checkpoint(tmp_path)
