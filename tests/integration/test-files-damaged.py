#!/usr/bin/env python3
"""File-level access on damaged guest file systems: never a silently short
listing.

One qbak point of a QEMU with three whole-disk ext4 disks made on the host
(mkfs.ext4 -d, then debugfs, no mount):
  vd0: /a/broken is a directory whose inode was cleared (debugfs clri):
       the parent lists the name, lstat of it fails;
  vd1: /many is a directory of several blocks; its last block, holding
       its subdirectory zsub-... and a few files, is overwritten with
       random bytes: the kernel skips that block when reading the
       directory (no read error), and every name it still lists is found
       by lstat (lookups stop before the bad block), so only the link
       count (3: one subdirectory) tells the listing is short;
  vd2: healthy, with an empty directory: listed in full, no error;
  vd3: /files (no htree) holds only files over several blocks, the last
       one overwritten: ext4 lists the rest, the link count cannot tell, and
       only the appliance kernel's log ("EXT4-fs error ... fails
       checksum") says the listing is short.
index records the three damaged file systems as not listed, with the
reason, in their catalogs (find says so on stderr and searches the rest);
ls lists what can be read of each damaged directory, names what cannot
and exits 1; get of the damaged directory fails instead of copying part
of it; the
repository stays byte-identical apart from the catalogs."""
import json
import os
import random
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("files-damaged")
rng = random.Random(11)


def mkext4(name, tree, features=()):
    """An ext4 raw image of tree {path: None (dir) or bytes}."""
    top = os.path.join(w, name + ".tree")
    for p, data in sorted(tree.items()):
        full = top + p
        if data is None:
            os.makedirs(full, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data)
    raw = os.path.join(w, name + ".raw")
    run(["mkfs.ext4", "-q", "-F", *(["-O", ",".join(features)] if features else []),
         "-d", top, raw, "16M"])
    shutil.rmtree(top)
    return raw


def dir_blocks(raw, path):
    """(block size, data blocks of directory path) from debugfs."""
    st = run(["debugfs", "-R", "stats", raw]).stdout
    bs = int([ln.split(":")[1] for ln in st.splitlines() if ln.startswith("Block size:")][0])
    blocks = [int(b) for b in run(["debugfs", "-R", "blocks %s" % path, raw]).stdout.split()]
    return bs, blocks


# vd0: a directory inode cleared
raw0 = mkext4("d0", {"/a/ok.txt": b"fine\n", "/a/broken/inner.txt": b"lost\n", "/top.txt": b"t\n"})
debugfs(raw0, 0, ["clri /a/broken"])

# vd1: the directory block holding a subdirectory's entry overwritten
many = {"/many/file-with-a-rather-long-name-number-%04d.txt" % i: b"x\n" for i in range(120)}
raw1 = mkext4("d1", many)
# a long name: no room left in the earlier blocks, so it opens the last
SUB = "zsub-" + "y" * 90
debugfs(raw1, 0, ["mkdir /many/" + SUB])
bs, blocks = dir_blocks(raw1, "/many")
with open(raw1, "r+b") as f:
    hit = []
    for b in blocks:
        f.seek(b * bs)
        blk = f.read(bs)
        if SUB.encode() in blk:
            hit.append(b)
    check(hit == blocks[-1:], "the subdirectory in the last block: %s of %s" % (hit, blocks))
    f.seek(hit[0] * bs)
    f.write(rng.randbytes(bs))
links = run(["debugfs", "-R", "stat /many", raw1]).stdout
check("Links: 3" in links, "/many has one subdirectory by its link count: %s" % links[:300])

# vd2: healthy
raw2 = mkext4("d2", {"/e": None, "/n/m/o/f.txt": b"deep\n", "/x.txt": b"x\n"})

# vd3: a directory of files only, its last block overwritten: ext4 lists
# the other blocks' names, no subdirectory is missing, only the kernel log
# says a block failed its checksum
files3 = {"/files/file-with-a-rather-long-name-number-%04d.txt" % i: b"x\n" for i in range(120)}
# linear, the last block: the lookup of every name still listed ends
# before it, so no lstat fails
raw3 = mkext4("d3", files3, ["^dir_index"])
bs3, blocks3 = dir_blocks(raw3, "/files")
check(len(blocks3) >= 5, "/files spans several blocks: %s" % blocks3)
with open(raw3, "r+b") as f:
    f.seek(blocks3[-1] * bs3)
    f.write(rng.randbytes(bs3))

disks = []
for i, raw in enumerate((raw0, raw1, raw2, raw3)):
    q = os.path.join(w, "d%d.qcow2" % i)
    run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", raw, q])
    os.unlink(raw)
    disks.append(("vd%d" % i, q, "qcow2"))
repo = os.path.join(w, "repo")
vm = VM(w, disks)
try:
    point = qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "dmg")["point"]
finally:
    vm.stop()
before = tree_hashes(repo)
common = ["--repo", repo, "--vm", "dmg"]


def catalog_header(disk):
    with open(os.path.join(repo, "dmg", point, disk + ".catalog"), "rb") as f:
        buf = f.read()
    check(buf[:8] == b"QBAKCAT1", "catalog magic of %s" % disk)
    (n,) = struct.unpack("<I", buf[8:12])
    return json.loads(buf[12:12 + n])


r = qbak_json("index", *common)
check(sorted(p["disk"] for p in r["points"] if p["indexed"]) == ["vd0", "vd1", "vd2", "vd3"],
      "index: %s" % r)
fs0 = catalog_header("vd0")["filesystems"]
fs1 = catalog_header("vd1")["filesystems"]
fs2 = catalog_header("vd2")["filesystems"]
log("catalog file systems: %s | %s | %s" % (fs0, fs1, fs2))
check(len(fs0) == 1 and "/a/broken" in fs0[0].get("error", "") and fs0[0]["entries"] == 0,
      "vd0: the unreadable inode must be recorded as the error: %s" % fs0)
log("PASS a directory whose inode cannot be read: the catalog records the error")
check(len(fs1) == 1 and "/many: directory damaged" in fs1[0].get("error", "")
      and fs1[0]["entries"] == 0,
      "vd1: the short directory must be recorded as the error: %s" % fs1)
log("PASS a directory read short (a block skipped by the kernel): the catalog records the error")
check(len(fs2) == 1 and "error" not in fs2[0], "vd2 healthy: %s" % fs2)
fs3 = catalog_header("vd3")["filesystems"]
check(len(fs3) == 1 and "file system damaged: EXT4-fs error" in fs3[0].get("error", "")
      and fs3[0]["entries"] == 0,
      "vd3: the block the kernel skipped must be recorded as the error: %s" % fs3)
log("PASS a directory of files read short (only the kernel log says so): %s"
    % fs3[0]["error"])

p = qbak("find", *common, "--disk", "vd1", "--name", "*", "--json", check_rc=False)
check(p.returncode == 0 and "not searched" in p.stderr and "/many" in p.stderr,
      "find on vd1 says the file system was not searched: rc %d %s" % (p.returncode, p.stderr))
r = qbak_json("find", *common, "--disk", "vd2", "--name", "*")
got = sorted(m["path"] for m in r["matches"])
want = ["/e", "/lost+found", "/n", "/n/m", "/n/m/o", "/n/m/o/f.txt", "/x.txt"]
check(got == want and r["launches"] == 0, "find vd2: %s" % got)
log("PASS healthy disk with an empty directory listed in full, from its catalog")

# ls lists what can be read, says what cannot, and exits 1.
p = qbak("ls", *common, "--disk", "vd0", "/a", "--json", check_rc=False)
r = json.loads(p.stdout)
names = sorted(e["name"] for e in r["entries"])
check(p.returncode == 1 and names == ["ok.txt"] and r["errors"]
      and r["errors"][0].startswith("/a/broken: ") and "/a/broken" in p.stderr,
      "ls of a directory with an unreadable name: rc %d %s %s" % (p.returncode, r, p.stderr))
log("PASS ls says which name cannot be read: %s" % p.stderr.strip())
p = qbak("ls", *common, "--disk", "vd1", "/many", check_rc=False)
check(p.returncode == 1 and "/many: directory damaged" in p.stderr
      and "file-with-a-rather-long-name-number-0000.txt" in p.stdout,
      "ls of a directory read short: rc %d %s" % (p.returncode, p.stderr))
log("PASS ls says a directory reads short: %s" % p.stderr.strip())
p = qbak("ls", *common, "--disk", "vd3", "/files", check_rc=False)
check(p.returncode == 1 and "file system damaged: EXT4-fs error" in p.stderr
      and "file-with-a-rather-long-name-number-0000.txt" in p.stdout,
      "ls of a directory whose block the kernel skipped: rc %d %s" % (p.returncode, p.stderr))
log("PASS ls says what the kernel logged: %s" % p.stderr.strip())

dest = os.path.join(w, "out")
os.mkdir(dest)
p = qbak("get", *common, "--disk", "vd1", "/many", "--output", dest, check_rc=False)
check(p.returncode == 1 and "/many" in p.stderr, "get of the short directory must fail: rc %d %s"
      % (p.returncode, p.stderr))
log("PASS get of a damaged directory fails: %s" % p.stderr.strip())
check_repo_unchanged(before, tree_hashes(repo))
log("PASS repository byte-identical (catalogs added)")
shutil.rmtree(w, ignore_errors=True)
