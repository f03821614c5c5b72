"""Every DS and TM action's real reply, as each OpenNebula version shape takes it.

The built executable runs through the installed action links (argv and stdin shaped as
that version's one_datastore.rb / one_tm.rb call it, see onedmodel.ds_invocation); its
real exit code, stdout and stderr go through tests/onedmodel.py, the model of oned's
side written from OpenNebula's source. A test fails when oned would store something
other than what the driver meant (SOURCE, FORMAT, SIZE, monitor values), would lose or
garble the reason of a failure, or would read a further protocol line.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from oneiscsi.sim import onexml
from tests import onedmodel as M
from tests import oneutil
from tests.test_eqliscsi_ds import (READER, assert_monitor, ds_data, lab, random_file,  # noqa: F401 (fixtures)
                                    same_bytes, sim_host_key, stat_data, ensure_links)
from tests.test_iscsi_ds import SEED_PATHS, data as iscsi_data

VERSIONS = M.all_versions()
# the iscsi drivers need 5.0+ (DISK_TYPE=ISCSI: Image::str_to_disk_type, src/image/Image.cc at
# release-5.0); install refuses them on a 4.x tree (tests/test_dispatch_install.py)
ISCSI_VERSIONS = [(s, v) for s, v in VERSIONS if tuple(v) >= (5, 0)]
MiB = 1024 * 1024


def ids(p):
    return "%s@%s" % (p[0], M.vstr(p[1])) if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], tuple) else None


# ---- the model itself: it must tell a right reply from a wrong one ------------------------------
def test_model_clone_reply_per_version():
    """ImageManager::_clone: 6.0.0-6.4.1 store the whole reply; 6.4.2 splits SOURCE FORMAT."""
    for v in ((6, 0, 0), (6, 0, 3), (6, 4, 1)):
        o = M.ds_outcome(v, "clone", 0, "web-copy.9 raw\n", "")
        assert o.stored["SOURCE"] == "web-copy.9 raw" and o.problems, (v, o)
        o = M.ds_outcome(v, "clone", 0, "web-copy.9\n", "")
        assert o.stored == {"SOURCE": "web-copy.9"} and not o.problems
    o = M.ds_outcome((6, 4, 2), "clone", 0, "web-copy.9 raw\n", "")
    assert o.stored == {"SOURCE": "web-copy.9", "FORMAT": "raw"} and not o.problems
    o = M.ds_outcome((5, 12, 13), "clone", 0, "web-copy.9\n", "")
    assert o.stored == {"SOURCE": "web-copy.9"} and not o.problems


def test_model_cp_needs_format_from_6_0():
    o = M.ds_outcome((6, 0, 0), "cp", 0, "vol.7\n", "")
    assert not o.ok and "FORMAT was not returned" in o.error
    o = M.ds_outcome((5, 12, 13), "cp", 0, "vol.7\n", "")
    assert o.ok and o.stored == {"SOURCE": "vol.7"} and not o.problems


def test_model_error_text_per_version():
    block = "INFO: x: step\nERROR MESSAGE --8<------\nthe reason\nERROR MESSAGE ------>8--\n"
    bare = "the reason\n"
    assert M.error_text((6, 0, 2), block) == "the reason"
    assert M.error_text((6, 0, 2), bare) == "-"                  # no block: reason lost
    assert M.error_text((6, 0, 3), block).startswith("INFO: x: step ERROR MESSAGE")  # whole stderr
    assert M.error_text((6, 0, 3), bare) == "the reason"
    assert M.error_text((7, 4, 0), "INFO: x: step\nthe reason\n") == "the reason"
    assert M.error_text((7, 4, 0), "a\nb\n") == "ab"              # glued without a space
    o = M.ds_outcome((6, 0, 3), "cp", 1, "", block)
    assert o.problems                                            # log lines glued into the error
    o = M.ds_outcome((6, 0, 2), "cp", 1, "", "ERROR MESSAGE --8<------\na\nb\nERROR MESSAGE ------>8--\n")
    assert any("spans 2 lines" in p for p in o.problems)
    o = M.tm_outcome((7, 4, 0), "ln", 0, "", "INFO: 12 x\n")
    assert any("object id 12" in p for p in o.problems)
    o = M.ds_outcome((6, 10, 5), "rm", 1, "", "-x\n")
    assert any("without its reason" in p for p in o.problems)


def test_model_stat_and_monitor():
    assert M.ds_outcome((6, 8, 0), "stat", 0, "12\n", "").stored == {"SIZE": "12"}
    assert M.ds_outcome((6, 8, 0), "stat", 0, "12 MB\n", "").problems   # SIZE stored whole from 6.0
    assert not M.ds_outcome((5, 12, 13), "stat", 0, "12 MB\n", "").problems
    o = M.ds_outcome((6, 8, 0), "monitor", 0, "USED_MB=1\nTOTAL_MB=3\nFREE_MB=2\n", "", obj_id=110)
    assert o.monitor == {"USED_MB": 1, "TOTAL_MB": 3, "FREE_MB": 2} and not o.problems
    assert M.ds_outcome((6, 8, 0), "monitor", 0, "USED_MB=1\n", "").problems


def test_model_restricted_matches_libfs():
    assert M.restricted("/etc/hostname", "/", "/var/tmp")
    assert not M.restricted("/var/tmp/x.img", "/", "/var/tmp")
    assert M.restricted("/var/lib/one/datastores/1/x", "", "")
    assert not M.restricted("/srv/img/x", "", "")


# ---- running the real driver ---------------------------------------------------------------------
def ds_run(remotes, driver, action, b64, obj_id, version, env=None, stdin_flag=False):
    args, stdin = M.ds_invocation(version, b64, obj_id, stdin_flag)
    return oneutil.run(remotes / "datastore" / driver / action, args, stdin=stdin, env=env)


def seen(version, action, res, obj_id, **kw):
    """The reply through the model; fails on any problem oned would have with it."""
    o = M.ds_outcome(version, action, res.rc, res.out, res.err, obj_id=obj_id, **kw)
    assert not o.problems, (M.vstr(version), action, o.problems, res)
    assert "Traceback" not in res.err
    return o


def ok(version, action, res, obj_id, **kw):
    assert res.rc == 0, (M.vstr(version), action, res)
    o = seen(version, action, res, obj_id, **kw)
    assert o.ok, (M.vstr(version), action, o, res)
    return o


def failed(version, action, res, obj_id, **kw):
    """A failure: oned stores exactly the driver's one-line reason after its own prefix."""
    assert res.rc != 0, (M.vstr(version), action, res)
    o = seen(version, action, res, obj_id, **kw)
    reason = M.error_text(version, res.err)
    assert reason != "-" and "\n" not in reason and reason.strip() == reason, (reason, res)
    if action not in ("rm",) or tuple(version) < (6, 0, 0):
        assert o.error.endswith(reason), (o.error, reason)
    return reason


def expect_source(version, action, o, volume):
    """What oned must store for a reply naming `volume`: SOURCE the volume itself, and
    FORMAT raw where that version reads one."""
    assert o.stored["SOURCE"] == volume, (M.vstr(version), action, o.stored)
    v = tuple(version)
    reads_format = (action == "cp" and v >= (6, 0, 0)) or (action == "clone" and v >= (6, 4, 2))
    assert o.stored.get("FORMAT") == ("raw" if reads_format else None), (M.vstr(version), action, o.stored)


@pytest.mark.parametrize("shape,version", VERSIONS, ids=ids)
def test_eqliscsi_every_ds_action(lab, remotes_factory, tmp_path, shape, version):  # noqa: F811
    remotes = remotes_factory(M.vstr(version))
    ensure_links(remotes)
    env = lab.env()

    def run(action, b64, obj_id):
        return ds_run(remotes, "eqliscsi", action, b64, obj_id, version, env=env)

    src = random_file(str(tmp_path / "s.raw"), 2 * MiB)
    o = ok(version, "stat", run("stat", stat_data(src, version), 99), 99)
    assert o.stored == {"SIZE": "2"}
    o = ok(version, "cp", run("cp", ds_data(version, iid=10, name="base", path=src, size_mb=2), 10), 10)
    expect_source(version, "cp", o, "base.10")
    # clone: oned gives the new image with PATH = the source image's SOURCE
    o = ok(version, "clone", run("clone", ds_data(version, iid=11, name="copy", path="base.10", size_mb=2), 11),
           11, cloning=10)
    expect_source(version, "clone", o, "copy.11")
    assert same_bytes(src, lab.read_back("copy.11", str(tmp_path / "c")), 2 * MiB)
    for iid, fs in ((12, "raw"), (13, "save_as")):
        o = ok(version, "mkfs", run("mkfs", ds_data(version, iid=iid, name="blank", size_mb=5, fs=fs), iid), iid)
        expect_source(version, "mkfs", o, "blank.%d" % iid)
    o = ok(version, "monitor", run("monitor", ds_data(version, image=False), 110), 110)
    u = lab.group.pool_usage("default")
    assert o.monitor == {"USED_MB": u["total"] - u["free"], "TOTAL_MB": u["total"], "FREE_MB": u["free"]}
    for sid in (0, 1):
        s = lab.group.create_snapshot("base.10", "snap %d" % sid)
        lab.group.rename_snapshot("base.10", s.name, "one-snap-%d" % sid)
    for action, sid, left in (("snap_revert", 1, ["one-snap-0", "one-snap-1"]), ("snap_delete", 0, ["one-snap-1"]),
                              ("snap_flatten", 1, [])):
        ok(version, action, run(action, ds_data(version, iid=10, source="base.10", target_snapshot=sid), 10), 10,
           snap=sid)
        assert lab.state()["base.10"]["snapshots"] == left, action
    # failures reach oned with their reason, in the shape this version reads
    reason = failed(version, "snap_revert", run("snap_revert", ds_data(version, iid=10, source="base.10",
                                                                         target_snapshot=4), 10), 10, snap=4)
    assert "no snapshot one-snap-4" in reason
    reason = failed(version, "cp", run("cp", ds_data(version, iid=14, path="/no/such.raw"), 14), 14)
    assert "/no/such.raw" in reason
    res = run("export", ds_data(version, iid=10, source="base.10"), 10)
    ok(version, "export", res, 10)
    os.unlink(res.out.split("<IMPORT_SOURCE><![CDATA[")[1].split("]]>")[0])   # the market would upload it
    reason = failed(version, "export", run("export", ds_data(version, iid=15, source="gone.15"), 15), 15)
    assert "does not exist" in reason
    for iid, source in ((11, "copy.11"), (10, "base.10"), (12, "blank.12"), (12, "blank.12")):
        ok(version, "rm", run("rm", ds_data(version, iid=iid, source=source), iid), iid)
    assert lab.state() == {}


@pytest.mark.parametrize("version", [(6, 4, 7), (6, 6, 3)], ids=M.vstr)
def test_eqliscsi_stdin_flag_shape(lab, remotes_factory, tmp_path, version):  # noqa: F811
    """one_datastore.rb -i (release-6.4.7, release-6.6.3): `<action> - <id>`, data on stdin."""
    remotes = remotes_factory(M.vstr(version))
    ensure_links(remotes)
    src = random_file(str(tmp_path / "s.raw"), MiB)
    res = ds_run(remotes, "eqliscsi", "cp", ds_data(version, iid=3, name="i", path=src), 3, version,
                 env=lab.env(), stdin_flag=True)
    expect_source(version, "cp", ok(version, "cp", res, 3), "i.3")
    res = ds_run(remotes, "eqliscsi", "monitor", ds_data(version, image=False), 110, version, env=lab.env(),
                 stdin_flag=True)
    ok(version, "monitor", res, 110)


@pytest.mark.parametrize("version", [(6, 0, 3), (6, 4, 1)], ids=M.vstr)
def test_clone_leaked_by_older_builds_can_be_removed(lab, remotes_factory, tmp_path, version):  # noqa: F811
    """Images whose SOURCE 6.0.0-6.4.1 stored as `volume raw` (an older build's clone reply)
    are removed with their volume, not refused."""
    remotes = remotes_factory(M.vstr(version))
    ensure_links(remotes)
    src = random_file(str(tmp_path / "s.raw"), MiB)
    res = ds_run(remotes, "eqliscsi", "cp", ds_data(version, iid=8, name="web", path=src), 8, version,
                 env=lab.env())
    assert res.rc == 0, res
    res = ds_run(remotes, "eqliscsi", "rm", ds_data(version, iid=8, source="web.8 raw"), 8, version, env=lab.env())
    ok(version, "rm", res, 8)
    assert lab.state() == {}


# ---- RESTRICTED_DIRS / SAFE_DIRS: check_restricted, before any SAN command ----------------------
def test_restricted_root_refuses_everything_outside_safe(lab, remotes, tmp_path):  # noqa: F811
    ensure_links(remotes)
    tpl = {"RESTRICTED_DIRS": "/", "SAFE_DIRS": "/var/tmp"}
    v = (6, 8, 0)
    for path in ("/etc/hostname", str(random_file(str(tmp_path / "x.raw"), MiB))):
        assert M.restricted(os.path.realpath(path), "/", "/var/tmp")
        for action, b64 in (("cp", ds_data(v, iid=5, path=path, ds_tpl=tpl)), ("stat", stat_data(path, v, tpl))):
            res = ds_run(remotes, "eqliscsi", action, b64, 5, v, env=lab.env())
            reason = failed(v, action, res, 5)
            assert "restricted" in reason and "SAFE_DIRS" in reason and repr(path) in reason, reason
    assert lab.sim.connections_total == 0 and lab.sim.commands == [] and lab.state() == {}
    # a symlink in a safe directory to a restricted file is judged by its target (readlink -f)
    link = "/var/tmp/oneiscsi-test-link-%d" % os.getpid()
    os.symlink("/etc/hostname", link)
    try:
        res = ds_run(remotes, "eqliscsi", "cp", ds_data(v, iid=6, path=link, ds_tpl=tpl), 6, v, env=lab.env())
        assert "/etc/hostname" in failed(v, "cp", res, 6)
    finally:
        os.unlink(link)
    assert lab.sim.connections_total == 0 and lab.state() == {}
    # inside SAFE_DIRS it is copied
    safe = random_file("/var/tmp/oneiscsi-test-%d.raw" % os.getpid(), MiB)
    try:
        res = ds_run(remotes, "eqliscsi", "cp", ds_data(v, iid=7, name="ok", path=safe, ds_tpl=tpl), 7, v,
                     env=lab.env())
        expect_source(v, "cp", ok(v, "cp", res, 7), "ok.7")
    finally:
        os.unlink(safe)


def test_restricted_defaults_and_prefixes_as_libfs(lab, remotes, tmp_path, monkeypatch):  # noqa: F811
    """OpenNebula's own directories and oneadmin's home are always restricted; entries are
    string prefixes as in `grep -E "^$path"`; SAFE_DIRS wins."""
    ensure_links(remotes)
    v = (6, 8, 0)
    home = tmp_path / "home"
    home.mkdir()
    img = random_file(str(home / "in-home.raw"), MiB)
    env = lab.env(HOME=str(home))
    cases = [({}, img, True), ({"SAFE_DIRS": str(home)}, img, False),
             ({"RESTRICTED_DIRS": str(tmp_path)}, str(tmp_path / "s.raw"), True),
             ({"RESTRICTED_DIRS": str(tmp_path) + "/s"}, str(tmp_path / "s.raw"), True)]
    random_file(str(tmp_path / "s.raw"), MiB)
    for tpl, path, refused in cases:
        assert M.restricted(os.path.realpath(path), tpl.get("RESTRICTED_DIRS", ""), tpl.get("SAFE_DIRS", ""),
                            home=str(home)) == refused
        res = ds_run(remotes, "eqliscsi", "stat", stat_data(path, v, tpl), 1, v, env=env)
        if refused:
            assert "restricted" in failed(v, "stat", res, 1), (tpl, res)
        else:
            assert ok(v, "stat", res, 1).stored == {"SIZE": "1"}, (tpl, res)
    assert lab.sim.connections_total == 0


# ---- the iscsi driver ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,version", ISCSI_VERSIONS, ids=ids)
def test_iscsi_every_ds_action(remotes_factory, shape, version, logfile):
    remotes = remotes_factory(M.vstr(version))
    for driver in ("iscsi", "iscsi_libvirt"):
        for path in SEED_PATHS:
            o = ok(version, "cp", ds_run(remotes, driver, "cp", iscsi_data(path, version, driver=driver), 7,
                                         version), 7)
            expect_source(version, "cp", o, path)
    stat_img = "<IMAGE><PATH>%s</PATH></IMAGE>" % SEED_PATHS[1]
    b64 = onexml.ds_action_data(stat_img, onexml.datastore_xml(template={"ISCSI_HOST": "h"}, version=version))
    assert ok(version, "stat", ds_run(remotes, "iscsi", "stat", b64, 12, version), 12).stored == {"SIZE": "0"}
    mon = onexml.ds_action_data("", onexml.datastore_xml(template={"ISCSI_HOST": "h"}, version=version))
    o = ok(version, "monitor", ds_run(remotes, "iscsi", "monitor", mon, 101, version), 101)
    assert o.monitor == {"USED_MB": 0, "TOTAL_MB": 1, "FREE_MB": 1}
    ok(version, "rm", ds_run(remotes, "iscsi", "rm", iscsi_data(SEED_PATHS[0], version), 7, version), 7)
    for action in ("mkfs", "clone", "snap_delete", "snap_revert", "snap_flatten", "export"):
        res = ds_run(remotes, "iscsi", action, iscsi_data(SEED_PATHS[0], version), 7, version)
        assert "not supported" in failed(version, action, res, 7)
    res = ds_run(remotes, "iscsi", "cp", iscsi_data(SEED_PATHS[0], version, persistent=False), 7, version)
    assert "PERSISTENT=YES" in failed(version, "cp", res, 7)


# ---- TM actions ------------------------------------------------------------------------------------
@pytest.fixture
def fake_oned(oned):
    return oned, oned.env


def tm_run(remotes, driver, action, args, env=None, stdin=""):
    return oneutil.run(remotes / "tm" / driver / action, args, stdin=stdin, env=env)


def tm_seen(version, action, res, vmid, success):
    o = M.tm_outcome(version, action, res.rc, res.out, res.err, vmid=vmid)
    assert not o.problems, (M.vstr(version), action, o.problems, res)
    assert "Traceback" not in res.err
    assert o.ok == success, (M.vstr(version), action, res)
    if not success:
        reason = M.error_text(version, res.err)
        assert o.error == "Error executing image transfer script: " + reason and "\n" not in reason, o.error
        return reason
    return ""


@pytest.mark.parametrize("shape,version", ISCSI_VERSIONS, ids=ids)
def test_iscsi_every_tm_action(remotes_factory, fake_oned, tmp_path, shape, version):
    oned, env = fake_oned
    remotes = remotes_factory(M.vstr(version))
    iqn = SEED_PATHS[0]
    disk = onexml.disk_xml(0, {"SOURCE": iqn, "TM_MAD": "iscsi", "TYPE": "ISCSI", "PERSISTENT": "YES",
                               "CLONE": "NO", "ISCSI_HOST": "10.9.9.9:3260", "DATASTORE_ID": 101, "IMAGE_ID": 1})
    vm = onexml.vm_xml(vmid=5, disks=[disk], version=version)
    oned.vms[5] = vm
    dst = "nohost.invalid:/var/lib/one/datastores/0/5/disk.0"
    # no-ops: succeed without touching the LUN
    for action, args in (("mv", [dst, dst, 5, 101]), ("mvds", [dst, iqn, 5, 101]), ("delete", [dst, 5, 101])):
        tm_seen(version, action, tm_run(remotes, "iscsi", action, args, env), 5, True)
    for action in ("postmigrate", "failmigrate"):
        res = tm_run(remotes, "iscsi", action, ["h1", "h2", "/var/lib/one/datastores/0/5", 5, 0], env,
                     stdin=onexml.b64(vm))
        tm_seen(version, action, res, 5, True)
    # refusals carry their reason
    reason = tm_seen(version, "clone", tm_run(remotes, "iscsi", "clone", ["fe:" + iqn, dst, 5, 101], env), 5, False)
    assert "PERSISTENT=YES" in reason
    for action in ("cpds", "resize", "snap_create", "snap_delete", "snap_revert", "context", "mkimage",
                   "mkswap"):
        res = tm_run(remotes, "iscsi", action, [dst, "1", 5, 101], env)
        assert "not supported" in tm_seen(version, action, res, 5, False)
    # ln to a host ssh cannot reach: the host and the cause
    res = tm_run(remotes, "iscsi", "ln", ["fe:" + iqn, dst, 5, 101],
                 dict(env, ONEISCSI_SSH_TIMEOUT="3"))
    assert "nohost.invalid" in tm_seen(version, "ln", res, 5, False)
    # a SOURCE with a space arrives split (one_tm.rb parse_script): named, never "host is empty"
    args = M.tm_arguments(version, ["fe:web-copy.9 raw", dst, "5", "101"])
    reason = tm_seen(version, "ln", tm_run(remotes, "iscsi", "ln", args, env), 5, False)
    assert "'raw'" in reason and "SOURCE" in reason and "is empty" not in reason, reason


def test_iscsi_ln_check_that_prints_nothing_names_cause_and_fix(remotes, fake_oned, tmp_path):
    """A host whose account does not run the script sent to `sh -s` (a command= key, a
    ForceCommand): exit 0, no output. The error says so and how to check."""
    oned, env = fake_oned
    disk = onexml.disk_xml(0, {"SOURCE": SEED_PATHS[0], "TM_MAD": "iscsi", "TYPE": "ISCSI", "PERSISTENT": "YES",
                               "CLONE": "NO", "ISCSI_HOST": "10.9.9.9:3260", "DATASTORE_ID": 101, "IMAGE_ID": 1})
    oned.vms[6] = onexml.vm_xml(vmid=6, disks=[disk])
    swallow = tmp_path / "ssh"
    swallow.write_text("#!/bin/sh\ncat >/dev/null\nexit 0\n")
    swallow.chmod(0o755)
    res = tm_run(remotes, "iscsi", "ln", ["fe:" + SEED_PATHS[0], "host1:/var/lib/one/datastores/0/6/disk.0", 6, 101],
                 dict(env, ONEISCSI_SSH=str(swallow)))
    reason = tm_seen((6, 8, 0), "ln", res, 6, False)
    assert "host host1" in reason and "printed nothing" in reason and "fix:" in reason, reason
    assert "ssh host1 sh -s" in reason and not reason.endswith(":"), reason


@pytest.mark.parametrize("shape,version", VERSIONS, ids=ids)
def test_eqliscsi_tm_failures_reach_oned_whole(remotes_factory, shape, version):
    """Whatever the eqliscsi TM actions do, a failure is one reason in the shape oned reads."""
    remotes = remotes_factory(M.vstr(version))
    if not (remotes / "tm" / "eqliscsi" / "ln").exists():
        pytest.skip("install did not place the eqliscsi TM actions in this build")
    args = M.tm_arguments(version, ["fe:web-copy.9 raw", "h1:/var/lib/one/datastores/0/5/disk.0", "5", "110"])
    reason = tm_seen(version, "ln", tm_run(remotes, "eqliscsi", "ln", args), 5, False)
    assert "'raw'" in reason and "is empty" not in reason, reason
    for action in ("context", "mkimage", "mkswap"):
        res = tm_run(remotes, "eqliscsi", action, ["h1:/var/lib/one/datastores/0/5/disk.1", 5, 0])
        if res.rc != 0:
            tm_seen(version, action, res, 5, False)


# ---- the version itself: patch levels count ---------------------------------------------------------
@pytest.mark.parametrize("text,wire", [
    ("6.0.2", (True, True, False)), ("6.0.3", (False, False, False)), ("6.4.1", (False, False, False)),
    ("6.4.2", (False, False, True)), ("6.10.5", (False, False, True)), ("7.4.0", (True, False, True)),
    ("5.12.0.4", (True, True, False)), ("4.14.2", (True, True, False))])
def test_version_patch_level_decides(text, wire):
    from oneiscsi.one.version import Wire, parse
    w = Wire(parse(text))
    v = parse(text)
    assert (w.stderr_logs, w.error_block, w.clone_prints_format) == wire
    assert w.error_block == (M.shape_of(v) in ("4.x", "5.x", "6.0.0-6.0.2"))


def test_version_from_env_and_remotes(remotes_factory, tmp_path):
    """ONEISCSI_ONE_VERSION and remotes/VERSION keep the patch level: 6.0.3 gets a bare
    error line, 6.0.2 the marker block."""
    remotes = remotes_factory("6.0.2")
    b64 = iscsi_data(SEED_PATHS[0], (6, 0, 2))
    res = ds_run(remotes, "iscsi", "mkfs", b64, 7, (6, 0, 2))
    assert "ERROR MESSAGE --8<------" in res.err
    res = ds_run(remotes, "iscsi", "mkfs", b64, 7, (6, 0, 3), env={"ONEISCSI_ONE_VERSION": "6.0.3"})
    assert res.err.count("\n") == 1 and "ERROR MESSAGE" not in res.err, res
    (remotes / "VERSION").write_text("6.0.3\n")
    res = ds_run(remotes, "iscsi", "mkfs", b64, 7, (6, 0, 3))
    assert res.err.count("\n") == 1 and "ERROR MESSAGE" not in res.err, res
    failed((6, 0, 3), "mkfs", res, 7)


def test_model_flags_marker_block_on_6_0_3():
    block = "ERROR MESSAGE --8<------\nthe reason\nERROR MESSAGE ------>8--\n"
    assert not M.ds_outcome((6, 0, 2), "cp", 1, "", block).problems
    assert M.ds_outcome((6, 0, 3), "cp", 1, "", block).problems
    assert M.ds_outcome((7, 4, 0), "cp", 1, "", block).problems
