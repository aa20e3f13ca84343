#!/usr/bin/env python3
"""qbak prune, protect and unprotect against real backups of a VM with two
disks (one of an odd size): two chains (a full and incrementals, then a
--full and incrementals).

- no rule: usage error, nothing changed; a point that does not exist
  cannot be protected;
- --dry-run: says what it would keep and remove and why, changes no byte;
- a policy by time (manifest times moved to other days): keep-daily picks
  the newest point of each day, in the local time zone;
- removing the tail of an old chain that nothing kept builds on deletes it;
  a protected point stays whatever the policy;
- removing points that kept ones build on merges them: every kept point
  restores byte-identical to its reference (qbak restore and qemu-img
  compare through the chain), qemu-img check passes on every file, and
  --keep-last 1 leaves one full point whose content is the newest's;
- the next backup after a prune is still an incremental and restores right;
- a point whose disks are on different chains (one lost its bitmap, so
  its layer is a full): per disk, layers a kept point reads are merged,
  the others deleted.
"""
import json
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("prune")
SIZES = {"vd0": 24 << 20, "vd1": (7 << 20) + 5 * 512}
disks = [(d, make_disk(os.path.join(w, d + ".qcow2"), s), "qcow2")
         for d, s in SIZES.items()]
vm = VM(w, disks)
rng = random.Random(20261205)
repo = os.path.join(w, "repo")
vmdir = os.path.join(repo, "vm1")
refs = {}  # point -> {disk: reference raw file}


def backup(full=False, writes=10):
    for dev, size in SIZES.items():
        random_writes(vm, dev, size, rng, writes)
    i = len(refs)
    ref = {dev: vm.reference(dev, os.path.join(w, "ref-%d-%s.raw" % (i, dev))) for dev in SIZES}
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1",
                    *(["--full"] if full else []))
    refs[res["point"]] = ref
    return res


def tree():
    """Every file under the VM directory with its size, mtime and bytes'
    hash: what "changes nothing" compares."""
    out = {}
    for root, _, files in os.walk(vmdir):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, vmdir)] = (st.st_size, st.st_mtime_ns, hash(fh.read()))
    return out


def verify_all(expect_points):
    """list shows exactly expect_points; each restores byte-identical to
    its reference, by qbak and through the chain by qemu-img; every file
    passes qemu-img check."""
    points = list_points(repo, "vm1")
    check(points == expect_points, "listed %s, expected %s" % (points, expect_points))
    for p in os.listdir(vmdir):
        if p.startswith("."):
            check(p in (".id", ".lock", ".browse"), "leftover %s" % p)
            continue
        check(p in expect_points, "directory %s of an unlisted point left" % p)
        for f in os.listdir(os.path.join(vmdir, p)):
            if f.endswith(".qcow2"):
                img_check(os.path.join(vmdir, p, f))
    for p in points:
        for dev in SIZES:
            img_compare(os.path.join(vmdir, p, dev + ".qcow2"), refs[p][dev], fmt_a="qcow2")
            out = os.path.join(w, "restore.raw")
            qbak("restore", "--repo", repo, "--vm", "vm1", "--disk", dev, "--point", p,
                 "--output", out, "--force")
            img_compare(out, refs[p][dev], fmt_a="raw")
            os.unlink(out)


def manifest(p):
    with open(os.path.join(vmdir, p, "manifest.json")) as f:
        return json.load(f)


def prune(*args, rc=0):
    p = qbak("prune", "--repo", repo, "--vm", "vm1", *args, check_rc=False)
    check(p.returncode == rc, "prune %s: rc %d, expected %d: %s%s"
          % (args, p.returncode, rc, p.stdout, p.stderr))
    return json.loads(p.stdout) if rc == 0 and "--json" in args else p


try:
    a = [backup(writes=30)["point"]] + [backup()["point"] for _ in range(2)]
    b = [backup(full=True)["point"]] + [backup()["point"] for _ in range(3)]
    check(manifest(b[0])["disks"][0]["type"] == "full", "second chain starts with a full")
    allp = a + b
    verify_all(allp)

    # No rule: a usage error, and nothing changed.
    before = tree()
    p = prune(rc=2)
    check("--keep" in p.stderr, "says a rule is needed: %s" % p.stderr)
    p = prune("--keep-last", "0", rc=2)
    check(tree() == before, "a refused prune changes nothing")
    p = qbak("protect", "--repo", repo, "--vm", "vm1", "--point", "20000101T000000Z-0001",
             check_rc=False)
    check(p.returncode == 1 and "no committed point" in p.stderr, "protect unknown: %s" % p.stderr)

    # --dry-run: what and why, and not one byte changed.
    before = tree()
    res = prune("--keep-last", "2", "--dry-run", "--json")
    check(res["dry_run"] and res["kept"] == 2 and res["removed"] == len(allp) - 2,
          "dry run counts: %s" % res)
    dec = {x["point"]: x for x in res["points"]}
    for pt in allp[-2:]:
        check(dec[pt]["keep"] and dec[pt]["reason"] == "keep-last", "kept by keep-last: %s" % dec[pt])
    for pt in allp[:-2]:
        check(not dec[pt]["keep"] and dec[pt]["reason"] == "no rule keeps it", "removed: %s" % dec[pt])
    # b[1] is what the kept b[2] builds on: merged into it; chain A's
    # points are read by nothing kept: deleted.
    check({d["disk"]: (d["action"], d.get("into")) for d in dec[b[1]]["disks"]}
          == {"vd0": ("merge", b[2]), "vd1": ("merge", b[2])}, "b1 merges: %s" % dec[b[1]])
    for pt in a:
        check(all(d["action"] == "delete" for d in dec[pt]["disks"]), "a deleted: %s" % dec[pt])
    human = prune("--keep-last", "2", "--dry-run").stdout
    check("dry run" in human and "keep-last" in human and "merged into %s" % b[2] in human,
          "human dry run: %s" % human)
    after = tree()
    check(after == before, "a dry run changes nothing: %s"
          % sorted(set(after.items()) ^ set(before.items())))

    # Policies by time: manifests say the points were taken on other days
    # (22:30 UTC is already the next day in UTC+2, POSIX TZ "UTC-2").
    days = ["2026-10-25T22:30:00Z"] + ["2026-11-%02dT22:30:00Z" % d for d in (2, 2, 3, 3, 3, 4)]
    saved = {}
    for pt, t in zip(allp, days):
        path = os.path.join(vmdir, pt, "manifest.json")
        saved[path] = open(path).read()
        m = json.loads(saved[path])
        m["time"] = t
        with open(path, "w") as f:
            json.dump(m, f)
    env_tz = dict(os.environ, TZ="UTC")
    r = run([QBAK, "prune", "--repo", repo, "--vm", "vm1", "--keep-daily", "3", "--dry-run",
             "--json"], env=env_tz)
    keep = [x["point"] for x in json.loads(r.stdout)["points"] if x["keep"]]
    check(keep == [allp[2], allp[5], allp[6]], "keep-daily 3 in UTC: %s" % keep)
    r = run([QBAK, "prune", "--repo", repo, "--vm", "vm1", "--keep-daily", "1",
             "--keep-weekly", "2", "--dry-run", "--json"], env=dict(os.environ, TZ="UTC-2"))
    dec = {x["point"]: x["reason"] for x in json.loads(r.stdout)["points"] if x["keep"]}
    # In UTC+2 the points fall on Oct 26 and Nov 3, 3, 4, 4, 4, 5; Monday
    # Nov 2 starts the ISO week of all but the first.
    check(dec == {allp[6]: "keep-daily", allp[0]: "keep-weekly"}, "daily+weekly UTC+2: %s" % dec)
    for path, text in saved.items():
        with open(path, "w") as f:
            f.write(text)

    # Protect one point of chain A; keep-last 4 keeps chain B: chain A's
    # other points go, and as nothing kept reads a[2], nothing merges.
    qbak("protect", "--repo", repo, "--vm", "vm1", "--point", a[1])
    check(os.path.exists(os.path.join(vmdir, a[1], "protected")), "protected marker")
    p = qbak("protect", "--repo", repo, "--vm", "vm1", "--point", a[1])
    check("already" in p.stdout, "protecting twice is fine: %s" % p.stdout)
    res = prune("--keep-last", "4", "--json")
    dec = {x["point"]: x for x in res["points"]}
    check(dec[a[1]]["keep"] and dec[a[1]]["reason"] == "protected", "protected kept: %s" % dec[a[1]])
    check(not dec[a[0]]["keep"] and dec[a[0]]["disks"][0]["action"] == "merge",
          "a0 merges into the protected a1: %s" % dec[a[0]])
    check(not dec[a[2]]["keep"] and dec[a[2]]["disks"][0]["action"] == "delete",
          "a2 deleted: %s" % dec[a[2]])
    verify_all([a[1]] + b)
    m = manifest(a[1])
    check(all(d["type"] == "full" and d.get("backing") is None for d in m["disks"])
          and m["parent"] is None, "a1 is a full now: %s" % m)
    res = prune("--keep-last", "4", "--json")
    check(res["removed"] == 0, "a second prune has nothing to do: %s" % res)

    # Unprotected, a1 goes like any other point.
    qbak("unprotect", "--repo", repo, "--vm", "vm1", "--point", a[1])
    check(not os.path.exists(os.path.join(vmdir, a[1], "protected")), "marker removed")
    res = prune("--keep-last", "3", "--json")
    check(res["removed"] == 2, "a1 and b0 removed: %s" % res)
    verify_all(b[1:])
    check(all(d["type"] == "full" for d in manifest(b[1])["disks"]), "b1 is the full now")
    check(all(d["type"] == "incremental" and d["backing"] == "../%s/%s.qcow2" % (b[1], d["disk"])
              for d in manifest(b[2])["disks"]), "b2 builds on b1: %s" % manifest(b[2]))

    # More points, then --keep-last 1: one full whose content is the
    # newest point's.
    more = [backup()["point"] for _ in range(3)]
    res = prune("--keep-last", "1", "--json")
    check(res["removed"] == 5 and res["merged_bytes"] > 0, "keep-last 1: %s" % res)
    verify_all([more[-1]])
    m = manifest(more[-1])
    check(m["parent"] is None and all(d["type"] == "full" and d.get("backing") is None
                                      for d in m["disks"]), "one full left: %s" % m)

    # The next backup builds on it: an incremental, restoring right.
    nxt = backup()
    check(all(d["type"] == "incremental" for d in nxt["disks"]),
          "next backup is an incremental: %s" % nxt["disks"])
    verify_all([more[-1], nxt["point"]])

    # Disks of one point on different chains: vd1 loses its bitmap, so
    # the next point has vd0 incremental and vd1 full.  Pruning to that
    # point merges the older point's vd0 into it and deletes its vd1.
    mid = backup()["point"]
    for bm in vm.bitmaps("drive1"):
        vm.qmp.cmd("block-dirty-bitmap-remove", node="drive1", name=bm["name"])
    mixed = backup()
    types = {d["disk"]: d["type"] for d in mixed["disks"]}
    check(types == {"vd0": "incremental", "vd1": "full"}, "mixed point: %s" % types)
    res = prune("--keep-last", "2", "--dry-run", "--json")
    dec = {x["point"]: x for x in res["points"]}
    check({d["disk"]: d["action"] for d in dec[more[-1]]["disks"]} == {"vd0": "merge", "vd1": "merge"}
          and {d["disk"]: d["action"] for d in dec[nxt["point"]]["disks"]} == {"vd0": "merge", "vd1": "merge"},
          "older points merge both disks into what mid reads: %s" % res["points"])
    # "into" names the kept point the data lands in, not the next point
    # (nxt, removed as well).
    check(all(d["into"] == mid for pt in (more[-1], nxt["point"]) for d in dec[pt]["disks"]),
          "both merge into the kept mid: %s" % res["points"])
    res = prune("--keep-last", "1", "--json")
    check(res["removed"] == 3 and [d["action"] for x in res["points"] if not x["keep"]
                                    for d in x["disks"] if d["disk"] == "vd1"] == ["delete"] * 3,
          "keep-last 1 with a mixed newest point: vd1 layers deleted: %s" % res)
    verify_all([mixed["point"]])
    m = manifest(mixed["point"])
    check(all(d["type"] == "full" and d.get("backing") is None for d in m["disks"])
          and m["parent"] is None, "the mixed point is a full on both disks: %s" % m)
    check(all(d["type"] == "incremental" for d in backup()["disks"]),
          "and the next backup is an incremental on both")
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: prune keeps what its rules say, merges what kept points build on")
