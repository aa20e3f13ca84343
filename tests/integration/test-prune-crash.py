#!/usr/bin/env python3
"""qbak prune killed (SIGKILL, the model of power loss with every step
durable in order) at each step of removing a point and merging it: after
the intent log is written, after the point is delisted, after the points
whose layers the merge folds in with it are delisted, in the middle of
writing merged data, after the merge before any rename, between the
checksum and the layer renames, after the layer rename, after the
manifest update, before and after the directory removal.

After each kill: every point `list` shows restores byte-identical to its
reference (qbak restore, and qemu-img compare through the chain), every
listed layer passes qemu-img check.  Then the next prune (every other
crash point) or the next backup (the others) completes the work: the
policy's points listed and nothing else left (no delisted directory, no
.pruned-*, no .prune.json), all restoring right; a backup says what it
recovered.  Two disks, so a kill between the disks of one point is a
state too."""
import os
import random
import shutil
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

CRASH_POINTS = ["prune-journal", "prune-delisted", "prune-delisted-fold", "prune-merging",
                "prune-merged", "prune-renaming", "prune-renamed", "prune-manifest",
                "prune-removing", "prune-removed"]

require_qemu()
w = workdir("prune-crash")
SIZES = {"vd0": 16 << 20, "vd1": (5 << 20) + 3 * 512}
disks = [(d, make_disk(os.path.join(w, d + ".qcow2"), s), "qcow2")
         for d, s in SIZES.items()]
vm = VM(w, disks)
rng = random.Random(77)
repo = os.path.join(w, "repo")
vmdir = os.path.join(repo, "vm1")
refs = {}
counter = iter(range(1 << 30))
KEEP = 2


def backup(writes=8, full=False):
    for dev, size in SIZES.items():
        random_writes(vm, dev, size, rng, writes)
    i = next(counter)
    ref = {dev: vm.reference(dev, os.path.join(w, "ref-%d-%s.raw" % (i, dev))) for dev in SIZES}
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1",
                    *(["--full"] if full else []))
    refs[res["point"]] = ref
    # References of points that are gone are not needed any more.
    for p in list(refs):
        if p != res["point"] and not os.path.isdir(os.path.join(vmdir, p)):
            for f in refs.pop(p).values():
                os.unlink(f)
    return res


def verify_listed(what):
    points = list_points(repo, "vm1")
    check(points, "%s: points listed" % what)
    for p in points:
        for dev in SIZES:
            f = os.path.join(vmdir, p, dev + ".qcow2")
            img_check(f)
            img_compare(f, refs[p][dev], fmt_a="qcow2")
            out = os.path.join(w, "restore.raw")
            qbak("restore", "--repo", repo, "--vm", "vm1", "--disk", dev, "--point", p,
                 "--output", out, "--force")
            img_compare(out, refs[p][dev], fmt_a="raw")
            os.unlink(out)
    return points


def settled(expect):
    verify_listed("settled")
    points = list_points(repo, "vm1")
    check(points == expect, "listed %s, expected %s" % (points, expect))
    left = sorted(e for e in os.listdir(vmdir)
                  if e not in points and e not in (".id", ".lock", ".browse"))
    check(not left, "nothing else left in the VM directory: %s" % left)
    for p in points:
        check(not os.path.exists(os.path.join(vmdir, p, "pruning")), "%s not delisted" % p)


try:
    backup(writes=30, full=True)
    for n, at in enumerate(CRASH_POINTS):
        for _ in range(3):
            backup()
        before = list_points(repo, "vm1")
        log("crash at %s, points %s" % (at, before))
        p = run([QBAK, "prune", "--repo", repo, "--vm", "vm1", "--keep-last", str(KEEP)],
                check_rc=False, env=dict(os.environ, QBAK_CRASH_AT=at))
        check(p.returncode == -signal.SIGKILL,
              "%s: prune should be killed there: rc %d %s" % (at, p.returncode, p.stderr))
        listed = verify_listed(at)
        check(set(before[-KEEP:]) <= set(listed) <= set(before),
              "%s: listed %s of %s" % (at, listed, before))
        if n % 2 == 0:
            res = qbak_json("prune", "--repo", repo, "--vm", "vm1", "--keep-last", str(KEEP))
            check(res["kept"] == KEEP, "%s: prune after the crash: %s" % (at, res))
            settled(before[-KEEP:])
        else:
            res = backup(writes=4)
            log("recovered: %s" % res["recovered"])
            if at not in ("prune-removed",):
                check([r for r in res["recovered"] if "interrupted prune" in r],
                      "%s: the backup completed the prune: %s" % (at, res["recovered"]))
            settled(listed + [res["point"]])
            res = qbak_json("prune", "--repo", repo, "--vm", "vm1", "--keep-last", str(KEEP))
            settled(list_points(repo, "vm1")[-KEEP:])
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: a prune killed at any step loses nothing and is completed by the next run")
