#!/usr/bin/env bash
# qwen1-5-7b-full-acjob: one Worker pod of the AscendJob. Ascend Operator sets MS_WORKER_NUM, MS_LOCAL_WORKER,
# MS_NODE_RANK, MS_SCHED_HOST and MS_SCHED_PORT; the Scheduler pod runs the MS_SCHED process, so msrun
# here starts workers only (its master_addr is not an address of this pod).
set -euo pipefail
plan_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=/dev/null
source "${plan_dir}/"env/job.env
mkdir -p output/msrun_log output/launcher
exec msrun \
  --worker_num="${MS_WORKER_NUM:?set by Ascend Operator}" \
  --local_worker_num="${MS_LOCAL_WORKER:?set by Ascend Operator}" \
  --node_rank="${MS_NODE_RANK:?set by Ascend Operator}" \
  --master_addr="${MS_SCHED_HOST:?set by Ascend Operator}" \
  --master_port="${MS_SCHED_PORT:?set by Ascend Operator}" \
  --log_dir=output/msrun_log \
  --join=True \
  --cluster_time_out=600 \
  "${plan_dir}/"entrypoint/finetune.py "${plan_dir}/"mindformers/run.yaml
