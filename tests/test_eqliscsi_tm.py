"""The eqliscsi transfer actions through the installed links, against real parts: two sshd
hosts in network namespaces with the iscsiadm stand-in (real libiscsi logins), the EqualLogic
simulator in the lab's SAN namespace whose volumes are real tgtd targets (access records are
tgtd ACLs, so a host without a record really cannot log in), a fake oned over XML-RPC.
ONEISCSI_SSH is a wrapper logging every ssh argv (round trips are counted from it).

`World` is shared with test_eqliscsi_lifecycle*.py and bench/."""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import threading

import pytest

from oneiscsi.sim import onexml
from tests import oneutil

pytestmark = pytest.mark.needs_root

DSID = 110
SYSDS = 0
WRITER = "iqn.2024-01.org.oneiscsi.test:frontend"
MiB = 1024 * 1024


class World:
    """Lab hosts + tgtd + EqlSim in the SAN netns + FakeOned + eqliscsi.conf + remotes."""

    def __init__(self, work, hosts=("host1", "host2"), host_key=None, lab=None, conf=None):
        from oneiscsi.sim.eql import EqlSim
        from oneiscsi.sim.hosts import Lab
        from oneiscsi.sim.oned import FakeOned
        from oneiscsi.sim.tgt import Tgtd
        self.work = str(work)
        os.makedirs(self.work, exist_ok=True)
        traversable(self.work)
        self.own_lab = lab is None
        self.lab = lab or Lab(os.path.join(self.work, "lab"), hosts=hosts, san=True)
        self.tgtd = self.sim = self.oned = None
        try:
            if self.own_lab:
                self.lab.start()
            self.tgtd = Tgtd(os.path.join(self.work, "tgt"), portal="%s:3260" % self.lab.san.addr,
                             netns=self.lab.san.netns)
            self.tgtd.start()
            self.sim = EqlSim(os.path.join(self.work, "sim"), tgtd=self.tgtd, listen=self.lab.san.addr,
                              netns=self.lab.san.netns, host_key_file=host_key)
            self.sim.start()
            self.oned = FakeOned(session="oneadmin:onepw")
            self.oned.start()
        except BaseException:
            self.stop()
            raise
        self.known_hosts = os.path.join(self.work, "known_hosts")
        with open(self.known_hosts, "w") as f:
            f.write(self.sim.host_key_line() + "\n")
        auth = os.path.join(self.work, "one_auth")
        with open(auth, "w") as f:
            f.write("oneadmin:onepw\n")
        self.sshlog = os.path.join(self.work, "ssh.log")
        # the lab's ssh_config, plus the same entries under each host's address
        with open(self.lab.ssh_config) as f:
            text = f.read()
        for name, h in self.lab.hosts.items():
            block = text.split("Host %s\n" % name, 1)[1].split("\nHost ", 1)[0]
            text += "\nHost %s\n%s\n" % (h.addr, block.replace("HostName %s" % h.addr, "HostName %s" % h.addr))
        self.ssh_config = os.path.join(self.work, "ssh_config")
        with open(self.ssh_config, "w") as f:
            f.write(text)
        wrapper = os.path.join(self.work, "ssh")
        with open(wrapper, "w") as f:
            f.write("#!/bin/sh\necho \"$*\" >> %s\nexec ssh -F %s \"$@\"\n"
                    % (shlex.quote(self.sshlog), shlex.quote(self.ssh_config)))
        os.chmod(wrapper, 0o755)
        self.staging = os.path.join(self.work, "staging")
        os.makedirs(self.staging, exist_ok=True)
        self.conf_path = os.path.join(self.work, "eqliscsi.conf")
        self.conf(**(conf or {}))
        self.env = {"ONE_XMLRPC": self.oned.url, "ONE_AUTH": auth, "ONEISCSI_SSH": wrapper,
                    "ONEISCSI_LOG": os.path.join(self.work, "oneiscsi.log"),
                    "ONEISCSI_EQL_CONF": self.conf_path, "ONEISCSI_LOCK_DIR": os.path.join(self.work, "locks"),
                    "ONEISCSI_STATE_DIR": os.path.join(self.work, "state")}
        self.datastore()
        self.remotes = None
        self.hosts = dict(self.lab.hosts)     # name -> object with .addr and .run(argv, user, input, check)

    def conf(self, **kv):
        values = {"EQL_HOST": "%s:%d" % (self.lab.san.addr, self.sim.port), "EQL_USER": "grpadmin",
                  "EQL_PASS": "secret", "EQL_KNOWN_HOSTS": self.known_hosts,
                  "EQL_PORTAL": "%s:3260" % self.lab.san.addr, "EQL_INITIATOR": WRITER,
                  "EQL_STAGING_DIR": self.staging, "EQL_CLI_TIMEOUT": "10", "NO_ISCSI": "fe"}
        values.update(kv)
        with open(self.conf_path, "w") as f:
            for k, v in values.items():
                if v is not None:
                    f.write('%s="%s"\n' % (k, v))
        os.chmod(self.conf_path, 0o600)

    def datastore(self, **tpl):
        self.oned.datastores[DSID] = onexml.datastore_xml(ds_id=DSID, name="eql", ds_mad="eqliscsi",
                                                          tm_mad="eqliscsi", template=tpl)

    def stop(self):
        for obj in (self.oned, self.sim, self.tgtd):
            if obj is not None:
                try:
                    obj.stop()
                except Exception:
                    pass
        if self.own_lab and self.lab is not None:
            self.lab.stop()

    # ---- driving actions ------------------------------------------------------------------
    def ssh_calls(self):
        try:
            with open(self.sshlog) as f:
                return [ln for ln in f.read().splitlines() if ln.strip()]
        except FileNotFoundError:
            return []

    def reset_ssh(self):
        open(self.sshlog, "w").close()
        self._log_at = os.path.getsize(self.env["ONEISCSI_LOG"]) if os.path.exists(self.env["ONEISCSI_LOG"]) else 0

    def new_log(self) -> str:
        """What the actions logged since reset_ssh() (6.2-6.10 keep warnings off stderr)."""
        with open(self.env["ONEISCSI_LOG"]) as f:
            f.seek(getattr(self, "_log_at", 0))
            return f.read()

    def tm(self, action, *args, stdin="", ok=True):
        res = oneutil.run(self.remotes / "tm" / "eqliscsi" / action, [str(a) for a in args], stdin=stdin,
                          env=self.env, timeout=300)
        if ok:
            assert res.rc == 0, (action, args, res)
            assert "Traceback" not in res.err
        return res

    def twice(self, action, *args, stdin=""):
        """Every action is idempotent: run it twice, both succeed, same stdout."""
        a = self.tm(action, *args, stdin=stdin)
        b = self.tm(action, *args, stdin=stdin)
        assert a.out == b.out
        return a

    def register(self, iid, name, size=4 * MiB, seed=1):
        """DS cp of a random image -> (volume name, the bytes)."""
        data = rand_bytes(size, seed)
        path = os.path.join(self.staging, "src-%d.raw" % iid)
        with open(path, "wb") as f:
            f.write(data)
        img = onexml.image_xml(iid=iid, name=name, path=path, size_mb=size // MiB, ds_id=DSID, ds_name="eql")
        ds = onexml.datastore_xml(ds_id=DSID, name="eql", ds_mad="eqliscsi", tm_mad="eqliscsi")
        res = oneutil.ds_call(self.remotes, "eqliscsi", "cp", onexml.ds_action_data(img, ds), iid, (6, 8),
                              env=self.env)
        assert res.rc == 0, res
        os.unlink(path)
        return res.out.split()[0], data

    def vm(self, vmid, disks, hosts=("host1",), lcm_state=3, state=3):
        xml = onexml.vm_xml(vmid=vmid, disks=disks, hosts=hosts, lcm_state=lcm_state, state=state,
                            system_ds=SYSDS)
        self.oned.vms[vmid] = xml
        return xml

    # ---- looking at hosts and the SAN ----------------------------------------------------
    def sessions(self, host) -> list:
        """[iqn] of the host's sessions (duplicates kept: a duplicate login shows twice)."""
        res = self.hosts[host].run(["iscsiadm", "-m", "session"], check=False)
        assert res.returncode in (0, 21), res.stderr
        return [line.split()[3] for line in res.stdout.splitlines() if line.startswith("tcp:")]

    def logged_in(self, host) -> list:
        """Volume names logged in on host (sorted, duplicates kept)."""
        iqns = {v.iqn: n for n, v in self.sim.group.volumes.items()}
        return sorted(iqns.get(i, i) for i in self.sessions(host))

    def link(self, host, path) -> str:
        res = self.hosts[host].run(["readlink", path], check=False)
        return res.stdout.strip() if res.returncode == 0 else ""

    def write(self, host, path, data, offset=0):
        self.hosts[host].run(["dd", "of=" + path, "bs=65536", "seek=%d" % (offset // 65536),
                                  "conv=notrunc,fsync", "status=none"], user="oneadmin", input=data)

    def read(self, host, path, size, offset=0) -> bytes:
        return self.hosts[host].run(["dd", "if=" + path, "bs=65536", "skip=%d" % (offset // 65536),
                                         "count=%d" % (size // 65536), "status=none"],
                                        user="oneadmin", input=b"").stdout

    def size(self, host, path) -> int:
        """Bytes of the disk behind a link (a block device on a real host, a file on a stand-in)."""
        out = self.hosts[host].run(["sh", "-c", 'if [ -b "$1" ]; then blockdev --getsize64 "$1"; '
                                    'else stat -L -c %s "$1"; fi', "size", path]).stdout
        return int(out.strip())

    def volume(self, name):
        return self.sim.group.volumes.get(name)

    def host_records(self, name) -> list:
        """Access records of a volume that name a lab host's address."""
        v = self.volume(name)
        addrs = {h.addr: n for n, h in self.hosts.items()}
        return sorted(addrs[a.ipaddress] for a in v.access if a.ipaddress in addrs)


def traversable(path):
    """Lab hosts run as oneadmin and may read files under the work dir: let them pass through
    (pytest makes its temp dirs 0700)."""
    import stat
    path = os.path.abspath(path)
    while path not in ("/", "/tmp"):
        st = os.stat(path)
        if st.st_uid == 0 and not st.st_mode & stat.S_IXOTH:
            os.chmod(path, stat.S_IMODE(st.st_mode) | 0o011)
        path = os.path.dirname(path)


def rand_bytes(size, seed=1) -> bytes:
    out, n = [], 0
    while sum(map(len, out)) < size:
        out.append(hashlib.sha512(b"%d-%d" % (seed, n)).digest() * 16)
        n += 1
    return b"".join(out)[:size]


def eql_disk(did, volume, persistent=True, **extra):
    attrs = {"IMAGE_ID": did + 1, "SOURCE": volume, "TM_MAD": "eqliscsi", "DATASTORE_ID": DSID,
             "TYPE": "BLOCK", "DISK_TYPE": "BLOCK", "TARGET": "vd" + "abcdefghijklmnopqrstuvwxyz"[did % 26] * (1 + did // 26),
             "CLONE": "NO" if persistent else "YES", "SAVE": "YES" if persistent else "NO"}
    if persistent:
        attrs["PERSISTENT"] = "YES"
    attrs.update(extra)
    return onexml.disk_xml(did, attrs)


def disk_path(vmid, did, host):
    return "%s:/var/lib/one/datastores/%d/%d/disk.%d" % (host, SYSDS, vmid, did)


def local(vmid, did):
    return "/var/lib/one/datastores/%d/%d/disk.%d" % (SYSDS, vmid, did)


@pytest.fixture(scope="session")
def eql_host_key(tmp_path_factory):
    return str(tmp_path_factory.mktemp("eqltmkey") / "ssh_host_rsa_key")


@pytest.fixture(scope="module")
def world(tmp_path_factory, eql_host_key):
    w = World(tmp_path_factory.mktemp("eqltm"), host_key=eql_host_key,
              conf={"EQL_MULTIHOST": "disable"})
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def w(world, remotes):
    world.remotes = remotes
    world.reset_ssh()
    world.sim.faults.clear()
    world.datastore()
    return world


_ids = iter(range(1000, 100000))


def new_image(w, persistent=True, size=2 * MiB):
    iid = next(_ids)
    vol, data = w.register(iid, "img %d" % iid, size=size, seed=iid)
    return vol, data


# ---- tests ---------------------------------------------------------------------------------
def test_ln_then_delete_twice_each_one_round_trip(w):
    vol, data = new_image(w)
    vmid = next(_ids)
    w.vm(vmid, [eql_disk(0, vol)], hosts=("host1",), lcm_state=1)
    w.twice("ln", "fe:" + vol, disk_path(vmid, 0, "host1"), vmid, DSID)
    assert len(w.ssh_calls()) == 2                      # one round trip per run
    assert w.logged_in("host1").count(vol) == 1         # the second run did not log in again
    assert w.link("host1", local(vmid, 0)).startswith("/dev/")
    assert w.read("host1", local(vmid, 0), 65536) == data[:65536]
    w.reset_ssh()
    w.twice("delete", disk_path(vmid, 0, "host1"), vmid, DSID)
    assert len(w.ssh_calls()) == 2
    assert vol not in w.logged_in("host1")
    assert w.link("host1", local(vmid, 0)) == ""
    assert w.volume(vol) is not None                    # a persistent volume is never deleted


def test_clone_is_per_vm_and_delete_removes_only_the_clone(w):
    vol, data = new_image(w)
    vmid = next(_ids)
    w.vm(vmid, [eql_disk(0, vol, persistent=False)])
    w.twice("clone", "fe:" + vol, disk_path(vmid, 0, "host2"), vmid, DSID)
    clone = "%s-%d" % (vol, vmid)
    assert w.volume(clone) is not None and w.volume(clone).multihost is False
    assert w.logged_in("host2").count(clone) == 1 and vol not in w.logged_in("host2")
    assert w.read("host2", local(vmid, 0), 65536) == data[:65536]
    w.twice("delete", disk_path(vmid, 0, "host2"), vmid, DSID)
    assert w.volume(clone) is None and w.volume(vol) is not None
    assert clone not in w.logged_in("host2")


def test_not_supported_actions_say_so_in_one_line(w):
    for action in ("context", "mkimage", "mkswap", "monitor", "snap_create_live"):
        res = w.tm(action, "x", ok=False)
        assert res.rc != 0 and "not supported" in res.err and res.err.count("\n") == 1, res


def test_host_access_records_follow_the_disk(w):
    """EQL_HOST_ACCESS=ipaddress with a restrictive EQL_SECURITY_ACCESS: tgtd really refuses a
    host without a record, so the record is what lets the host in."""
    w.datastore(EQL_HOST_ACCESS="ipaddress", EQL_SECURITY_ACCESS="initiator " + WRITER)
    w.conf(EQL_MULTIHOST="disable", EQL_SECURITY_ACCESS="initiator " + WRITER)
    try:
        vol, data = new_image(w)
        assert w.host_records(vol) == []
        vmid = next(_ids)
        h1 = w.lab.hosts["host1"].addr      # lab names resolve through ssh_config only: use the address
        w.vm(vmid, [eql_disk(0, vol)], hosts=(h1,))
        w.twice("ln", "fe:" + vol, disk_path(vmid, 0, h1), vmid, DSID)
        assert w.host_records(vol) == ["host1"]
        assert w.read("host1", local(vmid, 0), 65536) == data[:65536]
        # host2 has no record: tgtd refuses its login
        vm2 = next(_ids)
        w.vm(vm2, [eql_disk(0, vol)], hosts=("host2",))
        w.datastore(EQL_SECURITY_ACCESS="initiator " + WRITER)
        res = w.tm("ln", "fe:" + vol, disk_path(vm2, 0, "host2"), vm2, DSID, ok=False)
        assert res.rc != 0 and "host2" in res.err and "access records" in res.err, res
        w.datastore(EQL_HOST_ACCESS="ipaddress", EQL_SECURITY_ACCESS="initiator " + WRITER)
        w.twice("mvds", disk_path(vmid, 0, h1), vol, vmid, DSID)
        assert w.host_records(vol) == [] and vol not in w.logged_in("host1")
        assert any(a.initiator == WRITER for a in w.volume(vol).access)   # static record kept
        for v in (vmid, vm2):   # terminated: gone from oned's pool (reconcile must not see host1 by address)
            w.oned.vms.pop(v)
    finally:
        w.conf(EQL_MULTIHOST="disable")


def test_fifteen_concurrent_ln_on_one_host_no_duplicate_session(w):
    vols = [new_image(w)[0] for _ in range(5)]
    vmids = [next(_ids) for _ in range(15)]
    for i, vmid in enumerate(vmids):
        w.vm(vmid, [eql_disk(0, vols[i % 5])])
    results = {}

    def go(i, vmid):
        results[vmid] = w.tm("ln", "fe:x", disk_path(vmid, 0, "host1"), vmid, DSID, ok=False)
    threads = [threading.Thread(target=go, args=(i, v)) for i, v in enumerate(vmids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.rc == 0 for r in results.values()), [r for r in results.values() if r.rc]
    assert len(w.ssh_calls()) == 15                       # exactly one round trip each
    assert w.logged_in("host1").count(vols[0]) == 1
    assert sorted(set(w.logged_in("host1")) & set(vols)) == sorted(vols)
    assert len([v for v in w.logged_in("host1") if v in vols]) == 5   # no duplicate session
    for vmid in vmids:
        assert w.link("host1", local(vmid, 0)).startswith("/dev/")
    for i, vmid in enumerate(vmids[:5]):
        w.tm("delete", disk_path(vmid, 0, "host1"), vmid, DSID)


def _migrate_args(vmid, src="host1", dst="host2"):
    return [src, dst, "/var/lib/one/datastores/%d/%d" % (SYSDS, vmid), vmid, SYSDS, "shared"]


def test_vm_with_eight_mixed_disks_migrates_every_eqliscsi_disk_in_one_round_trip(w):
    pers = [new_image(w) for _ in range(3)]
    nonp = [new_image(w) for _ in range(2)]
    vmid = next(_ids)
    disks = [eql_disk(0, pers[0][0]),
             onexml.disk_xml(1, {"SOURCE": "iqn.2024-01.org.example:lun/1", "TM_MAD": "iscsi", "TYPE": "ISCSI",
                                 "PERSISTENT": "YES", "ISCSI_HOST": "10.9.9.9", "DATASTORE_ID": 101}),
             eql_disk(2, nonp[0][0], persistent=False),
             onexml.disk_xml(3, {"TYPE": "fs", "SIZE": 100, "FORMAT": "raw"}),       # volatile: no TM_MAD
             onexml.disk_xml(4, {"TYPE": "CDROM", "SOURCE": "/var/lib/one/datastores/1/abc", "TM_MAD": "shared",
                                 "READONLY": "YES", "CLONE": "NO", "DATASTORE_ID": 1}),
             eql_disk(5, pers[1][0]), eql_disk(6, nonp[1][0], persistent=False), eql_disk(7, pers[2][0])]
    xml = w.vm(vmid, disks, hosts=("host1",), lcm_state=1)
    ours = {0: pers[0], 2: nonp[0], 5: pers[1], 6: nonp[1], 7: pers[2]}
    vols = {}
    for did, (vol, _) in ours.items():
        action = "ln" if did in (0, 5, 7) else "clone"
        w.tm(action, "fe:" + vol, disk_path(vmid, did, "host1"), vmid, DSID)
        vols[did] = vol if action == "ln" else "%s-%d" % (vol, vmid)
    w.reset_ssh()
    b64 = onexml.b64(xml)
    w.twice("premigrate", *_migrate_args(vmid), stdin=b64)
    calls = w.ssh_calls()
    assert len(calls) == 2 and all("host2" in c for c in calls), calls
    for did, vol in vols.items():
        assert w.logged_in("host2").count(vol) == 1 and vol in w.logged_in("host1")
        assert w.volume(vol).multihost is True
        assert w.read("host2", local(vmid, did), 65536) == ours[did][1][:65536]
    assert w.link("host2", local(vmid, 3)) == "" and w.link("host2", local(vmid, 1)) == ""
    w.reset_ssh()
    w.twice("postmigrate", *_migrate_args(vmid), stdin=b64)
    assert len(w.ssh_calls()) == 2 and all("host1" in c for c in w.ssh_calls())
    for did, vol in vols.items():
        assert vol not in w.logged_in("host1") and w.logged_in("host2").count(vol) == 1
        assert w.volume(vol).multihost is False            # back to EQL_MULTIHOST=disable
    for did in vols:
        w.tm("delete", disk_path(vmid, did, "host2"), vmid, DSID)
    assert not set(vols.values()) & set(w.logged_in("host2"))


def test_failed_live_migration_leaves_a_stray_that_ln_and_reconcile_clean(w, pyz):
    vol, _ = new_image(w)
    vmid = next(_ids)
    xml = w.vm(vmid, [eql_disk(0, vol)], hosts=("host1",))
    w.tm("ln", "fe:" + vol, disk_path(vmid, 0, "host1"), vmid, DSID)
    w.tm("premigrate", *_migrate_args(vmid), stdin=onexml.b64(xml))
    # the hypervisor migration failed; oned never calls our failmigrate: host2 keeps the session
    assert vol in w.logged_in("host2")
    env = dict(os.environ, **w.env)
    rec = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "reconcile"], capture_output=True, text=True, env=env)
    assert rec.returncode == 1 and re.search(r"^STRAY session host=host2 volume=%s " % re.escape(vol),
                                             rec.stdout, re.M), rec
    rec = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "reconcile", "--fix"], capture_output=True,
                         text=True, env=env)
    assert rec.returncode == 0 and "FIXED STRAY session host=host2" in rec.stdout, rec
    assert vol not in w.logged_in("host2") and vol in w.logged_in("host1"), rec
    rec = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "reconcile"], capture_output=True, text=True, env=env)
    assert rec.returncode == 0 and "0 finding(s)" in rec.stdout, rec
    # again, and this time the VM is stopped and resumed on host1: ln logs out the stray on host2
    w.tm("premigrate", *_migrate_args(vmid), stdin=onexml.b64(xml))
    w.tm("delete", disk_path(vmid, 0, "host1"), vmid, DSID)
    w.reset_ssh()
    w.tm("ln", "fe:" + vol, disk_path(vmid, 0, "host1"), vmid, DSID)
    assert vol not in w.logged_in("host2") and w.logged_in("host1").count(vol) == 1
    assert sorted(c.split()[-3] for c in w.ssh_calls()) == ["host1", "host2"]   # one round trip per host
    w.tm("delete", disk_path(vmid, 0, "host1"), vmid, DSID)


@pytest.mark.parametrize("fault", ["drop_after", "drop_mid"])
def test_san_connection_drop_during_actions(w, fault):
    """The group drops the connection in the middle of each SAN-changing action: the action
    either completes (retry-safe commands) or fails leaving the SAN and the host as before;
    a re-run then succeeds."""
    vol, _ = new_image(w)
    vmid = next(_ids)
    w.vm(vmid, [eql_disk(0, vol, persistent=False)], hosts=("host1",))
    clone = "%s-%d" % (vol, vmid)
    steps = [("clone", ("fe:" + vol, disk_path(vmid, 0, "host1"), vmid, DSID), r"clone"),
             ("snap_create", (disk_path(vmid, 0, "host1"), 0, vmid, DSID), r"create-now"),
             ("resize", (disk_path(vmid, 0, "host1"), 8, vmid, DSID), r" size "),
             ("snap_delete", (disk_path(vmid, 0, "host1"), 0, vmid, DSID), r"snapshot delete"),
             ("cpds", (disk_path(vmid, 0, "host1"), "saved.%d" % vmid, -1, vmid, DSID), r"clone"),
             ("delete", (disk_path(vmid, 0, "host1"), vmid, DSID), r"volume delete|offline")]
    setup = 6          # the session's terminal set-up lines come first
    for n, (action, args, pattern) in enumerate(steps):
        if fault == "drop_after":
            w.sim.faults.drop_after(setup + n % 3)     # the 1st, 2nd or 3rd command of the action
        else:
            w.sim.faults.drop_mid_output(pattern)
        res = w.tm(action, *args, ok=False)
        assert "Traceback" not in res.err
        if res.rc != 0:
            assert res.err.count("\n") == 1, res
        w.sim.faults.clear()
        w.tm(action, *args)                       # completes now
    assert w.volume(clone) is None and w.volume(vol) is not None
    assert w.volume("saved.%d" % vmid) is not None
    assert clone not in w.logged_in("host1")


def test_save_as_of_a_snapshot_and_of_the_live_volume(w):
    vol, data = new_image(w)
    vmid = next(_ids)
    w.vm(vmid, [eql_disk(0, vol)], hosts=("host1",))
    w.tm("ln", "fe:" + vol, disk_path(vmid, 0, "host1"), vmid, DSID)
    w.twice("snap_create", disk_path(vmid, 0, "host1"), 3, vmid, DSID)
    assert "one-snap-3" in w.volume(vol).snapshots
    w.twice("cpds", disk_path(vmid, 0, "host1"), "snap-copy.%d" % vmid, 3, vmid, DSID)
    w.twice("cpds", disk_path(vmid, 0, "host1"), "live-copy.%d" % vmid, -1, vmid, DSID)
    for name in ("snap-copy.%d" % vmid, "live-copy.%d" % vmid):
        assert w.volume(name) is not None and w.volume(name).size_mb == w.volume(vol).size_mb
    res = w.tm("cpds", disk_path(vmid, 0, "host1"), vol, -1, vmid, DSID, ok=False)
    assert res.rc != 0                                     # never onto the disk's own volume
    w.twice("snap_delete", disk_path(vmid, 0, "host1"), 3, vmid, DSID)
    assert "one-snap-3" not in w.volume(vol).snapshots
    w.tm("delete", disk_path(vmid, 0, "host1"), vmid, DSID)


def test_premigrate_4x_template_in_argv_through_the_legacy_wrapper(w, remotes_factory, tmp_path):
    """4.x: no migrate_other; install --legacy-migrate-wrappers puts oneiscsi over
    tm/shared/premigrate, which runs our step for the eqliscsi disks, then the original."""
    import pathlib
    r = pathlib.Path(tmp_path / "r414")
    r.mkdir()
    (r / "VERSION").write_text("4.14.0\n")
    for action in ("premigrate", "postmigrate"):
        p = r / "tm" / "shared" / action
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\necho ORIGINAL-%s \"$#\" >> %s\nexit 0\n" % (action, tmp_path / "orig.log"))
        p.chmod(0o755)
    subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "install", "--remotes", str(r), "--python", oneutil.PYTHON,
                    "--legacy-migrate-wrappers", "shared"], check=True, capture_output=True)
    vol, data = new_image(w)
    vmid = next(_ids)
    xml = onexml.vm_xml(vmid=vmid, disks=[eql_disk(0, vol)], hosts=("host1",), version=(4, 14))
    w.oned.vms[vmid] = xml
    w.tm("ln", "fe:" + vol, disk_path(vmid, 0, "host1"), vmid, DSID)
    args = ["host1", "host2", "/var/lib/one/datastores/0/%d" % vmid, str(vmid), "0", onexml.b64(xml)]
    for action in ("premigrate", "postmigrate"):
        res = oneutil.run(r / "tm" / "shared" / action, args, env=w.env)
        assert res.rc == 0, res
    assert (tmp_path / "orig.log").read_text().split() == ["ORIGINAL-premigrate", "6", "ORIGINAL-postmigrate", "6"]
    assert vol not in w.logged_in("host1") and w.logged_in("host2").count(vol) == 1
    assert w.read("host2", local(vmid, 0), 65536) == data[:65536]
    w.tm("delete", disk_path(vmid, 0, "host2"), vmid, DSID)
    w.oned.vms.pop(vmid)
