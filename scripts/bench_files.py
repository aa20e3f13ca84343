"""File-level access for scripts/bench.py: qbak index, find, ls and get
on a generated guest disk (about 20,000 files, 30 points; --quick: 2,000
files, 5 points).

The disk is a whole-disk ext4 made on the host (mkfs.ext4 -d), attached to
a QEMU with paused vCPUs; each point after the first adds and removes some
files (debugfs on a raw copy, the changed 64 KiB chunks written through the
device with HMP qemu-io) and is a qbak backup.  Then, timed:
  index:  `qbak index` of every point in one run (appliance launches, the
          launch time, the seconds per point, catalog bytes per point);
  find:   `qbak find --name` over every (indexed) point, no appliance;
  ls/get: `qbak ls` of a directory and `qbak get` of one file of the
          newest point (one launch each, and what is not the launch);
  memory: peak RSS of qbak and of the appliance's QEMU (VmHWM, polled).

bench.py calls files_step() and report_lines(); `b` is the bench module.
"""
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import time

KiB = 1024
MiB = 1 << 20


def _hwm(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid):
    out = []
    try:
        for t in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, t)) as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def run_measured(cmd):
    """Runs cmd; returns (wall s, stdout, peak RSS KiB of the process, peak
    RSS KiB of its descendants (the appliance's QEMU))."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    own, kids = 0, {}
    while p.poll() is None:
        own = max(own, _hwm(p.pid))
        todo = _children(p.pid)
        while todo:
            c = todo.pop()
            kids[c] = max(kids.get(c, 0), _hwm(c))
            todo += _children(c)
        time.sleep(0.1)
    out, err = p.communicate()
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(cmd), p.returncode, err.strip()))
    return wall, out, own, max(kids.values()) if kids else 0


def make_tree(top, nfiles, rng):
    per_dir = 200
    for i in range(nfiles):
        d = os.path.join(top, "data", "d%03d" % (i // per_dir))
        if i % per_dir == 0:
            os.makedirs(d)
        with open(os.path.join(d, "f%05d.txt" % i), "wb") as f:
            f.write(rng.randbytes(rng.randrange(64, 2048)))


def write_changes(vm, dev, old, new, chunk=64 * KiB):
    n = 0
    buf = os.path.join(vm.dir, "chunk.bin")
    with open(old, "rb") as fa, open(new, "rb") as fb:
        a = mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ)
        c = mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ)
        for off in range(0, len(c), chunk):
            if a[off:off + chunk] != c[off:off + chunk]:
                with open(buf, "wb") as f:
                    f.write(c[off:off + chunk])
                vm.io(dev, "write -s %s %d %d" % (buf, off, min(chunk, len(c) - off)))
                n += 1
        a.close()
        c.close()
    vm.flush(dev)
    return n


def files_step(args, work, res, b):
    q = b.qbaktest
    quick = args.quick
    nfiles, npoints = (2000, 5) if quick else (20000, 30)
    size = (64 if quick else 256) * MiB
    rng = random.Random(args.seed)
    d = os.path.join(work, "files")
    os.makedirs(d)
    tree = os.path.join(d, "tree")
    make_tree(tree, nfiles, rng)
    cur = os.path.join(d, "cur.raw")
    b.sh(["mkfs.ext4", "-q", "-F", "-d", tree, "-E", "lazy_itable_init=0", cur, str(size // KiB) + "k"])
    shutil.rmtree(tree)
    disk = os.path.join(d, "disk.qcow2")
    b.sh([b.QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", cur, disk])
    repo = os.path.join(d, "repo")
    vm = b.VM(d, [("vd0", disk, "qcow2")])
    b.CHILDREN.append(vm.proc)
    points, changed = [], 0
    try:
        for i in range(npoints):
            if i:
                prev = os.path.join(d, "prev.raw")
                shutil.copyfile(cur, prev)
                cmds = ["mkdir /data/p%02d" % i, "cd /data/p%02d" % i]
                src = os.path.join(d, "src.bin")
                with open(src, "wb") as f:
                    f.write(rng.randbytes(1500))
                cmds += ['write %s n%02d-%02d.txt' % (src, i, k) for k in range(20)]
                cmds += ["cd /", "rm /data/d%03d/f%05d.txt" % ((i * 7) // 200, i * 7)]
                script = os.path.join(d, "cmds")
                with open(script, "w") as f:
                    f.write("\n".join(cmds) + "\n")
                b.sh(["debugfs", "-w", "-f", script, cur])
                changed += write_changes(vm, "vd0", prev, cur)
                os.unlink(prev)
            out = b.sh([b.QBAK, "backup", "--qmp", vm.qbak_sock, "--repo", repo, "--vm", "files",
                        "--json"]).stdout
            points.append(json.loads(out)["point"])
    finally:
        vm.stop()
        if vm.proc in b.CHILDREN:
            b.CHILDREN.remove(vm.proc)
    base = [b.QBAK, None, "--repo", repo, "--vm", "files", "--json"]

    def cmd(name, *extra):
        c = list(base)
        c[1] = name
        return c + list(extra)

    r = {"files": nfiles, "points": npoints}
    wall, out, own, kids = run_measured(cmd("index"))
    j = json.loads(out)
    per = [p["duration_s"] for p in j["points"] if p.get("indexed")]
    cat = [p["bytes"] for p in j["points"] if p.get("indexed")]
    r["index"] = {"wall": wall, "launches": j["launches"], "launch_s": j["launch_s"],
                  "per_point_s": statistics.median(per), "catalog_bytes": statistics.median(cat),
                  "entries": statistics.median([p["entries"] for p in j["points"]]),
                  "rss_kib": own, "appliance_rss_kib": kids}
    finds = []
    for _ in range(3):
        wall, out, own, _ = run_measured(cmd("find", "--name", "f01234.txt"))
        jf = json.loads(out)
        if jf["launches"]:
            raise RuntimeError("find over indexed points launched an appliance")
        finds.append(wall)
    r["find"] = {"wall": statistics.median(finds), "matches": len(jf["matches"]), "rss_kib": own}
    wall, out, own, kids = run_measured(cmd("ls", "/data/d001"))
    jl = json.loads(out)
    r["ls"] = {"wall": wall, "launch_s": jl["launch_s"], "entries": len(jl["entries"]),
               "rss_kib": own, "appliance_rss_kib": kids}
    dest = os.path.join(d, "got")
    os.mkdir(dest)
    wall, out, own, kids = run_measured(cmd("get", "/data/d002/f00400.txt", "--output", dest))
    jg = json.loads(out)
    r["get"] = {"wall": wall, "launch_s": jg["launch_s"], "bytes": jg["bytes"],
                "rss_kib": own, "appliance_rss_kib": kids}
    r["chunks_written"] = changed
    res.files = r
    b.note("files: %s" % json.dumps(r))


def report_lines(r):
    if not r:
        return []
    if isinstance(r, str):
        return ["file-level access: %s" % r]
    ix, fd, ls, gt = r["index"], r["find"], r["ls"], r["get"]
    n = r["points"]
    lines = ["",
             "file-level access: ext4 disk of %d files, %d points (TCG, no KVM)" % (r["files"], n),
             "  %-56s %8.3f s" % ("find --name over %d indexed points (target < 1 s)" % n, fd["wall"]),
             "  %-56s %8.1f s  (%d launch(es), launch %.1f s, %.2f s/point)"
             % ("index of %d points in one run" % n, ix["wall"], ix["launches"], ix["launch_s"],
                (ix["wall"] - ix["launch_s"]) / n),
             "  %-56s %8.1f KiB (%d entries)" % ("catalog bytes per point", ix["catalog_bytes"] / 1024,
                                                  ix["entries"]),
             "  %-56s %8.1f s  (launch %.1f s + %.2f s)" % ("ls of one directory", ls["wall"],
                                                           ls["launch_s"], ls["wall"] - ls["launch_s"]),
             "  %-56s %8.1f s  (launch %.1f s + %.2f s)" % ("get of one file", gt["wall"],
                                                           gt["launch_s"], gt["wall"] - gt["launch_s"]),
             "  %-56s %8.1f MiB qbak, %.1f MiB appliance QEMU"
             % ("peak RSS (index)", ix["rss_kib"] / 1024, ix["appliance_rss_kib"] / 1024),
             "  %-56s %8.1f MiB qbak" % ("peak RSS (find)", fd["rss_kib"] / 1024)]
    return lines


def targets(r):
    """(name, value, ok, goal, fmt) rows for bench.py's target table."""
    if not r or isinstance(r, str):
        return []
    ix, n = r["index"], r["points"]
    per = (ix["wall"] - ix["launch_s"]) / n
    return [("find --name over %d indexed points (s)" % n, r["find"]["wall"], r["find"]["wall"] < 1,
             "< 1", "%.3f"),
            ("index: launches in one run", ix["launches"], ix["launches"] <= 1, "<= 1", "%d"),
            ("index: s per point beyond the launch", per, per <= 1.5, "<= 1.5", "%.2f"),
            ("ls: s beyond the launch", r["ls"]["wall"] - r["ls"]["launch_s"],
             r["ls"]["wall"] - r["ls"]["launch_s"] < 1, "< 1", "%.2f"),
            ("get of one file: s beyond the launch", r["get"]["wall"] - r["get"]["launch_s"],
             r["get"]["wall"] - r["get"]["launch_s"] < 1, "< 1", "%.2f")]
