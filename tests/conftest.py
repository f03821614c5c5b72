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
