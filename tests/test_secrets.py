"""Secrets stay where they belong: the SAN credential only in 0600 files, nothing secret in
the log in any encoding, the log file private whatever the umask."""
from __future__ import annotations

import base64
import os
import stat
import subprocess

import pytest

from oneiscsi import config, log
from oneiscsi.errors import Invalid
from oneiscsi.sim import onexml
from tests import oneutil

SECRET = "Zq-s3cret-Pa55"


class Tpl:
    def __init__(self, **values):
        self.values = values

    def tpl(self, key):
        return self.values.get(key, "")


@pytest.fixture
def conf(tmp_path, monkeypatch):
    path = tmp_path / "eqliscsi.conf"
    path.write_text('EQL_HOST="192.0.2.10"\nEQL_USER="grpadmin"\n')
    path.chmod(0o600)
    monkeypatch.setenv("ONEISCSI_EQL_CONF", str(path))
    return path


@pytest.mark.parametrize("where", ["datastore", "image"])
def test_password_in_a_template_is_refused_with_one_line_naming_the_place(conf, where):
    tpl = Tpl(EQL_PASS=SECRET)
    with pytest.raises(Invalid) as ei:
        config.load("/nowhere", **{where: tpl})
    text = str(ei.value)
    assert "\n" not in text and SECRET not in text
    assert text.startswith("EQL_PASS is refused in the %s template" % where)
    assert str(conf) in text and "EQL_PASS_FILE" in text
    assert log.mask("x %s y" % SECRET) == "x **** y"         # registered before anything may log it


def test_key_material_in_a_template_is_refused_a_key_path_is_not(conf, tmp_path):
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
    with pytest.raises(Invalid) as ei:
        config.load("/nowhere", datastore=Tpl(EQL_KEY=pem))
    assert str(ei.value).startswith("EQL_KEY is refused in the datastore template") and "BEGIN" not in str(ei.value)
    key = tmp_path / "id_eql"
    key.write_text(pem + "\n")
    key.chmod(0o640)
    cfg = config.load("/nowhere", datastore=Tpl(EQL_KEY=str(key)))
    with pytest.raises(Invalid) as ei:
        cfg.group()
    assert "chmod 600 %s" % key in str(ei.value)                 # a key file must be private too
    key.chmod(0o600)
    assert config.load("/nowhere", datastore=Tpl(EQL_KEY=str(key))).group().key_file == str(key)


def test_password_in_the_private_conf_and_pass_file_from_the_datastore_are_accepted(conf, tmp_path):
    conf.write_text(conf.read_text() + 'EQL_PASS="%s"\n' % SECRET)
    assert config.load("/nowhere", datastore=Tpl(EQL_POOL="p1")).group().password == SECRET
    pw = tmp_path / "pw"
    pw.write_text("other-pass\n")
    pw.chmod(0o600)
    cfg = config.load("/nowhere", datastore=Tpl(EQL_PASS_FILE=str(pw)))
    assert cfg.group().password == "other-pass"


def test_b64_words_are_never_logged_other_words_are():
    data = base64.b64encode(b"<DS_DRIVER_ACTION_DATA><DATASTORE><TEMPLATE><SOME_SECRET>"
                            b"nOt-registered-42</SOME_SECRET></TEMPLATE></DATASTORE></DS_DRIVER_ACTION_DATA>").decode()
    line = log.mask("start ds eqliscsi cp %s 110" % data)
    assert data not in line and line == "start ds eqliscsi cp [base64, %d chars, not logged] 110" % len(data)
    for word in ("/var/lib/one/datastores/0/43/disk.0", "iqn.2001-05.com.equallogic:0-8a0906-0f1e2d3c4-x",
                 "ubuntu2204server", "0123456789abcdef0123456789abcdef01234567", "one-5-43-0.5"):
        assert log.mask(word) == word


def _pyz_env(tmp_path, **extra):
    e = {"ONEISCSI_LOG": str(tmp_path / "oneiscsi.log"), "ONEISCSI_EQL_CONF": str(tmp_path / "eqliscsi.conf"),
         "ONEISCSI_LOCK_DIR": str(tmp_path / "locks"), "ONEISCSI_STATE_DIR": str(tmp_path / "state")}
    e.update(extra)
    return e


@pytest.mark.parametrize("version", [(6, 6), (6, 8)])
def test_refused_template_password_reaches_no_log_in_any_encoding(remotes_factory, tmp_path, version):
    """The whole action path: argv (6.6) or stdin (6.8), DEBUG on; the password is in no output,
    neither plain nor base64 (of itself or of the data holding it); the log is 0640 under umask 0."""
    (tmp_path / "eqliscsi.conf").write_text('EQL_HOST="192.0.2.10"\nEQL_USER="grpadmin"\n')
    remotes = remotes_factory("%d.%d" % version)
    ds = onexml.datastore_xml(ds_id=110, name="eql", ds_mad="eqliscsi", tm_mad="eqliscsi",
                              template={"EQL_PASS": SECRET, "EQL_POOL": "default"}, version=version)
    b64 = onexml.ds_action_data("", ds)
    env = _pyz_env(tmp_path, ONEISCSI_DEBUG="1")
    old = os.umask(0)
    try:
        res = oneutil.ds_call(remotes, "eqliscsi", "monitor", b64, 110, version, env=env)
    finally:
        os.umask(old)
    assert res.rc != 0
    text = oneutil.error_text(res, version)
    assert text.startswith("EQL_PASS is refused in the datastore template") and "\n" not in text
    logtext = (tmp_path / "oneiscsi.log").read_text()
    assert "EQL_PASS is refused" in logtext and "start" in logtext
    if version < (6, 8):
        assert "[base64, %d chars, not logged]" % len(b64) in logtext   # the argv is in the start line, hidden
    everything = res.out + res.err + logtext
    for form in (SECRET, base64.b64encode(SECRET.encode()).decode(), b64):
        assert form not in everything
    assert stat.S_IMODE(os.stat(tmp_path / "oneiscsi.log").st_mode) == 0o640


def test_log_file_is_0640_whatever_the_umask_and_narrowed_when_loose(tmp_path):
    path = tmp_path / "l.log"
    code = ("import os; os.umask(0); from oneiscsi import log; log.configure('t'); log.info('x')")
    env = dict(os.environ, ONEISCSI_LOG=str(path), PYTHONPATH=str(oneutil.TOP))
    subprocess.run([oneutil.PYTHON, "-c", code], check=True, env=env, capture_output=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    path.chmod(0o666)
    subprocess.run([oneutil.PYTHON, "-c", code], check=True, env=env, capture_output=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert path.read_text().count(" t INFO x") == 2


@pytest.mark.parametrize("key", ["EQL_PASS_FILE", "EQL_KEY", "EQL_CHAP_PASS_FILE"])
def test_a_datastore_template_names_secret_files_only_beside_eqliscsi_conf(conf, tmp_path, key):
    """A datastore's manager must not be able to point the SAN login at another private file of
    oneadmin (one_auth) and an EQL_HOST of theirs: outside the conf's folder it is refused in one
    line, before any file is read; beside eqliscsi.conf it is taken."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    stolen = other / "one_auth"
    stolen.write_text("oneadmin:the-oned-password\n")
    stolen.chmod(0o600)
    with pytest.raises(Invalid) as ei:
        config.load("/nowhere", datastore=Tpl(**{key: str(stolen), "EQL_HOST": "198.51.100.7"}))
    msg = str(ei.value)
    assert "refused in the datastore template" in msg and str(conf.parent) in msg and "\n" not in msg
    assert "the-oned-password" not in msg
    # a link from the conf's folder to elsewhere is elsewhere
    link = tmp_path / "link"
    link.symlink_to(stolen)
    with pytest.raises(Invalid):
        config.load("/nowhere", datastore=Tpl(**{key: str(link)}))
    beside = tmp_path / "group2.secret"
    beside.write_text("x\n")
    beside.chmod(0o600)
    assert config.load("/nowhere", datastore=Tpl(**{key: str(beside)}))[key] == str(beside)
