#!/bin/sh
# Build (or find in the cache) the real-kernel test host image, so a CI run
# pays for it once before pytest.  Cache: ${ONEISCSI_REALHOST_CACHE:-/var/cache/oneiscsi-realhost}.
# Needs root, debootstrap, mkfs.ext4 and network access to the Debian mirror
# (from /etc/apt/sources.list.d/debian.sources; override: ONEISCSI_REALHOST_MIRROR).
set -eu
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" -m oneiscsi.sim.realhost build "$@"
