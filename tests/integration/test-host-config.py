#!/usr/bin/env python3
"""The host's configuration file: every mistake is reported as
FILE:LINE: [group] KEY and nothing runs (run and status exit 2 and touch
no repository); `config check` validates without touching any VM;
[defaults] is inherited key by key; durations and sizes parse."""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import *  # noqa: E402,F403

w = workdir("host-config")
repo = os.path.join(w, "repo")
GOOD = """# a host
[defaults]
repo = %s
rpo = 15m
keep-last = 8
keep-daily = 7
quiesce = auto

[vm web1]
qmp = /run/qbak/web1.qmp
qga = /run/qbak/web1.qga
rpo = 5m

[vm db1]
qmp = /run/qbak/db1.qmp
disks = vd0 vd1
speed = 200M
timeout = 90s
stall-timeout = 1m
wait = 0
keep-last = 3
rpo = 1d
full = yes
""" % repo


def write(name, text):
    path = os.path.join(w, name)
    with open(path, "w") as f:
        f.write(text)
    return path


try:
    good = write("good.conf", GOOD)
    p = qbak("config", "check", "--config", good)
    check("2 VMs" in p.stdout, "config check: %s" % p.stdout)
    c = qbak_json("config", "check", "--config", good)
    vms = {v["vm"]: v for v in c["vms"]}
    check(vms["web1"]["rpo_s"] == 300 and vms["web1"]["repo"] == repo
          and vms["web1"]["keep"] == {"keep-last": 8, "keep-daily": 7}
          and vms["web1"]["qga"] == "/run/qbak/web1.qga" and vms["web1"]["disks"] is None,
          "web1 inherits [defaults]: %s" % vms["web1"])
    check(vms["db1"]["rpo_s"] == 86400 and vms["db1"]["speed"] == 200 << 20
          and vms["db1"]["disks"] == ["vd0", "vd1"]
          and vms["db1"]["keep"] == {"keep-last": 3, "keep-daily": 7}
          and vms["db1"]["quiesce"] == "auto" and vms["db1"]["full"] is True
          and vms["web1"]["full"] is False,
          "db1 overrides: %s" % vms["db1"])

    # (what is changed, the file:line: [group] key the error must name)
    bad = [
        (GOOD.replace("rpo = 5m", "rpo = 5x"), ":12: [vm web1] rpo: '5x' is not a duration"),
        (GOOD.replace("rpo = 5m", "rpo = 5 m"), ":12: [vm web1] rpo:"),
        (GOOD.replace("speed = 200M", "sped = 200M"), ":17: [vm db1] sped: unknown key"),
        (GOOD.replace("speed = 200M", "speed = fast"), ":17: [vm db1] speed:"),
        (GOOD.replace("qmp = /run/qbak/db1.qmp\n", ""), ":14: [vm db1] qmp: not set"),
        (GOOD + "[vm web1]\nqmp = /x\n", ":24: [vm web1]: duplicate section (first on line 9)"),
        (GOOD.replace("keep-daily = 7", "keep-daily = 7\nkeep-daily = 8"),
         ":7: [defaults] keep-daily: set twice (first on line 6)"),
        (GOOD.replace("keep-last = 8", "keep-last = -1"), ":5: [defaults] keep-last:"),
        (GOOD.replace("quiesce = auto", "quiesce = maybe"), ":7: [defaults] quiesce:"),
        (GOOD.replace("qga = /run/qbak/web1.qga", "qga = web1.qga"),
         ":11: [vm web1] qga: 'web1.qga' is not an absolute path"),
        (GOOD.replace("[vm db1]", "[machine db1]"), ":14: [machine db1] unknown section"),
        (GOOD.replace("[vm db1]", "[vm ../db1]"), ":14: [vm ../db1]"),
        (GOOD.replace("# a host", "a host"), ":1: not KEY = VALUE"),
        (GOOD.replace("[defaults]\nrepo = %s" % repo, "[defaults]"), ":8: [vm web1] repo: not set"),
        (GOOD.replace("timeout = 90s", "timeout = 2d"), ":18: [vm db1] timeout: must be"),
        (GOOD.replace("full = yes", "full = maybe"), ":23: [vm db1] full: 'maybe'"),
    ]
    # The whole-VM and pull-mode keys, per VM and from [defaults].
    modes = write("modes.conf", GOOD.replace("quiesce = auto", "quiesce = auto\nscratch-max = 2G")
                  .replace("rpo = 5m", "rpo = 5m\nmode = pull\nscratch = /var/tmp\nnice = 5")
                  .replace("disks = vd0 vd1", "disks = vd0 vd1\nmemory = try"))
    vms = {v["vm"]: v for v in qbak_json("config", "check", "--config", modes)["vms"]}
    check(vms["web1"]["mode"] == "pull" and vms["web1"]["scratch"] == "/var/tmp"
          and vms["web1"]["scratch_max"] == 2 << 30 and vms["web1"]["memory"] is None
          and vms["db1"]["memory"] == "try" and vms["db1"]["mode"] is None
          and vms["db1"]["scratch_max"] == 2 << 30
          and vms["web1"]["nice"] == 5 and vms["db1"]["nice"] is None,
          "memory, mode, scratch, scratch-max and nice: %s" % vms)
    # auto (backup's default) may be set explicitly, also with memory.
    auto = write("auto.conf", GOOD.replace("rpo = 5m", "rpo = 5m\nmode = auto\nmemory = on"))
    vms = {v["vm"]: v for v in qbak_json("config", "check", "--config", auto)["vms"]}
    check(vms["web1"]["mode"] == "auto" and vms["web1"]["memory"] == "on",
          "mode = auto with memory = on: %s" % vms["web1"])
    bad += [
        (GOOD.replace("rpo = 5m", "rpo = 5m\nmode = pull\nmemory = on"),
         ":14: [vm web1] memory: needs mode = push or auto"),
        (GOOD.replace("rpo = 5m", "rpo = 5m\nmode = sideways"), ":13: [vm web1] mode:"),
        (GOOD.replace("rpo = 5m", "rpo = 5m\nmemory = maybe"), ":13: [vm web1] memory:"),
        (GOOD.replace("rpo = 5m", "rpo = 5m\nscratch = tmp"),
         ":13: [vm web1] scratch: 'tmp' is not an absolute path"),
        (GOOD.replace("rpo = 5m", "rpo = 5m\nscratch-max = 10K"), ":13: [vm web1] scratch-max:"),
        (GOOD.replace("rpo = 5m", "rpo = 5m\nnice = 20"), ":13: [vm web1] nice:"),
        (GOOD.replace("rpo = 5m", "rpo = 5m\nnice = low"), ":13: [vm web1] nice:"),
    ]
    for i, (text, want) in enumerate(bad):
        path = write("bad%d.conf" % i, text)
        for cmd in (["config", "check"], ["run"], ["status"]):
            p = qbak(*(cmd + ["--config", path]), check_rc=False)
            check(p.returncode == 2, "%s on bad%d: exit %d, expected 2: %s"
                  % (cmd[0], i, p.returncode, p.stderr))
            check((path + want) in p.stderr, "%s on bad%d: %r lacks %r"
                  % (cmd[0], i, p.stderr, path + want))
        check(not os.path.exists(repo), "bad%d: a repository was touched" % i)
    p = qbak("status", "--config", os.path.join(w, "absent.conf"), check_rc=False)
    check(p.returncode == 2 and "absent.conf" in p.stderr, "unreadable config: %s" % p.stderr)
    p = qbak("run", "--config", good, "--vm", "nosuch", check_rc=False)
    check(p.returncode != 0 and "nosuch" in p.stderr, "unknown --vm: %s" % p.stderr)
    check(not os.path.exists(repo), "a repository was touched")
finally:
    shutil.rmtree(w, ignore_errors=True)
log("ok: configuration errors name file:line and key, and nothing runs")
