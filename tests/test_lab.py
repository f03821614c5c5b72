"""The README's demo command runs to the end and leaves nothing behind."""
import subprocess

import pytest

from tests import oneutil

pytestmark = pytest.mark.needs_root


def netns():
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def test_lab_demo_runs_the_iscsi_lifecycle_and_cleans_up(pyz):
    before = netns()
    res = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "lab"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    out = res.stdout
    for step in ("datastore/iscsi/cp 5", "tm/iscsi/ln", "tm/iscsi/premigrate host1 host2", "tm/iscsi/mvds",
                 "datastore/iscsi/rm 5", "lab: all steps done"):
        assert step in out
    assert "read 'written on host1 by VM 42'" in out  # the data crossed the live migration
    assert "host host1: QEMU on host1 has no iSCSI" in out  # the refused migration
    assert netns() - before == set()
