#!/usr/bin/env bash
# qwen1-5-7b-full-rt: node 1 (10.0.0.12), rank-table mode, global ranks 8-15 of 16.
# One process per rank, like run_singlenode.sh. Run it from the node's work directory.
set -euo pipefail
plan_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# MindFormers' launch scripts all raise the process limit (ulimit -u unlimited in scripts/msrun_launcher.sh,
# scripts/run_distribute.sh, research/run_singlenode.sh): each rank starts many threads.
# Where the hard limit forbids it, the soft limit goes as high as the hard one.
if ! ulimit -u unlimited 2>/dev/null; then
  ulimit -S -u "$(ulimit -H -u)"
  echo "launcher: the process limit cannot be unlimited here; raised to the hard limit, $(ulimit -u)" >&2
fi
# CANN's environment (LD_LIBRARY_PATH, ASCEND_OPP_PATH, te/tbe on PYTHONPATH): a non-login shell or a
# pod command that replaces the image's ENTRYPOINT has none of it. set_env.sh reads unset variables.
cann_set_env=/usr/local/Ascend/ascend-toolkit/set_env.sh
if [ ! -f "${cann_set_env}" ]; then
  echo "launcher: CANN's set_env.sh is missing at ${cann_set_env}; install the CANN toolkit there or set cluster.ascend_env.toolkit" >&2
  exit 2
fi
set +u
# shellcheck source=/dev/null
source "${cann_set_env}"
if [ -f /usr/local/Ascend/nnal/atb/set_env.sh ]; then
  # shellcheck source=/dev/null
  source /usr/local/Ascend/nnal/atb/set_env.sh
fi
set -u
# shellcheck source=/dev/null
source "${plan_dir}/"env/job.env
entrypoint="${plan_dir}/"entrypoint/finetune.py
config="${plan_dir}/"mindformers/run.yaml
status_dir=output/launcher
mkdir -p output/rank_log "${status_dir}"
export RANK_SIZE=16
export RANK_TABLE_FILE="${plan_dir}/"ranktable/hccl.json

pids=()
ranks=()
RANK_ID=8 DEVICE_ID=0 \
  python "${entrypoint}" "${config}" >output/rank_log/rank_8.log 2>&1 &
pids+=("$!")
ranks+=(8)
RANK_ID=9 DEVICE_ID=1 \
  python "${entrypoint}" "${config}" >output/rank_log/rank_9.log 2>&1 &
pids+=("$!")
ranks+=(9)
RANK_ID=10 DEVICE_ID=2 \
  python "${entrypoint}" "${config}" >output/rank_log/rank_10.log 2>&1 &
pids+=("$!")
ranks+=(10)
RANK_ID=11 DEVICE_ID=3 \
  python "${entrypoint}" "${config}" >output/rank_log/rank_11.log 2>&1 &
pids+=("$!")
ranks+=(11)
RANK_ID=12 DEVICE_ID=4 \
  python "${entrypoint}" "${config}" >output/rank_log/rank_12.log 2>&1 &
pids+=("$!")
ranks+=(12)
RANK_ID=13 DEVICE_ID=5 \
  python "${entrypoint}" "${config}" >output/rank_log/rank_13.log 2>&1 &
pids+=("$!")
ranks+=(13)
RANK_ID=14 DEVICE_ID=6 \
  python "${entrypoint}" "${config}" >output/rank_log/rank_14.log 2>&1 &
pids+=("$!")
ranks+=(14)
RANK_ID=15 DEVICE_ID=7 \
  python "${entrypoint}" "${config}" >output/rank_log/rank_15.log 2>&1 &
pids+=("$!")
ranks+=(15)

# Wait for every rank; the first one that fails stops the others.
while [ "${#pids[@]}" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "${pids[$i]}" || rc=$?
    echo "${rc}" >"${status_dir}/rank_${ranks[$i]}.exit"
    unset "pids[$i]"
    if [ "${rc}" -ne 0 ]; then
      echo "rank ${ranks[$i]} exited with code ${rc}; stopping the other ranks" >&2
      kill "${pids[@]}" 2>/dev/null || true
      wait || true
      exit "${rc}"
    fi
  done
  sleep 1
done
