#!/usr/bin/env bash
# qwen1-5-7b-full-k8s: node 0 (ascend-node-0), msrun node_rank 0, global ranks 0-7 of 16.
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
mkdir -p output/msrun_log output/launcher
# The pod names the scheduler's Service in MS_SCHED_HOST: each run of the job has its own.
# MindSpore resolves the scheduler's name once and exits when it does not resolve yet (msrun's
# _convert_addr_to_ip in mindspore/parallel/cluster/process_entity/_utils.py), and a headless Service
# has no record until the scheduler's pod has an address: wait for the name first.
sched_host="${MS_SCHED_HOST:?set in the pod}"
dns_deadline=$((SECONDS + 7200))
until python3 -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "${sched_host}" 2>/dev/null; do
  if [ "${SECONDS}" -ge "${dns_deadline}" ]; then
    echo "launcher: the scheduler's address ${sched_host} does not resolve after 7200s;" \
      "check that the job's Service exists and its scheduler pod is running (cluster.cluster_time_out sets the wait)" >&2
    exit 1
  fi
  sleep 2
done
exec msrun \
  --bind_core=True \
  --worker_num=16 \
  --local_worker_num=8 \
  --node_rank=0 \
  --master_addr="${MS_SCHED_HOST:?set in the pod}" \
  --master_port=8118 \
  --log_dir=output/msrun_log \
  --join=True \
  --cluster_time_out=7200 \
  "${plan_dir}/"entrypoint/finetune.py "${plan_dir}/"mindformers/run.yaml
