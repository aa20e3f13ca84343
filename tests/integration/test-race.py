#!/usr/bin/env python3
"""The point in time is the transaction (push) or the filter's insertion
(pull): guest writes that land while a (slowed, --speed) copy runs are not
in this point, and are in the next one."""
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
w = workdir("race")
SIZE = 32 << 20
disk = make_disk(os.path.join(w, "d.qcow2"), SIZE)
vm = VM(w, [("vd0", disk, "qcow2")])
repo = os.path.join(w, "repo")
rng = random.Random(7)


def copying():
    """The backup is moving data: QEMU's job runs (push), or QEMU exports
    the point for qbak to read (pull)."""
    if backup_mode() == "pull":
        return bool(vm.qmp.cmd("query-block-exports"))
    return bool([j for j in vm.jobs() if j["status"] == "running"])


def backup_while_writing(kind, writes, speed):
    """A backup slowed to speed bytes/s: the callers give it 8 s or more
    of copying, far longer than the few writes below take even on a
    loaded machine, so they race the copy."""
    before = vm.reference("vd0", os.path.join(w, "before-%s.raw" % kind))
    proc = subprocess.Popen([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo,
                             "--vm", "vm1", "--speed", str(speed), "--json"]
                            + mode_args(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not copying():
        check(time.time() < deadline and proc.poll() is None, "no copy in progress seen")
        time.sleep(0.02)
    for off in writes:
        vm.io("vd0", "write -P 0x%02x %d 65536" % (rng.randrange(1, 255), off))
    # QEMU passes a guest flush on to the job's target, which offers none:
    # the flush must still succeed for the guest.
    vm.flush("vd0")
    check(copying(), "the copy finished before the racing writes: race not tested")
    out, err = proc.communicate(timeout=60)
    check(proc.returncode == 0, "backup failed: %s" % err)
    res = json.loads(out)
    check(res["disks"][0]["type"] == kind, "expected %s: %s" % (kind, res))
    f = os.path.join(repo, "vm1", res["point"], "vd0.qcow2")
    img_check(f)
    img_compare(f, before, fmt_a="qcow2")
    return res


try:
    for i in range(0, SIZE, 1 << 20):  # data everywhere: the job has work to do
        vm.io("vd0", "write -P 0x%02x %d 1048576" % (1 + i % 200, i))
    # Writes both ahead of the job (not copied yet) and behind it.
    backup_while_writing("full", [SIZE - (1 << 20), SIZE // 2, 0, 65536 * 3], SIZE // 8)
    for i in range(0, SIZE, 4 << 20):  # 8 MiB for the incremental to copy
        vm.io("vd0", "write -P 0x%02x %d 1048576" % (0x30 + i % 100, i))
    backup_while_writing("incremental", [SIZE - 65536, 4 << 20, 8 << 20], 1 << 20)
    # The racing writes are in the next point.
    after = vm.reference("vd0", os.path.join(w, "after.raw"))
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1")
    check(res["disks"][0]["type"] == "incremental", "third backup incremental")
    img_compare(os.path.join(repo, "vm1", res["point"], "vd0.qcow2"), after, fmt_a="qcow2")
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: racing guest writes stay out of the point and land in the next")
