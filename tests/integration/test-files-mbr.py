#!/usr/bin/env python3
"""File-level access on an MBR disk with btrfs, vfat and ntfs.

Two qbak points of a real QEMU whose disk is tests/lib/qbaktest.py
files_mbr_fixture().  Two copies of one btrfs cannot be mounted in one
appliance (its kernel refuses the second fsid), so index must start a
second appliance for the second point's btrfs, and still list both.
find answers for btrfs (a subvolume shows as a directory), vfat and ntfs
from the catalogs, and ls reads the ntfs partition.  The repository stays
byte-identical apart from the catalogs."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("files-mbr")
raw = files_mbr_fixture()
disk = os.path.join(w, "disk.qcow2")
run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", raw, disk])
repo = os.path.join(w, "repo")
vm = VM(w, [("vd0", disk, "qcow2")])
points = []
try:
    for i in range(2):
        if i:
            vm.io("vd0", "write -P 0x5a %d 4096" % (512 << 10))  # in the gap before partition 1
        points.append(qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "m")["point"])
finally:
    vm.stop()
P1, P2 = points
before = tree_hashes(repo)
common = ["--repo", repo, "--vm", "m"]

t = time.monotonic()
r = qbak_json("index", *common)
log("qbak index: %.1f s, %d launches" % (time.monotonic() - t, r["launches"]))
check([p["point"] for p in r["points"] if p["indexed"]] == points, "index %s" % r)
check(r["launches"] == 2, "two btrfs copies need two appliances, got %d launches" % r["launches"])
log("PASS index of 2 points holding one btrfs: a second appliance for the second copy")

r = qbak_json("find", *common, "--fs", "1", "--name", "*.txt")
got = [(m["point"], m["path"], m["change"]) for m in r["matches"]]
want = []
for pt in points:
    for p in sorted(["/dir/inner.txt", "/sub/in-subvolume.txt", "/top.txt"]):
        want.append((pt, p, "new" if pt == P1 else "same"))
check(got == want and r["launches"] == 0, "find btrfs:\n got %s\nwant %s" % (got, want))
r = qbak_json("find", *common, "--fs", "2", "--name", "*.TXT")
check([(m["point"], m["path"]) for m in r["matches"]] == [(P1, "/DOS.TXT"), (P2, "/DOS.TXT")],
      "find vfat %s" % r["matches"])
r = qbak_json("find", *common, "--fs", "3", "--name", "win.txt")
check([(m["point"], m["path"], m["size"]) for m in r["matches"]] == [(P1, "/win.txt", 8), (P2, "/win.txt", 8)],
      "find ntfs %s" % r["matches"])
log("PASS find in btrfs (with a subvolume), vfat and ntfs from the catalogs")

r = qbak_json("ls", *common, "--fs", "3", "/")
names = [e["name"] for e in r["entries"]]
check("win.txt" in names and [e["size"] for e in r["entries"] if e["name"] == "win.txt"] == [8],
      "ls ntfs: %s" % names)
log("PASS ls of the ntfs partition of an MBR disk")
check_repo_unchanged(before, tree_hashes(repo))
log("PASS repository byte-identical (catalogs added)")
shutil.rmtree(w, ignore_errors=True)
