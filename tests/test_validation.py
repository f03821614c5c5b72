"""Every validation rule refuses hostile input before any command runs."""
import os
import stat

import pytest

from oneiscsi.sim import onexml
from tests import oneutil

HOSTILE = {
    "space": "iqn.2000-01.com.example:a b",
    "tab": "iqn.2000-01.com.example:a\tb",
    "single quote": "iqn.2000-01.com.example:a'b",
    "double quote": 'iqn.2000-01.com.example:a"b',
    "semicolon": "iqn.2000-01.com.example:a;touch /tmp/x",
    "dollar": "iqn.2000-01.com.example:$(id)",
    "backtick": "iqn.2000-01.com.example:`id`",
    "lt": "iqn.2000-01.com.example:a<b",
    "gt": "iqn.2000-01.com.example:a>b",
    "amp": "iqn.2000-01.com.example:a&b",
    "pipe": "iqn.2000-01.com.example:a|b",
    "newline": "iqn.2000-01.com.example:a\nb",
    "control": "iqn.2000-01.com.example:a\x7fb",  # XML 1.0 carries DEL, not \x01-\x1f
    "empty label": "iqn.2000-01..example:a",
    "empty part after colon": "iqn.2000-01.com.example:a::b",
    "trailing colon": "iqn.2000-01.com.example:",
    "empty lun": "iqn.2000-01.com.example:a/",
    "lun too big": "iqn.2000-01.com.example:a/16384",
    "lun not a number": "iqn.2000-01.com.example:a/x1",
    "no prefix": "2000-01.com.example:a",
    "bad eui": "eui.12345",
    "empty": "",
}


@pytest.fixture
def spy(tmp_path):
    """A PATH whose ssh/sh/qemu-img record any call: proves that nothing ran."""
    d = tmp_path / "spy"
    d.mkdir()
    marker = tmp_path / "ran"
    for name in ("ssh", "qemu-img", "virsh", "iscsiadm"):
        p = d / name
        p.write_text("#!/bin/sh\necho \"$0 $*\" >> %s\nexit 0\n" % marker)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return {"PATH": "%s:%s" % (d, os.environ["PATH"])}, marker


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_cp_refuses_hostile_path(remotes, spy, name, tmp_path):
    env, marker = spy
    img = onexml.image_xml(iid=1, path=HOSTILE[name])
    ds = onexml.datastore_xml(template={"ISCSI_HOST": "h"})
    res = oneutil.ds_call(remotes, "iscsi", "cp", onexml.ds_action_data(img, ds), 1, (6, 8), env=env)
    assert res.rc == 1 and res.out == "", res
    assert "refused" in res.err or "empty" in res.err
    assert res.err.count("\n") == 1  # one line, even for a value with a newline
    assert not marker.exists()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("attr,value,words", [
    ("ISCSI_HOST", "h;id", "';'"),
    ("ISCSI_HOST", "h:99999", "port"),
    ("ISCSI_HOST", "h:0", "port"),
    ("ISCSI_HOST", "fe80::1", "brackets"),
    ("ISCSI_HOST", "[fe80::zz]:3260", "IPv6"),
    ("ISCSI_HOST", "-oProxyCommand=x", "not a host name"),
    ("ISCSI_HOST", "a\nb", "newline"),
    ("ISCSI_USER", "us er", "whitespace"),
    ("ISCSI_USER", "u$x", "'$'"),
    ("ISCSI_USAGE", "us`x`", "backtick"),
    ("ISCSI_IQN", "iqn.2000-01.com.example:a|b", "'|'"),
])
def test_cp_refuses_hostile_attributes(remotes, spy, attr, value, words):
    env, marker = spy
    tpl = {"ISCSI_HOST": "h"}
    if attr in ("ISCSI_USER", "ISCSI_USAGE"):
        tpl.update({"ISCSI_USER": "u", "ISCSI_USAGE": "x"})
    tpl[attr] = value
    img = onexml.image_xml(iid=1, path="iqn.2000-01.com.example:ok", template=tpl)
    res = oneutil.ds_call(remotes, "iscsi", "cp", onexml.ds_action_data(img, onexml.datastore_xml()), 1,
                          (6, 8), env=env)
    assert res.rc == 1 and words in res.err, res
    assert not marker.exists()


@pytest.mark.parametrize("value", [
    "iqn.1992-01.com.example:storage:diskarrays-sn-a8675309",
    "iqn.2014.01.192.168.50.61:test:7cd2cc1e/0",
    "iqn.2001-05.com.equallogic:0-8a0906-83bcb3401-16e0002fd0a46f3d-centos-test",
    "iqn.2003-10.com.equallogic:group01:25366:fakev/16383",
    "eui.02004567A425678D",
    "naa.6001405b5f0d4e4a9c8a0a1b2c3d4e5f/1",
    "iqn.2024-01.org.example:host_1.disk-2",
])
def test_accepts_what_real_targets_accept(remotes, value):
    img = onexml.image_xml(iid=1, path=value)
    ds = onexml.datastore_xml(template={"ISCSI_HOST": "10.0.0.1 [2001:db8::1]:3261 san.example.com:3260"})
    res = oneutil.ds_call(remotes, "iscsi", "cp", onexml.ds_action_data(img, ds), 1, (6, 8))
    assert res.rc == 0 and res.out == value + " raw\n", res


def test_tm_ln_refuses_hostile_host_before_ssh(remotes, spy):
    env, marker = spy
    res = oneutil.run(remotes / "tm" / "iscsi" / "ln",
                      ["iqn.2000-01.com.example:a", "-oProxyCommand=touch:/var/lib/one/datastores/0/1/disk.0",
                       "1", "101"], env=env)
    assert res.rc == 1 and "not a host name" in res.err, res
    assert not marker.exists()


@pytest.mark.parametrize("dst", ["raw", ":/var/lib/one/datastores/0/1/disk.0", "host1:"])
def test_tm_ln_names_a_bad_host_path_value_before_ssh(remotes, spy, dst):
    """A HOST:PATH argument without a host (a SOURCE with a space shifts oned's arguments:
    one_tm.rb parse_script splits on spaces) is named with its value and the fix."""
    env, marker = spy
    res = oneutil.run(remotes / "tm" / "iscsi" / "ln", ["iqn.2000-01.com.example:a", dst, "1", "101"], env=env)
    assert res.rc == 1 and res.err.count("\n") == 1, res
    assert repr(dst) in res.err and "is empty" not in res.err, res
    assert ("oneimage show" in res.err) or ("not a host name" in res.err), res
    assert not marker.exists()
