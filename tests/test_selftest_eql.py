"""--selftest, EqualLogic side: the frontend's group checks against the simulator, the host checks."""
import json
import os
import subprocess

import pytest

from tests import oneutil
from tests.test_eqliscsi_ds import lab, sim_host_key  # noqa: F401  (fixtures)

pytestmark = pytest.mark.needs_root


def selftest(lab, *args):
    env = dict(os.environ, **lab.env())
    env.pop("ONE_XMLRPC", None)
    res = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "--selftest", "--json", "--driver", "eqliscsi", *args],
                         capture_output=True, text=True, env=env, timeout=120)
    rows = json.loads(res.stdout)
    return res.returncode, {r["check"]: r for r in rows if r["host"] == "frontend"}, rows


def test_group_reachable_login_and_pool(pyz, lab):
    rc, front, rows = selftest(lab)
    name = "group 127.0.0.1:%d" % lab.sim.port
    assert front[name + " host key"]["status"] == "PASS"
    assert front[name + " login"]["status"] == "PASS"
    assert front["pool default"]["status"] == "PASS" and "MB free" in front["pool default"]["detail"]
    # the local machine's open-iscsi rows are there too, each with a status
    assert {"iscsiadm", "iscsid", "node.startup", "udev rules", "chap"} <= {r["check"] for r in rows}
    assert rc == (0 if all(r["status"] == "PASS" for r in rows) else 1)


def test_unknown_host_key_and_missing_pool_fail_with_fix(pyz, lab, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    lab.conf(EQL_KNOWN_HOSTS=str(empty))
    rc, front, _ = selftest(lab)
    row = front["group 127.0.0.1:%d host key" % lab.sim.port]
    assert rc == 1 and row["status"] == "FAIL" and "ssh-keyscan" in row["detail"] + row["fix"]
    lab.conf(EQL_POOL="nosuchpool")
    rc, front, _ = selftest(lab)
    assert rc == 1 and front["pool nosuchpool"]["status"] == "FAIL"
    assert "secret" not in json.dumps(front)  # the SAN password appears nowhere


def test_host_checks_over_ssh_on_a_standin_host(pyz, tmp_path):
    from oneiscsi.sim.hosts import Lab
    with Lab(str(tmp_path / "lab"), hosts=("host1",), san=False) as hl:
        env = dict(os.environ, ONEISCSI_SSH="ssh -F %s" % hl.ssh_config)
        env.pop("ONE_XMLRPC", None)
        res = subprocess.run([oneutil.PYTHON, str(oneutil.PYZ), "--selftest", "--driver", "eqliscsi",
                              "--portal", "%s:1" % hl.frontend_addr, "host1"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1
    lines = {ln.split()[1]: ln for ln in res.stdout.splitlines()[1:] if ln.startswith("host1")}
    assert "PASS" in lines["iscsiadm"]          # the stand-in is first in oneadmin's PATH
    assert "FAIL" in lines["portal"] and "fix:" in lines["portal"]
    assert "PASS" in lines["qemu-iscsi"]        # backups and restores read/write through libiscsi
