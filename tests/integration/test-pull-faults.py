#!/usr/bin/env python3
"""Pull mode (fleecing) under faults: the guest only ever waits for a local
copy to scratch.

- Guest writes while qbak is stopped mid-copy: QEMU's copy-before-write
  keeps the point in time in scratch; the point restores to the disk as it
  was at the start, and scratch is gone afterwards.
- qbak SIGKILLed mid-full: guest writes go on without an error, the VM
  keeps running, and the next run removes the filter, the export and the
  scratch file.
- Scratch full (--scratch-max, and a small tmpfs when we may mount one):
  the snapshot breaks, the backup fails, the guest sees no I/O error."""
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("pull-faults")
SIZE = 32 << 20
scratch = os.path.join(w, "scratch")
os.mkdir(scratch)
vm = VM(w, [("vd0", make_disk(os.path.join(w, "d0.qcow2"), SIZE), "qcow2")])
repo = os.path.join(w, "repo")
rng = random.Random(13)


def start_stopped(extra=()):
    """A pull backup that stops itself (SIGSTOP) once it reads the point."""
    env = dict(os.environ, QBAK_CRASH_AT="running:stop")
    p = subprocess.Popen([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo,
                          "--vm", "vm1", "--mode", "pull", "--scratch", scratch,
                          "--json"] + list(extra),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:
        if p.poll() is not None:
            fail("qbak ended before the copy: %s" % (p.communicate(),))
        st = open("/proc/%d/stat" % p.pid).read().rsplit(")", 1)[1].split()[0]
        if st == "T":
            return p
        check(time.time() < deadline, "qbak never reached the copy")
        time.sleep(0.02)


def guest_overwrite(n_mib, pattern):
    for i in range(n_mib):
        vm.io("vd0", "write -P 0x%02x %d 1048576" % (pattern, i << 20))
    vm.flush("vd0")


def scratch_files():
    return glob.glob(os.path.join(scratch, "*"))


try:
    status = vm.qmp.cmd("query-status")["status"]
    random_writes(vm, "vd0", SIZE, rng, 30)
    guest_overwrite(8, 0x11)  # data that copy-before-write must keep

    # 1. The point in time survives guest writes made while qbak reads it.
    before = vm.reference("vd0", os.path.join(w, "before.raw"))
    p = start_stopped()
    check(any(n.startswith("qbak") for n in vm.block_nodes()), "no fleecing nodes in QEMU")
    guest_overwrite(8, 0x5a)
    check(scratch_files(), "no scratch file while the backup runs")
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=300)
    check(p.returncode == 0, "backup with racing writes: %d %s" % (p.returncode, err))
    res = json.loads(out)
    check(res["mode"] == "pull", "mode reported: %s" % res.get("mode"))
    check(res["scratch_peak_bytes"] >= 8 << 20,
          "peak scratch %d: QEMU copied the old data of 8 MiB first" % res["scratch_peak_bytes"])
    img_compare(os.path.join(repo, "vm1", res["point"], "vd0.qcow2"), before, fmt_a="qcow2")
    check(not scratch_files(), "scratch left: %s" % scratch_files())
    check(not [n for n in vm.block_nodes() if n.startswith("qbak")], "nodes left")
    points = list_points(repo, "vm1")

    # 2. SIGKILL mid-copy: the guest goes on, the next run cleans up.
    random_writes(vm, "vd0", SIZE, rng, 10)
    p = start_stopped(["--full"])
    p.kill()
    p.communicate()
    guest_overwrite(4, 0x66)  # vm.io fails the test on any guest I/O error
    check(scratch_files(), "the killed run's scratch file is there")
    check(vm.qmp.cmd("query-status")["status"] == status, "VM state changed")
    res = oracle(vm, repo, "vm1", expect_points=points, run_state=status)
    check(any("scratch" in r for r in res["recovered"]) and
          any("filter" in r for r in res["recovered"]),
          "recovery removed the filter and scratch: %s" % res["recovered"])
    check(not scratch_files(), "scratch left after recovery: %s" % scratch_files())
    points = list_points(repo, "vm1")

    # 3. Scratch full: past --scratch-max the snapshot breaks, not the guest.
    p = start_stopped(["--scratch-max", "2M"])
    guest_overwrite(8, 0x77)
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=300)
    check(p.returncode == 1 and "point in time" in err,
          "a full scratch fails the backup: %d %s" % (p.returncode, err))
    check(not scratch_files(), "scratch left: %s" % scratch_files())
    oracle(vm, repo, "vm1", expect_points=points, run_state=status)
    points = list_points(repo, "vm1")

    # 4. The same with a file system that fills up (a 1 MiB tmpfs).
    if os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "qbak-test", scratch]).returncode == 0:
        try:
            p = start_stopped()
            guest_overwrite(8, 0x78)
            p.send_signal(signal.SIGCONT)
            out, err = p.communicate(timeout=300)
            check(p.returncode == 1 and "point in time" in err,
                  "a full scratch file system fails the backup: %d %s" % (p.returncode, err))
            check(not scratch_files(), "scratch left: %s" % scratch_files())
        finally:
            subprocess.run(["umount", scratch])
        oracle(vm, repo, "vm1", expect_points=points, run_state=status)
    else:
        log("note: not root or no tmpfs: the ENOSPC file system case is left out")
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: pull mode keeps the guest going through racing writes, SIGKILL and a full scratch")
