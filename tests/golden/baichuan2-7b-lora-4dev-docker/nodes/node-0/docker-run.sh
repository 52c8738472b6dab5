#!/usr/bin/env bash
# baichuan2-7b-lora: node 0 (910b-node-3) inside ascend-mindformers:ms2.2.10-cann7.0.0b1-py3.9-euler2.8.3-910b, with the node's Ascend devices and driver.
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
  --volume=/usr/local/dcmi:/usr/local/dcmi:ro \
  --volume="${run_dir}:${run_dir}" \
  --workdir="${run_dir}" \
  --env=LAUNCHER_RUN_ID \
  --env=LAUNCHER_JOB \
  --env=LAUNCHER_NODE \
  ascend-mindformers:ms2.2.10-cann7.0.0b1-py3.9-euler2.8.3-910b \
  bash "${here}/"launch.sh
