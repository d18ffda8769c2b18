#!/bin/sh
# Installs (or, with --uninstall, removes) ovlfuse and its mount(8) helper.
#
#   mount-helpers/install.sh [--prefix DIR] [--sbindir DIR] [--binary PATH] [--uninstall]
#
# Defaults: the binary from target/release/ovlfuse (run `cargo build --release` first) goes
# to /usr/local/bin/ovlfuse, the helper to /sbin/mount.fuse.ovlfuse, where mount(8) looks for
# helpers of type fuse.ovlfuse. With the helper in place, `mount -t fuse.ovlfuse` and fstab
# lines work; without it, mount(8) falls back to fuse3's mount.fuse3, which also works as
# long as `ovlfuse` is on PATH.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
prefix=/usr/local
sbindir=/sbin
binary=$here/../target/release/ovlfuse
uninstall=no

while [ "$#" -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --sbindir) sbindir=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --uninstall) uninstall=yes; shift ;;
        -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

bindir=$prefix/bin
if [ "$uninstall" = yes ]; then
    rm -f "$bindir/ovlfuse" "$sbindir/mount.fuse.ovlfuse"
    echo "removed $bindir/ovlfuse and $sbindir/mount.fuse.ovlfuse"
    exit 0
fi

if [ ! -x "$binary" ]; then
    echo "install.sh: $binary not found; run 'cargo build --release' first or pass --binary" >&2
    exit 1
fi
mkdir -p "$bindir" "$sbindir"
install -m 0755 "$binary" "$bindir/ovlfuse"
# The helper finds the binary where it was installed, whatever PATH mount(8) runs with.
sed "s|^bin=\${OVLFUSE:-ovlfuse}\$|bin=\${OVLFUSE:-$bindir/ovlfuse}|" \
    "$here/mount.fuse.ovlfuse" > "$sbindir/mount.fuse.ovlfuse.tmp"
chmod 0755 "$sbindir/mount.fuse.ovlfuse.tmp"
mv "$sbindir/mount.fuse.ovlfuse.tmp" "$sbindir/mount.fuse.ovlfuse"
echo "installed $bindir/ovlfuse and $sbindir/mount.fuse.ovlfuse"
