"""vLLM-CPU throughput: W4A8 (w4a8-dint) vs the unquantized model, side by side in one run.

Both engines are started once, each in its own process, and measured in alternating rounds
(bf16, w4a8, bf16, w4a8, ...) with the same prompts, so a load spike from other work on the
machine hits both; the table reports medians over rounds.

* prefill tokens/s: ``P`` prompts of ``L`` real-text tokens, one output token each
  (prefix caching off, so every round really prefills);
* decode tokens/s: ``B`` short prompts, ``T`` output tokens (ignore_eos); the prefill part,
  timed separately with one output token, is subtracted.

The default W4A8 checkpoint is a per-channel dint4-a RTN of the embedded SmolLM2 (speed does
not depend on how the weights were calibrated, only on the layout); pass ``--checkpoint`` for
a calibrated one. Writes benchmarks/results/vllm_throughput.json.

Usage: python benchmarks/vllm_throughput.py [--rounds 5] [--checkpoint DIR] [--group-size -1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "vllm_throughput.json"


# -- engine process ------------------------------------------------------------------------------

def engine_main(model: str, dtype: str, max_model_len: int) -> None:
    """Runs in a child process: load one engine, then serve timing requests read from stdin."""
    # Replies go to the original stdout; everything vLLM prints (here and in its engine
    # processes, which inherit fd 1) goes to stderr, i.e. the log file.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, enable_prefix_caching=False, seed=0)
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
        params = SamplingParams(max_tokens=req["max_tokens"], temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        print(json.dumps({"elapsed": elapsed, "generated": sum(len(o.outputs[0].token_ids) for o in outs),
                          "sample": outs[0].outputs[0].text[:60]}), file=replies, flush=True)


class Engine:
    def __init__(self, name: str, model: str, dtype: str, max_model_len: int, log_dir: Path) -> None:
        self.name = name
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.log_path = log_dir / f"vllm_throughput_{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--engine", model, "--dtype", dtype, "--max-model-len", str(max_model_len)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        t0 = time.perf_counter()
        if json.loads(self._readline()).get("ready") is not True:
            raise RuntimeError(f"{name}: engine did not start; see {self.log_path}")
        self.startup_s = time.perf_counter() - t0

    def _readline(self) -> str:
        line = self.proc.stdout.readline()
        while line and not line.lstrip().startswith("{"):  # vLLM may print to stdout too
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: engine exited ({self.proc.poll()}); see {self.log_path}")
        return line

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- inputs ----------------------------------------------------------------------------------------

def real_text_prompts(model_dir: Path, count: int, length: int) -> list[list[int]]:
    """``count`` distinct chunks of ``length`` tokens of PTB text (distinct: no cache can help)."""
    from transformers import AutoTokenizer

    from w4a8_dint.embedded import ptb_text

    ids = AutoTokenizer.from_pretrained(model_dir)(ptb_text("test")[: 40 * count * length]).input_ids
    if len(ids) < count * length:
        raise RuntimeError("not enough text for the requested prompts")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def rtn_checkpoint(source: Path, out: Path, group_size: int) -> Path:
    """Per-layer RTN dint4-a of every decoder linear: a layout-only checkpoint for speed runs."""
    from w4a8_dint import formats as F
    from w4a8_dint.checkpoint import load_tensors, write_checkpoint
    from w4a8_dint.config import QWEIGHT, WEIGHT_SCALE, W4A8Config

    if (out / "config.json").is_file():
        return out
    table = F.get_format(F.DEFAULT_FORMAT)
    tensors = {}
    for name, t in load_tensors(source).items():
        prefix = name[: -len(".weight")]
        if name.endswith("_proj.weight") and ".layers." in name:
            qw = F.quantize_weight(t.float(), table, group_size)
            tensors[f"{prefix}.{QWEIGHT}"], tensors[f"{prefix}.{WEIGHT_SCALE}"] = qw.packed, qw.scales
        else:
            tensors[name] = t
    hf_config = json.loads((source / "config.json").read_text())
    return write_checkpoint(out, tensors, hf_config, W4A8Config(group_size=group_size, method="rtn"), source_dir=source)


# -- measurement -------------------------------------------------------------------------------------

def measure(engines: dict[str, Engine], args, prefill_prompts, decode_prompts) -> dict[str, dict[str, list[float]]]:
    results = {name: {"prefill_tps": [], "decode_tps": [], f"decode_tps_b{args.decode_batch}": []} for name in engines}
    decode_key = f"decode_tps_b{args.decode_batch}"
    for rnd in range(args.rounds + 1):  # round 0 warms up (compile caches, oneDNN primitives)
        for name, eng in engines.items():
            pre = eng.run(prefill_prompts, 1)
            one = eng.run(decode_prompts[:1], 1)
            dec = eng.run(decode_prompts[:1], args.decode_tokens)
            one_b = eng.run(decode_prompts, 1)
            dec_b = eng.run(decode_prompts, args.decode_tokens)
            if rnd == 0:
                print(f"  {name}: warm-up done; sample output: {dec['sample']!r}", flush=True)
                continue
            n_pre = sum(len(p) for p in prefill_prompts)
            results[name]["prefill_tps"].append(n_pre / pre["elapsed"])
            results[name]["decode_tps"].append((args.decode_tokens - 1) / (dec["elapsed"] - one["elapsed"]))
            results[name][decode_key].append(
                len(decode_prompts) * (args.decode_tokens - 1) / (dec_b["elapsed"] - one_b["elapsed"]))
        if rnd:
            print(f"  round {rnd}/{args.rounds} done", flush=True)
    return results


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="unquantized model dir (default: the embedded SmolLM2)")
    p.add_argument("--checkpoint", default=None, help="w4a8-dint checkpoint (default: RTN of --base, per channel)")
    p.add_argument("--group-size", type=int, default=-1, help="group size of the default RTN checkpoint")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefill-prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--engine", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine:
        engine_main(args.engine, args.dtype, args.max_model_len)
        return 0

    from w4a8_dint.embedded import cache_dir, embedded_model_dir

    base = Path(args.base) if args.base else embedded_model_dir()
    ckpt = Path(args.checkpoint) if args.checkpoint else rtn_checkpoint(
        base, cache_dir() / f"bench-rtn-{base.name}-g{args.group_size}", args.group_size)
    prefill_prompts = real_text_prompts(base, args.prefill_prompts, args.prompt_len)
    decode_prompts = real_text_prompts(base, args.decode_batch, 32)
    load_before = os.getloadavg()
    log_dir = Path(args.out).parent
    log_dir.mkdir(parents=True, exist_ok=True)
    engines: dict[str, Engine] = {}
    try:
        for name, model in ((args.dtype, str(base)), ("w4a8-dint", str(ckpt))):
            print(f"starting {name} engine ({model}) ...", flush=True)
            engines[name] = Engine(name, model, args.dtype, args.max_model_len, log_dir)
            print(f"  ready after {engines[name].startup_s:.0f} s", flush=True)
        raw = measure(engines, args, prefill_prompts, decode_prompts)
    finally:
        for eng in engines.values():
            eng.close()
    kernel_lines = [ln.split("] ", 1)[-1] for ln in engines["w4a8-dint"].log_path.read_text().splitlines()
                    if "w4a8-dint:" in ln and "kernel" in ln]
    base_name, q_name = args.dtype, "w4a8-dint"
    metrics = list(raw[base_name])
    table = {m: {"base": statistics.median(raw[base_name][m]), "w4a8": statistics.median(raw[q_name][m])}
             for m in metrics}
    for m in metrics:
        table[m]["ratio"] = table[m]["w4a8"] / table[m]["base"]
    print(f"\n{'tokens/s (median of %d rounds)' % args.rounds:<34}{base_name:>12}{q_name:>12}{'ratio':>8}")
    labels = {"prefill_tps": f"prefill ({args.prefill_prompts}x{args.prompt_len} tok)",
              "decode_tps": "decode, batch 1",
              f"decode_tps_b{args.decode_batch}": f"decode, batch {args.decode_batch}"}
    for m in metrics:
        t = table[m]
        print(f"{labels[m]:<34}{t['base']:>12.1f}{t['w4a8']:>12.1f}{t['ratio']:>7.2f}x")
    result = {
        "benchmark": "vllm_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "versions": _versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("engine", "out")},
        "models": {"base": str(base), "w4a8": str(ckpt)},
        "kernels": kernel_lines,
        "startup_s": {n: round(e.startup_s, 1) for n, e in engines.items()},
        "median": table,
        "rounds": raw,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("vllm-cpu", "torch", "transformers", "w4a8-dint"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
