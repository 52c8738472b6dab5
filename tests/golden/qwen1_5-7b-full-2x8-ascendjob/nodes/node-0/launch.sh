#!/usr/bin/env bash
# qwen1-5-7b-full-acjob: node 0 (ascend-node-0), msrun node_rank 0, global ranks 0-7 of 16.
# Run it from the node's work directory: MindFormers writes output/ there.
set -euo pipefail
plan_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=/dev/null
source "${plan_dir}/"env/job.env
mkdir -p output/msrun_log output/launcher
# msrun numbers devices 0..n-1 on each node; this maps them onto the devices the job names.
export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7
exec msrun \
  --worker_num=16 \
  --local_worker_num=8 \
  --node_rank=0 \
  --master_addr=qwen1-5-7b-full-acjob-sched.llm.svc \
  --master_port=8118 \
  --log_dir=output/msrun_log \
  --join=True \
  --cluster_time_out=600 \
  "${plan_dir}/"entrypoint/finetune.py "${plan_dir}/"mindformers/run.yaml
