#!/usr/bin/env python3
"""prune under faults:

- busy, both ways: a backup, restore or protect started while a prune
  runs (held in the middle of a merge) fails at once with exit status 75,
  or waits with --wait; a prune started while a backup runs (slowed with
  --speed) fails at once with 75, or waits; the first one is untouched;
- damage: a point marked damaged (damaged.json) is not merged into a good
  point, nor a good one into it: prune fails naming the point and the
  reason, and changes nothing; a layer whose stored data fails its
  checksums during the merge fails the prune naming the point, disk and
  offset, records the damage, and nothing kept changes;
- ENOSPC (a small tmpfs repository) and EIO (QBAK_FAULT_MERGE_WRITE, a
  test-only hook failing the Nth write of a merge) during a merge: a
  one-line error, nothing kept damaged, and a later prune completes; also
  EIO after the merge wrote over the full's own data in place: the points
  being folded in stay delisted.
"""
import json
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
if os.geteuid() != 0:
    log("SKIP: mounting a tmpfs for ENOSPC needs root")
    sys.exit(SKIP)
w = workdir("prune-faults")
SIZE = 24 << 20
vm = VM(w, [("vd0", make_disk(os.path.join(w, "d0.qcow2"), SIZE), "qcow2")])
rng = random.Random(99)
refs = {}
counter = iter(range(1 << 30))
mounted = []


def backup(repo, writes=8, full=False, extra=()):
    random_writes(vm, "vd0", SIZE, rng, writes)
    ref = vm.reference("vd0", os.path.join(w, "ref-%d.raw" % next(counter)))
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1",
                    *(["--full"] if full else []), *extra)
    refs[(repo, res["point"])] = ref
    return res["point"]


def verify(repo, expect=None):
    points = list_points(repo, "vm1")
    if expect is not None:
        check(points == expect, "listed %s, expected %s" % (points, expect))
    for p in points:
        f = os.path.join(repo, "vm1", p, "vd0.qcow2")
        img_check(f)
        img_compare(f, refs[(repo, p)], fmt_a="qcow2")
        out = os.path.join(w, "restore.raw")
        qbak("restore", "--repo", repo, "--vm", "vm1", "--disk", "vd0", "--point", p,
             "--output", out, "--force")
        img_compare(out, refs[(repo, p)], fmt_a="raw")
        os.unlink(out)
    return points


def layer_bytes(repo, p):
    with open(os.path.join(repo, "vm1", p, "vd0.qcow2"), "rb") as f:
        return f.read()


def must_fail(args, words, rc=1, env=None):
    p = run([QBAK] + args, check_rc=False, env=env)
    check(p.returncode == rc, "%s: rc %d, expected %d: %s" % (args[:1], p.returncode, rc, p.stderr))
    for word in words:
        check(word in p.stderr, "error mentions %r: %s" % (word, p.stderr))
    check(len(p.stderr.strip().splitlines()) == 1, "one-line error: %r" % p.stderr)
    return p.stderr


def prune_args(repo, *extra):
    return ["prune", "--repo", repo, "--vm", "vm1", "--keep-last", "1"] + list(extra)


def busy_both_ways():
    repo = os.path.join(w, "repo-busy")
    pts = [backup(repo, 40, full=True)] + [backup(repo) for _ in range(3)]
    # A prune held (SIGSTOP) in the middle of its first merge.
    prune = subprocess.Popen([QBAK] + prune_args(repo, "--json"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, QBAK_CRASH_AT="prune-merging:stop"))
    deadline = time.time() + 600
    while True:
        with open("/proc/%d/stat" % prune.pid) as f:
            if f.read().split(") ", 1)[1].startswith("T"):
                break
        check(time.time() < deadline and prune.poll() is None, "prune never reached the merge")
        time.sleep(0.05)
    must_fail(["backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1"], ["busy"], rc=75)
    must_fail(["restore", "--repo", repo, "--vm", "vm1", "--disk", "vd0", "--output",
               os.path.join(w, "x.raw")], ["busy"], rc=75)
    must_fail(["protect", "--repo", repo, "--vm", "vm1", "--point", pts[-1]], ["busy"], rc=75)
    check(list_points(repo, "vm1"), "list works meanwhile")
    # A restore told to wait runs once the prune is done.
    out = os.path.join(w, "waited.raw")
    waiting = subprocess.Popen([QBAK, "restore", "--repo", repo, "--vm", "vm1", "--disk", "vd0",
                                "--point", pts[-1], "--output", out, "--wait", "600"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    check(waiting.poll() is None, "the waiting restore waits")
    prune.send_signal(signal.SIGCONT)
    o, e = prune.communicate(timeout=600)
    check(prune.returncode == 0, "the held prune completes: %s" % e)
    check(json.loads(o)["removed"] == 3, "it removed three points: %s" % o)
    o, e = waiting.communicate(timeout=600)
    check(waiting.returncode == 0, "the waiting restore ran: %s" % e)
    img_compare(out, refs[(repo, pts[-1])], fmt_a="raw")
    verify(repo, [pts[-1]])

    # The other way round: a slow backup holds the lock; prune is busy at
    # once, or waits.
    backup(repo)
    random_writes(vm, "vd0", SIZE, rng, 40)
    ref = vm.reference("vd0", os.path.join(w, "ref-slow.raw"))
    slow = subprocess.Popen([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1",
                             "--full", "--speed", str(2 << 20), "--json",
                             "--mode", "push"],  # watched through QEMU's job
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not vm.jobs():
        check(time.time() < deadline and slow.poll() is None, "slow backup never started")
        time.sleep(0.02)
    must_fail(prune_args(repo), ["busy"], rc=75)
    check(slow.poll() is None, "prune failed without waiting for the backup")
    waiting = subprocess.Popen([QBAK] + prune_args(repo, "--wait", "600", "--json"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    o, e = slow.communicate(timeout=600)
    check(slow.returncode == 0, "the slow backup is untouched: %s" % e)
    refs[(repo, json.loads(o)["point"])] = ref
    o, e = waiting.communicate(timeout=600)
    check(waiting.returncode == 0 and json.loads(o)["removed"] == 2,
          "the waiting prune ran after the backup: %s %s" % (o, e))
    verify(repo, [json.loads(o)["points"][-1]["point"]])


def damaged():
    repo = os.path.join(w, "repo-damaged")
    pts = [backup(repo, 40, full=True)] + [backup(repo) for _ in range(3)]
    vmdir = os.path.join(repo, "vm1")
    # A damage record on the point the first merge would write into.
    rec = {"disk": "vd0", "offset": 65536, "reason": "checksum mismatch", "found_by": "verify",
           "time": "2026-12-05T12:00:00Z"}
    with open(os.path.join(vmdir, pts[0], "damaged.json"), "w") as f:
        json.dump(rec, f)
    before = {p: layer_bytes(repo, p) for p in pts}
    err = must_fail(prune_args(repo), [pts[0], "damaged", "checksum mismatch"])
    log("refused: " + err.strip())
    check(list_points(repo, "vm1") == pts, "nothing removed or delisted")
    check({p: layer_bytes(repo, p) for p in pts} == before, "no layer changed")
    check(not os.path.exists(os.path.join(vmdir, ".prune.json")), "no intent left")
    os.unlink(os.path.join(vmdir, pts[0], "damaged.json"))

    # A flipped bit in a data cluster of the layer to merge: the merge
    # finds it by its checksum.
    sums = os.path.join(vmdir, pts[1], "vd0.qcow2.sums")
    if not os.path.exists(sums):
        # tests/unit/test-prune.c covers this case on layers it writes.
        log("NOTE: backups of this build write no checksums: the merge's "
            "checksum failure is not tested here")
        return
    m = json.loads(run([QEMU_IMG, "map", "--output=json", "-f", "qcow2",
                        os.path.join(vmdir, pts[1], "vd0.qcow2")]).stdout)
    data = [e for e in m if e["data"] and e["depth"] == 0 and "offset" in e]
    check(data, "the incremental has data")
    path = os.path.join(vmdir, pts[1], "vd0.qcow2")
    with open(path, "r+b") as f:
        f.seek(data[0]["offset"] + 100)
        b = f.read(1)
        f.seek(data[0]["offset"] + 100)
        f.write(bytes([b[0] ^ 0x10]))
    kept_before = {p: layer_bytes(repo, p) for p in pts[1:]}
    err = must_fail(prune_args(repo), [pts[1], "vd0", "damaged"])
    log("merge refused: " + err.strip())
    check({p: layer_bytes(repo, p) for p in pts[1:]} == kept_before, "no kept layer changed")
    check(os.path.exists(os.path.join(vmdir, pts[1], "damaged.json")), "damage recorded")
    # The point below the damaged one (delisted: prune was removing it)
    # still reads right; those that read through the damaged layer are
    # damaged too, and verify says so.
    img_compare(os.path.join(vmdir, pts[0], "vd0.qcow2"), refs[(repo, pts[0])],
                fmt_a="qcow2")
    p = qbak("verify", "--repo", repo, "--vm", "vm1", "--json", check_rc=False)
    check(p.returncode == 1, "verify finds the damage: %d %s" % (p.returncode, p.stderr))
    states = {x["point"]: x["state"] for x in json.loads(p.stdout)["vms"][0]["points"]}
    check(states == {pts[1]: "damaged", pts[2]: "damaged", pts[3]: "damaged"},
          "verify's verdicts: %s" % states)
    # And the next prune refuses at once, changing nothing.
    must_fail(prune_args(repo), [pts[1], "damaged"])
    check({p: layer_bytes(repo, p) for p in pts[1:]} == kept_before, "still unchanged")


def no_space_and_eio():
    repo = os.path.join(w, "repo-enospc")
    os.mkdir(repo)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0750", "tmpfs", repo], check=True)
    mounted.append(repo)
    # A sparse full, then incrementals writing where the full has nothing:
    # the merge must allocate.
    vm.io("vd0", "write -z 0 %d" % SIZE)
    vm.io("vd0", "write -P 0x11 0 %d" % (2 << 20))
    pts = [backup(repo, 0, full=True)]
    for i in range(3):
        vm.io("vd0", "write -P 0x%02x %d %d" % (0x20 + i, (4 + 4 * i) << 20, 3 << 20))
        pts.append(backup(repo, 0))
    st = os.statvfs(repo)
    free = st.f_bavail * st.f_frsize
    filler = os.path.join(repo, "filler")
    subprocess.run(["dd", "if=/dev/zero", "of=" + filler, "bs=64k",
                    "count=%d" % ((free - (1 << 20)) // 65536), "status=none"], check=True)
    err = must_fail(prune_args(repo), ["No space left on device"])
    log("ENOSPC: " + err.strip())
    verify(repo)
    check(set(list_points(repo, "vm1")) >= {pts[-1]}, "the newest point is listed")
    os.unlink(filler)
    # EIO on the 2nd write of a merge.
    backup(repo, 4)
    err = must_fail(prune_args(repo), ["Input/output error"],
                    env=dict(os.environ, QBAK_FAULT_MERGE_WRITE="2:EIO"))
    log("EIO: " + err.strip())
    verify(repo)
    res = qbak_json(*prune_args(repo))
    log("completed: %s" % res["recovered"])
    verify(repo, [res["points"][-1]["point"]])


def eio_in_place():
    """EIO on the second write of a merge whose every cluster goes over the
    full's own data in place: the first write changed the full's file, so
    the points whose layers were being folded in must not be listed again
    (they would read the changed file); every listed point still restores
    right, and the next prune completes."""
    repo = os.path.join(w, "repo-inplace")
    vm.io("vd0", "write -P 0x5a 0 %d" % SIZE)
    pts = [backup(repo, 0, full=True)]
    for i in range(3):
        vm.io("vd0", "write -P 0x%02x %d %d" % (0x60 + i, (2 + 6 * i) << 20, 2 << 20))
        pts.append(backup(repo, 0))
    err = must_fail(prune_args(repo), ["Input/output error"],
                    env=dict(os.environ, QBAK_FAULT_MERGE_WRITE="2:EIO"))
    log("EIO in place: " + err.strip())
    verify(repo)
    check(set(list_points(repo, "vm1")) >= {pts[-1]}, "the newest point is listed")
    res = qbak_json(*prune_args(repo))
    verify(repo, [pts[-1]])
    log("completed: %s" % res["recovered"])


try:
    busy_both_ways()
    damaged()
    no_space_and_eio()
    eio_in_place()
finally:
    vm.stop()
    for m in mounted:
        subprocess.run(["umount", m])
shutil.rmtree(w, ignore_errors=True)
log("ok: prune is busy-safe, refuses damage, survives ENOSPC and EIO")
