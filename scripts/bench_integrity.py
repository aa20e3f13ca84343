"""The benchmark's integrity rows (scripts/bench.py): qbak verify of a whole
chain against the disk's O_DIRECT read rate for the same files, the CPU
seconds spent on checksums, verify's peak RSS, and restore with checksum
checks against restore --no-verify.

The chain: the reference disk copied, a full, then 10 incrementals of 1 %
of its clusters each (fresh random clusters per incremental).
"""
import json
import mmap
import os
import random
import time


def direct_read(paths, b):
    """The files read whole with O_DIRECT in 4 MiB requests from one
    page-aligned buffer (dd iflag=direct bs=4M), one after the other."""
    bs = 4 * b.MiB
    buf = mmap.mmap(-1, bs)
    view = memoryview(buf)
    total = 0
    b.drop_caches()
    t0 = time.monotonic()
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            off = 0
            while True:
                n = os.preadv(fd, [view], off)
                if n <= 0:
                    break
                off += n
                total += n
        finally:
            os.close(fd)
    wall = time.monotonic() - t0
    view.release()
    buf.close()
    return b.Sample(wall=wall, bytes=total, rate=total / wall)


def build_chain(args, ref, lay, work, b):
    d = os.path.join(work, "integrity")
    os.mkdir(d)
    src = os.path.join(d, "src.qcow2")
    b.copy_disk(ref, src)
    vm = b.BenchVM(d, [(b.DEV, src, "qcow2")])
    repo = os.path.join(d, "repo")
    try:
        b.qbak_backup(vm, repo, full=True, what="integrity: full")
        n = lay["clusters"]
        for i in range(10):
            rng = random.Random("qbak-bench-integrity-%d-%d" % (args.seed, i))
            clusters = sorted(rng.sample(range(n), max(1, round(n * 0.01))))
            b.guest_rewrite(vm, [[c, rng.randint(1, 255)] for c in clusters])
            b.qbak_backup(vm, repo, what="integrity: 1 %% incremental %d" % (i + 1))
    finally:
        vm.stop()
        if vm.proc in b.CHILDREN:
            b.CHILDREN.remove(vm.proc)
    return d, repo


def verify_once(r, repo, points, res, b):
    s = b.run_qbak(["verify", "--repo", repo, "--vm", b.VMNAME, "--json"], what="verify")
    j = s["json"]
    if j["damaged"] or j["good"] != len(points):
        raise b.BenchError("verify of a healthy chain: %s" % json.dumps(j)[:1500])
    s["bytes"] = j["bytes_read"]
    s["rate"] = j["bytes_read"] / s["wall"]
    s["checksum_cpu_s"] = j["checksum_cpu_s"]
    res.add("verify.qbak", s)
    b.note("run %d verify full+10: %.3f s, %s read, %.0f MiB/s, checksums %.2f s CPU"
           % (r + 1, s["wall"], b.human(s["bytes"]), s["rate"] / b.MiB, s["checksum_cpu_s"]))


def integrity_step(args, ref, lay, work, res, b):
    d, repo = build_chain(args, ref, lay, work, b)
    vmdir = os.path.join(repo, b.VMNAME)
    points = sorted(p for p in os.listdir(vmdir) if not p.startswith("."))
    layers = [os.path.join(vmdir, p, f) for p in points
              for f in sorted(os.listdir(os.path.join(vmdir, p))) if f.endswith(".qcow2")]
    out = os.path.join(d, "restore.raw")
    for r in range(args.runs):
        # verify and the plain read back to back, the order alternating
        # between runs: the machine's other load hits both alike.
        for what in (("verify", "dd") if r % 2 == 0 else ("dd", "verify")):
            if what == "verify":
                verify_once(r, repo, points, res, b)
            else:
                s = direct_read(layers, b)
                res.add("verify.ddread", s)
                b.note("run %d O_DIRECT read of the %d layer files: %.3f s, %.0f MiB/s"
                       % (r + 1, len(layers), s["wall"], s["rate"] / b.MiB))
        modes = [("restore.checked", []), ("restore.unchecked", ["--no-verify"])]
        for key, extra in (modes if r % 2 == 0 else modes[::-1]):
            s = b.run_qbak(["restore", "--repo", repo, "--vm", b.VMNAME, "--disk", b.DEV,
                            "--point", points[-1], "--output", out, "--force"] + extra,
                           what=key)
            res.add(key, s)
            b.note("run %d %-17s %.3f s" % (r + 1, key, s["wall"]))
            os.unlink(out)


def report_lines(res, b):
    lines = []
    v, dd = res.med("verify.qbak"), res.med("verify.ddread", "rate")
    if v is None:
        return lines
    rss = res.vals("verify.qbak", "rss_kib")
    lines.append("")
    lines.append("integrity: a full + 10 incrementals of 1 % each (median)")
    lines.append("  verify: %s, %s read at %.0f MiB/s; O_DIRECT 4 MiB reads of the layer files: "
                 "%.0f MiB/s" % (b.fmt_t(res.vals("verify.qbak")),
                                 b.human(res.med("verify.qbak", "bytes")),
                                 res.med("verify.qbak", "rate") / b.MiB, dd / b.MiB))
    lines.append("  verify CPU: %.2f s in all, %.2f s of it checksums; peak RSS %s"
                 % (res.med("verify.qbak", "cpu"), res.med("verify.qbak", "checksum_cpu_s"),
                    "%.1f MiB" % (max(rss) / 1024) if rss else "-"))
    lines.append("  restore of the newest point: with checks %s, --no-verify %s"
                 % (b.fmt_t(res.vals("restore.checked")), b.fmt_t(res.vals("restore.unchecked"))))
    return lines


def targets(res, ratio):
    """(name, value, ok, goal, fmt) for bench.py's target table."""
    out = []
    v = ratio(res.med("verify.qbak", "rate"), res.med("verify.ddread", "rate"))
    out.append(("verify full+10: read rate / disk O_DIRECT read rate (x)", v,
                v is not None and v >= 0.8, ">= 0.8", "%.2f"))
    v = ratio(res.med("restore.checked"), res.med("restore.unchecked"))
    out.append(("restore: with checksum checks / --no-verify (x)", v,
                v is not None and v <= 1.1, "<= 1.1", "%.2f"))
    return out
