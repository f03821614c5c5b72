"""The iscsi / iscsi_libvirt datastore actions through the installed links, per OpenNebula version."""
import pytest

from oneiscsi.sim import onexml
from tests import oneutil

SEED_DS = {"ISCSI_HOST": "the_iscsi_host", "ISCSI_USER": "the_iscsi_user", "ISCSI_USAGE": "the_iscsi_usage",
           "DISK_TYPE": "ISCSI"}
SEED_PATHS = ["iqn.1992-01.com.example:storage:diskarrays-sn-a8675309",
              "iqn.2014.01.192.168.50.61:test:7cd2cc1e/0"]
# OpenNebula 4.x has no DISK_TYPE=ISCSI (install refuses the iscsi drivers there)
VERSIONS = [(n, v) for n, v in oneutil.VERSIONS.items() if v >= (5, 0)]


def data(path, version, persistent=True, image_tpl=None, ds_tpl=None, driver="iscsi"):
    img = onexml.image_xml(iid=7, name="iscsi_device", path=path, persistent=persistent,
                           template=image_tpl or {}, version=version)
    ds = onexml.datastore_xml(ds_id=101, name="iscsi", ds_mad=driver, tm_mad=driver,
                              template=SEED_DS if ds_tpl is None else ds_tpl, version=version)
    return onexml.ds_action_data(img, ds)


@pytest.mark.parametrize("vname,version", VERSIONS)
@pytest.mark.parametrize("driver", ["iscsi", "iscsi_libvirt"])
@pytest.mark.parametrize("path", SEED_PATHS)
def test_cp_seed_examples(remotes_factory, vname, version, driver, path, logfile):
    remotes = remotes_factory(vname)
    res = oneutil.ds_call(remotes, driver, "cp", data(path, version, driver=driver), 7, version)
    assert res.rc == 0, res
    expected = "%s raw\n" % path if version >= (6, 0) else path + "\n"
    assert res.out == expected
    if (6, 0, 3) <= version < (7, 0):
        assert res.err == ""  # 6.0.3-6.10 turn any stderr into the error text: log to the file only
    assert "registering" in logfile.read_text()


def test_cp_image_overrides_seed_template(remotes):
    tpl = {"ISCSI_HOST": "the_iscsi_host2", "ISCSI_USER": "the_iscsi_user2", "ISCSI_USAGE": "the_iscsi_usage2",
           "ISCSI_IQN": "iqn.1992-01.com.example:storage.tape1.sys1.xyz"}
    res = oneutil.ds_call(remotes, "iscsi", "cp", data(SEED_PATHS[0], (6, 8), image_tpl=tpl), 7, (6, 8))
    assert res.rc == 0 and res.out == SEED_PATHS[0] + " raw\n", res


def test_cp_lun_example_with_host_only_on_image(remotes):
    tpl = {"ISCSI_HOST": "192.168.50.61"}
    res = oneutil.ds_call(remotes, "iscsi", "cp", data(SEED_PATHS[1], (6, 8), image_tpl=tpl, ds_tpl={}), 4, (6, 8))
    assert res.rc == 0 and res.out == SEED_PATHS[1] + " raw\n", res


@pytest.mark.parametrize("vname,version", VERSIONS)
def test_cp_refuses_non_persistent_with_reason(remotes_factory, vname, version):
    remotes = remotes_factory(vname)
    res = oneutil.ds_call(remotes, "iscsi", "cp", data(SEED_PATHS[0], version, persistent=False), 7, version)
    assert res.rc != 0 and res.out == ""
    msg = oneutil.error_text(res, version)
    assert "corrupt" in msg and "PERSISTENT=YES" in msg
    assert "Traceback" not in res.err
    if version >= (6, 0, 3):
        assert len([ln for ln in res.err.splitlines() if not ln.startswith(("INFO:", "DEBUG:"))]) == 1


@pytest.mark.parametrize("ds_tpl,image_tpl,words", [
    ({"ISCSI_HOST": "h", "ISCSI_USER": "u"}, {}, "ISCSI_USAGE is not"),
    ({"ISCSI_HOST": "h", "ISCSI_USAGE": "x"}, {}, "ISCSI_USER is not"),
    ({}, {}, "ISCSI_HOST is not set"),
    ({"ISCSI_HOST": "h"}, {"ISCSI_USER": "u"}, "ISCSI_USAGE is not"),
])
def test_cp_chap_pairs_and_host_required(remotes, ds_tpl, image_tpl, words):
    res = oneutil.ds_call(remotes, "iscsi", "cp", data(SEED_PATHS[0], (6, 8), image_tpl=image_tpl, ds_tpl=ds_tpl),
                          7, (6, 8))
    assert res.rc == 1 and words in res.err, res


@pytest.mark.parametrize("vname,version", VERSIONS)
def test_stat_monitor_rm(remotes_factory, vname, version):
    remotes = remotes_factory(vname)
    stat_img = "<IMAGE><PATH>%s</PATH></IMAGE>" % SEED_PATHS[1]
    b64 = onexml.ds_action_data(stat_img, onexml.datastore_xml(template=SEED_DS, version=version))
    res = oneutil.ds_call(remotes, "iscsi", "stat", b64, 12, version)
    assert (res.rc, res.out) == (0, "0\n")
    mon = onexml.ds_action_data("", onexml.datastore_xml(template=SEED_DS, version=version))
    res = oneutil.ds_call(remotes, "iscsi", "monitor", mon, 101, version)
    assert (res.rc, res.out) == (0, "USED_MB=0\nTOTAL_MB=1\nFREE_MB=1\n")
    res = oneutil.ds_call(remotes, "iscsi", "rm", data(SEED_PATHS[0], version), 7, version)
    assert (res.rc, res.out) == (0, "")


def test_stat_refuses_bad_path_before_the_image_exists(remotes):
    b64 = onexml.ds_action_data("<IMAGE><PATH>/etc/passwd</PATH></IMAGE>", onexml.datastore_xml(template=SEED_DS))
    res = oneutil.ds_call(remotes, "iscsi", "stat", b64, 3, (6, 8))
    assert res.rc == 1 and "must start with 'iqn.'" in res.err


@pytest.mark.parametrize("action", ["mkfs", "clone", "snap_delete", "snap_revert", "snap_flatten"])
def test_not_supported_one_line(remotes, action):
    res = oneutil.ds_call(remotes, "iscsi", action, data(SEED_PATHS[0], (6, 8)), 7, (6, 8))
    assert res.rc == 1 and res.out == ""
    assert res.err.count("\n") == 1 and "not supported" in res.err


def test_old_versions_get_the_marker_block(remotes_factory):
    remotes = remotes_factory("5.12")
    res = oneutil.ds_call(remotes, "iscsi", "mkfs", data(SEED_PATHS[0], (5, 12)), 7, (5, 12))
    assert res.rc == 1
    assert "ERROR MESSAGE --8<------" in res.err and "ERROR MESSAGE ------>8--" in res.err
    assert "not supported" in oneutil.error_text(res, (5, 12))


def test_both_input_styles_accepted_whatever_the_version(remotes_factory):
    remotes = remotes_factory("6.0")  # says argv, gets stdin
    res = oneutil.run(remotes / "datastore" / "iscsi" / "cp", [7], stdin=data(SEED_PATHS[0], (6, 0)))
    assert res.rc == 0 and res.out == SEED_PATHS[0] + " raw\n"
    remotes = remotes_factory("7.0")  # says stdin, gets argv
    res = oneutil.run(remotes / "datastore" / "iscsi" / "cp", [data(SEED_PATHS[0], (7, 0)), 7])
    assert res.rc == 0 and res.out == SEED_PATHS[0] + " raw\n"
