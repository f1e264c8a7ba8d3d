"""End to end: `vllm serve <w4a8-dint checkpoint> --quantization w4a8-dint` on 127.0.0.1.

One server (module scope) for the real embedded SmolLM2 quantized per channel with static and
smoothed layers. /v1/completions and /v1/chat/completions must give the reference model's greedy
text; the server must log the kernel it runs and stop cleanly on SIGINT. float32 so the only
difference from the reference is the float noise of vLLM's attention / norm kernels
(see conftest.assert_same_greedy).

LEAD: when hf_integration loads w4a8-dint checkpoints, add its greedy text next to
``channel_reference`` here: all three must agree.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VLLM_EXE = Path(sys.executable).with_name("vllm")
STARTUP_TIMEOUT_S = 900  # cold torch.compile on a busy 2-core box


def _post(url: str, payload: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


class Server:
    def __init__(self, ckpt: Path, workdir: Path, helpers) -> None:
        self.port = helpers.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(ckpt)
        self.log_path = workdir / "serve.log"
        cmd = [str(VLLM_EXE), "serve", self.model, "--quantization", "w4a8-dint", "--dtype", "float32",
               "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "512", "--seed", "0",
               "--shutdown-timeout", "30"]  # drain and stop the engine instead of killing it
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=helpers.engine_env(),
                                     cwd=workdir, start_new_session=True)
        self.returncode: int | None = None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            if _healthy(self.url):
                return
            time.sleep(2)
        raise AssertionError(f"vllm serve not ready after {STARTUP_TIMEOUT_S}s:\n{self.log()[-6000:]}")

    def log(self) -> str:
        if not self._log.closed:  # stop() closes it; the file stays readable
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 120) -> int:
        """SIGINT (what Ctrl-C sends), then wait; escalate only if it hangs."""
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
            self.returncode = self.proc.returncode
            self._log.close()
        return self.returncode


@pytest.fixture(scope="module")
def server(channel_ckpt, tmp_path_factory, helpers):
    srv = Server(channel_ckpt.path, tmp_path_factory.mktemp("serve"), helpers)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def channel_reference(channel_ckpt, helpers):
    return helpers.reference_outputs(channel_ckpt.path, channel_ckpt.float_dir)


def _completion(server: Server, prompt: str, helpers) -> dict:
    r = _post(server.url + "/v1/completions", {
        "model": server.model, "prompt": prompt, "max_tokens": helpers.MAX_NEW_TOKENS, "temperature": 0,
        "return_token_ids": True})
    choice = r["choices"][0]
    return {"text": choice["text"], "token_ids": _strip_eos(choice.get("token_ids"), r)}


def _strip_eos(ids, _response):
    # SmolLM2's EOS (<|im_end|>) is id 2; vLLM reports it among the ids when it stops there.
    return ids[:-1] if ids and ids[-1] == 2 else ids


def test_completions_and_chat_match_reference(server, channel_reference, helpers):
    got = {"completions": [_completion(server, p, helpers) for p in helpers.PROMPTS]}
    r = _post(server.url + "/v1/chat/completions", {
        "model": server.model, "messages": helpers.CHAT, "max_tokens": helpers.MAX_NEW_TOKENS, "temperature": 0,
        "return_token_ids": True})
    choice = r["choices"][0]
    got["chat"] = {"text": choice["message"]["content"], "token_ids": _strip_eos(choice.get("token_ids"), r),
                   "prompt_ids": r.get("prompt_token_ids") or choice.get("prompt_token_ids")}
    summary = helpers.check_run_against_reference(got, channel_reference, "vllm serve")
    print("vllm serve vs reference:", summary)


def test_server_log_names_the_int8_kernel(server):
    log = server.log()
    assert "w4a8-dint: checkpoint matches its config ({'layers': 210, 'per_tensor': 4, 'smooth': 203})" in log
    assert "run the 'onednn-int8' kernel (INT8 activations, per-token" in log
    assert "run the 'onednn-int8' kernel (INT8 activations, per-tensor" in log


def test_server_shuts_down_cleanly(server):
    assert server.stop() == 0, server.log()[-4000:]
    assert not _healthy(server.url)
    log = server.log()
    assert "all workers exited gracefully" in log  # --shutdown-timeout: drained, not killed
    serving, _, shutdown = log.partition("shutdown triggered")
    assert "Traceback" not in serving
    # vLLM 0.32's API server logs an EngineDeadError from its output handler once the engine has
    # exited, even on a graceful stop; anything from this package in a traceback would be ours.
    assert "w4a8_dint" not in shutdown and "vllm_w4a8" not in shutdown


def test_serve_refuses_checkpoint_that_does_not_match_its_config(channel_ckpt, tmp_path, helpers):
    """config.json says group 64, the tensors are per channel: exit before any engine starts, with a clear message."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(channel_ckpt.path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([str(VLLM_EXE), "serve", str(bad), "--dtype", "float32", "--port", str(helpers.free_port()),
                           "--max-model-len", "512"], env=helpers.engine_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "w4a8-dint refuses" in out and "the checkpoint does not match its quantization_config" in out
    # The contract's wording (w4a8_dint/contract.py), naming the tensor, the expected and the found shape:
    assert re.search(r"model\.layers\.\d+\.\S+\.weight_scale: expected F32 \[\d+, \d+\] for the layer's "
                     r"out_features=\d+, in_features=\d+, group_size=64; got F32 \[\d+, 1\]", out), out[-3000:]
    assert "Starting vLLM" not in out and "EngineCore" not in out  # refused before any engine process
