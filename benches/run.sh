#!/usr/bin/env bash
# The performance benchmark: native ext4, the kernel overlayfs (K), fuse-overlayfs (FO1)
# and ovlfuse (default fuseblk transport, and -o nofuseblk), on the workloads of the
# performance issue, interleaved round by round; writes benches/RESULTS.md.
#
# Usage (as root, from anywhere):
#   benches/run.sh                        # the full run (copy of /usr, 5 rounds; ~30-60 min)
#   OVLFUSE_BENCH_QUICK=1 benches/run.sh  # smoke run: small tree, small sizes, 1 round (~3 min)
#
# Everything lives on an ext4 filesystem of the script's own (a sparse image on disk under
# OVLFUSE_BENCH_TMP, attached with losetup --direct-io=on so the host's page cache does not
# cache it twice): the lower layer (a copy of OVLFUSE_BENCH_LOWER_SRC plus the workload
# inputs and a python3 runtime), the upper and work directories of every run, and the
# native subject's write directories. Each workload run gets a fresh mount with an empty
# upper; subjects take turns workload by workload, the order rotating every round.
# Workloads and what exactly they do: the WORKLOADS table in benches/run-helper.py, repeated
# in the results file.
#
# Environment (full default / quick default):
#   OVLFUSE_BENCH_QUICK        [0]           1: the quick defaults below
#   OVLFUSE_BENCH_ROUNDS       [5 / 1]
#   OVLFUSE_BENCH_LOWER_SRC    [/usr / /usr/include]  tree copied into the lower layer (at
#                                            usr/ when it is /usr, else at src/)
#   OVLFUSE_BENCH_FIO_SIZE     [1g / 128m]   the lower file read by fio, and the file fio
#                                            writes sequentially
#   OVLFUSE_BENCH_RANDREAD_IO  [128m / 8m]   total of the random 4 KiB reads
#   OVLFUSE_BENCH_RANDWRITE_FILE [256m / 64m] size of the (new, sparse) random-write file
#   OVLFUSE_BENCH_RANDWRITE_IO [64m / 8m]    total of the random 4 KiB writes
#   OVLFUSE_BENCH_APPEND_SIZE  [256m / 32m]  the lower file the copy-up append grows
#   OVLFUSE_BENCH_TOUCH        [1000 / 200]  lower files touched + chmod'ed
#   OVLFUSE_BENCH_CREATE       [20000 / 2000] files created (then rm -rf'ed)
#   OVLFUSE_BENCH_TAR_ENTRIES  [20405 / 2000] entries of the untar tarball
#   OVLFUSE_BENCH_GIT_FILES    [1406 / 300]  files of the git tree
#   OVLFUSE_BENCH_PY_RUNS      [10 / 3]      chroot python3 runs
#   OVLFUSE_BENCH_MEM_ENTRIES  [1000000 / 30000] files of the memory-check walk (0: skip it)
#   OVLFUSE_BENCH_MEM_LIMIT_MIB [200]        its target for the daemon's peak RSS
#   OVLFUSE_BENCH_TIMEOUT      [600 / 120]   seconds per workload before it counts as hung
#   OVLFUSE_BENCH_SUBJECTS     [native kernel fo1 ovlfuse ovlfuse-plain]
#   OVLFUSE_BENCH_SESSIONS     [names stat seqread randread seqwrite randwrite append touch
#                               create untar git python]   (space-separated subsets allowed)
#   OVLFUSE_BENCH_OVLFUSE_OPTS []            extra mount options for both ovlfuse subjects
#   OVLFUSE_BENCH_URING        [on]          on: set the fuse module's enable_uring to Y for the
#                                          run (put back at exit), so fuseblk ovlfuse serves
#                                          requests through io_uring; keep: leave it as it is
#   OVLFUSE_BENCH_COLD         [auto]        how the cold workloads start cold:
#                                 drop     `echo 3 > /proc/sys/vm/drop_caches` (waits as long
#                                          as it takes)
#                                 remount  unmount and remount the benchmark's own ext4 (and
#                                          flush its loop device): cold for exactly our files,
#                                          touches nobody else's caches
#                                 auto     drop, but if that is blocked for
#                                          OVLFUSE_BENCH_DROP_WAIT [15] s (it walks every
#                                          superblock, and waits behind any umount stuck in
#                                          another FUSE daemon), remount from then on
#                              The script never runs a global sync(1): only `sync -f` of its own
#                              filesystems.
#   OVLFUSE_BENCH_TMP          [/tmp]        where the scratch directory and the image go
#                                            (must be on disk, not tmpfs)
#   OVLFUSE_BENCH_IMAGE        []            keep the ext4 image at this path, and reuse it
#                                            next time when built with the same parameters
#   OVLFUSE_BENCH_IMAGE_GIB    [auto]        size of the (sparse) image
#   OVLFUSE_BENCH_RESULTS      [benches/RESULTS.md]  ("-": no file)
#   OVLFUSE_BENCH_NO_BUILD     [0]           1: no `cargo build --release`
#   OVLFUSE_BIN                [target/release/ovlfuse]  the binary measured (copied first)
#   OVLFUSE_BENCH_NO_INSTALL   [0]           1: never apt-get install missing tools
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
HELPER="$HERE/run-helper.py"

die() { echo "run.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# Before this script adds any load of its own: the criterion for a quiet machine.
LOAD_AT_LAUNCH=$(cut -d' ' -f1-3 /proc/loadavg)
QUICK=${OVLFUSE_BENCH_QUICK:-0}
q() { if [[ $QUICK == 1 ]]; then echo "$2"; else echo "$1"; fi; }
ROUNDS=${OVLFUSE_BENCH_ROUNDS:-$(q 5 1)}
LOWER_SRC=${OVLFUSE_BENCH_LOWER_SRC:-$(q /usr /usr/include)}
FIO_SIZE=${OVLFUSE_BENCH_FIO_SIZE:-$(q 1g 128m)}
RANDREAD_IO=${OVLFUSE_BENCH_RANDREAD_IO:-$(q 128m 8m)}
RANDWRITE_FILE=${OVLFUSE_BENCH_RANDWRITE_FILE:-$(q 256m 64m)}
RANDWRITE_IO=${OVLFUSE_BENCH_RANDWRITE_IO:-$(q 64m 8m)}
APPEND_SIZE=${OVLFUSE_BENCH_APPEND_SIZE:-$(q 256m 32m)}
TOUCH=${OVLFUSE_BENCH_TOUCH:-$(q 1000 200)}
CREATE=${OVLFUSE_BENCH_CREATE:-$(q 20000 2000)}
TAR_ENTRIES=${OVLFUSE_BENCH_TAR_ENTRIES:-$(q 20405 2000)}
GIT_FILES=${OVLFUSE_BENCH_GIT_FILES:-$(q 1406 300)}
PY_RUNS=${OVLFUSE_BENCH_PY_RUNS:-$(q 10 3)}
MEM_ENTRIES=${OVLFUSE_BENCH_MEM_ENTRIES:-$(q 1000000 30000)}
MEM_LIMIT_MIB=${OVLFUSE_BENCH_MEM_LIMIT_MIB:-200}
TIMEOUT=${OVLFUSE_BENCH_TIMEOUT:-$(q 600 120)}
SUBJECTS=(${OVLFUSE_BENCH_SUBJECTS:-native kernel fo1 ovlfuse ovlfuse-plain})
SESSIONS=(${OVLFUSE_BENCH_SESSIONS:-names stat seqread randread seqwrite randwrite append touch create untar git python})
OVL_OPTS=${OVLFUSE_BENCH_OVLFUSE_OPTS:-}
URING=${OVLFUSE_BENCH_URING:-on}
URING_PARAM=/sys/module/fuse/parameters/enable_uring
URING_BEFORE=""
COLD=${OVLFUSE_BENCH_COLD:-auto}
DROP_WAIT=${OVLFUSE_BENCH_DROP_WAIT:-15}
TMPBASE=${OVLFUSE_BENCH_TMP:-/tmp}
RESULTS=${OVLFUSE_BENCH_RESULTS:-$HERE/RESULTS.md}
BIN_SRC=${OVLFUSE_BIN:-$REPO/target/release/ovlfuse}

for v in ROUNDS TOUCH CREATE TAR_ENTRIES GIT_FILES PY_RUNS TIMEOUT DROP_WAIT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "OVLFUSE_BENCH_$v must be a positive integer (got '${!v}')"
done
[[ $MEM_ENTRIES =~ ^[0-9]+$ ]] || die "OVLFUSE_BENCH_MEM_ENTRIES must be a number"
for v in FIO_SIZE RANDREAD_IO RANDWRITE_FILE RANDWRITE_IO APPEND_SIZE; do
    [[ ${!v} =~ ^[1-9][0-9]*[kmg]$ ]] || die "OVLFUSE_BENCH_$v must look like 256m or 1g (got '${!v}')"
done
[[ $COLD =~ ^(auto|drop|remount)$ ]] || die "OVLFUSE_BENCH_COLD must be auto, drop or remount"
[[ $URING =~ ^(on|keep)$ ]] || die "OVLFUSE_BENCH_URING must be on or keep"
for s in "${SUBJECTS[@]}"; do
    [[ $s =~ ^(native|kernel|fo1|ovlfuse|ovlfuse-plain)$ ]] || die "unknown subject '$s'"
done
for s in "${SESSIONS[@]}"; do
    [[ $s =~ ^(names|stat|seqread|randread|seqwrite|randwrite|append|touch|create|untar|git|python)$ ]] \
        || die "unknown session '$s'"
done
LOWER_SRC=$(cd "$LOWER_SRC" 2>/dev/null && pwd -P) || die "OVLFUSE_BENCH_LOWER_SRC: no such directory"

[[ $(id -u) == 0 ]] || die "must run as root (mounts, loop devices, drop_caches, chroot)"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing (modprobe fuse)"
[[ -e /dev/loop-control ]] || die "/dev/loop-control is missing (modprobe loop)"
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
grep -qw overlay /proc/filesystems || die "the kernel has no overlay filesystem (modprobe overlay)"

# ---------------------------------------------------------------- tools
# command -> Debian package; installed with apt-get when missing.
declare -A PKG=([fio]=fio [fuse-overlayfs]=fuse-overlayfs [git]=git [/usr/bin/python3]=python3
    [mkfs.ext4]=e2fsprogs [losetup]=mount [blockdev]=util-linux [tar]=tar [chroot]=coreutils
    [timeout]=coreutils [ldd]=libc-bin [find]=findutils [pgrep]=procps [awk]=gawk)
missing=()
for tool in "${!PKG[@]}"; do
    command -v "$tool" >/dev/null || missing+=("${PKG[$tool]}")
done
if (( ${#missing[@]} )); then
    [[ ${OVLFUSE_BENCH_NO_INSTALL:-0} == 1 ]] && die "missing packages: ${missing[*]}"
    log "apt-get install -y ${missing[*]}"
    apt-get install -y "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update >/dev/null 2>&1 && apt-get install -y "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]} failed"
fi
PY=/usr/bin/python3   # the helper; also what the chroot runs (Debian's interpreter)

if [[ -z ${OVLFUSE_BIN:-} && ${OVLFUSE_BENCH_NO_BUILD:-0} != 1 ]]; then
    log "cargo build --release"
    (cd "$REPO" && cargo build --release --quiet) \
        || die "cargo build --release failed (OVLFUSE_BENCH_NO_BUILD=1 measures the existing binary)"
fi
[[ -x $BIN_SRC ]] || die "no binary at $BIN_SRC"

# ---------------------------------------------------------------- scratch and cleanup
mkdir -p "$TMPBASE"
[[ $(stat -f -c %T "$TMPBASE") != tmpfs ]] \
    || die "$TMPBASE is a tmpfs: the image must be on disk (set OVLFUSE_BENCH_TMP)"
SCRATCH=$(mktemp -d "$TMPBASE/ovlfuse-bench.XXXXXX")
FS="$SCRATCH/fs"             # our ext4
MNTBASE="$SCRATCH/mnt"       # mountpoints of the unions (outside $FS, so it can be remounted)
IMG=${OVLFUSE_BENCH_IMAGE:-$SCRATCH/fs.img}
LOOP=""                      # the loop device of our ext4
LOOPS_SEEN=()                # loop devices of the fuseblk mounts, checked at the end
DAEMONS=()                   # every daemon pid we started
STUCK_DROPPERS=()
CUR_MNT="" CUR_PID="-" CUR_RUN="" CUR_ROOT=""
UMOUNT_WAIT=120              # seconds umount may take before the connection is aborted
mkdir -p "$FS" "$MNTBASE" "$SCRATCH/home"

mounted() { awk -v m="$1" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; }

daemon_of() { # mountpoint exe -> pid
    local pid real
    real=$(readlink -f "$2")
    for pid in $(pgrep -f -- "$1"); do
        [[ $(readlink -f "/proc/$pid/exe" 2>/dev/null) == "$real" ]] && { echo "$pid"; return; }
    done
    return 1
}

# Aborts the FUSE connection of mountpoint $1 served by daemon $2 (a hung or stopped
# daemon): SIGKILL to the daemon, since the kernel aborts a connection when its last
# /dev/fuse descriptor closes; without a daemon pid, through fusectl
# (/sys/fs/fuse/connections/<s_dev>, if mounted) — never a stat of the mountpoint.
abort_fuse() {
    local mnt=$1 pid=${2:--} dev id
    if [[ $pid != - ]] && kill -0 "$pid" 2>/dev/null; then
        log "aborting the FUSE connection of $mnt: SIGKILL to its daemon $pid"
        kill -9 "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        return
    fi
    dev=$(awk -v m="$mnt" '$5 == m { print $3 }' /proc/self/mountinfo | tail -1)
    [[ $dev == *:* ]] || return 0
    id=$(( (${dev%:*} << 20) | ${dev#*:} ))   # the kernel's dev_t, as fusectl names it
    if [[ -w /sys/fs/fuse/connections/$id/abort ]]; then
        log "aborting the FUSE connection $id of $mnt"
        echo 1 > "/sys/fs/fuse/connections/$id/abort"
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    cd /
    local m p
    if [[ -n $CUR_MNT ]] && mounted "$CUR_MNT"; then
        log "cleanup: unmounting $CUR_MNT"
        timeout 30 umount "$CUR_MNT" 2>/dev/null \
            || { abort_fuse "$CUR_MNT" "$CUR_PID"; timeout 30 umount "$CUR_MNT" || umount -l "$CUR_MNT"; }
    fi
    # Everything else mounted below the scratch directory, deepest first ($FS last).
    awk -v s="$SCRATCH/" 'index($2, s) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do
            [[ $m == "$FS" ]] && continue
            log "cleanup: umount $m"
            timeout 30 umount "$m" 2>/dev/null \
                || { abort_fuse "$m" "$(daemon_of "$m" "$BIN" || daemon_of "$m" "$(command -v fuse-overlayfs)" || echo -)";
                     timeout 30 umount "$m" || umount -l "$m"; }
        done
    for p in "${DAEMONS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$p" 2>/dev/null; then
            log "cleanup: daemon $p still running, SIGTERM"; kill "$p"; sleep 1
            kill -0 "$p" 2>/dev/null && { log "cleanup: SIGKILL $p"; kill -9 "$p"; }
        fi
    done
    if mounted "$FS"; then
        sync -f "$FS"
        umount "$FS" 2>/dev/null || { sleep 2; umount "$FS" 2>/dev/null; } || umount -l "$FS"
    fi
    [[ -n $LOOP ]] && losetup -d "$LOOP" 2>/dev/null
    if awk -v s="$SCRATCH/" 'index($2, s) == 1 { f = 1 } END { exit !f }' /proc/mounts; then
        echo "run.sh: NOT removing $SCRATCH: something is still mounted below it" >&2
    else
        rm -rf "$SCRATCH"
    fi
    # Leftover check: mounts below the scratch directory, our image's loop device, and
    # unmounted fuseblk loop devices still attached to an ovlfuse memfd.
    local left=0 dev bf
    if grep -F " $SCRATCH" /proc/mounts >&2; then left=1; echo "run.sh: LEFTOVER MOUNTS above" >&2; fi
    if losetup -j "$IMG" 2>/dev/null | grep -q .; then
        echo "run.sh: LEFTOVER LOOP DEVICE: $(losetup -j "$IMG")" >&2; left=1
    fi
    for dev in $(printf '%s\n' "${LOOPS_SEEN[@]}" | sort -u); do
        bf="/sys/block/${dev#/dev/}/loop/backing_file"
        if [[ -r $bf ]] && grep -q ovlfuse-fuseblk "$bf" && ! awk -v d="$dev" '$1 == d { f = 1 } END { exit !f }' /proc/mounts; then
            echo "run.sh: LEFTOVER LOOP DEVICE $dev ($(cat "$bf"))" >&2; left=1
        fi
    done
    for p in "${DAEMONS[@]}"; do
        kill -0 "$p" 2>/dev/null && { echo "run.sh: LEFTOVER DAEMON $p" >&2; left=1; }
    done
    [[ $left == 0 ]] && log "cleanup: no mount, loop device or daemon of ours left"
    [[ -n $URING_BEFORE ]] && echo "$URING_BEFORE" > "$URING_PARAM"
    for p in "${STUCK_DROPPERS[@]}"; do
        kill -0 "$p" 2>/dev/null && log "note: our 'echo 3 > drop_caches' (pid $p) is still \
blocked in the kernel behind another filesystem; it ends by itself when that umount does"
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $URING == on ]]; then
    if [[ -w $URING_PARAM ]]; then
        URING_BEFORE=$(cat "$URING_PARAM")
        echo Y > "$URING_PARAM"
    else
        log "note: this kernel has no $URING_PARAM; ovlfuse reads requests from /dev/fuse"
    fi
fi
URING_NOTE="fuse.enable_uring=$(cat "$URING_PARAM" 2>/dev/null || echo absent)"

BIN="$SCRATCH/ovlfuse"
cp "$BIN_SRC" "$BIN"
# What the copied binary was built from, as far as the checkout tells (now, not at the end).
COMMIT=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(cd "$REPO" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | head -1)
BINARY_NOTE="binary $BIN_SRC of $(date -u -r "$BIN_SRC" '+%Y-%m-%d %H:%M UTC')"
[[ -z ${OVLFUSE_BIN:-} && ${OVLFUSE_BENCH_NO_BUILD:-0} != 1 ]] && BINARY_NOTE+=", built by this run"

# ---------------------------------------------------------------- descriptor limit
# ovlfuse raises its soft RLIMIT_NOFILE to the hard one and keeps up to half of it as
# O_PATH descriptors on layer objects (the rest are reopened by file handle): lift the
# hard one as far as we may, so fewer objects need reopening.
NR_OPEN=$(cat /proc/sys/fs/nr_open)
HARD0=$(ulimit -Hn)
if ulimit -Hn "$NR_OPEN" 2>/dev/null; then :; elif prlimit --pid $$ --nofile="$NR_OPEN:$NR_OPEN" 2>/dev/null; then :; fi
ulimit -Sn "$(ulimit -Hn)"
NOFILE=$(ulimit -Hn)
if [[ $NOFILE == "$HARD0" && $NOFILE != "$NR_OPEN" ]]; then
    NOFILE_NOTE="$NOFILE (the hard limit; raising it to $NR_OPEN with ulimit and prlimit was \
refused: no CAP_SYS_RESOURCE), so ovlfuse keeps at most ~$((NOFILE / 2)) layer objects open and \
reopens the others by file handle"
else
    NOFILE_NOTE="$NOFILE (raised from $HARD0)"
fi
log "RLIMIT_NOFILE for the daemons: $NOFILE_NOTE"

# ---------------------------------------------------------------- the ext4 filesystem
SRC_ENTRIES=$(find "$LOWER_SRC" -xdev | wc -l)
SRC_MIB=$(( $(du -sx -B1 "$LOWER_SRC" | cut -f1) >> 20 ))
mib() { local s=$1 n=${1%[kmg]}; case $s in *k) echo $(( (n + 1023) / 1024 ));; *m) echo "$n";; *g) echo $(( n * 1024 ));; esac; }
FIO_MIB=$(mib "$FIO_SIZE"); APPEND_MIB=$(mib "$APPEND_SIZE"); RWF_MIB=$(mib "$RANDWRITE_FILE")
NEED_MIB=$(( 2 * SRC_MIB + 3 * FIO_MIB + 4 * APPEND_MIB + RWF_MIB + 2048 ))
IMAGE_GIB=${OVLFUSE_BENCH_IMAGE_GIB:-$(( NEED_MIB * 5 / 4 / 1024 + 1 ))}
INODES=$(( 2 * SRC_ENTRIES + MEM_ENTRIES + MEM_ENTRIES / 500 + 4 * CREATE + 4 * TAR_ENTRIES + 8 * GIT_FILES + 4 * TOUCH + 100000 ))
AVAIL_MIB=$(( $(df --output=avail -B1M "$(dirname "$IMG")" | tail -1) ))
PARAMS="v1 src=$LOWER_SRC entries=$SRC_ENTRIES fio=$FIO_SIZE append=$APPEND_SIZE touch=$TOUCH \
tar=$TAR_ENTRIES git=$GIT_FILES mem=$MEM_ENTRIES size=${IMAGE_GIB}G inodes=$INODES"

attach_and_mount() {
    LOOP=$(losetup --find --show --direct-io=on "$IMG" 2>/dev/null) || LOOP=$(losetup --find --show "$IMG")
    mount -t ext4 "$LOOP" "$FS"
}

REUSED=0
if [[ -n ${OVLFUSE_BENCH_IMAGE:-} && -f $IMG ]]; then
    attach_and_mount
    if [[ -f $FS/.bench-complete && $(cat "$FS/.bench-complete") == "$PARAMS" ]]; then
        REUSED=1
        log "reusing the image $IMG"
        rm -rf "$FS/runs"
    else
        log "the image $IMG was built with other parameters: rebuilding it"
        umount "$FS"; losetup -d "$LOOP"; LOOP=""; rm -f "$IMG"
    fi
fi
if [[ $REUSED == 0 ]]; then
    (( AVAIL_MIB > NEED_MIB )) \
        || die "$(dirname "$IMG") has $AVAIL_MIB MiB free; the run needs about $NEED_MIB MiB"
    log "ext4 image: $IMG, ${IMAGE_GIB} GiB sparse, $INODES inodes"
    truncate -s "${IMAGE_GIB}G" "$IMG"
    mkfs.ext4 -q -F -N "$INODES" -E lazy_itable_init=0,lazy_journal_init=0 -L ovlfuse-bench "$IMG"
    attach_and_mount
fi
DIO=$(cat "/sys/block/${LOOP#/dev/}/loop/dio" 2>/dev/null || echo 0)
IMAGE_NOTE="${IMAGE_GIB} GiB sparse image on $(findmnt -n -o SOURCE,FSTYPE -T "$(dirname "$IMG")" | tr -s ' ' | sed 's/ / (/; s/$/)/'), attached with losetup $( [[ $DIO == 1 ]] && echo '--direct-io=on' || echo 'WITHOUT direct I/O (refused here), so the host also caches it') as $LOOP"
log "our ext4: $LOOP on $FS (direct I/O: $DIO)"

LOWER="$FS/lower"
INPUTS="$FS/inputs"
MEMLOWER="$FS/memlower"
export BENCH_FIO_SIZE=$FIO_SIZE BENCH_APPEND_SIZE=$APPEND_SIZE BENCH_TOUCH=$TOUCH \
    BENCH_GIT_FILES=$GIT_FILES BENCH_TAR_ENTRIES=$TAR_ENTRIES BENCH_RANDREAD_IO=$RANDREAD_IO \
    BENCH_RANDWRITE_FILE=$RANDWRITE_FILE BENCH_RANDWRITE_IO=$RANDWRITE_IO BENCH_CREATE=$CREATE \
    BENCH_PY_RUNS=$PY_RUNS BENCH_TIMEOUT=$TIMEOUT BENCH_MEM_ENTRIES=$MEM_ENTRIES \
    BENCH_MEM_LIMIT_MIB=$MEM_LIMIT_MIB BENCH_TARBALL="$INPUTS/untar.tar" BENCH_FS="$FS" \
    BENCH_HOME="$SCRATCH/home" BENCH_SUBJECTS="${SUBJECTS[*]}"
if [[ $LOWER_SRC == /usr ]]; then SRC_AT=usr; else SRC_AT=src; fi

if [[ $REUSED == 0 ]]; then
    T0=$(date +%s)
    log "lower layer: copying $LOWER_SRC ($SRC_ENTRIES entries, $SRC_MIB MiB) to $LOWER/$SRC_AT"
    mkdir -p "$LOWER/$SRC_AT" "$INPUTS"
    cp -a --one-file-system "$LOWER_SRC/." "$LOWER/$SRC_AT/"
    log "lower layer: python3 runtime for the chroot workload"
    "$PY" "$HELPER" runtime "$LOWER"
    log "lower layer: workload inputs (fio and append files, touch files, git tree, tarball)"
    "$PY" "$HELPER" inputs "$LOWER" "$INPUTS" "$LOWER/$SRC_AT"
    if (( MEM_ENTRIES > 0 )); then
        log "memory check: $MEM_ENTRIES empty files in $MEMLOWER"
        "$PY" "$HELPER" memtree "$MEMLOWER" "$MEM_ENTRIES"
    fi
    sync -f "$FS"
    echo "$PARAMS" > "$FS/.bench-complete"
    log "built in $(( $(date +%s) - T0 )) s"
fi
# The chroot must work natively before anything is measured through a union.
env -i PATH=/usr/bin:/bin PYTHONDONTWRITEBYTECODE=1 "$(command -v chroot)" "$LOWER" /usr/bin/python3 -c \
    'import json, email, http.client, sqlite3' || die "chroot $LOWER python3 does not work"
ENTRIES=$(find "$LOWER" | wc -l)
LOWER_MIB=$(( $(du -sx -B1 "$LOWER" | cut -f1) >> 20 ))
export BENCH_ENTRIES=$ENTRIES BENCH_TAR_MIB=$(( $(stat -c %s "$INPUTS/untar.tar") >> 20 ))
log "lower layer: $ENTRIES entries, $LOWER_MIB MiB"
if [[ $NOFILE != unlimited ]] && (( ENTRIES + 256 > NOFILE )); then
    log "note: the lower layer has more entries ($ENTRIES) than the daemons' RLIMIT_NOFILE \
($NOFILE): ovlfuse keeps half of it open and reopens the other objects by file handle"
fi

# ---------------------------------------------------------------- emptying the caches
COLD_NOTE=""
case $COLD in
    remount) COLD_NOTE="a remount of the benchmark's ext4 (umount, \`blockdev --flushbufs\` of its loop device, mount)";;
    *) COLD_NOTE="\`echo 3 > /proc/sys/vm/drop_caches\` (after \`sync -f\` of the benchmark's ext4)";;
esac

remount_fs() {
    umount "$FS" || { sleep 1; umount "$FS"; } || die "cannot unmount $FS to empty its caches"
    blockdev --flushbufs "$LOOP"
    if [[ $DIO != 1 ]]; then   # the host's copy of the image
        sync -f "$IMG"
        "$PY" -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED)' "$IMG"
    fi
    mount -t ext4 "$LOOP" "$FS"
}

drop_caches() {
    sync -f "$FS"
    if [[ $COLD == remount ]]; then remount_fs; return; fi
    ( echo 3 > /proc/sys/vm/drop_caches ) &
    local p=$! waited=0
    while kill -0 "$p" 2>/dev/null; do
        sleep 0.1
        waited=$((waited + 1))
        if [[ $COLD == auto ]] && (( waited >= DROP_WAIT * 10 )); then
            log "echo 3 > drop_caches blocked for $DROP_WAIT s (processes in D state below); \
switching to remounting our ext4"
            ps -eo pid=,stat=,wchan:24=,args= | awk '$2 ~ /^D/' | cut -c1-160 | sed 's/^/    /' >&2
            STUCK_DROPPERS+=("$p")
            COLD=remount
            COLD_NOTE="$COLD_NOTE at first; from round $CUR_ROUND on, a remount of the \
benchmark's ext4 (drop_caches was blocked behind another filesystem's stuck umount)"
            remount_fs
            return
        fi
    done
}

# ---------------------------------------------------------------- subjects
writes() { [[ $1 =~ ^(seqwrite|randwrite|append|touch|create|untar|git)$ ]]; }
is_cold() { [[ $1 =~ ^(names|stat|seqread|randread)$ ]]; }

# The native subject's tree for a write session: a new directory on the same ext4 with a
# copy of the lower inputs the session changes, at the same relative paths.
prepare_native() { # session root
    mkdir -p "$2/bench"
    case $1 in
        append) cp -a "$LOWER/bench/append" "$2/bench/";;
        touch) cp -a "$LOWER/bench/touch" "$2/bench/";;
        git) cp -a "$LOWER/bench/gitsrc" "$2/bench/";;
    esac
}


MOUNT_ERR=""
mount_subject() { # subject id session lowerdir -> CUR_ROOT, CUR_MNT, CUR_PID, CUR_RUN
    local s=$1 id=$2 sess=$3 lower=$4
    CUR_RUN="$FS/runs/$id" CUR_PID="-" CUR_MNT="" MOUNT_ERR=""
    mkdir -p "$CUR_RUN"
    if [[ $s == native ]]; then
        if writes "$sess"; then
            CUR_ROOT="$CUR_RUN/root"
            prepare_native "$sess" "$CUR_ROOT"
        else
            CUR_ROOT=$lower
        fi
        return 0
    fi
    mkdir -p "$CUR_RUN/upper" "$CUR_RUN/work" "$MNTBASE/$id"
    CUR_MNT="$MNTBASE/$id"
    local opts="lowerdir=$lower,upperdir=$CUR_RUN/upper,workdir=$CUR_RUN/work" want exe out
    case $s in
        kernel) want=overlay; out=$(timeout 60 mount -t overlay overlay -o "$opts" "$CUR_MNT" 2>&1);;
        fo1) want=fuse.fuse-overlayfs; exe=$(command -v fuse-overlayfs)
             out=$(timeout 60 "$exe" -o "$opts" "$CUR_MNT" 2>&1);;
        ovlfuse) want=fuseblk.ovlfuse; exe=$BIN
             out=$(timeout 60 "$BIN" -o "$opts${OVL_OPTS:+,$OVL_OPTS}" "$CUR_MNT" 2>&1);;
        ovlfuse-plain) want=fuse.ovlfuse; exe=$BIN
             out=$(timeout 60 "$BIN" -o "$opts${OVL_OPTS:+,$OVL_OPTS},nofuseblk" "$CUR_MNT" 2>&1);;
    esac || { MOUNT_ERR="mount failed: ${out//$'\n'/ }"; return 1; }
    local src fstype
    read -r src fstype < <(awk -v m="$CUR_MNT" '$2 == m { print $1, $3 }' /proc/mounts) || true
    [[ ${fstype:-} == "$want" ]] || { MOUNT_ERR="mounted as '${fstype:-nothing}', expected $want"; return 1; }
    [[ $s == ovlfuse ]] && LOOPS_SEEN+=("$src")
    if [[ $s != kernel ]]; then
        CUR_PID=$(daemon_of "$CUR_MNT" "$exe") || { MOUNT_ERR="cannot find the daemon serving $CUR_MNT"; return 1; }
        DAEMONS+=("$CUR_PID")
    fi
    CUR_ROOT=$CUR_MNT
}

unmount_subject() {
    local bad=""
    if [[ -n $CUR_MNT ]] && mounted "$CUR_MNT"; then
        if ! timeout "$UMOUNT_WAIT" umount "$CUR_MNT"; then
            bad="umount $CUR_MNT failed or hung"
            log "$bad: aborting it"
            abort_fuse "$CUR_MNT" "$CUR_PID"
            timeout 30 umount "$CUR_MNT" 2>/dev/null || timeout 30 umount -l "$CUR_MNT" \
                || log "warning: umount -l $CUR_MNT hung too"
        fi
    fi
    if [[ $CUR_PID != - ]]; then
        local i
        for i in $(seq 300); do kill -0 "$CUR_PID" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$CUR_PID" 2>/dev/null; then
            log "daemon $CUR_PID still alive 30 s after umount: SIGKILL"
            kill -9 "$CUR_PID"; bad="daemon did not exit after umount"
        fi
    fi
    [[ -z $CUR_MNT ]] || rmdir "$CUR_MNT" 2>/dev/null || true
    rm -rf "$CUR_RUN"
    CUR_MNT="" CUR_PID="-" CUR_RUN="" UMOUNT_WAIT=120
    [[ -z $bad ]] || { log "warning: $bad"; return 1; }
}

# The sessions that are not cold start with what they read from the lower layer in the
# page cache, whoever runs first in the round (the native write sessions work on copies
# made just before, so already cached).
prewarm() { # session
    case $1 in
        append) cat "$LOWER/bench/append" > /dev/null;;
        touch) cat "$LOWER"/bench/touch/* > /dev/null;;
        git) find "$LOWER/bench/gitsrc" -type f -exec cat {} + > /dev/null;;
        untar) cat "$INPUTS/untar.tar" > /dev/null;;
        python) env -i PATH=/usr/bin:/bin PYTHONDONTWRITEBYTECODE=1 "$(command -v chroot)" "$LOWER" \
                    /usr/bin/python3 -c 'import json, email, http.client, sqlite3';;
    esac
}

RAW="$SCRATCH/raw.jsonl"
: > "$RAW"
CUR_ROUND=0
UNMOUNT_PROBLEMS=()

run_one() { # round subject session
    local r=$1 s=$2 sess=$3 id="r$1-$3-$2"
    is_cold "$sess" && drop_caches
    sync -f "$FS"
    if ! mount_subject "$s" "$id" "$sess" "$LOWER"; then
        "$PY" "$HELPER" fail "$sess" "$s" "$r" "$MOUNT_ERR" "$RAW"
        unmount_subject || true
        return
    fi
    prewarm "$sess"
    # The helper bounds each command itself; this bounds the python loops (create, touch)
    # on a hung mount too.
    local n rc=0
    n=$(case $sess in names|stat|create) echo 2;; *) echo 1;; esac)
    timeout --foreground -k 10 $(( TIMEOUT * n + 30 )) "$PY" "$HELPER" session "$sess" "$s" "$r" \
        "$CUR_ROOT" "$CUR_PID" "$RAW" || rc=$?
    if (( rc != 0 && rc != 3 )); then
        "$PY" "$HELPER" fail "$sess" "$s" "$r" "TIMEOUT: killed after $(( TIMEOUT * n + 30 )) s" "$RAW"
    fi
    # After a timeout the mount is probably hung: give umount 10 s, not 120, before aborting.
    (( rc == 0 )) || UMOUNT_WAIT=10
    if [[ $CUR_PID != - ]] && ! kill -0 "$CUR_PID" 2>/dev/null; then
        log "warning: the $s daemon died during $sess (round $r)"
        UNMOUNT_PROBLEMS+=("round $r, $s, $sess: the daemon died during the run")
    fi
    unmount_subject || UNMOUNT_PROBLEMS+=("round $r, $s, $sess: unmount failed or hung (connection aborted)")
}

START=$(date +%s)
ROUND_LOADS=()
for r in $(seq "$ROUNDS"); do
    CUR_ROUND=$r
    ROUND_LOADS+=("$(cut -d' ' -f1 /proc/loadavg)")
    log "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
    # Rotate the subjects' order every round, so none always runs first on cold disks.
    k=$(( (r - 1) % ${#SUBJECTS[@]} ))
    order=("${SUBJECTS[@]:k}" "${SUBJECTS[@]:0:k}")
    log "round $r/$ROUNDS (${order[*]})"
    for sess in "${SESSIONS[@]}"; do
        for s in "${order[@]}"; do run_one "$r" "$s" "$sess"; done
    done
done

# ---------------------------------------------------------------- memory check
MEM_SUBJECTS=()
for s in ovlfuse fo1; do [[ " ${SUBJECTS[*]} " == *" $s "* ]] && MEM_SUBJECTS+=("$s"); done
if (( MEM_ENTRIES > 0 )) && (( ${#MEM_SUBJECTS[@]} )); then
    log "memory check: stat-walk of $MEM_ENTRIES entries"
    for s in "${MEM_SUBJECTS[@]}"; do
        sync -f "$FS"
        if mount_subject "$s" "mem-$s" memwalk "$MEMLOWER"; then
            timeout --foreground -k 10 $(( TIMEOUT * 4 + 60 )) "$PY" "$HELPER" memwalk "$s" "$CUR_ROOT" "$CUR_PID" "$RAW" \
                || log "warning: the memory walk of $s was killed"
        else
            log "warning: memory check: $s: $MOUNT_ERR"
        fi
        unmount_subject || UNMOUNT_PROBLEMS+=("memory check, $s: unmount failed or hung")
    done
    # When ovlfuse's whole walk failed, a walk that fits in the descriptor limit (80 % of
    # it) still gives its memory per entry.
    if [[ " ${MEM_SUBJECTS[*]} " == *" ovlfuse "* ]] && tail -n "${#MEM_SUBJECTS[@]}" "$RAW" |
            grep '"subject": "ovlfuse"' | grep -q '"status": "failed"'; then
        dirs=$(( NOFILE * 8 / 10 / 1001 ))
        (( dirs > MEM_ENTRIES / 1000 )) && dirs=$(( MEM_ENTRIES / 1000 ))
        if (( dirs > 0 )); then
            log "memory check: ovlfuse's whole walk failed; walking the first $dirs directories"
            if mount_subject ovlfuse mem-part memwalk "$MEMLOWER"; then
                timeout --foreground -k 10 $(( TIMEOUT * 4 + 60 )) "$PY" "$HELPER" memwalk-part ovlfuse "$CUR_ROOT" \
                    "$CUR_PID" "$RAW" "$dirs" || log "warning: the partial memory walk was killed"
            else
                log "warning: memory check: ovlfuse: $MOUNT_ERR"
            fi
            unmount_subject || UNMOUNT_PROBLEMS+=("memory check (partial): unmount failed or hung")
        fi
    fi
fi

ELAPSED=$(( $(date +%s) - START ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
# Busy: someone else was running at launch (1-minute load >= 1.5), or the load during the
# rounds was well above what this benchmark makes on its own (one workload process plus one
# daemon, with their I/O waits: about 1-3): median of the round-start loads >= 3.5.
busy=$(printf '%s\n' "${ROUND_LOADS[@]}" | sort -g | awk -v l="${LOAD_AT_LAUNCH%% *}" \
    '{ v[NR] = $1 } END { m = NR ? (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) : 0;
       print (l >= 1.5 || m >= 3.5) ? 1 : 0 }')
LABEL=""
if [[ $QUICK == 1 ]]; then
    if [[ $busy == 1 ]]; then
        LABEL="**Smoke run on a busy machine — not the reference measurement** (\`OVLFUSE_BENCH_QUICK=1\`: small tree, small sizes, one round; other work was running, see the load averages below)."
    else
        LABEL="**Smoke run — not the reference measurement** (\`OVLFUSE_BENCH_QUICK=1\`: small tree, small sizes, one round)."
    fi
elif [[ $busy == 1 ]]; then
    LABEL="**Run on a busy machine — not the reference measurement** (other work was running: see the load averages below)."
fi
[[ -n $LABEL ]] && LABEL+=$'\n\n'
NOTES=""
for n in "${UNMOUNT_PROBLEMS[@]}"; do NOTES+="- **$n**"$'\n'; done
export BENCH_LABEL="$LABEL" BENCH_EXTRA_NOTES="$NOTES" BENCH_NOW="$(date -u '+%Y-%m-%d %H:%M UTC')" \
    BENCH_KERNEL="$(uname -r)" BENCH_NCPU="$(nproc)" \
    BENCH_CPU_MODEL="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
    BENCH_MEM="$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)" \
    BENCH_LOAD_NOTE="$LOAD_AT_LAUNCH when the script started (a quiet machine: below 1.5), \
${ROUND_LOADS[*]} (1 minute) at the start of each round, $LOAD_END at the end (this benchmark \
alone makes about 1-3 on this machine)" \
    BENCH_BINARY_NOTE="$BINARY_NOTE" \
    BENCH_ELAPSED="$(( ELAPSED / 60 )) min $(( ELAPSED % 60 )) s (plus building the tree)" \
    BENCH_COMMIT="$COMMIT" \
    BENCH_DIRTY_NOTE="${DIRTY:+ (working tree has uncommitted changes in src/)}" \
    BENCH_FO1_VERSION="$(fuse-overlayfs --version 2>&1 | awk '/^fuse-overlayfs: version/ { print $NF; exit }')" \
    BENCH_FIO_VERSION="$(fio --version | sed 's/^fio-//')" \
    BENCH_MODE="$( [[ $QUICK == 1 ]] && echo 'quick (OVLFUSE_BENCH_QUICK=1)' || echo full)" \
    BENCH_ROUNDS="$ROUNDS" BENCH_IMAGE_NOTE="$IMAGE_NOTE" BENCH_LOWER_SRC="$LOWER_SRC" \
    BENCH_LOWER_MIB="$LOWER_MIB" BENCH_COLD_NOTE="$COLD_NOTE" BENCH_OVLFUSE_OPTS="$OVL_OPTS" \
    BENCH_NOFILE_NOTE="$NOFILE_NOTE" BENCH_URING_NOTE="$URING_NOTE"
"$PY" "$HELPER" report "$RAW" "$RESULTS"
