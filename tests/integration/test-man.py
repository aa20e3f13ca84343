#!/usr/bin/env python3
"""Every command has a man page that documents exactly its options.

For each command that `qbak --help` lists: man/qbak-COMMAND.1 exists; every
long option of `qbak COMMAND --help` is documented in its OPTIONS section,
and the OPTIONS and SYNOPSIS sections name no option the command lacks;
qbak.1 lists the command; every page renders without a groff warning.
"""
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from qbaktest import QBAK, ROOT, check, fail, log  # noqa: E402

MAN = os.path.join(ROOT, "man")


def commands():
    out = subprocess.run([QBAK, "--help"], capture_output=True, text=True, check=True).stdout
    names = re.findall(r"^  ([a-z][a-z-]*)\s", out.split("commands:", 1)[1], re.M)
    check(len(names) >= 3, "qbak --help lists its commands: %r" % out)
    return names


def help_options(cmd):
    p = subprocess.run([QBAK, cmd, "--help"], capture_output=True, text=True)
    check(p.returncode == 0, "qbak %s --help exits 0: %s" % (cmd, p.stderr))
    opts = set(re.findall(r"^\s+(?:-\w, )?--([a-z][a-z0-9-]*)", p.stdout, re.M))
    opts.discard("help")
    return opts


def section(text, name):
    m = re.search(r"^\.SH %s\n(.*?)(?=^\.SH |\Z)" % re.escape(name), text, re.M | re.S)
    return m.group(1) if m else ""


def man_options(text):
    found = re.findall(r"\\-\\-([a-z](?:[a-z0-9]|\\-|-)*)", text)
    return {f.replace("\\-", "-") for f in found}


def groff_warnings(path):
    p = subprocess.run(["groff", "-man", "-ww", "-z", path], capture_output=True, text=True)
    return p.stderr.strip()


main_page = open(os.path.join(MAN, "qbak.1")).read()
checked = 0
for cmd in commands():
    page = os.path.join(MAN, "qbak-%s.1" % cmd)
    check(os.path.exists(page), "man page for %s: %s" % (cmd, page))
    text = open(page).read()
    m = re.match(r"\.so (\S+)", text)
    if m:
        # A stub page: the command is documented in another command's page.
        text = open(os.path.join(MAN, os.path.basename(m.group(1)))).read()
    wanted = help_options(cmd)
    documented = man_options(section(text, "OPTIONS"))
    missing = wanted - documented
    check(not missing, "%s: --help options missing from the man page: %s" % (cmd, sorted(missing)))
    unknown = (documented | man_options(section(text, "SYNOPSIS"))) - wanted
    # A page shared by several commands (protect/unprotect) documents the
    # union of their options.
    if unknown and not m:
        fail("%s: the man page documents options the command lacks: %s" % (cmd, sorted(unknown)))
    check(re.search(r"^\.B %s$" % re.escape(cmd), section(main_page, "COMMANDS"), re.M),
          "qbak.1 lists %s" % cmd)
    checked += 1

for name in sorted(os.listdir(MAN)):
    w = groff_warnings(os.path.join(MAN, name))
    check(not w, "%s renders without warnings: %s" % (name, w))

for name in sorted(os.listdir(MAN)):
    text = open(os.path.join(MAN, name)).read()
    check("QBAK_CRASH_AT" not in text and "QBAK_FAULT" not in text,
          "%s documents no test-only hook" % name)

log("%d commands checked against their man pages" % checked)
