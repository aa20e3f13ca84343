#!/usr/bin/env python3
"""Falling back to a full backup, per disk, with the reason stated: the
chain's bitmap removed, a disk resized, a disk added, --full.  The other
disks stay incremental, and qbak's stale bitmaps are removed from QEMU."""
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("fallback")
sizes = {"vd0": 16 << 20, "vd1": 8 << 20}
disks = [(d, make_disk(os.path.join(w, d + ".qcow2"), s), "qcow2") for d, s in sizes.items()]
vm = VM(w, disks)
repo = os.path.join(w, "repo")
rng = random.Random(3)
nodes = {"vd0": "drive0", "vd1": "drive1", "vd2": "drive2"}


def backup_and_verify(*extra):
    refs = {d: vm.reference(d, os.path.join(w, "ref-%s.raw" % d)) for d in sizes}
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1", *extra)
    for d in res["disks"]:
        f = os.path.join(repo, "vm1", res["point"], d["file"])
        img_check(f)
        img_compare(f, refs[d["disk"]], fmt_a="qcow2")
        bms = [b for b in vm.bitmaps(nodes[d["disk"]]) if b["name"].startswith("qbak-")]
        check([b["name"] for b in bms] == [d["bitmap"]],
              "%s: exactly the chain's bitmap in QEMU: %s" % (d["disk"], bms))
    return {d["disk"]: d for d in res["disks"]}


def write_some():
    for d, s in sizes.items():
        random_writes(vm, d, s, rng, 8)


try:
    write_some()
    r = backup_and_verify()
    check(all(d["type"] == "full" and d["reason"] is None for d in r.values()), "first: %s" % r)

    # The chain's bitmap removed (as after a QEMU restart with a raw disk).
    write_some()
    vm.qmp.cmd("block-dirty-bitmap-remove", node="drive0", name=r["vd0"]["bitmap"])
    r = backup_and_verify()
    check(r["vd0"]["type"] == "full" and "missing" in r["vd0"]["reason"], "vd0: %s" % r["vd0"])
    check(r["vd1"]["type"] == "incremental" and r["vd1"]["reason"] is None, "vd1: %s" % r["vd1"])

    # A disk resized.
    write_some()
    sizes["vd1"] += 3 << 20
    vm.qmp.cmd("block_resize", **{"node-name": "drive1", "size": sizes["vd1"]})
    old = r["vd1"]["bitmap"]
    r = backup_and_verify()
    check(r["vd1"]["type"] == "full" and "size changed" in r["vd1"]["reason"], "vd1: %s" % r["vd1"])
    check(r["vd1"]["bitmap"] != old, "a new chain gets a new bitmap")
    check(r["vd0"]["type"] == "incremental", "vd0 stays incremental: %s" % r["vd0"])

    # A disk added to the running VM.
    path = make_disk(os.path.join(w, "vd2.qcow2"), 4 << 20)
    vm.qmp.cmd("blockdev-add", driver="file", filename=path, **{"node-name": "file2"})
    vm.qmp.cmd("blockdev-add", driver="qcow2", file="file2", **{"node-name": "drive2"})
    vm.qmp.cmd("device_add", driver="virtio-blk-pci", drive="drive2", id="vd2", bus="rp1")
    vm.disks.append(("vd2", path, "qcow2"))
    sizes["vd2"] = 4 << 20
    write_some()
    r = backup_and_verify()
    check(r["vd2"]["type"] == "full" and r["vd2"]["reason"] is None, "vd2: %s" % r["vd2"])
    check(r["vd0"]["type"] == "incremental" and r["vd1"]["type"] == "incremental", "%s" % r)

    # --full on request, then the new chains continue incrementally.
    write_some()
    r = backup_and_verify("--full")
    check(all(d["type"] == "full" and "--full" in d["reason"] for d in r.values()), "%s" % r)
    write_some()
    r = backup_and_verify("--disk", "vd1")
    check(list(r) == ["vd1"] and r["vd1"]["type"] == "incremental", "--disk: %s" % r)
    write_some()
    r = backup_and_verify()
    check(all(d["type"] == "incremental" for d in r.values()), "%s" % r)

    # An unknown --disk is an error naming it, and nothing is listed for it.
    n = len(qbak_json("list", "--repo", repo, "--vm", "vm1")["points"])
    p = qbak("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1",
             "--disk", "nosuch", check_rc=False)
    check(p.returncode == 1 and "nosuch" in p.stderr, "unknown disk: %s" % p.stderr)
    check(len(qbak_json("list", "--repo", repo, "--vm", "vm1")["points"]) == n, "nothing listed")
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: fallbacks to full with reasons, per disk")
