"""virtnbdbackup for scripts/bench.py: the baseline "virtnbdbackup
1.9 through libvirt (pull mode)" on the same reference disk as the other
rows: per run a fresh copy of the disk in a transient, paused libvirt domain
(type qemu, q35, 64 MiB, one virtio disk, no network), then
  full:    virtnbdbackup -l full into a fresh output dir,
  inc1%:   guest writes of the layout's "1%" clusters, virtnbdbackup -l inc,
  inc10%:  the same with the "10%" clusters,
each with the page cache dropped first.  A step's time runs from
virtnbdbackup's start to its exit plus an fsync of every file in its output
dir: virtnbdbackup 1.9 never syncs what it writes, and the other rows are
durable.  virtnbdbackup 1.9.15 sleeps 1 s before it first connects to the
NBD export (nbdcli/client.py connect()): that second is in every step, as it
is in every use of the tool.  CPU: virtnbdbackup's (wait4 rusage), the
domain's QEMU's and libvirtd's (/proc/PID/stat; libvirtd_cpu in the JSON)
during the step.  After run 1's incrementals (unless --skip restore),
virtnbdrestore of the chain is compared with the disk, not timed.

The guest writes go through the domain's running QEMU, as HMP qemu-io
commands (bench.guest_rewrite) on a second QMP monitor that the domain's
XML adds (qemu:commandline; libvirt then calls the domain tainted), as
`virsh qemu-monitor-command` is about 6 times as slow per write.  qemu-io
reports failures on QEMU's stdout, i.e. in the domain's log, which is
checked after each batch.

libvirt: if a libvirtd answers on qemu:///system it is used (the domain is
then given a static DAC label so that its QEMU runs as root, as the
benchmark's work dirs are root's).  Otherwise the benchmark starts its own
libvirtd and stops it at the end.  That libvirtd runs in a private mount
namespace (unshare) where /etc/libvirt is the benchmark's own config dir:
qemu.conf runs QEMU as root with no security driver, namespaces or cgroups
and QEMU's output in a plain log file (no virtlogd).  Debian's libvirtd
looks up the user libvirt-qemu when it starts, even when qemu.conf names
another; without libvirt-daemon-system (which would pull in systemd as init)
that user does not exist, so in that namespace only /etc/passwd and
/etc/group are copies with it added.  Nothing outside the namespace is
changed.

bench.py calls virtnbdbackup_step(args, res, b); `b` is the bench module
(its CHILDREN, timed, drop_caches, ...), passed in to avoid a circular
import of the script that runs as __main__.
"""
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from xml.sax.saxutils import escape, quoteattr

URI = "qemu:///system"
ALIAS = "ua-vd0"                      # the disk's qdev id (libvirt user alias)
QEMU_IO_DEV = "/machine/peripheral/%s/virtio-backend" % ALIAS
TARGET = "vda"
LOGDIR = "/var/log/libvirt/qemu"      # QEMU's stdout/stderr, per domain
RUNDIR = "/run/libvirt/qemu"          # NAME.pid
QEMU_USER = "libvirt-qemu"            # Debian's build-time qemu user and group
START_TIMEOUT = 180                   # first start probes QEMU's capabilities (TCG)

QEMU_CONF = """\
# qemu.conf of the libvirtd that scripts/bench_virtnbd.py starts
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "file"
"""

LIBVIRTD_CONF = """\
# libvirtd.conf of the libvirtd that scripts/bench_virtnbd.py starts
log_outputs = "3:stderr"
"""

# Runs as root inside `unshare --mount --propagation private`.
NS_SCRIPT = """\
mount --bind "$1" /etc/libvirt
if [ -n "$3" ]; then
    mount --bind "$3" /etc/passwd
    mount --bind "$4" /etc/group
fi
exec libvirtd -f "$2"
"""


class Unavailable(Exception):
    """virtnbdbackup cannot be measured here; the message says why."""


def run(cmd, input=None, timeout=600, env=None):
    return subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, env=env)


def virsh(*a, input=None, timeout=600):
    return run(["virsh", "-q", "-c", URI] + list(a), input=input, timeout=timeout)


def answers():
    try:
        return virsh("version", "--daemon", timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def daemon_version():
    m = re.search(r"Running against daemon:\s*(\S+)", virsh("version", "--daemon").stdout)
    return m.group(1) if m else "?"


def alive(pid):
    """pid runs (and is no zombie)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError, TypeError):
        return False


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class OwnLibvirtd:
    """A libvirtd the benchmark starts (and stops): see the module doc."""

    def __init__(self, b, work):
        self.b = b
        self.proc = None
        if os.geteuid() != 0:
            raise Unavailable("no libvirtd answers on %s, and starting one needs root" % URI)
        for tool in ("unshare", "mount", "libvirtd"):
            if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
                raise Unavailable("no %s (scripts/bench.sh installs libvirt-daemon)" % tool)
        self.dir = os.path.join(work, "libvirt")
        self.log = os.path.join(self.dir, "libvirtd.log")
        etc = os.path.join(self.dir, "etc")
        os.makedirs(etc)
        with open(os.path.join(etc, "qemu.conf"), "w") as f:
            f.write(QEMU_CONF)
        conf = os.path.join(self.dir, "libvirtd.conf")
        with open(conf, "w") as f:
            f.write(LIBVIRTD_CONF)
        passwd = group = ""
        try:
            gid = grp.getgrnam(QEMU_USER).gr_gid
            need_group = False
        except KeyError:
            gid, need_group = 64055, True
            while self._id_used(gid):
                gid += 1
        try:
            pwd.getpwnam(QEMU_USER)
            need_user = False
        except KeyError:
            need_user = True
        if need_user or need_group:
            passwd, group = os.path.join(self.dir, "passwd"), os.path.join(self.dir, "group")
            for src, dst, line in (
                    ("/etc/passwd", passwd, need_user and "%s:x:%d:%d:qbak benchmark:/nonexistent:"
                     "/usr/sbin/nologin\n" % (QEMU_USER, gid, gid)),
                    ("/etc/group", group, need_group and "%s:x:%d:\n" % (QEMU_USER, gid))):
                shutil.copyfile(src, dst)
                if line:
                    with open(dst, "a") as f:
                        f.write(line)
        if not os.path.isdir("/etc/libvirt"):
            os.makedirs("/etc/libvirt")
        env = dict(os.environ)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        with open(self.log, "w") as lf:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec",
                 NS_SCRIPT, "sh", etc, conf, passwd, group],
                stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, env=env,
                start_new_session=True)   # a terminal's ^C is for the benchmark only
        b.CHILDREN.append(self.proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise Unavailable("the libvirtd started by hand did not come up: %s"
                                  % self.tail())
            time.sleep(0.5)

    @staticmethod
    def _id_used(gid):
        try:
            pwd.getpwuid(gid)
            return True
        except KeyError:
            pass
        try:
            grp.getgrgid(gid)
            return True
        except KeyError:
            return False

    @property
    def pid(self):
        return self.proc.pid

    def tail(self):
        try:
            with open(self.log, errors="replace") as f:
                lines = [l for l in f.read().splitlines() if l.strip()]
            errs = [l for l in lines if "error" in l.lower()] or lines
            return " | ".join(errs[-4:]) or "(%s is empty)" % self.log
        except OSError:
            return "(no log)"

    def stop(self):
        p = self.proc
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.b.CHILDREN:
            self.b.CHILDREN.remove(p)


class Domain:
    """A transient, paused libvirt domain on one qcow2 disk.  Its QEMU also
    has a QMP monitor of the benchmark's (qemu:commandline), for the guest
    writes: HMP qemu-io through libvirt (virsh qemu-monitor-command) costs
    about 6 times as much per write here, minutes per run at 4 GiB.  It
    quacks like bench.BenchVM for bench.guest_rewrite (hmp_io, new_log,
    check_log)."""

    def __init__(self, b, name, disk, rdir, own_daemon):
        self.b, self.name = b, name
        self.log = os.path.join(LOGDIR, name + ".log")
        self.log_pos = 0
        self.pid = None
        self.qmp = None
        self.created = False
        qmp_sock = os.path.join(rdir, "bench.qmp")
        # With a libvirtd of someone else's, QEMU would run as its qemu user
        # (and be confined): this domain's runs as root, unconfined.
        seclabel = "" if own_daemon else (
            "  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>\n")
        xml = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>%s</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>%s</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file=%s/>
      <target dev='%s' bus='virtio'/>
      <alias name='%s'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
%s  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value=%s/>
  </qemu:commandline>
</domain>
""" % (escape(name), escape(b.QEMU), quoteattr(disk), TARGET, ALIAS, seclabel,
       quoteattr("unix:%s,server=on,wait=off" % qmp_sock))
        xmlpath = os.path.join(rdir, "domain.xml")
        with open(xmlpath, "w") as f:
            f.write(xml)
        p = virsh("create", "--paused", xmlpath, timeout=120)
        if p.returncode != 0:
            raise b.BenchError("virsh create %s: %s" % (xmlpath, (p.stderr or p.stdout).strip()))
        self.created = True
        deadline = time.monotonic() + 30
        while self.pid is None:
            self.pid = read_pid(os.path.join(RUNDIR, name + ".pid"))
            if self.pid is None and time.monotonic() > deadline:
                raise b.BenchError("domain %s: no pid file in %s" % (name, RUNDIR))
            time.sleep(0.05)
        self.qmp = b.qbaktest.QMP(qmp_sock)
        self.qmp.sock.settimeout(300)
        self.new_log()

    def new_log(self):
        """What QEMU printed since the last call (HMP qemu-io prints its
        results there, not in the monitor reply)."""
        try:
            with open(self.log, errors="replace") as f:
                f.seek(self.log_pos)
                text = f.read()
                self.log_pos = f.tell()
            return text
        except OSError:
            return ""

    def check_log(self, what):
        out = self.new_log()
        if "failed" in out or "error" in out.lower():
            raise self.b.BenchError("%s: QEMU said: %s" % (what, out[-1000:]))

    def hmp_io(self, cmd):
        return self.qmp.hmp('qemu-io -d %s "%s"' % (QEMU_IO_DEV, cmd))

    def destroy(self):
        if self.qmp:
            self.qmp.close()
            self.qmp = None
        if not self.created:
            return
        virsh("destroy", self.name, timeout=120)
        self.created = False
        deadline = time.monotonic() + 10
        while alive(self.pid):
            if time.monotonic() > deadline:   # its libvirtd is gone: our QEMU
                os.kill(self.pid, signal.SIGKILL)
                break
            time.sleep(0.1)


def fsync_tree(top):
    """fsync of every file and directory under top (virtnbdbackup 1.9 does
    not sync its output; the other rows' steps end durable)."""
    for d, _, files in os.walk(top):
        for name in files + ["."]:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def allocated(top):
    n = 0
    for d, _, files in os.walk(top):
        for name in files:
            n += os.lstat(os.path.join(d, name)).st_blocks * 512
    return n


class Runner:
    def __init__(self, b, exe, work, daemon_pid, own):
        self.b, self.exe, self.work = b, exe, work
        self.daemon_pid, self.own = daemon_pid, own
        # The tools' temporary files (virtnbdrestore leaves its qemu-img and
        # qemu-nbd logs in TMPDIR) go in the work dir.
        self.env = dict(os.environ, TMPDIR=os.path.join(work, "tmp"))
        os.makedirs(self.env["TMPDIR"], exist_ok=True)

    def backup(self, dom, level, out, what):
        b = self.b
        cmd = [self.exe, "-U", URI, "-d", dom.name, "-l", level, "-o", out, "-n",
               "-S", self.work, "-f", os.path.join(self.work, "nbd.sock")]
        before = allocated(out) if os.path.isdir(out) else 0
        b.drop_caches()
        q0 = b.proc_cpu(dom.pid)
        l0 = b.proc_cpu(self.daemon_pid) if self.daemon_pid else None
        wall, ru, rc, sout, serr, rss = b.timed(cmd, env=self.env)
        t1 = time.monotonic()
        if rc == 0:
            fsync_tree(out)
        sync_s = time.monotonic() - t1
        if rc != 0:
            raise b.BenchError("%s: virtnbdbackup exited %d: %s"
                               % (what, rc, "\n".join((sout + serr).splitlines()[-12:])))
        s = b.Sample(wall=wall + sync_s, cpu=ru.ru_utime + ru.ru_stime, fsync_s=sync_s,
                     qemu_cpu=b.proc_cpu(dom.pid) - q0, bytes=allocated(out) - before)
        if l0 is not None:
            s["libvirtd_cpu"] = b.proc_cpu(self.daemon_pid) - l0
        if rss is not None:
            s["rss_kib"] = rss
        data = [int(x) for x in re.findall(r"(\d+) bytes of data extents to backup", serr + sout)]
        if data:
            s["data_bytes"] = sum(data)
        return s, serr + sout

    def one_run(self, r, args, ref, lay, res):
        b = self.b
        rdir = os.path.join(self.work, "run%d" % r)
        os.mkdir(rdir)
        src = os.path.join(rdir, "src.qcow2")
        b.copy_disk(ref, src)
        out = os.path.join(rdir, "backup")
        name = "qbak-bench-%d-%d" % (os.getpid(), r)
        dom = Domain(b, name, src, rdir, self.own)
        try:
            s, _ = self.backup(dom, "full", out, "full")
            res.add("full.virtnbd", s)
            b.note("run %d full   virtnbd %.3f s (fsync %.3f s)" % (r + 1, s["wall"], s["fsync_s"]))
            for phase in ("1%", "10%"):
                clusters = lay["incrementals"][phase]
                t = b.guest_rewrite(dom, clusters)
                b.note("run %d rewrote %d clusters (%s) in %.1f s"
                       % (r + 1, len(clusters), phase, t))
                s, log = self.backup(dom, "inc", out, "inc" + phase)
                want = len(set(c for c, _ in clusters)) * b.CLUSTER
                if "Backup level: [inc]" not in log or s.get("data_bytes", 0) < want:
                    raise b.BenchError("inc%s: virtnbdbackup did not make an incremental of "
                                       "the %d bytes rewritten (its log: %s)"
                                       % (phase, want, log.strip().splitlines()[-3:]))
                res.add("inc%s.virtnbd" % phase, s)
                b.note("run %d inc%-4s virtnbd %.3f s (fsync %.3f s, %s of data)"
                       % (r + 1, phase, s["wall"], s["fsync_s"], b.human(s["data_bytes"])))
            if r == 0 and "restore" not in args.skip:
                self.check(dom, src, out, rdir)
        finally:
            dom.destroy()
        if not args.keep:
            shutil.rmtree(rdir, ignore_errors=True)
            try:
                os.unlink(dom.log)     # kept when the run failed
            except OSError:
                pass

    def check(self, dom, src, out, rdir):
        """Not timed: virtnbdrestore of the chain equals the disk now."""
        b = self.b
        dom.new_log()
        dom.hmp_io("flush")
        dom.check_log("flush")
        rest = os.path.join(rdir, "restore")
        sock = os.path.join(self.work, "restore.sock")
        p = run(["virtnbdrestore", "-U", URI, "-i", out, "-o", rest, "-n", "-f", sock],
                env=self.env, timeout=3600)
        if p.returncode != 0:
            raise b.BenchError("virtnbdrestore exited %d: %s" % (p.returncode, p.stderr[-1000:]))
        # virtnbdrestore exits without waiting for the qemu-nbd --fork it
        # wrote through, which may still be flushing the image.
        deadline = time.monotonic() + 120
        while nbd_servers(sock):
            if time.monotonic() > deadline:
                raise b.BenchError("virtnbdrestore's qemu-nbd (%s) did not exit" % nbd_servers(sock))
            time.sleep(0.1)
        imgs = [f for f in os.listdir(rest) if not f.endswith((".xml", ".log", ".json"))]
        if len(imgs) != 1:
            raise b.BenchError("virtnbdrestore made %s in %s, expected one disk image" % (imgs, rest))
        p = run([b.QEMU_IMG, "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                 src, os.path.join(rest, imgs[0])])
        if p.returncode != 0:
            raise b.BenchError("virtnbdrestore of the chain differs from the disk (%s)"
                               % (p.stdout + p.stderr).strip())
        b.note("virtnbdbackup checked: its full + 2 incrementals restore to the disk as it is")
        shutil.rmtree(rest, ignore_errors=True)


def nbd_servers(sock):
    """PIDs of the qemu-nbd processes serving on sock."""
    pids = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open("/proc/%s/cmdline" % e, "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0]) == b"qemu-nbd" and sock.encode() in argv:
                pids.append(int(e))
    return pids


def tool_version(exe):
    p = run([exe, "-V"], timeout=60)
    m = re.search(r"(\d+\.\d+\.\d+)", p.stdout + p.stderr)
    return m.group(1) if m else "?"


def virtnbdbackup_step(args, res, b):
    exe = shutil.which("virtnbdbackup")
    if not exe or not shutil.which("virsh"):
        res.virtnbdbackup = ("not measured: virtnbdbackup or virsh not installed (scripts/bench.sh "
                             "installs virtnbdbackup, libvirt-daemon, libvirt-clients)")
        return
    size = b.parse_size(args.size)
    ref, lay = b.reference_disk(size, args.seed)
    work = tempfile.mkdtemp(prefix="%d-virtnbd-" % os.getpid(), dir=b.TMP)
    daemon = None
    done = 0
    try:
        version = tool_version(exe)
        b.say("virtnbdbackup %s through libvirt (pull mode), %d run(s) ..." % (version, args.runs))
        if answers():
            how = "the running libvirtd"
            daemon_pid = read_pid("/run/libvirtd.pid")
        else:
            b.note("no libvirtd answers on %s: starting one by hand" % URI)
            daemon = OwnLibvirtd(b, work)
            how = "libvirtd started by hand"
            daemon_pid = daemon.pid
        lv = daemon_version()
        runner = Runner(b, exe, work, daemon_pid, daemon is not None)
        for r in range(args.runs):
            runner.one_run(r, args, ref, lay, res)
            done += 1
        res.virtnbdbackup = ("measured: virtnbdbackup %s (stream format), libvirt %s, %s; "
                             "+ fsync of its output (it never syncs)" % (version, lv, how))
    except Unavailable as e:
        res.virtnbdbackup = "not measured: %s" % e
        b.note("virtnbdbackup: %s" % res.virtnbdbackup)
    except (b.BenchError, OSError, subprocess.SubprocessError) as e:
        res.virtnbdbackup = "FAILED after %d good run(s): %s" % (done, e)
        b.note("virtnbdbackup: %s" % res.virtnbdbackup)
    finally:
        if daemon:
            daemon.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
