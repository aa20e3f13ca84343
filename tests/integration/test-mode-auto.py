#!/usr/bin/env python3
"""--mode auto, the default: pull on this QEMU (7.1 or later), push with
--memory and while QEMU's NBD server is in use by someone else; the
choice and its reason in the JSON result and in -v output, and every
point, whatever the mode, equal to the disk at its point in time."""
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("mode-auto")
size = 16 << 20
vm = VM(w, [("vd0", make_disk(os.path.join(w, "d0.qcow2"), size), "qcow2")], run=True)
repo = os.path.join(w, "repo")
rng = random.Random(13)
major, minor = (vm.qmp.cmd("query-version")["qemu"][k] for k in ("major", "minor"))
check((major, minor) >= (7, 1), "this test needs QEMU 7.1 or later: %d.%d" % (major, minor))


def backup(*extra, verbose=False):
    """A default-mode backup (no --mode unless in extra), checked against
    the disk; returns the result."""
    random_writes(vm, "vd0", size, rng, 8)
    ref = vm.reference("vd0", os.path.join(w, "ref.raw"))
    args = [QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1",
            "--json"] + list(extra) + (["-v"] if verbose else [])
    p = run(args)
    res = json.loads(p.stdout)
    for d in res["disks"]:
        f = os.path.join(repo, "vm1", res["point"], d["file"])
        img_check(f)
        img_compare(f, ref, fmt_a="qcow2")
    check(isinstance(res.get("mode_reason"), str) and res["mode_reason"],
          "a reason for the mode: %s" % res)
    if verbose:
        check("mode %s: %s" % (res["mode"], res["mode_reason"]) in p.stderr,
              "-v names the mode and why: %s" % p.stderr)
    return res


try:
    r = backup(verbose=True)
    check(r["mode"] == "pull", "default on QEMU %d.%d is pull: %s" % (major, minor, r))
    check("scratch_peak_bytes" in r, "a pull result: %s" % r)
    check(backup("--mode", "auto")["mode"] == "pull", "--mode auto is accepted")

    # --memory: the VM state belongs to push mode's transaction.
    r = backup("--memory")
    check(r["mode"] == "push" and "--memory" in r["mode_reason"], "with --memory: %s" % r)
    check(r["memory"] is not None, "memory captured: %s" % r["memory"])

    # Someone else's NBD server: QEMU has one, so auto does not take it.
    vm.qmp.cmd("nbd-server-start", addr={"type": "unix",
                                         "data": {"path": os.path.join(w, "other.nbd")}})
    vm.qmp.cmd("block-export-add", type="nbd", id="theirs", **{"node-name": "drive0"})
    r = backup(verbose=True)
    check(r["mode"] == "push" and "NBD" in r["mode_reason"] and "theirs" in r["mode_reason"],
          "NBD server in use: %s" % r)
    exports = vm.qmp.cmd("query-block-exports")
    check([e["id"] for e in exports] == ["theirs"], "their export untouched: %s" % exports)
    vm.qmp.cmd("block-export-del", id="theirs")
    vm.qmp.cmd("nbd-server-stop")
    check(backup()["mode"] == "pull", "pull again once the server is free")

    # Asked for explicitly: no choice made, and --mode checked.
    r = backup("--mode", "push")
    check(r["mode"] == "push", "--mode push: %s" % r)
    p = run([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1",
             "--mode", "sideways"], check_rc=False)
    check(p.returncode == 2 and "auto, push or pull" in p.stderr, "bad --mode: %s" % p.stderr)
    p = run([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1",
             "--mode", "pull", "--memory"], check_rc=False)
    check(p.returncode == 2 and "--memory" in p.stderr, "pull with --memory: %s" % p.stderr)

    # Pull mode's copy runs at nice 19 by default (--nice), after the
    # point: the guest's vCPUs and QEMU's I/O go first; push mode's does
    # not (guest writes wait for it there).
    def nice_while_copying(*extra):
        random_writes(vm, "vd0", size, rng, 8)
        vm.io("vd0", "write -P 0x5a 0 %d" % (8 << 20))
        p = subprocess.Popen([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo,
                              "--vm", "vm1", "--json", "--speed", str(2 << 20)] + list(extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = set()
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline:
            copying = vm.qmp.cmd("query-block-exports") or \
                [j for j in vm.jobs() if j["status"] == "running"]
            try:
                with open("/proc/%d/stat" % p.pid) as f:
                    nice = int(f.read().rsplit(")", 1)[1].split()[16])
            except (OSError, ValueError, IndexError):
                break
            if copying:
                seen.add(nice)
            time.sleep(0.05)
        out, err = p.communicate(timeout=300)
        check(p.returncode == 0, "backup %s: %s" % (extra, err))
        return seen, json.loads(out)["mode"]
    seen, mode = nice_while_copying()
    check(mode == "pull" and 19 in seen, "pull copy at nice 19: %s %s" % (mode, seen))
    seen, mode = nice_while_copying("--nice", "0")
    check(mode == "pull" and seen == {0}, "--nice 0: %s %s" % (mode, seen))
    seen, mode = nice_while_copying("--mode", "push")
    check(mode == "push" and seen == {0}, "push copy at nice 0: %s %s" % (mode, seen))
    p = run([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1",
             "--nice", "20"], check_rc=False)
    check(p.returncode == 2 and "--nice" in p.stderr, "bad --nice: %s" % p.stderr)

    # A disk whose device runs in an iothread: QEMU before 9.0 aborts (the
    # VM is gone) when pull mode's snapshot-access node goes above it
    # while the guest writes.  Auto takes push there, and --mode pull is
    # refused, for virtio-blk (the link on the device) and a SCSI disk
    # (the link on its controller).
    if (major, minor) < (9, 0):
        for kind in ("virtio-blk", "scsi"):
            class IothreadVM(VM):
                @staticmethod
                def disk_args(i, dev, path, fmt, blkdebug=None, kind=kind):
                    a = VM.disk_args(i, dev, path, fmt, blkdebug)
                    if kind == "scsi":
                        return a[:-2] + ["-device", "virtio-scsi-pci,id=scsi0,iothread=io0",
                                         "-device", "scsi-hd,drive=drive0,id=%s" % dev]
                    a[-1] = a[-1].replace("virtio-blk-pci,", "virtio-blk-pci,iothread=io0,")
                    return a
            w2 = os.path.join(w, kind)
            os.mkdir(w2)
            io = IothreadVM(w2, [("vd0", make_disk(os.path.join(w2, "d.qcow2"), size),
                                  "qcow2")], extra=["-object", "iothread,id=io0"], run=True)
            try:
                base = [QBAK, "backup", "--qmp", io.qbak_sock, "--repo",
                        os.path.join(w2, "repo"), "--vm", "io", "--json"]
                r = json.loads(run(base).stdout)
                check(r["mode"] == "push" and "iothread" in r["mode_reason"],
                      "%s in an iothread: %s" % (kind, r))
                p = run(base + ["--mode", "pull"], check_rc=False)
                check(p.returncode == 1 and "iothread" in p.stderr and "--mode push" in p.stderr,
                      "%s: --mode pull refused: %s %s" % (kind, p.returncode, p.stderr))
                st = io.qmp.cmd("query-status")
                check(st["status"] == "running", "%s: VM still running: %s" % (kind, st))
            finally:
                io.stop()
        # Without an iothread object (the VM above): no extra question.
        check(backup()["mode"] == "pull", "pull without iothreads")
    log("ok: auto picks pull on QEMU %d.%d, push with --memory, a busy NBD server or a "
        "disk in an iothread" % (major, minor))
finally:
    vm.stop()
    shutil.rmtree(w, ignore_errors=True)
