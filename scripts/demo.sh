#!/usr/bin/env bash
# qbak's main job on a throwaway VM: installs what is missing, builds, starts
# QEMU, backs up full then incremental, restores both points and compares
# them with what the disk held at each point.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
make -j2 qbak >/dev/null
exec python3 scripts/demo.py "$@"
