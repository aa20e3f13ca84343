#!/usr/bin/env python3
"""The demo behind scripts/demo.sh: see there."""
import os
import random
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "lib"))
from qbaktest import QBAK, VM, make_disk, random_writes, require_qemu, workdir  # noqa: E402


def show(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main():
    require_qemu()
    w = workdir("demo")
    size = 256 << 20
    disk = make_disk(os.path.join(w, "disk0.qcow2"), size)
    vm = VM(w, [("vd0", disk, "qcow2")])
    repo = os.path.join(w, "repo")
    rng = random.Random(1)
    ok = True
    try:
        print("demo VM: QEMU %s, one 256 MiB virtio disk 'vd0', QMP at %s"
              % (vm.qmp.greeting["QMP"]["version"]["qemu"], vm.qbak_sock))
        print("writing guest data (random, zeroes, discards) ...")
        random_writes(vm, "vd0", size, rng, 200, max_len=1 << 20)
        ref1 = vm.reference("vd0", os.path.join(w, "at-full.raw"))
        show([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "demo"])
        print("the guest keeps writing ...")
        random_writes(vm, "vd0", size, rng, 30)
        ref2 = vm.reference("vd0", os.path.join(w, "at-incremental.raw"))
        show([QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "demo"])
        show([QBAK, "list", "--repo", repo])
        points = sorted(p for p in os.listdir(os.path.join(repo, "demo"))
                        if not p.startswith("."))
        for point, ref in zip(points, (ref1, ref2)):
            out = os.path.join(w, "restored-%s.raw" % point)
            show([QBAK, "restore", "--repo", repo, "--vm", "demo", "--disk", "vd0",
                  "--point", point, "--output", out])
            same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                                   out, ref]).returncode == 0
            print("  %s: restored image %s the disk at that point"
                  % (point, "is identical to" if same else "DIFFERS from"))
            ok &= same
        chain = os.path.join(repo, "demo", points[-1], "vd0.qcow2")
        print("the newest point is a plain qcow2 chain that stock tools read:")
        show(["qemu-img", "info", "--backing-chain", "--output=human", chain])
    finally:
        vm.stop()
        shutil.rmtree(w, ignore_errors=True)
    print("demo %s" % ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
