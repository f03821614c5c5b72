"""eqliscsi transfer actions while a host is down (own lab: the iscsiadm stand-in's sessions
do not survive a link flap for long, so these tests must not share hosts with the others)."""
from __future__ import annotations

import pytest

from oneiscsi.sim import onexml
from tests.test_eqliscsi_tm import DSID, SYSDS, World, _ids, _migrate_args, disk_path, local, new_image
from tests.test_eqliscsi_tm import eql_host_key  # noqa: F401 (the session-wide simulator host key)

pytestmark = pytest.mark.needs_root


@pytest.fixture(scope="module")
def world(tmp_path_factory, eql_host_key):  # noqa: F811
    w = World(tmp_path_factory.mktemp("eqltmdown"), host_key=eql_host_key, conf={"EQL_MULTIHOST": "disable"})
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def w(world, remotes):
    world.remotes = remotes
    world.reset_ssh()
    world.sim.faults.clear()
    return world


def test_delete_of_a_persistent_disk_never_deletes_even_when_told_non_persistent_elsewhere(w):
    img = new_image(w)
    vol = img.volume
    vmid = next(_ids)
    w.vm(vmid, [(0, img, {"PERSISTENT": "NO"})])
    w.tm("ln", "fe:" + vol, disk_path(vmid, 0, "host1"), vmid, DSID)
    # recover --delete runs delete for every disk; the host went down meanwhile
    w.lab.hosts["host1"].down()
    try:
        w.twice("delete", disk_path(vmid, 0, "host1"), vmid, DSID)
    finally:
        w.lab.hosts["host1"].up()
    assert "host host1 is not reachable" in w.new_log() and w.volume(vol) is not None
    w.tm("delete", disk_path(vmid, 0, "host1"), vmid, DSID)
    assert vol not in w.logged_in("host1")


def test_clone_failure_on_the_host_deletes_the_clone_it_made(w):
    img = new_image(w, persistent=False)
    vol = img.volume
    vmid = next(_ids)
    w.vm(vmid, [(0, img)])
    w.lab.hosts["host2"].down()
    try:
        res = w.tm("clone", "fe:" + vol, disk_path(vmid, 0, "host2"), vmid, DSID, ok=False)
    finally:
        w.lab.hosts["host2"].up()
    assert res.rc != 0 and "host2" in res.err and res.err.count("\n") == 1, res
    assert w.volume("%s-%d" % (vol, vmid)) is None


def test_host_down_between_premigrate_and_postmigrate(w):
    img = new_image(w)
    vol, data = img.volume, img.data
    vmid = next(_ids)
    w.vm(vmid, [(0, img)], hosts=("host1",))
    w.tm("ln", "fe:" + vol, disk_path(vmid, 0, "host1"), vmid, DSID)
    xml = w.cloud.state(vmid, 4, "host1", "host2")
    w.tm("premigrate", *_migrate_args(vmid), stdin=onexml.b64(xml))
    w.lab.hosts["host1"].down()
    try:
        w.reset_ssh()
        w.twice("postmigrate", *_migrate_args(vmid), stdin=onexml.b64(xml))
        assert "host host1 is not reachable" in w.new_log()
        assert w.read("host2", local(vmid, 0), 65536) == data[:65536]
    finally:
        w.lab.hosts["host1"].up()
    # host1 came back still logged in: the next premigrate (back to host1) cleans up first
    assert vol in w.logged_in("host1")
    w.cloud.state(vmid, 4, "host1", "host2", "host1")
    w.tm("premigrate", "host2", "host1", "/var/lib/one/datastores/0/%d" % vmid, vmid, SYSDS, "ssh",
               stdin=onexml.b64(w.oned.vms[vmid]))
    assert w.logged_in("host1").count(vol) == 1
    w.tm("failmigrate", "host2", "host1", "/var/lib/one/datastores/0/%d" % vmid, vmid, SYSDS, "ssh",
         stdin=onexml.b64(w.oned.vms[vmid]))
    assert vol not in w.logged_in("host1") and vol in w.logged_in("host2")
    w.tm("delete", disk_path(vmid, 0, "host2"), vmid, DSID)
