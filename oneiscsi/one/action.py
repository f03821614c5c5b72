"""One driver action call: its arguments, inputs and outputs, as oned sends and expects them."""
from __future__ import annotations

import re
import sys

from oneiscsi import validate
from oneiscsi.errors import Failure, Invalid
from oneiscsi.one.version import Wire

TM_NAME = re.compile(r"^[a-z0-9_]{1,32}$")


def host_path(arg: str, what: str = "the HOST:PATH argument"):
    """`host:/path` -> (host, path). SOURCE values with their own `:` arrive unprefixed,
    so only use this on arguments oned builds as host:path.

    oned writes each TM call as one line of its transfer script and splits it on spaces
    (src/tm_mad/one_tm.rb `parse_script`, every release), so a SOURCE holding whitespace
    becomes two arguments and shifts the rest: a HOST:PATH argument without a host is
    reported as that, with the value, never as an empty host."""
    host, sep, path = (arg or "").partition(":")
    if not sep or not host or not path:
        raise Invalid("%s is %s, not <host>:<path>; oned builds it as host:path, so the arguments are shifted: "
                      "oned splits a TM call on spaces, and a SOURCE holding whitespace (OpenNebula 6.0.0-6.4.1 "
                      "store a DS clone reply of 'volume format' whole) becomes two arguments; check the image's "
                      "SOURCE with 'oneimage show' and re-create the image if it holds a space"
                      % (what, validate.show(arg)))
    path = re.sub(r"/+", "/", path)
    return host, path


DISK_RE = re.compile(r"/disk\.(\d+)$")


def disk_id(path: str):
    """The disk id from `<system_dir>/disk.<id>`, or None for the VM directory."""
    m = DISK_RE.search(path.rstrip("/"))
    return m.group(1) if m else None


def int_arg(value: str, what: str) -> int:
    if not re.fullmatch(r"-?\d{1,10}", value or ""):
        raise Invalid("%s must be a number, got %s; oned passes it as a number, so the arguments are shifted "
                      "(a SOURCE or path holding whitespace splits into two): check the image's SOURCE with "
                      "'oneimage show'" % (what, validate.show(value)))
    return int(value)


class Call:
    def __init__(self, kind: str, driver: str, action: str, args: list, version, argv0: str = "",
                 sys_tm: str = "", stdin=None):
        self.kind = kind            # "ds" or "tm"
        self.driver = driver
        self.action = action
        self.sys_tm = sys_tm        # from `ln.ssh`
        self.args = list(args)
        self.wire = Wire(version)
        self.argv0 = argv0
        self._stdin = stdin if stdin is not None else sys.stdin
        self._stdin_text = None
        self._ds = None
        self._one = None
        self._migrate = None

    # ---- inputs -------------------------------------------------------------
    def stdin_text(self) -> str:
        if self._stdin_text is None:
            try:
                self._stdin_text = "" if self._stdin is None or self._stdin.isatty() else self._stdin.read()
            except (OSError, ValueError):
                self._stdin_text = ""
        return self._stdin_text

    def ds(self):
        """DS_DRIVER_ACTION_DATA: argv `<b64> <id>` up to 6.6; `- <id>` with the data on stdin
        when one_datastore runs with `--stdin` (release-6.4.7, release-6.6.3
        src/datastore_mad/one_datastore.rb `do_image_action`); stdin and `<id>` from 6.8."""
        if self._ds is None:
            from oneiscsi.one import xml
            if len(self.args) >= 2 and self.args[0] != "-":
                b64, self.obj_id = self.args[0], self.args[1]
            else:
                b64 = self.stdin_text()
                self.obj_id = self.args[-1] if self.args and self.args[-1] != "-" else ""
            if not b64.strip():
                raise Failure("no DS_DRIVER_ACTION_DATA: oned sends it as the first argument (up to 6.6) or on "
                              "stdin (6.8+, or '-' as the first argument); got %d argument(s) and nothing on "
                              "stdin: run the action from oned, not by hand" % len(self.args))
            self._ds = xml.ds_input(b64)
        return self._ds

    @property
    def one(self):
        if self._one is None:
            from oneiscsi.one.rpc import One
            self._one = One()
        return self._one

    def migrate(self):
        """pre/post/failmigrate: `src dst system_dir vmid dsid [template_b64 (<=5.8)] [system_tm]`.

        Returns an object with src, dst, system_dir, vmid, dsid, vm (parsed template) and
        caller (the system TM name when called by migrate_other, else '')."""
        if self._migrate is None:
            a = self.args
            if len(a) < 5:
                raise Invalid("%s needs SRC DST SYSTEM_DIR VMID DSID, got %d argument(s) %s: run it from oned "
                              "(the VMM driver or the system TM's migrate_other)"
                              % (self.action, len(a), validate.show(" ".join(a))))
            rest = a[5:]
            template = ""
            if rest and not TM_NAME.match(rest[0]):
                template, rest = rest[0], rest[1:]          # <= 5.8: template as 6th argument
            caller = rest[0] if rest else ""
            if not template:
                template = self.stdin_text()               # 5.10+: on stdin
            from oneiscsi.one import xml
            vm = xml.vm_from_b64(template) if template.strip() else None
            self._migrate = Migrate(a[0], a[1], a[2], int_arg(a[3], "VMID"), int_arg(a[4], "DSID"),
                                    vm, caller)
        return self._migrate

    # ---- outputs --------------------------------------------------------------
    def result(self, text: str) -> None:
        """stdout carries the result only, one line (monitor: KEY=VALUE lines)."""
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()

    def cp_result(self, source: str, fmt: str = "raw") -> None:
        """cp's reply: `SOURCE FORMAT` from 6.0.0, `SOURCE` before (Wire.cp_prints_format)."""
        self.result("%s %s" % (source, fmt) if self.wire.cp_prints_format else source)

    def clone_result(self, source: str, fmt: str = "raw") -> None:
        """clone's reply: `SOURCE FORMAT` from 6.4.2; `SOURCE` alone before, since 6.0.0-6.4.1
        store the whole reply as SOURCE (Wire.clone_prints_format)."""
        self.result("%s %s" % (source, fmt) if self.wire.clone_prints_format else source)

    def __str__(self):
        return "%s/%s/%s" % ("datastore" if self.kind == "ds" else "tm", self.driver, self.action)


class Migrate:
    def __init__(self, src, dst, system_dir, vmid, dsid, vm, caller):
        self.src, self.dst, self.system_dir = src, dst, system_dir
        self.vmid, self.dsid, self.vm, self.caller = vmid, dsid, vm, caller

    def disks_of(self, drivers) -> list:
        """Every DISK element whose TM_MAD is one of `drivers` (per element, never by
        parallel arrays: disks lacking SOURCE or PERSISTENT do not shift the others)."""
        if self.vm is None:
            return []
        return [d for d in self.vm.disks if d.tm_mad in drivers]
