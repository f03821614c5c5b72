"""The operator's commands: help, one-line usage errors (exit 2), real causes from secret and
--selftest, --selftest --fix, and where details go when the log file cannot be written."""
import json
import os
import subprocess

import pytest

from oneiscsi.dispatch import OPERATOR
from oneiscsi.sim import onexml
from tests import oneutil


def cli(args, env=None, stdin="", wrap=()):
    e = dict(os.environ)
    e.pop("ONE_XMLRPC", None)
    e.update(env or {})
    return subprocess.run(list(wrap) + [oneutil.PYTHON, str(oneutil.PYZ)] + list(args), capture_output=True,
                          text=True, env=e, input=stdin, timeout=120)


def test_help_lists_every_command_and_each_has_its_own(pyz):
    for word in ("--help", "-h", "help"):
        res = cli([word])
        assert res.returncode == 0 and res.stderr == "", res
        listed = {ln.split()[0] for ln in res.stdout.splitlines() if ln.startswith("  ")}
        assert set(OPERATOR) <= listed | {"help"} and {"ds", "tm"} <= listed, listed
    for cmd in [c for c in OPERATOR if c != "help"] + ["ds", "tm"]:
        res = cli([cmd, "--help"])
        assert res.returncode == 0 and res.stdout.startswith("usage: oneiscsi.pyz " + cmd), (cmd, res)
    assert cli(["help", "install"]).stdout.startswith("usage: oneiscsi.pyz install")
    res = cli([])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--help" in res.stderr


@pytest.mark.parametrize("args,env,words", [
    (["disk-xml", "--vm", "abc"], {}, "--vm 'abc' is not a VM id"),
    (["disk-xml", "--xml", "/nonexistent"], {}, "cannot read --xml '/nonexistent' (No such file or directory)"),
    (["secret", "--hosts", "", "--usage", "u", "--user", "n"], {}, "--hosts '' names no host"),
    (["install", "--bogus"], {}, "unrecognized arguments: --bogus; see `oneiscsi.pyz install --help`"),
    (["install", "--remotes", "/nonexistent"], {}, "--remotes /nonexistent is not a folder"),
    (["--selftest", "--driver", "nfs"], {}, "invalid choice: 'nfs'"),
    (["lab", "--one-version", "4.14"], {}, "--one-version '4.14': give MAJOR.MINOR from 5.0 to 7.x"),
    (["--selftest", "--apply"], {}, "--apply goes with --fix udev or --fix sudoers"),
    (["ds", "iscsi"], {}, None),  # lists drivers and actions: exit 0
])
def test_usage_errors_are_one_line_naming_the_value(pyz, args, env, words):
    res = cli(args, env)
    if words is None:
        assert res.returncode == 0 and "actions:" in res.stdout
        return
    assert res.returncode == 2 and res.stdout == "", res
    assert res.stderr.count("\n") == 1 and words in res.stderr and "internal error" not in res.stderr, res.stderr


def test_bad_one_xmlrpc_is_named(pyz):
    res = cli(["disk-xml", "--vm", "1"], {"ONE_XMLRPC": "not a url"})
    assert res.returncode == 1 and res.stderr == (
        "ONE_XMLRPC='not a url' is not an http(s) URL: set it like http://localhost:2633/RPC2\n")


def test_install_into_a_folder_this_user_cannot_write(pyz, tmp_path):
    import shutil
    import tempfile
    public = tempfile.mkdtemp(prefix="oneiscsi-test-")  # /tmp/pytest-of-root is 0700
    os.chmod(public, 0o755)
    shutil.copy(oneutil.PYZ, public)
    os.chmod(os.path.join(public, "oneiscsi.pyz"), 0o644)
    cache = os.path.join(public, "cache")
    os.mkdir(cache)
    os.chmod(cache, 0o777)
    remotes = os.path.join(public, "remotes")
    os.mkdir(remotes)
    with open(os.path.join(remotes, "VERSION"), "w") as f:
        f.write("6.8.0\n")
    try:
        res = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", oneutil.PYTHON,
                              os.path.join(public, "oneiscsi.pyz"), "install", "--remotes", remotes],
                             capture_output=True, text=True, env={"ONEISCSI_CACHE": cache, "PATH": os.environ["PATH"]})
        assert res.returncode == 1 and res.stderr == (
            "install: cannot write into %s: run install as the owner of the remotes tree (oneadmin)\n" % remotes), res
        assert os.listdir(remotes) == ["VERSION"]
    finally:
        shutil.rmtree(public)


def test_bug_details_go_where_the_line_says(tmp_path, monkeypatch, capsys):
    """An unexpected exception with an unwritable log file: the traceback lands in a private
    file the line names, never on stderr."""
    from oneiscsi import dispatch, log
    monkeypatch.setenv("ONEISCSI_LOG", str(tmp_path / "no" / "such" / "dir" / "oneiscsi.log"))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(log, "_state", dict(log._state, opened=False, file=None))

    def boom(args):
        raise ZeroDivisionError("a real bug")
    monkeypatch.setattr(dispatch, "print_version", boom)
    assert dispatch.main(["oneiscsi.pyz", "--version"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error (ZeroDivisionError: a real bug); details in %s/oneiscsi-error-" % tmp_path)
    path = err.split("details in ")[1].split(" ")[0]
    assert "Traceback" in open(path).read() and "Traceback" not in err
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def libvirtd_unreachable():
    """Run the real virsh with no libvirtd socket: /run hidden by a tmpfs in a private mount ns."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs none /run && exec "$@"', "sh"]


@pytest.fixture
def local_ssh(tmp_path):
    fake = tmp_path / "fakessh"
    fake.write_text("#!/bin/sh\n# ssh stand-in: run the script on this machine\nexec sh -s\n")
    fake.chmod(0o755)
    return {"ONEISCSI_SSH": str(fake), "ONEISCSI_LOG": str(tmp_path / "log")}


@pytest.mark.needs_root
def test_secret_says_libvirtd_is_unreachable(pyz, local_ssh):
    res = cli(["secret", "--usage", "u1", "--user", "chap", "--hosts", "localhost"], local_ssh, "pw\n",
              wrap=libvirtd_unreachable())
    assert res.returncode == 1, res
    assert "localhost: FAILED: host localhost: cannot define the libvirt secret u1: libvirtd cannot be reached " \
           "on qemu:///system (error: failed to connect to the hypervisor" in res.stderr, res.stderr
    assert "start libvirtd" in res.stderr and "pw" not in res.stderr.replace("qemu", "")


@pytest.mark.needs_root
def test_selftest_checks_only_the_drivers_oned_uses_and_says_what_it_skipped(pyz, oned, local_ssh):
    oned.datastores[101] = onexml.datastore_xml(ds_id=101, ds_mad="iscsi", tm_mad="iscsi", template={
        "ISCSI_HOST": "127.0.0.1:1", "ISCSI_USER": "chap", "ISCSI_USAGE": "u1", "DISK_TYPE": "ISCSI"})
    env = dict(local_ssh, **oned.env)
    res = cli(["--selftest", "--json", "localhost"], env, wrap=libvirtd_unreachable())
    rows = {r["check"]: r for r in json.loads(res.stdout)}
    assert res.returncode == 1
    # an iscsi-only frontend: no open-iscsi, udev or group rows
    assert not {"iscsiadm", "iscsid", "udev rules", "chap", "node.startup"} & set(rows), rows
    assert rows["libvirtd"]["status"] == "FAIL" and "start libvirtd" in rows["libvirtd"]["fix"]
    assert rows["secret u1"]["status"] == "SKIP" and "libvirtd cannot be reached" in rows["secret u1"]["detail"]
    assert rows["portal 127.0.0.1:1"]["status"] == "FAIL"
    # no iscsi/eqliscsi datastore at all: nothing checked, and it says so; exit 0
    del oned.datastores[101]
    res = cli(["--selftest", "--json"], env)
    rows = json.loads(res.stdout)
    assert res.returncode == 0 and [r["check"] for r in rows] == ["drivers"] and rows[0]["status"] == "SKIP"
    # without oned: the rows it cannot fill are SKIP with the reason
    res = cli(["--selftest", "--json", "--driver", "iscsi", "localhost"], local_ssh, wrap=libvirtd_unreachable())
    rows = {r["check"]: r for r in json.loads(res.stdout)}
    assert rows["secrets"]["status"] == "SKIP" and "--usage" in rows["secrets"]["fix"]
    assert rows["portals"]["status"] == "SKIP" and "--portal" in rows["portals"]["fix"]


@pytest.mark.needs_root
def test_selftest_fix_prints_by_default_and_installs_with_apply(pyz, tmp_path):
    res = cli(["--selftest", "--fix", "udev"])
    assert res.returncode == 0
    rules = (oneutil.TOP / "udev" / "61-oneiscsi-eql.rules").read_text()
    assert rules.strip() in res.stdout and "dry run" in res.stdout
    from oneiscsi.selftest import SUDOERS
    res = cli(["--selftest", "--fix", "sudoers"])
    assert res.returncode == 0 and res.stdout.splitlines()[1] == SUDOERS.strip()
    # --apply below another root: the files, their modes, a sudoers file visudo accepts
    res = cli(["--selftest", "--fix", "udev", "--apply", "--root", str(tmp_path)])
    assert res.returncode == 0, res
    res = cli(["--selftest", "--fix", "sudoers", "--apply", "--root", str(tmp_path)])
    assert res.returncode == 0, res
    assert (tmp_path / "etc/udev/rules.d/61-oneiscsi-eql.rules").read_text() == rules
    assert oct(os.stat(tmp_path / "etc/udev/scripts/oneiscsi-eql-volume").st_mode & 0o777) == "0o755"
    sudoers = tmp_path / "etc/sudoers.d/oneiscsi"
    assert oct(os.stat(sudoers).st_mode & 0o777) == "0o440" and sudoers.read_text() == SUDOERS
    assert subprocess.run(["visudo", "-cqf", str(sudoers)]).returncode == 0
