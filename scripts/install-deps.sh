#!/usr/bin/env bash
# Installs the Debian packages qbak needs to build, test and benchmark.
# Idempotent: runs apt-get only when something is missing.  Needs root.
set -eu
pkgs=(
    gcc make pkg-config libc6-dev           # build
    libjansson-dev libglib2.0-dev liburing-dev libxxhash-dev libnbd-dev
    qemu-system-x86 qemu-utils              # the real peer and the oracles
    python3 groff-base                      # integration tests (stdlib only; groff checks the man pages)
    clang                                   # make fuzz (libFuzzer)
    e2fsprogs cpio xz-utils gzip            # test guest (scripts/build-test-guest.sh)
    systemd                                 # systemd-analyze verify (tests/integration/test-install.py)
    debhelper dpkg-dev fakeroot lintian man-db  # make deb, lintian
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients  # the libvirt recipe's test
    libguestfs-dev libguestfs0              # ls, find, get, mount, index: libguestfs
    libguestfs-xfs linux-image-amd64        #   xfs in its appliance; the appliance's kernel
    fuse3                                   #   fusermount for qbak umount
    libguestfs-tools fdisk                  #   tests: guestfish builds disks, sfdisk reads them
)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
        missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages: ${missing[*]} (run as root)" >&2
    exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
