"""DS `export` (a marketplace app made from an eqliscsi image): the volume is read through iSCSI
(qemu-img + libiscsi against the simulator's tgtd target) into a qcow2 file, and the
<IMPORT_INFO> the market driver parses (src/market_mad/one_market.rb `import`) is printed."""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import tempfile

import pytest

from tests.test_eqliscsi_ds import MiB, WRITER, Lab, bridge_sshd, ds_data, one_line  # noqa: F401 (fixture)

FIELDS = ("IMPORT_SOURCE", "MD5", "SIZE", "FORMAT", "DISPOSE", "DISPOSE_CMD")


@pytest.fixture(scope="module")
def host_key(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bxekey") / "ssh_host_rsa_key")


@pytest.fixture(scope="module")
def elab(tmp_path_factory, host_key):
    lab = Lab(tempfile.mkdtemp(prefix="bxe-", dir=str(tmp_path_factory.mktemp("bxe"))), host_key)
    try:
        yield lab
    finally:
        lab.stop()


def volume_with(lab, name, data, size="4MB", ipaddress=None):
    lab.group.create_volume(name, size, description="OpenNebula image: export test", unrestricted=not ipaddress)
    if ipaddress:
        lab.group.add_access(name, ipaddress=ipaddress)
    with open(lab.group.volumes[name].backing, "r+b") as f:
        f.write(data)
    return name


def info(out: str) -> dict:
    """<IMPORT_INFO> as one_market.rb reads it (text of each element, CDATA or not)."""
    from lxml import etree
    root = etree.fromstring(out.strip())
    assert root.tag == "IMPORT_INFO"
    return {el.tag: el.text or "" for el in root}


def raw_of(qcow2, out):
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, out], check=True, capture_output=True)
    with open(out, "rb") as f:
        return f.read()


def test_export_prints_import_info_and_the_file_is_the_volume(elab, remotes, tmp_path):
    lab = elab
    data = os.urandom(3 * MiB)
    vol = volume_with(lab, "market-src.20", data)
    before = lab.state()
    res = lab.call(remotes, "export", ds_data(iid=20, name="market src", source=vol, size_mb=4), 20)
    assert res.rc == 0, res
    assert res.out.count("\n") == 1
    got = info(res.out)
    assert sorted(got) == sorted(FIELDS)
    path = got["IMPORT_SOURCE"]
    assert os.path.dirname(path) == lab.staging and os.path.isfile(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    with open(path, "rb") as f:
        assert got["MD5"] == hashlib.md5(f.read()).hexdigest()
    assert (got["SIZE"], got["FORMAT"], got["DISPOSE"]) == ("4", "qcow2", "YES")
    back = raw_of(path, str(tmp_path / "x.raw"))
    assert back == open(lab.group.volumes[vol].backing, "rb").read()      # the whole volume, byte for byte
    assert back[:len(data)] == data
    assert lab.state() == before                                           # nothing changed on the group
    assert not any("snapshot" in c for c in lab.sim.commands)
    # the market driver runs DISPOSE_CMD word by word after the upload (http/import: `$DISPOSE_CMD`)
    assert got["DISPOSE_CMD"] == "rm -f " + path
    subprocess.run(shlex.split(got["DISPOSE_CMD"]), check=True)
    assert os.listdir(lab.staging) == []
    # 5.x: no DISPOSE_CMD; its http import removes a frontend IMPORT_SOURCE itself
    r512 = lab.call(remotes, "export", ds_data((5, 12), iid=20, name="market src", source=vol, size_mb=4), 20,
                    version=(5, 12), env={"ONEISCSI_ONE_VERSION": "5.12.0"})
    assert r512.rc == 0, r512
    got = info(r512.out)
    assert "DISPOSE_CMD" not in got and got["DISPOSE"] == "YES"
    os.unlink(got["IMPORT_SOURCE"])


def test_restricted_volume_gets_a_reader_record_for_the_read_only(elab, remotes, tmp_path):
    lab = elab
    lab.conf(EQL_SECURITY_ACCESS="ipaddress 10.9.9.9")          # nobody here: tgtd refuses the reader
    try:
        data = os.urandom(MiB)
        vol = volume_with(lab, "locked.21", data, ipaddress="10.9.9.9")
        before = lab.state()
        res = lab.call(remotes, "export", ds_data(iid=21, name="locked", source=vol, size_mb=4), 21)
        assert res.rc == 0, res
        path = info(res.out)["IMPORT_SOURCE"]
        assert raw_of(path, str(tmp_path / "l.raw"))[:MiB] == data
        os.unlink(path)
        assert lab.state() == before                                 # the reader's record is gone
        assert any(c.startswith("volume select locked.21 access create initiator %s" % WRITER)
                   for c in lab.sim.commands)
    finally:
        lab.conf()


def test_failures_leave_no_file_and_no_record(elab, remotes):
    lab = elab
    vol = volume_with(lab, "fails.22", os.urandom(MiB))
    lab.conf(EQL_PORTAL="127.0.0.1:1", EQL_SECURITY_ACCESS="ipaddress 10.9.9.9")   # nothing listens there
    try:
        lab.group.volumes[vol].access[:] = []
        before = lab.state()
        res = lab.call(remotes, "export", ds_data(iid=22, name="fails", source=vol, size_mb=4), 22)
        text = one_line(res, (6, 8))
        assert "LUN" in text, text
        assert os.listdir(lab.staging) == [] and lab.state() == before
    finally:
        lab.conf()
    res = lab.call(remotes, "export", ds_data(iid=23, name="gone", source="gone.23", size_mb=4), 23)
    assert "volume gone.23 of image 23 does not exist" in one_line(res, (6, 8))
    assert os.listdir(lab.staging) == []


def test_export_on_a_bridge_host(elab, remotes, tmp_path, bridge_sshd):
    """With BRIDGE_LIST the file is made on the first reachable host; IMPORT_SOURCE is
    ssh://<host>:<path> (as fs/export) and DISPOSE_CMD removes it there over ssh."""
    lab = elab
    env, _ = bridge_sshd
    data = os.urandom(2 * MiB)
    vol = volume_with(lab, "bridged.24", data)
    res = lab.call(remotes, "export", ds_data(iid=24, name="bridged", source=vol, size_mb=4,
                                              ds_tpl={"BRIDGE_LIST": "bridge0 bridge1"}), 24, env=env)
    assert res.rc == 0, res
    got = info(res.out)
    m = re.fullmatch(r"ssh://bridge1:(/var/tmp/oneiscsi-export-\w+\.qcow2)", got["IMPORT_SOURCE"])
    assert m, got
    path = m.group(1)                       # the bridge host is this machine (sshd on loopback)
    with open(path, "rb") as f:
        assert got["MD5"] == hashlib.md5(f.read()).hexdigest()
    assert raw_of(path, str(tmp_path / "b.raw"))[:len(data)] == data
    assert got["DISPOSE_CMD"] == "ssh bridge1 rm -f " + path
    ssh = shlex.split(env["ONEISCSI_SSH"])
    subprocess.run(ssh + shlex.split(got["DISPOSE_CMD"])[1:], check=True)
    assert not os.path.exists(path)


def test_a_reader_record_that_cannot_be_removed_fails_the_export(elab, remotes):
    """The record added for the read must go: when the group refuses its removal the export
    fails saying so (the operator removes it), and the staged file is removed."""
    lab = elab
    lab.conf(EQL_SECURITY_ACCESS="ipaddress 10.9.9.9")
    try:
        vol = volume_with(lab, "sticky.25", os.urandom(MiB), ipaddress="10.9.9.9")
        lab.sim.faults.fail_next(r"access delete", "Access control record is busy.")
        res = lab.call(remotes, "export", ds_data(iid=25, name="sticky", source=vol, size_mb=4), 25)
        text = one_line(res, (6, 8))
        assert "could NOT be removed" in text and "sticky.25" in text, text
        assert os.listdir(lab.staging) == []
    finally:
        lab.sim.faults.clear()
        lab.conf()
