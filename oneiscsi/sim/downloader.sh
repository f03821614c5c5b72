#!/bin/sh
# STAND-IN for OpenNebula's <remotes>/datastore/downloader.sh (lab and test material; the real
# one cannot run here: it needs oned, the backup datastore's rsync host and Ruby libraries).
#
# It follows the real script (src/datastore_mad/remotes/downloader.sh, release-7.4.0) where
# oneiscsi uses it: `downloader.sh [--nodecomp] URL -|FILE`, the result on stdout (or in FILE),
# exit status 0, or non-zero with a line on stderr ("Error copying") when the source cannot be
# read. For rsync:// it does what rsync_downloader.rb + tm_mad/lib/backup.rb do on the backup
# server: a URL `rsync://<ds>/<job>/<inc>:<snap>,.../<base>/<vmid>/<snap>/disk.<N>.<inc>` with one
# increment is the file itself; with several, the files <base>/<vmid>/<snap>/disk.<N>.<inc> are
# chained in place (`qemu-img rebase -u -F qcow2 -b <previous> <next>`, reconstruct_chain) and
# merged into ONE qcow2 (`qemu-img convert -O qcow2 <last> <tmp>/<name>`, merge_chain), which is
# printed and removed. Differences, on purpose:
#   - the backup server is a local folder: every path of the URL is read under
#     $ONEISCSI_SIM_BACKUP_ROOT (the real one asks oned for the datastore's RSYNC_HOST and
#     BASE_PATH and runs these steps there over ssh; <base> is taken from the path here);
#   - restic:// is read from the same folder layout as rsync:// (the real restic_downloader.rb
#     first pulls the chain out of the restic repository, then merges it the same way);
#   - --md5/--sha1/--limit/--max-size and http/ssh/s3/rbd sources are not implemented (refused);
#     a local file is copied with cat, as the real script does.
# ONEISCSI_SIM_DOWNLOADER_LOG, when set, gets one line per call (its arguments).
set -u

fail() { echo "$*" >&2; exit 255; }

[ -n "${ONEISCSI_SIM_DOWNLOADER_LOG:-}" ] && echo "$*" >> "$ONEISCSI_SIM_DOWNLOADER_LOG"

while [ $# -gt 0 ]; do
    case "$1" in
        -n|--nodecomp) shift ;;
        -o|--noretry) shift ;;
        -m|--md5|-s|--sha1|-l|--limit|-c|--max-size) fail "downloader.sh stand-in: $1 is not implemented" ;;
        --) shift; break ;;
        -*) fail "Arguments error" ;;
        *) break ;;
    esac
done
[ $# -eq 2 ] || fail "Arguments error"
FROM=$1
TO=$2
ROOT=${ONEISCSI_SIM_BACKUP_ROOT:-}

emit() {  # copy file $1 to TO
    if [ "$TO" = "-" ]; then cat -- "$1"; else cat -- "$1" > "$TO"; fi
}

case "$FROM" in
rsync://*|restic://*)
    [ -n "$ROOT" ] || fail "downloader.sh stand-in: ONEISCSI_SIM_BACKUP_ROOT is not set"
    url=${FROM#*://}
    rest=${url#*/}          # drop <ds>
    rest=${rest#*/}         # drop <job>
    chain=${rest%%/*}
    disk_path=${rest#*/}    # the absolute path (upstream: "/" + the 4th field)
    case "$disk_path" in /*) ;; *) disk_path="/$disk_path" ;; esac
    name=$(basename -- "$disk_path")
    idx=$(echo "$name" | cut -d. -f2)
    n=$(echo "$chain" | tr ',' '\n' | wc -l)
    if [ "$n" -eq 1 ]; then
        [ -r "$ROOT$disk_path" ] || fail "Error copying"
        emit "$ROOT$disk_path" || fail "Error copying"
        exit 0
    fi
    snapdir=$(dirname -- "$disk_path")
    vmdir=$(dirname -- "$snapdir")
    vmid=$(basename -- "$vmdir")
    base=$(dirname -- "$vmdir")
    prev=""
    for item in $(echo "$chain" | tr ',' ' '); do
        inc=${item%%:*}
        snap=${item#*:}
        f="$ROOT$base/$vmid/$snap/disk.$idx.$inc"
        [ -r "$f" ] || fail "Error copying: $f is missing"
        if [ -n "$prev" ]; then
            qemu-img rebase -u -F qcow2 -b "$prev" "$f" >&2 || fail "Error copying: rebase of $f"
        fi
        prev=$f
    done
    tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/downloader-standin.XXXXXX") || fail "Error copying"
    trap 'rm -rf "$tmp"' EXIT
    qemu-img convert -O qcow2 "$prev" "$tmp/$(basename -- "$prev")" >&2 || fail "Error copying: merge"
    emit "$tmp/$(basename -- "$prev")" || fail "Error copying"
    exit 0
    ;;
*://*)
    fail "downloader.sh stand-in: ${FROM%%://*}:// is not implemented"
    ;;
*)
    [ -r "$FROM" ] || fail "Cannot read from $FROM"
    emit "$FROM" || fail "Error copying"
    ;;
esac
