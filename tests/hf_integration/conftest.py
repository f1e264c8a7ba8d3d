"""Fixtures: RTN checkpoints of the embedded SmolLM2 and the reference W4A8 model they must match.

LEAD: when the calibrator lands, ``rtn_checkpoint.build_rtn_checkpoint`` can be swapped for it;
the tests only need a valid checkpoint with one static (per-tensor) layer and one smoothed layer.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from w4a8_dint.checkpoint import load_tensors, quantized_prefixes, read_qconfig
from w4a8_dint.config import BIAS, INPUT_SCALE, SMOOTH_SCALE, read_quantized_weight
from w4a8_dint.embedded import embedded_model_dir
from w4a8_dint.reference import w4a8_linear_reference

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROMPT = "The capital of France is"
NEW_TOKENS = 8


def _load_helper():
    spec = importlib.util.spec_from_file_location("hf_rtn_checkpoint", HERE / "rtn_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rtn = _load_helper()


def offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_python(code: str, cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter (the venv's), outside the repo, offline."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=offline_env(**env), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def fp_dir() -> Path:
    return embedded_model_dir()


@pytest.fixture(scope="session")
def ckpt_g64(tmp_path_factory, fp_dir) -> Path:
    """dint4-a, group 64, one per-tensor static layer, one smoothed layer."""
    return rtn.build_rtn_checkpoint(tmp_path_factory.mktemp("ckpt") / "g64", group_size=64, model_dir=fp_dir)


@pytest.fixture(scope="session")
def ckpt_two_level(tmp_path_factory, fp_dir) -> Path:
    """dint4-a, group 64 with two-level scales (integer multiplier x per-channel float), same special layers."""
    return rtn.build_rtn_checkpoint(tmp_path_factory.mktemp("ckpt") / "two-level", group_size=64, model_dir=fp_dir,
                                    scale_scheme="two-level")


@pytest.fixture(scope="session")
def ckpt_per_channel(tmp_path_factory, fp_dir) -> Path:
    """dint4-a, per output channel (the paper's setting), same special layers."""
    return rtn.build_rtn_checkpoint(tmp_path_factory.mktemp("ckpt") / "pc", group_size=-1, model_dir=fp_dir)


def reference_model(ckpt: Path, fp_dir: Path):
    """The float model with every quantized linear's forward replaced by ``reference.w4a8_linear_reference``
    on the checkpoint's tensors (float tensors also taken from the checkpoint). Ground truth for the HF path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    tensors = load_tensors(ckpt)
    qcfg = read_qconfig(ckpt)
    prefixes = quantized_prefixes(tensors)
    floats = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in prefixes}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    assert not unexpected
    for prefix in prefixes:
        lin = model.get_submodule(prefix)
        qw = read_quantized_weight(prefix, tensors, qcfg)
        lin.forward = partial(
            w4a8_linear_reference, weight=qw, act_mode=qcfg.policy(prefix).act_mode,
            input_scale=tensors.get(f"{prefix}.{INPUT_SCALE}"), smooth_scale=tensors.get(f"{prefix}.{SMOOTH_SCALE}"),
            bias=tensors.get(f"{prefix}.{BIAS}"),
        )
    return model
