#!/usr/bin/env python3
"""Zeroes that reach qbak as data (a raw source disk holds written zero
blocks as data, so QEMU pushes them) are stored as zero clusters, not
written out: the file stays small and still reads back exactly."""
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
# Push mode unless a wrapper (its -pull.py twin) asks for another.
os.environ.setdefault("QBAK_MODE", "push")
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("zero-data")
SIZE = 32 << 20
raw = os.path.join(w, "d.raw")
with open(raw, "wb") as f:
    f.truncate(SIZE)
vm = VM(w, [("vd0", raw, "raw")])
repo = os.path.join(w, "repo")
try:
    vm.io("vd0", "write -P 0 0 24M")        # zero bytes, written as data
    vm.io("vd0", "write -P 0x5a 24M 4M")    # real data
    ref = vm.reference("vd0", os.path.join(w, "ref.raw"))
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1")
    f = os.path.join(repo, "vm1", res["point"], "vd0.qcow2")
    img_check(f)
    img_compare(f, ref, fmt_a="qcow2")
    written = res["disks"][0]["bytes_written"]
    check(written < (8 << 20), "24 MiB of zero data stored as zero clusters: %d bytes" % written)
    zero = [e for e in json.loads(run([QEMU_IMG, "map", "--output=json", f]).stdout)
            if e["start"] < (24 << 20) and e["zero"] and e["depth"] == 0]
    check(zero, "zero clusters in the layer itself")
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: zero data stored as zero clusters")
