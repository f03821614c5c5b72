"""argv[0] routing, the launcher form, install/uninstall and what `rsync -aL` makes of it."""
import os
import subprocess


from tests import oneutil


def pyz_run(args, **kw):
    return subprocess.run([oneutil.PYTHON, str(oneutil.PYZ)] + list(args), capture_output=True, text=True, **kw)


def test_unknown_names_exit_2_with_one_line(pyz, tmp_path):
    for argv0 in ["frobnicate", str(tmp_path / "tm" / "iscsi" / "frob"), str(tmp_path / "datastore" / "nosuch" / "cp")]:
        link = tmp_path / "links" / argv0.lstrip("/").replace("/", "_")
        res = oneutil.run(oneutil.PYZ, env={"ONEISCSI_ARGV0": argv0})
        assert res.rc == 2, (argv0, res)
        assert res.err.count("\n") == 1 and "understood:" in res.err
        assert link  # noqa


def test_launcher_form_and_version(pyz):
    res = pyz_run(["--version"])
    assert res.returncode == 0 and res.stdout.startswith("oneiscsi ")
    res = pyz_run(["ds", "iscsi", "monitor", "0"], input="")
    assert res.returncode == 0 and res.stdout == "USED_MB=0\nTOTAL_MB=1\nFREE_MB=1\n"
    res = pyz_run(["tm", "iscsi", "nope"])
    assert res.returncode == 2 and "unknown tm action" in res.stderr


def test_path_routing_with_sys_tm_suffix_and_symlink_not_resolved(pyz, tmp_path):
    # a direct symlink to the pyz named like an action: argv[0] is the link's own path
    d = tmp_path / "remotes" / "tm" / "iscsi"
    d.mkdir(parents=True)
    (d / "mv.ssh").symlink_to(oneutil.PYZ)
    env = {"PATH": "%s:%s" % (os.path.dirname(oneutil.PYTHON), os.environ["PATH"])}
    res = oneutil.run(d / "mv.ssh", ["h1:/var/lib/one/datastores/0/5/disk.0", "h2:/var/lib/one/datastores/0/5/disk.0",
                                     "5", "101"], env=env)
    assert res.rc == 0 and res.out == "", res
    (d / "clone").symlink_to(oneutil.PYZ)
    res = oneutil.run(d / "clone", ["fe:iqn.2000-01.com.example:a", "h1:/x/disk.0", "5", "101"], env=env)
    assert res.rc == 1 and "non-persistent" in res.err


def test_flat_bin_names_take_the_driver_from_the_data(pyz, remotes):
    from oneiscsi.sim import onexml
    b64 = onexml.ds_action_data(onexml.image_xml(path="iqn.2000-01.com.example:a"),
                                onexml.datastore_xml(ds_mad="iscsi_libvirt", template={"ISCSI_HOST": "h"}))
    res = oneutil.run(oneutil.TOP / "bin" / "ds-cp", [b64, 3])
    assert res.rc == 0 and res.out == "iqn.2000-01.com.example:a raw\n", res
    res = oneutil.run(oneutil.TOP / "bin" / "ds-monitor", ["--driver", "iscsi", "0"])
    assert res.rc == 0 and res.out.startswith("USED_MB=0")


def tree(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for f in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            out[rel] = ("link", os.readlink(p)) if os.path.islink(p) else ("file", open(p, "rb").read())
    return out


def test_install_uninstall_restores_exactly_and_is_idempotent(pyz, tmp_path):
    remotes = tmp_path / "remotes"
    (remotes / "datastore" / "iscsi_libvirt").mkdir(parents=True)
    (remotes / "datastore" / "iscsi_libvirt" / "cp").symlink_to("../dev/cp")
    (remotes / "VERSION").write_text("6.8.0\n")
    before = tree(remotes)
    for _ in range(2):
        res = pyz_run(["install", "--remotes", str(remotes)])
        assert res.returncode == 0, res.stderr
    out = res.stdout
    assert 'PERSISTENT_ONLY = "YES"' in out and 'REQUIRED_ATTRS = "DISK_TYPE,ISCSI_HOST"' in out
    assert 'INHERIT_IMAGE_ATTR = "ISCSI_IQN"' in out and "TM_MAD_CONF" in out
    assert os.readlink(remotes / "datastore" / "iscsi" / "cp") == "../../oneiscsi/oneiscsi"
    assert (remotes / "oneiscsi" / "backup" / "datastore" / "iscsi_libvirt" / "cp").is_symlink()
    # an installed action works through the launcher
    res = oneutil.run(remotes / "datastore" / "iscsi" / "monitor", ["1"])
    assert res.rc == 0 and res.out.startswith("USED_MB=0"), res
    for _ in range(2):
        res = pyz_run(["uninstall", "--remotes", str(remotes)])
        assert res.returncode == 0, res.stderr
    assert tree(remotes) == before
    assert sorted(os.listdir(remotes)) == ["VERSION", "datastore"]  # tm/ and datastore/iscsi made by install: gone
    assert os.listdir(remotes / "datastore") == ["iscsi_libvirt"]
    assert res.stdout.startswith("nothing to uninstall: ")  # the second time


def test_legacy_wrappers_on_4x_install_and_uninstall_exactly(pyz, tmp_path):
    remotes = tmp_path / "remotes"
    (remotes / "tm" / "shared").mkdir(parents=True)
    (remotes / "tm" / "common").mkdir(parents=True)
    (remotes / "tm" / "common" / "premigrate").write_text("#!/bin/sh\nexit 0\n")
    (remotes / "tm" / "shared" / "premigrate").symlink_to("../common/premigrate")
    (remotes / "tm" / "shared" / "postmigrate").write_text("#!/bin/sh\necho custom\n")
    (remotes / "VERSION").write_text("4.14.2\n")
    before = tree(remotes)
    for _ in range(2):
        res = pyz_run(["install", "--remotes", str(remotes), "--legacy-migrate-wrappers", "shared"])
        assert res.returncode == 0, res.stderr
    assert "installed datastore/eqliscsi" in res.stdout and "iscsi_libvirt" not in res.stdout  # 4.x: eqliscsi alone
    assert os.path.islink(remotes / "tm" / "shared" / "premigrate.oneiscsi-orig")
    pyz_run(["uninstall", "--remotes", str(remotes)])
    assert tree(remotes) == before and sorted(os.listdir(remotes)) == ["VERSION", "tm"]


def test_install_refuses_meaningless_input_before_changing_anything(pyz, tmp_path):
    remotes = tmp_path / "remotes"
    (remotes / "tm" / "shared").mkdir(parents=True)
    (remotes / "tm" / "shared" / "premigrate").write_text("#!/bin/sh\n")
    (remotes / "tm" / "shared" / "postmigrate").write_text("#!/bin/sh\n")
    cases = [
        ("6.8.0", ["--drivers", ""], "--drivers '' names no driver"),
        ("6.8.0", ["--drivers", "iscsi,foo"], "unknown driver 'foo'"),
        ("4.14.2", ["--legacy-migrate-wrappers", "bogus"], "tm/bogus/premigrate does not exist"),
        ("6.8.0", ["--legacy-migrate-wrappers", "shared"], "are for OpenNebula 4.x and %s/VERSION says 6.8" % remotes),
        ("4.14.2", ["--drivers", "iscsi"], "the iscsi driver needs OpenNebula 5.0 or newer (4.x has no DISK_TYPE=ISCSI)"),
        ("4.14.2", ["--drivers", "eqliscsi,iscsi_libvirt"], "the iscsi_libvirt driver needs OpenNebula 5.0"),
    ]
    for version, args, words in cases:
        (remotes / "VERSION").write_text(version + "\n")
        before = tree(remotes)
        res = pyz_run(["install", "--remotes", str(remotes)] + args)
        assert res.returncode == 2 and res.stdout == "", (args, res)
        assert res.stderr.count("\n") == 1 and words in res.stderr, (args, res.stderr)
        assert tree(remotes) == before and sorted(os.listdir(remotes)) == ["VERSION", "tm"]
    res = pyz_run(["uninstall", "--remotes", str(tmp_path / "nonexistent")])
    assert res.returncode == 2 and "is not a folder" in res.stderr


def test_failed_install_leaves_the_tree_as_it_was(pyz, tmp_path):
    """A failure half-way (here a file where the last driver's folder goes, after the
    executable, the launcher, the iscsi links and a backup are in place) undoes the run."""
    remotes = tmp_path / "remotes"
    (remotes / "datastore" / "iscsi_libvirt").mkdir(parents=True)
    (remotes / "datastore" / "iscsi_libvirt" / "cp").symlink_to("../dev/cp")
    (remotes / "tm").mkdir()
    (remotes / "tm" / "eqliscsi").write_text("in the way\n")
    (remotes / "VERSION").write_text("6.8.0\n")
    before = tree(remotes)
    res = pyz_run(["install", "--remotes", str(remotes)])
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res
    assert "tm/eqliscsi" in res.stderr and "nothing was changed" in res.stderr, res.stderr
    assert "internal error" not in res.stderr
    assert tree(remotes) == before
    assert sorted(os.listdir(remotes)) == ["VERSION", "datastore", "tm"]
    assert os.listdir(remotes / "tm") == ["eqliscsi"] and os.listdir(remotes / "datastore") == ["iscsi_libvirt"]


def test_rsync_dereferenced_copy_holds_one_executable(pyz, remotes, tmp_path):
    dest = tmp_path / "host-copy"
    subprocess.run(["rsync", "-aL", "--delete", "%s/" % remotes, str(dest)], check=True)
    size = oneutil.PYZ.stat().st_size
    big = [p for p in dest.rglob("*") if p.is_file() and p.stat().st_size >= size // 2]
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    actions = list(dest.glob("datastore/*/*")) + list(dest.glob("tm/*/*"))
    assert len(actions) > 40
    assert [p.relative_to(dest) for p in big] == [dest.joinpath("oneiscsi", "oneiscsi.pyz").relative_to(dest)]
    assert total < size + 64 * 1024 * len(actions) // 64, (total, size)  # the launcher copies are tiny


def test_legacy_wrapper_chains_to_the_original(pyz, tmp_path):
    remotes = tmp_path / "remotes"
    (remotes / "tm" / "shared").mkdir(parents=True)
    marker = tmp_path / "orig-ran"
    (remotes / "tm" / "shared" / "premigrate").write_text("#!/bin/sh\necho \"$@\" > %s\n" % marker)
    (remotes / "tm" / "shared" / "premigrate").chmod(0o755)
    (remotes / "tm" / "shared" / "postmigrate").write_text("#!/bin/sh\nexit 0\n")
    oneutil.install(remotes, "4.14", ["--legacy-migrate-wrappers", "shared"])
    from oneiscsi.sim import onexml
    vm = onexml.vm_xml(vmid=9, version=(4, 14), disks=[onexml.disk_xml(0, {"TM_MAD": "shared", "SOURCE": "/x"})])
    args = ["h1", "h2", "/var/lib/one/datastores/0/9", "9", "0", onexml.b64(vm)]
    res = oneutil.run(remotes / "tm" / "shared" / "premigrate", args)
    assert res.rc == 0, res
    assert marker.read_text().split() == args
