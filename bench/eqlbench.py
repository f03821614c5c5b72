"""The environment the eqliscsi benchmarks share: a simulator on a tgtd, an installed remotes tree."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from oneiscsi.sim.eql import EqlSim  # noqa: E402
from oneiscsi.sim.tgt import Tgtd  # noqa: E402

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


class Bench:
    def __init__(self, tmp: Path, sim, tgtd, remotes: Path, env: dict):
        self.tmp, self.sim, self.tgtd, self.remotes, self.env = tmp, sim, tgtd, remotes, env


@contextlib.contextmanager
def eql_bench(prefix: str, python: str = PYTHON, tmp_dir=None, **sim_kw):
    """Build the pyz, start tgtd + EqlSim, install into a scratch remotes tree; yield a Bench."""
    pyz = TOP / "dist" / "oneiscsi.pyz"
    subprocess.run([sys.executable, str(TOP / "build.py")], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=tmp_dir) as tmp:
        tmp = Path(tmp)
        tgtd = Tgtd(str(tmp / "tgt"))
        tgtd.start()
        sim = EqlSim(str(tmp / "sim"), tgtd=tgtd, **sim_kw)
        try:
            sim.start()
            (tmp / "known_hosts").write_text(sim.host_key_line() + "\n")
            conf = tmp / "eqliscsi.conf"
            conf.write_text('EQL_HOST="127.0.0.1:%d"\nEQL_USER=grpadmin\nEQL_PASS=secret\nEQL_KNOWN_HOSTS=%s\n'
                            'EQL_PORTAL=%s\nEQL_INITIATOR=iqn.2024-01.org.oneiscsi:bench\n'
                            % (sim.port, tmp / "known_hosts", tgtd.portal))
            conf.chmod(0o600)
            remotes = tmp / "remotes"
            remotes.mkdir()
            (remotes / "VERSION").write_text("6.8.0\n")
            subprocess.run([python, str(pyz), "install", "--remotes", str(remotes), "--python", python],
                           check=True, capture_output=True)
            env = dict(os.environ, ONEISCSI_EQL_CONF=str(conf), ONEISCSI_LOCK_DIR=str(tmp / "locks"),
                       ONEISCSI_LOG=str(tmp / "log"))
            yield Bench(tmp, sim, tgtd, remotes, env)
        finally:
            sim.stop()
            tgtd.stop()
