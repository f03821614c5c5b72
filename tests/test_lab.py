"""The README's demo command runs to the end and leaves nothing behind."""
import subprocess

import pytest

from tests import oneutil

pytestmark = pytest.mark.needs_root


def netns():
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def test_lab_demo_runs_both_lifecycles_and_cleans_up(pyz):
    before = netns()
    res = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "lab"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    out = res.stdout
    for step in ("datastore/iscsi/cp 5", "tm/iscsi/ln", "tm/iscsi/premigrate host1 host2", "tm/iscsi/mvds",
                 "datastore/iscsi/rm 5", "lab: all steps done"):
        assert step in out
    assert "read 'written on host1 by VM 42'" in out  # the data crossed the live migration
    assert "host host1: QEMU on host1 has no iSCSI" in out  # the refused migration
    for step in ("datastore/eqliscsi/cp 7", "tm/eqliscsi/ln", "tm/eqliscsi/premigrate host1 host2",
                 "tm/eqliscsi/postmigrate", "tm/eqliscsi/mvds", "tm/eqliscsi/clone", "datastore/eqliscsi/rm 7"):
        assert step in out
    assert "on host2 through /var/lib/one/datastores/0/43/disk.0: read 'written on host1 by VM 43'" in out
    assert out.rstrip().endswith("lab: all steps done")
    assert "SAN: volumes: none; iSCSI sessions: none" in out  # nothing leaked
    assert netns() - before == set()


def test_lab_sim_runs_the_group_in_the_foreground_for_manual_ssh(pyz, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("Sim-Pass-1\n")
    pw.chmod(0o600)
    proc = subprocess.Popen([oneutil.PYTHON, str(oneutil.PYZ), "lab", "sim", "--workdir", str(tmp_path / "sim"),
                             "--user", "grpadmin:@%s" % pw, "--no-tgtd"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("EqualLogic group group-0 listening on 127.0.0.1:"), first
        port = int(first.rsplit(":", 1)[1])
        known = tmp_path / "known_hosts"
        known.write_text(proc.stdout.readline().split("known_hosts: ", 1)[1])
        import paramiko
        c = paramiko.SSHClient()
        c.load_host_keys(str(known))
        c.set_missing_host_key_policy(paramiko.RejectPolicy())
        c.connect("127.0.0.1", port, "grpadmin", "Sim-Pass-1", look_for_keys=False, allow_agent=False)
        _, out, _ = c.exec_command("pool select default show")
        assert "TotalCapacity:" in out.read().decode()
        c.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0
