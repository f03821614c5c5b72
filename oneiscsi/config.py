"""The eqliscsi configuration: built-in defaults < eqliscsi.conf < datastore template < image template.

* eqliscsi.conf: `<remotes>/etc/datastore/eqliscsi/eqliscsi.conf` (ONEISCSI_EQL_CONF
  overrides the path), shell `KEY=VALUE` lines as the seed add-on's sample (quotes,
  `export`, comments; no `$` expansion). A missing file is fine.
* datastore template: every key below.
* image template: only the per-volume settings IMAGE_KEYS (an image's owner must
  not redirect the SAN login or its password file).

Secrets: a conf file holding EQL_PASS, and the files named by EQL_PASS_FILE,
EQL_KEY and EQL_CHAP_PASS_FILE, must not be readable by group or others (refused with
the path and the fix). Passwords are registered with log.secret() as soon as they are read.

The SAN credential itself (EQL_PASS, or key material in EQL_KEY) is accepted only from
the 0600 eqliscsi.conf: a datastore template is shown to every user with USE on the
datastore (`onedatastore show`) and travels on the action's argv up to 6.6, an image
template to the image's users; there it is refused with one line naming where it
belongs. File *names* (EQL_PASS_FILE, EQL_KEY as a path, EQL_CHAP_PASS_FILE) may come from
the datastore template only for files in eqliscsi.conf's own folder, and the file must be 0600
(or tighter): a datastore's manager could otherwise name any private file of oneadmin (its
one_auth) and have its first line sent, as a password, to an EQL_HOST of theirs.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import stat

from oneiscsi import log, validate
from oneiscsi.errors import Invalid

DEFAULTS = {
    "EQL_HOST": "",                 # group management address, host or host:port (SSH, default 22)
    "EQL_USER": "",                 # group CLI account
    "EQL_PASS": "",                 # its password (only in a 0600 eqliscsi.conf) ...
    "EQL_PASS_FILE": "",            # ... or a 0600 file holding it ...
    "EQL_KEY": "",                  # ... or an SSH private key file
    "EQL_KNOWN_HOSTS": "~/.ssh/known_hosts",
    "EQL_POOL": "default",
    "EQL_MULTIHOST": "enable",
    "EQL_SECURITY_ACCESS": "",      # access records; empty: volumes are created unrestricted
    "EQL_THINPROVISION": "",        # e.g. "thin-provision thin-min-reserve 50%"
    "EQL_PORTAL": "",               # iSCSI portal ip[:port]; default: EQL_HOST's address, port 3260
    "EQL_INITIATOR": "",            # the frontend's initiator name for cp/mkfs writes
    "EQL_CHAP_USER": "",
    "EQL_CHAP_PASS_FILE": "",
    "EQL_MAX_SESSIONS": "7",
    "EQL_SESSION_WAIT": "60",       # seconds to wait for a free CLI session slot
    "EQL_LOCK_WAIT": "300",         # seconds to wait for another action on the same volume
    "EQL_CLI_TIMEOUT": "60",        # seconds per CLI command
    "EQL_CLI_RETRIES": "3",         # retries of transport faults
    "EQL_STAGING_DIR": "/var/tmp",  # downloads and decompression before a copy
    "EQL_WRITE_STALL": "120",       # seconds a local image write may make no progress
    "EQL_BASE_DEVICE": "/dev/eql",
    "EQL_IFACE": "default",
    "EQL_WAIT_TIME": "1",
    "NO_ISCSI": "",
    "EQL_HOST_ACCESS": "none",      # per-host access records: none | ipaddress | initiator
}
IMAGE_KEYS = ("EQL_POOL", "EQL_MULTIHOST", "EQL_SECURITY_ACCESS", "EQL_THINPROVISION")
CONF_RELATIVE = os.path.join("etc", "datastore", "eqliscsi", "eqliscsi.conf")
INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def conf_path(remotes: str) -> str:
    return os.environ.get("ONEISCSI_EQL_CONF") or os.path.join(remotes, CONF_RELATIVE)


def parse_conf(text: str, path: str = "eqliscsi.conf") -> dict:
    """Shell `KEY=VALUE` lines -> {KEY: VALUE}; Invalid naming the line when one cannot be read."""
    values = {}
    for n, line in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(line, comments=True, posix=True)
        except ValueError as e:
            raise Invalid("%s line %d cannot be read (%s)" % (path, n, e)) from None
        if words[:1] == ["export"]:
            words = words[1:]
        if not words:
            continue
        key, sep, value = words[0].partition("=")
        if len(words) != 1 or not sep or not _KEY.match(key):
            raise Invalid("%s line %d is not KEY=VALUE (quote values holding blanks)" % (path, n))
        values[key] = value
    return values


def _private(path: str, what: str, st=None) -> None:
    st = st or os.stat(path)
    if st.st_mode & 0o044:
        raise Invalid("%s %s is readable by group or others (mode %04o) and holds a secret: "
                      "run chmod 600 %s" % (what, path, stat.S_IMODE(st.st_mode), path))


def read_secret_file(path: str, what: str) -> str:
    """The first line of a 0600 file (refused when group/others may read it)."""
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as f:
            _private(path, what, os.fstat(f.fileno()))
            value = f.readline().rstrip("\r\n")
    except OSError as e:
        raise Invalid("cannot read %s %s: %s" % (what, path, e.strerror or e)) from None
    if not value:
        raise Invalid("%s %s is empty" % (what, path))
    log.secret(value)
    return value


def load_conf(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
            st = os.fstat(f.fileno())
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise Invalid("cannot read %s: %s" % (path, e.strerror or e)) from None
    values = parse_conf(text, path)
    if values.get("EQL_PASS"):
        log.secret(values["EQL_PASS"])
        _private(path, "the configuration file", st)
    return values


def _credential_in_template(key: str, value: str, where: str, conf: str):
    """None, or the one-line refusal of a SAN credential found in a template."""
    if not (key == "EQL_PASS" or key == "EQL_KEY" and ("\n" in value or "PRIVATE KEY" in value)):
        return None
    log.secret(value)
    return Invalid("%s is refused in the %s template (every user who can read the template sees it): "
                   "put the password in %s (mode 0600) or in a 0600 file named by EQL_PASS_FILE, "
                   "a key in a 0600 file named by EQL_KEY" % (key, where, conf))


SECRET_FILE_KEYS = ("EQL_PASS_FILE", "EQL_KEY", "EQL_CHAP_PASS_FILE")


def _secret_file_in_template(key: str, value: str, conf: str):
    """None, or the refusal of a secret file named by a datastore template outside the folder
    of eqliscsi.conf (the one place the frontend's administrator keeps the SAN's secrets)."""
    if key not in SECRET_FILE_KEYS or key == "EQL_KEY" and ("\n" in value or "PRIVATE KEY" in value):
        return None
    folder = os.path.realpath(os.path.dirname(conf))
    path = os.path.realpath(os.path.expanduser(value))
    if os.path.dirname(path) == folder:
        return None
    return Invalid("%s %s is refused in the datastore template: such files must be in %s, the folder of "
                   "eqliscsi.conf (a datastore's manager could otherwise name any private file of oneadmin "
                   "and have it sent to an EQL_HOST of theirs); move the file there, or set %s in %s"
                   % (key, validate.show(value), folder, key, conf))


def _number(values, key, lo, hi) -> int:
    return validate.number(values[key].strip(), key, lo, hi)


class EqlConfig:
    """The effective eqliscsi settings of one action, validated."""

    def __init__(self, values: dict, sources: dict):
        self.values, self.sources = values, sources
        v = values
        self.pool = _pool(v["EQL_POOL"])
        multihost = v["EQL_MULTIHOST"].strip().lower() or "enable"
        if multihost not in ("enable", "disable"):
            raise Invalid("EQL_MULTIHOST %s is refused: use enable or disable" % validate.show(multihost))
        self.multihost = multihost == "enable"
        from oneiscsi.san import cli
        self.access = cli.access_records(v["EQL_SECURITY_ACCESS"])
        self.thin = cli.thin_words(v["EQL_THINPROVISION"])
        self.max_sessions = _number(v, "EQL_MAX_SESSIONS", 1, 256)
        self.session_wait = _number(v, "EQL_SESSION_WAIT", 0, 86400)
        self.lock_wait = _number(v, "EQL_LOCK_WAIT", 0, 86400)
        self.cli_timeout = _number(v, "EQL_CLI_TIMEOUT", 1, 3600)
        self.cli_retries = _number(v, "EQL_CLI_RETRIES", 0, 10)
        self.staging_dir = os.path.expanduser(v["EQL_STAGING_DIR"] or "/var/tmp")
        self.chap_user = cli.chap_user(v["EQL_CHAP_USER"], "EQL_CHAP_USER") if v["EQL_CHAP_USER"] else ""
        self._group = None
        self._chap_password = None

    def __getitem__(self, key):
        return self.values.get(key, "")

    # ---- the group (validated when first needed: stat needs none of it) ----------------
    def group(self):
        if self._group is None:
            from oneiscsi.san.client import Group
            v = self.values
            if not v["EQL_HOST"]:
                raise Invalid("EQL_HOST is not set: give the group's management address in %s or "
                              "the datastore template" % self.sources.get("conf", "eqliscsi.conf"))
            host, port = validate.portal(v["EQL_HOST"].strip(), "EQL_HOST", default_port=22)
            user = v["EQL_USER"].strip()
            if not user:
                raise Invalid("EQL_USER is not set: give the group CLI account")
            validate.reject_dangerous(user, "EQL_USER")
            if not _USER.match(user):
                raise Invalid("EQL_USER %s is refused: not an account name" % validate.show(user))
            password, key = "", ""
            if v["EQL_PASS_FILE"]:
                password = read_secret_file(v["EQL_PASS_FILE"], "EQL_PASS_FILE")
            elif v["EQL_PASS"]:
                password = v["EQL_PASS"]
                log.secret(password)
                if self.sources.get("EQL_PASS") == "conf":
                    _private(self.sources["conf"], "the configuration file")
            if v["EQL_KEY"]:
                key = os.path.expanduser(v["EQL_KEY"])
                try:
                    _private(key, "EQL_KEY", os.stat(key))
                except OSError:
                    raise Invalid("EQL_KEY %s is not a readable file" % validate.show(key)) from None
                if not os.path.isfile(key):
                    raise Invalid("EQL_KEY %s is not a readable file" % validate.show(key))
            if not password and not key:
                raise Invalid("no SAN credentials: set EQL_PASS_FILE (a 0600 file), EQL_PASS in a "
                              "0600 eqliscsi.conf, or EQL_KEY")
            self._group = Group(host, port, user, password, key, os.path.expanduser(v["EQL_KNOWN_HOSTS"]),
                                self.max_sessions, self.session_wait, self.cli_timeout, self.cli_retries)
        return self._group

    def portal(self):
        """(host, port) of the group's iSCSI portal."""
        if self.values["EQL_PORTAL"]:
            return validate.portal(self.values["EQL_PORTAL"].strip(), "EQL_PORTAL")
        return self.group().host, 3260

    def chap_password(self) -> str:
        if self._chap_password is None:
            self._chap_password = ""
            if self.chap_user:
                if not self.values["EQL_CHAP_PASS_FILE"]:
                    raise Invalid("EQL_CHAP_USER is set but EQL_CHAP_PASS_FILE is not")
                self._chap_password = read_secret_file(self.values["EQL_CHAP_PASS_FILE"], "EQL_CHAP_PASS_FILE")
        return self._chap_password

    def initiator(self) -> str:
        """The frontend's (or bridge host's) initiator name for cp/mkfs writes."""
        from oneiscsi.san import cli
        if self.values["EQL_INITIATOR"]:
            return cli.initiator(self.values["EQL_INITIATOR"].strip(), "EQL_INITIATOR")
        try:
            with open(INITIATOR_FILE, encoding="utf-8") as f:
                for line in f:
                    if line.startswith("InitiatorName="):
                        return cli.initiator(line.split("=", 1)[1].strip(), INITIATOR_FILE)
        except OSError:
            pass
        return generated_initiator()


def generated_initiator() -> str:
    host = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()).strip(".-") or "frontend"
    return "iqn.2000-01.org.opennebula.oneiscsi:" + host[:64]


def _pool(value):
    from oneiscsi.san import cli
    return cli.pool(value.strip() or "default", "EQL_POOL")


def load(remotes: str, datastore=None, image=None) -> EqlConfig:
    """Layer defaults, eqliscsi.conf, the datastore template, then IMAGE_KEYS of the image template."""
    path = conf_path(remotes)
    values, sources = dict(DEFAULTS), {"conf": path}
    for key, value in load_conf(path).items():
        if key in DEFAULTS:
            values[key], sources[key] = value, "conf"
    if datastore is not None:
        for key in DEFAULTS:
            value = datastore.tpl(key)
            if value:
                refused = (_credential_in_template(key, value, "datastore", path)
                           or _secret_file_in_template(key, value, path))
                if refused:
                    raise refused
                values[key], sources[key] = value, "datastore"
    if image is not None:
        for key in DEFAULTS:
            value = image.tpl(key)
            if not value:
                continue
            refused = _credential_in_template(key, value, "image", path)
            if refused:
                raise refused
            if key in IMAGE_KEYS:
                values[key], sources[key] = value, "image"
            else:
                log.warn("image attribute %s is ignored: set it in the datastore or %s" % (key, path))
    return EqlConfig(values, sources)
