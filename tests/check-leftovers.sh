#!/usr/bin/env bash
# Fails (exit 1) if the test suite left anything behind:
#   - an ovlfuse / fuse-overlayfs / kernel overlay mount whose mountpoint is under /tmp
#   - a running ovlfuse daemon
#   - an attached loop device
# Otherwise prints "no leftovers" and exits 0.
set -uo pipefail

found=0

# /proc/mounts: "source mountpoint fstype options 0 0"; the mountpoint has
# spaces etc. escaped as \040, which is fine for a prefix match.
mounts=$(awk '($3 == "fuse.ovlfuse" || $3 == "fuseblk.ovlfuse" || $3 == "fuse.ovlfuse-eio-rig" || $3 == "fuse.ovlfuse-tripwire" || $3 == "fuse.fuse-overlayfs" || $3 == "overlay") && $2 ~ /^\/tmp\// { print "  " $3 " on " $2 }' /proc/mounts)
if [ -n "$mounts" ]; then
    echo "leftover mounts under /tmp:"
    echo "$mounts"
    found=1
fi

# running (not zombie) processes named ovlfuse
daemons=$(ps -eo pid=,stat=,comm=,args= | awk '$3 == "ovlfuse" && $2 !~ /^Z/ { $2 = ""; $3 = ""; print }')
if [ -n "$daemons" ]; then
    echo "leftover ovlfuse processes:"
    echo "$daemons" | sed 's/^/  /'
    found=1
fi

if command -v losetup >/dev/null 2>&1; then
    loops=$(losetup -a 2>/dev/null || true)
    if [ -n "$loops" ]; then
        echo "attached loop devices:"
        echo "$loops" | sed 's/^/  /'
        found=1
    fi
else
    echo "warning: losetup not found, loop devices not checked" >&2
fi

if [ "$found" -ne 0 ]; then
    exit 1
fi
echo "no leftovers"
