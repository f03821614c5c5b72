"""The iscsi transfer actions against real sshd hosts in network namespaces, a real tgtd
target with CHAP, per-host libvirtd, and a fake oned serving the VM over XML-RPC."""
import os
import shlex
import subprocess
import threading

import pytest

from oneiscsi.sim import onexml
from tests import oneutil

pytestmark = pytest.mark.needs_root

IQN = "iqn.2024-01.org.example.lab:lun1"
USAGE = "lab-usage"
CHAP_USER = "labuser"
CHAP_PASS = "Lab-Chap-Pw-77"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from oneiscsi.sim.hosts import Lab
    from oneiscsi.sim.oned import FakeOned
    from oneiscsi.sim.tgt import Tgtd
    work = tmp_path_factory.mktemp("iscsi-tm")
    lab = Lab(str(work / "lab"), hosts=("host1", "host2"), san=True, libvirtd=True)
    lab.start()
    tgtd = oned = None
    try:
        tgtd = Tgtd(str(work / "tgt"), portal="%s:3260" % lab.san.addr, netns=lab.san.netns)
        tgtd.start()
        tgtd.add_target(IQN, str(work / "lun1.img"), size_bytes=16 * 1024 * 1024)
        tgtd.bind(IQN)
        tgtd.set_chap(IQN, CHAP_USER, CHAP_PASS)
        oned = FakeOned(session="oneadmin:onepw")
        oned.start()
        auth = work / "one_auth"
        auth.write_text("oneadmin:onepw\n")
        sshlog = work / "ssh.log"
        wrapper = work / "ssh"
        # records every ssh argv (to count round trips and prove no secret is on argv)
        wrapper.write_text("#!/bin/sh\necho \"$*\" >> %s\nexec ssh -F %s \"$@\"\n"
                           % (shlex.quote(str(sshlog)), shlex.quote(lab.ssh_config)))
        wrapper.chmod(0o755)
        env = {"ONE_XMLRPC": oned.url, "ONE_AUTH": str(auth), "ONEISCSI_SSH": str(wrapper),
               "ONEISCSI_LOG": str(work / "oneiscsi.log")}
        yield {"lab": lab, "tgtd": tgtd, "oned": oned, "env": env, "sshlog": sshlog, "work": work}
    finally:
        if oned:
            oned.stop()
        if tgtd:
            tgtd.stop()
        lab.stop()


@pytest.fixture
def w(world, remotes):
    world["sshlog"].write_text("")
    world["oned"].calls.clear()
    world["remotes"] = remotes
    return world


def ssh_calls(w):
    return [ln for ln in w["sshlog"].read_text().splitlines() if ln.strip()]


def disk(did, tm="iscsi", chap=False, source=IQN + "/1", portal=None, **extra):
    attrs = {"SOURCE": source, "TM_MAD": tm, "TYPE": "ISCSI", "PERSISTENT": "YES", "CLONE": "NO",
             "ISCSI_HOST": portal or "10.9.9.9:3260", "DATASTORE_ID": 101, "IMAGE_ID": did, "TARGET": "vd%s" % "abcdefgh"[did]}
    if chap:
        attrs.update({"ISCSI_USER": CHAP_USER, "ISCSI_USAGE": USAGE})
    attrs.update(extra)
    return onexml.disk_xml(did, attrs)


def ln(w, vmid, host, did=0):
    return oneutil.run(w["remotes"] / "tm" / "iscsi" / "ln",
                       ["fe:" + IQN + "/1", "%s:/var/lib/one/datastores/0/%s/disk.%s" % (host, vmid, did), vmid, 101],
                       env=w["env"])


def test_ln_checks_host_in_one_round_trip_and_reads_vm_once(w):
    w["oned"].vms[10] = onexml.vm_xml(vmid=10, disks=[disk(0)])
    res = ln(w, 10, "host1")
    assert res.rc == 0, res
    assert len(ssh_calls(w)) == 1
    assert [c for c in w["oned"].calls if c[0] == "one.vm.info"] == [("one.vm.info", (10,))] or \
        len([c for c in w["oned"].calls if c[0] == "one.vm.info"]) == 1


def test_ln_with_chap_needs_the_secret_then_secret_command_defines_it(w, pyz):
    w["oned"].vms[11] = onexml.vm_xml(vmid=11, disks=[disk(0, chap=True)])
    res = ln(w, 11, "host1")
    assert res.rc == 1
    assert "host host1" in res.err and USAGE in res.err and "oneiscsi.pyz secret" in res.err, res
    assert res.err.count("\n") == 1
    # define it on both hosts; the password goes on stdin only
    sec = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "secret", "--usage", USAGE, "--user", CHAP_USER,
                          "--hosts", "host1,host2"], input=CHAP_PASS + "\n", capture_output=True, text=True,
                         env=dict(os.environ, **w["env"]))
    assert sec.returncode == 0, sec.stderr
    assert sec.stdout.count("defined") == 2
    assert CHAP_PASS not in w["sshlog"].read_text() and CHAP_PASS not in sec.stdout + sec.stderr
    # libvirtd on each host holds the value (base64) in its own secret store
    for h in ("host1", "host2"):
        out = w["lab"].hosts[h].run("virsh -q -c qemu:///system secret-list", user="oneadmin").stdout
        assert USAGE in out
    # running it again updates, does not duplicate
    sec = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "secret", "--usage", USAGE, "--user", CHAP_USER,
                          "--hosts", "host1"], input=CHAP_PASS + "\n", capture_output=True, text=True,
                         env=dict(os.environ, **w["env"]))
    assert sec.returncode == 0 and "updated" in sec.stdout
    res = ln(w, 11, "host1")
    assert res.rc == 0, res


def test_premigrate_checks_destination_for_every_disk_once(w):
    disks = [disk(0), disk(1, tm="shared", source="/var/lib/one/datastores/1/abc"),
             onexml.disk_xml(2, {"TYPE": "fs", "SIZE": 100}),
             disk(3, tm="iscsi_libvirt", chap=True)]
    vm = onexml.vm_xml(vmid=12, disks=disks, hosts=("host1",))
    args = ["host1", "host2", "/var/lib/one/datastores/0/12", 12, 0, "shared"]
    res = oneutil.run(w["remotes"] / "tm" / "iscsi" / "premigrate", args, stdin=onexml.b64(vm), env=w["env"])
    assert res.rc == 0, res
    assert len(ssh_calls(w)) == 1 and "host2" in ssh_calls(w)[0]
    assert not [c for c in w["oned"].calls if c[0] == "one.vm.info"]  # the template came on stdin


def test_premigrate_fails_early_when_qemu_lacks_iscsi(w):
    host2 = w["lab"].hosts["host2"]
    vm = onexml.vm_xml(vmid=13, disks=[disk(0)], hosts=("host1",))
    host2.hide("/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so")
    try:
        res = oneutil.run(w["remotes"] / "tm" / "iscsi" / "premigrate",
                          ["host1", "host2", "/var/lib/one/datastores/0/13", 13, 0, "ssh"],
                          stdin=onexml.b64(vm), env=w["env"])
    finally:
        host2.run(["umount", "/usr/lib/x86_64-linux-gnu/qemu"])  # undo hide()
    assert res.rc == 1
    assert "host host2" in res.err and "iSCSI" in res.err and "qemu-block-extra" in res.err, res


@pytest.mark.parametrize("vname", ["5.12", "6.0", "6.8", "7.0"])
def test_premigrate_shapes_per_version(w, remotes_factory, vname):
    remotes = remotes_factory(vname)
    vm = onexml.vm_xml(vmid=14, disks=[disk(0)], version=oneutil.VERSIONS[vname])
    res = oneutil.run(remotes / "tm" / "iscsi" / "premigrate",
                      ["host1", "host2", "/var/lib/one/datastores/0/14", 14, 0, "shared"],
                      stdin=onexml.b64(vm), env=w["env"])
    assert res.rc == 0, res


def test_premigrate_4x_template_in_argv(w, remotes_factory):
    # the template travels in argv[6] up to 5.8; the iscsi drivers need 5.0+ (DISK_TYPE=ISCSI)
    remotes = remotes_factory("5.4")
    vm = onexml.vm_xml(vmid=15, disks=[disk(0)], version=(5, 4))
    res = oneutil.run(remotes / "tm" / "iscsi" / "premigrate",
                      ["host1", "host2", "/var/lib/one/datastores/0/15", 15, 0, onexml.b64(vm)], env=w["env"])
    assert res.rc == 0, res
    assert len(ssh_calls(w)) == 1


def test_host_down_fails_fast_with_host_name(w):
    w["oned"].vms[16] = onexml.vm_xml(vmid=16, disks=[disk(0)])
    host2 = w["lab"].hosts["host2"]
    host2.down()
    try:
        res = ln(w, 16, "host2")
    finally:
        host2.up()
    assert res.rc == 1 and "host host2" in res.err and "ssh" in res.err, res


@pytest.mark.parametrize("action,args", [
    ("mv", ["host1:/d/0/17/disk.0", "host2:/d/0/17/disk.0", 17, 101]),
    ("mvds", ["host1:/d/0/17/disk.0", IQN, 17, 101]),
    ("delete", ["host1:/d/0/17/disk.0", 17, 101]),
    ("delete", ["host1:/d/0/17", 17, 0]),
    ("postmigrate", ["host1", "host2", "/d/0/17", 17, 0, "shared"]),
    ("failmigrate", ["host1", "host2", "/d/0/17", 17, 0, "shared"]),
])
def test_cleanup_actions_never_touch_anything_even_with_hosts_down(w, action, args):
    for h in w["lab"].hosts.values():
        h.down()
    try:
        for _ in range(2):  # and again: idempotent
            res = oneutil.run(w["remotes"] / "tm" / "iscsi" / action, args, stdin="", env=w["env"])
            assert res.rc == 0 and res.out == "", res
    finally:
        for h in w["lab"].hosts.values():
            h.up()
    assert ssh_calls(w) == []
    assert w["tgtd"].targets()[IQN]["luns"]  # the LUN is still there


def test_xmlrpc_unreachable_falls_back_to_onevm(w, tmp_path):
    vm = onexml.vm_xml(vmid=18, disks=[disk(0)])
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (tmp_path / "vm.xml").write_text(vm)
    onevm = bindir / "onevm"
    onevm.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = \"show -x 18\" ] && exec cat %s\nexit 1\n" % (tmp_path / "vm.xml"))
    onevm.chmod(0o755)
    env = dict(w["env"], ONE_XMLRPC="http://127.0.0.1:1/RPC2", PATH="%s:%s" % (bindir, os.environ["PATH"]))
    res = oneutil.run(w["remotes"] / "tm" / "iscsi" / "ln",
                      ["fe:" + IQN + "/1", "host1:/var/lib/one/datastores/0/18/disk.0", 18, 101], env=env)
    assert res.rc == 0, res


def test_fifteen_parallel_ln(w):
    for vmid in range(100, 115):
        w["oned"].vms[vmid] = onexml.vm_xml(vmid=vmid, disks=[disk(0)])
    results = {}

    def go(vmid):
        results[vmid] = ln(w, vmid, "host1" if vmid % 2 else "host2")
    threads = [threading.Thread(target=go, args=(v,)) for v in range(100, 115)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.rc == 0 for r in results.values()), [r for r in results.values() if r.rc]
    assert len(ssh_calls(w)) == 15


def test_several_portals_are_refused_at_deploy_before_qemu(w):
    w["oned"].vms[20] = onexml.vm_xml(vmid=20, disks=[disk(0, portal="10.1.1.1 san.example:3261")])
    res = ln(w, 20, "host1")
    assert res.rc == 1 and "exactly one" in res.err and ssh_calls(w) == [], res


def test_disk_xml_of_the_vm_validates(w, tmp_path):
    w["oned"].vms[19] = onexml.vm_xml(vmid=19, disks=[disk(0, chap=True, portal="10.1.1.1")])
    res = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "disk-xml", "--vm", "19", "--domain"],
                         capture_output=True, text=True, env=dict(os.environ, **w["env"]))
    assert res.returncode == 0, res.stderr
    assert "<host name=\"10.1.1.1\" port='3260'/>" in res.stdout
    assert "<secret type='iscsi' usage=\"%s\"/>" % USAGE in res.stdout
    f = tmp_path / "dom.xml"
    f.write_text(res.stdout)
    val = subprocess.run(["virt-xml-validate", str(f), "domain"], capture_output=True, text=True)
    assert val.returncode == 0, val.stdout + val.stderr


def test_selftest_over_ssh(w):
    # the usage and the portal come from the iscsi datastores oned knows
    w["oned"].datastores[101] = onexml.datastore_xml(ds_id=101, template={
        "ISCSI_HOST": "%s:3260" % w["lab"].san.addr, "ISCSI_USER": CHAP_USER, "ISCSI_USAGE": USAGE})
    sec = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "secret", "--usage", USAGE, "--user", CHAP_USER,
                          "--hosts", "host1,host2"], input=CHAP_PASS + "\n", capture_output=True, text=True,
                         env=dict(os.environ, **w["env"]))
    assert sec.returncode == 0, sec.stderr
    res = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "--selftest", "--json", "host1", "host2"],
                         capture_output=True, text=True, env=dict(os.environ, **w["env"]))
    import json
    rows = json.loads(res.stdout)
    assert {r["host"] for r in rows} == {"host1", "host2"}
    checks = {(r["host"], r["check"]): r["status"] for r in rows}
    assert checks[("host1", "secret %s" % USAGE)] == "PASS"
    assert checks[("host1", "qemu-iscsi")] == "PASS"
    assert checks[("host1", "libvirtd")] == "PASS"
    assert checks[("host2", "portal %s:3260" % w["lab"].san.addr)] == "PASS"
    assert res.returncode == (0 if all(r["status"] == "PASS" for r in rows) else 1)
    res = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "--selftest", "--portal", "%s:1" % w["lab"].san.addr, "host1"],
                         capture_output=True, text=True, env=dict(os.environ, **w["env"]))
    assert res.returncode == 1 and "FAIL" in res.stdout and "fix:" in res.stdout
