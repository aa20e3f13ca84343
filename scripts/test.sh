#!/usr/bin/env bash
# The whole test suite from a fresh checkout: install what is missing, build
# with -Werror under CI, run every test.  This is what .ci/run runs.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
make -j2 all
tests/run "$@"
