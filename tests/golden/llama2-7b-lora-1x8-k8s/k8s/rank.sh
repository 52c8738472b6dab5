#!/usr/bin/env bash
# llama2-7b-lora-k8s: one MindSpore process in its pod. The pod's environment says which one:
# MS_ROLE/MS_NODE_ID (dynamic cluster) or RANK_ID/DEVICE_ID (rank table).
# Usage: bash k8s/rank.sh CONSOLE_LOG   (from the pod's working directory)
set -euo pipefail
plan_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
console_log="$1"
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
# msrun gives each worker RANK_ID; a per-rank pod has only MS_NODE_ID, and MindFormers and the
# entrypoint name their log and status files after RANK_ID (else every pod writes rank_0's).
if [ -n "${MS_NODE_ID:-}" ] && [ -z "${RANK_ID:-}" ]; then
  export RANK_ID="${MS_NODE_ID}"
fi
if [ -n "${MS_SCHED_HOST:-}" ]; then
  # MindSpore resolves the scheduler's name once and exits when it does not resolve yet (msrun's
  # _convert_addr_to_ip in mindspore/parallel/cluster/process_entity/_utils.py), and a headless Service
  # has no record until the scheduler's pod has an address: wait for the name first.
  sched_host="${MS_SCHED_HOST}"
  dns_deadline=$((SECONDS + 7200))
  until python3 -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "${sched_host}" 2>/dev/null; do
    if [ "${SECONDS}" -ge "${dns_deadline}" ]; then
      echo "launcher: the scheduler's address ${sched_host} does not resolve after 7200s;" \
        "check that the job's Service exists and its scheduler pod is running (cluster.cluster_time_out sets the wait)" >&2
      exit 1
    fi
    sleep 2
  done
fi
mkdir -p "$(dirname "${console_log}")" output/launcher
python "${plan_dir}/"entrypoint/finetune.py "${plan_dir}/"mindformers/run.yaml 2>&1 | tee "${console_log}"
