#!/usr/bin/env python3
"""make install (PREFIX, DESTDIR) puts the binary, every man page, the
example configuration and the systemd units where they belong, and
systemd-analyze verify accepts the units; make deb builds a package with
debhelper that lintian finds no error in, that installs, whose qbak
--version runs, and that removes and purges cleanly."""
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

for tool in ("systemd-analyze", "dpkg-buildpackage", "dh", "lintian"):
    if not shutil.which(tool):
        log("SKIP: %s missing (scripts/install-deps.sh)" % tool)
        sys.exit(SKIP)
if os.geteuid() != 0:
    log("SKIP: dpkg -i needs root")
    sys.exit(SKIP)
w = workdir("install")
version = run([QBAK, "--version"]).stdout.split()[-1]
mans = sorted(f for f in os.listdir(os.path.join(ROOT, "man")) if f.endswith((".1", ".5")))
try:
    # DESTDIR: the paths a package would have.
    dest = os.path.join(w, "dest")
    run(["make", "-s", "-C", ROOT, "install", "DESTDIR=" + dest, "PREFIX=/usr"])
    for f in (["usr/bin/qbak", "etc/qbak/qbak.conf.example",
               "usr/lib/systemd/system/qbak.service", "usr/lib/systemd/system/qbak.timer"]
              + ["usr/share/man/man%s/%s" % (m[-1], m) for m in mans]):
        check(os.path.isfile(os.path.join(dest, f)), "make install lacks %s" % f)
    unit = open(os.path.join(dest, "usr/lib/systemd/system/qbak.service")).read()
    for line in ("ExecStart=/usr/bin/qbak run", "Type=oneshot", "NoNewPrivileges=yes",
                 "PrivateTmp=yes", "ProtectSystem=strict", "ReadWritePaths="):
        check(line in unit, "qbak.service lacks %s" % line)
    check("OnCalendar=minutely" in open(os.path.join(
        dest, "usr/lib/systemd/system/qbak.timer")).read(), "the timer fires every minute")
    # The example configuration is valid.
    run([QBAK, "config", "check", "--config", os.path.join(dest, "etc/qbak/qbak.conf.example")])

    # PREFIX: the units name the installed binary; systemd-analyze verify
    # checks it exists, and that the man pages they cite are installed.
    pfx = os.path.join(w, "pfx")
    run(["make", "-s", "-C", ROOT, "install", "PREFIX=" + pfx, "SYSCONFDIR=" + pfx + "/etc"])
    units = [os.path.join(pfx, "lib/systemd/system", u) for u in ("qbak.service", "qbak.timer")]
    p = run(["systemd-analyze", "verify"] + units, check_rc=False,
            env=dict(os.environ, MANPATH=os.path.join(pfx, "share/man")))
    check(p.returncode == 0 and not p.stderr.strip(),
          "systemd-analyze verify: %d %s%s" % (p.returncode, p.stdout, p.stderr))
    p = run(["systemd-analyze", "security", "--offline=yes", units[0]], check_rc=False)
    log(p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr)
    run(["make", "-s", "-C", ROOT, "uninstall", "PREFIX=" + pfx, "SYSCONFDIR=" + pfx + "/etc"])
    left = [os.path.join(d, f) for d, _, fs in os.walk(pfx) for f in fs]
    check(not left, "make uninstall left %s" % left)

    # make deb, lintian, dpkg -i, --version, dpkg -r, dpkg -P.
    run(["make", "-s", "-C", ROOT, "deb"])
    deb = os.path.join(ROOT, "build", "qbak_%s_amd64.deb" % version)
    check(os.path.isfile(deb), "make deb made no %s" % deb)
    p = run(["lintian", "--fail-on", "error", deb], check_rc=False)
    errors = [l for l in p.stdout.splitlines() if l.startswith("E:")]
    check(p.returncode == 0 and not errors, "lintian: %s%s" % (p.stdout, p.stderr))
    run(["dpkg", "-i", deb])
    try:
        out = run(["/usr/bin/qbak", "--version"]).stdout
        check(out.strip() == "qbak " + version, "installed qbak --version: %r" % out)
        files = run(["dpkg", "-L", "qbak"]).stdout.split()
        for f in ("/usr/bin/qbak", "/lib/systemd/system/qbak.service",
                  "/lib/systemd/system/qbak.timer", "/etc/qbak/qbak.conf.example",
                  "/usr/share/man/man5/qbak.conf.5.gz", "/usr/share/man/man1/qbak-run.1.gz"):
            check(f in files, "the package lacks %s: %s" % (f, files))
    finally:
        run(["dpkg", "-r", "qbak"])
    check(not os.path.exists("/usr/bin/qbak"), "dpkg -r left /usr/bin/qbak")
    check(not os.path.exists("/lib/systemd/system/qbak.service"), "dpkg -r left the unit")
    run(["dpkg", "-P", "qbak"])
    check(not os.path.exists("/etc/qbak"), "dpkg -P left /etc/qbak")
    p = run(["dpkg-query", "-W", "-f=${Status}", "qbak"], check_rc=False)
    check("installed" not in p.stdout or "not-installed" in p.stdout,
          "dpkg still lists qbak: %s" % p.stdout)
finally:
    shutil.rmtree(w, ignore_errors=True)
log("ok: make install, systemd-analyze verify, make deb, lintian, dpkg -i/-r/-P")
