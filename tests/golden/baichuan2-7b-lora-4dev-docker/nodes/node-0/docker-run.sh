#!/usr/bin/env bash
# baichuan2-7b-lora: node 0 (910b-node-3) inside swr.cn-south-1.myhuaweicloud.com/ascendhub/mindformers:1.8.0-ms2.7.2-cann8.3, with the node's Ascend devices and driver.
# Run it from the node's work directory; the container sees that directory at the same path.
set -euo pipefail
run_dir="$(pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec docker run --rm \
  --name "launcher-${LAUNCHER_RUN_ID:?set by the launcher}-node-"0 \
  --ipc=host \
  --network=host \
  --device=/dev/davinci0 \
  --device=/dev/davinci1 \
  --device=/dev/davinci2 \
  --device=/dev/davinci3 \
  --device=/dev/davinci_manager \
  --device=/dev/devmm_svm \
  --device=/dev/hisi_hdc \
  --volume=/usr/local/Ascend/driver:/usr/local/Ascend/driver:ro \
  --volume=/usr/local/bin/npu-smi:/usr/local/bin/npu-smi:ro \
  --volume=/etc/ascend_install.info:/etc/ascend_install.info:ro \
  --volume="${run_dir}:${run_dir}" \
  --workdir="${run_dir}" \
  --env=LAUNCHER_RUN_ID \
  --env=LAUNCHER_JOB \
  --env=LAUNCHER_NODE \
  swr.cn-south-1.myhuaweicloud.com/ascendhub/mindformers:1.8.0-ms2.7.2-cann8.3 \
  bash "${here}/"launch.sh
