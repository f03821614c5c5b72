"""The README's demo command runs to the end and leaves nothing behind."""
import os
import re
import subprocess

import pytest

from oneiscsi.sim import hosts
from tests import oneutil

pytestmark = pytest.mark.needs_root


def netns_names():
    """Names from `ip netns list` (each line: NAME [(id: N)])."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links():
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def leftovers_of_lab(n):
    """The namespaces and links of lab number `n` still present. Judged while holding that
    number's allocation lock, so a lab started meanwhile by someone else cannot be mistaken
    for ours (it would hold the lock while its namespaces exist)."""
    for _ in range(600):
        try:
            got, fd = hosts.allocate("subnet", [n])
            break
        except hosts.LabError:
            import time
            time.sleep(0.1)
    else:
        pytest.fail("lab number %d stayed taken by another lab for 60 s: cannot judge ours" % n)
    try:
        return (sorted(x for x in netns_names() if x.startswith("ol%d-" % n))
                + sorted(x for x in links() if x == "olbr%d" % n or x.startswith("ol%dv" % n)))
    finally:
        os.close(fd)


def test_leftovers_judge_only_the_given_lab_number():
    """A namespace of another lab number is none of this test's business."""
    free = [n for n in range(200, 255) if not any(x.startswith("ol%d-" % n) for x in netns_names())]
    mine, other = free[0], free[1]
    name = "ol%d-probe" % other
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert leftovers_of_lab(mine) == []
        assert leftovers_of_lab(other) == [name]
    finally:
        subprocess.run(["ip", "netns", "del", name])


def test_lab_demo_runs_both_lifecycles_and_cleans_up(pyz):
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
    # 7.4 by default: a live disk snapshot, a full backup and an increment of the running VM, and
    # `onevm restore` of the full one, the whole disk compared by its sha256
    for step in ("tm/eqliscsi/snap_create_live host2:", "tm/shared/prebackup_live host2:",
                 "backup/disk.0.0", "backup/disk.0.1", "tm/shared/restore host2:"):
        assert step in out, step
    assert "stand-in log): domfsfreeze one-43, domfsthaw one-43" in out
    assert re.search(r"sha256 (\w+) at backup 0, \1 after the restore: identical", out)
    assert out.rstrip().endswith("lab: all steps done")
    assert "SAN: volumes: none; iSCSI sessions: none" in out  # nothing leaked
    m = re.search(r"hosts: host1=10\.213\.(\d+)\.", out)
    assert m, out[:2000]
    assert leftovers_of_lab(int(m.group(1))) == []              # only what this lab made


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
