#!/usr/bin/env bash
# Build ms2.7.2-mf1.8.0-cann8.5.0-py3.11-910b with docker, buildah or podman, whichever is found first.
# Written by 'launcher image render' from images/matrix.yaml; 'launcher image build' runs the same command.
#
# Usage: build.sh [CONTEXT_DIR [ENGINE_OPTION...]]
#   CONTEXT_DIR     the build context (default: this script's folder)
#   ENGINE_OPTION   passed to the engine, e.g. --build-arg HWHIAIUSER_UID=1001
#   ARCH=x86_64     build for another architecture than this machine's
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
context="${1:-${here}}"
if [ "$#" -gt 0 ]; then
  shift
fi
tag=ascend-mindformers:ms2.7.2-mf1.8.0-cann8.5.0-py3.11-910b
arch="${ARCH:-$(uname -m)}"
required=()
case "${arch}" in
  aarch64)
    platform=linux/arm64
    ;;
  x86_64)
    platform=linux/amd64
    ;;
  *)
    echo 'error: ms2.7.2-mf1.8.0-cann8.5.0-py3.11-910b is built for aarch64 or x86_64; set ARCH to one of them, not '"${arch}" >&2
    exit 2
    ;;
esac
for name in ${required[@]+"${required[@]}"}; do
  if [ ! -f "${context}/${name}" ]; then
    echo "error: ${context}/${name} is missing; put the CANN packages of this image in the build context" >&2
    exit 2
  fi
done

engine=""
for candidate in docker buildah podman; do
  if command -v "${candidate}" >/dev/null 2>&1; then
    engine="${candidate}"
    break
  fi
done
if [ -z "${engine}" ]; then
  echo "error: no container engine found: install docker, buildah or podman" >&2
  exit 1
fi
subcommand=build
if [ "${engine}" = buildah ]; then
  subcommand=bud
fi
echo "building ${tag} for ${platform} with ${engine}" >&2
exec "${engine}" "${subcommand}" --platform "${platform}" --build-arg "ARCH=${arch}" \
  -f "${here}/Dockerfile" -t "${tag}" "$@" "${context}"
