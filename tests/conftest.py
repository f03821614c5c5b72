import os

import pytest

from tests import oneutil


@pytest.fixture(scope="session")
def pyz():
    return oneutil.build_if_stale()


@pytest.fixture
def logfile(tmp_path, monkeypatch):
    path = tmp_path / "oneiscsi.log"
    monkeypatch.setenv("ONEISCSI_LOG", str(path))
    return path


@pytest.fixture
def oned(tmp_path):
    """A FakeOned for one test; `oned.env` reaches it (ONE_XMLRPC, ONE_AUTH)."""
    from oneiscsi.sim.oned import FakeOned
    o = FakeOned(session="oneadmin:pw")
    o.start()
    auth = tmp_path / "one_auth"
    auth.write_text("oneadmin:pw\n")
    o.env = {"ONE_XMLRPC": o.url, "ONE_AUTH": str(auth)}
    try:
        yield o
    finally:
        o.stop()


@pytest.fixture
def remotes_factory(pyz, tmp_path):
    """remotes_factory(version) -> an installed remotes tree for that OpenNebula version."""
    made = {}

    def make(version="6.8", extra=()):
        key = (version, tuple(extra))
        if key not in made:
            r = tmp_path / ("remotes-%s-%d" % (version, len(made)))
            oneutil.install(r, version, extra)
            made[key] = r
        return made[key]
    return make


@pytest.fixture
def remotes(remotes_factory):
    return remotes_factory("6.8")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (network namespaces, tgtd)")
        for item in items:
            if "needs_root" in item.keywords:
                item.add_marker(skip)
