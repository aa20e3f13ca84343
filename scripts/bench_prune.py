"""Prune for scripts/bench.py: what folding backups together costs.

On a copy of the reference disk, per run: a qbak full and 10 incrementals,
each after guest writes of 1 % of the disk's clusters (a fresh random set
and pattern each).  Then, each with the page cache dropped first:

  prune.keep1    `qbak prune --keep-last 1` of that chain: the ten
                 incrementals folded into the full in one merge, one full
                 left holding the newest point's content (durable), the
                 ten other point directories removed;
  prune.commit   stock QEMU doing the same to a copy of the chain:
                 `qemu-img commit -b <full> <newest>` (every layer above
                 the full folded into it), then an fsync of the full;
  prune.merge1   `qbak prune --keep-last 1` of a copy of the full and the
                 first incremental alone: one merge of one 1 % incremental;
  prune.write1   writing that incremental's data bytes once, O_DIRECT
                 4 MiB writes + fsync (the disk's write limit for them).

qbak's prune does more than qemu-img commit: it checks every cluster
against its checksums, writes the merged checksums and the manifest
durably, and removes the ten pruned points' files, which qemu-img commit
leaves in place.

prune.keep1 and prune.commit work on two copies of the same chain, each
timed from its process's start to its result made durable, the page
cache dropped (sync first) before each; they alternate which goes first
from run to run.  prune.merge1 is timed the same way, whole command, and
prune.write1 from the file's open to its fsync; these two alternate too.
The rows carry qbak's CPU seconds and peak RSS (GNU time).

bench.py calls prune_step(), and report_lines()/targets() from its report;
`b` is the bench module, passed in to avoid a circular import.
"""
import os
import random
import shutil
import statistics

INCREMENTALS = 10
FRACTION = 0.01


def _copy_tree(b, src, dst):
    b.sh(["cp", "-a", "--sparse=always", src, dst])


def _timed_commit(b, top, base):
    """qemu-img commit of top down into base, then fsync of base: from
    start to durable, like qbak's prune."""
    b.drop_caches()
    wall, ru, rc, out, err, rss = b.timed([b.QEMU_IMG, "commit", "-q", "-b", base, top])
    if rc != 0:
        raise b.BenchError("qemu-img commit exited %d: %s" % (rc, err[-1000:]))
    t0 = b.time.monotonic()
    fd = os.open(base, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    wall += b.time.monotonic() - t0
    s = b.Sample(wall=wall, cpu=ru.ru_utime + ru.ru_stime)
    if rss is not None:
        s["rss_kib"] = rss
    return s


def _layer(repo, point):
    return os.path.join(repo, point, "%s.qcow2" % "vd0")


def prune_step(args, ref, lay, work, res, b):
    n = lay["clusters"]
    for r in range(args.runs):
        rdir = os.path.join(work, "prune%d" % r)
        os.mkdir(rdir)
        src = os.path.join(rdir, "src.qcow2")
        b.copy_disk(ref, src)
        vm = b.BenchVM(rdir, [(b.DEV, src, "qcow2")])
        repo = os.path.join(rdir, "repo")
        vmdir = os.path.join(repo, b.VMNAME)
        one = os.path.join(rdir, "one")
        points = []
        try:
            points.append(b.qbak_backup(vm, repo, full=True, what="prune: full")["json"]["point"])
            rng = random.Random("qbak-bench-prune-%d-%d" % (args.seed, r))
            for i in range(INCREMENTALS):
                clusters = sorted(rng.sample(range(n), max(1, round(n * FRACTION))))
                b.guest_rewrite(vm, [[c, (i * 37 + r) % 255 + 1] for c in clusters])
                s = b.qbak_backup(vm, repo, what="prune: incremental %d" % (i + 1))
                points.append(s["json"]["point"])
                if i == 0:
                    # the data the single merge folds: every rewritten cluster
                    inc1_bytes = len(clusters) * b.CLUSTER
                    # full + this one incremental, for the single merge
                    os.makedirs(one)
                    _copy_tree(b, vmdir, os.path.join(one, b.VMNAME))
        finally:
            vm.stop()
            if vm.proc in b.CHILDREN:
                b.CHILDREN.remove(vm.proc)
        stock = os.path.join(rdir, "stock")
        _copy_tree(b, vmdir, stock)

        def keep1():
            s = b.run_qbak(["prune", "--repo", repo, "--vm", b.VMNAME, "--keep-last", "1",
                            "--json"], what="prune --keep-last 1")
            if s["json"]["removed"] != INCREMENTALS:
                raise b.BenchError("prune removed %s points" % s["json"]["removed"])
            s["bytes"] = s["json"]["merged_bytes"]
            res.add("prune.keep1", s)
            b.note("run %d prune --keep-last 1 (full + %d x 1 %%)  %.3f s, peak RSS %s KiB"
                   % (r + 1, INCREMENTALS, s["wall"], s.get("rss_kib")))

        def commit():
            s = _timed_commit(b, _layer(stock, points[-1]), _layer(stock, points[0]))
            res.add("prune.commit", s)
            b.note("run %d qemu-img commit + fsync (same chain)  %.3f s" % (r + 1, s["wall"]))

        for step in ((keep1, commit) if r % 2 == 0 else (commit, keep1)):
            step()
        # Both did the work: qbak's one point left and the full stock
        # qemu-img committed into each read as the newest point did.
        if r == 0:
            b.sh([b.QEMU_IMG, "compare", "-q", _layer(vmdir, points[-1]),
                  _layer(stock, points[0])])
            b.note("prune checked: qbak's one point left reads as the full qemu-img "
                   "committed the chain into")

        def merge1():
            s = b.run_qbak(["prune", "--repo", one, "--vm", b.VMNAME, "--keep-last", "1",
                            "--json"], what="prune of one incremental")
            s["bytes"] = s["json"]["merged_bytes"]
            if s["bytes"] != inc1_bytes:
                raise b.BenchError("the single merge folded %d bytes, not the %d rewritten"
                                   % (s["bytes"], inc1_bytes))
            res.add("prune.merge1", s)
            b.note("run %d prune: one 1 %% incremental into the full  %.3f s (%s merged)"
                   % (r + 1, s["wall"], b.human(s["bytes"])))

        def write1():
            s = b.write_limit(os.path.join(rdir, "ddtest"), inc1_bytes, args.seed + r)
            res.add("prune.write1", s)
            b.note("run %d writing those bytes once  %.3f s" % (r + 1, s["wall"]))

        for step in ((merge1, write1) if r % 2 == 0 else (write1, merge1)):
            step()
        if not args.keep:
            shutil.rmtree(rdir, ignore_errors=True)


def targets(res, target, ratio):
    v = ratio(res.med("prune.keep1"), res.med("prune.commit"))
    target("prune full+10x1 % to one: qbak / qemu-img commit (x)", v,
           v is not None and v <= 1, "<= 1")
    v = ratio(res.med("prune.merge1"), res.med("prune.write1"))
    target("merge one 1 % incremental / writing its bytes (x)", v,
           v is not None and v <= 2, "<= 2")
    rss = res.vals("prune.keep1", "rss_kib")
    v = max(rss) / 1024 if rss else None
    target("peak RSS of qbak prune --keep-last 1 (MiB)", v, v is not None and v < 64,
           "< 64", "%.1f")


STEP_KEYS = ["prune.keep1", "prune.commit", "prune.merge1", "prune.write1"]


def report_lines(res):
    out = []
    if not res.steps.get("prune.keep1"):
        return out

    def med(key):
        v = res.vals(key)
        return "%.3f s [%.3f-%.3f]" % (statistics.median(v), min(v), max(v)) if v else "-"
    out.append("prune (full + %d incrementals of 1 %% each):" % INCREMENTALS)
    out.append("  qbak prune --keep-last 1        %s" % med("prune.keep1"))
    out.append("  qemu-img commit + fsync         %s" % med("prune.commit"))
    out.append("  qbak: one 1 %% incremental merged %s" % med("prune.merge1"))
    out.append("  writing its bytes once          %s" % med("prune.write1"))
    return out
