"""The fake oned XML-RPC endpoint and the onevm fallback CLI."""
import os
import subprocess
import xmlrpc.client

import pytest

from oneiscsi.sim.oned import AUTHENTICATION, NO_EXISTS, FakeOned

STANDIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "oneiscsi", "sim", "standin")
VM = "<VM><ID>42</ID><NAME>one-42</NAME><TEMPLATE><DISK><DISK_ID>0</DISK_ID></DISK></TEMPLATE></VM>"


@pytest.fixture
def oned(tmp_path):
    o = FakeOned(session="oneadmin:secret", state_file=str(tmp_path / "oned.json")).start()
    try:
        yield o
    finally:
        o.stop()


def rpc(oned):
    return xmlrpc.client.ServerProxy(oned.url)


def test_info_methods_return_opennebula_shape(oned):
    oned.vms[42] = VM
    oned.images[7] = "<IMAGE><ID>7</ID></IMAGE>"
    oned.datastores[100] = "<DATASTORE><ID>100</ID></DATASTORE>"
    s = rpc(oned)
    assert s.one.vm.info("oneadmin:secret", 42) == [True, VM, 0]
    assert s.one.image.info("oneadmin:secret", 7, False) == [True, "<IMAGE><ID>7</ID></IMAGE>", 0]
    assert s.one.datastore.info("oneadmin:secret", 100) == [True, "<DATASTORE><ID>100</ID></DATASTORE>", 0]
    assert s.one.system.version("oneadmin:secret") == [True, "6.8.0", 0]
    assert oned.calls == [("one.vm.info", (42,)), ("one.image.info", (7, False)),
                          ("one.datastore.info", (100,)), ("one.system.version", ())]


def test_missing_object_and_wrong_session(oned):
    s = rpc(oned)
    assert s.one.vm.info("oneadmin:secret", 99) == [
        False, "[one.vm.info] Error getting virtual machine [99].", NO_EXISTS]
    assert s.one.image.info("oneadmin:secret", 3) == [False, "[one.image.info] Error getting image [3].", NO_EXISTS]
    oned.vms[42] = VM
    assert s.one.vm.info("oneadmin:wrong", 42) == [
        False, "[one.vm.info] User couldn't be authenticated, aborting call.", AUTHENTICATION]
    assert s.one.system.version("x:y")[0] is False


def test_stopped_server_is_unreachable(tmp_path):
    o = FakeOned(state_file=str(tmp_path / "s.json")).start()
    url = o.url
    o.stop()
    with pytest.raises(OSError):
        xmlrpc.client.ServerProxy(url).one.system.version("oneadmin:secret")


def onevm(oned, tmp_path, *args, auth="oneadmin:secret", prog="onevm"):
    env = dict(os.environ, **oned.env())
    if auth is not None:
        (tmp_path / "one_auth").write_text(auth + "\n")
        env["ONE_AUTH"] = str(tmp_path / "one_auth")
    else:
        env["ONE_AUTH"] = str(tmp_path / "missing")
    return subprocess.run([os.path.join(STANDIN, prog)] + list(args), env=env,
                          capture_output=True, text=True)


def test_onevm_fallback_reads_server_state(oned, tmp_path):
    oned.vms[42] = VM
    p = onevm(oned, tmp_path, "show", "-x", "42")
    assert p.returncode == 0 and p.stdout == VM + "\n"
    # replacing the dict keeps the snapshot current too
    oned.images = {7: "<IMAGE><ID>7</ID><NAME>img</NAME></IMAGE>"}
    p = onevm(oned, tmp_path, "show", "-x", "7", prog="oneimage")
    assert p.returncode == 0 and "<NAME>img</NAME>" in p.stdout
    del oned.vms[42]
    p = onevm(oned, tmp_path, "show", "-x", "42")
    assert p.returncode == 255
    assert p.stderr.strip() == "[one.vm.info] Error getting virtual machine [42]."
    assert oned.cli_calls == [("one.vm.info", (42,)), ("one.image.info", (7,)), ("one.vm.info", (42,))]
    assert oned.calls == []


def test_onevm_fallback_checks_credentials(oned, tmp_path):
    oned.vms[1] = VM
    p = onevm(oned, tmp_path, "show", "-x", "1", auth="oneadmin:bad")
    assert p.returncode == 255 and "User couldn't be authenticated" in p.stderr
    p = onevm(oned, tmp_path, "show", "-x", "1", auth=None)
    assert p.returncode == 255 and "ONE_AUTH file not present" in p.stderr
    p = onevm(oned, tmp_path, "list")
    assert p.returncode == 255
