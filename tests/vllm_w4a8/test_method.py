"""The vLLM linear method in-process (TP=1): real SmolLM2 checkpoint tensors go through vLLM's own
fused layers and weight loaders, and the outputs must equal the reference on the HF parts bit for bit.

Also the refusal paths: fused parts with different policies, a checkpoint whose tensors do not
match its config (front-end validation and load-time checks), a fused layer missing a part,
fused parts that disagree on their shared input scale.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("vllm")

from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

from w4a8_dint import formats as F  # noqa: E402
from w4a8_dint.checkpoint import CheckpointError, load_tensors, read_qconfig  # noqa: E402
from w4a8_dint.config import (  # noqa: E402
    INPUT_SCALE,
    QWEIGHT,
    SMOOTH_SCALE,
    WEIGHT_GROUP_MULT,
    WEIGHT_SCALE,
    ConfigError,
    W4A8Config,
    read_quantized_weight,
)
from w4a8_dint.reference import w4a8_linear_reference  # noqa: E402
from w4a8_dint.vllm_w4a8 import plugin  # noqa: E402
from w4a8_dint.vllm_w4a8.method import KERNEL_ENV, W4A8DintConfig  # noqa: E402
from w4a8_dint.vllm_w4a8.validation import validate_for_serving  # noqa: E402

LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
HIDDEN, HEAD, HEADS, KV_HEADS, MLP = 576, 64, 9, 3, 1536
QKV_SHARDS = ("q", "k", "v")


def vllm_config_for(qconfig: W4A8Config | dict) -> W4A8DintConfig:
    plugin.register()
    d = qconfig.to_dict() if isinstance(qconfig, W4A8Config) else qconfig
    cfg = W4A8DintConfig.from_config(d)
    cfg.packed_modules_mapping = {k: list(v) for k, v in LLAMA_PACKED.items()}
    return cfg


def make_layer(kind: str, layer_idx: int, cfg: W4A8DintConfig, dtype: torch.dtype):
    """The vLLM layer Llama builds for one input site, with its HF part names in shard order."""
    base = f"model.layers.{layer_idx}"
    if kind == "qkv":
        layer = QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, params_dtype=dtype, quant_config=cfg,
                                  prefix=f"{base}.self_attn.qkv_proj")
        return layer, [f"{base}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")], list(QKV_SHARDS)
    if kind == "gate_up":
        layer = MergedColumnParallelLinear(HIDDEN, [MLP, MLP], bias=False, params_dtype=dtype, quant_config=cfg,
                                           prefix=f"{base}.mlp.gate_up_proj")
        return layer, [f"{base}.mlp.gate_proj", f"{base}.mlp.up_proj"], [0, 1]
    if kind == "o":
        layer = RowParallelLinear(HEADS * HEAD, HIDDEN, bias=False, params_dtype=dtype, quant_config=cfg,
                                  prefix=f"{base}.self_attn.o_proj")
        return layer, [f"{base}.self_attn.o_proj"], [None]
    layer = RowParallelLinear(MLP, HIDDEN, bias=False, params_dtype=dtype, quant_config=cfg,
                              prefix=f"{base}.mlp.down_proj")
    return layer, [f"{base}.mlp.down_proj"], [None]


def load_like_vllm(layer, parts, shard_ids, tensors, skip: set[str] = frozenset()):
    """What vLLM's model loader does for each checkpoint tensor of these HF parts."""
    for part, shard in zip(parts, shard_ids):
        for kind in (QWEIGHT, WEIGHT_SCALE, WEIGHT_GROUP_MULT, INPUT_SCALE, SMOOTH_SCALE):
            name = f"{part}.{kind}"
            if name not in tensors or name in skip:
                continue
            param = getattr(layer, kind)
            args = (shard,) if shard is not None else ()
            param.weight_loader(param, tensors[name], *args)


def reference_out(x, parts, tensors, qconfig: W4A8Config):
    outs = []
    for part in parts:
        qw = read_quantized_weight(part, tensors, qconfig)
        pol = qconfig.policy(part)
        outs.append(w4a8_linear_reference(x, qw, pol.act_mode, tensors.get(f"{part}.{INPUT_SCALE}"),
                                          tensors.get(f"{part}.{SMOOTH_SCALE}")))
    return torch.cat(outs, dim=-1)


def activations(k: int, m: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 20  # outlier channels, like real LLM activations
    return x.to(dtype)


# (site kind, layer index) -> what it exercises in the main checkpoint (conftest.smoothed_overrides)
SITES = [
    ("qkv", 0, "per-token fused qkv, no smoothing"),
    ("down", 0, "per-token row-parallel, no smoothing"),
    ("qkv", 1, "per-tensor static + smoothed fused qkv"),
    ("gate_up", 1, "smoothed fused gate/up"),
    ("down", 2, "per-tensor static + smoothed row-parallel"),
    ("o", 3, "smoothed row-parallel"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ckpt_name", ["channel_ckpt", "group_ckpt", "two_level_ckpt"])
def test_vllm_layers_match_reference_bit_for_bit(request, vllm_tp1, ckpt_name, dtype):
    ckpt = request.getfixturevalue(ckpt_name)
    qconfig = read_qconfig(ckpt.path)
    tensors = load_tensors(ckpt.path)
    cfg = vllm_config_for(qconfig)
    for kind, idx, what in SITES:
        layer, parts, shards = make_layer(kind, idx, cfg, dtype)
        if not any(f"{p}.{QWEIGHT}" in tensors for p in parts):
            continue
        load_like_vllm(layer, parts, shards, tensors)
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.w4a8_kernel.name == "onednn-int8", what
        k = tensors[f"{parts[0]}.{QWEIGHT}"].shape[1] * 2
        for m in (1, 5, 33):
            x = activations(k, m, dtype, seed=m + idx)
            out = layer(x)[0]
            expected = reference_out(x, parts, tensors, qconfig)
            assert out.dtype == dtype
            assert torch.equal(out, expected), f"{what} (M={m}): max diff {(out.float() - expected.float()).abs().max()}"


def test_forced_generic_kernel_also_matches(vllm_tp1, channel_ckpt, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "cpu-int8")
    qconfig = read_qconfig(channel_ckpt.path)
    tensors = load_tensors(channel_ckpt.path)
    layer, parts, shards = make_layer("gate_up", 1, vllm_config_for(qconfig), torch.float32)
    load_like_vllm(layer, parts, shards, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.w4a8_kernel.name == "cpu-int8"
    x = activations(HIDDEN, 3, torch.float32, seed=0)
    assert torch.equal(layer(x)[0], reference_out(x, parts, tensors, qconfig))


def test_skipped_modules_stay_unquantized(vllm_tp1):
    cfg = vllm_config_for(W4A8Config(modules_to_not_convert=["lm_head", "q_proj", "k_proj", "v_proj"]))
    layer, _, _ = make_layer("qkv", 0, cfg, torch.float32)
    assert isinstance(layer.quant_method, UnquantizedLinearMethod)


def test_fused_parts_must_agree(vllm_tp1):
    q = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ConfigError, match="one activation quantization"):
        make_layer("qkv", 0, vllm_config_for(W4A8Config(layers={q: {"act_mode": "per-tensor"}})), torch.float32)
    with pytest.raises(ConfigError, match="only some of the fused"):
        make_layer("qkv", 0, vllm_config_for(W4A8Config(modules_to_not_convert=["lm_head", q])), torch.float32)


def test_fused_input_scales_must_agree(vllm_tp1, channel_ckpt):
    qconfig = read_qconfig(channel_ckpt.path)
    tensors = dict(load_tensors(channel_ckpt.path))
    k_scale = "model.layers.1.self_attn.k_proj." + INPUT_SCALE
    tensors[k_scale] = tensors[k_scale] * 1.5
    layer, parts, shards = make_layer("qkv", 1, vllm_config_for(qconfig), torch.float32)
    load_like_vllm(layer, parts, shards, tensors)
    with pytest.raises(CheckpointError, match="input_scale differs between"):
        layer.quant_method.process_weights_after_loading(layer)


def test_fused_layer_missing_a_part_is_refused(vllm_tp1, channel_ckpt):
    qconfig = read_qconfig(channel_ckpt.path)
    tensors = load_tensors(channel_ckpt.path)
    layer, parts, shards = make_layer("qkv", 0, vllm_config_for(qconfig), torch.float32)
    load_like_vllm(layer, parts, shards, tensors, skip={"model.layers.0.self_attn.v_proj.qweight"})
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \['model.layers.0.self_attn.v_proj.qweight'\]"):
        layer.quant_method.process_weights_after_loading(layer)


def test_load_time_check_names_the_tensor(vllm_tp1, channel_ckpt, group_ckpt):
    """A per-channel config fed group-64 scales: refused while loading, naming the HF tensor."""
    tensors = load_tensors(group_ckpt.path)
    layer, parts, shards = make_layer("gate_up", 0, vllm_config_for(read_qconfig(channel_ckpt.path)), torch.float32)
    param = layer.weight_scale
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.weight_scale: expected F32 \[1536, 1\].*got F32 \[1536, 9\]"):
        param.weight_loader(param, tensors["model.layers.0.mlp.up_proj.weight_scale"], 1)


# -- front-end validation (what `vllm serve` runs before starting an engine) --------------------------

def _patched_copy(src, dst, patch_qconfig=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if patch_qconfig:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].update(patch_qconfig)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        from safetensors.torch import save_file

        t = dict(load_tensors(dst))
        edit_tensors(t)
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_front_end_validation_accepts_the_real_checkpoint(channel_ckpt):
    summary = validate_for_serving(channel_ckpt.path, read_qconfig(channel_ckpt.path))
    assert summary == {"layers": 210, "per_tensor": 4, "smooth": 203}


@pytest.mark.parametrize("case, message", [
    ("group_mismatch", r"weight_scale: expected F32 \[\d+, 9\] .*group_size=64; got F32 \[\d+, 1\]"),
    ("static_without_scale", r"model.layers.0.mlp.down_proj: input_scale missing \(needed by per-tensor"),
    ("smooth_not_in_config", r"model.layers.1.mlp.gate_proj.smooth_scale: present, but smooth_scale belongs to "
                             r"layers with smooth=true only"),
    ("quantized_but_skipped", r"o_proj.qweight: .*o_proj is quantized in the checkpoint but listed in modules_to_not_convert"),
    ("nan_scale", r"model.layers.4.self_attn.o_proj.weight_scale: 1 non-finite value"),
    ("truncated", r"model.safetensors: truncated safetensors file"),
    ("quantized_lm_head", r"lm_head.qweight: lm_head is quantized, but it is the model's output embedding and must stay"),
])
def test_front_end_validation_refuses_mismatch(tmp_path, channel_ckpt, case, message):
    src = channel_ckpt.path
    dst = tmp_path / case
    if case == "group_mismatch":
        _patched_copy(src, dst, {"group_size": 64})
    elif case == "static_without_scale":
        layers = {**channel_ckpt.qconfig.to_dict()["layers"], "model.layers.0.mlp.down_proj": {"act_mode": "per-tensor", "smooth": False}}
        _patched_copy(src, dst, {"layers": layers})
    elif case == "smooth_not_in_config":
        layers = {k: v for k, v in channel_ckpt.qconfig.to_dict()["layers"].items() if ".mlp.gate_proj" not in k}
        _patched_copy(src, dst, {"layers": layers})
    elif case == "quantized_but_skipped":
        _patched_copy(src, dst, {"modules_to_not_convert": ["lm_head", "o_proj"]})
    elif case == "quantized_lm_head":
        def quantize_head(t):  # a real packed copy of a decoder linear, stored under lm_head
            t["lm_head.qweight"] = t["model.layers.0.mlp.down_proj.qweight"].clone()
            t["lm_head.weight_scale"] = t["model.layers.0.mlp.down_proj.weight_scale"].clone()
        _patched_copy(src, dst, {"modules_to_not_convert": []}, edit_tensors=quantize_head)
    elif case == "nan_scale":
        def poison(t):
            t["model.layers.4.self_attn.o_proj.weight_scale"][3, 0] = float("nan")
        _patched_copy(src, dst, edit_tensors=poison)
    else:
        _patched_copy(src, dst)
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=message):
        validate_for_serving(dst, read_qconfig(dst))


# -- two-level scales -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,idx", [("qkv", 0), ("gate_up", 1), ("down", 2)])
def test_two_level_layers_are_one_gemm_with_per_channel_parameters(vllm_tp1, two_level_ckpt, kind, idx):
    qconfig = read_qconfig(two_level_ckpt.path)
    tensors = load_tensors(two_level_ckpt.path)
    layer, parts, shards = make_layer(kind, idx, vllm_config_for(qconfig), torch.bfloat16)
    n_local = layer.qweight.shape[0]
    groups = layer.qweight.shape[1] * 2 // 64
    assert layer.weight_scale.shape == (n_local, 1)  # per channel, along N
    assert layer.weight_group_mult.shape == (n_local, (groups + 1) // 2) and layer.weight_group_mult.dtype == torch.uint8
    load_like_vllm(layer, parts, shards, tensors)
    # The fused parts' multipliers land in their row ranges, byte for byte.
    rows = torch.cat([tensors[f"{p}.{WEIGHT_GROUP_MULT}"] for p in parts])
    assert torch.equal(layer.weight_group_mult.data, rows)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.w4a8_kernel.name == "onednn-int8" and layer.w4a8_kernel.num_groups == 1
    assert layer.w4a8_kernel.spec.two_level and layer.w4a8_kernel.spec.out_dtype == torch.bfloat16


def test_two_level_row_parallel_shard_keeps_whole_byte_pairs(vllm_tp1, two_level_ckpt):
    """What a TP=2 rank of down_proj (K=1536, 24 groups) loads: its 12 groups = 6 packed bytes per row."""
    from w4a8_dint.vllm_w4a8.method import W4A8DintLinearMethod

    qconfig = read_qconfig(two_level_ckpt.path)
    tensors = load_tensors(two_level_ckpt.path)
    cfg = vllm_config_for(qconfig)
    layer, parts, _ = make_layer("down", 0, cfg, torch.float32)
    full = tensors[f"{parts[0]}.{WEIGHT_GROUP_MULT}"]
    param = layer.weight_group_mult
    param.data = torch.empty(full.shape[0], full.shape[1] // 2, dtype=torch.uint8)  # one rank's slice
    param.tp_rank = 1
    param.weight_loader(param, full)
    assert torch.equal(param.data, full[:, full.shape[1] // 2:])
    unpacked = F.unpack_group_mult(full, 24)
    assert torch.equal(F.unpack_group_mult(param.data, 12), unpacked[:, 12:])
    # A rank holding an odd number of groups would split a byte: refused up front.
    method = W4A8DintLinearMethod(qconfig, "x.o_proj", ["x.o_proj"], qconfig.policy("x.o_proj"))
    shard = torch.nn.Module()
    shard.output_size = 576
    with pytest.raises(ConfigError, match="even number"):  # K=576 over 3 ranks: 192 = 3 groups each
        method.create_weights(shard, 192, [576], 576, 576, torch.float32, weight_loader=lambda *a: None)


def test_two_level_group_mult_out_of_range_is_refused_at_load(vllm_tp1, two_level_ckpt):
    qconfig = read_qconfig(two_level_ckpt.path)
    tensors = load_tensors(two_level_ckpt.path)
    layer, parts, shards = make_layer("down", 0, vllm_config_for(qconfig), torch.float32)
    bad = dict(tensors)
    bad[f"{parts[0]}.{WEIGHT_GROUP_MULT}"] = torch.full_like(tensors[f"{parts[0]}.{WEIGHT_GROUP_MULT}"], 0xFF)
    with pytest.raises(CheckpointError, match="must fit int8"):
        load_like_vllm(layer, parts, shards, bad)


# -- issue 12: the front end refuses what the checkpoint contract refuses, before any engine starts ----------

def _tiny_checkpoints():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "w4a8_dint" / "tiny_checkpoints.py"
    spec = importlib.util.spec_from_file_location("tiny_checkpoints", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case,message", [
    ("narrow_qweight", r"model.layers.1.self_attn.q_proj.qweight: expected U8 \[64, 32\].*got U8 \[64, 16\]"),
    ("missing_norm", r"tensors missing from the checkpoint .*\['model.norm.weight'\]"),
    ("input_scale_on_per_token", r"model.layers.1.self_attn.o_proj.input_scale: present, but input_scale belongs"),
])
def test_maybe_update_config_refuses_in_the_front_end(tmp_path, case, message):
    """What `vllm serve` runs while building its config: no engine process exists yet when this raises."""
    tiny = _tiny_checkpoints()
    good = tiny.rtn_checkpoint(tiny.tiny_model_dir("llama", tmp_path), tmp_path / "ckpt")

    def edit(t):
        if case == "narrow_qweight":
            p = "model.layers.1.self_attn.q_proj"
            t[f"{p}.qweight"] = t[f"{p}.qweight"][:, :16].contiguous()
            t[f"{p}.weight_scale"] = t[f"{p}.weight_scale"][:, :1].contiguous()
        elif case == "missing_norm":
            del t["model.norm.weight"]
        else:
            t["model.layers.1.self_attn.o_proj.input_scale"] = torch.tensor([0.1])

    bad = tiny.edited_copy(good, tmp_path / "bad", edit)
    config = W4A8DintConfig.from_config(json.loads((bad / "config.json").read_text())["quantization_config"])
    config.maybe_update_config(str(good))  # the untouched checkpoint passes
    with pytest.raises(CheckpointError, match=rf"w4a8-dint refuses {bad}: .*{message}"):
        config.maybe_update_config(str(bad))
