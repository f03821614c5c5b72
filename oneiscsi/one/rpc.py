"""Reading VM, image and datastore XML from oned (TM actions get no template).

XML-RPC first (endpoint from ONE_XMLRPC, else oned.conf's PORT on localhost;
credentials from ONE_AUTH or ~/.one/one_auth). Only when the endpoint cannot be
reached at all do we fall back to the `onevm/oneimage/onedatastore show -x`
CLI. Each object is read once per action (cached here).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import xmlrpc.client

from oneiscsi import log
from oneiscsi.errors import Failure

TIMEOUT = 30


def _endpoint() -> str:
    url = os.environ.get("ONE_XMLRPC")
    if url:
        if not re.match(r"https?://[^/\s]+", url):
            raise Failure("ONE_XMLRPC=%r is not an http(s) URL: set it like http://localhost:2633/RPC2" % url[:80])
        return url
    port = "2633"
    loc = os.environ.get("ONE_LOCATION")
    conf = os.path.join(loc, "etc", "oned.conf") if loc else "/etc/one/oned.conf"
    try:
        with open(conf, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = re.match(r"\s*PORT\s*=\s*\"?(\d+)", line)
                if m:
                    port = m.group(1)
                    break
    except OSError:
        pass
    return "http://localhost:%s/RPC2" % port


def _session() -> str:
    path = os.environ.get("ONE_AUTH") or os.path.expanduser("~/.one/one_auth")
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as e:
        raise Failure("cannot read the OpenNebula credentials in %s (%s): TM actions read the VM from oned; "
                      "give oneadmin a readable %s holding user:password, or set ONE_AUTH to such a file"
                      % (path, e.strerror, path)) from None
    if ":" not in token:
        raise Failure("the OpenNebula credentials in %s are not user:password (its first line has no ':'): "
                      "write one line user:password there" % path)
    log.secret(token.split(":", 1)[1])
    return token


class _Transport(xmlrpc.client.Transport):
    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = TIMEOUT
        return conn


class One:
    CLI = {"vm": "onevm", "image": "oneimage", "datastore": "onedatastore"}

    def __init__(self):
        self._cache = {}
        self._proxy = None
        self._unreachable = False

    def _rpc(self, kind: str, oid: int) -> str:
        if self._proxy is None:
            url = _endpoint()
            transport = _Transport() if url.startswith("http:") else None
            self._proxy = (xmlrpc.client.ServerProxy(url, transport=transport, allow_none=True), url)
        proxy, url = self._proxy
        method = getattr(getattr(proxy, "one"), kind)
        try:
            reply = method.info(_session(), oid)
        except (OSError, socket.timeout, xmlrpc.client.ProtocolError) as e:
            log.warn("oned XML-RPC at %s unreachable (%s); falling back to the CLI" % (url, e))
            self._unreachable = True
            return self._cli(kind, oid)
        ok, body = reply[0], reply[1]
        if not ok:
            raise Failure("oned refused one.%s.info %s: %s (check that the user in ONE_AUTH may read %s %s)"
                          % (kind, oid, body, kind, oid))
        return body

    def _cli(self, kind: str, oid: int) -> str:
        cmd = [self.CLI[kind], "show", "-x", str(oid)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Failure("cannot read %s %s from oned: XML-RPC unreachable and %s failed (%s); set ONE_XMLRPC to "
                          "oned's endpoint (PORT in oned.conf)" % (kind, oid, cmd[0], e)) from None
        if res.returncode != 0:
            raise Failure("%s show -x %s failed: %s" % (cmd[0], oid, res.stderr.strip()[:300]))
        return res.stdout

    def get(self, kind: str, oid) -> str:
        oid = int(oid)
        key = (kind, oid)
        if key not in self._cache:
            self._cache[key] = self._cli(kind, oid) if self._unreachable else self._rpc(kind, oid)
        return self._cache[key]

    POOL_FILTER = {"datastore": (), "image": (-2, -1, -1), "vm": (-2, -1, -1, -1)}

    def pool(self, kind: str) -> list:
        """All objects of a pool over XML-RPC only (no CLI fallback): [VM | Image | Datastore].
        VMs come from infoextended (with their templates) where oned has it (5.8+)."""
        from oneiscsi.one import xml
        url = _endpoint()
        proxy = xmlrpc.client.ServerProxy(url, transport=_Transport() if url.startswith("http:") else None)
        pool = getattr(getattr(proxy, "one"), kind + "pool")
        reply = None
        for method in (("infoextended", "info") if kind == "vm" else ("info",)):
            try:
                reply = getattr(pool, method)(_session(), *self.POOL_FILTER[kind])
                break
            except xmlrpc.client.Fault:  # no such method in this oned
                continue
            except (OSError, socket.timeout, xmlrpc.client.Error) as e:
                raise Failure("oned XML-RPC at %s: %s; set ONE_XMLRPC to oned's endpoint (PORT in oned.conf)"
                          % (url, e)) from None
        if not reply or not reply[0]:
            raise Failure("oned refused one.%spool.info: %s" % (kind, reply[1] if reply else "no answer"))
        cls = {"vm": xml.VM, "image": xml.Image, "datastore": xml.Datastore}[kind]
        return [cls(el) for el in xml.parse(reply[1]).findall(kind.upper())]

    def host_names(self) -> list:
        """Names of every host in oned's host pool (one.hostpool.info, XML-RPC only)."""
        from oneiscsi.one import xml
        url = _endpoint()
        proxy = xmlrpc.client.ServerProxy(url, transport=_Transport() if url.startswith("http:") else None)
        try:
            reply = proxy.one.hostpool.info(_session())
        except (OSError, socket.timeout, xmlrpc.client.Error) as e:
            raise Failure("oned XML-RPC at %s: %s" % (url, e)) from None
        if not reply or not reply[0]:
            raise Failure("oned refused one.hostpool.info: %s" % (reply[1] if reply else "no answer"))
        return [(h.findtext("NAME") or "").strip() for h in xml.parse(reply[1]).findall("HOST")
                if (h.findtext("NAME") or "").strip()]

    def vm(self, vmid):
        from oneiscsi.one import xml
        return xml.vm(self.get("vm", vmid))

    def image(self, iid):
        from oneiscsi.one import xml
        return xml.image(self.get("image", iid))

    def datastore(self, dsid):
        from oneiscsi.one import xml
        return xml.datastore(self.get("datastore", dsid))
