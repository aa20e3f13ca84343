#!/usr/bin/env python3
"""Pull mode's point in time is one instant for every disk, with guest
writes racing it.

A real Linux guest writes a counter i to disk A, then i to disk B, then
i+1 to A, ..., each write O_DIRECT and complete before the next starts.
At any one instant A holds the same counter as B or one more.  qbak backs
the two disks up in pull mode with no guest freeze, while a test hook
(QBAK_TEST_POINT_GAP_MS) spreads qbak's per-disk changes to QEMU's graph
out in time; a point made disk by disk would catch A and B at different
instants, and their counters would differ by the guest's progress in the
gap.  Checked for a full and for incrementals after qbak was killed
(SIGKILL) just after the point and while reading it: the guest's writer
never fails, the next run undoes what the killed one left, the devices are
back on their own nodes afterwards and nothing of qbak's stays in QEMU."""
import base64
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

image = need_guest_image()
w = workdir("pull-atomic")
repo = os.path.join(w, "repo")
scratch = os.path.join(w, "scratch")
os.mkdir(scratch)
SIZE_A, SIZE_B = 4 << 20, 6 << 20  # told apart in the guest by their sizes
da = make_disk(os.path.join(w, "a.qcow2"), SIZE_A)
db = make_disk(os.path.join(w, "b.qcow2"), SIZE_B)
g = Guest(w, make_guest_disk(os.path.join(w, "data.qcow2")), image, "qbak.writer=0",
          more_disks=[("vd1", da, "qcow2"), ("vd2", db, "qcow2")])
GAP_MS = 1500

# The guest's writer: each counter goes to A, then to B, one 512-byte
# O_DIRECT write each (dd waits for it); /run/seq.last says how far it got.
WRITER = r"""
A= B=
for d in /sys/block/vd*; do
    case $(cat $d/size) in
    %d) A=/dev/${d##*/} ;;
    %d) B=/dev/${d##*/} ;;
    esac
done
[ -n "$A" ] && [ -n "$B" ] || { echo "no disks A=$A B=$B"; exit 2; }
i=1
while [ ! -e /run/seq.stop ]; do
    printf '%%015d\n' $i | dd of=$A bs=512 count=1 conv=sync,notrunc oflag=direct 2>/dev/null || exit 1
    printf '%%015d\n' $i | dd of=$B bs=512 count=1 conv=sync,notrunc oflag=direct 2>/dev/null || exit 1
    echo $i > /run/seq.tmp && mv /run/seq.tmp /run/seq.last
    i=$((i + 1))
done
echo stopped at $i
""" % (SIZE_A // 512, SIZE_B // 512)


def guest_sh(script, wait=True):
    def go(a):
        pid = a.cmd("guest-exec", path="/bin/sh", arg=["-c", script],
                    **{"capture-output": True})["pid"]
        if not wait:
            return pid
        for _ in range(600):
            st = a.cmd("guest-exec-status", pid=pid)
            if st.get("exited"):
                return st.get("exitcode"), base64.b64decode(st.get("out-data", "")).decode()
            time.sleep(0.1)
        fail("guest-exec %r did not finish" % script)
    return g.agent_do(go)


def writer_status(pid):
    return g.agent_do(lambda a: a.cmd("guest-exec-status", pid=pid))


def progress():
    rc, out = guest_sh("cat /run/seq.last 2>/dev/null || echo 0")
    check(rc == 0, "reading the writer's progress failed")
    return int(out.strip() or 0)


def counters(point):
    """The counters on A and B in a committed point (the chain below it
    included)."""
    vals = []
    for dev in ("vd1", "vd2"):
        raw = os.path.join(w, "%s-%s.raw" % (point, dev))
        run([QEMU_IMG, "convert", "-O", "raw",
             os.path.join(repo, "g1", point, dev + ".qcow2"), raw])
        with open(raw, "rb") as f:
            head = f.read(16)
        os.unlink(raw)
        check(head[15:16] == b"\n" and head[:15].isdigit(),
              "%s holds no counter in the point: %r" % (dev, head))
        vals.append(int(head[:15]))
    return vals


def backup(*extra, crash=None):
    env = dict(os.environ, QBAK_TEST_POINT_GAP_MS=str(GAP_MS))
    if crash:
        env["QBAK_CRASH_AT"] = crash
        p = subprocess.run([QBAK, "backup", "--qmp", g.qbak_sock, "--repo", repo,
                            "--vm", "g1", "--mode", "pull", "--scratch", scratch,
                            "--disk", "vd1", "--disk", "vd2"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        check(p.returncode == -9, "qbak was not killed at %s: %s" % (crash, p.stderr))
        return None
    return qbak_json("backup", "--qmp", g.qbak_sock, "--repo", repo, "--vm", "g1",
                     "--mode", "pull", "--scratch", scratch, "--disk", "vd1",
                     "--disk", "vd2", *extra, env=env)


try:
    g.agent(timeout=180).close()  # booted: the agent answers
    wpid = guest_sh(WRITER, wait=False)
    # The guest must be writing fast enough for the gap to show: several
    # counters per gap.
    deadline = time.time() + 300
    first = progress()
    t0 = time.time()
    while progress() < first + 10:
        st = writer_status(wpid)
        check(not st.get("exited"), "the guest's writer ended: %s" % st)
        check(time.time() < deadline, "the guest's writer makes no progress")
        time.sleep(0.5)
    rate = 10 / (time.time() - t0)
    log("guest writer: about %.1f counters/s" % rate)
    check(rate * GAP_MS / 1000 >= 2, "the guest writes too slowly for the gap to show")

    # The second backup finds what a run killed after the point left (the
    # pass nodes on the filters, the export) and removes it first.
    for kind, crash in (("full", None), ("incremental", "running"),
                        ("incremental", "transaction")):
        if crash:
            backup(crash=crash)
            check(g.qmp.cmd("query-status")["status"] == "running",
                  "the VM is not running after qbak was killed")
            st = writer_status(wpid)
            check(not st.get("exited"), "the guest's writer failed: %s" % st)
        before = progress()
        res = backup(*(["--full"] if kind == "full" else []))
        if crash:
            check(res["recovered"], "nothing recovered after a kill at %s" % crash)
        after = progress()
        check([d["type"] for d in res["disks"]] == [kind, kind],
              "expected two %s disks: %s" % (kind, res["disks"]))
        a, b = counters(res["point"])
        log("%s: A=%d B=%d (guest went from %d to %d during the backup); recovered %s"
            % (kind, a, b, before, after, res["recovered"]))
        check(after - before >= 2, "the guest wrote too little during the backup")
        check(before <= b <= after + 1, "B's counter is not from the backup's time")
        check(a - b in (0, 1),
              "%s: the disks' points are not one instant: A=%d B=%d" % (kind, a, b))
        st = writer_status(wpid)
        check(not st.get("exited"), "the guest's writer failed: %s" % st)
        nodes = [n for n in g.block_nodes() if n.startswith("qbak-")]
        check(not nodes, "qbak's nodes left in QEMU: %s" % nodes)
        on = {d["qdev"]: d["inserted"]["node-name"] for d in g.qmp.cmd("query-block")
              if d.get("inserted")}
        check(on == {"/machine/peripheral/vd0/virtio-backend": "drive0",
                     "/machine/peripheral/vd1/virtio-backend": "drive1",
                     "/machine/peripheral/vd2/virtio-backend": "drive2"},
              "devices not back on their own nodes: %s" % on)
        check(not os.listdir(scratch), "scratch files left: %s" % os.listdir(scratch))
        check(g.qmp.cmd("query-status")["status"] == "running", "the VM is not running")
    guest_sh("touch /run/seq.stop")
    log("PASS")
finally:
    g.stop()
