#!/usr/bin/env python3
"""Faults on QEMU's side: a source read error (blkdebug) fails the whole
grouped backup and keeps every bitmap; a dropped NBD connection fails the
backup cleanly; QEMU killed during the job and while the job is pending:
the point is not listed, and after QEMU restarts the bitmap is found
inconsistent, removed, and the disk backed up in full with that reason."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
# Push mode unless a wrapper (its -pull.py twin) asks for another.
os.environ.setdefault("QBAK_MODE", "push")
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("faults-qemu")
repo = os.path.join(w, "repo")
rng = random.Random(9)
S0, S1 = 16 << 20, 64 << 20
disks = [("vd0", make_disk(os.path.join(w, "d0.qcow2"), S0), "qcow2"),
         ("vd1", make_disk(os.path.join(w, "d1.qcow2"), S1), "qcow2")]
# One read of vd1's image file at 40 MiB fails, once: the file reaches that
# offset only when the incremental's new data has been written.
BLKDEBUG = {1: "inject-error.0.event=read_aio,inject-error.0.errno=5,"
               "inject-error.0.iotype=read,inject-error.0.sector=%d,"
               "inject-error.0.once=on" % ((40 << 20) // 512)}


def backup(env=None, slow=False):
    args = [QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1"] + mode_args()
    if slow:
        args += ["--speed", str(2 << 20)]
    return subprocess.Popen(args, env=dict(os.environ, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def qbak_bitmaps():
    return {n: [(b["name"], b["count"]) for b in vm.bitmaps(n) if b["name"].startswith("qbak-")]
            for n in ("drive0", "drive1")}


vm = VM(w, disks, blkdebug=BLKDEBUG)
try:
    status = vm.qmp.cmd("query-status")["status"]
    vm.io("vd1", "write -P 0x21 0 8M")
    random_writes(vm, "vd0", S0, rng, 10)
    points = [oracle(vm, repo, "vm1", expect_points=[], run_state=status)["point"]]

    # Source read error: vd1's new data lies beyond 40 MiB in its file.
    vm.io("vd1", "write -P 0x22 8M 48M")
    random_writes(vm, "vd0", S0, rng, 5)
    before = qbak_bitmaps()
    p = backup()
    out, err = p.communicate(timeout=120)
    check(p.returncode == 1 and "vd" in err and "error" in err.lower(),
          "read error fails the backup: %d %s\n%s" % (p.returncode, err, vm.new_log()))
    check(list_points(repo, "vm1") == points, "nothing listed")
    check(qbak_bitmaps() == before, "every bitmap kept as it was: %s -> %s"
          % (before, qbak_bitmaps()))
    res = oracle(vm, repo, "vm1", expect_points=points, run_state=status)
    check(all(d["type"] == "incremental" for d in res["disks"]), "still incremental")
    points.append(res["point"])

    # The NBD connection breaks under the 5th request.
    vm.io("vd0", "write -P 0x23 0 4M")
    p = backup({"QBAK_FAULT_NBD_DROP": "5"})
    out, err = p.communicate(timeout=120)
    check(p.returncode == 1 and "NBD" in err, "NBD drop fails the backup: %s" % err)
    check(len(err.strip().splitlines()) == 1, "one line: %r" % err)
    res = oracle(vm, repo, "vm1", expect_points=points, run_state=status)
    points.append(res["point"])
    vm.stop()

    # QEMU killed while the job runs.  The bitmaps were loaded from the
    # images at start, so an unclean exit leaves them inconsistent.
    for how in ("running", "pending"):
        vm = VM(w, disks)
        status = vm.qmp.cmd("query-status")["status"]
        random_writes(vm, "vd0", S0, rng, 10)
        vm.io("vd1", "write -P 0x24 0 16M")
        if how == "running" and backup_mode() == "push":
            p = backup(slow=True)
            deadline = time.time() + 20
            while not [j for j in vm.jobs() if j["status"] == "running"]:
                check(time.time() < deadline, "job never ran")
                time.sleep(0.02)
            vm.kill()
        else:
            # qbak stops itself once every job is pending (pull mode: once
            # it reads the point, or has read it all); QEMU dies; qbak goes
            # on and must not commit what QEMU can no longer vouch for.
            p = backup({"QBAK_CRASH_AT": "%s:stop" % how})
            deadline = time.time() + 30
            while not os.path.exists("/proc/%d" % p.pid) or \
                    open("/proc/%d/stat" % p.pid).read().split()[2] != "T":
                check(time.time() < deadline and p.poll() is None, "qbak never stopped")
                time.sleep(0.02)
            vm.kill()
            os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=120)
        check(p.returncode == 1, "%s: backup fails when QEMU dies: %s" % (how, err))
        check(list_points(repo, "vm1") == points, "%s: nothing listed" % how)
        vm = VM(w, disks)
        bms = [b for b in vm.bitmaps("drive1") if b["name"].startswith("qbak-")]
        check(bms and all(b.get("inconsistent") for b in bms),
              "%s: bitmap inconsistent after the crash: %s" % (how, bms))
        res = oracle(vm, repo, "vm1", expect_points=points,
                     run_state=vm.qmp.cmd("query-status")["status"])
        for d in res["disks"]:
            check(d["type"] == "full" and "inconsistent" in d["reason"],
                  "%s: %s full with reason: %s" % (how, d["disk"], d))
        points.append(res["point"])
        vm.stop()
finally:
    try:
        vm.stop()
    except Exception:
        pass
shutil.rmtree(w, ignore_errors=True)
log("ok: source read error, NBD drop, QEMU killed running and pending")
