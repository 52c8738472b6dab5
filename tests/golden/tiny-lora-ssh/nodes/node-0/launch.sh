#!/usr/bin/env bash
# tiny-lora-ssh: node 0 (10.231.0.11), msrun node_rank 0, global ranks 0-0 of 2.
# Run it from the node's work directory: MindFormers writes output/ there.
set -euo pipefail
plan_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# MindFormers' launch scripts all raise the process limit (ulimit -u unlimited in scripts/msrun_launcher.sh,
# scripts/run_distribute.sh, research/run_singlenode.sh): each rank starts many threads.
# Where the hard limit forbids it, the soft limit goes as high as the hard one.
if ! ulimit -u unlimited 2>/dev/null; then
  ulimit -S -u "$(ulimit -H -u)"
  echo "launcher: the process limit cannot be unlimited here; raised to the hard limit, $(ulimit -u)" >&2
fi
# shellcheck source=/dev/null
source "${plan_dir}/"env/job.env
mkdir -p output/msrun_log output/launcher
exec msrun \
  --worker_num=2 \
  --local_worker_num=1 \
  --node_rank=0 \
  --master_addr=10.231.0.11 \
  --master_port=8118 \
  --log_dir=output/msrun_log \
  --join=True \
  --cluster_time_out=7200 \
  "${plan_dir}/"entrypoint/finetune.py "${plan_dir}/"mindformers/run.yaml
