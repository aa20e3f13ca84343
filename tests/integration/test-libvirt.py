#!/usr/bin/env python3
"""The libvirt recipe (README): a running libvirt domain given an extra QMP
socket through <qemu:commandline> is backed up by qbak through that socket,
full then incremental, by `qbak run` from a configuration, while libvirtd
manages it; each point restores to the disk as the guest saw it, and the
domain is left as it was (state, no jobs, no qbak nodes, libvirt still
talking to it).  libvirtd is started by hand in a private mount namespace,
as scripts/bench_virtnbd.py does for the benchmark."""
import json
import os
import shutil
import subprocess
import sys
import time
import types
from xml.sax.saxutils import escape, quoteattr

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import qbaktest  # noqa: E402
from qbaktest import *  # noqa: E402,F403

require_qemu()
if not (shutil.which("libvirtd") or os.path.exists("/usr/sbin/libvirtd")) \
        or not shutil.which("virsh"):
    log("SKIP: libvirtd or virsh missing (scripts/install-deps.sh installs them)")
    sys.exit(SKIP)
import bench_virtnbd as bv  # noqa: E402

w = workdir("libvirt")
os.chmod(w, 0o755)
NAME = "qbak-test-%d" % os.getpid()
SIZE = 32 << 20
repo = os.path.join(w, "repo")
b = types.SimpleNamespace(CHILDREN=[], QEMU=QEMU, BenchError=RuntimeError, qbaktest=qbaktest)
daemon = None
created = False
qmp = None
try:
    if bv.answers():
        log("a libvirtd answers on %s: using it" % bv.URI)
        own = False
    else:
        try:
            daemon = bv.OwnLibvirtd(b, w)
        except bv.Unavailable as e:
            fail("libvirtd cannot run here: %s" % e)
        own = True
    log("libvirtd %s" % bv.daemon_version())
    disk = make_disk(os.path.join(w, "vda.qcow2"), SIZE)
    run([QEMU_IO, "-f", "qcow2", "-c", "write -P 0x3c 0 4M", "-c", "write -P 0x5d 20M 3M", disk])
    qbak_sock = os.path.join(w, "qbak.qmp")
    test_sock = os.path.join(w, "test.qmp")
    seclabel = "" if own else (
        "  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>\n")
    # The recipe: one <qemu:arg> pair gives qbak its own QMP monitor; the
    # second one here is the test's, for guest writes (HMP qemu-io).
    xml = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>%s</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>%s</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file=%s/>
      <target dev='vda' bus='virtio'/>
      <alias name='ua-vd0'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
%s  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value=%s/>
    <qemu:arg value='-qmp'/>
    <qemu:arg value=%s/>
  </qemu:commandline>
</domain>
""" % (escape(NAME), escape(QEMU), quoteattr(disk), seclabel,
       quoteattr("unix:%s,server=on,wait=off" % qbak_sock),
       quoteattr("unix:%s,server=on,wait=off" % test_sock))
    xmlpath = os.path.join(w, "domain.xml")
    with open(xmlpath, "w") as f:
        f.write(xml)
    p = bv.virsh("create", "--paused", xmlpath, timeout=300)
    check(p.returncode == 0, "virsh create: %s%s" % (p.stdout, p.stderr))
    created = True
    qmp = QMP(test_sock, timeout=120)
    conf = os.path.join(w, "qbak.conf")
    with open(conf, "w") as f:
        f.write("[defaults]\nrepo = %s\nrpo = 1h\n\n[vm %s]\nqmp = %s\n" % (repo, NAME, qbak_sock))

    def guest_write(cmd):
        qmp.hmp('qemu-io -d /machine/peripheral/ua-vd0/virtio-backend "%s"' % cmd)

    def reference(tag):
        guest_write("flush")
        ref = os.path.join(w, "ref-%s.raw" % tag)
        run([QEMU_IMG, "convert", "-U", "-f", "qcow2", "-O", "raw", disk, ref])
        return ref

    points = []
    for i, writes in enumerate([["write -P 0x71 1M 2M"],
                                ["write -P 0x72 8M 1M", "write -z 20M 1M"]]):
        for c in writes:
            guest_write(c)
        ref = reference(i)
        p = run([QBAK, "run", "--config", conf, "--all", "--json"], check_rc=False)
        check(p.returncode == 0, "qbak run through the libvirt domain's socket: %s %s"
              % (p.stdout, p.stderr))
        res = json.loads(p.stdout)["vms"][0]
        check(res["outcome"] == "ok", "run: %s" % res)
        points.append((res["point"], ref))
    listing = qbak_json("list", "--repo", repo, "--vm", NAME)["points"]
    check([x["point"] for x in listing] == [p for p, _ in points], "points: %s" % listing)
    man = json.load(open(os.path.join(repo, NAME, points[1][0], "manifest.json")))
    disks = [d["disk"] for d in man["disks"]]
    check(disks == ["ua-vd0"], "the domain's disk by its device id: %s" % disks)
    check(man["disks"][0]["type"] == "incremental", "second point incremental: %s" % man)
    for point, ref in points:
        out = os.path.join(w, "restore.raw")
        qbak("restore", "--repo", repo, "--vm", NAME, "--disk", "ua-vd0", "--point", point,
             "--output", out, "--force")
        img_compare(out, ref, fmt_a="raw")
    # The domain is as it was, and libvirt still manages it.
    check(qmp.cmd("query-jobs") == [], "jobs left")
    nodes = [n["node-name"] for n in qmp.cmd("query-named-block-nodes")]
    check(not [n for n in nodes if n.startswith("qbak")], "qbak nodes left: %s" % nodes)
    p = bv.virsh("domstate", NAME)
    check(p.stdout.strip() == "paused", "domain state: %r" % p.stdout)
    p = bv.virsh("qemu-monitor-command", NAME, '{"execute":"query-status"}')
    check(p.returncode == 0 and '"running":false' in p.stdout, "libvirt's monitor: %s%s" % (p.stdout, p.stderr))
    p = bv.virsh("resume", NAME)
    check(p.returncode == 0, "virsh resume: %s" % p.stderr)
finally:
    if qmp:
        qmp.close()
    if created:
        bv.virsh("destroy", NAME, timeout=120)
    if daemon:
        daemon.stop()
shutil.rmtree(w, ignore_errors=True)
log("ok: a libvirt domain backed up and restored through its extra QMP socket")
