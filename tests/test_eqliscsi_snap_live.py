"""snap_create_live of eqliscsi disks: the guest is frozen around the group snapshot and thawed on
every path. The lab host runs sshd in a network namespace; a real guest agent cannot run there,
so the host's PATH starts with the virsh stand-in (oneiscsi/sim/virsh_standin/virsh: domfsfreeze,
domfsthaw, suspend, resume only), which logs each call with a timestamp and fails a verb on
request. The group is the simulator (its snapshots carry their creation time), the VM XML comes
from oneiscsi.sim.onemodel through the fake oned, as for every TM test."""
from __future__ import annotations

import os
import time

import pytest

from tests.test_eqliscsi_tm import DSID, MiB, disk_path, eql_host_key, world_on_lab  # noqa: F401 (fixture)

pytestmark = pytest.mark.needs_root

_ids = iter(range(7000, 8000))


@pytest.fixture(scope="module")
def lw(tmp_path_factory, eql_host_key):  # noqa: F811
    with world_on_lab(tmp_path_factory.mktemp("bxsnap"), eql_host_key, virsh_standin=True) as w:
        yield w


@pytest.fixture
def w(lw, remotes):
    lw.remotes = remotes
    lw.sim.faults.clear()
    d = lw.lab.hosts["host1"].virsh_dir
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o777)                      # the stand-in runs as oneadmin
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    lw.reset_ssh()
    return lw


def virsh_calls(w):
    """[(time, verb, domain)] the stand-in recorded on host1."""
    try:
        with open(os.path.join(w.lab.hosts["host1"].virsh_dir, "calls.log")) as f:
            return [(float(a), b, c) for a, b, c in (ln.split() for ln in f if ln.strip())]
    except FileNotFoundError:
        return []


def fail_verb(w, verb, message):
    with open(os.path.join(w.lab.hosts["host1"].virsh_dir, "fail-" + verb), "w") as f:
        f.write(message)


def running_vm(w, features=None):
    iid, vmid = next(_ids), next(_ids)
    img = w.register(iid, "live %d" % iid, size=2 * MiB, seed=iid)
    w.cloud.vm(vmid, [(0, img)], hosts=("host1",), features=features)
    w.deploy(vmid, "host1")
    return img, vmid


def snap_live(w, vmid, sid, ok=True):
    return w.tm("snap_create_live", disk_path(vmid, 0, "host1"), sid, vmid, DSID, ok=ok)


def test_freeze_before_the_snapshot_thaw_after(w):
    img, vmid = running_vm(w, {"GUEST_AGENT": "yes"})
    snap_live(w, vmid, 5)
    calls = virsh_calls(w)
    assert [(v, d) for _, v, d in calls] == [("domfsfreeze", "one-%d" % vmid), ("domfsthaw", "one-%d" % vmid)]
    snap = w.volume(img.volume).snapshots["one-snap-5"]
    assert calls[0][0] < snap.created < calls[1][0]           # the snapshot was made while frozen
    with open(snap.backing, "rb") as f:
        assert f.read(len(img.data)) == img.data
    snap_live(w, vmid, 5)                                      # a re-run: no second freeze, no new snapshot
    assert len(virsh_calls(w)) == 2 and list(w.volume(img.volume).snapshots) == ["one-snap-5"]
    w.tm("snap_delete", disk_path(vmid, 0, "host1"), 5, vmid, DSID)
    w.terminate(vmid, "host1")


def test_thaw_runs_when_the_snapshot_fails(w):
    img, vmid = running_vm(w, {"GUEST_AGENT": "yes"})
    w.sim.faults.fail_next(r"create-now", "% Error - Not enough free space in the snapshot reserve.")
    res = snap_live(w, vmid, 6, ok=False)
    assert res.rc != 0 and "snapshot reserve" in res.err and res.err.count("\n") == 1, res
    assert [v for _, v, _ in virsh_calls(w)] == ["domfsfreeze", "domfsthaw"]
    assert w.volume(img.volume).snapshots == {}
    w.terminate(vmid, "host1")


def test_failed_freeze_of_an_agent_vm_means_no_snapshot(w):
    img, vmid = running_vm(w, {"GUEST_AGENT": "yes"})
    fail_verb(w, "domfsfreeze", "Guest agent is not responding: QEMU guest agent is not connected")
    sent = len(w.sim.commands)
    res = snap_live(w, vmid, 7, ok=False)
    assert res.rc != 0 and res.err.count("\n") == 1, res
    assert "GUEST_AGENT=yes" in res.err and "guest agent is not connected" in res.err, res
    assert w.volume(img.volume).snapshots == {}
    assert not any("create-now" in c for c in w.sim.commands[sent:])
    # a failed domfsfreeze may have frozen some filesystems: it is thawed all the same
    assert [v for _, v, _ in virsh_calls(w)] == ["domfsfreeze", "domfsthaw"]
    w.terminate(vmid, "host1")


def test_no_guest_agent_snapshot_is_crash_consistent_as_on_ceph(w):
    img, vmid = running_vm(w)
    fail_verb(w, "domfsfreeze", "argument unsupported: QEMU guest agent is not configured")
    snap_live(w, vmid, 8)
    assert list(w.volume(img.volume).snapshots) == ["one-snap-8"]
    assert "not frozen" in w.new_log() and "crash-consistent" in w.new_log()
    w.tm("snap_delete", disk_path(vmid, 0, "host1"), 8, vmid, DSID)
    w.terminate(vmid, "host1")


def test_not_for_other_hypervisors_and_hostile_deploy_ids(w):
    img, vmid = running_vm(w)
    xml = w.oned.vms[vmid]
    try:
        w.oned.vms[vmid] = xml.replace("<DEPLOY_ID>one-%d</DEPLOY_ID>" % vmid, "<DEPLOY_ID>x;reboot</DEPLOY_ID>")
        res = snap_live(w, vmid, 9, ok=False)
        assert res.rc != 0 and "deploy id" in res.err and res.err.count("\n") == 1, res
        w.oned.vms[vmid] = xml.replace("<VM_MAD>kvm</VM_MAD>", "<VM_MAD>lxc</VM_MAD>")
        res = snap_live(w, vmid, 9, ok=False)
        assert res.rc != 0 and "KVM" in res.err and res.err.count("\n") == 1, res
    finally:
        w.oned.vms[vmid] = xml
    assert virsh_calls(w) == [] and w.volume(img.volume).snapshots == {}
    w.terminate(vmid, "host1")


def test_host_side_watchdog_thaws_when_the_frontend_never_does(w, monkeypatch):
    """freeze.py leaves a watchdog on the host: with no thaw call it thaws after LIMIT seconds;
    a thaw in time cancels it (one thaw only)."""
    from oneiscsi import host as hostrun
    from oneiscsi.host import freeze
    monkeypatch.setenv("ONEISCSI_SSH", w.env["ONEISCSI_SSH"])
    res = hostrun.run("host1", freeze.freeze_script("one-4242", "AGENT", limit=1))
    assert res.returncode == 0 and "GUARD=" in res.stdout, res
    deadline = time.monotonic() + 10
    while len(virsh_calls(w)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    calls = virsh_calls(w)
    assert [(v, d) for _, v, d in calls] == [("domfsfreeze", "one-4242"), ("domfsthaw", "one-4242")]
    assert calls[1][0] - calls[0][0] >= 1.0
    # the frontend thaws in time: the guard goes, the watchdog does nothing
    res = hostrun.run("host1", freeze.freeze_script("one-4243", "AGENT", limit=1))
    guard = res.stdout.split("GUARD=")[1].split()[0]
    assert hostrun.run("host1", freeze.thaw_script("one-4243", "AGENT", guard)).returncode == 0
    time.sleep(1.6)
    assert [v for _, v, d in virsh_calls(w) if d == "one-4243"] == ["domfsfreeze", "domfsthaw"]


def test_install_prints_the_live_disk_snapshots_line(pyz, tmp_path):
    """The line install prints, appended to upstream's vmm_execrc and sourced the way the VMM
    driver does (madcommon.sh `export_rc_vars`: `. vmm_execrc`), lists kvm-eqliscsi and keeps
    upstream's pairs."""
    import subprocess
    from tests import oneutil
    remotes = tmp_path / "remotes"
    remotes.mkdir()
    (remotes / "VERSION").write_text("7.4.0\n")
    res = subprocess.run([oneutil.PYTHON, str(pyz), "install", "--remotes", str(remotes)], capture_output=True,
                         text=True, check=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("LIVE_DISK_SNAPSHOTS=")]
    assert len(lines) == 1, res.stdout
    rc = tmp_path / "vmm_execrc"
    rc.write_text('LIVE_DISK_SNAPSHOTS="kvm-qcow2 kvm-shared kvm-ceph kvm-ssh"\n' + lines[0] + "\n")
    out = subprocess.run(["bash", "-c", '. "$1"; echo "$LIVE_DISK_SNAPSHOTS"', "x", str(rc)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["kvm-qcow2", "kvm-shared", "kvm-ceph", "kvm-ssh", "kvm-eqliscsi", "qemu-eqliscsi"]
