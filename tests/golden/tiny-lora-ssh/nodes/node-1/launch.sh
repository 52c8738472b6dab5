#!/usr/bin/env bash
# tiny-lora-ssh: node 1 (10.231.0.12), msrun node_rank 1, global ranks 1-1 of 2.
# Run it from the node's work directory: MindFormers writes output/ there.
set -euo pipefail
plan_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=/dev/null
source "${plan_dir}/"env/job.env
mkdir -p output/msrun_log output/launcher
exec msrun \
  --worker_num=2 \
  --local_worker_num=1 \
  --node_rank=1 \
  --master_addr=10.231.0.11 \
  --master_port=8118 \
  --log_dir=output/msrun_log \
  --join=True \
  --cluster_time_out=600 \
  "${plan_dir}/"entrypoint/finetune.py "${plan_dir}/"mindformers/run.yaml
