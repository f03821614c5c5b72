"""OpenNebula objects from their XML (DS_DRIVER_ACTION_DATA, `onevm show -x`, XML-RPC).

Only this module imports lxml, and only when some XML has to be read.
"""
from __future__ import annotations

import base64
import binascii

from lxml import etree

from oneiscsi.errors import Failure

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def parse(text) -> "etree._Element":
    if isinstance(text, str):
        text = text.encode("utf-8")
    try:
        return etree.fromstring(text, _PARSER)
    except etree.XMLSyntaxError as e:
        raise Failure("cannot parse the XML sent by oned: %s" % e) from None


def parse_b64(data: str) -> "etree._Element":
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Failure("the data from oned is not base64 (got %r...): the action was not called by oned, or "
                      "with arguments of another OpenNebula version" % data.strip()[:20]) from None
    return parse(raw)


class Obj:
    """A thin reader over one XML element: `obj["TEMPLATE/ISCSI_HOST"]` is '' when absent."""

    def __init__(self, el):
        self.el = el

    def __getitem__(self, path: str) -> str:
        found = self.el.find(path)
        if found is None or found.text is None:
            return ""
        return found.text.strip()

    def has(self, path: str) -> bool:
        return self.el.find(path) is not None

    def tpl(self, name: str) -> str:
        return self["TEMPLATE/" + name]

    @property
    def id(self) -> str:
        return self["ID"]

    @property
    def name(self) -> str:
        return self["NAME"]

    def xml(self) -> str:
        return etree.tostring(self.el, encoding="unicode")


class Image(Obj):
    @property
    def persistent(self) -> bool:
        return self["PERSISTENT"] in ("1", "YES", "yes")

    @property
    def size_mb(self) -> int:
        try:
            return int(float(self["SIZE"] or 0))
        except ValueError:
            return 0

    @property
    def fs(self) -> str:
        # 6.0+: FS (and FORMAT); up to 5.12: FSTYPE
        return self["FS"] or self["FSTYPE"] or self.tpl("FS") or self.tpl("FSTYPE")

    @property
    def format(self) -> str:
        return self["FORMAT"] or self.tpl("FORMAT") or self.tpl("DRIVER")


class Datastore(Obj):
    pass


class Disk(Obj):
    @property
    def disk_id(self) -> str:
        return self["DISK_ID"]

    @property
    def persistent(self) -> bool:
        return self["PERSISTENT"].upper() == "YES"

    @property
    def tm_mad(self) -> str:
        return self["TM_MAD"]


class VM(Obj):
    @property
    def disks(self) -> list:
        return [Disk(d) for d in self.el.findall("TEMPLATE/DISK")]

    def disk(self, disk_id: str):
        for d in self.disks:
            if d.disk_id == str(disk_id):
                return d
        return None

    @property
    def lcm_state(self) -> int:
        try:
            return int(self["LCM_STATE"])
        except ValueError:
            return -1

    @property
    def state(self) -> int:
        try:
            return int(self["STATE"])
        except ValueError:
            return -1

    @property
    def history(self) -> list:
        return [Obj(h) for h in self.el.findall("HISTORY_RECORDS/HISTORY")]

    @property
    def host(self) -> str:
        h = self.history
        return h[-1]["HOSTNAME"] if h else ""

    @property
    def prev_host(self) -> str:
        h = self.history
        return h[-2]["HOSTNAME"] if len(h) > 1 else ""


class DsInput:
    """DS_DRIVER_ACTION_DATA: the image (absent for MONITOR) and the datastore."""

    def __init__(self, root):
        self.root = root
        img = root.find("IMAGE")
        ds = root.find("DATASTORE")
        self.image = Image(img) if img is not None else Image(etree.Element("IMAGE"))
        self.datastore = Datastore(ds) if ds is not None else Datastore(etree.Element("DATASTORE"))

    def __getitem__(self, path):
        return Obj(self.root)[path]


def ds_input(b64: str) -> DsInput:
    root = parse_b64(b64)
    if root.tag != "DS_DRIVER_ACTION_DATA":
        raise Failure("expected DS_DRIVER_ACTION_DATA from oned, got <%s>" % root.tag)
    return DsInput(root)


def vm_from_b64(b64: str) -> VM:
    root = parse_b64(b64)
    if root.tag != "VM":
        raise Failure("expected a VM template from oned, got <%s>" % root.tag)
    return VM(root)


def vm(text: str) -> VM:
    return VM(parse(text))


def image(text: str) -> Image:
    return Image(parse(text))


def datastore(text: str) -> Datastore:
    return Datastore(parse(text))
