"""open-iscsi on hypervisor hosts: attach, detach, rescan, sessions, stray cleanup.

Each call renders one POSIX sh script and runs it with one `ssh` round trip per
host (oneiscsi.host.run). Several volumes of one call are handled in parallel
inside that script (one background job each); every job holds a `flock` on
its target (`<lockdir>/oneiscsi-<iqn>.lock`, lockdir `/run/lock/oneiscsi-<uid>`, else
`/var/lock/oneiscsi-<uid>`: a 0700 directory of the ssh user, lock files 0600, never a
symlink, no /tmp fallback) so concurrent actions on one host never race on one target, and
no other local user can block them.

Attach follows os-brick (equallogic-and-peers.md section 4.2): node record
probe (21: `-o new`, 6: retried), CHAP updates only when a Chap is given (else
iscsid.conf's defaults stay), `node.startup manual`, login only when no
session exists (15 counts as success), then a bounded wait for
`/dev/disk/by-path/*ip-<portal>-iscsi-<iqn>-lun-*` (any LUN: EqualLogic uses
0, tgtd 1) or `<base_device>/<volume>`, a size check from sysfs and
`ln -sfn <device> <link>`. A failed volume is undone as far as this run changed
the host (logout if it logged in, node delete if it made the record).
Detach: flush, delete the SCSI device in sysfs, logout, node delete, remove
the link when it points to this volume; absent things count as done.

What the script prints on stdout is for this module only, one line per job:
`OK <key> [<device> [<size>]]` or `FAIL <key> <step> <rc> <text>`; human
detail goes to stderr (kept in the DEBUG log by host.run).

Root: iscsiadm, `blockdev --flushbufs` and the sysfs delete need root. The
script runs them directly as root, else through `sudo -n` when
`sudo -n iscsiadm --version` works, else directly (and iscsiadm fails with its
own message). SUDOERS_LINE is what an operator adds for oneadmin.

The CHAP password travels inside the script text (a quoted heredoc on ssh's
stdin), never on the frontend's argv or in logs, and on the host it is never an
argument of any command either (sudo logs every command line, and /proc/<pid>/cmdline
is readable by every user): `set_chap` appends the `node.session.auth.*` lines to
each record file of the target with the shell's builtin printf piped into
`sudo -n tee -a <record file>`, then one `iscsiadm -o update -n node.startup`
rewrites the record in iscsiadm's own format (open-iscsi 2.1.8 idbm.c: a record is
read as `name = value` lines, the last one of a name wins; measured on the
real-kernel guest: the login then authenticates with CHAP). The sudoers rule for
that `tee` matches the record path by a regular expression (sudo 1.9.10+) and is
tagged NOLOG_INPUT/NOLOG_OUTPUT so that sudo's I/O logging, when an operator turns
it on, does not record the password either.

Record layout (open-iscsi 2.1.8 idbm.c idbm_rec_write, idbm_for_each_iface; measured
on the real guest): a record made by `-o new -p ip:port` (no tpgt) is the old-style
file `<db>/<iqn>/<ip>,<port>`; discovery makes `<db>/<iqn>/<ip>,<port>,<tpgt>/<iface>`.
When both exist, the first `-o update` that writes the tpgt record deletes the
old-style file, and exits 6 ("iface iter could not stat") when the directory order
(the file system's hash order) visits the deleted file afterwards; the next update
succeeds. Updates are therefore retried once on exit 6.

The initiator name file is root-only on Debian (open-iscsi's postinst: chmod 600):
`initiator_name()` reads it directly when it can, else with `sudo -n cat` (a line
of SUDOERS_LINE).
"""
from __future__ import annotations

import hashlib
import ipaddress
import re

from oneiscsi import host as hostrun
from oneiscsi import log, validate
from oneiscsi.errors import Failure, Invalid

INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"
# the record files set_chap may append to (Debian/Ubuntu: /etc/iscsi/nodes, RHEL/SUSE:
# /var/lib/iscsi/nodes): no '/' or leading '.' inside a component, so no way out of the DB
NODE_RECORD_RE = ("^-a /(etc|var/lib)/iscsi/nodes/[A-Za-z0-9][A-Za-z0-9.:_-]*/"
                  "[A-Za-z0-9][A-Za-z0-9.:-]*,[0-9]+(,[0-9]+/[A-Za-z0-9][A-Za-z0-9._:-]*)?$")
SUDOERS_LINE = ("oneadmin ALL=(root) NOPASSWD: /usr/sbin/iscsiadm, /usr/sbin/blockdev, "
                "/usr/sbin/multipath, /usr/sbin/multipathd, /usr/sbin/dmsetup, "
                "/usr/bin/tee /sys/block/sd[a-z]/device/delete, "
                "/usr/bin/tee /sys/block/sd[a-z][a-z]/device/delete, "
                "/usr/bin/cat " + INITIATOR_FILE + ", "
                "NOLOG_INPUT: NOLOG_OUTPUT: /usr/bin/tee " + NODE_RECORD_RE)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
_IFACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def _name(value, what="volume name") -> str:
    value = str(value or "")
    validate.reject_dangerous(value, what)
    if not _NAME.match(value):
        raise Invalid("%s %s is refused: use letters, digits and . _ : - (first a letter or digit)"
                      % (what, validate.show(value)))
    return value


class Volume:
    """One target to attach on a host: portal, IQN, volume name, optional disk link and size."""

    def __init__(self, portal: str, iqn: str, volume: str, link: str | None = None,
                 size_bytes: int | None = None, readonly: bool = False, logout: bool = True):
        host, port = validate.portal(str(portal or ""), "portal")
        self.portal = validate.format_portal(host, port)
        self.port = port
        # the name udev's path_id puts in by-path links: an IP without brackets, or any
        # address when the portal is a DNS name (the kernel shows the resolved IP)
        try:
            self.bypath_host = str(ipaddress.ip_address(host))
        except ValueError:
            self.bypath_host = "*"
        self.iqn = validate.iqn(str(iqn or ""), "target IQN")
        self.volume = _name(volume)
        self.link = validate.safe_path(str(link), "disk link") if link else None
        if self.link is not None and self.link.endswith("/"):
            raise Invalid("disk link %s is refused: it names a directory" % validate.show(self.link))
        if size_bytes is not None:
            size_bytes = validate.number(str(size_bytes), "volume size in bytes", 0, 2 ** 62)
        self.size_bytes = size_bytes
        self.readonly = bool(readonly)   # attach: the block device is set read-only on the host
        self.logout = bool(logout)       # detach: False = another VM on the host uses it, only the link goes

    def __repr__(self):
        return "Volume(%r, %r, %r, link=%r, size_bytes=%r, readonly=%r, logout=%r)" % (
            self.portal, self.iqn, self.volume, self.link, self.size_bytes, self.readonly, self.logout)


class Chap:
    """CHAP credentials for the node records; the password never reaches any argv or log."""

    def __init__(self, user: str, password: str):
        self.user = validate.chap_user(str(user or ""), "CHAP user")
        password = "" if password is None else str(password)
        if not password:
            raise Invalid("the CHAP password is empty")
        if any(c in password for c in "\r\n\x00"):
            raise Invalid("the CHAP password is refused: it contains a newline or NUL character")
        if password != password.strip():
            raise Invalid("the CHAP password is refused: it begins or ends with a blank, which "
                          "open-iscsi's node records drop")
        log.secret(password)
        self._password = password

    @property
    def password(self) -> str:
        return self._password

    def __repr__(self):
        return "Chap(%r, '****')" % self.user


class HostFailure(Failure):
    """A host script failed for some volumes; `devices` holds the ones that did attach."""

    def __init__(self, message: str, devices: dict | None = None, failed: list | None = None):
        super().__init__(message)
        self.devices = devices or {}
        self.failed = failed or []


def lock_file(iqn: str) -> str:
    """The name of the per-target lock file on the host (in /run/lock or its fallback)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", iqn)[:150]
    return "oneiscsi-%s-%s.lock" % (safe, hashlib.sha1(iqn.encode()).hexdigest()[:8])


# ---------------------------------------------------------------- the initiator name
# sh: the InitiatorName of the host on stdout; exit 1 with the reason on stderr. Root-only
# on Debian: read directly when possible, else through `sudo -n cat` (SUDOERS_LINE).
READ_INITIATOR = r"""
read_initiator() {
  f=/etc/iscsi/initiatorname.iscsi
  if [ ! -e "$f" ]; then echo "$f does not exist" >&2; return 1; fi
  if [ "$(id -u)" = 0 ] || [ -r "$f" ]; then txt=$(cat "$f") || return 1
  elif command -v sudo >/dev/null 2>&1 && txt=$(sudo -n cat "$f" 2>/dev/null); then :
  else echo "$f is not readable by $(id -un) and sudo -n cat $f is not allowed" >&2; return 1
  fi
  n=$(printf '%s\n' "$txt" | sed -n 's/^[[:space:]]*InitiatorName[[:space:]]*=[[:space:]]*//p' | head -n 1)
  if [ -z "$n" ]; then echo "$f has no InitiatorName= line" >&2; return 1; fi
  printf '%s\n' "$n"
}
"""


def initiator_name(host: str) -> str:
    """The iSCSI initiator name of `host` from /etc/iscsi/initiatorname.iscsi, read as the
    ssh user or through `sudo -n cat` (the file is root-only 0600 on Debian)."""
    res = hostrun.run(host, READ_INITIATOR + "read_initiator\n", timeout=60, what="initiator name")
    if hostrun.unreachable(res):
        raise _unreachable(host, res, "reading the initiator name")
    lines = (res.stdout or "").split()
    if res.returncode != 0 or len(lines) != 1:
        raise Failure("host %s: cannot read the initiator name (%s): add /usr/bin/cat %s to oneadmin's "
                      "sudoers line on the host (README)"
                      % (host, log.mask(hostrun.last_line(res.stderr)) or "exit %d" % res.returncode,
                         INITIATOR_FILE))
    value = lines[0]
    validate.reject_dangerous(value, "InitiatorName of host %s" % host)
    if "," in value:
        raise Invalid("InitiatorName of host %s %s is refused: it contains ','" % (host, validate.show(value)))
    return validate.iqn(value, "InitiatorName of host %s" % host)


# ---------------------------------------------------------------- the sh library
LIB = r"""
umask 022
say() { printf '%s\n' "$*" >&2; }
now() { date +%s; }
nap() { sleep 0.2 2>/dev/null || sleep 1; }
if [ "$(id -u)" = 0 ]; then SUDO=
elif command -v sudo >/dev/null 2>&1 && sudo -n iscsiadm --version >/dev/null 2>&1; then SUDO="sudo -n"
else SUDO=
fi
# per-target locks in a private directory of the ssh user (0700, lock files 0600): another
# local user can neither create nor hold them; no fallback to /tmp
PRE= LOCKDIR=
for d in /run/lock /var/lock; do
  if [ -d "$d" ] && [ -k "$d" ] && [ -w "$d" ]; then LOCKDIR=$d/oneiscsi-$(id -u); break; fi
done
if [ -z "$LOCKDIR" ]; then
  PRE="no lock directory: /run/lock and /var/lock are missing or not sticky and writable"
else
  mkdir -m 700 "$LOCKDIR" 2>/dev/null
  if [ -L "$LOCKDIR" ] || [ ! -d "$LOCKDIR" ] || [ ! -O "$LOCKDIR" ] ||
     [ -n "$(find "$LOCKDIR" -maxdepth 0 -perm /077 2>/dev/null)" ]; then
    PRE="lock directory $LOCKDIR is not a private (0700) directory of $(id -un): remove it"
  fi
fi
command -v iscsiadm >/dev/null 2>&1 || [ -n "$SUDO" ] || PRE="iscsiadm not found: install open-iscsi"
command -v flock >/dev/null 2>&1 || PRE="flock not found: install util-linux"
T=$(mktemp -d "${TMPDIR:-/tmp}/oneiscsi.XXXXXX") || { echo "FAIL - preflight 1 mktemp failed"; exit 1; }
trap 'rm -rf "$T"' EXIT
status=0

# iscsiadm as root: exit code in $rc, last output line in $last; output to stderr on failure
adm() {
  out=$($SUDO iscsiadm "$@" 2>&1); rc=$?
  last=$(printf '%s\n' "$out" | sed -e '/^[[:space:]]*$/d' -e '/Could not log into all portals/d' \
    -e 's/^iscsiadm: //' | tail -n 1)
  [ $rc -eq 0 ] || [ -z "$out" ] || printf '%s\n' "$out" >&2
  return $rc
}
node() { adm -m node -T "$IQN" -p "$PORTAL" ${IFACE:+-I "$IFACE"} "$@"; }
# an update exits 6 once when it converts an old-style record next to a discovered one
node_update() { node -o update "$@" || { [ $rc -eq 6 ] && say "retrying the update (rc 6)" && node -o update "$@"; }; }

# set_chap: CHAP into every record file of the target, the password only on a pipe
# (printf is a shell builtin: no argv holds it), then one update rewrites the records
set_chap() {
  db=
  for d in /etc/iscsi/nodes /var/lib/iscsi/nodes; do [ -d "$d" ] && { db=$d; break; }; done
  if [ -z "$db" ]; then rc=6 last="no node database in /etc/iscsi/nodes or /var/lib/iscsi/nodes"; return 1; fi
  $SUDO iscsiadm -m node -T "$IQN" -p "$PORTAL" ${IFACE:+-I "$IFACE"} -o show > "$T/$N.rec" 2>&1 ||
    { rc=$? last=$(tail -n 1 "$T/$N.rec"); return 1; }
  files=$(awk -v db="$db" '
    /^# BEGIN RECORD/ { n = t = a = p = i = "" }
    $1 == "node.name" { n = $3 } $1 == "node.tpgt" { t = $3 } $1 == "iface.iscsi_ifacename" { i = $3 }
    $1 == "node.conn[0].address" { a = $3 } $1 == "node.conn[0].port" { p = $3 }
    /^# END RECORD/ { if (t == "-1") print db "/" n "/" a "," p; else print db "/" n "/" a "," p "," t "/" i }
  ' "$T/$N.rec")
  if [ -z "$files" ]; then rc=6 last="iscsiadm -o show named no record file"; return 1; fi
  for f in $files; do
    printf 'node.session.auth.authmethod = CHAP\nnode.session.auth.username = %s\nnode.session.auth.password = %s\n' \
      "$CHAP_USER" "$CHAP_PASS" | $SUDO tee -a "$f" > /dev/null 2> "$T/$N.tee" ||
      { rc=1 last="cannot append the CHAP settings to $f with ${SUDO:+sudo -n }tee -a: $(tail -n 1 "$T/$N.tee")"; return 1; }
  done
  say "CHAP settings written to $(echo $files | wc -w) node record(s)"
}

result() { r=$1; shift; printf '%s %s%s\n' "$r" "$KEY" "${*:+ $*}" > "$T/$N.res"; }
fail() { say "$1 failed (rc $2): $3"; result FAIL "$1" "$2" "$3"; }

# job N KEY LOCKNAME FUNCTION ARGS...: FUNCTION under the target's flock
job() {
  N=$1 KEY=$2 lock=$LOCKDIR/$3; shift 3
  if [ -n "$PRE" ]; then fail preflight 1 "$PRE"; return; fi
  [ -L "$lock" ] || (umask 077; : >> "$lock") 2>/dev/null
  if [ -L "$lock" ] || [ ! -r "$lock" ]; then fail lock 1 "cannot open the lock file $lock"; return; fi
  {
    if flock -w "$LOCKWAIT" 9; then "$@"
    else fail lock 1 "another action held $lock for $LOCKWAIT s"; fi
  } 9< "$lock"
}

# finish N KEY: print the job's result line (stdout) and its detail (stderr)
finish() {
  if [ -s "$T/$1.err" ]; then
    while IFS= read -r l || [ -n "$l" ]; do printf '[%s] %s\n' "$2" "$l"; done < "$T/$1.err" >&2
  fi
  [ -s "$T/$1.warn" ] && cat "$T/$1.warn"
  if [ -s "$T/$1.res" ]; then cat "$T/$1.res"
  else printf 'FAIL %s internal 1 %s\n' "$2" "$(tail -n 1 "$T/$1.err" 2>/dev/null)"; status=1; return; fi
  case $(cat "$T/$1.res") in OK*) ;; *) status=1 ;; esac
}

# the session list once for a batch of attaches (one iscsiadm call, not one per volume): a
# session that appears after it is caught by login's exit 15 ("already present")
snapshot_sessions() {
  $SUDO iscsiadm -m session > "$T/sessions" 2>/dev/null || : > "$T/sessions"  # 21: none
  SESSION_SNAPSHOT="$T/sessions"
  # a record we create inherits iscsid.conf's node.startup: no update needed when it is manual
  grep -Eqs '^[[:space:]]*node\.startup[[:space:]]*=[[:space:]]*manual' /etc/iscsi/iscsid.conf && STARTUP_MANUAL=1
}

has_session() {
  if [ -n "$SESSION_SNAPSHOT" ]; then s=$(cat "$SESSION_SNAPSHOT")
  else s=$($SUDO iscsiadm -m session 2>/dev/null) || return 1
  fi
  printf '%s\n' "$s" | awk -v p="$PORTAL" -v t="$IQN" -v h="$BPHOST" '
    ($1 == "tcp:" || $1 == "iser:") && $4 == t {
      q = $3; sub(/,[^,]*$/, "", q)
      if (h == "*" || tolower(q) == tolower(p)) f = 1
    }
    END { exit !f }'
}

# the device path of the target: its by-path link (any LUN), else (with $1 = yes) BASE/VOL
find_dev() {
  for f in /dev/disk/by-path/*ip-$BPHOST:$PORT-iscsi-$IQN-lun-*; do
    if [ -e "$f" ]; then printf '%s\n' "$f"; return 0; fi
  done
  if [ "$1" = yes ] && [ -n "$VOL" ] && [ -e "$BASE/$VOL" ]; then printf '%s\n' "$BASE/$VOL"; return 0; fi
  return 1
}

# wait_dev: bounded wait for the disk; udev makes BASE/VOL and by-path links one after the
# other, so BASE/VOL alone only counts once it has been there for a few rounds
wait_dev() {
  end=$(( $(now) + WAIT )) seen=0
  until dev=$(find_dev $([ $seen -ge 5 ] && echo yes)); do
    if [ "$(now)" -ge "$end" ]; then return 1; fi
    if [ -z "$rescanned" ]; then
      say "session without a disk (deleted?): rescanning"; node --rescan; rescanned=1
    fi
    if [ -n "$VOL" ] && [ -e "$BASE/$VOL" ]; then seen=$((seen + 1)); fi
    nap
  done
}

# size in bytes of the disk behind $1 (sysfs needs no root)
dev_size() {
  d=$(readlink -f "$1") || return 1
  n=$(cat "/sys/block/${d##*/}/size" 2>/dev/null)
  case $n in
    ''|*[!0-9]*) ;;
    *) echo $((n * 512)); return 0 ;;
  esac
  if [ -b "$d" ]; then $SUDO blockdev --getsize64 "$d"; return; fi
  if [ -f "$d" ]; then say "$d is a regular file (iscsiadm stand-in): size from stat"; stat -L -c %s "$d"; return; fi
  return 1
}

# wait_size DEV SIZE: until the device has at least SIZE bytes (bounded by WAIT)
wait_size() {
  end=$(( $(now) + WAIT ))
  while :; do
    sz=$(dev_size "$1") || sz=
    [ -n "$sz" ] && [ "$sz" -ge "$2" ] && return 0
    [ "$(now)" -ge "$end" ] && return 1
    nap
  done
}

undo() {
  if [ -n "$loggedin" ]; then node --logout || say "logout after the failure failed (rc $rc)"; fi
  if [ -n "$created" ]; then node -o delete || say "node delete after the failure failed (rc $rc)"; fi
  return 0
}

attach_one() {  # VOL PORTAL BPHOST PORT IQN LINK SIZE RO
  VOL=$1 PORTAL=$2 BPHOST=$3 PORT=$4 IQN=$5 LINK=$6 SIZE=$7 RO=$8
  created= loggedin= tries=0
  until node; do
    if [ $rc -eq 21 ] || [ $rc -eq 255 ]; then
      if node -o new; then created=1; say "node record created"; break; fi
    fi
    if [ $rc -ne 6 ] || [ $tries -ge 5 ]; then fail node-record $rc "$last"; undo; return; fi
    tries=$((tries + 1)); sleep 1
  done
  if [ -n "$CHAP_USER" ]; then
    set_chap || { fail chap-settings $rc "$last"; undo; return; }
  fi
  # also rewrites the records set_chap appended to in iscsiadm's own format
  if [ -z "$created" ] || [ -z "$STARTUP_MANUAL" ] || [ -n "$CHAP_USER" ]; then
    node_update -n node.startup -v manual || { fail node-startup $rc "$last"; undo; return; }
  fi
  if has_session; then
    say "already logged in"
  else
    node --login
    case $rc in
      0) loggedin=1; say "logged in" ;;
      15) say "logged in meanwhile (15)" ;;
      *) fail login $rc "$last"; undo; return ;;
    esac
  fi
  rescanned=$loggedin
  if ! wait_dev; then fail device 1 "no device for $IQN after $WAIT s"; undo; return; fi
  if [ -n "$SIZE" ]; then
    sz=$(dev_size "$dev") || sz=
    if [ -z "$sz" ]; then
      say "the size of $dev cannot be read: not checked"
    elif [ "$sz" -lt "$SIZE" ]; then
      say "$dev has $sz bytes, less than $SIZE: rescanning"
      node --rescan
      if ! wait_size "$dev" "$SIZE"; then
        fail size 1 "$dev has $sz bytes, the volume $SIZE"; undo; return
      fi
    fi
  fi
  if [ -n "$RO" ]; then
    d=$(readlink -f "$dev")
    if [ -b "$d" ]; then
      $SUDO blockdev --setro "$d" || { fail readonly $? "blockdev --setro $d failed"; undo; return; }
    else
      say "$d is not a block device (iscsiadm stand-in): not set read-only"
    fi
  fi
  link_disk undo || return
  result OK "$dev"
}

# link_disk UNDO: disk.N -> $dev when a link is wanted; on failure, fail and run UNDO
link_disk() {
  [ -n "$LINK" ] || return 0
  dir=${LINK%/*}
  mkdir -p "${dir:-/}" && ln -sfn "$dev" "$LINK" && return 0
  fail link 1 "cannot create the link $LINK"; $1; return 1
}

# the devices of the target (resolved), space-separated
target_devs() {
  devs=
  for f in /dev/disk/by-path/*ip-$BPHOST:$PORT-iscsi-$IQN-lun-* ${VOL:+"$BASE/$VOL"}; do
    [ -e "$f" ] || continue
    d=$(readlink -f "$f") || continue
    case " $devs " in *" $d "*) continue ;; esac
    devs="$devs $d"
  done
}

# holder: what keeps one of $devs open (a device-mapper holder, or a process this user can
# see: qemu runs as oneadmin on OpenNebula KVM hosts); empty when nothing does
holder() {
  for d in $devs; do
    case " $maps " in *" ${d##*/} "*) continue ;; esac   # a map of the target: map_holder
    for h in /sys/block/${d##*/}/holders/*; do
      case " $maps " in *" ${h##*/} "*) continue ;; esac
      [ -e "$h" ] && { echo "${d##*/} is held by ${h##*/}"; return; }
    done
    # a path of the target's map: multipathd keeps it open for its checker
    [ -n "$maps" ] && map_of "${d##*/}" >/dev/null && continue
    fd=$(find /proc/[0-9]*/fd -maxdepth 1 -lname "$d" 2>/dev/null | head -n 1)
    if [ -n "$fd" ]; then
      p=${fd#/proc/}; p=${p%%/*}
      echo "$d is open by pid $p ($(cat /proc/$p/comm 2>/dev/null))"; return
    fi
  done
}

# remove LINK when it points to this volume
unlink_mine() {
  if [ -n "$LINK" ] && [ -L "$LINK" ]; then
    t=$(readlink "$LINK") mine=
    case " $devs " in *" $t "*) mine=1 ;; esac
    case $t in /dev/disk/by-path/*ip-$BPHOST:$PORT-iscsi-$IQN-lun-*|"$BASE/$VOL") mine=1 ;; esac
    if [ -n "$mine" ]; then rm -f "$LINK"; else say "$LINK points to $t, not to this volume: left alone"; fi
  fi
}

unlink_one() {  # VOL PORTAL BPHOST PORT IQN LINK: another VM on this host uses the volume
  VOL=$1 PORTAL=$2 BPHOST=$3 PORT=$4 IQN=$5 LINK=$6
  target_devs
  unlink_mine
  result OK
}

detach_one() {  # VOL PORTAL BPHOST PORT IQN LINK
  VOL=$1 PORTAL=$2 BPHOST=$3 PORT=$4 IQN=$5 LINK=$6
  target_devs
  # a dm-multipath map on the target's paths (whatever the datastore says now): multipath order
  maps= paths=
  if [ -d /sys/class/iscsi_session ]; then
    mp_paths; mp_maps
    for p in $paths; do case " $devs " in *" /dev/$p "*) ;; *) devs="$devs /dev/$p" ;; esac; done
  fi
  if [ -n "$maps" ] || [ -n "$MULTIPATH" ]; then detach_mp; return; fi
  h=$(holder)
  if [ -n "$h" ]; then fail in-use 1 "$h"; return; fi
  for d in $devs; do
    if [ -b "$d" ]; then
      $SUDO blockdev --flushbufs "$d" >&2 || say "flushing $d failed"
    fi
    if [ -e "/sys/block/${d##*/}/device/delete" ]; then
      echo 1 | $SUDO tee "/sys/block/${d##*/}/device/delete" >/dev/null || say "deleting ${d##*/} failed"
    fi
  done
  node --logout
  case $rc in 0) say "logged out" ;; 21) ;; *) fail logout $rc "$last"; return ;; esac
  tries=0
  until node -o delete; do
    [ $rc -eq 21 ] && break
    if [ $rc -ne 6 ] && [ $rc -ne 15 ] || [ $tries -ge 5 ]; then fail node-delete $rc "$last"; return; fi
    tries=$((tries + 1)); sleep 1
  done
  unlink_mine
  result OK
}

rescan_one() {  # VOL PORTAL BPHOST PORT IQN SIZE
  VOL=$1 PORTAL=$2 BPHOST=$3 PORT=$4 IQN=$5 SIZE=$6
  maps= paths= devs=
  if [ -d /sys/class/iscsi_session ]; then mp_paths; mp_maps; fi
  if [ -n "$maps" ]; then   # every path, then the map (multipathd resize map)
    m=$(echo $maps | cut -d' ' -f1)
    mp_rescan "$m"
    dev=/dev/mapper/$(dm_name "$m")
    if [ -n "$SIZE" ] && ! wait_size "$dev" "$SIZE"; then
      fail size 1 "$dev has $(dev_size "$dev") bytes after the rescan, the volume $SIZE"; return
    fi
    result OK "$dev" "$(dev_size "$dev")"; return
  fi
  if ! has_session; then fail rescan 21 "no session for $IQN on this host"; return; fi
  node --rescan || { fail rescan $rc "$last"; return; }
  rescanned=1
  if ! wait_dev; then fail device 1 "no device for $IQN after $WAIT s"; return; fi
  if [ -n "$SIZE" ] && ! wait_size "$dev" "$SIZE"; then
    fail size 1 "$dev has $(dev_size "$dev") bytes after the rescan, the volume $SIZE"; return
  fi
  result OK "$dev" "$(dev_size "$dev")"
}

# ---------------------------------------------------------------- multipath (IFACES has 2+ ifaces)
# Paths are found through sysfs, never by-path: every path of one target has the same by-path
# name (systemd path_id uses the node record's portal; multipath.md "by-path collision").
# iqn_sessions: "<sid> <iface>" of every session of $IQN
iqn_sessions() {
  for s in /sys/class/iscsi_session/session*; do
    [ -r "$s/targetname" ] || continue
    [ "$(cat "$s/targetname" 2>/dev/null)" = "$IQN" ] || continue
    printf '%s %s\n' "${s##*/session}" "$(cat "$s/ifacename" 2>/dev/null)"
  done
}
# sess_disks SID: the sd disks of that session (LUN 0 of tgtd is its controller: no block device)
sess_disks() {
  for b in /sys/class/iscsi_session/session$1/device/target*/*:*/block/*; do
    [ -e "$b" ] && printf '%s\n' "${b##*/}"
  done
}
# mp_paths: $paths (sdX ...) of every session of $IQN, $nodisk (sids without a disk), $sids
mp_paths() {
  paths= nodisk= sids=
  for sid in $(iqn_sessions | awk '{ print $1 }'); do
    sids="$sids $sid"
    d=$(sess_disks "$sid")
    if [ -z "$d" ]; then nodisk="$nodisk $sid"; else paths="$paths $d"; fi
  done
}
# map_of sdX: the dm-N of the dm-multipath map holding the path (exit 1: none)
map_of() {
  for h in /sys/block/$1/holders/dm-*; do
    [ -r "$h/dm/uuid" ] || continue
    case $(cat "$h/dm/uuid") in mpath-*) printf '%s\n' "${h##*/}"; return 0 ;; esac
  done
  return 1
}
dm_name() { cat "/sys/block/$1/dm/name" 2>/dev/null; }
# mp_maps: $maps (dm-N ...) holding any path of $IQN or named in $devs (BASE/VOL on a map)
mp_maps() {
  maps=
  for p in $paths; do
    m=$(map_of "$p") || continue
    case " $maps " in *" $m "*) ;; *) maps="$maps $m" ;; esac
  done
  for d in $devs; do
    case ${d##*/} in
      dm-*) [ -r "/sys/block/${d##*/}/dm/uuid" ] || continue
            case $(cat "/sys/block/${d##*/}/dm/uuid") in mpath-*) ;; *) continue ;; esac
            case " $maps " in *" ${d##*/} "*) ;; *) maps="$maps ${d##*/}" ;; esac ;;
    esac
  done
}
# map_holder dm-N: what keeps the map open (a holder such as LVM or kpartx, or an opener: a
# running VM); empty when nothing does
map_holder() {
  n=$(dm_name "$1")
  for h in /sys/block/$1/holders/*; do
    [ -e "$h" ] && { echo "map $n ($1) is held by ${h##*/}"; return; }
  done
  o=$($SUDO dmsetup info -c --noheadings -o open "$n" 2>/dev/null | tr -d ' ')
  case $o in ''|0) return ;; esac
  fd=$(find /proc/[0-9]*/fd -maxdepth 1 \( -lname "/dev/$1" -o -lname "/dev/mapper/$n" \) 2>/dev/null | head -n 1)
  if [ -n "$fd" ]; then
    p=${fd#/proc/}; p=${p%%/*}
    echo "map $n ($1) is open by pid $p ($(cat /proc/$p/comm 2>/dev/null))"
  else
    echo "map $n ($1) is open $o time(s) (a process of another user, e.g. qemu or an LVM scan)"
  fi
}
# mp_flush dm-N: flush the map, bounded retries on "map in use" (a transient udev/blkid
# opener; LXD retries 10 x 0.5 s, os-brick 3 tries); an absent map is done
mp_flush() {
  n=$(dm_name "$1")
  [ -n "$n" ] || return 0
  if [ -n "$FORCE" ]; then
    # only when forced: fail the I/O queued on a pathless map (multipath.conf(5) KNOWN ISSUES)
    $SUDO multipathd disablequeueing map "$n" >&2 2>&1 || say "disablequeueing $n failed"
  fi
  tries=0
  until out=$($SUDO multipath -f "$n" 2>&1); do
    [ -e "/sys/block/$1/dm" ] || return 0
    tries=$((tries + 1))
    if [ $tries -ge 10 ]; then
      rc=1 last="multipath -f $n: $(printf '%s\n' "$out" | tail -n 1)"; return 1
    fi
    h=$(map_holder "$1")
    if [ -n "$h" ] && [ -z "$FORCE" ]; then rc=1 last=$h; return 1; fi
    sleep 1
  done
  say "map $n flushed"
}
# del_paths: delete the SCSI devices of $paths and wait (bounded) until they are gone
del_paths() {
  for p in $paths; do
    if [ -e "/sys/block/$p/device/delete" ]; then
      echo 1 | $SUDO tee "/sys/block/$p/device/delete" >/dev/null || say "deleting $p failed"
    fi
  done
  end=$(( $(now) + WAIT ))
  for p in $paths; do
    while [ -e "/sys/block/$p" ] && [ "$(now)" -lt "$end" ]; do nap; done
    [ -e "/sys/block/$p" ] && say "$p is still there after $WAIT s"
  done
  return 0
}
# logout_all: every session and record of the target (-m node without -I: all ifaces)
logout_all() {
  IFACE=
  node --logout
  case $rc in 0) say "logged out" ;; 21) ;; *) return 1 ;; esac
  for sid in $(iqn_sessions | awk '{ print $1 }'); do   # a session on another portal (redirect)
    adm -m session -r "$sid" --logout || [ $rc -eq 21 ] || return 1
  done
  # per iface first: one delete over several iface records of a portal exits 6 once (measured)
  for K in $IFACES; do IFACE=$K; node -o delete || [ $rc -eq 21 ] || say "node delete on $K: rc $rc"; done
  IFACE= tries=0
  until node -o delete; do
    [ $rc -eq 21 ] && break
    if [ $rc -ne 6 ] && [ $rc -ne 15 ] || [ $tries -ge 5 ]; then last="node delete: $last"; return 1; fi
    tries=$((tries + 1)); sleep 1
  done
  return 0
}

# detach_mp: (devs, paths, maps known) map flush, path delete, logout, node delete (safe order,
# os-brick remove_connection; multipath.md A): a map still open fails before anything changes
detach_mp() {
  mnames=
  for m in $maps; do mnames="$mnames /dev/mapper/$(dm_name "$m")"; done
  for m in $maps; do
    h=$(map_holder "$m")
    if [ -n "$h" ] && [ -n "$FORCE" ]; then
      $SUDO multipathd disablequeueing map "$(dm_name "$m")" >&2 2>&1
      end=$(( $(now) + 10 ))
      while [ -n "$h" ] && [ "$(now)" -lt "$end" ]; do nap; h=$(map_holder "$m"); done
    fi
    if [ -n "$h" ]; then fail in-use 1 "$h"; return; fi
  done
  h=$(holder)
  if [ -n "$h" ]; then fail in-use 1 "$h"; return; fi
  for m in $maps; do
    mp_flush "$m" || { fail map-flush $rc "$last"; return; }
  done
  del_paths
  logout_all || { fail logout $rc "$last"; return; }
  devs="$devs $mnames"
  # a link to a map that is gone (flushed by an earlier, interrupted detach) is ours too
  if [ -n "$MULTIPATH" ] && [ -n "$LINK" ] && [ -L "$LINK" ] && [ ! -e "$LINK" ]; then
    case $(readlink "$LINK") in /dev/mapper/*) rm -f "$LINK" ;; esac
  fi
  unlink_mine
  result OK
}

warn() { say "warning: $*"; printf 'WARN %s %s\n' "$KEY" "$*" >> "$T/$N.warn"; }

mp_undo() {
  if [ -n "$in" ]; then
    mp_paths
    if [ -n "$mapnew" ]; then mp_maps; for m in $maps; do mp_flush "$m" || say "map flush after the failure failed"; done; fi
    for K in $in; do
      mine=
      for sid in $(iqn_sessions | awk -v k="$K" '$2 == k { print $1 }'); do
        for p in $(sess_disks "$sid"); do mine="$mine $p"; done
      done
      paths=$mine; del_paths
      IFACE=$K; node --logout || say "logout on $K after the failure failed (rc $rc)"
    done
  fi
  for K in $made; do IFACE=$K; node -o delete || say "node delete on $K after the failure failed (rc $rc)"; done
  IFACE=
  return 0
}

attach_mp() {  # VOL PORTAL BPHOST PORT IQN LINK SIZE RO
  VOL=$1 PORTAL=$2 BPHOST=$3 PORT=$4 IQN=$5 LINK=$6 SIZE=$7 RO=$8
  made= in= mapnew=
  # 1. a node record per iface (CHAP, node.startup manual)
  for K in $IFACES; do
    IFACE=$K created= tries=0
    until node; do
      if [ $rc -eq 21 ] || [ $rc -eq 255 ]; then
        # with the portal group tag: `-o new -p ip:port` writes one old-style file <ip>,<port>
        # shared by every iface (the last one wins; measured on the real-kernel guest, open-iscsi
        # 2.1.8); <ip>,<port>,1/<iface> is one record per iface. 1 is the group's tag (Cinder's
        # PS driver: "<group-ip>:3260,1 <iqn> 0"; tgtd's too)
        if adm -m node -T "$IQN" -p "$PORTAL,1" -I "$K" -o new; then
          created=1; made="$made $K"; say "node record on $K created"; break
        fi
      fi
      if [ $rc -ne 6 ] || [ $tries -ge 5 ]; then fail node-record $rc "$K: $last"; mp_undo; return; fi
      tries=$((tries + 1)); sleep 1
    done
    if [ -n "$CHAP_USER" ]; then set_chap || { fail chap-settings $rc "$K: $last"; mp_undo; return; }; fi
    if [ -z "$created" ] || [ -z "$STARTUP_MANUAL" ] || [ -n "$CHAP_USER" ]; then
      node_update -n node.startup -v manual || { fail node-startup $rc "$K: $last"; mp_undo; return; }
    fi
  done
  IFACE=
  # 2. log in on the ifaces without a session, all at once (15: a parallel login won)
  had=$(iqn_sessions)
  for K in $IFACES; do
    if printf '%s\n' "$had" | awk -v k="$K" '$2 == k { f = 1 } END { exit !f }'; then continue; fi
    ( IFACE=$K; node --login; printf '%s %s\n' "$rc" "$last" > "$T/$N.login.$K" ) &
  done
  wait
  lfail= lrc= ltext=
  for K in $IFACES; do
    [ -r "$T/$N.login.$K" ] || continue
    read -r r t < "$T/$N.login.$K"
    case $r in
      0) in="$in $K"; say "logged in on $K" ;;
      15) say "logged in on $K meanwhile (15)" ;;
      *) lfail="$lfail $K"; [ -n "$lrc" ] || { lrc=$r ltext="$K: $t"; } ;;
    esac
  done
  [ -n "$(iqn_sessions)" ] || { fail login "${lrc:-1}" "${ltext:-no session}"; mp_undo; return; }
  # 3. one disk per session (a session without one is rescanned once)
  end=$(( $(now) + WAIT )) resc=$(( $(now) + 3 ))
  while :; do
    mp_paths
    [ -n "$paths" ] && [ -z "$nodisk" ] && break
    [ "$(now)" -ge "$end" ] && break
    if [ -n "$resc" ] && [ "$(now)" -ge "$resc" ]; then
      for sid in $nodisk; do say "session $sid without a disk: rescanning"; adm -m session -r "$sid" --rescan; done
      resc=
    fi
    nap
  done
  if [ -z "$paths" ]; then fail device 1 "no disk on any session of $IQN after $WAIT s"; mp_undo; return; fi
  # 4. the same WWID on every path
  wwid=
  for p in $paths; do
    w=$(cat "/sys/block/$p/device/wwid" 2>/dev/null)
    [ -n "$wwid" ] || wwid=$w
    if [ "$w" != "$wwid" ]; then fail wwid 1 "$p shows WWID $w, another path $wwid"; mp_undo; return; fi
  done
  # 5. the map: multipathd makes it, `multipath -a` + `add path` for find_multipaths strict
  #    (os-brick linuxscsi); bounded wait for every path in it
  first=$(echo $paths | cut -d' ' -f1)
  map_of "$first" >/dev/null || mapnew=1
  if [ -n "$mapnew" ]; then
    $SUDO multipath -a "/dev/$first" >&2 2>&1 || say "multipath -a /dev/$first failed"
  fi
  end=$(( $(now) + WAIT )) added=
  while :; do
    m= all=1
    for p in $paths; do
      if pm=$(map_of "$p"); then m=$pm; else all=; fi
    done
    [ -n "$all" ] && break
    [ "$(now)" -ge "$end" ] && break
    if [ -z "$added" ]; then
      for p in $paths; do map_of "$p" >/dev/null || $SUDO multipathd add path "$p" >&2 2>&1; done
      added=1
    fi
    nap
  done
  if [ -z "$m" ]; then fail map 1 "no dm-multipath map for $IQN (paths$paths) after $WAIT s"; mp_undo; return; fi
  name=$(dm_name "$m")
  # 6. fewer paths than configured ifaces or sessions: a warning naming the missing ones
  for K in $lfail; do warn "no path on iface $K: login failed"; done
  for sid in $nodisk; do warn "session $sid ($(cat /sys/class/iscsi_session/session$sid/ifacename 2>/dev/null)) has no disk"; done
  for p in $paths; do [ "$(map_of "$p")" = "$m" ] || warn "path $p is not in map $name"; done
  for K in $IFACES; do
    case " $lfail " in *" $K "*) continue ;; esac
    iqn_sessions | awk -v k="$K" '$2 == k { f = 1 } END { exit !f }' || warn "no session on iface $K"
  done
  dev=/dev/mapper/$name
  end=$(( $(now) + WAIT ))
  until [ -b "$dev" ] || [ "$(now)" -ge "$end" ]; do nap; done
  [ -b "$dev" ] || { fail device 1 "$dev did not appear"; mp_undo; return; }
  if [ -n "$SIZE" ]; then
    sz=$(dev_size "$dev") || sz=
    if [ -n "$sz" ] && [ "$sz" -lt "$SIZE" ]; then
      say "$dev has $sz bytes, less than $SIZE: rescanning"
      mp_rescan "$m"
      if ! wait_size "$dev" "$SIZE"; then fail size 1 "$dev has $sz bytes, the volume $SIZE"; mp_undo; return; fi
    fi
  fi
  if [ -n "$RO" ]; then
    $SUDO blockdev --setro "/dev/$m" || { fail readonly $? "blockdev --setro /dev/$m failed"; mp_undo; return; }
  fi
  link_disk mp_undo || return
  result OK "$dev"
}

# mp_rescan dm-N: rescan every session of $IQN, then let multipathd resize the map
mp_rescan() {
  for sid in $(iqn_sessions | awk '{ print $1 }'); do
    adm -m session -r "$sid" --rescan || say "rescan of session $sid failed (rc $rc)"
  done
  sleep 1
  $SUDO multipathd resize map "$(dm_name "$1")" >&2 2>&1 || say "multipathd resize map failed"
}

sessions_list() {
  s=$($SUDO iscsiadm -m session 2>&1); rc=$?
  case $rc in
    0) printf '%s\n' "$s" | awk '($1 == "tcp:" || $1 == "iser:") { q = $3; sub(/,[^,]*$/, "", q); print q, $4 }' ;;
    21) ;;
    *) printf '%s\n' "$s" >&2; last=$(printf '%s\n' "$s" | tail -n 1); return 1 ;;
  esac
}

# stray IQN LOCKNAME: detach every session of IQN (the portal comes from the session)
stray() {
  for p in $(printf '%s\n' "$SESSIONS" | awk -v t="$1" '$2 == t { print $1 }'); do
    n=$((n + 1))
    h=${p%:*}; h=${h#\[}; h=${h%\]}
    ( job "$n" "$1" "$2" detach_one '' "$p" "$h" "${p##*:}" "$1" '' ) > "$T/$n.err" 2>&1 < /dev/null
    finish "$n" "$1"
  done
}
"""


# multipath preflight: multipathd answers (os-brick's supports_multipath check: `multipathd show
# status`); without it no map would ever appear, so nothing is logged in
MP_PRE = r"""
if [ -z "$PRE" ]; then
  if ! command -v multipath >/dev/null 2>&1 && [ ! -x /usr/sbin/multipath ] && [ ! -x /sbin/multipath ]; then
    PRE="multipath not found: install multipath-tools (EQL_IFACE lists several ifaces)"
  elif ! $SUDO multipathd show status >/dev/null 2>&1; then
    PRE="multipathd is not running (or oneadmin may not run it through sudo -n): start multipathd"
  fi
fi
"""


def _settings(iface=None, base="/dev/eql", wait=30, chap=None, force=False) -> str:
    ifaces = iface if isinstance(iface, list) else ([iface] if iface else [])
    multipath = len(ifaces) > 1
    lines = ["IFACE=%s" % hostrun.q("" if multipath else (ifaces[0] if ifaces else "")),
             "IFACES=%s" % hostrun.q(" ".join(ifaces) if multipath else ""),
             "MULTIPATH=%s" % ("1" if multipath else ""), "FORCE=%s" % ("1" if force else ""),
             "BASE=%s" % hostrun.q(base),
             "WAIT=%d" % wait, "LOCKWAIT=%d" % (2 * wait + 60),
             "CHAP_USER=%s" % hostrun.q(chap.user if chap else "")]
    text = "\n".join(lines) + "\n"
    if chap is not None:
        text += hostrun.heredoc_value("CHAP_PASS", chap.password)
    return text


def _script(settings: str, body: str) -> str:
    """Everything runs inside main() with stdin from /dev/null: the script itself arrives on
    stdin (`sh -s`), nothing may read it, and a truncated script never starts."""
    return "main() {\n%s%s%s\nexit $status\n}\nmain < /dev/null\n" % (settings, LIB, body)


def _parallel(calls: list) -> str:
    """calls: [(key, lockname, function, [args])] -> background jobs, wait, result lines."""
    out = []
    for i, (key, lockname, func, args) in enumerate(calls, 1):
        out.append("( job %d %s %s %s %s ) > \"$T/%d.err\" 2>&1 < /dev/null &"
                   % (i, hostrun.q(key), hostrun.q(lockname), func,
                      " ".join(hostrun.q(a) for a in args), i))
    out.append("wait")
    out += ["finish %d %s" % (i, hostrun.q(key)) for i, (key, _, _, _) in enumerate(calls, 1)]
    return "\n".join(out)


def _vol_args(v: Volume) -> list:
    return [v.volume, v.portal, v.bypath_host, str(v.port), v.iqn]


def ifaces_of(value) -> list:
    """EQL_IFACE: one open-iscsi iface, or several separated by commas or blanks (multipath:
    one session per iface, a dm-multipath map over them). One name: today's single path."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else re.split(r"[\s,]+", str(value).strip())
    items = [str(i) for i in items if str(i) != ""]
    for i in items:
        validate.reject_dangerous(i, "EQL_IFACE")
        if not _IFACE.match(i):
            raise Invalid("EQL_IFACE %s is refused: not an iSCSI interface name" % validate.show(i))
    dup = sorted({i for i in items if items.count(i) > 1})
    if dup:
        raise Invalid("EQL_IFACE names iface %s twice" % ", ".join(dup))
    return items


def _check(vols, iface, base_device, wait):
    vols = list(vols or [])
    if not vols:
        raise Invalid("no volumes given")
    for v in vols:
        if not isinstance(v, Volume):
            raise TypeError("expected Volume, got %r" % (v,))
    names = [v.volume for v in vols]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise Invalid("volume %s is given twice" % ", ".join(dup))
    ifaces = ifaces_of(iface)
    base = validate.safe_path(str(base_device or ""), "EQL_BASE_DEVICE").rstrip("/") or "/"
    wait = validate.number(str(wait), "EQL_WAIT_TIME", 1, 3600)
    return vols, (ifaces if len(ifaces) > 1 else (ifaces[0] if ifaces else None)), base, wait


# ---------------------------------------------------------------- result handling
_REASONS = {
    "node-record": ("iscsiadm could not read or create the node record",
                    "check open-iscsi on the host and the sudoers line for oneadmin (see README)"),
    "chap-settings": ("the CHAP settings could not be written into the node record",
                      "check open-iscsi on the host and oneadmin's sudoers line (README; its node "
                      "record rule needs sudo 1.9.10+; with an older sudo leave EQL_CHAP_USER unset "
                      "and put CHAP into the host's iscsid.conf)"),
    "node-startup": ("iscsiadm could not set node.startup",
                     "check open-iscsi on the host and the sudoers line for oneadmin (see README)"),
    "login": ("login failed", "check the portal, the volume's access records and the host's iscsid"),
    "device": ("no disk appeared", "check udev on the host and that the target has a disk LUN; "
                                   "raise EQL_WAIT_TIME for slow hosts"),
    "size": ("the disk is smaller than the volume", "rescan the session or check the volume size"),
    "link": ("the disk link could not be made", "check that oneadmin can write the VM directory"),
    "lock": ("the target stayed locked by another oneiscsi action",
             "retry; look for a hung iscsiadm on the host"),
    "preflight": ("the host is not ready", "install what is missing"),
    "logout": ("logout failed", "stop what still uses the disk on the host (a running VM?)"),
    "in-use": ("the disk is still in use on the host: nothing logged out",
               "stop what uses it (a running VM, an LVM scan), or check that no other VM needs it"),
    "readonly": ("the disk could not be set read-only", "check the sudoers line for blockdev (see README)"),
    "node-delete": ("iscsiadm could not delete the node record", "check open-iscsi on the host"),
    "rescan": ("rescan failed", "attach the volume on this host first"),
    "session": ("iscsiadm -m session failed", "check open-iscsi on the host"),
    "internal": ("the host script stopped unexpectedly", "see the DEBUG lines of the log"),
    "wwid": ("the paths of the volume show different WWIDs",
             "check that every iface in EQL_IFACE reaches the same group (no stale sessions)"),
    "map": ("no dm-multipath map appeared over the paths (logins undone)",
            "check multipathd and the EQLOGIC device section of /etc/multipath.conf (README); "
            "blacklists or find_multipaths may exclude the disk"),
    "map-flush": ("the dm-multipath map could not be flushed: nothing logged out",
                  "stop what uses the map (a VM, kpartx, an LVM scan), or detach with force when "
                  "all paths are gone and I/O is queued"),
}
_LOGIN = {
    24: ("CHAP authentication failed at login",
         "check the CHAP user and password (EQL_CHAP_USER, EQL_CHAP_PASS_FILE or the host's "
         "iscsid.conf) and the volume's access records"),
    19: ("the target refused the login: no such target or not allowed",
         "check that the volume exists and its access records admit this host's initiator name"),
    20: ("iscsid is not running", "start iscsid on the host (systemctl start iscsid)"),
    12: ("the iSCSI kernel modules are not loaded", "modprobe iscsi_tcp on the host"),
    8: ("the portal did not answer in time", "check the network path from the host to the portal"),
    4: ("cannot connect to the portal", "check the network path from the host to the portal"),
}


def _parse(res, keys) -> dict:
    """stdout lines -> {key: ("OK", [words]) | ("FAIL", step, rc, text)}"""
    out = {}
    for line in (res.stdout or "").splitlines():
        words = line.split(" ")
        if words[0] == "OK" and len(words) >= 2 and words[1] in keys:
            if out.get(words[1], ("OK",))[0] == "OK":
                out[words[1]] = ("OK", words[2:])
        elif words[0] == "FAIL" and len(words) >= 4 and (words[1] in keys or words[1] == "-"):
            text = " ".join(words[4:])
            rc = int(words[3]) if words[3].isdigit() else 1
            for k in (keys if words[1] == "-" else [words[1]]):
                out[k] = ("FAIL", words[2], rc, text)
    return out


def _reason(step, rc, text) -> tuple:
    reason, fix = _REASONS.get(step, _REASONS["internal"])
    if step == "login" and rc in _LOGIN:
        reason, fix = _LOGIN[rc]
    detail = log.mask(text.strip())
    if step in ("device", "size", "link", "lock", "preflight", "internal", "in-use", "readonly", "wwid", "map",
                "map-flush"):
        return "%s (%s)" % (reason, detail) if detail else reason, fix
    return "%s (iscsiadm exit %d%s)" % (reason, rc, ": " + detail if detail else ""), fix


def _unreachable(host, res, what) -> Failure:
    return Failure("host %s: not reachable over ssh for %s (%s)"
                   % (host, what, hostrun.last_line(res.stderr) or "exit 255"))


def _run(host, script, keys, what, timeout, missing_ok_host=False, require_all=True):
    res = hostrun.run(host, script, timeout=timeout, what=what)
    if hostrun.unreachable(res):
        if missing_ok_host:
            log.warn("host %s is not reachable over ssh (%s): %s skipped"
                     % (host, hostrun.last_line(res.stderr) or "exit 255", what))
            return None
        raise _unreachable(host, res, what)
    results = _parse(res, keys)
    for line in (res.stdout or "").splitlines():
        words = line.split(" ", 2)
        if words[0] == "WARN" and len(words) == 3 and words[1] in keys:
            log.warn("host %s: %s: %s" % (host, words[1], log.mask(words[2])))
    ok, failed = {}, []
    for k in keys:
        r = results.get(k)
        if r is None and not require_all and res.returncode == 0:
            continue
        r = r or ("FAIL", "internal", res.returncode, hostrun.last_line(res.stderr) or "no result line")
        if r[0] == "OK":
            ok[k] = r[1]
        else:
            failed.append((k,) + r[1:])
    if failed:
        k, step, rc, text = failed[0]
        reason, fix = _reason(step, rc, text)
        more = " (also failed: %s)" % ", ".join(f[0] for f in failed[1:]) if failed[1:] else ""
        raise HostFailure("host %s: %s: %s; %s%s" % (host, k, reason, fix, more),
                          {k: v[0] for k, v in ok.items() if v}, [f[0] for f in failed])
    return ok


# ---------------------------------------------------------------- public API
def attach(host: str, vols: list, chap: Chap | None = None, iface: str | None = None,
           base_device: str = "/dev/eql", wait: int = 30) -> dict:
    """Log `vols` in on `host` (in parallel), wait for their disks, link them: {volume: device}.

    Raises HostFailure (a Failure) naming the host and the first failed volume; the
    volumes that did attach are in its `devices`, the failed ones were undone."""
    vols, iface, base, wait = _check(vols, iface, base_device, wait)
    if chap is not None and not isinstance(chap, Chap):
        raise TypeError("chap must be a Chap")
    func = "attach_mp" if isinstance(iface, list) else "attach_one"
    calls = [(v.volume, lock_file(v.iqn), func,
              _vol_args(v) + [v.link or "", "" if v.size_bytes is None else str(v.size_bytes),
                              "1" if v.readonly else ""])
             for v in vols]
    body = (MP_PRE if func == "attach_mp" else "") + "snapshot_sessions\n"
    if func == "attach_mp":     # sessions per iface come from sysfs under the lock, not a snapshot
        body += "SESSION_SNAPSHOT=\n"
    script = _script(_settings(iface, base, wait, chap), body + _parallel(calls))
    ok = _run(host, script, [v.volume for v in vols], "iSCSI attach", 4 * wait + 180)
    missing = [k for k, words in ok.items() if not words]
    if missing:
        raise Failure("host %s: %s: the attach script named no device; see the DEBUG log" % (host, missing[0]))
    return {k: words[0] for k, words in ok.items()}


def detach(host: str, vols: list, iface: str | None = None, missing_ok_host: bool = False,
           base_device: str = "/dev/eql", force: bool = False, wait: int = 30) -> None:
    """Flush, delete the SCSI disk, logout, node delete, remove the link; each step tolerates
    "already gone". A disk still open on the host (a holder, a process) is not logged out: the
    detach fails naming it. A Volume with logout=False only loses its link (another VM on the
    host uses the volume). With missing_ok_host an unreachable host is a warning only.

    Multipath (a dm-multipath map over the target's paths, whatever `iface` says, or `iface`
    listing several ifaces): the map is flushed first (bounded retries on "map in use"), then
    every path's SCSI device is deleted, then every session logged out and every record deleted;
    a map still open fails the detach naming the holder before anything changes. `force` also
    disables queueing on the map first (all paths gone, I/O queued: the queued I/O fails, so
    its opener can let go); it never pulls a map a process keeps open."""
    vols, iface, base, wait = _check(vols, iface, base_device, wait)
    calls = [(v.volume, lock_file(v.iqn), "detach_one" if v.logout else "unlink_one", _vol_args(v) + [v.link or ""])
             for v in vols]
    script = _script(_settings(iface, base, wait, force=force), _parallel(calls))
    _run(host, script, [v.volume for v in vols], "iSCSI detach", 600, missing_ok_host)


def rescan(host: str, vols: list, wait: int = 30) -> None:
    """After a SAN resize: `iscsiadm -m node -T -p --rescan`, then wait until each disk has
    at least the volume's size_bytes (when given)."""
    vols, _, base, wait = _check(vols, None, "/dev/eql", wait)
    calls = [(v.volume, lock_file(v.iqn), "rescan_one",
              _vol_args(v) + ["" if v.size_bytes is None else str(v.size_bytes)]) for v in vols]
    script = _script(_settings(None, base, wait), _parallel(calls))
    _run(host, script, [v.volume for v in vols], "iSCSI rescan", 4 * wait + 180)


def sessions(host: str) -> list:
    """[(portal, iqn)] of the host's iSCSI sessions (none: [])."""
    script = _script(_settings(), "if sessions_list; then echo END; else echo \"FAIL - session $rc $last\"; status=1; fi")
    res = hostrun.run(host, script, timeout=120, what="iSCSI session list")
    if hostrun.unreachable(res):
        raise _unreachable(host, res, "the session list")
    lines = (res.stdout or "").splitlines()
    if res.returncode != 0 or "END" not in lines:
        raise Failure("host %s: cannot list iSCSI sessions (%s); check open-iscsi on the host"
                      % (host, log.mask(hostrun.last_line(res.stderr)) or "exit %d" % res.returncode))
    return [tuple(line.split(" ", 1)) for line in lines[:lines.index("END")] if " " in line]


def logout_strays(host: str, iqns: list) -> list:
    """Detach every session of these targets on `host` (portal taken from the session);
    returns the IQNs logged out. An unreachable host is a warning (nothing to do there now)."""
    iqns = [validate.iqn(str(i or ""), "target IQN") for i in iqns]
    if not iqns:
        return []
    body = ["sessions_list > \"$T/sessions\" || { echo \"FAIL - session $rc $last\"; exit 1; }",
            "SESSIONS=$(cat \"$T/sessions\") n=0"]
    body += ["stray %s %s" % (hostrun.q(i), hostrun.q(lock_file(i))) for i in dict.fromkeys(iqns)]
    script = _script(_settings(), "\n".join(body))
    ok = _run(host, script, list(dict.fromkeys(iqns)), "stray iSCSI session cleanup", 600,
              missing_ok_host=True, require_all=False)
    return list(ok or [])


__all__ = ["Volume", "Chap", "HostFailure", "attach", "detach", "rescan", "sessions", "logout_strays", "ifaces_of",
           "lock_file", "initiator_name", "SUDOERS_LINE", "INITIATOR_FILE"]
