#!/usr/bin/env bash
# qwen1-5-7b-full-acjob: one MindSpore process in its pod. The pod's environment says which one:
# MS_ROLE/MS_NODE_ID (dynamic cluster) or RANK_ID/DEVICE_ID (rank table).
# Usage: bash k8s/rank.sh CONSOLE_LOG   (from the pod's working directory)
set -euo pipefail
plan_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
console_log="$1"
# shellcheck source=/dev/null
source "${plan_dir}/"env/job.env
mkdir -p "$(dirname "${console_log}")" output/launcher
python "${plan_dir}/"entrypoint/finetune.py "${plan_dir}/"mindformers/run.yaml 2>&1 | tee "${console_log}"
