#!/usr/bin/env bash
# tiny-lora-k8s: node 0 (node-0), msrun node_rank 0, global ranks 0-1 of 2.
# Run it from the node's work directory: MindFormers writes output/ there.
set -euo pipefail
plan_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=/dev/null
source "${plan_dir}/"env/job.env
mkdir -p output/msrun_log output/launcher
exec msrun \
  --worker_num=2 \
  --local_worker_num=2 \
  --node_rank=0 \
  --master_addr=tiny-lora-k8s-sched.default.svc \
  --master_port=8118 \
  --log_dir=output/msrun_log \
  --join=True \
  --cluster_time_out=600 \
  "${plan_dir}/"entrypoint/finetune.py "${plan_dir}/"mindformers/run.yaml
