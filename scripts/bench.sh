#!/usr/bin/env bash
# qbak's benchmark (`make bench`): installs what is missing, builds
# qbak, then runs scripts/bench.py with the arguments given here:
#   scripts/bench.sh            reference run: 4 GiB source disk, 3 runs (10+ min)
#   scripts/bench.sh --quick    256 MiB, 1 run: checks the script in under a minute
# Needs root to drop the page cache before each timed step.  Results:
# build/bench/results.json and build/bench/results.png.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Benchmark-only extras: gnuplot for the chart, GNU time for peak RSS, nbdkit
# for the "QEMU push to an NBD server that discards the data" baseline;
# virtnbdbackup (pulls in python3-libvirt, python3-libnbd, nbdkit's python
# plugin) with libvirtd and virsh for its baseline, which starts libvirtd by
# hand when none runs (not libvirt-daemon-system: it would make systemd init).
extra=(gnuplot-nox nbdkit time virtnbdbackup libvirt-daemon libvirt-clients)
missing=()
for p in "${extra[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
        missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bench: missing ${missing[*]} (run as root, or install them): going on without" >&2
    else
        echo "bench: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
            { apt-get update -q >&2 &&
              apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; } ||
            echo "bench: could not install ${missing[*]}: going on without" >&2
    fi
fi
make -j2 qbak >/dev/null
exec python3 scripts/bench.py "$@"
