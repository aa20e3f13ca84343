#!/usr/bin/env python3
"""A stalled repository must not stall the guest without bound: when a
write to the repository hangs (a test hook holds it back 8 s), the backup
fails naming the stall once --stall-timeout (1 s) passes, and the next
backup is complete (RELIABILITY.md oracle).  In push mode, guest writes
waiting on copy-before-write are released by that watchdog; in pull mode
(test-faults-stall-pull.py) they never wait for the repository at all, only
for QEMU's copy to local scratch."""
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
w = workdir("faults-stall")
SIZE = 32 << 20
vm = VM(w, [("vd0", make_disk(os.path.join(w, "d0.qcow2"), SIZE), "qcow2")])
repo = os.path.join(w, "repo")
HOLD = 8
try:
    status = vm.qmp.cmd("query-status")["status"]
    for i in range(0, SIZE, 1 << 20):
        vm.io("vd0", "write -P 0x%02x %d 1048576" % (1 + i % 200, i))
    points = [qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1")["point"]]
    for i in range(0, SIZE, 1 << 20):
        vm.io("vd0", "write -P 0x%02x %d 1048576" % (0x80 + i % 100, i))
    env = dict(os.environ, QBAK_FAULT_STALL_WRITE="2:%d" % HOLD)
    t0 = time.time()
    proc = subprocess.Popen([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo,
                             "--vm", "vm1", "--stall-timeout", "1"] + mode_args(),
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    # The copy has started: QEMU's job (push) or QEMU's export (pull).
    while not (vm.qmp.cmd("query-block-exports") if backup_mode() == "pull"
               else vm.jobs()):
        check(time.time() < deadline and proc.poll() is None, "copy never started")
        time.sleep(0.01)
    # Guest writes to clusters the job has not copied: copy-before-write
    # makes them wait for qbak, whose repository is stuck.
    waits = []
    for k in range(4):
        t = time.time()
        vm.io("vd0", "write -P 0x%02x %d 65536" % (0x40 + k, SIZE - (k + 1) * (1 << 20)))
        waits.append(time.time() - t)
    out, err = proc.communicate(timeout=60)
    check(proc.returncode == 1 and "stalled" in err,
          "backup fails on the stall: rc %d %s %s" % (proc.returncode, out, err))
    if backup_mode() == "pull":
        check(max(waits) < 1, "pull mode: guest writes waited for the repository: "
              "%s s" % ["%.2f" % x for x in waits])
    else:
        check(max(waits) < HOLD - 2, "guest writes released by the watchdog, not the "
              "repository: waited %s s" % ["%.1f" % x for x in waits])
    log("guest writes waited %s s; qbak exited after %.1f s"
        % (["%.2f" % x for x in waits], time.time() - t0))
    oracle(vm, repo, "vm1", expect_points=points, run_state=status)
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: a stalled repository fails the backup, not the guest")
