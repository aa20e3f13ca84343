#!/usr/bin/env python3
"""Repository faults: full file system (real ENOSPC on a small tmpfs), EIO
and short writes from io_uring, fsync failure.  Each failed backup removes
its partial files, leaves the bitmap untouched and lists nothing; guest
writes racing the failing backup succeed; the next backup is complete
(RELIABILITY.md oracle).  A failed fsync is never retried into success."""
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
if os.geteuid() != 0:
    log("SKIP: mounting a tmpfs for ENOSPC needs root")
    sys.exit(SKIP)
w = workdir("faults-repo")
SIZE = 32 << 20
vm = VM(w, [("vd0", make_disk(os.path.join(w, "d0.qcow2"), SIZE), "qcow2")])
repo = os.path.join(w, "repo")
os.mkdir(repo)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0750", "tmpfs", repo], check=True)
rng = random.Random(5)
status = vm.qmp.cmd("query-status")["status"]


def bitmap_state():
    return [(b["name"], b["recording"], b["busy"]) for b in vm.bitmaps("drive0")]


def failing_backup(env_extra, expect_in_err, racing_writes=False):
    """A backup that must fail, leaving points, bitmaps and files as they
    were."""
    before_points = list_points(repo, "vm1")
    before_bitmaps = bitmap_state()
    env = dict(os.environ, **env_extra)
    args = [QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1"] + mode_args()
    if racing_writes:
        args += ["--speed", str(4 << 20)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if racing_writes:
        # Guest writes land while the repository fails under the job: they
        # must succeed (copy-before-write must not break them).
        deadline = time.time() + 20
        while not vm.jobs() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        for i in range(8):
            vm.io("vd0", "write -P 0x%02x %d 65536" % (0x40 + i, SIZE - (i + 1) * (1 << 20)))
    out, err = proc.communicate(timeout=120)
    check(proc.returncode == 1, "backup should fail: rc %d %s" % (proc.returncode, err))
    check(expect_in_err in err, "error names the cause (%r): %s" % (expect_in_err, err))
    check(len(err.strip().splitlines()) == 1, "one-line error: %r" % err)
    check(list_points(repo, "vm1") == before_points, "nothing listed")
    check(not [e for e in os.listdir(os.path.join(repo, "vm1")) if e.startswith(".partial-")],
          "partial files removed")
    check(bitmap_state() == before_bitmaps, "bitmap untouched: %s -> %s"
          % (before_bitmaps, bitmap_state()))
    check(vm.jobs() == [], "no job left")


try:
    # ENOSPC on the very first (full) backup: 32 MiB of data, 64 MiB tmpfs
    # with 44 MiB taken.
    for i in range(0, SIZE, 1 << 20):
        vm.io("vd0", "write -P 0x%02x %d 1048576" % (1 + i % 250, i))
    filler = os.path.join(repo, "filler")
    subprocess.run(["dd", "if=/dev/zero", "of=" + filler, "bs=1M", "count=44", "status=none"],
                   check=True)
    failing_backup({}, "No space left on device", racing_writes=True)
    os.unlink(filler)
    res = oracle(vm, repo, "vm1", expect_points=[], run_state=status)
    check(res["disks"][0]["type"] == "full", "first good backup is full")
    points = [res["point"]]

    # ENOSPC during an incremental.
    random_writes(vm, "vd0", SIZE, rng, 20, max_len=1 << 20, zero_ratio=0, discard_ratio=0)
    free = shutil.disk_usage(repo).free
    subprocess.run(["dd", "if=/dev/zero", "of=" + filler, "bs=64k",
                    "count=%d" % max(1, (free - (256 << 10)) // 65536), "status=none"])
    failing_backup({}, "No space left on device", racing_writes=True)
    os.unlink(filler)
    points.append(oracle(vm, repo, "vm1", expect_points=points, run_state=status)["point"])

    # EIO from io_uring on the 3rd data write.
    random_writes(vm, "vd0", SIZE, rng, 10, zero_ratio=0, discard_ratio=0)
    failing_backup({"QBAK_FAULT_FILE_WRITE": "3:EIO"}, "Input/output error")
    points.append(oracle(vm, repo, "vm1", expect_points=points, run_state=status)["point"])

    # fsync failure at commit: never retried into a success.
    random_writes(vm, "vd0", SIZE, rng, 10)
    failing_backup({"QBAK_FAULT_FSYNC": "1:EIO"}, "fsync")
    points.append(oracle(vm, repo, "vm1", expect_points=points, run_state=status)["point"])

    # Short writes are continued, not lost: that backup succeeds, correctly.
    random_writes(vm, "vd0", SIZE, rng, 10, zero_ratio=0, discard_ratio=0)
    ref = vm.reference("vd0", os.path.join(w, "short.raw"))
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1",
                    env=dict(os.environ, QBAK_FAULT_FILE_WRITE="1:short"))
    img_compare(os.path.join(repo, "vm1", res["point"], "vd0.qcow2"), ref, fmt_a="qcow2")
finally:
    vm.stop()
    subprocess.run(["umount", repo])
shutil.rmtree(w, ignore_errors=True)
log("ok: ENOSPC, EIO, short writes and fsync failure leave the chain intact")
