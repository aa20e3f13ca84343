#!/usr/bin/env python3
"""A VM with two disks (one of an odd size), random data, zero writes and
discards; a full and five incrementals with writes in between.  Every point
must equal a reference taken at its point in time, read by stock qemu-img
through the relative backing chain, and by qbak restore (raw and qcow2);
every file must pass qemu-img check; the repository must still read after
being moved."""
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
# Push mode unless a wrapper (its -pull.py twin) asks for another.
os.environ.setdefault("QBAK_MODE", "push")
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("chain")
SIZES = {"vd0": 48 << 20, "vd1": (9 << 20) + 7 * 512 + 333 * 0}
disks = [(d, make_disk(os.path.join(w, d + ".qcow2"), s), "qcow2")
         for d, s in SIZES.items()]
vm = VM(w, disks)
rng = random.Random(20261125)
repo = os.path.join(w, "repo")
refs = []  # (point, {disk: reference})
try:
    for i in range(6):
        for dev, size in SIZES.items():
            random_writes(vm, dev, size, rng, 40 if i == 0 else 12)
        # The reference is the disk at the point in time: vCPUs are paused
        # and nothing else writes until the transaction has run.
        ref = {dev: vm.reference(dev, os.path.join(w, "ref-%d-%s.raw" % (i, dev)))
               for dev in SIZES}
        res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1")
        types = {d["disk"]: d["type"] for d in res["disks"]}
        check(set(types) == set(SIZES), "disks backed up: %s" % types)
        want = "full" if i == 0 else "incremental"
        check(all(t == want for t in types.values()), "point %d: %s" % (i, types))
        check(all(d["reason"] is None for d in res["disks"]), "no reason expected")
        check((res["parent"] is None) == (i == 0), "parent %r" % res["parent"])
        if i > 0:
            check(res["parent"] == refs[-1][0], "parent is the previous point")
        refs.append((res["point"], ref))
        # QEMU's view is unchanged by the backup, and no leftovers stay.
        check(vm.jobs() == [], "jobs left in QEMU: %s" % vm.jobs())
        check(not [n for n in vm.block_nodes() if n.startswith("qbak")],
              "qbak nodes left in QEMU")
        bms = vm.bitmaps("drive0")
        check(len(bms) == 1 and bms[0]["recording"] and not bms[0]["busy"],
              "one recording bitmap per disk: %s" % bms)
        # An incremental carries only the changed clusters.
        if i > 0:
            for d in res["disks"]:
                check(d["bytes_written"] < SIZES[d["disk"]] // 2,
                      "incremental %s wrote %d bytes" % (d["disk"], d["bytes_written"]))

    listing = qbak_json("list", "--repo", repo, "--vm", "vm1")
    check([p["point"] for p in listing["points"]] == [p for p, _ in refs],
          "list shows every point, oldest first: %s" % listing)

    # Move the repository: relative backing names must keep it readable.
    moved = os.path.join(w, "moved-repo")
    shutil.move(repo, moved)
    for point, ref in refs:
        for dev in SIZES:
            f = os.path.join(moved, "vm1", point, dev + ".qcow2")
            img_check(f)
            img_compare(f, ref[dev], fmt_a="qcow2")
            out = os.path.join(w, "restore-%s-%s.raw" % (point, dev))
            qbak("restore", "--repo", moved, "--vm", "vm1", "--disk", dev,
                 "--point", point, "--output", out)
            check(os.path.getsize(out) == SIZES[dev], "restored size of %s" % dev)
            img_compare(out, ref[dev], fmt_a="raw")
            os.unlink(out)
    # The newest point by default, as qcow2.
    out = os.path.join(w, "restore-latest.qcow2")
    r = qbak_json("restore", "--repo", moved, "--vm", "vm1", "--disk", "vd1",
                  "--output", out, "--format", "qcow2")
    check(r["point"] == refs[-1][0], "default point is the newest")
    img_check(out)
    img_compare(out, refs[-1][1]["vd1"], fmt_a="qcow2")
    # A block device as the output: its old contents must not show through
    # the zero ranges, so those are written, not skipped.
    if os.geteuid() == 0 and shutil.which("losetup"):
        backing = os.path.join(w, "loop.img")
        with open(backing, "wb") as f:
            f.write(b"\xff" * SIZES["vd1"])
        dev = run(["losetup", "--find", "--show", backing], check_rc=False).stdout.strip()
        if dev:
            try:
                qbak("restore", "--repo", moved, "--vm", "vm1", "--disk", "vd1",
                     "--output", dev, "--force")
                img_compare(dev, refs[-1][1]["vd1"], fmt_a="raw")
            finally:
                run(["losetup", "-d", dev], check_rc=False)
    # An existing output is not overwritten without --force.
    p = qbak("restore", "--repo", moved, "--vm", "vm1", "--disk", "vd1",
             "--output", out, check_rc=False)
    check(p.returncode != 0 and "exists" in p.stderr, "refuses to overwrite: %s" % p.stderr)
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: full + 5 incrementals on two disks verified by qemu-img and qbak restore")
