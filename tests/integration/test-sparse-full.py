#!/usr/bin/env python3
"""A full backup holds exactly what the guest saw at the point, whatever the
source's layout:
- a qcow2 image without backing file: qbak asks QEMU to copy only what is
  allocated in it (sync=top), so the unallocated part is never sent, and
  guest writes into it that race the job stay out of the point;
- a qcow2 overlay on a backing file: the backing file's data is in the full
  (a top-only copy would lose it)."""
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("sparse-full")
SIZE = 64 << 20
MiB = 1 << 20
repo = os.path.join(w, "repo")


def job_lengths(vm):
    """len of every job QEMU reported completed: what the job had to copy."""
    vm.jobs()  # reads the events that arrived meanwhile
    return [e["data"]["len"] for e in vm.qmp.events if e["event"] == "BLOCK_JOB_COMPLETED"]


def full_racing(vm, name, writes):
    """A slowed full while the test writes at the given offsets; the point
    must equal the disk as it was when the job started."""
    before = vm.reference("vd0", os.path.join(w, "before-%s.raw" % name))
    proc = subprocess.Popen([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo,
                             "--vm", name, "--speed", str(2 << 20), "--json",
                             "--mode", "push"],  # watches QEMU's job
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not [j for j in vm.jobs() if j["status"] == "running"]:
        check(time.time() < deadline and proc.poll() is None, "no running job seen")
        time.sleep(0.02)
    for off, pat in writes:
        vm.io("vd0", "write -P 0x%02x %d 65536" % (pat, off))
    check([j for j in vm.jobs() if j["status"] == "running"],
          "the job finished before the racing writes: race not tested")
    out, err = proc.communicate(timeout=60)
    check(proc.returncode == 0, "backup failed: %s" % err)
    res = json.loads(out)
    check(res["disks"][0]["type"] == "full", "expected a full: %s" % res)
    f = os.path.join(repo, name, res["point"], "vd0.qcow2")
    img_check(f)
    img_compare(f, before, fmt_a="qcow2")
    return res


# A standalone sparse image: data at 0-2 MiB, 20-21 MiB and the last MiB,
# zero clusters at 30-32 MiB, the rest (about 58 MiB) never allocated.
sparse = make_disk(os.path.join(w, "sparse.qcow2"), SIZE)
vm = VM(w, [("vd0", sparse, "qcow2")])
try:
    vm.io("vd0", "write -P 0x11 0 2M")
    vm.io("vd0", "write -P 0x22 20M 1M")
    vm.io("vd0", "write -P 0x33 %d 1M" % (SIZE - MiB))
    vm.io("vd0", "write -z 30M 2M")
    # Racing writes into never-allocated clusters (ahead of the job and
    # behind it) and into data the job has not copied yet.
    full_racing(vm, "sparse", [(40 * MiB, 0x44), (8 * MiB, 0x55), (SIZE - MiB, 0x66),
                               (MiB, 0x77)])
    lens = job_lengths(vm)
    check(lens and lens[-1] < 8 * MiB,
          "the job copied only the allocated part (<8 MiB), not %s of %d" % (lens, SIZE))
    oracle(vm, repo, "sparse")
finally:
    vm.stop()

# An overlay whose data is mostly in its backing file.
base = make_disk(os.path.join(w, "base.qcow2"), SIZE)
run([QEMU_IO, "-f", "qcow2", "-c", "write -P 0xa1 0 16M", "-c", "write -P 0xa2 48M 8M", base])
overlay = os.path.join(w, "overlay.qcow2")
run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay])
vm = VM(w, [("vd0", overlay, "qcow2")])
try:
    vm.io("vd0", "write -P 0xb1 4M 1M")
    ref = vm.reference("vd0", os.path.join(w, "overlay.raw"))
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "overlay",
                    "--mode", "push")  # watches QEMU's job
    check(res["disks"][0]["type"] == "full", "expected a full: %s" % res)
    img_compare(os.path.join(repo, "overlay", res["point"], "vd0.qcow2"), ref, fmt_a="qcow2")
    lens = job_lengths(vm)
    check(lens and lens[-1] == SIZE, "an overlay's full copies the whole disk: %s" % lens)
    oracle(vm, repo, "overlay")
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: fulls of a sparse image and of an overlay hold the point exactly")
