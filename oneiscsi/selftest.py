"""`oneiscsi.pyz --selftest [--json] [--driver D] [--usage U] [--portal HOST[:PORT]] [HOST...]`
and `oneiscsi.pyz --selftest --fix udev|sudoers [--apply]`.

Without HOST it checks the machine it runs on (a hypervisor); with HOSTs it runs
the same checks on each over ssh (one round trip per host, hosts in parallel).

libvirt side (iscsi): QEMU's iSCSI support, libvirtd, a secret for every
ISCSI_USAGE, every ISCSI_HOST portal reachable. EqualLogic side (eqliscsi):
iscsiadm, iscsid, the initiator name, node.startup = manual, the udev rules,
CHAP, the group portal reachable; and on the frontend, per eqliscsi datastore,
the group's SSH host key known, the CLI login, the pool. What to check comes from
--usage/--portal/--driver and, when oned is reachable (on the frontend), from its
datastores and images, else from the remotes tree installed on this machine. A
check that cannot run says SKIP and why; exit status 0 when no check FAILs or WARNs.

--fix prints the files a host needs (the udev rules and their helper, the sudoers
line; all inside the executable) with where they go; --apply installs them (root).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from oneiscsi import host as hostrun, validate
from oneiscsi.errors import Failure
from oneiscsi.host import checks

ISCSI_DRIVERS = ("iscsi", "iscsi_libvirt")
# What oneadmin runs with sudo on an eqliscsi host (the one place this text lives).
SUDOERS = ("oneadmin ALL=(root) NOPASSWD: /usr/sbin/iscsiadm, /usr/sbin/blockdev, "
           "/usr/sbin/multipath, /usr/sbin/multipathd, /usr/sbin/dmsetup, "
           "/usr/bin/tee /sys/block/sd[a-z]/device/delete, /usr/bin/tee /sys/block/sd[a-z][a-z]/device/delete\n")
# --fix: what goes where, and the command that makes the system see it
FIXES = {
    "udev": ([("udev/61-oneiscsi-eql.rules", "/etc/udev/rules.d/61-oneiscsi-eql.rules", 0o644),
              ("udev/oneiscsi-eql-volume", "/etc/udev/scripts/oneiscsi-eql-volume", 0o755)],
             ["udevadm", "control", "--reload"]),
    "sudoers": ([(None, "/etc/sudoers.d/oneiscsi", 0o440)], None),
}
# Installed remotes trees that say which drivers this machine serves (frontend, host copy).
REMOTES_TREES = ("/var/lib/one/remotes", "/var/tmp/one")


class Plan:
    """What to check: filled from the command line and from oned."""

    def __init__(self):
        self.usages, self.portals, self.rows = set(), set(), []
        self.drivers = set()        # "iscsi" and/or "eqliscsi"
        self.eql_datastores = []    # datastore objects (or None: eqliscsi.conf alone)
        self.eql_chap = False
        self.mp_ifaces = []         # EQL_IFACE of multipath datastores (2+ ifaces)


def from_oned(plan: Plan) -> bool:
    """Add what oned's datastore and image pools say to `plan`; False if oned is not there."""
    on_frontend = bool(os.environ.get("ONE_XMLRPC")) or os.path.exists("/etc/one/oned.conf")
    if not on_frontend:
        return False
    from oneiscsi.one.rpc import One
    try:
        one = One()
        dss = one.pool("datastore")
        imgs = one.pool("image")
    except Failure as e:
        plan.rows.append(("frontend", "oned", "WARN", "datastores not read: %s" % e,
                          "set ONE_XMLRPC/ONE_AUTH or pass --driver/--usage/--portal"))
        return False
    plan.eql_datastores = [d for d in dss if d["DS_MAD"] == "eqliscsi"]
    if plan.eql_datastores:
        plan.drivers.add("eqliscsi")
    ours = {d.id: d for d in dss if d["DS_MAD"] in ISCSI_DRIVERS}
    if ours:
        plan.drivers.add("iscsi")
    sources = [(d.tpl, "datastore %s" % d.id) for d in ours.values()]
    sources += [(lambda k, i=i: i.tpl(k) or ours[i["DATASTORE_ID"]].tpl(k), "image %s" % i.id)
                for i in imgs if i["DATASTORE_ID"] in ours]
    for get, where in sources:
        try:
            if get("ISCSI_USAGE"):
                plan.usages.add(validate.usage(get("ISCSI_USAGE")))
            if get("ISCSI_HOST"):
                plan.portals.update(validate.portals(get("ISCSI_HOST")))
        except Failure as e:
            plan.rows.append(("frontend", where, "FAIL", str(e), "fix the attribute in the %s template" % where))
    return True


def eql_frontend(plan: Plan, remotes: str) -> None:
    """Per eqliscsi datastore: the group's host key, the CLI login, the pool; its portal for the hosts."""
    from oneiscsi import config
    from oneiscsi.san import client
    for ds in plan.eql_datastores:
        where = "datastore %s" % ds.id if ds is not None else "eqliscsi.conf"
        try:
            cfg = config.load(remotes, ds)
            group = cfg.group()
            plan.portals.add(cfg.portal())
            plan.eql_chap = plan.eql_chap or bool(cfg.chap_user)
            from oneiscsi.host.iscsi import ifaces_of
            ifaces = ifaces_of(cfg["EQL_IFACE"])
            if len(ifaces) > 1:
                plan.mp_ifaces += [i for i in ifaces if i not in plan.mp_ifaces]
        except Failure as e:
            plan.rows.append(("frontend", where, "FAIL", str(e), "fix the EQL_* settings of %s" % where))
            continue
        name = "group %s" % group.address
        try:
            with client.session(group) as s:
                total, free = s.pool_space(cfg.pool)
        except client.HostKeyError as e:
            plan.rows.append(("frontend", name + " host key", "FAIL", str(e), "see the message"))
            continue
        except client.AuthError as e:
            plan.rows.append(("frontend", name + " host key", "PASS", "known", ""))
            plan.rows.append(("frontend", name + " login", "FAIL", str(e), "check EQL_USER and its password/key"))
            continue
        except client.CliError as e:
            plan.rows += [("frontend", name + " host key", "PASS", "known", ""),
                          ("frontend", name + " login", "PASS", "CLI session works", ""),
                          ("frontend", "pool %s" % cfg.pool, "FAIL", str(e), "set EQL_POOL to an existing pool")]
            continue
        except Failure as e:
            plan.rows.append(("frontend", name, "FAIL", str(e), "check EQL_HOST and the network to the group"))
            continue
        plan.rows += [("frontend", name + " host key", "PASS", "known", ""),
                      ("frontend", name + " login", "PASS", "CLI session works", ""),
                      ("frontend", "pool %s" % cfg.pool, "PASS", "%d MB total, %d MB free" % (total, free), "")]


def _data(rel: str) -> str:
    """A file shipped inside the executable (build.py puts udev/ under oneiscsi/_data/)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (os.path.join(here, "_data"), os.path.dirname(here)):  # the pyz, a checkout
        path = os.path.join(base, rel)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    raise Failure("%s is not in this build of oneiscsi" % rel)


def fix(what: str, apply: bool, root: str = "/") -> int:
    """Print (or with apply: install under root) the files of FIXES[what]."""
    files, reload_cmd = FIXES[what]
    if root != "/":
        reload_cmd = None  # another system's tree: its udev reads the rules when it starts
    for src, dest, mode in files:
        dest = os.path.join(root, dest.lstrip("/"))
        text = SUDOERS if src is None else _data(src)
        if not apply:
            print("# %s (mode %o)\n%s" % (dest, mode, text.rstrip("\n")))
            continue
        if what == "sudoers":
            _check_sudoers(text)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = dest + ".oneiscsi-tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
        print("installed %s" % dest)
    if not apply:
        print("# dry run: `oneiscsi.pyz --selftest --fix %s --apply` (as root) installs %s" % (
            what, "this" if len(files) == 1 else "these"))
    elif reload_cmd:
        import subprocess
        try:
            res = subprocess.run(reload_cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print("WARN: %s failed (%s): run it once udev runs" % (" ".join(reload_cmd), res.stderr.strip()))
        except OSError:
            print("WARN: %s not found: reload udev rules by hand" % reload_cmd[0])
    return 0


def _check_sudoers(text: str) -> None:
    import shutil
    import subprocess
    import tempfile
    visudo = shutil.which("visudo") or ("/usr/sbin/visudo" if os.path.exists("/usr/sbin/visudo") else None)
    if not visudo:
        raise Failure("visudo not found: install sudo before installing the sudoers line")
    with tempfile.NamedTemporaryFile("w", suffix=".sudoers") as f:
        f.write(text)
        f.flush()
        res = subprocess.run([visudo, "-cqf", f.name], capture_output=True, text=True)
    if res.returncode != 0:
        raise Failure("visudo rejects the sudoers line: %s" % (res.stderr.strip() or res.stdout.strip()))


def served_by_trees() -> set:
    """The drivers an installed remotes tree on this machine has (oned-less hosts)."""
    found = set()
    for tree in REMOTES_TREES:
        for drv in ISCSI_DRIVERS + ("eqliscsi",):
            if os.path.isdir(os.path.join(tree, "tm", drv)):
                found.add("eqliscsi" if drv == "eqliscsi" else "iscsi")
    return found


def explain(rows: list) -> list:
    """Rows that only follow from another failure become SKIP rows that name it."""
    out = []
    down = {r[0] for r in rows if r[1] == "libvirtd" and r[2] != "PASS"}
    for r in rows:
        if r[0] in down and r[1].startswith("secret ") and r[2] != "PASS":
            r = (r[0], r[1], "SKIP", "not checked: libvirtd cannot be reached (see the libvirtd row)", "")
        if r[1] == "udev rules" and r[2] != "PASS":
            r = r[:4] + ("oneiscsi.pyz --selftest --fix udev (prints them; --apply installs them, as root)",)
        out.append(r)
    return out


def check(host: str, plan: Plan) -> list:
    libvirt = "iscsi" in plan.drivers
    # qemu-img's libiscsi: QEMU's own disks (iscsi) and every backup read / in-place restore (both)
    script = checks.script(usages=plan.usages if libvirt else (), portals=plan.portals, libvirt=libvirt,
                           qemu=True, eql="eqliscsi" in plan.drivers, eql_chap=plan.eql_chap,
                           mp_ifaces=plan.mp_ifaces)
    res = hostrun.run(host, script, timeout=120, what="selftest")
    name = host or os.uname().nodename
    if hostrun.unreachable(res):
        return [(name, "ssh", "FAIL", "cannot reach %s over ssh: %s" % (host, hostrun.last_line(res.stderr)),
                 "check oneadmin's ssh access to the host")]
    rows = [(name,) + r for r in checks.parse(res.stdout)]
    return rows or [(name, "checks", "FAIL", "the check script printed nothing: %s"
                     % hostrun.last_line(res.stderr), "run it with ONEISCSI_DEBUG=1")]


def table(rows) -> str:
    head = ("HOST", "CHECK", "STATUS", "DETAIL (-> fix)", "")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(3)]
    out = []
    for n, r in enumerate([head] + rows):
        line = "  ".join(str(r[i]).ljust(widths[i]) for i in range(3)) + "  " + r[3]
        if n and r[4] and r[2] != "PASS":
            line += "  -> fix: " + r[4]
        out.append(line.rstrip())
    return "\n".join(out)


def main(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="oneiscsi.pyz --selftest",
        description="Check this host (or HOSTs over ssh) for what the drivers it serves need: a PASS/FAIL/WARN/SKIP "
                    "table with the fix for each failure; exit 0 when nothing FAILs or WARNs.")
    ap.add_argument("--json", action="store_true", help="rows as JSON instead of a table")
    ap.add_argument("--driver", action="append", choices=("iscsi", "eqliscsi"), default=[],
                    help="check this side (repeatable; default: the drivers oned's datastores use, else those "
                         "installed in %s)" % " or ".join(REMOTES_TREES))
    ap.add_argument("--remotes", default="", help="remotes tree with etc/datastore/eqliscsi/eqliscsi.conf")
    ap.add_argument("--usage", action="append", default=[], help="an ISCSI_USAGE whose libvirt secret must exist")
    ap.add_argument("--portal", action="append", default=[], help="an ISCSI_HOST portal that must be reachable")
    ap.add_argument("--iface", default="", help="EQL_IFACE of a multipath datastore (eql0,eql1): check multipath "
                    "on the hosts without oned")
    ap.add_argument("--fix", choices=sorted(FIXES),
                    help="print the udev rules and helper, or the sudoers line, a host needs (dry run)")
    ap.add_argument("--apply", action="store_true", help="with --fix: install them (root)")
    ap.add_argument("--root", default="/", help="with --fix --apply: install below this folder (an image, a package)")
    ap.add_argument("hosts", nargs="*", help="hosts to check over ssh (default: this machine)")
    a = ap.parse_args(argv)
    if a.apply and not a.fix:
        ap.error("--apply goes with --fix udev or --fix sudoers")
    if a.fix:
        return fix(a.fix, a.apply, a.root)
    plan = Plan()
    plan.usages = {validate.usage(u, "--usage") for u in a.usage}
    for p in a.portal:
        plan.portals.update(validate.portals(p, "--portal"))
    from oneiscsi.host.iscsi import ifaces_of
    ifaces = ifaces_of(a.iface)
    plan.mp_ifaces = ifaces if len(ifaces) > 1 else []
    skipped = []
    oned = from_oned(plan)
    if a.driver:
        plan.drivers = set(a.driver)
    elif oned:
        if not plan.drivers:
            skipped.append(("drivers", "oned has no iscsi, iscsi_libvirt or eqliscsi datastore: nothing to check",
                            "pass --driver iscsi or --driver eqliscsi to check anyway"))
    else:
        plan.drivers = served_by_trees()
        if not plan.drivers:
            plan.drivers = {"iscsi", "eqliscsi"}
            skipped.append(("drivers", "neither oned nor a remotes tree in %s says which drivers this host serves: "
                            "checked both" % " or ".join(REMOTES_TREES), "pass --driver to check one side"))
    if "iscsi" in plan.drivers and not oned:
        if not plan.usages:
            skipped.append(("secrets", "no ISCSI_USAGE to check (oned not reachable here)",
                            "run on the frontend, or pass --usage"))
        if not plan.portals:
            skipped.append(("portals", "no ISCSI_HOST to check (oned not reachable here)",
                            "run on the frontend, or pass --portal"))
    if "eqliscsi" in plan.drivers:
        from oneiscsi import config
        from oneiscsi.one.version import remotes_dir
        remotes = a.remotes or remotes_dir("")
        if not plan.eql_datastores and os.path.exists(config.conf_path(remotes)):
            plan.eql_datastores = [None]  # the frontend's eqliscsi.conf alone
        if not plan.eql_datastores:
            skipped.append(("group", "no eqliscsi datastore in oned and no %s: the group login is not checked"
                            % config.conf_path(remotes), "run on the frontend, or pass --remotes"))
        eql_frontend(plan, remotes)
    rows = [("frontend" if oned else (os.uname().nodename if not a.hosts else "local"), n, "SKIP", d, f)
            for n, d, f in skipped] + plan.rows
    if plan.drivers:
        hosts = [validate.hostname(h, "host") for h in a.hosts] or [""]
        with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
            for result in pool.map(lambda h: check(h, plan), hosts):
                rows.extend(explain(result))
    if a.json:
        print(json.dumps([dict(zip(("host", "check", "status", "detail", "fix"), r)) for r in rows], indent=1))
    else:
        print(table(rows))
    sys.stdout.flush()
    return 0 if all(r[2] in ("PASS", "SKIP") for r in rows) else 1
