"""A fake oned XML-RPC endpoint for tests and the lab demo.

    oned = FakeOned(session="oneadmin:secret").start()
    oned.vms[42] = "<VM><ID>42</ID>...</VM>"        # also .images, .datastores (id -> XML)
    ... run an action with ONE_XMLRPC=oned.url ...
    assert oned.calls == [("one.vm.info", (42,)), ...]   # (method, args without the session)
    oned.stop()

Methods, with OpenNebula's response shape (docs: "the output will always consist of three
values"): ``one.vm.info``, ``one.image.info``, ``one.datastore.info`` (session, id[, decrypt])
-> ``[True, xml, 0]``, or ``[False, "[one.vm.info] Error getting virtual machine [N].", 1024]``
(NO_EXISTS); ``one.vmpool.info`` / ``one.vmpool.infoextended``, ``one.imagepool.info``,
``one.datastorepool.info`` (session, filters...) -> ``[True, "<VM_POOL>...</VM_POOL>", 0]`` with every
object (filters are recorded, not applied); ``one.system.version`` (session) -> ``[True, "6.8.0", 0]``. A wrong session gives
``[False, "[<method>] User couldn't be authenticated, aborting call.", 256]`` (AUTHENTICATION).

The fallback CLI ``oneiscsi/sim/standin/onevm`` (also ``oneimage``, ``onedatastore``) implements
``onevm show -x ID`` from the same data: the server keeps a JSON snapshot of its state in
``state_file`` (default ``<tmpdir>/oned.json``, removed by ``stop()``; ``{"session", "version", "vms", "images",
"datastores"}`` with string ids), rewritten atomically on every change of the three dicts.
The CLI finds it through ``ONEISCSI_FAKE_ONED_STATE`` (see ``env()``), checks the credentials
in ``$ONE_AUTH`` or ``~/.one/one_auth`` like the real CLI and appends each call to
``<state_file>.calls`` (one JSON list per line), read back by ``cli_calls``.
"""
from __future__ import annotations

import json
import os
import shutil
import socketserver
import tempfile
import threading
import time
from xml.sax.saxutils import escape
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

AUTHENTICATION, NO_EXISTS = 0x0100, 0x0400
KINDS = {"vm": ("vms", "virtual machine"), "image": ("images", "image"),
         "datastore": ("datastores", "datastore")}


class _Store(dict):
    """A dict that calls `changed()` after every modification."""

    def __init__(self, changed, data=()):
        super().__init__(data)
        self._changed = changed

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args):
        value = super().pop(*args)
        self._changed()
        return value

    def clear(self):
        super().clear()
        self._changed()


class _Server(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)

    def log_message(self, *args):
        pass


class FakeOned:
    def __init__(self, host="127.0.0.1", port=0, session="oneadmin:secret", version="6.8.0",
                 state_file=None):
        self.host, self.port, self.session, self.version = host, port, session, version
        self._own_dir = None if state_file else tempfile.mkdtemp(prefix="fakeoned-")
        self.state_file = state_file or os.path.join(self._own_dir, "oned.json")
        self.calls = []
        self.delay = 0.0                 # seconds added to every call (slow oned)
        self.hosts = []                  # host names served by one.hostpool.info
        self._lock = threading.Lock()
        self._server = self._thread = None
        self._vms = _Store(self._save)
        self._images = _Store(self._save)
        self._datastores = _Store(self._save)
        self._save()

    # settable dicts: assigning a plain dict keeps the JSON snapshot in sync
    def _prop(attr):
        def get(self):
            return getattr(self, attr)

        def set_(self, value):
            setattr(self, attr, _Store(self._save, value))
            self._save()
        return property(get, set_)

    vms, images, datastores = _prop("_vms"), _prop("_images"), _prop("_datastores")
    del _prop

    @property
    def url(self):
        return "http://%s:%d/RPC2" % (self.host, self.port)

    def env(self):
        """Environment for a driver process: XML-RPC endpoint and the onevm fallback's state."""
        return {"ONE_XMLRPC": self.url, "ONEISCSI_FAKE_ONED_STATE": self.state_file}

    def start(self):
        self._server = _Server((self.host, self.port), requestHandler=_Handler, allow_none=True,
                               logRequests=False)
        self.port = self._server.server_address[1]
        for kind in KINDS:
            self._server.register_function(self._info_method(kind), "one.%s.info" % kind)
        for kind in ("vm", "image", "datastore"):
            self._server.register_function(self._pool_method(kind), "one.%spool.info" % kind)
        self._server.register_function(self._pool_method("vm", "one.vmpool.infoextended"),
                                       "one.vmpool.infoextended")
        self._server.register_function(self._version, "one.system.version")
        self._server.register_function(self._hostpool, "one.hostpool.info")
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def cli_calls(self):
        """Calls made through the onevm/oneimage/onedatastore fallback: [(method, (id,)), ...]."""
        try:
            with open(self.state_file + ".calls") as f:
                return [(m, tuple(a)) for m, a in (json.loads(line) for line in f if line.strip())]
        except OSError:
            return []

    # -- internals
    def _save(self):
        data = {"session": self.session, "version": self.version,
                "vms": {str(k): v for k, v in getattr(self, "_vms", {}).items()},
                "images": {str(k): v for k, v in getattr(self, "_images", {}).items()},
                "datastores": {str(k): v for k, v in getattr(self, "_datastores", {}).items()}}
        os.makedirs(os.path.dirname(self.state_file), exist_ok=True)
        tmp = "%s.tmp%d.%d" % (self.state_file, os.getpid(), threading.get_ident())
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.chmod(tmp, 0o644)
        os.rename(tmp, self.state_file)

    def _record(self, method, args):
        with self._lock:
            self.calls.append((method, tuple(args)))
        if self.delay:
            time.sleep(self.delay)

    def _info_method(self, kind):
        attr, noun = KINDS[kind]
        method = "one.%s.info" % kind

        def info(session, oid, *rest):
            self._record(method, (oid,) + rest)
            if session != self.session:
                return [False, "[%s] User couldn't be authenticated, aborting call." % method, AUTHENTICATION]
            store = getattr(self, attr)
            xml = store.get(oid, store.get(str(oid)))
            if xml is None:
                return [False, "[%s] Error getting %s [%s]." % (method, noun, oid), NO_EXISTS]
            return [True, xml, 0]
        return info

    def _pool_method(self, kind, method=None):
        attr, _ = KINDS[kind]
        method = method or "one.%spool.info" % kind

        def info(session, *filters):
            self._record(method, filters)
            if session != self.session:
                return [False, "[%s] User couldn't be authenticated, aborting call." % method, AUTHENTICATION]
            store = getattr(self, attr)
            tag = kind.upper() + "_POOL"
            return [True, "<%s>%s</%s>" % (tag, "".join(store[k] for k in sorted(store, key=str)), tag), 0]
        return info

    def _hostpool(self, session, *filters):
        self._record("one.hostpool.info", filters)
        if session != self.session:
            return [False, "[one.hostpool.info] User couldn't be authenticated, aborting call.", AUTHENTICATION]
        body = "".join("<HOST><ID>%d</ID><NAME>%s</NAME><STATE>2</STATE><IM_MAD>kvm</IM_MAD><VM_MAD>kvm</VM_MAD>"
                       "</HOST>" % (i, escape(n)) for i, n in enumerate(self.hosts))
        return [True, "<HOST_POOL>%s</HOST_POOL>" % body, 0]

    def _version(self, session):
        self._record("one.system.version", ())
        if session != self.session:
            return [False, "[one.system.version] User couldn't be authenticated, aborting call.",
                    AUTHENTICATION]
        return [True, self.version, 0]
