"""From how we were called to what we do, and the one error boundary.

The name we were called by is never resolved through symlinks: the action is in
the link's own path (`.../tm/<driver>/<action>[.<system_tm>]`). Install may put a
tiny launcher in between (see install.py); it passes that path in ONEISCSI_ARGV0.
"""
from __future__ import annotations

import importlib
import os
import sys

from oneiscsi import log
from oneiscsi.errors import Failure, NotSupported, UsageError

# driver -> (module with DS actions, module with TM actions)
DRIVERS = {
    "iscsi": ("oneiscsi.drivers.iscsi", "oneiscsi.drivers.iscsi"),
    "iscsi_libvirt": ("oneiscsi.drivers.iscsi", "oneiscsi.drivers.iscsi"),
    "eqliscsi": ("oneiscsi.drivers.eqliscsi.ds", "oneiscsi.drivers.eqliscsi.tm"),
}
# Every action name oned (4.4 to 7.x) may run; a driver answers "not supported" for the rest.
DS_ACTIONS = ("cp", "clone", "mkfs", "rm", "stat", "monitor", "snap_delete", "snap_revert",
              "snap_flatten", "export", "restore", "increment_flatten")
TM_ACTIONS = ("clone", "ln", "mv", "mvds", "cpds", "delete", "premigrate", "postmigrate",
              "failmigrate", "resize", "snap_create", "snap_create_live", "snap_delete",
              "snap_revert", "context", "mkimage", "mkswap", "monitor")
MIGRATE = ("premigrate", "postmigrate", "failmigrate")
# the system TM's backup scripts, wrapped by install (drivers/backup.py)
BACKUP = ("prebackup", "prebackup_live", "postbackup", "postbackup_live", "restore")
OPERATOR = {
    "--version": ("oneiscsi.dispatch", "print_version"),
    "help": ("oneiscsi.dispatch", "print_help"),
    "--selftest": ("oneiscsi.selftest", "main"),
    "install": ("oneiscsi.install", "install_main"),
    "uninstall": ("oneiscsi.install", "uninstall_main"),
    "lab": ("oneiscsi.lab", "main"),
    "secret": ("oneiscsi.libvirt", "secret_main"),
    "disk-xml": ("oneiscsi.libvirt", "disk_xml_main"),
    "reconcile": ("oneiscsi.drivers.eqliscsi.reconcile", "main"),
}
LAUNCHERS = ("oneiscsi", "oneiscsi.pyz", "__main__.py")
# What `--help` shows: every command, in the order an operator meets them.
COMMANDS = (
    ("install", "put the drivers into an OpenNebula remotes tree, print the oned.conf entries"),
    ("uninstall", "take them out again and restore what install replaced"),
    ("--selftest", "check this host (or HOSTs over ssh) for what the drivers it serves need"),
    ("secret", "define the libvirt CHAP secret of an iscsi datastore on hosts (password on stdin)"),
    ("disk-xml", "print the libvirt disk XML oned writes for an iSCSI disk"),
    ("reconcile", "list (--fix: clean up) eqliscsi sessions and access records no VM needs"),
    ("lab", "the end-to-end demo on this machine (root; loopback and namespaces only)"),
    ("ds", "ds <driver> <action> ARGS...: run a datastore action by hand, as oned would"),
    ("tm", "tm <driver> <action> ARGS...: run a transfer action by hand, as oned would"),
    ("--version", "print the version, the commit and the running Python"),
    ("help", "this text (also -h, --help); `<command> --help` for a command's options"),
)
HELP_WORDS = ("-h", "--help", "help")

UNDERSTOOD = ("understood: <remotes>/datastore/{iscsi,iscsi_libvirt,eqliscsi}/<action>, "
              "<remotes>/tm/<driver>/<action>[.<system_tm>], tm/<system_tm>/{pre,post,fail}migrate "
              "(legacy wrapper), tm/<system_tm>/{pre,post}backup[_live] and restore (backup wrappers), ds-<action>, tm-<action>, 'oneiscsi.pyz ds|tm <driver> <action> ARGS', "
              "and 'oneiscsi.pyz --version|--selftest|install|uninstall|lab|secret|disk-xml|reconcile'")


class Route:
    def __init__(self, kind, driver, action, args, sys_tm="", wrapper=False):
        self.kind, self.driver, self.action, self.args = kind, driver, action, args
        self.sys_tm, self.wrapper = sys_tm, wrapper


def resolve(argv0: str, args: list):
    """-> Route for driver actions, or ("op", name, args) for operator commands."""
    path = argv0.replace("\\", "/")
    base = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(path))
    grand = os.path.basename(os.path.dirname(os.path.dirname(path)))

    if grand in ("datastore", "tm") and parent in DRIVERS:
        action, _, suffix = base.partition(".")
        kind = "ds" if grand == "datastore" else "tm"
        if action not in (DS_ACTIONS if kind == "ds" else TM_ACTIONS):
            raise UsageError("unknown %s action %r for driver %s; %s" % (grand, base, parent, UNDERSTOOD))
        return Route(kind, parent, action, args, sys_tm=suffix if kind == "tm" else "")
    if grand == "tm" and (base in MIGRATE or base in BACKUP):
        return Route("tm", parent, base, args, wrapper=True)
    for prefix, kind, known in (("ds-", "ds", DS_ACTIONS), ("tm-", "tm", TM_ACTIONS)):
        if base.startswith(prefix) and base[3:].partition(".")[0] in known:
            action, _, suffix = base[3:].partition(".")
            driver = ""
            if len(args) >= 2 and args[0] == "--driver":
                driver, args = args[1], args[2:]
                if driver not in DRIVERS:
                    raise UsageError("unknown driver %r; known: %s" % (driver, ", ".join(DRIVERS)))
            return Route(kind, driver, action, args, sys_tm=suffix)
    if base in LAUNCHERS or base.endswith(".pyz"):
        if not args:
            raise UsageError("usage: %s <command> [ARGS...]; `%s --help` lists the commands" % (base, base))
        if args[0] in HELP_WORDS:
            if args[1:2] and args[1] in OPERATOR:  # help install == install --help
                return ("op", args[1], ["--help"])
            return ("op", "help", args[1:2])
        if args[0] in ("ds", "tm"):
            if len(args) >= 2 and args[1] in HELP_WORDS or len(args) == 2 and args[1] in DRIVERS:
                return ("op", "help", [args[0]])
            if len(args) < 3:
                raise UsageError("usage: %s %s <driver> <action> ARGS...; `%s %s --help` lists drivers and actions"
                                 % (base, args[0], base, args[0]))
            kind, driver, action = args[0], args[1], args[2]
            action, _, suffix = action.partition(".")
            if driver not in DRIVERS:
                raise UsageError("unknown driver %r; known: %s" % (driver, ", ".join(DRIVERS)))
            if action not in (DS_ACTIONS if kind == "ds" else TM_ACTIONS):
                raise UsageError("unknown %s action %r; known: %s" % (kind, action, ", ".join(
                    DS_ACTIONS if kind == "ds" else TM_ACTIONS)))
            return Route(kind, driver, action, args[3:], sys_tm=suffix)
        if args[0] in OPERATOR:
            return ("op", args[0], args[1:])
    raise UsageError("cannot tell what to do as %r %s; %s" % (base, " ".join(args[:1]), UNDERSTOOD))


def actions_of(kind: str, driver: str) -> dict:
    module = DRIVERS[driver][0 if kind == "ds" else 1]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("oneiscsi"):
            raise Failure("driver %s is not available in this build of oneiscsi" % driver) from None
        raise
    return getattr(mod, "DS" if kind == "ds" else "TM")


def run_route(route: Route, argv0: str, version) -> int:
    from oneiscsi.one.action import Call
    call = Call(route.kind, route.driver, route.action, route.args, version, argv0=argv0, sys_tm=route.sys_tm)
    log.configure(str(call) if route.driver else "%s/%s" % (route.kind, route.action), call.wire.stderr_logs)
    if route.wrapper and route.action in BACKUP:
        from oneiscsi.drivers import backup
        return backup.run(call, route.driver)
    if route.wrapper:
        from oneiscsi.drivers import wrapper
        return wrapper.run(call, route.driver)
    if not route.driver:
        from oneiscsi.drivers import flat
        return flat.run(call)
    return run_call(call)


def run_call(call) -> int:
    table = actions_of(call.kind, call.driver)
    fn = table.get(call.action)
    if fn is None:
        raise NotSupported("%s: %s is not supported by the %s driver" % (call.action, call.action, call.driver))
    log.debug("start %s %s" % (call, " ".join(call.args)))
    rc = fn(call)
    return 0 if rc is None else int(rc)


def print_help(args) -> int:
    base = "oneiscsi.pyz"
    args = [a for a in args if a not in HELP_WORDS]
    if args and args[0] in ("ds", "tm"):
        kind = args[0]
        print("usage: %s %s <driver> <action> ARGS...\n\ndrivers: %s\nactions: %s\n\nThe arguments are oned's "
              "(see the OpenNebula storage driver documentation); installed actions get them from oned." % (
                  base, kind, ", ".join(DRIVERS), ", ".join(DS_ACTIONS if kind == "ds" else TM_ACTIONS)))
        return 0
    if args:
        raise UsageError("help: unknown command %r; `%s --help` lists the commands" % (args[0], base))
    width = max(len(c) for c, _ in COMMANDS)
    print("oneiscsi: OpenNebula storage drivers for iSCSI (iscsi, iscsi_libvirt) and Dell EqualLogic (eqliscsi)\n")
    print("usage: %s <command> [ARGS...]\n\ncommands:" % base)
    for name, what in COMMANDS:
        print("  %-*s  %s" % (width, name, what))
    print("\nInstalled, the same file runs as the driver actions: <remotes>/datastore/<driver>/<action> and\n"
          "<remotes>/tm/<driver>/<action> (links made by install), or ds-<action> / tm-<action>.")
    return 0


def print_version(args) -> int:
    import oneiscsi
    if args[:1] in (["-h"], ["--help"]):
        print("usage: oneiscsi.pyz --version\n\nPrints the version, the commit it was built from and the Python running it.")
        return 0
    print("oneiscsi %s (%s) python %d.%d" % (oneiscsi.__version__, oneiscsi.__commit__, *sys.version_info[:2]))
    return 0


def report_failure(message: str, wire) -> None:
    message = " ".join(log.mask(str(message)).split()) or "failed"
    # oned drops an error text that starts with '-' (ImageManager::_cp and the others:
    # `info[0] != '-'`), and 7.x files a `LEVEL:` line as a log line, not as the error
    # (DriverExecHelper#get_info_from_execution): never start the error that way.
    if message.startswith("-") or message.split(":", 1)[0] in ("ERROR", "INFO", "WARN", "DEBUG"):
        message = "oneiscsi: " + message
    log.to_file("ERROR", message)
    if wire is not None and wire.error_block:
        sys.stderr.write("ERROR MESSAGE --8<------\n%s\nERROR MESSAGE ------>8--\n" % message)
    else:
        sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _usage_error(parser, message):
    raise UsageError("%s: %s; see `%s --help`" % (parser.prog, message, parser.prog))


def _bug_details(e: BaseException) -> str:
    """Where the traceback of an unexpected error went: the log file, else a private file."""
    if log.logfile_path() == "-":
        return "run with ONEISCSI_LOG set to a file for the traceback"
    if log._logfile() is not None:
        log.exception(e)
        return "details in %s" % log.logfile_path()
    import tempfile
    import traceback
    try:
        fd, path = tempfile.mkstemp(prefix="oneiscsi-error-", suffix=".log")  # 0600
        with os.fdopen(fd, "w") as f:
            f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    except OSError:
        return "the log file %s cannot be written either: run with ONEISCSI_LOG=FILE" % log.logfile_path()
    return "details in %s (the log file %s cannot be written)" % (path, log.logfile_path())


def _terminated(signum, frame):
    raise Failure("terminated by signal %d (oned's driver timeout?); cleanup done" % signum)


def main(argv: list) -> int:
    argv0 = os.environ.pop("ONEISCSI_ARGV0", "") or argv[0]
    wire = None
    import signal
    signal.signal(signal.SIGTERM, _terminated)  # unwind: finally blocks undo half-done work
    try:
        route = resolve(argv0, argv[1:])
        if isinstance(route, tuple):
            _, name, args = route
            log.configure("oneiscsi " + name)
            import argparse
            argparse.ArgumentParser.error = _usage_error  # every command: one line, exit 2
            module, func = OPERATOR[name]
            return int(getattr(importlib.import_module(module), func)(args) or 0)
        from oneiscsi.one.version import Wire, detect, remotes_dir
        version = detect(remotes_dir(argv0))
        wire = Wire(version)
        return run_route(route, argv0, version)
    except UsageError as e:
        sys.stderr.write("oneiscsi: %s\n" % log.mask(str(e)))
        return 2
    except Failure as e:
        report_failure(str(e), wire)
        return e.exit_code
    except KeyboardInterrupt:
        report_failure("interrupted", wire)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # the error boundary: never a traceback on stderr
        report_failure("internal error (%s: %s); %s" % (type(e).__name__, e, _bug_details(e)), wire)
        return 1
