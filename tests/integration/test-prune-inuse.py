#!/usr/bin/env python3
"""prune leaves alone the files another program reads through QEMU's image
locks, whatever qbak's own locks say.

Three points (a full and two incrementals) of a real QEMU; then a real
qemu-nbd serves the middle point read-only through its chain, holding the
image locks a QEMU holds on a backing chain (as a live restore's QEMU
does, or any reader a user starts):
- prune --keep-last 1 would merge the newest into the middle point and
  remove the full: it fails busy (exit 75) naming the file, and every file
  of the chain qemu-nbd reads stays byte-identical;
- what qemu-nbd serves reads as the middle point still;
- once qemu-nbd is gone, the same prune runs, and the one point left
  restores as the newest."""
import hashlib
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

require_qemu()
w = workdir("prune-inuse")
SIZE = 16 << 20
disk = make_disk(os.path.join(w, "vd0.qcow2"), SIZE)
vm = VM(w, [("vd0", disk, "qcow2")])
rng = random.Random(7)
repo = os.path.join(w, "repo")
points, refs = [], []
try:
    for i in range(3):
        random_writes(vm, "vd0", SIZE, rng, 12)
        refs.append(vm.reference("vd0", os.path.join(w, "ref-%d.raw" % i)))
        points.append(qbak_json("backup", "--qmp", vm.qbak_sock, "--repo", repo,
                                "--vm", "vm1")["point"])
finally:
    vm.stop()

mid = os.path.join(repo, "vm1", points[1], "vd0.qcow2")
chain = [i["filename"] for i in json.loads(run(
    [QEMU_IMG, "info", "-U", "--backing-chain", "--output=json", mid]).stdout)]
check(len(chain) == 2, "the middle point reads through the full: %s" % chain)


def sha(f):
    return hashlib.sha256(open(f, "rb").read()).hexdigest()


held = {f: sha(f) for f in chain}
sock = os.path.join(w, "nbd.sock")
nbd = subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "--shared=2",
                        "--format=qcow2", "--socket=" + sock, mid],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
try:
    deadline = time.time() + 600
    while not os.path.exists(sock) and time.time() < deadline and nbd.poll() is None:
        time.sleep(0.1)
    check(os.path.exists(sock), "qemu-nbd serves the middle point")

    p = qbak("prune", "--repo", repo, "--vm", "vm1", "--keep-last", "1", check_rc=False)
    check(p.returncode == 75 and "open in another program" in p.stderr
          and points[0] in p.stderr,
          "prune is busy while qemu-nbd reads the chain: rc %d %s" % (p.returncode, p.stderr))
    check({f: sha(f) for f in chain} == held, "the files qemu-nbd reads are unchanged")
    log("PASS prune refuses to remove a file a QEMU program reads: %s" % p.stderr.strip())

    out = os.path.join(w, "served.raw")
    run([QEMU_IMG, "convert", "-q", "-U", "-f", "raw", "-O", "raw",
         "nbd+unix:///?socket=" + sock, out])
    img_compare(out, refs[1], fmt_a="raw")
    log("PASS what qemu-nbd serves reads as the middle point")
finally:
    nbd.terminate()
    nbd.wait()

r = qbak_json("prune", "--repo", repo, "--vm", "vm1", "--keep-last", "1")
left = [p["point"] for p in qbak_json("list", "--repo", repo, "--vm", "vm1")["points"]]
check(left == [points[2]], "prune ran once qemu-nbd was gone: %s %s" % (r, left))
out = os.path.join(w, "restored.raw")
qbak("restore", "--repo", repo, "--vm", "vm1", "--disk", "vd0", "--output", out)
img_compare(out, refs[2], fmt_a="raw")
log("PASS with the reader gone prune runs, and the point left restores as the newest")
shutil.rmtree(w, ignore_errors=True)
