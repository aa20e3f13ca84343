#!/usr/bin/env python3
"""qbak killed with SIGKILL at each state of a backup (after the
transaction, job running, job pending, after fsync before the commit, after
the commit before finalize): the next run recovers and the oracle of
RELIABILITY.md holds.  A point appears only if the crash came after its
commit."""
import os
import random
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
# Push mode unless a wrapper (its -pull.py twin) asks for another.
os.environ.setdefault("QBAK_MODE", "push")
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("crash")
SIZE = 16 << 20
vm = VM(w, [("vd0", make_disk(os.path.join(w, "d0.qcow2"), SIZE), "qcow2"),
            ("vd1", make_disk(os.path.join(w, "d1.qcow2"), SIZE // 2), "qcow2")])
repo = os.path.join(w, "repo")
rng = random.Random(11)


def crash_backup(state, slow):
    env = dict(os.environ, QBAK_CRASH_AT=state)
    args = [QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1"] + mode_args()
    if slow:
        args += ["--speed", "2M"]  # so the job is seen running
    p = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    check(p.returncode == -9, "qbak should die by SIGKILL at %s: rc %d %s"
          % (state, p.returncode, p.stderr))


try:
    bad = qbak("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1", "--speed",
               "2X", check_rc=False)
    check(bad.returncode == 2 and "--speed must be a size" in bad.stderr,
          "--speed 2X is a usage error: %d %s" % (bad.returncode, bad.stderr))
    status = vm.qmp.cmd("query-status")["status"]
    # A crash during the very first (full) backup.
    random_writes(vm, "vd0", SIZE, rng, 20)
    crash_backup("running", True)
    res = oracle(vm, repo, "vm1", expect_points=[], run_state=status)
    check(res["recovered"], "recovery reported: %s" % res)
    points = [res["point"]]
    for state in ("transaction", "running", "pending", "fsynced", "committed"):
        for dev, size in (("vd0", SIZE), ("vd1", SIZE // 2)):
            random_writes(vm, dev, size, rng, 10)
        crash_backup(state, state == "running")
        listed = list_points(repo, "vm1")
        if state == "committed":
            check(len(listed) == len(points) + 1, "committed point listed")
            points = listed
        else:
            check(listed == points, "%s: no point listed: %s" % (state, listed))
        # Known limit of push mode (README, "Limits"): until QEMU notices
        # the dead NBD server, a guest write to a cluster the orphaned job
        # has not copied yet fails.  QEMU fails the job at its next request;
        # the writes below wait for that, so they test the next point, not
        # that window.
        deadline = time.time() + 30
        while [j for j in vm.jobs() if j["status"] in ("running", "created", "waiting")]:
            check(time.time() < deadline, "QEMU never noticed the dead NBD server")
            time.sleep(0.05)
        # More writes after the crash: the next point must hold them too.
        random_writes(vm, "vd1", SIZE // 2, rng, 5)
        res = oracle(vm, repo, "vm1", expect_points=points, run_state=status)
        check(all(d["type"] == "incremental" for d in res["disks"]),
              "%s: the chain goes on incrementally: %s" % (state, res["disks"]))
        # Pull mode gives QEMU's graph back before the commit: after it,
        # nothing is left to recover.
        if state in ("running", "pending", "fsynced") or (
                state == "committed" and backup_mode() == "push"):
            check(res["recovered"], "%s: recovery reported: %s" % (state, res))
        points.append(res["point"])
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: recovery from SIGKILL at every backup state")
