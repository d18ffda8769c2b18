#!/usr/bin/env bash
# Cost of the fuseblk transport (fuseblk.ovlfuse + the FUSE_SYNCFS relay, src/relay.rs)
# against plain fuse.ovlfuse (fuser reading /dev/fuse itself), on metadata operations.
#
# Usage (as root, from anywhere):   benches/transport.sh
# Environment (defaults in brackets):
#   OVLFUSE_BENCH_ROUNDS [5]        rounds; each round mounts each transport once, fresh
#   OVLFUSE_BENCH_FILES  [20000]    files in the lower tree
#   OVLFUSE_BENCH_DIRS   [200]      directories they are spread over
#   OVLFUSE_BENCH_CREATE [5000]     files created / stat'ed / removed per round
#   OVLFUSE_BENCH_OPENS  [10000]    open+close pairs on one lower file per round
#   OVLFUSE_BENCH_STAT_WAIT [1.2]   seconds to wait between create and stat, so the
#                                   entries (default timeout=1 s) have expired and every
#                                   stat reaches the daemon; 0 to stat straight away
#   OVLFUSE_BENCH_OPTS   []         extra mount options for both transports, e.g.
#                                   "timeout=60" (then raise OVLFUSE_BENCH_STAT_WAIT too)
#   OVLFUSE_BENCH_LOWER  []         use this existing lower tree (never modified or removed)
#   OVLFUSE_BENCH_KEEP_LOWER [0]    1: build the lower tree in /tmp/ovlfuse-bench-lower-F-D
#                                   and keep it for the next run (reused if complete)
#   OVLFUSE_BENCH_TMP    [/tmp]     where the scratch directory is made
#   OVLFUSE_BENCH_NO_BUILD [0]      1: do not run `cargo build --release`
#   OVLFUSE_BENCH_DROP   [auto]     how caches are emptied before the cold find:
#                                   3     `echo 3 > drop_caches` (waits as long as it takes)
#                                   2     `echo 2 > drop_caches` (dentries and inodes) plus
#                                         `blockdev --flushbufs` of the lower's block device
#                                         (its metadata blocks): never waits for another
#                                         filesystem
#                                   auto  3, but if that is still blocked after
#                                         OVLFUSE_BENCH_DROP_WAIT [15] s, 2 from then on
#                                   (echo 3 walks every superblock and blocks behind any
#                                   umount stuck in another FUSE daemon; the script never
#                                   runs a global sync(1) for the same reason)
#   OVLFUSE_BIN          [target/release/ovlfuse]  binary to measure (copied at start, so a
#                                   rebuild during the run cannot mix two versions)
#   OVLFUSE_BENCH_RESULTS [benches/RESULTS-transport.md]  markdown output ("-": none)
#   OVLFUSE_BENCH_NOFILE [/proc/sys/fs/nr_open]  RLIMIT_NOFILE (soft and hard) for the
#                                   daemons: ovlfuse keeps one O_PATH descriptor per inode the
#                                   kernel knows, so a find over more inodes than the limit
#                                   fails with EMFILE ("keep" leaves the inherited limit).
#                                   Where the hard limit cannot be raised (no CAP_SYS_RESOURCE)
#                                   and OVLFUSE_BENCH_FILES is unset, the lower tree is cut to
#                                   fit, with a warning that the results file repeats.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

ROUNDS=${OVLFUSE_BENCH_ROUNDS:-5}
FILES=${OVLFUSE_BENCH_FILES:-20000}
DIRS=${OVLFUSE_BENCH_DIRS:-200}
CREATE=${OVLFUSE_BENCH_CREATE:-5000}
OPENS=${OVLFUSE_BENCH_OPENS:-10000}
STAT_WAIT=${OVLFUSE_BENCH_STAT_WAIT:-1.2}
TMPBASE=${OVLFUSE_BENCH_TMP:-/tmp}
RESULTS=${OVLFUSE_BENCH_RESULTS:-$HERE/RESULTS-transport.md}
BIN_SRC=${OVLFUSE_BIN:-$REPO/target/release/ovlfuse}

die() { echo "transport.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

for v in ROUNDS FILES DIRS CREATE OPENS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "OVLFUSE_BENCH_$v must be a positive integer (got '${!v}')"
done
[[ $STAT_WAIT =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "OVLFUSE_BENCH_STAT_WAIT must be a number of seconds"
[[ $(id -u) == 0 ]] || die "must run as root (fuseblk mounts, drop_caches)"
[[ -w /proc/sys/vm/drop_caches ]] || die "/proc/sys/vm/drop_caches is not writable"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing (modprobe fuse)"
[[ -e /dev/loop-control ]] || die "/dev/loop-control is missing (modprobe loop): fuseblk needs it"
for tool in python3 find rm umount pgrep losetup blockdev df; do
    command -v "$tool" >/dev/null || die "'$tool' not found (apt-get install -y python3 findutils procps mount)"
done

if [[ -z ${OVLFUSE_BIN:-} && ${OVLFUSE_BENCH_NO_BUILD:-0} != 1 ]]; then
    log "cargo build --release"
    (cd "$REPO" && cargo build --release --quiet) \
        || die "cargo build --release failed (set OVLFUSE_BENCH_NO_BUILD=1 to measure the existing binary)"
fi
[[ -x $BIN_SRC ]] || die "no binary at $BIN_SRC"

# ---------------------------------------------------------------- scratch and cleanup
mkdir -p "$TMPBASE"
SCRATCH=$(mktemp -d "$TMPBASE/ovlfuse-bench-transport.XXXXXX")
LOOPS_SEEN=()      # loop devices our fuseblk mounts used, checked at the end
STUCK_DROPPERS=()  # drop_caches writers left blocked in the kernel (see drop_caches)
CUR_ROUND=0
CUR_MNT=""         # the mount currently up, if any
CUR_PID=""         # its daemon

mounted() { awk -v m="$1" '$2 == m { found = 1 } END { exit !found }' /proc/mounts; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $CUR_MNT ]] && mounted "$CUR_MNT"; then
        log "cleanup: unmounting $CUR_MNT"
        umount "$CUR_MNT" 2>/dev/null || umount -l "$CUR_MNT"
    fi
    # Anything else still mounted below the scratch directory (deepest first).
    awk -v s="$SCRATCH/" 'index($2, s) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do log "cleanup: umount -l $m"; umount -l "$m"; done
    if [[ -n $CUR_PID ]]; then
        for _ in $(seq 50); do kill -0 "$CUR_PID" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$CUR_PID" 2>/dev/null; then
            log "cleanup: daemon $CUR_PID still running, sending SIGTERM"
            kill "$CUR_PID"; sleep 1
        fi
    fi
    if awk -v s="$SCRATCH/" 'index($2, s) == 1 { f = 1 } END { exit !f }' /proc/mounts; then
        echo "transport.sh: NOT removing $SCRATCH: something is still mounted below it" >&2
    else
        rm -rf "$SCRATCH"
    fi
    # Leftover check: our mounts, and our loop devices still attached to an ovlfuse memfd
    # without being mounted (a loop number may meanwhile be reused by someone else's mount).
    local left=0
    if grep -F " $SCRATCH" /proc/mounts >&2; then left=1; echo "transport.sh: LEFTOVER MOUNTS above" >&2; fi
    local dev
    for dev in $(printf '%s\n' "${LOOPS_SEEN[@]}" | sort -u); do
        local bf="/sys/block/${dev#/dev/}/loop/backing_file"
        if [[ -r $bf ]] && grep -q ovlfuse-fuseblk "$bf" && ! awk -v d="$dev" '$1 == d { f = 1 } END { exit !f }' /proc/mounts; then
            echo "transport.sh: LEFTOVER LOOP DEVICE $dev ($(cat "$bf"))" >&2; left=1
        fi
    done
    if [[ $left == 0 ]]; then
        log "cleanup: no mount or loop device of ours left (${#LOOPS_SEEN[@]} fuseblk mounts made)"
    fi
    local p
    for p in "${STUCK_DROPPERS[@]}"; do
        kill -0 "$p" 2>/dev/null && log "note: our 'echo 3 > drop_caches' (pid $p) is still \
blocked in the kernel behind another filesystem; it ends by itself when that umount does"
    done
    local others
    others=$(grep ovlfuse /proc/mounts || true)
    [[ -n $others ]] && log "note: other ovlfuse mounts exist (not ours):"$'\n'"$others"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

BIN="$SCRATCH/ovlfuse"
cp "$BIN_SRC" "$BIN"

# The daemon holds an O_PATH descriptor for every inode the kernel has looked up (until
# FORGET), and raises its soft RLIMIT_NOFILE to the hard one: lift the hard one here.
NOFILE=${OVLFUSE_BENCH_NOFILE:-$(cat /proc/sys/fs/nr_open)}
if [[ $NOFILE != keep ]]; then
    ulimit -Hn "$NOFILE" 2>/dev/null && ulimit -Sn "$NOFILE" \
        || log "warning: cannot set RLIMIT_NOFILE to $NOFILE; keeping $(ulimit -Hn)"
fi
NOFILE=$(ulimit -Hn)
# Peak: every lower file and directory plus the created files, plus the daemon's own.
FILES_NOTE=""
if [[ $NOFILE != unlimited ]] && (( FILES + DIRS + CREATE + 256 > NOFILE )); then
    [[ -n ${OVLFUSE_BENCH_FILES:-} ]] && die "RLIMIT_NOFILE is $NOFILE (hard; cannot be raised \
here): the daemon needs one descriptor per inode, so FILES+DIRS+CREATE+256 must fit in it"
    FILES=$(( (NOFILE - DIRS - CREATE - 256) / DIRS * DIRS ))
    (( FILES > 0 )) || die "RLIMIT_NOFILE $NOFILE is too small for this benchmark"
    FILES_NOTE="lower tree cut from 20000 to $FILES files: RLIMIT_NOFILE is $NOFILE here and \
cannot be raised (no CAP_SYS_RESOURCE), and the daemon holds one descriptor per inode"
    log "warning: $FILES_NOTE"
fi

# ---------------------------------------------------------------- helpers (python3)
cat > "$SCRATCH/op.py" <<'PY'
# op.py PID WORKLOAD ARGS... -> prints wall seconds, then the daemon's CPU seconds: all
# threads, relay threads (ovlfuse-relay-*), fuser workers (fuser-*), health checker.
import os, subprocess, sys, time

GROUPS = ("relay", "workers", "health")

def group(comm):
    if comm.startswith("ovlfuse-relay"):
        return "relay"
    if comm.startswith("fuser"):
        return "workers"
    if comm == "ovlfuse-health":
        return "health"
    return "other"

def daemon_cpu(pid):
    """CPU nanoseconds per thread of the daemon (schedstat), keyed by (tid, group)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[(tid, group(comm))] = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out

def cpu_delta(before, after):
    if before is None or after is None:
        return [float("nan")] * (1 + len(GROUPS))
    by = dict.fromkeys(GROUPS + ("other",), 0)
    for key, ns in after.items():
        by[key[1]] += ns - before.get(key, 0)
    return [sum(by.values()) / 1e9] + [by[g] / 1e9 for g in GROUPS]

pid, work, args = sys.argv[1], sys.argv[2], sys.argv[3:]

def find(mnt):
    subprocess.run(["find", mnt, "-printf", "%s\n"], stdout=subprocess.DEVNULL, check=True)

def create(d, n):
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    op, cl = os.open, os.close
    for i in range(int(n)):
        cl(op(f"{d}/c{i:05d}", flags, 0o644))

def stat(d, n):
    st = os.stat
    for i in range(int(n)):
        st(f"{d}/c{i:05d}")

def rm(d):
    subprocess.run(["rm", "-rf", d], check=True)

def openclose(path, n):
    op, cl, fl = os.open, os.close, os.O_RDONLY | os.O_CLOEXEC
    for _ in range(int(n)):
        cl(op(path, fl))

fn = {"find": find, "create": create, "stat": stat, "rm": rm, "openclose": openclose}[work]
c0 = daemon_cpu(pid)
t0 = time.perf_counter()
fn(*args)
t1 = time.perf_counter()
c1 = daemon_cpu(pid)
print(" ".join(f"{x:.6f}" for x in [t1 - t0] + cpu_delta(c0, c1)))
PY

cat > "$SCRATCH/mklower.py" <<'PY'
# mklower.py DIR FILES DIRS: FILES small files (0..199 bytes) spread over DIRS directories.
import os, sys
root, files, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for d in range(dirs):
    os.makedirs(f"{root}/d{d:04d}", exist_ok=True)
for i in range(files):
    with open(f"{root}/d{i % dirs:04d}/f{i:06d}", "wb") as f:
        f.write(b"x" * (i % 200))
with open(f"{root}/.complete", "w") as f:
    f.write(f"{files} {dirs}\n")
PY

# ---------------------------------------------------------------- lower tree
if [[ -n ${OVLFUSE_BENCH_LOWER:-} ]]; then
    LOWER=$(cd "$OVLFUSE_BENCH_LOWER" && pwd) || die "OVLFUSE_BENCH_LOWER: no such directory"
    log "lower tree: $LOWER (given; not modified)"
else
    if [[ ${OVLFUSE_BENCH_KEEP_LOWER:-0} == 1 ]]; then
        LOWER="$TMPBASE/ovlfuse-bench-lower-$FILES-$DIRS"
    else
        LOWER="$SCRATCH/lower"
    fi
    if [[ -f $LOWER/.complete && $(cat "$LOWER/.complete") == "$FILES $DIRS" ]]; then
        log "lower tree: reusing $LOWER"
    else
        rm -rf "$LOWER"
        log "lower tree: building $FILES files in $DIRS directories in $LOWER"
        python3 "$SCRATCH/mklower.py" "$LOWER" "$FILES" "$DIRS"
    fi
fi
OPEN_TARGET=$(cd "$LOWER" && find . -type f ! -name .complete -print -quit)
OPEN_TARGET=${OPEN_TARGET#./}
[[ -n $OPEN_TARGET ]] || die "the lower tree $LOWER has no regular file"

# ---------------------------------------------------------------- emptying the caches
DROP=${OVLFUSE_BENCH_DROP:-auto}
DROP_WAIT=${OVLFUSE_BENCH_DROP_WAIT:-15}
[[ $DROP =~ ^(auto|2|3)$ ]] || die "OVLFUSE_BENCH_DROP must be auto, 2 or 3"
[[ $DROP_WAIT =~ ^[1-9][0-9]*$ ]] || die "OVLFUSE_BENCH_DROP_WAIT must be a positive integer"
DROP_NOTE=""
FLUSHBUFS_NOTE=""
LOWER_DEV=$(df --output=source "$LOWER" | tail -1)
[[ -b $LOWER_DEV ]] || LOWER_DEV=""

blocked_report() { # processes in uninterruptible sleep, for the warning
    ps -eo pid=,stat=,wchan:24=,args= | awk '$2 ~ /^D/' | cut -c1-160 | sed 's/^/    /' >&2
}

drop_caches() {
    # Only the filesystems this benchmark wrote to: a global sync(1) blocks behind any
    # superblock held by a stuck umount.
    sync -f "$LOWER"; sync -f "$SCRATCH"
    if [[ $DROP != 2 ]]; then
        ( echo 3 > /proc/sys/vm/drop_caches ) &
        local p=$! waited=0
        while kill -0 "$p" 2>/dev/null; do
            sleep 0.1
            waited=$((waited + 1))
            if (( waited % (DROP_WAIT * 10) == 0 )); then
                log "echo 3 > drop_caches blocked for $((waited / 10)) s; processes in D state:"
                blocked_report
                if [[ $DROP == auto ]]; then
                    STUCK_DROPPERS+=("$p")
                    DROP=2
                    DROP_NOTE="echo 3 > drop_caches blocked behind another filesystem's \
superblock (a hung umount elsewhere on the machine), so caches were dropped with \
echo 2 + blockdev --flushbufs from round $CUR_ROUND on"
                    log "switching to: $DROP_NOTE"
                    break
                fi
            fi
        done
        [[ $DROP == 3 || $DROP == auto ]] && return 0
    fi
    echo 2 > /proc/sys/vm/drop_caches
    if [[ -n $LOWER_DEV ]] && ! blockdev --flushbufs "$LOWER_DEV" 2>/dev/null; then
        log "warning: blockdev --flushbufs $LOWER_DEV refused: the lower's metadata blocks stay cached"
        FLUSHBUFS_NOTE="blockdev --flushbufs $LOWER_DEV was refused here (no access to the \
device), so the lower filesystem's metadata blocks stayed in memory: only its dentries and \
inodes were cold"
        LOWER_DEV=""
    fi
    return 0
}

# ---------------------------------------------------------------- one round of one transport
RAW="$SCRATCH/raw.tsv"
: > "$RAW"

mount_one() { # transport -> sets CUR_MNT, CUR_PID
    local t=$1 d="$SCRATCH/run-$2-$1"
    mkdir -p "$d/upper" "$d/work" "$d/mnt"
    local opts="lowerdir=$LOWER,upperdir=$d/upper,workdir=$d/work"
    [[ -n ${OVLFUSE_BENCH_OPTS:-} ]] && opts+=",$OVLFUSE_BENCH_OPTS"
    [[ $t == plain ]] && opts+=",nofuseblk"
    CUR_MNT="$d/mnt"
    "$BIN" -o "$opts" "$CUR_MNT" || die "mount failed: $BIN -o $opts $CUR_MNT"
    local want fstype src
    want=$([[ $t == plain ]] && echo fuse.ovlfuse || echo fuseblk.ovlfuse)
    read -r src fstype < <(awk -v m="$CUR_MNT" '$2 == m { print $1, $3 }' /proc/mounts) || true
    [[ ${fstype:-} == "$want" ]] \
        || die "$t: $CUR_MNT is mounted as '${fstype:-nothing}', expected $want (see the daemon's syslog)"
    [[ $t == fuseblk ]] && LOOPS_SEEN+=("$src")
    local real pid
    real=$(readlink -f "$BIN")
    CUR_PID=""
    for pid in $(pgrep -f -- "$CUR_MNT"); do
        [[ $(readlink -f "/proc/$pid/exe" 2>/dev/null) == "$real" ]] && CUR_PID=$pid
    done
    [[ -n $CUR_PID ]] || die "$t: cannot find the daemon serving $CUR_MNT"
}

unmount_one() {
    umount "$CUR_MNT" || die "umount $CUR_MNT failed"
    local i
    for i in $(seq 300); do
        kill -0 "$CUR_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$CUR_PID" 2>/dev/null && die "daemon $CUR_PID still alive 30 s after umount $CUR_MNT"
    CUR_PID=""
    rm -rf "$(dirname "$CUR_MNT")"
    CUR_MNT=""
}

measure() { # round transport workload args...
    local r=$1 t=$2 w=$3; shift 3
    local out
    out=$(python3 "$SCRATCH/op.py" "$CUR_PID" "$@") || die "$t round $r: workload $w failed"
    mounted "$CUR_MNT" && kill -0 "$CUR_PID" 2>/dev/null \
        || die "$t round $r: the mount or its daemon went away during $w"
    printf '%s\t%s\t%s\t%s\n' "$r" "$t" "$w" "${out// /$'\t'}" >> "$RAW"
    printf '  %-8s %-12s %8.3f s   daemon cpu %7.3f s (relay %.3f, fuser workers %.3f, health %.3f)\n' \
        "$t" "$w" ${out} >&2
}

one_round() { # round transport
    local r=$1 t=$2
    CUR_ROUND=$r
    mount_one "$t" "$r"
    drop_caches
    measure "$r" "$t" find-cold find "$CUR_MNT"
    measure "$r" "$t" find-warm find "$CUR_MNT"
    mkdir "$CUR_MNT/bench-create"
    measure "$r" "$t" create create "$CUR_MNT/bench-create" "$CREATE"
    sleep "$STAT_WAIT"
    measure "$r" "$t" stat stat "$CUR_MNT/bench-create" "$CREATE"
    measure "$r" "$t" rm-rf rm "$CUR_MNT/bench-create"
    measure "$r" "$t" open-close openclose "$CUR_MNT/$OPEN_TARGET" "$OPENS"
    unmount_one
}

START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$ROUNDS"); do
    # Alternate which transport goes first, so neither always runs on a warmer machine.
    if (( r % 2 )); then order=(fuseblk plain); else order=(plain fuseblk); fi
    log "round $r/$ROUNDS (${order[*]})"
    for t in "${order[@]}"; do one_round "$r" "$t"; done
done
ELAPSED=$(( $(date +%s) - START ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
COMMIT=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(cd "$REPO" && git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | head -1)
export EXTRA_OPTS=${OVLFUSE_BENCH_OPTS:-}
export DROP_NOTE FLUSHBUFS_NOTE DROP FILES_NOTE NOFILE ROUNDS FILES DIRS CREATE OPENS STAT_WAIT ELAPSED LOAD_START LOAD_END COMMIT
export DIRTY_NOTE=${DIRTY:+" (working tree has uncommitted changes in src/)"}
export KERNEL=$(uname -r) NCPU=$(nproc)
export CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
export NOW=$(date -u '+%Y-%m-%d %H:%M UTC')
python3 - "$RAW" "$RESULTS" <<'PY'
import os, statistics, sys
raw, out = sys.argv[1], sys.argv[2]
E = os.environ
order = ["find-cold", "find-warm", "create", "stat", "rm-rf", "open-close"]
what = {
    "find-cold": f"`find -printf '%s\\n'` over {E['FILES']} files / {E['DIRS']} dirs, fresh mount, caches dropped",
    "find-warm": "the same, right after",
    "create": f"{E['CREATE']} × open(O_CREAT\\|O_EXCL)+close in a new directory",
    "stat": f"{E['CREATE']} × stat of those, {E['STAT_WAIT']} s later (entries expired)",
    "rm-rf": f"`rm -rf` of that directory",
    "open-close": f"{E['OPENS']} × open(O_RDONLY)+close of one lower file",
}
data = {}
for line in open(raw):
    r, t, w, *vals = line.split("\t")
    data.setdefault((w, t), []).append(tuple(map(float, vals)))

def fmt(x): return f"{x:.3f}"
rows, cpurows = [], []
for w in order:
    s = {t: [v[0] for v in data.get((w, t), [])] for t in ("fuseblk", "plain")}
    c = {t: [v[1] for v in data.get((w, t), [])] for t in ("fuseblk", "plain")}
    if not s["fuseblk"] or not s["plain"]:
        continue
    mb, mp = statistics.median(s["fuseblk"]), statistics.median(s["plain"])
    rows.append([w, fmt(mb), fmt(min(s["fuseblk"])), fmt(max(s["fuseblk"])),
                 fmt(mp), fmt(min(s["plain"])), fmt(max(s["plain"])), f"{mb / mp:.2f}"])
    cb, cp = statistics.median(c["fuseblk"]), statistics.median(c["plain"])
    med = lambda t, i: statistics.median(v[i] for v in data[(w, t)])
    cpurows.append([w, fmt(cb), fmt(med("fuseblk", 2)), fmt(med("fuseblk", 3)),
                    fmt(med("fuseblk", 4)), fmt(cp), fmt(med("plain", 3)), fmt(med("plain", 4)),
                    f"{cb / cp:.2f}" if cp > 0 else "-"])

head = ["workload", "fuseblk median", "min", "max", "plain median", "min", "max", "ratio fuseblk/plain"]
chead = ["workload", "fuseblk total", "of it relay", "fuser workers", "health",
         "plain total", "fuser workers", "health", "ratio fuseblk/plain"]

# terminal
w0 = max(len(r[0]) for r in rows + [head])
print()
print(f"{'wall seconds':<{w0}}  {'fuseblk: median':>15} {'min':>7} {'max':>7}   {'plain: median':>13} {'min':>7} {'max':>7}   {'ratio':>6}")
for r in rows:
    print(f"{r[0]:<{w0}}  {r[1]:>15} {r[2]:>7} {r[3]:>7}   {r[4]:>13} {r[5]:>7} {r[6]:>7}   {r[7]:>6}")
print()
print(f"{'daemon CPU s':<{w0}}  {'fuseblk: median':>15} {'relay':>7} {'fuser':>7} {'health':>7}   {'plain: median':>13} {'fuser':>7} {'health':>7}   {'ratio':>6}")
for r in cpurows:
    print(f"{r[0]:<{w0}}  {r[1]:>15} {r[2]:>7} {r[3]:>7} {r[4]:>7}   {r[5]:>13} {r[6]:>7} {r[7]:>7}   {r[8]:>6}")
print(f"\n{E['ROUNDS']} rounds in {E['ELAPSED']} s; load average {E['LOAD_START']} at start, {E['LOAD_END']} at end")

if out == "-":
    sys.exit(0)
def table(h, rs):
    lines = ["| " + " | ".join(h) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(h))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rs]
    return "\n".join(lines)
raw_rows = []
for w in order:
    for t in ("fuseblk", "plain"):
        vals = data.get((w, t), [])
        raw_rows.append([w, t, " ".join(f"{v[0]:.3f}" for v in vals)])
if E["DROP"] == "2" and not E["DROP_NOTE"]:
    drop = "`echo 2 > /proc/sys/vm/drop_caches` + `blockdev --flushbufs` of the lower's device"
else:
    drop = "`echo 3 > /proc/sys/vm/drop_caches`"
notes = f"- caches emptied before each cold find with {drop}\n"
for n in ("FILES_NOTE", "DROP_NOTE", "FLUSHBUFS_NOTE"):
    if E[n]:
        notes += f"- **{E[n]}**\n"
md = f"""# fuseblk + relay against plain fuse: metadata operations

Generated by `benches/transport.sh` on {E['NOW']}.

- kernel `{E['KERNEL']}`, {E['NCPU']} CPUs ({E['CPU_MODEL']}); ovlfuse at `{E['COMMIT']}`{E['DIRTY_NOTE']}
- parameters: {E['ROUNDS']} rounds, lower tree of {E['FILES']} files in {E['DIRS']} directories,
  {E['CREATE']} files created/stat'ed/removed, {E['OPENS']} open+close pairs, stat wait {E['STAT_WAIT']} s
- each round mounts each transport fresh (the order alternates round by round); {"mount options `" + E['EXTRA_OPTS'] + "` on top of the defaults" if E['EXTRA_OPTS'] else "default mount options (threads = CPU count, timeout=1)"}; RLIMIT_NOFILE {E['NOFILE']}
{notes}- run took {E['ELAPSED']} s; load average {E['LOAD_START']} at start, {E['LOAD_END']} at end

`fuseblk` = the default for root: `fuseblk.ovlfuse` on a tiny loop device, every request
relayed (src/relay.rs). `plain` = `-o nofuseblk`: `fuse.ovlfuse`, fuser on /dev/fuse with
one cloned descriptor per worker. Times are wall-clock seconds for the whole workload.

## Wall time (seconds)

{table(head, rows)}

## Daemon CPU (seconds per workload, medians; from /proc/PID/task/*/schedstat)

"relay" = the relay threads (`ovlfuse-relay-*`, fuseblk only), "fuser workers" = fuser's
session threads, "health" = the upper-error checker (`ovlfuse-health`); the total also has
the main and signal threads.

{table(chead, cpurows)}

## Reading the numbers

- find-warm depends on the entry timeout (timeout=1 s by default): whatever the cold find
  looked up more than a second before the warm find reaches it has expired and is looked
  up again. A transport whose cold find takes longer than the timeout therefore redoes
  most of the tree, one that finishes faster redoes almost none of it, so this ratio
  shows that threshold more than the cost per request (`OVLFUSE_BENCH_OPTS=timeout=60`
  takes it out).
- stat waits out the timeout first, so each of its stats is one `LOOKUP`.
- Kernels without commit 26e5c67deb2e ("fuse: fix livelock in synchronous file put from
  fuseblk workers", mainline since autumn 2025, marked for stable; 6.18 has it) send
  `RELEASE` synchronously on a fuseblk mount, so each close also waits for the daemon:
  create and open-close cost more there than the ratios here show.

## Workloads

""" + "\n".join(f"- **{w}**: {what[w]}" for w in order) + f"""

## Every round (seconds, round 1 first)

{table(["workload", "transport", "wall seconds per round"], raw_rows).replace("|---|---:|---:|", "|---|---|---|")}
"""
with open(out, "w") as f:
    f.write(md)
print(f"written {out}")
PY
