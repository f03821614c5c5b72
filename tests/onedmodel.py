"""What oned does with a driver's reply, per OpenNebula version: a model of oned's side.

This is the maintainers' reference for "what does release X expect from action Y".
Every rule names where it comes from in OpenNebula's source (repository
OpenNebula/one, `git show <tag>:<path>`), as file, function and release tag. The
tests (tests/test_oned_model.py) run the built driver through its installed links and
feed the real stdout/stderr/exit code through this model for every version shape, so
a reply oned would misread fails a test. The model is written from OpenNebula's
source, not from the driver: change it only with a source line.

Abbreviations used in the rule docstrings:
  CM   = src/mad/ruby/CommandManager.rb
  DEH  = src/mad/ruby/DriverExecHelper.rb
  ODS  = src/datastore_mad/one_datastore.rb
  OTM  = src/tm_mad/one_tm.rb
  IMD  = src/image/ImageManagerDriver.cc          (4.x, 5.x: the oned side of DS replies)
  IMP  = src/image/ImageManagerProtocol.cc        (6.0.0+: the oned side of DS replies)
  MSG  = include/Message.h `Message::parse_from`  (6.0.0+: how oned splits a driver line)
  TMD  = src/tm/TransferManagerDriver.cc          (4.x, 5.x)
  TMP  = src/tm/TransferManagerProtocol.cc        (6.0.0+)
  RMA  = src/rm/RequestManagerAllocate.cc (up to 6.10), src/rm/api/ImageAPI.cc (7.x)
  SC   = src/mad/sh/scripts_common.sh
  LIBFS= src/datastore_mad/remotes/libfs.sh

Tags read: release-4.14.2, release-5.12.13, release-6.0.0, release-6.0.2,
release-6.0.3, release-6.4.1, release-6.4.2, release-6.4.7, release-6.6.3,
release-6.8.0, release-6.8.3, release-6.10.5, release-7.0.0, release-7.4.0.

Version shapes (the rules change only at these points):

  shape          error text oned keeps (stderr)              cp reply         clone reply            DS input
  4.x            ERROR MESSAGE block only                    SOURCE (1st word) SOURCE (1st word)     argv b64 id
  5.x            ERROR MESSAGE block only                    SOURCE (1st word) SOURCE (1st word)     argv b64 id
  6.0.0-6.0.2    ERROR MESSAGE block only                    SOURCE FORMAT     whole line = SOURCE   argv b64 id
  6.0.3-6.4.1    whole stderr, newlines -> spaces            SOURCE FORMAT     whole line = SOURCE   argv b64 id
  6.4.2-6.10     whole stderr, newlines -> spaces            SOURCE FORMAT     SOURCE [FORMAT]       argv (6.4.7/6.6 `-i`: `- id` + stdin), stdin from 6.8
  7.x            non-`LEVEL:` stderr lines, glued            SOURCE FORMAT     SOURCE [FORMAT]       stdin, argv id
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

# ---- versions -------------------------------------------------------------------------------
# name -> the releases the tests run as (both ends where a rule changes inside the shape's
# neighbourhood: 6.4.1 is the last to store a clone reply whole, 6.4.2 the first to split it)
SHAPES = {
    "4.x": ((4, 14, 2),),
    "5.x": ((5, 12, 13),),
    "6.0.0-6.0.2": ((6, 0, 2),),
    "6.0.3-6.4.1": ((6, 0, 3), (6, 4, 1)),
    "6.4.2-6.10": ((6, 4, 2), (6, 10, 5)),
    "7.x": ((7, 4, 0),),
}


def vstr(version) -> str:
    return "%d.%d.%d" % tuple(version)


def shape_of(version) -> str:
    v = tuple(version)
    if v < (5, 0, 0):
        return "4.x"
    if v < (6, 0, 0):
        return "5.x"
    if v < (6, 0, 3):
        return "6.0.0-6.0.2"
    if v < (6, 4, 2):
        return "6.0.3-6.4.1"
    if v < (7, 0, 0):
        return "6.4.2-6.10"
    return "7.x"


def all_versions():
    """[(shape, version)] for pytest parametrisation."""
    return [(name, v) for name, vs in SHAPES.items() for v in vs]


# ---- how the driver process calls an action --------------------------------------------------
def ds_invocation(version, b64: str, obj_id, stdin_flag: bool = False):
    """(argv after the action path, stdin) of a DS action.

    ODS `DatastoreDriver#do_image_action`:
    * release-4.14.2 .. release-6.6.0: `cmd << " " << arguments` with arguments
      "#{drv_message} #{id}": the base64 DS_DRIVER_ACTION_DATA is argv[1], the id argv[2].
    * release-6.4.7, release-6.6.3 with `--stdin`/`-i` in oned.conf's DATASTORE_MAD
      ARGUMENTS: arguments " - #{id}", the base64 on stdin.
    * release-6.8.0 .. release-7.4.0: `cmd << " #{id}"`, the base64 on stdin always.
    """
    v = tuple(version)
    if v >= (6, 8, 0):
        return [str(obj_id)], b64
    if stdin_flag:
        return ["-", str(obj_id)], b64
    return [b64, str(obj_id)], ""


# ---- what the driver process makes of an execution -------------------------------------------
SEVERITY = {"ERROR": "E", "WARN": "W", "INFO": "I", "DEBUG": "D"}
BLOCK_OPEN, BLOCK_CLOSE = "ERROR MESSAGE --8<------", "ERROR MESSAGE ------>8--"


@dataclass
class Execution:
    """What the driver process (one_datastore.rb / one_tm.rb) sends oned for one run."""
    result: str                 # SUCCESS / FAILURE
    info: str                   # the payload of the action's message
    logs: list = field(default_factory=list)   # [(severity, id, text)] LOG messages


def error_text(version, stderr: str) -> str:
    """The error text the driver process takes from stderr of a failed action.

    * release-4.14.2 .. release-6.0.2: CM `GenericCommand#get_error_message`:
      `@stderr.scan(/^ERROR MESSAGE --8<------\\n(.*?)ERROR MESSAGE ------>8--$/m)`,
      `tmp[0].join(' ').strip`: the FIRST block only, its newlines KEPT; "-" if none.
    * release-6.0.3 .. release-6.10.5: CM `get_error_message`: `return '-' if
      @stderr.empty?`; `@stderr.tr("\\n",' ').strip`: the whole stderr, log lines included.
    * release-7.0.0 .. release-7.4.0: DEH `get_info_from_execution`: each stderr line is
      stripped; lines matching `^(ERROR|INFO|WARN|DEBUG):\\s+(\\d+)?\\s*(.*)$` become LOG
      messages, the others are appended with NO separator (`err_info << line`).
    DEH `get_info_from_execution` (every tag): an empty info becomes "-".
    """
    v = tuple(version)
    if v < (6, 0, 3):
        m = re.search(r"^%s\n(.*?)%s$" % (re.escape(BLOCK_OPEN), re.escape(BLOCK_CLOSE)), stderr, re.M | re.S)
        text = m.group(1).strip() if m else "-"
    elif v < (7, 0, 0):
        text = stderr.replace("\n", " ").strip() if stderr else "-"
    else:
        text = ""
        for line in stderr.splitlines():
            line = line.strip()
            if not LEVEL_7.match(line):
                text += line
        text = text.replace("\n", " ").strip()
    return text or "-"


LEVEL_7 = re.compile(r"^(ERROR|INFO|WARN|DEBUG):\s+(\d+)?\s*(.*)$")


def log_messages(version, rc: int, stderr: str, obj_id) -> list:
    """LOG messages the driver process sends about one run: [(severity, id, text)].

    * up to release-6.10.5 stderr reaches the log only on failure: CM `GenericCommand#run`
      calls `log(@stderr)` when the exit code is not 0, and DEH `log` files each line as
      'I', or 'E'/'D'/'I' for `ERROR:`/`DEBUG:`/`INFO:` lines (release-4.14.2 also 'E'
      inside the ERROR MESSAGE block). Stderr of a successful run is dropped.
    * release-7.0.0+: DEH `get_info_from_execution` sends every `LEVEL:` line as a LOG
      message on success and failure, with the id written after the colon or -1
      (TMP `TransferManager::_log` at release-7.4.0 files id -1 in oned.log and any other
      id in THAT VM's log: `vm->log(...)` with no check that the VM exists, so a number
      right after `INFO:` must be the VM's id or nothing).
    """
    v = tuple(version)
    out = []
    if v >= (7, 0, 0):
        for line in stderr.splitlines():
            m = LEVEL_7.match(line.strip())
            if m:
                out.append((SEVERITY[m.group(1)], int(m.group(2)) if m.group(2) else -1, m.group(3).strip()))
        if rc != 0:
            out += [("I", obj_id, ln.strip()) for ln in stderr.strip().splitlines()]
        return out
    if rc == 0:
        return out
    for line in stderr.strip().splitlines():
        m = re.match(r"^(ERROR|DEBUG|INFO):(.*)$", line)
        out.append(({"ERROR": "E", "DEBUG": "D", "INFO": "I"}[m.group(1)], obj_id, m.group(2).strip())
                   if m else ("I", obj_id, line.strip()))
    return out


def execution(version, rc: int, stdout: str, stderr: str, obj_id, encode64: bool = False) -> Execution:
    """DEH `get_info_from_execution` (every tag): exit code 0 -> SUCCESS with stdout as
    the info, else FAILURE with the error text; ODS `do_image_action` base64-encodes the
    info of `monitor` (`encode64` true, release-4.14.2 .. release-7.4.0)."""
    if rc == 0:
        result, info = "SUCCESS", stdout
    else:
        result, info = "FAILURE", error_text(version, stderr)
    info = info or "-"
    if encode64:
        info = base64.b64encode(info.encode()).decode()
    return Execution(result, info, log_messages(version, rc, stderr, obj_id))


def driver_lines(action: str, ex: Execution, obj_id) -> list:
    """The lines on the driver process's stdout that oned reads: DEH `send_message`
    (every tag) does `STDOUT.puts "#{action} #{result} #{id} #{info}"`: an info with
    a newline inside becomes a second, garbled protocol line."""
    text = "%s %s %s %s" % (action, ex.result, obj_id, ex.info)
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")


# ---- oned: splitting a driver line ---------------------------------------------------------------
def split_line(version, line: str):
    """(action, result, id, payload) as oned reads a driver line.

    * release-6.0.0+: MSG `parse_from`: `is >> buffer` (type), `is >> _status`,
      `is >> _oid >> std::ws`, `getline(is, buffer)`: the payload is the rest of the
      line, leading blanks skipped, trailing ones kept.
    * 4.x, 5.x: IMD `ImageManagerDriver::protocol` / TMD `protocol`: `is >> action >> ws`,
      `is >> result >> ws`, `is >> id >> ws`, then each action reads from the same stream
      (the payload here is what is left on the line)."""
    m = re.match(r"^\s*(\S+)\s+(\S+)\s+(-?\d+)\s*(.*)$", line, re.S)
    if not m:
        return None
    return m.group(1), m.group(2), int(m.group(3)), m.group(4)


# ---- oned: what it stores from a DS reply --------------------------------------------------------
ERROR_PREFIX = {
    # IMP at release-6.10.5 (same words in IMD at release-4.14.2 and release-5.12.13)
    "CP": "Error copying image in the datastore",             # ImageManager::_cp
    "CLONE": "Error cloning from Image %(cloning)s",          # ImageManager::_clone
    "MKFS": "Error creating datablock",                       # ImageManager::_mkfs
    "SNAP_DELETE": "Error removing snapshot %(snap)s from image %(id)s",   # ImageManager::_snap_delete
    "SNAP_REVERT": "Error reverting image %(id)s to snapshot %(snap)s",    # ImageManager::_snap_revert
    "SNAP_FLATTEN": "Error flattening image snapshot",        # ImageManager::_snap_flatten
}


# Per DS action, in one place (details and source lines: `image_reply`):
# stdout oned reads on success -> what it stores; on failure the error text (`error_text`)
# goes after the prefix in ERROR_PREFIX (rm: a fixed text from 6.0).
DS_REPLIES = {
    "cp": "4.x/5.x: SOURCE (first word). 6.0.0+: SOURCE FORMAT, both required -> SOURCE, FORMAT",
    "clone": "4.x/5.x: SOURCE (first word). 6.0.0-6.4.1: the whole line -> SOURCE. "
             "6.4.2+: SOURCE [FORMAT] -> SOURCE, FORMAT if given",
    "mkfs": "4.x/5.x: SOURCE (first word). 6.0.0+: the whole line -> SOURCE (save_as: FORMAT from the VM disk)",
    "stat": "an integer, MB -> SIZE (4.x/5.x the first word, 6.0.0+ the whole line)",
    "monitor": "KEY=VALUE lines, base64-encoded by one_datastore.rb -> USED_MB, TOTAL_MB, FREE_MB",
    "rm": "stdout ignored",
    "snap_delete": "stdout ignored", "snap_revert": "stdout ignored", "snap_flatten": "stdout ignored",
    "export": "an <IMPORT_INFO> document (marketplace, src/market_mad/one_market.rb `import`)",
}


@dataclass
class Outcome:
    """What oned keeps of one action: the image attributes it sets, its error message,
    the datastore monitor values, and the problems a reply caused."""
    ok: bool = False
    stored: dict = field(default_factory=dict)       # SOURCE, FORMAT, SIZE
    error: str = ""                                   # the object's ERROR message ("" if none)
    monitor: dict = field(default_factory=dict)       # USED_MB, TOTAL_MB, FREE_MB (float)
    logs: list = field(default_factory=list)
    problems: list = field(default_factory=list)      # every way the reply was misread


def _error(prefix: str, info: str) -> str:
    """IMP/IMD/TMP/TMD (every tag): `if (!info.empty() && info[0] != '-') oss << ": " << info;`
    an error text starting with '-' is dropped."""
    return prefix + (": " + info if info and info[0] != "-" else "")


def _words(payload: str) -> list:
    return payload.split()


def image_reply(version, action: str, payload: str, result: str, obj_id=7, cloning=5, snap=0) -> Outcome:
    """What oned does with the payload of a DS action's message (`action` in oned's upper
    case: CP, CLONE, MKFS, STAT, RM, MONITOR, SNAP_*, and EXPORT for the marketplace)."""
    v = tuple(version)
    o = Outcome(ok=result == "SUCCESS")
    if not o.ok:
        if action == "STAT":
            # RMA `ImageAllocate::request_execute`: the allocation fails with the reply
            o.error = payload
        elif action == "RM":
            # IMP `ImageManager::_rm` release-6.0.0+: a fixed text, the reply to oned.log;
            # IMD `rm_action` 4.x/5.x: "Error removing image from datastore. Manually remove
            # image source <source> to completely delete the image: <info>"
            o.error = ("Error removing image from datastore. Retry the operation or manually remove image "
                       "source  and run the delete --force operation to completely delete the image"
                       if v >= (6, 0, 0) else _error("Error removing image from datastore. Manually remove "
                                                     "image source to completely delete the image", payload))
        elif action == "MONITOR":
            o.error = "Error monitoring datastore %s: %s" % (obj_id, payload)
        elif action == "EXPORT":
            # src/market_mad/one_market.rb `MarketPlaceDriver#import` (5.0+): "Error exporting
            # image to file: #{info}"
            o.error = "Error exporting image to file: %s" % payload
        else:
            o.error = _error(ERROR_PREFIX[action] % {"cloning": cloning, "id": obj_id, "snap": snap}, payload)
        return o
    words = _words(payload)
    if action == "CP":
        if v >= (6, 0, 0):
            # IMP `ImageManager::_cp` release-6.0.0+: `is >> source`; `is >> format`;
            # no FORMAT -> "CP operation succeeded but image FORMAT was not returned." + ERROR
            if len(words) < 2:
                o.ok = False
                o.error = "CP operation succeeded but image FORMAT was not returned."
                o.problems.append("cp: no FORMAT after SOURCE (%r)" % payload)
            else:
                o.stored.update(SOURCE=words[0], FORMAT=words[1])
            if len(words) > 2:
                o.problems.append("cp: words after SOURCE FORMAT are ignored (%r)" % payload)
        else:
            # IMD `cp_action` release-4.14.2/5.12.13: `is >> source >> ws`; the rest is ignored
            if words:
                o.stored["SOURCE"] = words[0]
            if len(words) > 1:
                o.problems.append("cp: %s ignores everything after SOURCE (%r)" % (vstr(v), payload))
    elif action == "CLONE":
        if (6, 0, 0) <= v < (6, 4, 2):
            # IMP `ImageManager::_clone` release-6.0.0 .. release-6.4.1:
            # `image->set_source(msg->payload())`: the WHOLE reply is the SOURCE
            o.stored["SOURCE"] = payload
            if len(words) != 1:
                o.problems.append("clone: %s stores the whole reply %r as SOURCE" % (vstr(v), payload))
        elif v >= (6, 4, 2):
            # IMP `ImageManager::_clone` release-6.4.2+: `is >> source`; `is >> format`,
            # FORMAT set only when present
            o.stored["SOURCE"] = words[0] if words else ""
            if len(words) > 1:
                o.stored["FORMAT"] = words[1]
            if len(words) > 2:
                o.problems.append("clone: words after SOURCE FORMAT are ignored (%r)" % payload)
        else:
            # IMD `clone_action` 4.x/5.x: `is >> source >> ws`
            o.stored["SOURCE"] = words[0] if words else ""
            if len(words) > 1:
                o.problems.append("clone: %s ignores everything after SOURCE (%r)" % (vstr(v), payload))
    elif action == "MKFS":
        if v >= (6, 0, 0):
            # IMP `ImageManager::_mkfs` release-6.0.0+: `const string& source =
            # msg->payload(); image->set_source(source)`: the whole reply
            o.stored["SOURCE"] = payload
            if len(words) != 1:
                o.problems.append("mkfs: %s stores the whole reply %r as SOURCE" % (vstr(v), payload))
        else:
            # IMD `mkfs_action` 4.x/5.x: `is >> source >> ws`
            o.stored["SOURCE"] = words[0] if words else ""
            if len(words) > 1:
                o.problems.append("mkfs: %s ignores everything after SOURCE (%r)" % (vstr(v), payload))
    elif action == "STAT":
        # 4.x/5.x IMD `stat_action`: `is >> size_mb`; 6.0.0+ IMP `ImageManager::_stat`:
        # the whole payload. RMA `ImageAllocate`: `iss >> size_mb` must parse, then
        # `tmpl->add("SIZE", size_str)`: the reply is stored as the image's SIZE.
        size = payload if v >= (6, 0, 0) else (words[0] if words else "")
        if not re.match(r"^\s*-?\d", size):
            o.ok = False
            o.error = "Cannot parse image SIZE: " + size
            o.problems.append("stat: %r is not a size in MB" % payload)
        else:
            o.stored["SIZE"] = size
            if not re.fullmatch(r"\d+", size):
                o.problems.append("stat: SIZE stored as %r, not a bare integer" % size)
    elif action == "MONITOR":
        # ODS `monitor`: the reply is base64-encoded (encode64 true); IMD `monitor_action`
        # / IMP `ImageManager::_monitor`: base64-decoded, parsed as a template, then
        # `monitor_data.get("TOTAL_MB", total)`, FREE_MB, USED_MB (floats)
        try:
            text = base64.b64decode(payload).decode()
        except (ValueError, UnicodeDecodeError):
            o.problems.append("monitor: payload is not base64")
            return o
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            m = re.fullmatch(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"?([^"]*)"?', line)
            if not m:
                o.problems.append("monitor: %r is not KEY=VALUE (Template::parse fails)" % line)
                continue
            try:
                o.monitor[m.group(1)] = float(m.group(2))
            except ValueError:
                o.problems.append("monitor: %s=%r is not a number" % (m.group(1), m.group(2)))
        for key in ("USED_MB", "TOTAL_MB", "FREE_MB"):
            if key not in o.monitor:
                o.problems.append("monitor: no %s" % key)
    elif action in ("RM", "SNAP_DELETE", "SNAP_REVERT", "SNAP_FLATTEN"):
        # IMP `_rm`, `_snap_delete`, `_snap_revert`, `_snap_flatten` (and their IMD
        # counterparts): on SUCCESS the payload is not read
        pass
    elif action == "EXPORT":
        # src/market_mad/one_market.rb `import`: `info_doc.initialize_xml(info, 'IMPORT_INFO')`
        if "<IMPORT_INFO>" not in payload:
            o.problems.append("export: no <IMPORT_INFO> document")
    return o


def transfer_reply(version, payload: str, result: str) -> Outcome:
    """What oned does with a TRANSFER message (every TM action: ln, clone, mv, mvds, cpds,
    delete, resize, snap_*, context, mkimage, mkswap, and pre/post/failmigrate run by the
    VMM driver through the same `TransferManagerDriver#do_transfer_action`).

    OTM `action_transfer` (every tag): runs the script's lines in order and sends
    `TRANSFER SUCCESS <vmid>` with NO info after the last one: a TM action's stdout is
    never read. On a failure it stops and sends `TRANSFER FAILURE <vmid> <error text>`;
    TMP `TransferManager::_transfer` (6.0.0+) / TMD `protocol` (4.x, 5.x) store
    "Error executing image transfer script: <info>" as the VM's error ('-' dropped)."""
    o = Outcome(ok=result == "SUCCESS")
    if not o.ok:
        o.error = _error("Error executing image transfer script", payload)
    return o


# The argument list of each TM action, as oned writes it into the transfer script
# (src/tm/TransferManager.cc at release-6.10.5; `.<tm_mad_system>` is appended to the
# action name when the disk has TM_MAD_SYSTEM, 5.8+). stdout of every one of them is
# discarded (OTM `action_transfer`); only the exit code and the error text count.
TM_CALLS = {
    # `prolog_transfer_command`: a SOURCE without ':' gets `<frontend>:` in front
    "ln": "fe:SOURCE host:SYSTEM_DIR/disk.ID VMID DSID",
    "clone": "fe:SOURCE host:SYSTEM_DIR/disk.ID VMID DSID",
    "mkswap": "SIZE host:SYSTEM_DIR/disk.ID VMID DSID",
    "mkimage": "SIZE FORMAT host:SYSTEM_DIR/disk.ID VMID DSID",
    "context": "CONTEXT_FILE [FILES...] host:SYSTEM_DIR/disk.ID VMID DSID",   # `prolog_context_command`
    # `trigger_prolog_migr`, `trigger_prolog_resume`, `trigger_epilog_stop`: per disk, then the VM dir
    "mv": "src_host:DIR[/disk.ID] dst_host:DIR[/disk.ID] VMID DSID",
    "mvds": "host:SYSTEM_DIR/disk.ID SOURCE VMID DSID",                  # `epilog_transfer_command`
    "delete": "host:SYSTEM_DIR[/disk.ID] VMID DSID",                     # `epilog_*`, `epilog_delete_commands`
    "cpds": "host:SYSTEM_DIR/disk.ID SOURCE SNAP_ID VMID DSID",          # `trigger_saveas_hot`
    "resize": "host:SYSTEM_DIR/disk.ID SIZE VMID DSID",                  # `resize_command`
    "snap_create": "host:SYSTEM_DIR/disk.ID SNAP_ID VMID DSID",          # `snapshot_transfer_command`
    "snap_delete": "host:SYSTEM_DIR/disk.ID SNAP_ID VMID DSID",
    "snap_revert": "host:SYSTEM_DIR/disk.ID SNAP_ID VMID DSID",
    # `migrate_transfer_command` writes `MIGRATE tm_mad SRC DST SYSTEM_DIR VMID DSID`; the VMM
    # driver (src/vmm_mad/exec/one_vmm_exec.rb `migrate`) runs pre/post/failmigrate through
    # the TM driver's `do_transfer_action` (same error rules), the VM template on stdin
    # from 5.10 (argv 6 before); src/tm_mad/tm_common.sh `migrate_other` adds the system
    # TM's name as a 6th argument when it calls another TM_MAD's script.
    "premigrate": "SRC DST SYSTEM_DIR VMID DSID [SYSTEM_TM]",
    "postmigrate": "SRC DST SYSTEM_DIR VMID DSID [SYSTEM_TM]",
    "failmigrate": "SRC DST SYSTEM_DIR VMID DSID [SYSTEM_TM]",
}


def tm_arguments(version, words: list) -> list:
    """The argv a TM action gets from one transfer-script line.

    OTM `parse_script` (every tag): `line.split(' ')`: a value holding a space becomes
    two arguments. OTM `do_transfer_action`: release-4.14.2 joins them unescaped and runs
    the line through a shell (`command[2..-1].join(" ")`); release-5.12.13+ escapes each
    (`Shellwords.escape`)."""
    return " ".join(words).split()


# ---- one call through the whole chain ------------------------------------------------------------
def ds_outcome(version, action: str, rc: int, stdout: str, stderr: str, obj_id=7, **kw) -> Outcome:
    """A DS action's real (rc, stdout, stderr) as oned of `version` takes it."""
    name = action.upper()
    ex = execution(version, rc, stdout, stderr, obj_id, encode64=(name == "MONITOR"))
    lines = driver_lines(name, ex, obj_id)
    parsed = split_line(version, lines[0])
    if parsed is None:
        o = Outcome()
        o.problems.append("oned cannot parse the driver line %r" % lines[0])
        return o
    o = image_reply(version, name, parsed[3], parsed[1], obj_id=obj_id, **kw)
    return _finish(version, rc, stderr, o, ex, lines)


def _finish(version, rc, stderr, o, ex, lines) -> Outcome:
    """What every reply shares: the driver's log lines, one line only, the stderr rules."""
    o.logs = ex.logs
    if len(lines) > 1:
        o.problems.append("the reply spans %d lines: oned reads %r as further (garbled) messages"
                          % (len(lines), lines[1:]))
    _check_common(version, rc, stderr, o)
    return o


def tm_outcome(version, action: str, rc: int, stdout: str, stderr: str, vmid=5) -> Outcome:
    """A TM action's real (rc, stdout, stderr) as oned of `version` takes it."""
    ex = execution(version, rc, stdout, stderr, vmid)
    ex.info = ex.info if rc != 0 else ""          # OTM `action_transfer`: no info on success
    lines = driver_lines("TRANSFER", ex, vmid)
    parsed = split_line(version, lines[0])
    o = transfer_reply(version, parsed[3] if parsed else "", parsed[1] if parsed else "FAILURE")
    return _finish(version, rc, stderr, o, ex, lines)


def _check_common(version, rc, stderr, o: Outcome) -> None:
    """Problems every action shares, from the error-text rules in `error_text`:
    * a failure whose reason oned drops: no text, or one starting with '-' (`_error`);
    * 6.0.3+: the ERROR MESSAGE markers (only 4.x-6.0.2 strip them) become error text;
    * 4.x-6.0.2: a reason spanning lines (the block keeps its newlines: garbled lines,
      caught by `driver_lines`); 6.0.3-6.10: log lines on stderr of a failure become
      part of the error text; 7.x: two non-`LEVEL:` lines glued without a space;
    * 7.x: a `LEVEL: <n>` line is filed under object <n> (see `log_messages`)."""
    v = tuple(version)
    if rc != 0:
        reason = error_text(version, stderr)
        if not reason or reason.startswith("-"):
            o.problems.append("the failure reaches oned without its reason (stderr %r)" % stderr)
        if v >= (6, 0, 3) and BLOCK_OPEN in stderr:
            o.problems.append("%s shows the ERROR MESSAGE markers as part of the error text" % vstr(v))
        if (6, 0, 3) <= v < (7, 0, 0):
            logs = [ln for ln in stderr.splitlines() if re.match(r"^(ERROR|INFO|WARN|DEBUG):", ln)]
            if logs:
                o.problems.append("%s takes the whole stderr as the error: log lines %r are glued into it"
                                  % (vstr(v), logs))
        if v >= (7, 0, 0):
            plain = [ln for ln in stderr.splitlines() if ln.strip() and not LEVEL_7.match(ln.strip())]
            if len(plain) > 1:
                o.problems.append("7.x glues %d error lines without a space: %r" % (len(plain), plain))
    if v >= (7, 0, 0):
        for line in stderr.splitlines():
            m = LEVEL_7.match(line.strip())
            if m and m.group(2):
                o.problems.append("7.x files %r under object id %s" % (line, m.group(2)))


def restricted(path_real: str, restricted_dirs: str, safe_dirs: str, home="/var/lib/one", one_location=""):
    """LIBFS `check_restricted` with `set_up_datastore`'s list (release-4.14.2 .. release-7.4.0):
    SAFE_DIRS first (`readlink -f $1 | grep -E "^$path"`: a string prefix), then
    `$VAR_LOCATION $ETC_LOCATION $HOME/ $RESTRICTED_DIRS` -> True when refused."""
    var, etc = ((one_location + "/var/", one_location + "/etc/") if one_location
                else ("/var/lib/one/", "/etc/one/"))
    if any(path_real.startswith(p) for p in safe_dirs.split()):
        return False
    return any(path_real.startswith(p) for p in [var, etc, home + "/"] + restricted_dirs.split())
