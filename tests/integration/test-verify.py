#!/usr/bin/env python3
"""Checksums, verify, checked restore and damage in a repository.

One VM, one chain: a full and four incrementals (P1..P5) with random
writes, zero writes and discards, and a reference of the disk at each point.
The healthy chain verifies (exit 0, every point good) and every point
restores byte-identical (qemu-img compare) with checks on.  Then, each on
its own copy of the repository:

  a bit flipped in a data cluster of P3's layer
  a bit flipped in an L2 table entry of P2's layer
  a bit flipped in P4's header
  P5's layer truncated
  the middle point P3 removed
  P3's manifest made unparseable
  P5's header flipped and no verify before the next backup

verify must report exactly the damaged points (the damaged layer's point
and every point built on it) as damaged, with the guest offset of the bad
cluster where there is one, the rest good, exit 1, and leave damaged.json in
each damaged point; restore of a damaged point fails naming the point (and
the offset); list says damaged; the next backup is full with a reason, and
restores byte-identical.  A chain from before checksums (format 1
manifests, no .sums) is reported unverifiable, exit 0.
"""
import fcntl
import json
import os
import random
import shutil
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("verify")
SIZE = 24 << 20
CLUSTER = 64 << 10
vm = VM(w, [("vd0", make_disk(os.path.join(w, "vd0.qcow2"), SIZE), "qcow2")])
rng = random.Random(20261205)
repo = os.path.join(w, "repo")
points, refs = [], {}


def layer(r, p):
    return os.path.join(r, "vm1", p, "vd0.qcow2")


def verify(r, *extra):
    p = qbak("verify", "--repo", r, "--json", *extra, check_rc=False)
    try:
        res = json.loads(p.stdout)
    except ValueError:
        fail("verify printed no JSON (exit %d): %s %s" % (p.returncode, p.stdout, p.stderr))
    states = {pt["point"]: pt["state"] for v in res["vms"] for pt in v["points"]}
    disks = {pt["point"]: pt["disks"] for v in res["vms"] for pt in v["points"]}
    return p.returncode, states, disks, res


def expect_states(r, damaged, gone=(), offsets=None, what=""):
    rc, states, disks, _ = verify(r)
    want = {p: ("damaged" if p in damaged else "good") for p in points if p not in gone}
    check(states == want, "%s: verify says %s, expected %s" % (what, states, want))
    check(rc == 1, "%s: verify exits 1 on damage, not %d" % (what, rc))
    for p in damaged:
        check(os.path.exists(os.path.join(r, "vm1", p, "damaged.json")),
              "%s: %s has damaged.json" % (what, p))
        check(all(d["reason"] for d in disks[p]), "%s: %s has a reason" % (what, p))
    for p in want:
        if p not in damaged:
            check(not os.path.exists(os.path.join(r, "vm1", p, "damaged.json")),
                  "%s: good point %s is not marked" % (what, p))
    for p, off in (offsets or {}).items():
        got = [d["offset"] for d in disks[p] if d["disk"] == "vd0"][0]
        check(got == off, "%s: %s: first bad cluster at %r, expected %r"
              % (what, p, got, off))
    listing = {x["point"]: x for x in qbak_json("list", "--repo", r, "--vm", "vm1")["points"]}
    for p in damaged:
        check(p in listing and listing[p]["damaged"] is not None,
              "%s: list shows %s damaged: %s" % (what, p, listing.get(p)))
    p = qbak("list", "--repo", r, "--vm", "vm1")
    check("DAMAGED" in p.stdout, "%s: list says DAMAGED: %s" % (what, p.stdout))


def restore_ok(r, p):
    out = os.path.join(w, "out.raw")
    qbak("restore", "--repo", r, "--vm", "vm1", "--disk", "vd0", "--point", p,
         "--output", out, "--force")
    img_compare(out, refs[p], fmt_a="raw")
    os.unlink(out)


def restore_fails(r, p, must_name, what):
    out = os.path.join(w, "out-bad.raw")
    res = qbak("restore", "--repo", r, "--vm", "vm1", "--disk", "vd0", "--point", p,
               "--output", out, check_rc=False)
    check(res.returncode == 1, "%s: restore of %s fails (exit %d)" % (what, p, res.returncode))
    for s in must_name:
        check(s in res.stderr, "%s: restore error names %r: %s" % (what, s, res.stderr))
    check(not os.path.exists(out), "%s: no half image left" % what)
    return res.stderr


def next_backup_full(r, why_words, what):
    ref = vm.reference("vd0", os.path.join(w, "ref-next.raw"))
    res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", r, "--vm", "vm1")
    d = res["disks"][0]
    check(d["type"] == "full", "%s: next backup is full: %s" % (what, d))
    check(d["reason"] and any(x in d["reason"] for x in why_words),
          "%s: the reason says why: %r" % (what, d["reason"]))
    f = os.path.join(r, "vm1", res["point"], "vd0.qcow2")
    img_check(f)
    img_compare(f, ref, fmt_a="qcow2")
    out = os.path.join(w, "out-next.raw")
    qbak("restore", "--repo", r, "--vm", "vm1", "--disk", "vd0", "--output", out)
    img_compare(out, ref, fmt_a="raw")
    os.unlink(out)
    rc, states, _, _ = verify(r, "--vm", "vm1", "--point", res["point"])
    check(rc == 0 and states == {res["point"]: "good"}, "%s: the new full verifies: %s"
          % (what, states))


def copy(name):
    dst = os.path.join(w, "repo-" + name)
    shutil.copytree(repo, dst, symlinks=True)
    return dst


def flip(path, off, bit=0):
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ (1 << bit)]))


def own_data_cluster(path):
    """(guest offset, host offset) of a data cluster stored in this layer."""
    m = json.loads(run([QEMU_IMG, "map", "--output=json", "-f", "qcow2", path]).stdout)
    for e in m:
        if e.get("depth") == 0 and e.get("data") and "offset" in e:
            return e["start"], e["offset"]
    fail("no data cluster in %s" % path)


def l2_entry(path):
    """(file offset of the first data L2 entry, its guest offset)."""
    with open(path, "rb") as f:
        hdr = f.read(104)
        l1_size, l1_off = struct.unpack(">IQ", hdr[36:48])
        cluster = 1 << struct.unpack(">I", hdr[20:24])[0]
        f.seek(l1_off)
        l1 = struct.unpack(">%dQ" % l1_size, f.read(8 * l1_size))
        per_l2 = cluster // 8
        for i, e in enumerate(l1):
            l2_off = e & 0x00fffffffffffe00
            if not l2_off:
                continue
            f.seek(l2_off)
            l2 = struct.unpack(">%dQ" % per_l2, f.read(cluster))
            for j, x in enumerate(l2):
                if x & 0x00fffffffffffe00 and not x & 1:
                    return l2_off + 8 * j, (i * per_l2 + j) * cluster
    fail("no L2 entry in %s" % path)


try:
    for i in range(5):
        random_writes(vm, "vd0", SIZE, rng, 30 if i == 0 else 8)
        ref = vm.reference("vd0", os.path.join(w, "ref-%d.raw" % i))
        res = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "vm1")
        check(res["disks"][0]["type"] == ("full" if i == 0 else "incremental"),
              "chain: %s" % res["disks"][0])
        points.append(res["point"])
        refs[res["point"]] = ref
    P1, P2, P3, P4, P5 = points

    # Checksums beside every layer, recorded in the manifest.
    for p in points:
        check(os.path.getsize(layer(repo, p) + ".sums") >= 72, "%s has sums" % p)
        m = json.load(open(os.path.join(repo, "vm1", p, "manifest.json")))
        check(m["format"] == 2 and m["disks"][0]["sums"] == "vd0.qcow2.sums"
              and m["disks"][0]["sums_algorithm"] == "xxh3-64", "manifest: %s" % m)
        img_check(layer(repo, p))

    # Healthy: everything good, exit 0, nothing written.
    before = sorted(os.listdir(os.path.join(repo, "vm1", P3)))
    rc, states, _, res = verify(repo)
    check(rc == 0 and states == {p: "good" for p in points}, "healthy: %s (exit %d)" % (states, rc))
    check(res["bytes_read"] > 0 and res["damaged"] == 0 and res["good"] == 5, "totals: %s" % res)
    check(sorted(os.listdir(os.path.join(repo, "vm1", P3))) == before, "verify changed nothing")
    p = qbak("verify", "--repo", repo, "--vm", "vm1")
    check(p.returncode == 0 and "5 good, 0 damaged" in p.stdout, "human output: %s" % p.stdout)
    for pt in points:
        restore_ok(repo, pt)
    # A VM another qbak holds (a backup's exclusive lock): busy, exit 75;
    # over the whole repository the other VMs are still verified.
    other = os.path.join(w, "repo-two")
    shutil.copytree(repo, other, symlinks=True)
    shutil.copytree(os.path.join(other, "vm1"), os.path.join(other, "vm2"), symlinks=True)
    for p_ in points:
        mp = os.path.join(other, "vm2", p_, "manifest.json")
        m = json.load(open(mp))
        m["vm"] = "vm2"
        json.dump(m, open(mp, "w"))
    with open(os.path.join(other, "vm1", ".lock"), "a") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        p = qbak("verify", "--repo", other, "--vm", "vm1", check_rc=False)
        check(p.returncode == 75 and "busy" in p.stderr, "busy VM: exit %d %s" % (p.returncode, p.stderr))
        rc, states, _, res = verify(other)
        check(rc == 75 and res["busy"] == 1 and len(states) == 5
              and set(states.values()) == {"good"}, "busy VM skipped, the other verified: %s" % res)
    shutil.rmtree(other)
    listing = qbak_json("list", "--repo", repo, "--vm", "vm1")["points"]
    check(all(x["damaged"] is None and x["checksums"] and x["size_bytes"] > 0
              and x["protected"] is False for x in listing), "list: %s" % listing)
    open(os.path.join(repo, "vm1", P2, "protected"), "w").close()
    listing = {x["point"]: x for x in qbak_json("list", "--repo", repo, "--vm", "vm1")["points"]}
    check(listing[P2]["protected"] and not listing[P1]["protected"], "list: protected")
    check("protected" in qbak("list", "--repo", repo, "--vm", "vm1").stdout, "list says protected")
    os.unlink(os.path.join(repo, "vm1", P2, "protected"))

    # Damage found by the next backup's own checks, without verify.  First
    # of the backups into copies: only now is P5's bitmap generation the
    # one QEMU holds, so the backup gets as far as reading P5 back.
    r = copy("backup-finds")
    flip(layer(r, P5), 0, 1)
    next_backup_full(r, ["unreadable"], "backup finds a bad header")
    mark = json.load(open(os.path.join(r, "vm1", P5, "damaged.json")))
    check(mark["found_by"] == "backup", "backup's marker: %s" % mark)

    # a) A bit flipped in a data cluster of P3's own layer.
    r = copy("data")
    guest, host = own_data_cluster(layer(r, P3))
    flip(layer(r, P3), host + 4321, 3)
    expect_states(r, [P3, P4, P5], offsets={P3: guest}, what="data bit flip")
    restore_fails(r, P3, [P3, "vd0", "offset %d" % guest], "data bit flip")
    restore_ok(r, P2)
    # --no-verify reads what is there.
    qbak("restore", "--repo", r, "--vm", "vm1", "--disk", "vd0", "--point", P3,
         "--output", os.path.join(w, "salvage.raw"), "--no-verify")
    os.unlink(os.path.join(w, "salvage.raw"))
    # Found by restore alone (no verify): marked too.
    r2 = copy("data-restore")
    flip(layer(r2, P3), host + 4321, 3)
    restore_fails(r2, P3, [P3, "offset %d" % guest], "restore finds it")
    mark = json.load(open(os.path.join(r2, "vm1", P3, "damaged.json")))
    check(mark["found_by"] == "restore" and mark["offset"] == guest and mark["disk"] == "vd0",
          "restore's marker: %s" % mark)
    next_backup_full(r2, ["damaged"], "after restore found damage")

    # b) A bit flipped in an L2 table entry of P2's layer.
    r = copy("l2")
    entry, guest = l2_entry(layer(r, P2))
    # Bit 40 of the cluster's offset: it now points past the end of the
    # file (a nearby cluster might hold the same bytes and pass).
    flip(layer(r, P2), entry + 2, 0)
    expect_states(r, [P2, P3, P4, P5], what="L2 bit flip")
    restore_fails(r, P2, [P2], "L2 bit flip")
    restore_ok(r, P1)

    # c) A bit flipped in P4's header (the magic).
    r = copy("header")
    flip(layer(r, P4), 0, 1)
    expect_states(r, [P4, P5], what="header bit flip")
    restore_fails(r, P4, [P4], "header bit flip")
    restore_ok(r, P3)
    next_backup_full(r, ["damaged"], "header bit flip")

    # d) P5's layer truncated.
    r = copy("truncated")
    os.truncate(layer(r, P5), os.path.getsize(layer(r, P5)) // 2)
    expect_states(r, [P5], what="truncated layer")
    restore_fails(r, P5, [P5], "truncated layer")
    restore_ok(r, P4)
    next_backup_full(r, ["damaged"], "truncated layer")

    # e) The middle point P3 removed.
    r = copy("missing")
    shutil.rmtree(os.path.join(r, "vm1", P3))
    expect_states(r, [P4, P5], gone=[P3], what="missing middle point")
    restore_fails(r, P4, [P4], "missing middle point")
    restore_ok(r, P2)
    next_backup_full(r, ["damaged", "missing"], "missing middle point")

    # f) P3's manifest does not parse.
    r = copy("manifest")
    with open(os.path.join(r, "vm1", P3, "manifest.json"), "w") as f:
        f.write('{"format": 2, "vm": "vm1", "point": ')
    expect_states(r, [P3, P4, P5], what="manifest does not parse")
    restore_fails(r, P3, [P3, "manifest"], "manifest does not parse")
    restore_ok(r, P2)
    listing = {x["point"]: x for x in qbak_json("list", "--repo", r, "--vm", "vm1")["points"]}
    check(P3 in listing and "manifest" in listing[P3]["damaged"]["reason"],
          "list keeps the point with the bad manifest: %s" % listing.get(P3))
    # An unknown format version is damage too, not a vanished point.
    r2 = copy("manifest-version")
    mp = os.path.join(r2, "vm1", P5, "manifest.json")
    m = json.load(open(mp))
    m["format"] = 99
    json.dump(m, open(mp, "w"))
    listing = {x["point"]: x for x in qbak_json("list", "--repo", r2, "--vm", "vm1")["points"]}
    check(P5 in listing and listing[P5]["damaged"] is not None, "unknown format listed damaged")
    next_backup_full(r2, ["damaged"], "unknown manifest format")

    # A chain from before checksums: unverifiable, not good, exit 0.
    r = copy("old")
    for p in points:
        os.unlink(layer(r, p) + ".sums")
        mp = os.path.join(r, "vm1", p, "manifest.json")
        m = json.load(open(mp))
        m["format"] = 1
        for d in m["disks"]:
            del d["sums"], d["sums_algorithm"]
        json.dump(m, open(mp, "w"))
    rc, states, _, _ = verify(r)
    check(rc == 0 and states == {p: "unverifiable" for p in points},
          "old format: %s (exit %d)" % (states, rc))
    listing = qbak_json("list", "--repo", r, "--vm", "vm1")["points"]
    check(all(x["damaged"] is None and x["checksums"] is False for x in listing),
          "old points are listed, without checksums: %s" % listing)
    p = qbak("list", "--repo", r, "--vm", "vm1")
    check(p.stdout.count("unverifiable") == 5, "list says unverifiable: %s" % p.stdout)
    p = qbak("verify", "--repo", r)
    check(p.returncode == 0 and "0 good, 0 damaged, 5 unverifiable" in p.stdout,
          "human verify of old points: %s" % p.stdout)
    restore_ok(r, P5)
    # A missing sums file where the manifest promises one is damage.
    r = copy("nosums")
    os.unlink(layer(r, P4) + ".sums")
    expect_states(r, [P4, P5], what="missing checksum file")
    restore_fails(r, P5, [P5, "checksum"], "missing checksum file")
finally:
    vm.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: verify, checked restore and damage handling")
