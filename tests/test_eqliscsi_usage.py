"""Who uses a volume where (usage.py) and what reconcile needs, from VM XML made by oned's rules
(oneiscsi.sim.onemodel): no lab needed."""
from __future__ import annotations

import pytest

from oneiscsi.drivers.eqliscsi import reconcile, usage
from oneiscsi.one import xml
from oneiscsi.sim import onemodel
from oneiscsi.sim.onemodel import CDROM, Img


class _Oned:
    def __init__(self):
        self.vms, self.images, self.datastores = {}, {}, {}


def _vm(version=(6, 8), disks=None, hosts=("h1",), lcm=3, state=3):
    cloud = onemodel.Cloud(_Oned(), version=version)
    img = Img(5, "MyVol", "MyVol.5", persistent=True)
    cloud.image(img)
    return xml.vm(cloud.vm(42, disks or [(0, img)], hosts=hosts, lcm_state=lcm, state=state))


@pytest.mark.parametrize("state,lcm,hosts,where", [
    (3, 3, ("h1", "h2"), {"h2"}),            # RUNNING: the current host
    (3, 4, ("h1", "h2"), {"h1", "h2"}),      # MIGRATE: both
    (3, 8, ("h1", "h2"), {"h1", "h2"}),      # PROLOG_MIGRATE
    (3, 11, ("h1",), set()),                 # EPILOG: leaving, its own delete releases
    (3, 17, ("h1",), {"h1"}),                # HOTPLUG
    (8, 0, ("h1",), {"h1"}),                 # POWEROFF: disks stay linked
    (5, 0, ("h1",), {"h1"}),                 # SUSPENDED
    (9, 0, ("h1",), set()),                  # UNDEPLOYED
    (4, 0, ("h1",), set()),                  # STOPPED
])
def test_where_a_vm_holds_its_sessions(state, lcm, hosts, where):
    assert usage.vm_hosts(_vm(hosts=hosts, lcm=lcm, state=state)) == where


def test_reconcile_compares_names_as_the_group_does():
    """A SOURCE written with capitals (the seed's forms) is the volume whose IQN the group
    lowercases: not stray on its own host."""
    need = reconcile.needed([_vm()])
    iqn = "iqn.2001-05.com.equallogic:0-8a0906-83aa4b16d-cea01f86bef82aeb-myvol.5"
    assert "h1" in need[reconcile._volume_of(iqn).lower()]


def test_a_non_persistent_disk_needs_its_clone_not_the_image():
    img = Img(7, "base", "base.7", persistent=False)
    vm = _vm(disks=[(0, img, {"PERSISTENT": "YES"})])
    need = reconcile.needed([vm])
    assert "base.7-42" in need and "base.7" not in need


@pytest.mark.parametrize("version", [(4, 14), (5, 12), (6, 8), (7, 0)])
def test_the_five_rows_of_image_disk_attribute(version):
    """opennebula-semantics.md section 1, per version (4.14: IMMUTABLE is persistent)."""
    rows = [(Img(1, "p", "p.1"), ("NO", "YES", "YES")),
            (Img(2, "s", "s.2", ptype="SHAREABLE"), ("NO", "YES", "YES")),
            (Img(3, "i", "i.3", ptype="IMMUTABLE"), ("NO", "NO", "YES" if version < (5, 0) else "")),
            (Img(4, "c", "c.4", persistent=False, itype=CDROM), ("NO", "NO", "")),
            (Img(6, "n", "n.6", persistent=False), ("YES", "NO", "USER"))]
    for img, (clone, save, pers) in rows:
        d = onemodel.disk_attribute(img, 0, {"PERSISTENT": "USER"}, version)
        assert (d["CLONE"], d["SAVE"]) == (clone, save), (img.name, d)
        assert d.get("PERSISTENT", "USER") == (pers or "USER"), (img.name, d)
        if img.ptype == "IMMUTABLE" or img.itype == CDROM:
            assert d["READONLY"] == "YES"
    assert onemodel.disk_attribute(rows[1][0], 0, {}, version).get("SHAREABLE") == \
        ("YES" if version >= (5, 0) else None)
