"""A whole VM life on two hosts through the installed eqliscsi links, checking the SAN
(volumes, access records, multihost, snapshots, sizes) and the hosts (sessions, links, data)
after every step; every action runs twice. Once on two stand-in hosts; once with the
real-kernel host (oneiscsi.sim.realhost, marked realhost) as one of the two."""
from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from oneiscsi.sim import onexml
from tests.test_eqliscsi_tm import DSID, MiB, WRITER, World, disk_path, local, rand_bytes

pytestmark = pytest.mark.needs_root

# LCM_STATE (OpenNebula include/VirtualMachine.h)
PROLOG, RUNNING, MIGRATE, PROLOG_MIGRATE, EPILOG_UNDEPLOY, PROLOG_UNDEPLOY = 1, 3, 4, 8, 30, 31
DISK_SNAPSHOT_POWEROFF, DISK_SNAPSHOT_REVERT_POWEROFF, DISK_RESIZE_POWEROFF, EPILOG = 51, 52, 63, 11


def lifecycle(w: World, h1: str, h2: str, vmid: int = 50, addr=None):
    """h1/h2: host names in the world's lab (addr: name -> address oned uses, default the name)."""
    addr = addr or {h1: h1, h2: h2}
    a1, a2 = addr[h1], addr[h2]
    pimg = w.register(1, "Persistent disk", size=4 * MiB, seed=1)
    bimg = w.register(2, "Base image", size=4 * MiB, seed=2, persistent=False)
    pers, pdata, base, bdata = pimg.volume, pimg.data, bimg.volume, bimg.data
    assert (pers, base) == ("persistent-disk.1", "base-image.2")
    clone = "%s-%d" % (base, vmid)
    disks = [(0, pimg), (1, bimg)]

    def vm(lcm, *hosts):
        return w.vm(vmid, disks, hosts=hosts, lcm_state=lcm)

    def on(host, vol):
        return w.logged_in(host).count(vol)

    def check(where, volumes=(pers, clone), multihost=False):
        """volumes logged in once on every host in `where`, nowhere else; records match."""
        for h in (h1, h2):
            for v in volumes:
                assert on(h, v) == (1 if h in where else 0), (h, v, w.logged_in(h))
        for v in volumes:
            assert w.host_records(v) == sorted(where), (v, w.host_records(v))
            assert w.volume(v).multihost is multihost

    # deploy: ln (persistent) + clone (non-persistent) on h1
    vm(PROLOG, a1)
    w.twice("ln", "fe:" + pers, disk_path(vmid, 0, a1), vmid, DSID)
    w.twice("clone", "fe:" + base, disk_path(vmid, 1, a1), vmid, DSID)
    assert w.volume(clone) is not None and w.volume(clone).size_mb == w.volume(base).size_mb
    check({h1})
    for did in (0, 1):
        assert w.link(h1, local(vmid, did)).startswith("/dev/")
    assert w.read(h1, local(vmid, 0), 65536) == pdata[:65536]
    assert w.read(h1, local(vmid, 1), 65536) == bdata[:65536]

    # write through the disk links on h1
    new0, new1 = rand_bytes(131072, 100), rand_bytes(131072, 101)
    w.write(h1, local(vmid, 0), new0, offset=MiB)
    w.write(h1, local(vmid, 1), new1, offset=MiB)

    # live migration h1 -> h2 (migrate_other shape: 6 args, template on stdin); first one that
    # fails in the hypervisor (failmigrate undoes premigrate), then one that works
    xml = vm(MIGRATE, a1, a2)
    margs = [a1, a2, "/var/lib/one/datastores/0/%d" % vmid, vmid, 0, "shared" if w.shared else "ssh"]
    w.tm("premigrate", *margs, stdin=onexml.b64(xml))
    w.twice("failmigrate", *margs, stdin=onexml.b64(xml))
    check({h1})
    assert w.read(h1, local(vmid, 0), 131072, offset=MiB) == new0     # the link still resolves on h1
    w.reset_ssh()
    w.twice("premigrate", *margs, stdin=onexml.b64(xml))
    assert len(w.ssh_calls()) == 2                    # one round trip to h2 per run
    check({h1, h2}, multihost=True)
    assert w.read(h2, local(vmid, 0), 131072, offset=MiB) == new0
    assert w.read(h2, local(vmid, 1), 131072, offset=MiB) == new1
    w.twice("postmigrate", *margs, stdin=onexml.b64(xml))
    check({h2})
    assert w.read(h2, local(vmid, 0), 131072, offset=MiB) == new0     # with a shared folder too
    assert w.read(h2, local(vmid, 1), 131072, offset=MiB) == new1

    # cold migration h2 -> h1
    vm(PROLOG_MIGRATE, a1, a2, a1)
    for did in (0, 1):
        w.twice("mv", disk_path(vmid, did, a2), disk_path(vmid, did, a1), vmid, DSID)
    check({h1})
    assert w.link(h1, local(vmid, 0)).startswith("/dev/")
    assert w.link(h2, local(vmid, 0)) == (w.link(h1, local(vmid, 0)) if w.shared else "")   # one folder or two
    assert w.read(h1, local(vmid, 1), 131072, offset=MiB) == new1

    # undeploy (to the frontend) and resume on h2
    vm(EPILOG_UNDEPLOY, a1, a2, a1)
    for did in (0, 1):
        w.twice("mv", disk_path(vmid, did, a1), disk_path(vmid, did, "fe"), vmid, DSID)
    check(set())
    assert w.volume(pers) is not None and w.volume(clone) is not None
    vm(PROLOG_UNDEPLOY, a1, a2, a1, a2)
    for did in (0, 1):
        w.twice("mv", disk_path(vmid, did, "fe"), disk_path(vmid, did, a2), vmid, DSID)
    check({h2})
    assert w.read(h2, local(vmid, 0), 131072, offset=MiB) == new0

    # disk snapshot, more writes, revert (VM powered off: disks stay on the host)
    vm(DISK_SNAPSHOT_POWEROFF, a1, a2, a1, a2)
    w.twice("snap_create", disk_path(vmid, 0, a2), 0, vmid, DSID)
    assert "one-snap-0" in w.volume(pers).snapshots
    w.write(h2, local(vmid, 0), rand_bytes(131072, 102), offset=MiB)
    vm(DISK_SNAPSHOT_REVERT_POWEROFF, a1, a2, a1, a2)
    w.twice("snap_revert", disk_path(vmid, 0, a2), 0, vmid, DSID)
    assert sorted(w.volume(pers).snapshots) == ["one-snap-0"]       # no leftover "before restore"
    check({h2})
    assert w.read(h2, local(vmid, 0), 131072, offset=MiB) == new0

    # resize the persistent disk to 8 MB: SAN and host see it
    vm(DISK_RESIZE_POWEROFF, a1, a2, a1, a2)
    w.twice("resize", disk_path(vmid, 0, a2), 8, vmid, DSID)
    assert w.volume(pers).size_mb == 8
    assert w.size(h2, local(vmid, 0)) == 8 * MiB

    # save-as of the non-persistent disk (cpds, live volume)
    vm(RUNNING, a1, a2, a1, a2)
    w.twice("cpds", disk_path(vmid, 1, a2), "saved.3", -1, vmid, DSID)
    assert w.volume("saved.3") is not None and w.volume("saved.3").size_mb == w.volume(clone).size_mb

    # terminate: mvds for the persistent disk, delete for the other, then the VM directory
    vm(EPILOG, a1, a2, a1, a2)
    w.twice("mvds", disk_path(vmid, 0, a2), pers, vmid, DSID)
    w.twice("delete", disk_path(vmid, 1, a2), vmid, DSID)
    w.twice("delete", "%s:/var/lib/one/datastores/0/%d" % (a2, vmid), vmid, 0)
    check(set(), volumes=(pers,))
    assert w.volume(clone) is None and w.volume(pers) is not None and w.volume(base) is not None
    assert w.hosts[h2].run(["test", "-e", "/var/lib/one/datastores/0/%d" % vmid], check=False).returncode != 0
    for h in (h1, h2):
        assert not [v for v in w.logged_in(h) if v in (pers, clone, base, "saved.3")]


@pytest.fixture(params=["shared", "ssh"])
def world(tmp_path, remotes, request):
    """The system datastore shared by both hosts (one VM folder, as NFS) or per host."""
    w = World(tmp_path / "w", conf={"EQL_MULTIHOST": "disable", "EQL_SECURITY_ACCESS": "initiator " + WRITER},
              shared=request.param == "shared")
    w.remotes = remotes
    try:
        yield w
    finally:
        w.stop()


def test_lifecycle_on_two_standin_hosts(world):
    w = world
    addr = {h: w.lab.hosts[h].addr for h in ("host1", "host2")}
    # per-host access records by address; nothing else may log in (tgtd checks the ACL)
    w.datastore(EQL_HOST_ACCESS="ipaddress")
    lifecycle(w, "host1", "host2", addr=addr)
    assert os.path.getsize(w.env["ONEISCSI_LOG"]) > 0


# ---- with the real-kernel host --------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = [(os.path.join(ROOT, "udev/61-oneiscsi-eql.rules"), "/etc/udev/rules.d/61-oneiscsi-eql.rules"),
         (os.path.join(ROOT, "udev/oneiscsi-eql-volume"), "/etc/udev/scripts/oneiscsi-eql-volume")]


class GuestHost:
    """A RealHost with the lab Host's run() shape (everything as root inside the guest)."""

    def __init__(self, rh):
        self.rh, self.addr = rh, rh.addr

    def run(self, cmd, user="root", input=None, check=True, timeout=120):
        text = cmd if isinstance(cmd, str) else " ".join(shlex.quote(str(c)) for c in cmd)
        r = self.rh.ssh(text, input=input, user="root", timeout=timeout)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        return r


@pytest.fixture(scope="module")
def real_world(tmp_path_factory):
    from oneiscsi.sim import realhost
    from oneiscsi.sim.hosts import Lab
    ok, why = realhost.available()
    if not ok:
        pytest.skip("real-kernel host unavailable: " + why)
    work = tmp_path_factory.mktemp("eqlreal")
    lab = Lab(str(work / "lab"), hosts=("host1",))
    w = rh = None
    try:
        lab.start()
        w = World(work / "w", lab=lab, conf={"EQL_MULTIHOST": "disable", "EQL_SECURITY_ACCESS": "initiator " + WRITER})
        rh = realhost.RealHost(work / "kvm1", lab.bridge, lab.subnet.rsplit(".", 1)[0] + ".50/24", name="kvm1",
                               udev_rules=RULES)
        rh.start(timeout=180)
        cm = "/tmp/oneiscsi-eqlrh-%d-%%r" % os.getpid()
        with open(w.ssh_config, "a") as f:     # oneadmin's ssh config, multiplexed as the README advises
            f.write("\n".join(["", "Host %s kvm1" % rh.addr, "  HostName " + rh.addr, "  User oneadmin",
                               "  IdentityFile " + rh.identity, "  IdentitiesOnly yes",
                               "  UserKnownHostsFile " + rh.known_hosts, "  GlobalKnownHostsFile /dev/null",
                               "  StrictHostKeyChecking yes", "  BatchMode yes", "  LogLevel ERROR",
                               "  ControlMaster auto", "  ControlPath " + cm, "  ControlPersist 120", ""]))
        w.hosts["kvm1"] = GuestHost(rh)
        w.real_boot_seconds = rh.boot_seconds
        yield w
    finally:
        if w is not None:
            subprocess.run(["ssh", "-F", w.ssh_config, "-O", "exit", "kvm1"], capture_output=True, timeout=20)
            w.stop()
        if rh is not None:
            rh.stop()
        lab.stop()


@pytest.mark.realhost
def test_lifecycle_with_the_real_kernel_host(real_world, remotes):
    w = real_world
    w.remotes = remotes
    w.datastore(EQL_HOST_ACCESS="ipaddress")
    addr = {h: w.hosts[h].addr for h in ("host1", "kvm1")}
    lifecycle(w, "kvm1", "host1", vmid=60, addr=addr)


@pytest.mark.realhost
def test_immutable_disk_is_read_only_on_the_real_host(real_world, remotes):
    """READONLY disks (IMMUTABLE and CDROM images) are set read-only on the host's block device
    (`blockdev --setro` through the sudoers line); two VMs on the host share one session, which
    goes with the last of them."""
    w = real_world
    w.remotes = remotes
    w.datastore(EQL_HOST_ACCESS="ipaddress")
    addr = w.hosts["kvm1"].addr
    gold = w.register(70, "Golden", size=4 * MiB, seed=70, ptype="IMMUTABLE")
    for vmid in (71, 72):
        w.vm(vmid, [(0, gold)], hosts=(addr,), lcm_state=PROLOG)
        w.deploy(vmid, addr)
        w.cloud.state(vmid, RUNNING)
    dev = w.hosts["kvm1"].run(["readlink", "-f", local(71, 0)]).stdout.strip()
    assert dev.startswith("/dev/sd")
    assert w.hosts["kvm1"].run(["blockdev", "--getro", dev]).stdout.strip() == "1"
    assert w.read("kvm1", local(72, 0), 65536) == gold.data[:65536]
    w.terminate(71, addr)
    assert w.logged_in("kvm1").count(gold.volume) == 1 and w.read("kvm1", local(72, 0), 65536) == gold.data[:65536]
    w.terminate(72, addr)
    assert gold.volume not in w.logged_in("kvm1") and w.volume(gold.volume) is not None
