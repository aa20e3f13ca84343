#!/usr/bin/env python3
"""A disk image reverted to an older copy outside QEMU (restored from
elsewhere, an old snapshot copied back) carries an older generation of the
chain's bitmap: the next backup must notice and take a full of that disk,
with the reason, instead of an incremental that would silently miss every
change between the copy and the last point."""
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("revert")
SIZE = 16 << 20
disks = [("vd0", make_disk(os.path.join(w, "d0.qcow2"), SIZE), "qcow2"),
         ("vd1", make_disk(os.path.join(w, "d1.qcow2"), SIZE), "qcow2")]
repo = os.path.join(w, "repo")
rng = random.Random(21)


def backup_checked(vm):
    refs = {d: vm.reference(d, os.path.join(w, "ref-%s.raw" % d)) for d, _, _ in disks}
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1")
    for d in res["disks"]:
        f = os.path.join(repo, "vm1", res["point"], d["file"])
        img_check(f)
        img_compare(f, refs[d["disk"]], fmt_a="qcow2")
    return {d["disk"]: d for d in res["disks"]}


vm = VM(w, disks)
try:
    for d, _, _ in disks:
        random_writes(vm, d, SIZE, rng, 10)
    backup_checked(vm)
    vm.stop()  # a clean stop stores the persistent bitmaps in the images
    shutil.copy(disks[0][1], os.path.join(w, "d0-old.qcow2"))

    vm = VM(w, disks)
    for d, _, _ in disks:
        random_writes(vm, d, SIZE, rng, 10)
    r = backup_checked(vm)
    check(all(x["type"] == "incremental" for x in r.values()), "second: %s" % r)
    vm.stop()

    # vd0 goes back to the older copy behind QEMU's back.
    shutil.copy(os.path.join(w, "d0-old.qcow2"), disks[0][1])
    vm = VM(w, disks)
    for d, _, _ in disks:
        random_writes(vm, d, SIZE, rng, 5)
    r = backup_checked(vm)
    check(r["vd0"]["type"] == "full" and "missing" in (r["vd0"]["reason"] or ""),
          "reverted disk backed up in full with the reason: %s" % r["vd0"])
    check(r["vd1"]["type"] == "incremental", "the other disk stays incremental: %s" % r["vd1"])
    r = backup_checked(vm)
    check(all(x["type"] == "incremental" for x in r.values()), "then incremental again: %s" % r)
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: a disk reverted outside QEMU is noticed")
