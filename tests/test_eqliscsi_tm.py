"""The eqliscsi transfer actions through the installed links, against real parts: two sshd
hosts in network namespaces with the iscsiadm stand-in (real libiscsi logins), the EqualLogic
simulator in the lab's SAN namespace whose volumes are real tgtd targets (access records are
tgtd ACLs, so a host without a record really cannot log in), a fake oned over XML-RPC whose VM
DISKs are made by oned's rules (oneiscsi.sim.onemodel, never by hand), and a system datastore
that is `shared` (one VM folder for both hosts, as NFS) or per host (`ssh`).
ONEISCSI_SSH is a wrapper logging every ssh argv (round trips are counted from it).

`World` is shared with test_eqliscsi_lifecycle*.py and bench/."""
from __future__ import annotations

import contextlib
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

    def __init__(self, work, hosts=("host1", "host2"), host_key=None, lab=None, conf=None, shared=False):
        from oneiscsi.sim.eql import EqlSim
        from oneiscsi.sim.hosts import Lab
        from oneiscsi.sim.oned import FakeOned
        from oneiscsi.sim.tgt import Tgtd
        self.work = str(work)
        os.makedirs(self.work, exist_ok=True)
        traversable(self.work)
        self.own_lab = lab is None
        self.lab = lab or Lab(os.path.join(self.work, "lab"), hosts=hosts, san=True, shared_datastores=shared)
        self.shared = bool(getattr(self.lab, "shared_datastores", False))
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
            self.oned.hosts = list(self.lab.hosts)
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
        from oneiscsi.sim.onemodel import Cloud
        tm_system = "shared" if self.shared else "ssh"
        self.cloud = Cloud(self.oned, system_tm=tm_system, system_ds=SYSDS)
        self.oned.datastores[SYSDS] = onexml.datastore_xml(
            ds_id=SYSDS, name="system", ds_mad="-", tm_mad=tm_system, ds_type=1,
            template={"SHARED": "YES" if self.shared else "NO"})
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

    def register(self, iid, name, size=4 * MiB, seed=1, persistent=True, ptype="", itype=0):
        """DS cp of a random image, then the image in oned -> onemodel.Img (.volume, .data)."""
        from oneiscsi.sim.onemodel import Img
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
        img = Img(iid, name, res.out.split()[0], persistent=persistent, ptype=ptype, itype=itype, ds_id=DSID,
                  size_mb=size // MiB)
        img.data = data
        return self.cloud.image(img)

    def image_on_group(self, iid, volume, size="4MB", persistent=True, ptype=""):
        """An image whose volume is made directly on the simulated group (benchmarks: no cp)."""
        from oneiscsi.sim.onemodel import Img
        if volume not in self.sim.group.volumes:
            self.sim.group.create_volume(volume, size, unrestricted=True,
                                         description="OpenNebula image %d: bench" % iid)
        return self.cloud.image(Img(iid, volume, volume, persistent=persistent, ptype=ptype, ds_id=DSID))

    def vm(self, vmid, disks, hosts=("host1",), lcm_state=3, state=3, others=()):
        """disks: (disk_id, Img[, what the VM owner wrote]) -> the VM XML oned keeps."""
        return self.cloud.vm(vmid, disks, hosts=hosts, lcm_state=lcm_state, state=state, others=others)

    def action(self, vmid, did, leaving=False) -> str:
        """The TM action oned runs for this disk (clone/ln, or mvds/delete when leaving)."""
        from oneiscsi.sim.onemodel import tm_action
        return tm_action(self.cloud.disk(vmid, did), leaving)

    def deploy(self, vmid, host, dids=None):
        """The prolog oned runs: clone or ln for each disk, by the disk's CLONE."""
        for did in sorted(dids if dids is not None else self.cloud.disks[vmid]):
            img = self.cloud.images[int(self.cloud.disk(vmid, did)["IMAGE_ID"])]
            self.tm(self.action(vmid, did), "fe:" + img.volume, disk_path(vmid, did, host), vmid, DSID)

    def terminate(self, vmid, host):
        """The epilog: mvds or delete per disk, then the VM is gone from oned."""
        self.cloud.state(vmid, 11)
        for did in sorted(self.cloud.disks[vmid]):
            act = self.action(vmid, did, leaving=True)
            img = self.cloud.images[int(self.cloud.disk(vmid, did)["IMAGE_ID"])]
            if act == "mvds":
                self.tm("mvds", disk_path(vmid, did, host), img.volume, vmid, DSID)
            else:
                self.tm("delete", disk_path(vmid, did, host), vmid, DSID)
        self.cloud.done(vmid)

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

    def clone_of(self, img, vmid, did=None) -> str:
        """The name of the per-VM clone the driver made for this image (and disk)."""
        from oneiscsi.drivers.eqliscsi import common
        return common.clone_name(img.volume, vmid, did)

    def host_records(self, name) -> list:
        """Access records of a volume that name a lab host's address."""
        v = self.volume(name)
        addrs = {h.addr: n for n, h in self.hosts.items()}
        return sorted(addrs[a.ipaddress] for a in v.access if a.ipaddress in addrs)


@contextlib.contextmanager
def world_on_lab(work, host_key, hosts=("host1",), **lab_kw):
    """A World on a Lab of its own (lab_kw: virsh_standin=True...), both stopped at the end."""
    from oneiscsi.sim.hosts import Lab
    lab = Lab(os.path.join(str(work), "lab"), hosts=hosts, san=True, **lab_kw)
    lab.start()
    try:
        w = World(work, lab=lab, host_key=host_key, conf={"EQL_MULTIHOST": "disable"})
        try:
            yield w
        finally:
            w.stop()
    finally:
        lab.stop()


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


def new_image(w, persistent=True, size=2 * MiB, ptype="", itype=0):
    iid = next(_ids)
    return w.register(iid, "img %d" % iid, size=size, seed=iid, persistent=persistent, ptype=ptype, itype=itype)


def _migrate_args(vmid, src="host1", dst="host2", system_tm="ssh"):
    return [src, dst, "/var/lib/one/datastores/%d/%d" % (SYSDS, vmid), vmid, SYSDS, system_tm]


# ---- tests ---------------------------------------------------------------------------------
def test_ln_then_delete_twice_each_one_round_trip(w):
    img = new_image(w)
    vmid = next(_ids)
    w.vm(vmid, [(0, img)], hosts=("host1",), lcm_state=1)
    assert w.action(vmid, 0) == "ln"                      # oned's rule for a persistent image
    w.twice("ln", "fe:" + img.volume, disk_path(vmid, 0, "host1"), vmid, DSID)
    assert len(w.ssh_calls()) == 2                      # one round trip per run
    assert w.logged_in("host1").count(img.volume) == 1  # the second run did not log in again
    assert w.link("host1", local(vmid, 0)).startswith("/dev/")
    assert w.read("host1", local(vmid, 0), 65536) == img.data[:65536]
    w.reset_ssh()
    w.twice("delete", disk_path(vmid, 0, "host1"), vmid, DSID)
    assert len(w.ssh_calls()) == 2
    assert img.volume not in w.logged_in("host1")
    assert w.link("host1", local(vmid, 0)) == ""
    assert w.volume(img.volume) is not None             # a persistent volume is never deleted
    w.cloud.done(vmid)


def test_clone_is_per_vm_and_delete_removes_only_the_clone(w):
    img = new_image(w, persistent=False)
    vmid = next(_ids)
    w.vm(vmid, [(0, img)])
    assert w.action(vmid, 0) == "clone"
    w.twice("clone", "fe:" + img.volume, disk_path(vmid, 0, "host2"), vmid, DSID)
    clone = w.clone_of(img, vmid)
    assert w.volume(clone) is not None and w.volume(clone).multihost is False
    assert w.logged_in("host2").count(clone) == 1 and img.volume not in w.logged_in("host2")
    assert w.read("host2", local(vmid, 0), 65536) == img.data[:65536]
    w.twice("delete", disk_path(vmid, 0, "host2"), vmid, DSID)
    assert w.volume(clone) is None and w.volume(img.volume) is not None
    assert clone not in w.logged_in("host2")
    w.cloud.done(vmid)


def test_a_user_written_persistent_never_gives_the_golden_volume(w):
    """Image::disk_attribute leaves a VM owner's PERSISTENT=YES next to a non-persistent image
    (CLONE=YES): the VM still gets its own clone and the image's volume is never logged in."""
    img = new_image(w, persistent=False)
    vmid = next(_ids)
    w.vm(vmid, [(0, img, {"PERSISTENT": "YES"})], hosts=("host1",), lcm_state=1)
    disk = w.cloud.disk(vmid, 0)
    assert disk["PERSISTENT"] == "YES" and disk["CLONE"] == "YES"
    res = w.tm("ln", "fe:" + img.volume, disk_path(vmid, 0, "host1"), vmid, DSID, ok=False)
    assert res.rc != 0 and "CLONE=YES" in res.err and res.err.count("\n") == 1, res
    assert img.volume not in w.logged_in("host1")
    w.deploy(vmid, "host1")
    assert w.logged_in("host1").count(w.clone_of(img, vmid)) == 1 and img.volume not in w.logged_in("host1")
    w.write("host1", local(vmid, 0), b"\xff" * 65536)
    w.terminate(vmid, "host1")
    assert w.volume(w.clone_of(img, vmid)) is None
    assert open(w.volume(img.volume).backing, "rb").read(65536) == img.data[:65536]   # golden untouched


def test_the_same_image_twice_in_one_vm_gets_two_clones(w):
    img = new_image(w, persistent=False)
    vmid = next(_ids)
    w.vm(vmid, [(0, img), (1, img)], hosts=("host1",), lcm_state=1)
    w.deploy(vmid, "host1")
    a, b = w.clone_of(img, vmid), w.clone_of(img, vmid, 1)
    assert w.volume(a) is not None and w.volume(b) is not None
    assert w.logged_in("host1").count(a) == 1 and w.logged_in("host1").count(b) == 1
    w.write("host1", local(vmid, 0), b"\x01" * 65536)
    assert w.read("host1", local(vmid, 1), 65536) == img.data[:65536]      # two disks, two volumes
    w.terminate(vmid, "host1")
    assert w.volume(a) is None and w.volume(b) is None


def test_delete_never_deletes_a_foreign_volume_named_like_the_clone(w):
    img = new_image(w, persistent=False)
    vmid = next(_ids)
    foreign = w.clone_of(img, vmid)
    w.sim.group.create_volume(foreign, "4MB", description="somebody else's data")
    w.vm(vmid, [(0, img)], hosts=("host1",), lcm_state=1)
    w.deploy(vmid, "host1")
    ours = w.clone_of(img, vmid, 0)
    assert w.logged_in("host1").count(ours) == 1 and foreign not in w.logged_in("host1")
    w.terminate(vmid, "host1")
    assert w.volume(ours) is None and w.volume(foreign) is not None
    w.sim.group.set_online(foreign, False)
    w.sim.group.delete_volume(foreign)


def test_immutable_and_cdrom_volumes_are_shared_and_never_cut_under_another_vm(w):
    """Three VMs on one IMMUTABLE image (two on host1, one on host2) and a CDROM: each deploy
    links the image's own volume read-only; the session on a host goes only with its last VM;
    multihost follows the hosts in use; nothing is deleted."""
    gold = new_image(w, persistent=True, ptype="IMMUTABLE")
    iso = new_image(w, persistent=False, itype=1)
    a, b, c = next(_ids), next(_ids), next(_ids)
    for vmid, host in ((a, "host1"), (b, "host1"), (c, "host2")):
        w.vm(vmid, [(0, gold), (1, iso)], hosts=(host,), lcm_state=1)
        for did in (0, 1):
            d = w.cloud.disk(vmid, did)
            assert (d["CLONE"], d["READONLY"], d["SAVE"]) == ("NO", "YES", "NO") and "PERSISTENT" not in d
        w.deploy(vmid, host)
        w.cloud.state(vmid, 3)
    for vol in (gold.volume, iso.volume):
        assert w.logged_in("host1").count(vol) == 1 and w.logged_in("host2").count(vol) == 1
        assert w.volume(vol).multihost is True            # two hosts use it (EQL_MULTIHOST=disable)
    assert w.action(a, 0, leaving=True) == "delete"
    w.terminate(a, "host1")
    assert w.logged_in("host1").count(gold.volume) == 1 and w.link("host1", local(a, 0)) == ""
    assert w.read("host1", local(b, 0), 65536) == gold.data[:65536]     # b's disk still works
    w.terminate(c, "host2")
    assert gold.volume not in w.logged_in("host2") and w.volume(gold.volume).multihost is False
    w.terminate(b, "host1")
    assert gold.volume not in w.logged_in("host1") and iso.volume not in w.logged_in("host1")
    assert w.volume(gold.volume) is not None and w.volume(iso.volume) is not None


def test_a_disk_still_open_on_the_host_is_not_logged_out(w):
    """The host-side guard (HA: two frontends may decide from different moments): whatever
    oned says, a detach never logs out a disk a process on the host holds open."""
    img = new_image(w)
    vmid = next(_ids)
    w.vm(vmid, [(0, img)], hosts=("host1",), lcm_state=1)
    w.deploy(vmid, "host1")
    dev = w.hosts["host1"].run(["readlink", "-f", local(vmid, 0)]).stdout.strip()
    h1 = w.lab.hosts["host1"]         # a process of oneadmin (as qemu is) holding the disk open
    holder = subprocess.Popen(h1._enter("oneadmin") + ["sh", "-c", 'exec 3<"$1"; exec sleep 30', "h", dev])
    try:
        assert oneutil.wait_for(lambda: w.hosts["host1"].run(
            ["sh", "-c", 'find /proc/[0-9]*/fd -maxdepth 1 -lname "$1" 2>/dev/null | grep -q .', "f", dev],
            check=False).returncode == 0, 10)
        res = w.tm("delete", disk_path(vmid, 0, "host1"), vmid, DSID, ok=False)
        assert res.rc != 0 and "still in use" in res.err and "sleep" in res.err and res.err.count("\n") == 1, res
        assert w.logged_in("host1").count(img.volume) == 1
    finally:
        holder.kill()
        holder.wait()
    w.tm("delete", disk_path(vmid, 0, "host1"), vmid, DSID)
    assert img.volume not in w.logged_in("host1")
    w.cloud.done(vmid)


def test_not_supported_actions_say_so_in_one_line(w):
    for action in ("context", "mkimage", "mkswap", "monitor"):
        res = w.tm(action, "x", ok=False)
        assert res.rc != 0 and "not supported" in res.err and res.err.count("\n") == 1, res


def test_host_access_records_follow_the_disk(w):
    """EQL_HOST_ACCESS=ipaddress with a restrictive EQL_SECURITY_ACCESS: tgtd really refuses a
    host without a record, so the record is what lets the host in."""
    w.datastore(EQL_HOST_ACCESS="ipaddress", EQL_SECURITY_ACCESS="initiator " + WRITER)
    w.conf(EQL_MULTIHOST="disable", EQL_SECURITY_ACCESS="initiator " + WRITER)
    try:
        img = new_image(w)
        vol = img.volume
        assert w.host_records(vol) == []
        vmid = next(_ids)
        h1 = w.lab.hosts["host1"].addr      # lab names resolve through ssh_config only: use the address
        w.vm(vmid, [(0, img)], hosts=(h1,))
        w.twice("ln", "fe:" + vol, disk_path(vmid, 0, h1), vmid, DSID)
        assert w.host_records(vol) == ["host1"]
        assert w.read("host1", local(vmid, 0), 65536) == img.data[:65536]
        w.cloud.state(vmid, 11)
        w.twice("mvds", disk_path(vmid, 0, h1), vol, vmid, DSID)
        assert w.host_records(vol) == [] and vol not in w.logged_in("host1")
        assert any(a.initiator == WRITER for a in w.volume(vol).access)   # static record kept
        w.cloud.done(vmid)
        # host2 has no record and EQL_HOST_ACCESS is off: tgtd refuses its login
        w.datastore(EQL_SECURITY_ACCESS="initiator " + WRITER)
        vm2 = next(_ids)
        w.vm(vm2, [(0, img)], hosts=("host2",))
        res = w.tm("ln", "fe:" + vol, disk_path(vm2, 0, "host2"), vm2, DSID, ok=False)
        assert res.rc != 0 and "host2" in res.err and "access records" in res.err, res
        w.cloud.done(vm2)
    finally:
        w.conf(EQL_MULTIHOST="disable")


def test_fifteen_concurrent_ln_on_one_host_no_duplicate_session(w):
    """Five SHAREABLE persistent images, three VMs each, all deployed at once on host1."""
    imgs = [new_image(w, ptype="SHAREABLE") for _ in range(5)]
    vmids = [next(_ids) for _ in range(15)]
    for i, vmid in enumerate(vmids):
        w.vm(vmid, [(0, imgs[i % 5])])
        assert w.cloud.disk(vmid, 0)["SHAREABLE"] == "YES"
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
    vols = [i.volume for i in imgs]
    assert sorted(v for v in w.logged_in("host1") if v in vols) == sorted(vols)   # no duplicate session
    for vmid in vmids:
        assert w.link("host1", local(vmid, 0)).startswith("/dev/")
    for vmid in vmids:
        w.terminate(vmid, "host1")
    assert not [v for v in w.logged_in("host1") if v in vols]


def test_vm_with_eight_mixed_disks_migrates_every_eqliscsi_disk_in_one_round_trip(w):
    pers = [new_image(w) for _ in range(3)]
    nonp = [new_image(w, persistent=False) for _ in range(2)]
    vmid = next(_ids)
    others = [{"DISK_ID": 1, "SOURCE": "iqn.2024-01.org.example:lun/1", "TM_MAD": "iscsi", "TYPE": "ISCSI",
               "PERSISTENT": "YES", "CLONE": "NO", "ISCSI_HOST": "10.9.9.9", "DATASTORE_ID": 101},
              {"DISK_ID": 3, "TYPE": "fs", "SIZE": 100, "FORMAT": "raw"},           # volatile: no TM_MAD
              {"DISK_ID": 4, "TYPE": "CDROM", "SOURCE": "/var/lib/one/datastores/1/abc", "TM_MAD": "shared",
               "READONLY": "YES", "CLONE": "NO", "DATASTORE_ID": 1}]
    ours = {0: pers[0], 2: nonp[0], 5: pers[1], 6: nonp[1], 7: pers[2]}
    xml = w.vm(vmid, sorted(ours.items()), hosts=("host1",), lcm_state=1, others=others)
    w.deploy(vmid, "host1")
    vols = {did: img.volume if img.persistent else w.clone_of(img, vmid) for did, img in ours.items()}
    xml = w.cloud.state(vmid, 4, "host1", "host2")          # MIGRATE
    w.reset_ssh()
    b64 = onexml.b64(xml)
    w.twice("premigrate", *_migrate_args(vmid), stdin=b64)
    calls = w.ssh_calls()
    assert len(calls) == 2 and all("host2" in c for c in calls), calls
    for did, vol in vols.items():
        assert w.logged_in("host2").count(vol) == 1 and vol in w.logged_in("host1")
        assert w.volume(vol).multihost is True
        assert w.read("host2", local(vmid, did), 65536) == ours[did].data[:65536]
    assert w.link("host2", local(vmid, 3)) == "" and w.link("host2", local(vmid, 1)) == ""
    w.reset_ssh()
    w.twice("postmigrate", *_migrate_args(vmid), stdin=b64)
    assert len(w.ssh_calls()) == 2 and all("host1" in c for c in w.ssh_calls())
    for did, vol in vols.items():
        assert vol not in w.logged_in("host1") and w.logged_in("host2").count(vol) == 1
        assert w.volume(vol).multihost is False            # back to EQL_MULTIHOST=disable
    w.cloud.state(vmid, 3, "host1", "host2")
    w.terminate(vmid, "host2")
    assert not set(vols.values()) & set(w.logged_in("host2"))


def _env(w, name):
    """The environment of another frontend: its own lock and state folders (nothing shared
    with the others but oned, the group and the hosts)."""
    d = os.path.join(w.work, "frontend-" + name)
    return dict(w.env, ONEISCSI_LOCK_DIR=os.path.join(d, "locks"), ONEISCSI_STATE_DIR=os.path.join(d, "state"))


def test_failed_live_migration_stray_is_found_from_any_frontend(w, pyz):
    """Deploy from frontend A; a live migration whose hypervisor step fails leaves host2 logged
    in (oned never calls our failmigrate); frontend B's reconcile (empty state folder) finds it
    from oned's history and the hosts, and frontend C's next premigrate cleans it."""
    img = new_image(w)
    vol, vmid = img.volume, next(_ids)
    w.vm(vmid, [(0, img)], hosts=("host1",), lcm_state=1)
    w.env, env_a = _env(w, "a"), w.env
    try:
        w.deploy(vmid, "host1")
        xml = w.cloud.state(vmid, 4, "host1", "host2")
        w.tm("premigrate", *_migrate_args(vmid), stdin=onexml.b64(xml))
    finally:
        w.env = env_a
    w.cloud.failed_live_migration(vmid)                        # history: host1, host2, host1
    assert vol in w.logged_in("host2")
    env_b = dict(os.environ, **_env(w, "b"))
    rec = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "reconcile"], capture_output=True, text=True, env=env_b)
    assert rec.returncode == 1 and re.search(r"^STRAY session host=host2 volume=%s " % re.escape(vol),
                                             rec.stdout, re.M), rec
    assert not re.search(r"host=host1 volume=%s " % re.escape(vol), rec.stdout), rec
    rec = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "reconcile", "--fix"], capture_output=True,
                         text=True, env=dict(os.environ, **_env(w, "c")))
    assert rec.returncode == 0 and "FIXED STRAY session host=host2" in rec.stdout, rec
    assert vol not in w.logged_in("host2") and vol in w.logged_in("host1"), rec
    # again; then the VM is stopped and resumed on host1 (from frontend D): the resume finds the
    # stray on host2 (the group counts a connection no VM in oned explains) and logs it out
    xml = w.cloud.state(vmid, 4, "host1", "host2", "host1", "host2")
    w.tm("premigrate", *_migrate_args(vmid), stdin=onexml.b64(xml))
    w.cloud.failed_live_migration(vmid)
    hist = ("host1", "host2", "host1", "host2", "host1")
    assert w.logged_in("host2").count(vol) == 1
    w.env, env_a = _env(w, "d"), w.env
    try:
        w.cloud.state(vmid, 10, *hist, state=3)                         # EPILOG_STOP
        w.tm("mv", disk_path(vmid, 0, "host1"), disk_path(vmid, 0, "fe"), vmid, DSID)
        w.cloud.state(vmid, 9, *(hist + ("host1",)))                    # PROLOG_RESUME
        w.reset_ssh()
        w.tm("mv", disk_path(vmid, 0, "fe"), disk_path(vmid, 0, "host1"), vmid, DSID)
    finally:
        w.env = env_a
    assert vol not in w.logged_in("host2") and w.logged_in("host1").count(vol) == 1
    assert sorted(c.split()[-3] for c in w.ssh_calls()) == ["host1", "host2"]   # one round trip per host
    w.cloud.state(vmid, 3)
    w.terminate(vmid, "host1")
    assert vol not in w.logged_in("host1")


@pytest.mark.parametrize("fault", ["drop_after", "drop_mid"])
def test_san_connection_drop_during_actions(w, fault):
    """The group drops the connection in the middle of each SAN-changing action: the action
    either completes (retry-safe commands) or fails leaving the SAN and the host as before;
    a re-run then succeeds."""
    img = new_image(w, persistent=False)
    vmid = next(_ids)
    w.vm(vmid, [(0, img)], hosts=("host1",))
    clone = w.clone_of(img, vmid)
    steps = [("clone", ("fe:" + img.volume, disk_path(vmid, 0, "host1"), vmid, DSID), r"clone"),
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
    assert w.volume(clone) is None and w.volume(img.volume) is not None
    assert w.volume("saved.%d" % vmid) is not None
    assert clone not in w.logged_in("host1")
    w.cloud.done(vmid)


def test_save_as_of_a_snapshot_and_of_the_live_volume(w):
    img = new_image(w)
    vol = img.volume
    vmid = next(_ids)
    w.vm(vmid, [(0, img)], hosts=("host1",))
    w.deploy(vmid, "host1")
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
    w.terminate(vmid, "host1")


def test_save_as_source_is_taken_only_when_oneds_image_confirms_it(w):
    """4.x SAVE_AS_SOURCE is a DISK attribute a VM owner can write: mvds clones to it only when
    the SAVE_AS image in oned has that SOURCE."""
    from oneiscsi.sim.onemodel import Img
    img = new_image(w)
    vmid = next(_ids)
    target = w.cloud.image(Img(next(_ids), "saved", "saved-image.%d" % vmid, ds_id=DSID))
    w.vm(vmid, [(0, img, {"SAVE_AS": target.iid, "SAVE_AS_SOURCE": "victim.%d" % vmid})], hosts=("host1",))
    w.deploy(vmid, "host1")
    w.cloud.state(vmid, 11)
    res = w.tm("mvds", disk_path(vmid, 0, "host1"), img.volume, vmid, DSID, ok=False)
    assert res.rc != 0 and "SAVE_AS_SOURCE" in res.err and res.err.count("\n") == 1, res
    assert w.volume("victim.%d" % vmid) is None and w.logged_in("host1").count(img.volume) == 1
    w.vm(vmid, [(0, img, {"SAVE_AS": target.iid, "SAVE_AS_SOURCE": target.volume})], hosts=("host1",),
         lcm_state=11)
    w.twice("mvds", disk_path(vmid, 0, "host1"), img.volume, vmid, DSID)
    assert w.volume(target.volume) is not None and img.volume not in w.logged_in("host1")
    w.cloud.done(vmid)


def test_premigrate_4x_template_in_argv_through_the_legacy_wrapper(w, remotes_factory, tmp_path):
    """4.x: no migrate_other; install --legacy-migrate-wrappers puts oneiscsi over
    tm/shared/premigrate, which runs our step for the eqliscsi disks, then the original; when the
    original fails, our step is undone."""
    import pathlib
    r = pathlib.Path(tmp_path / "r414")
    r.mkdir()
    (r / "VERSION").write_text("4.14.0\n")
    orig_rc = tmp_path / "orig.rc"
    orig_rc.write_text("0")
    for action in ("premigrate", "postmigrate"):
        p = r / "tm" / "shared" / action
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\necho ORIGINAL-%s \"$#\" >> %s\nexit $(cat %s)\n"
                     % (action, tmp_path / "orig.log", orig_rc))
        p.chmod(0o755)
    subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "install", "--remotes", str(r), "--python", oneutil.PYTHON,
                    "--legacy-migrate-wrappers", "shared"], check=True, capture_output=True)
    from oneiscsi.sim.onemodel import Cloud
    cloud4 = Cloud(w.oned, version=(4, 14), system_tm="shared", system_ds=SYSDS)
    img = new_image(w)
    cloud4.image(img)
    vmid = next(_ids)
    xml = cloud4.vm(vmid, [(0, img)], hosts=("host1",))
    w.tm("ln", "fe:" + img.volume, disk_path(vmid, 0, "host1"), vmid, DSID)
    xml = cloud4.state(vmid, 4, "host1", "host2")
    args = ["host1", "host2", "/var/lib/one/datastores/0/%d" % vmid, str(vmid), "0", onexml.b64(xml)]
    # the original premigrate fails: our logins on host2 are taken back
    orig_rc.write_text("1")
    res = oneutil.run(r / "tm" / "shared" / "premigrate", args, env=w.env)
    assert res.rc == 1 and img.volume not in w.logged_in("host2") and w.volume(img.volume).multihost is False, res
    assert w.read("host1", local(vmid, 0), 65536) == img.data[:65536]
    orig_rc.write_text("0")
    for action in ("premigrate", "postmigrate"):
        res = oneutil.run(r / "tm" / "shared" / action, args, env=w.env)
        assert res.rc == 0, res
    assert (tmp_path / "orig.log").read_text().split() == ["ORIGINAL-premigrate", "6"] * 2 + ["ORIGINAL-postmigrate", "6"]
    assert img.volume not in w.logged_in("host1") and w.logged_in("host2").count(img.volume) == 1
    assert w.read("host2", local(vmid, 0), 65536) == img.data[:65536]
    w.tm("delete", disk_path(vmid, 0, "host2"), vmid, DSID)
    cloud4.done(vmid)


def _legacy_tree(tmp_path, name="r414"):
    """A 4.14 remotes tree whose tm/shared/premigrate is oneiscsi's legacy wrapper over an
    original that logs its calls."""
    import pathlib
    r = pathlib.Path(tmp_path / name)
    (r / "tm" / "shared").mkdir(parents=True)
    (r / "VERSION").write_text("4.14.0\n")
    for action in ("premigrate", "postmigrate", "failmigrate"):
        p = r / "tm" / "shared" / action
        p.write_text("#!/bin/sh\necho ORIGINAL-%s >> %s\nexit 0\n" % (action, tmp_path / "orig.log"))
        p.chmod(0o755)
    subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "install", "--remotes", str(r), "--python", oneutil.PYTHON,
                    "--legacy-migrate-wrappers", "shared"], check=True, capture_output=True)
    return r


@pytest.mark.parametrize("style", ["migrate_other", "legacy-eqliscsi-login", "legacy-iscsi-check"])
def test_premigrate_failing_partway_leaves_host_and_san_as_before(w, tmp_path, style):
    """Two eqliscsi disks; premigrate fails partway: the destination refuses one login (its
    volume admits host1 only), or, through the 4.x wrapper, the next driver's step fails (the
    iscsi disk's CHAP secret is missing on host2). Afterwards host2 has no session, multihost
    and access records are as before, and the VM still reads both disks on host1."""
    from oneiscsi.sim.onemodel import Cloud, Img
    legacy = style.startswith("legacy")
    cloud = Cloud(w.oned, version=(4, 14) if legacy else (6, 8), system_tm="ssh", system_ds=SYSDS)
    a, b = new_image(w), new_image(w)
    for img in (a, b):
        cloud.image(img)
    vmid = next(_ids)
    disks = [(0, a), (1, b)]
    if style == "legacy-iscsi-check":
        lun = cloud.image(Img(next(_ids), "lun", "iqn.2024-01.org.example:lun/1", ds_id=101, tm_mad="iscsi",
                              disk_type="ISCSI", fmt="", template={"ISCSI_HOST": "10.9.9.9", "ISCSI_USER": "u",
                                                                   "ISCSI_USAGE": "no-such-usage"}))
        cloud.inherit = ("ISCSI_HOST", "ISCSI_USER", "ISCSI_USAGE")
        w.oned.datastores[101] = onexml.datastore_xml(ds_id=101, name="iscsi", ds_mad="iscsi", tm_mad="iscsi")
        disks.append((2, lun))
    cloud.vm(vmid, disks, hosts=("host1",), lcm_state=1)
    for did in (0, 1):
        w.tm("ln", "fe:x", disk_path(vmid, did, "host1"), vmid, DSID)
    if style != "legacy-iscsi-check":     # b admits host1 only: tgtd refuses host2's login
        w.sim.group.add_access(b.volume, ipaddress=w.lab.hosts["host1"].addr)
        for rec in [r for r in w.volume(b.volume).access if r.ipaddress == "*.*.*.*"]:
            w.sim.group.delete_access(b.volume, rec.id)
    before = {v: (w.volume(v).multihost, [(r.id, r.ipaddress, r.initiator) for r in w.volume(v).access])
              for v in (a.volume, b.volume)}
    xml = cloud.state(vmid, 4, "host1", "host2")
    if legacy:
        r = _legacy_tree(tmp_path)
        args = ["host1", "host2", "/var/lib/one/datastores/0/%d" % vmid, str(vmid), "0", onexml.b64(xml)]
        res = oneutil.run(r / "tm" / "shared" / "premigrate", args, env=w.env)
    else:
        res = w.tm("premigrate", *_migrate_args(vmid), stdin=onexml.b64(xml), ok=False)
    assert res.rc != 0 and "Traceback" not in res.err, res
    assert "host2" in res.err, res
    assert not [v for v in w.logged_in("host2") if v in (a.volume, b.volume)]
    assert w.link("host2", local(vmid, 0)) == "" and w.link("host2", local(vmid, 1)) == ""
    after = {v: (w.volume(v).multihost, [(r.id, r.ipaddress, r.initiator) for r in w.volume(v).access])
             for v in (a.volume, b.volume)}
    assert after == before
    for did, img in ((0, a), (1, b)):
        assert w.read("host1", local(vmid, did), 65536) == img.data[:65536]
    if legacy:
        assert not os.path.exists(tmp_path / "orig.log")       # the original never ran
    cloud.state(vmid, 3, "host1")
    for did in (0, 1):
        w.tm("delete", disk_path(vmid, did, "host1"), vmid, DSID)
    cloud.done(vmid)


# ---- HA: any frontend can act (the state folder is a cache; locks that matter are on hosts) -------
def test_cache_wiped_between_every_step_ends_in_the_same_state(w):
    """EQL_HOST_ACCESS=initiator (the one thing cached: host initiator names). One VM's life
    with the state folder kept, another's with it wiped before every step: the same sessions
    and access records after every step."""
    import shutil
    w.datastore(EQL_HOST_ACCESS="initiator")
    names = {h.initiator: n for n, h in w.lab.hosts.items()}

    def state(vol):
        recs = sorted(names.get(a.initiator, a.initiator) for a in w.volume(vol).access if a.initiator)
        return ([h for h in ("host1", "host2") if vol in w.logged_in(h)], recs, w.volume(vol).multihost)

    def life(wipe):
        img = new_image(w)
        vmid = next(_ids)
        seen = []

        def step(fn):
            if wipe:
                shutil.rmtree(w.env["ONEISCSI_STATE_DIR"], ignore_errors=True)
            fn()
            seen.append(state(img.volume))
        w.vm(vmid, [(0, img)], hosts=("host1",), lcm_state=1)
        step(lambda: w.deploy(vmid, "host1"))
        b64 = onexml.b64(w.cloud.state(vmid, 4, "host1", "host2"))
        step(lambda: w.tm("premigrate", *_migrate_args(vmid), stdin=b64))
        step(lambda: w.tm("postmigrate", *_migrate_args(vmid), stdin=b64))
        w.cloud.state(vmid, 3, "host1", "host2")
        step(lambda: w.terminate(vmid, "host2"))
        return seen
    try:
        kept, wiped = life(False), life(True)
    finally:
        w.datastore()
    assert kept == wiped, (kept, wiped)
    assert kept[1] == (["host1", "host2"], ["host1", "host2"], True) and kept[-1] == ([], [], False)


def _at_once(*calls):
    out = [None] * len(calls)

    def go(i, fn):
        out[i] = fn()
    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_two_frontends_at_once_never_cut_a_shared_volume(w):
    """A leader change: the old leader still terminates VM X while the new one deploys VM Y on
    the same host from the same IMMUTABLE image, with no frontend lock in common. Oned already
    shows Y on the host and the host's per-target lock orders the two host steps: Y's disk stays."""
    gold = new_image(w, ptype="IMMUTABLE")
    ea, eb = _env(w, "old-leader"), _env(w, "new-leader")
    for _ in range(3):
        x, y = next(_ids), next(_ids)
        w.vm(x, [(0, gold)], hosts=("host1",), lcm_state=1)
        w.deploy(x, "host1")
        w.cloud.state(x, 11)                                          # X: EPILOG
        w.vm(y, [(0, gold)], hosts=("host1",), lcm_state=1)           # Y: PROLOG on host1
        gone, made = _at_once(
            lambda: oneutil.run(w.remotes / "tm" / "eqliscsi" / "delete", [disk_path(x, 0, "host1"), x, DSID],
                                env=ea, timeout=300),
            lambda: oneutil.run(w.remotes / "tm" / "eqliscsi" / "ln", ["fe:" + gold.volume, disk_path(y, 0, "host1"),
                                                                       y, DSID], env=eb, timeout=300))
        assert gone.rc == 0 and made.rc == 0, (gone, made)
        w.cloud.done(x)
        assert w.logged_in("host1").count(gold.volume) == 1
        assert w.read("host1", local(y, 0), 65536) == gold.data[:65536]
        w.cloud.state(y, 3)
        w.terminate(y, "host1")
    assert gold.volume not in w.logged_in("host1")


def test_two_frontends_clone_and_delete_the_same_disk_at_once(w):
    """The old leader's clone (or delete) still runs when the new leader runs it again: one clone,
    one session, both succeed; then both deletes succeed and only the clone is gone."""
    img = new_image(w, persistent=False)
    vmid = next(_ids)
    w.vm(vmid, [(0, img)], hosts=("host1",), lcm_state=1)
    args = ["fe:" + img.volume, disk_path(vmid, 0, "host1"), vmid, DSID]
    runs = _at_once(*[lambda e=e: oneutil.run(w.remotes / "tm" / "eqliscsi" / "clone", args, env=e, timeout=300)
                      for e in (_env(w, "fa"), _env(w, "fb"))])
    assert all(r.rc == 0 for r in runs), runs
    clones = [n for n in w.sim.group.volumes if n.startswith(img.volume + "-")]
    assert clones == [w.clone_of(img, vmid)] and w.logged_in("host1").count(clones[0]) == 1
    assert w.read("host1", local(vmid, 0), 65536) == img.data[:65536]
    w.cloud.state(vmid, 11)
    runs = _at_once(*[lambda e=e: oneutil.run(w.remotes / "tm" / "eqliscsi" / "delete",
                                              [disk_path(vmid, 0, "host1"), vmid, DSID], env=e, timeout=300)
                      for e in (_env(w, "fa"), _env(w, "fb"))])
    assert all(r.rc == 0 for r in runs), runs
    assert w.volume(clones[0]) is None and w.volume(img.volume) is not None
    assert clones[0] not in w.logged_in("host1")
    w.cloud.done(vmid)
