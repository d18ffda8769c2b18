#!/usr/bin/env python3
"""Workloads, input builders and the report for benches/run.sh (see its header).

Subcommands (all parameters not on the command line come from BENCH_* variables that
run.sh exports):

  inputs LOWER INPUTS SRC_DIR       build the workload inputs inside LOWER/bench and INPUTS
  runtime ROOT                      copy python3, its stdlib and the shared libraries they
                                    load (the ldd closure) into ROOT/usr, with merged-/usr
                                    links, so `chroot ROOT /usr/bin/python3` runs
  memtree DIR COUNT                 COUNT empty files in DIR/dNNNN/, 1000 per directory
  session NAME SUBJECT ROUND ROOT PID RAW
                                    run the timed workloads of session NAME on the tree
                                    ROOT (a mountpoint, or the native tree), append one JSON
                                    line per workload to RAW
  report RAW RESULTS                print the tables, write RESULTS ("-": none)

Timing is wall-clock (time.perf_counter) around the workload only; a daemon's CPU is
utime+stime from /proc/PID/stat and its peak RSS VmHWM from /proc/PID/status.
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time

E = os.environ
TICK = os.sysconf("SC_CLK_TCK")


def env_int(name):
    return int(E[name])


# ---------------------------------------------------------------- daemon accounting

def daemon_cpu(pid):
    """utime+stime of PID in seconds, None without a daemon (or once it is gone)."""
    if not pid or pid == "-":
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / TICK
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def workload_cpu():
    """utime+stime of this helper and of the commands it ran and waited for, in seconds: the
    CPU a workload spends in its own processes (for native ext4 and the kernel overlay, that
    includes all the filesystem work; for a FUSE subject, all but the daemon's)."""
    own, done = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + done.ru_utime + done.ru_stime


def daemon_status(pid, key):
    """A kB value (VmHWM, VmRSS) of PID's /proc status, None without one."""
    if not pid or pid == "-":
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def daemon_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def daemon_nofile(pid):
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return " / ".join(line.split()[3:5])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


# ---------------------------------------------------------------- running things

class Failed(Exception):
    pass


def classify(text):
    """A short reason for a failed command, from its stderr."""
    if "Too many open files" in text:
        return "EMFILE"
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:160]
    return "failed"


def run(argv, timeout, cwd=None, env=None, stdout=subprocess.DEVNULL):
    """Runs argv; raises Failed with the reason. Returns stdout when stdout=PIPE."""
    try:
        p = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, cwd=cwd, env=env,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"TIMEOUT after {timeout} s: {' '.join(argv)[:120]}")
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0:
        n = err.count("\n")
        raise Failed(f"{classify(err)} (exit {p.returncode}, {n} lines on stderr)")
    return p.stdout


def count_lines(argv, timeout):
    """Runs argv (a find), returns the number of lines it printed; streams, so a walk of a
    million entries does not keep its output in memory."""
    deadline = time.monotonic() + timeout
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    n = 0
    # stderr may fill while stdout is read: collect it on a thread.
    err = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    t.start()
    # A watchdog, since a read from a hung pipe never returns to check the clock.
    timer = threading.Timer(timeout, p.kill)
    timer.daemon = True
    timer.start()
    for chunk in iter(lambda: p.stdout.read(1 << 20), b""):
        n += chunk.count(b"\n")
    p.wait()
    timer.cancel()
    t.join()
    if time.monotonic() > deadline:
        raise Failed(f"TIMEOUT after {timeout} s: {' '.join(argv)[:120]}")
    text = err[0].decode(errors="replace") if err else ""
    if p.returncode != 0:
        raise Failed(f"{classify(text)} (exit {p.returncode}, {text.count(chr(10))} lines "
                     f"on stderr, {n} entries printed)")
    return n


# ---------------------------------------------------------------- workloads

def fio(name, root, extra, timeout):
    argv = ["fio", f"--name={name}", "--ioengine=psync", "--invalidate=0",
            "--output-format=terse", "--randrepeat=1", "--norandommap"] + extra
    run(argv, timeout, cwd=root)


def wl_find_names(root, t):
    n = count_lines(["find", root], t)
    check_count(n, "BENCH_ENTRIES")


def wl_find_stat(root, t):
    n = count_lines(["find", root, "-printf", "%s\n"], t)
    check_count(n, "BENCH_ENTRIES")


def check_count(n, key):
    want = env_int(key)
    if n != want:
        raise Failed(f"walk saw {n} entries, the tree has {want}")


def wl_seqread(root, t):
    fio("seqread", root, ["--filename=bench/big", "--rw=read", "--bs=1M",
                          f"--size={E['BENCH_FIO_SIZE']}"], t)


def wl_randread(root, t):
    fio("randread", root, ["--filename=bench/big", "--rw=randread", "--bs=4k",
                           f"--size={E['BENCH_FIO_SIZE']}",
                           f"--io_size={E['BENCH_RANDREAD_IO']}"], t)


def wl_seqwrite(root, t):
    fio("seqwrite", root, ["--filename=fio-seqwrite", "--rw=write", "--bs=1M",
                           f"--size={E['BENCH_FIO_SIZE']}", "--end_fsync=1",
                           "--fallocate=none"], t)
    if os.path.getsize(f"{root}/fio-seqwrite") != parse_size(E["BENCH_FIO_SIZE"]):
        raise Failed("fio-seqwrite has the wrong size")


def wl_randwrite(root, t):
    fio("randwrite", root, ["--filename=fio-randwrite", "--rw=randwrite", "--bs=4k",
                            f"--size={E['BENCH_RANDWRITE_FILE']}",
                            f"--io_size={E['BENCH_RANDWRITE_IO']}", "--end_fsync=1",
                            "--fallocate=none"], t)


def parse_size(s):
    s = s.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


def wl_append(root, t):
    path = f"{root}/bench/append"
    before = os.stat(path).st_size
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        if os.write(fd, b"x") != 1:
            raise Failed("short write")
        os.fsync(fd)
    finally:
        os.close(fd)
    if os.stat(path).st_size != before + 1:
        raise Failed("append did not grow the file by one byte")


def wl_touch(root, t):
    d = f"{root}/bench/touch"
    utime, chmod = os.utime, os.chmod
    for i in range(env_int("BENCH_TOUCH")):
        p = f"{d}/t{i:05d}"
        utime(p)
        chmod(p, 0o640)


def wl_create(root, t):
    n, per_dir = env_int("BENCH_CREATE"), 1000
    data = b"c" * 4096
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    op, wr, cl = os.open, os.write, os.close
    os.mkdir(f"{root}/create")
    for i in range(n):
        if i % per_dir == 0:
            d = f"{root}/create/d{i // per_dir:03d}"
            os.mkdir(d)
        fd = op(f"{d}/f{i:05d}", flags, 0o644)
        try:
            wr(fd, data)
        finally:
            cl(fd)


def wl_rm(root, t):
    run(["rm", "-rf", f"{root}/create"], t)
    if os.path.exists(f"{root}/create"):
        raise Failed("create/ still exists after rm -rf")


def wl_untar(root, t):
    os.mkdir(f"{root}/untar")
    run(["tar", "-xf", E["BENCH_TARBALL"], "-C", f"{root}/untar"], t)
    # Durable for everyone: the union first (kernel overlay and fuseblk ovlfuse flush
    # the upper layer there), then the ext4 under the layers (the only flush that
    # reaches it for plain fuse and fuse-overlayfs).
    run(["sync", "-f", f"{root}/untar"], t)
    run(["sync", "-f", E["BENCH_FS"]], t)


def git_env():
    env = {"PATH": E["PATH"], "HOME": E["BENCH_HOME"], "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": "/dev/null", "LC_ALL": "C"}
    return env


def wl_git(root, t):
    d = f"{root}/bench/gitsrc"
    run(["git", "init", "-q", d], t, env=git_env())
    run(["git", "-C", d, "add", "-A"], t, env=git_env())
    out = run(["git", "-C", d, "ls-files", "-z"], t, env=git_env(), stdout=subprocess.PIPE)
    n = out.count(b"\0")
    if n != env_int("BENCH_GIT_FILES"):
        raise Failed(f"git indexed {n} files, expected {E['BENCH_GIT_FILES']}")


PY_IMPORTS = "import json, email, http.client, sqlite3"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


def wl_python(root, t):
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "LC_ALL": "C"}
    for _ in range(env_int("BENCH_PY_RUNS")):
        run([CHROOT, root, "/usr/bin/python3", "-c", PY_IMPORTS], t, env=env)


SESSIONS = {
    # session: [(workload, function)], in the order they run on one fresh mount
    "names": [("find-names-cold", wl_find_names), ("find-names-warm", wl_find_names)],
    "stat": [("stat-cold", wl_find_stat), ("stat-warm", wl_find_stat)],
    "seqread": [("fio-seqread", wl_seqread)],
    "randread": [("fio-randread", wl_randread)],
    "seqwrite": [("fio-seqwrite", wl_seqwrite)],
    "randwrite": [("fio-randwrite", wl_randwrite)],
    "append": [("copyup-append", wl_append)],
    "touch": [("copyup-touch-chmod", wl_touch)],
    "create": [("create", wl_create), ("rm-rf", wl_rm)],
    "untar": [("untar-sync", wl_untar)],
    "git": [("git-init-add", wl_git)],
    "python": [("chroot-python", wl_python)],
}


def cmd_session(name, subject, rnd, root, pid, raw):
    timeout = env_int("BENCH_TIMEOUT")
    failed = timed_out = False
    with open(raw, "a") as out:
        for work, fn in SESSIONS[name]:
            rec = {"round": int(rnd), "subject": subject, "session": name, "workload": work}
            if failed:
                rec.update(status="skipped", detail="an earlier workload of the session failed")
                out.write(json.dumps(rec) + "\n")
                continue
            c0, w0 = daemon_cpu(pid), workload_cpu()
            t0 = time.perf_counter()
            try:
                fn(root, timeout)
                status, detail = "ok", ""
            except Failed as e:
                status, detail = "failed", str(e)
            except OSError as e:
                status = "failed"
                detail = ("EMFILE: " if e.errno == 24 else "") + f"{e.strerror}: {e.filename or ''}"
            wall = time.perf_counter() - t0
            c1, w1 = daemon_cpu(pid), workload_cpu()
            rec.update(status=status, detail=detail, wall=wall, workload_cpu=w1 - w0,
                       cpu=(c1 - c0) if c0 is not None and c1 is not None else None,
                       cpu_total=c1, hwm_kib=daemon_status(pid, "VmHWM"))
            out.write(json.dumps(rec) + "\n")
            out.flush()
            shown = f"{wall:8.3f} s" if status == "ok" else f"FAILED after {wall:.3f} s: {detail}"
            extra = ""
            if rec["cpu"] is not None:
                extra = f"   daemon cpu {rec['cpu']:.3f} s, peak rss {rec['hwm_kib'] / 1024:.1f} MiB"
            print(f"  {subject:<14} {work:<20} {shown}{extra}", file=sys.stderr, flush=True)
            if status != "ok":
                failed = True
                timed_out = timed_out or detail.startswith("TIMEOUT")
    # 3 tells run.sh the mount may be hung, so it should not wait long for umount.
    return 3 if timed_out else 0


# ---------------------------------------------------------------- memory check

def cmd_memwalk(subject, root, pid, raw):
    """Stat-walk of the memtree through one mount: peak RSS, descriptors, EMFILE."""
    timeout = env_int("BENCH_TIMEOUT") * 4
    entries = env_int("BENCH_MEM_ENTRIES")
    rec = {"subject": subject, "kind": "memwalk", "entries": entries,
           "hwm_mount_kib": daemon_status(pid, "VmHWM"), "nofile": daemon_nofile(pid)}
    t0 = time.perf_counter()
    try:
        n = count_lines(["find", root, "-printf", "%s\n"], timeout)
        want = entries + (entries + 999) // 1000 + 1  # files, directories, the root
        if n == want:
            rec.update(status="ok", detail="", seen=n)
        else:
            rec.update(status="failed", detail=f"walk saw {n} entries, the tree has {want}", seen=n)
    except Failed as e:
        rec.update(status="failed", detail=str(e))
    rec.update(wall=time.perf_counter() - t0, hwm_kib=daemon_status(pid, "VmHWM"),
               rss_kib=daemon_status(pid, "VmRSS"), fds=daemon_fds(pid), cpu_total=daemon_cpu(pid))
    # A walk that fits under the descriptor limit, to measure the cost per entry even when
    # the whole walk cannot be done: the first directories, up to 80% of the limit.
    print(f"  {subject:<14} memwalk {entries} entries: {rec['status']} {rec.get('detail', '')} "
          f"in {rec['wall']:.1f} s, peak rss {fmt_mib(rec['hwm_kib'])}, {rec['fds']} fds",
          file=sys.stderr, flush=True)
    with open(raw, "a") as out:
        out.write(json.dumps(rec) + "\n")


def cmd_memwalk_part(subject, root, pid, raw, dirs):
    """Stat-walk of the first DIRS directories only (fresh mount)."""
    timeout = env_int("BENCH_TIMEOUT") * 4
    dirs = int(dirs)
    rec = {"subject": subject, "kind": "memwalk-part", "dirs": dirs,
           "hwm_mount_kib": daemon_status(pid, "VmHWM"), "rss_mount_kib": daemon_status(pid, "VmRSS")}
    t0 = time.perf_counter()
    paths = [f"{root}/d{d:04d}" for d in range(dirs)]
    try:
        n = count_lines(["find"] + paths + ["-printf", "%s\n"], timeout)
        rec.update(status="ok", detail="", seen=n)
    except Failed as e:
        rec.update(status="failed", detail=str(e), seen=None)
    rec.update(wall=time.perf_counter() - t0, hwm_kib=daemon_status(pid, "VmHWM"),
               rss_kib=daemon_status(pid, "VmRSS"), fds=daemon_fds(pid))
    print(f"  {subject:<14} memwalk of the first {dirs} directories: {rec['status']} "
          f"{rec['detail']} {rec['seen']} entries in {rec['wall']:.1f} s, "
          f"peak rss {fmt_mib(rec['hwm_kib'])}, {rec['fds']} fds", file=sys.stderr, flush=True)
    with open(raw, "a") as out:
        out.write(json.dumps(rec) + "\n")


def cmd_memtree(d, count):
    count = int(count)
    os.makedirs(d, exist_ok=True)
    flags = os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC
    op, cl = os.open, os.close
    for i in range(count):
        if i % 1000 == 0:
            sub = f"{d}/d{i // 1000:04d}"
            os.makedirs(sub, exist_ok=True)
        cl(op(f"{sub}/e{i % 1000:03d}", flags, 0o644))


# ---------------------------------------------------------------- inputs

def write_random(path, size):
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left > 0:
            # Different bytes per MiB without paying for urandom of the whole size.
            block = chunk[i % 997:] + chunk[: i % 997]
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
            i += 1


def sorted_walk(top):
    """Relative paths below top, sorted bytewise (parents before children)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for n in dirnames + filenames:
            out.append(n if rel == "." else f"{rel}/{n}")
    out.sort(key=lambda s: s.encode("utf-8", "surrogateescape"))
    return out


def cmd_inputs(lower, inputs, src):
    """LOWER/bench/{big,append,touch/,gitsrc/} and INPUTS/untar.tar, from the tree SRC
    (already copied into the lower)."""
    bench = f"{lower}/bench"
    os.makedirs(f"{bench}/touch", exist_ok=True)
    write_random(f"{bench}/big", parse_size(E["BENCH_FIO_SIZE"]))
    write_random(f"{bench}/append", parse_size(E["BENCH_APPEND_SIZE"]))
    for i in range(env_int("BENCH_TOUCH")):
        with open(f"{bench}/touch/t{i:05d}", "wb") as f:
            f.write(b"t" * 4096)
    paths = sorted_walk(src)
    # git: the first N regular files of at most 256 KiB, at their relative paths.
    want, n = env_int("BENCH_GIT_FILES"), 0
    for rel in paths:
        p = f"{src}/{rel}"
        if os.path.islink(p) or not os.path.isfile(p) or os.path.getsize(p) > 256 << 10:
            continue
        dst = f"{bench}/gitsrc/{rel}"
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(p, dst)
        n += 1
        if n == want:
            break
    if n < want:
        sys.exit(f"only {n} files of <= 256 KiB in {src}: lower OVLFUSE_BENCH_GIT_FILES")
    # tar: the first N entries of the tree (files over 4 MiB left out), parents first.
    want, listed = env_int("BENCH_TAR_ENTRIES"), []
    for rel in paths:
        p = f"{src}/{rel}"
        if not os.path.islink(p) and os.path.isfile(p) and os.path.getsize(p) > 4 << 20:
            continue
        listed.append(rel)
        if len(listed) == want:
            break
    if len(listed) < want:
        sys.exit(f"only {len(listed)} entries in {src}: lower OVLFUSE_BENCH_TAR_ENTRIES")
    lst = f"{inputs}/untar.list"
    with open(lst, "wb") as f:
        f.write(b"".join(r.encode("utf-8", "surrogateescape") + b"\0" for r in listed))
    run(["tar", "--create", "--file", f"{inputs}/untar.tar", "--no-recursion", "--null",
         "--directory", src, "--files-from", lst], 3600)
    os.unlink(lst)


def cmd_runtime(root):
    """python3 + stdlib + the ldd closure of the interpreter and lib-dynload into ROOT."""
    exe = os.path.realpath("/usr/bin/python3")
    ver = os.path.basename(exe)  # python3.11
    stdlib = f"/usr/lib/{ver}"
    if not os.path.isdir(stdlib):
        sys.exit(f"{stdlib} not found: the chroot workload needs Debian's python3")
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):
        if not os.path.lexists(f"{root}/{link}"):
            os.symlink(target, f"{root}/{link}")
    os.makedirs(f"{root}/usr/bin", exist_ok=True)
    os.makedirs(f"{root}/usr/lib64", exist_ok=True)
    if not os.path.exists(f"{root}/usr/bin/{ver}"):
        shutil.copy2(exe, f"{root}/usr/bin/{ver}")
    if not os.path.lexists(f"{root}/usr/bin/python3"):
        os.symlink(ver, f"{root}/usr/bin/python3")
    if not os.path.isdir(f"{root}{stdlib}"):
        shutil.copytree(stdlib, f"{root}{stdlib}", symlinks=True)
    objs = [exe] + [f"{stdlib}/lib-dynload/{n}" for n in os.listdir(f"{stdlib}/lib-dynload")
                    if n.endswith(".so")]
    libs = set()
    for o in objs:
        out = subprocess.run(["ldd", o], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            for p in parts:
                if p.startswith("/"):
                    libs.add(p)
                    break
    for lib in sorted(libs):
        rel = lib[len("/usr"):] if lib.startswith("/usr/") else lib
        dst = f"{root}/usr{rel}"
        if os.path.exists(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.realpath(lib), dst)


# ---------------------------------------------------------------- report

SUBJECTS = ["native", "kernel", "fo1", "ovlfuse", "ovlfuse-plain"]
LABEL = {"native": "native ext4", "kernel": "kernel overlay (K)", "fo1": "fuse-overlayfs (FO1)",
         "ovlfuse": "ovlfuse (fuseblk)", "ovlfuse-plain": "ovlfuse -o nofuseblk"}
DAEMONS = ("fo1", "ovlfuse", "ovlfuse-plain")
SHORT = {"native": "native", "kernel": "K", "fo1": "FO1", "ovlfuse": "ovlfuse",
         "ovlfuse-plain": "plain"}
WORKLOADS = [  # (workload, target ovlfuse/K, what)
    ("find-names-cold", 2.5, "`find MNT` (names only), fresh mount, caches dropped"),
    ("find-names-warm", 1.25, "the same again on the same mount, straight after"),
    ("stat-cold", 2.0, "`find MNT -printf '%s\\n'` (lstat of every entry), fresh mount, caches dropped"),
    ("stat-warm", 1.25, "the same again on the same mount, straight after"),
    ("fio-seqread", 1.05, "fio sequential read of the {fio} lower file `bench/big`, 1 MiB blocks, fresh mount, caches dropped"),
    ("fio-randread", 1.05, "fio random 4 KiB reads ({rrio} in all) of `bench/big`, fresh mount, caches dropped"),
    ("fio-seqwrite", 1.1, "fio sequential write of a new {fio} file, 1 MiB blocks, then fsync"),
    ("fio-randwrite", 1.3, "fio random 4 KiB writes ({rwio} in all) over a new sparse {rwfile} file, then fsync"),
    ("copyup-append", 1.0, "append 1 byte to the {app} lower file `bench/append` (copy-up) + fsync (durable); file pre-read into the page cache"),
    ("copyup-touch-chmod", 1.0, "utime() then chmod() of each of {touch} lower files of 4 KiB (copy-up)"),
    ("create", 2.0, "create {create} files of 4 KiB (open O_CREAT|O_EXCL, write, close), 1000 per directory"),
    ("rm-rf", 1.5, "`rm -rf` of those, on the same mount straight after"),
    ("untar-sync", 2.0, "`tar -xf` of a {tarn}-entry tarball ({tarmb} MiB) + `sync -f` of the union and of the layers' ext4"),
    ("git-init-add", 1.15, "`git init` + `git add -A` in the lower tree `bench/gitsrc` ({gitn} files)"),
    ("chroot-python", 1.1, "{py}× `chroot MNT /usr/bin/python3 -c '" + PY_IMPORTS + "'`"),
]


def human(size):
    """'1g' -> '1 GiB' (fio's suffixes are powers of 1024 here)."""
    s = size.strip()
    if s and s[-1].lower() in "kmg":
        return f"{s[:-1]} {s[-1].upper()}iB"
    return f"{s} bytes"


def fmt_mib(kib):
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def med(xs):
    return statistics.median(xs) if xs else None


def cmd_report(raw, results):
    recs, mem = [], []
    with open(raw) as f:
        for line in f:
            r = json.loads(line)
            (mem if r.get("kind", "").startswith("memwalk") else recs).append(r)
    subjects = [s for s in SUBJECTS if s in E["BENCH_SUBJECTS"].split()]
    by = {}
    for r in recs:
        by.setdefault((r["workload"], r["subject"]), []).append(r)
    sizes = {"fio": human(E["BENCH_FIO_SIZE"]), "rrio": human(E["BENCH_RANDREAD_IO"]),
             "rwio": human(E["BENCH_RANDWRITE_IO"]), "rwfile": human(E["BENCH_RANDWRITE_FILE"]),
             "app": human(E["BENCH_APPEND_SIZE"]), "touch": E["BENCH_TOUCH"],
             "create": E["BENCH_CREATE"], "tarn": E["BENCH_TAR_ENTRIES"],
             "tarmb": E["BENCH_TAR_MIB"], "gitn": E["BENCH_GIT_FILES"], "py": E["BENCH_PY_RUNS"]}

    def stats(w, s):
        rs = by.get((w, s), [])
        ok = [r["wall"] for r in rs if r["status"] == "ok"]
        bad = [r for r in rs if r["status"] != "ok"]
        return ok, bad, rs

    def cell(w, s):
        ok, bad, rs = stats(w, s)
        if not rs:
            return "-"
        txt = ""
        if ok:
            txt = f"{med(ok):.3f} ({min(ok):.3f}–{max(ok):.3f})" if len(ok) > 1 else f"{ok[0]:.3f}"
        failed = [r for r in bad if r["status"] != "skipped"]
        skipped = len(bad) - len(failed)
        if failed:
            reasons = sorted({short_reason(r) for r in failed})
            txt += (" " if txt else "") + f"**{len(failed)}/{len(rs)} failed: {', '.join(reasons)}**"
        if skipped:
            txt += (" " if txt else "") + f"{skipped}/{len(rs)} not run (the mount's first workload failed)"
        return txt

    def ratio(w, a, b, target=None):
        oa, _, ra = stats(w, a)
        ob, _, rb = stats(w, b)
        if not ra or not rb:
            return "-"
        if not oa or not ob or len(oa) < len(ra):
            return "n/a (failed)" if ra and len(oa) < len(ra) else "n/a"
        x = med(oa) / med(ob) if med(ob) > 0 else float("inf")
        if target is None:
            return f"{x:.2f}"
        return f"{x:.2f} {'pass' if x <= target else 'MISS'}"

    ovls = [s for s in ("ovlfuse", "ovlfuse-plain") if s in subjects]
    head = ["workload"] + [SHORT[s] for s in subjects]
    rhead = ["workload", "target vs K"]
    for o in ovls:
        if "kernel" in subjects:
            rhead.append(f"{SHORT[o]}/K")
        if "fo1" in subjects:
            rhead.append(f"{SHORT[o]}/FO1")
    rows, rrows, crows = [], [], []
    for w, target, _ in WORKLOADS:
        if not any((w, s) in by for s in subjects):
            continue
        rows.append([w] + [cell(w, s) for s in subjects])
        rr = [w, f"≤ {target}"]
        for o in ovls:
            if "kernel" in subjects:
                rr.append(ratio(w, o, "kernel", target))
            if "fo1" in subjects:
                rr.append(ratio(w, o, "fo1"))
        rrows.append(rr)
        cr = [w]
        for s in subjects:
            rs = [r for r in by.get((w, s), []) if r["status"] == "ok"]
            own = [r["workload_cpu"] for r in rs if r.get("workload_cpu") is not None]
            own_txt = f"{med(own):.2f}" if own else "-"
            if s not in DAEMONS:
                cr.append(own_txt)
                continue
            cpu = [r["cpu"] for r in rs if r.get("cpu") is not None]
            hwm = [r["hwm_kib"] for r in by.get((w, s), []) if r.get("hwm_kib") is not None]
            cr.append(f"{own_txt} + {med(cpu):.2f}" if cpu else "-")
            cr.append(f"{med(hwm) / 1024:.1f} / {max(hwm) / 1024:.1f}" if hwm else "-")
        crows.append(cr)
    chead = ["workload"]
    for s in subjects:
        if s in DAEMONS:
            chead += [f"{SHORT[s]} CPU s (workload + daemon)", f"{SHORT[s]} peak RSS MiB (median / max)"]
        else:
            chead.append(f"{SHORT[s]} CPU s")

    # terminal
    def term_table(h, rs):
        widths = [max(len(str(r[i])) for r in [h] + rs) for i in range(len(h))]
        lines = ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(h))]
        lines += ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)) for r in rs]
        return "\n".join(lines)
    print("\nwall seconds: median (min–max) over the rounds")
    print(term_table(head, [[c.replace("**", "") for c in r] for r in rows]))
    print("\nratios of the medians (target: ovlfuse/K)")
    print(term_table(rhead, rrows))
    print("\nCPU seconds during the workload (medians: the workload's own + the daemon's) and peak RSS of the mount")
    print(term_table(chead, crows))
    print(f"\nload average: {E['BENCH_LOAD_NOTE']}")
    memtxt = mem_report(mem)
    print("\n" + memtxt)
    if results == "-":
        return

    def md_table(h, rs):
        lines = ["| " + " | ".join(h) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(h))) + "|"]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rs]
        return "\n".join(lines)

    every = []
    for w, _, _ in WORKLOADS:
        for s in subjects:
            rs = sorted(by.get((w, s), []), key=lambda r: r["round"])
            if rs:
                every.append([w, SHORT[s], " ".join(
                    f"{r['wall']:.3f}" if r["status"] == "ok" else
                    ("skip" if r["status"] == "skipped" else f"FAIL({short_reason(r)})")
                    for r in rs)])
    failures = []
    for r in recs:
        if r["status"] == "failed":
            failures.append(f"- round {r['round']}, {LABEL[r['subject']]}, {r['workload']}: "
                            f"{r['detail']}")
    title_note = E.get("BENCH_LABEL", "")
    md = f"""# ovlfuse benchmark: native ext4, kernel overlay, fuse-overlayfs, ovlfuse

{title_note}Generated by `benches/run.sh` on {E['BENCH_NOW']}.

## Machine and parameters

- kernel `{E['BENCH_KERNEL']}`, {E['BENCH_NCPU']} CPUs ({E['BENCH_CPU_MODEL']}), {E['BENCH_MEM']} memory
- load average: {E['BENCH_LOAD_NOTE']}; the rounds took {E['BENCH_ELAPSED']}
- ovlfuse at `{E['BENCH_COMMIT']}`{E['BENCH_DIRTY_NOTE']} ({E['BENCH_BINARY_NOTE']}); fuse-overlayfs {E['BENCH_FO1_VERSION']}; fio {E['BENCH_FIO_VERSION']}
- mode: {E['BENCH_MODE']}; {E['BENCH_ROUNDS']} round(s); subjects interleaved workload by workload, the order rotating every round
- layers and native tree on one ext4 filesystem of the script's own: {E['BENCH_IMAGE_NOTE']}
- lower layer: copy of `{E['BENCH_LOWER_SRC']}` plus the workload inputs and a python3 runtime: {E['BENCH_ENTRIES']} entries (as `find` counts them, the root included), {E['BENCH_LOWER_MIB']} MiB
- caches dropped for the cold workloads with {E['BENCH_COLD_NOTE']}
- every run: a fresh mount with an empty upper and work directory; the native subject runs read workloads on the lower tree itself and write workloads in a new directory of the same ext4 holding a copy of the inputs they need (copied before the clock starts)
- mount options: kernel overlay `lowerdir,upperdir,workdir` only; fuse-overlayfs the same; ovlfuse the same{(' + `' + E['BENCH_OVLFUSE_OPTS'] + '`') if E['BENCH_OVLFUSE_OPTS'] else ''} (defaults: threads = CPU count, timeout=1); "plain" adds `nofuseblk`
- daemon RLIMIT_NOFILE: {E['BENCH_NOFILE_NOTE']}
- FUSE transport: {E.get('BENCH_URING_NOTE', 'not recorded')} (with Y, fuseblk ovlfuse takes requests through FUSE-over-io_uring; plain fuse reads `/dev/fuse`)
{E['BENCH_EXTRA_NOTES']}
## Wall time (seconds): median (min–max) over the rounds

native = {LABEL['native']}, K = {LABEL['kernel']}, FO1 = {LABEL['fo1']}, ovlfuse = {LABEL['ovlfuse']},
plain = {LABEL['ovlfuse-plain']}. A failed run is left out of the median and named.

{md_table(head, rows)}

## Ratios of the medians

"pass" / "MISS" against the issue's target for ovlfuse/K; "n/a (failed)" when a run of the
ovlfuse column failed (its surviving runs are not comparable).

{md_table(rhead, rrows)}

Where the time goes for each miss, and what would close it: `benches/PROFILES.md`
(profiles taken by hand, with the commit they describe).

## CPU and memory

CPU = utime+stime during the timed workload, median over the rounds: the workload's own
processes (`getrusage` of the benchmark helper and the commands it waited for) and, for the
FUSE subjects, `+` the daemon's (`/proc/PID/stat`). For native ext4 and the kernel overlay
the workload's own CPU holds all the filesystem's work, so it is the yardstick for the
daemon's. Peak RSS = `VmHWM` (`/proc/PID/status`) read right after the workload, before
unmount: the peak of that mount so far (a mount of a two-workload session carries the
first into the second); median / max over the rounds.

{md_table(chead, crows)}

{memtxt}

## Workloads

""" + "\n".join(f"- **{w}** (target ovlfuse/K ≤ {t}): {what.format(**sizes)}" for w, t, what in WORKLOADS) + f"""

Inputs: `bench/big` and `bench/append` are random data; `bench/touch/` holds the small
files; `bench/gitsrc/` is the first {sizes['gitn']} regular files of at most 256 KiB of the copied tree
(sorted by path), at their relative paths; the tarball (outside the lower layer, on the same
ext4) holds the first {sizes['tarn']} entries of the copied tree in path order, files over 4 MiB left
out. The chroot root is the union's root: `usr/` with `bin`, `sbin`, `lib`, `lib64`
symlinks into it (merged /usr), and Debian's `/usr/bin/python3` with its standard library
and the shared libraries the interpreter and `lib-dynload/*.so` link to (ldd) — already
there when the lower is a copy of /usr. Python runs with `PYTHONDONTWRITEBYTECODE=1`.

## Failures

{chr(10).join(failures) if failures else 'none'}

## Every run (seconds, round 1 first)

{md_table(['workload', 'subject', 'seconds per round'], every).replace('|---|---:|---:|', '|---|---|---|')}
"""
    with open(results, "w") as f:
        f.write(md)
    print(f"written {results}")


def short_reason(r):
    d = r.get("detail", "")
    if r["status"] == "skipped":
        return "skipped"
    if "EMFILE" in d:
        return "EMFILE"
    if "TIMEOUT" in d:
        return "TIMEOUT"
    return d.split(":")[0][:40] or "failed"


def mem_report(mem):
    limit = float(E.get("BENCH_MEM_LIMIT_MIB", "200"))
    lines = [f"## Memory check: a stat-walk of {int(E['BENCH_MEM_ENTRIES']):,} entries",
             "",
             f"`find MNT -printf '%s\\n'` on a fresh mount whose lower layer is {int(E['BENCH_MEM_ENTRIES']):,} "
             f"empty files in directories of 1,000 (every entry is looked up, so the daemon "
             f"knows every inode). Target: ovlfuse's peak RSS under {limit:.0f} MiB.",
             ""]
    if not mem:
        lines.append("not run" + (" (OVLFUSE_BENCH_MEM_ENTRIES=0)" if E["BENCH_MEM_ENTRIES"] == "0" else ""))
        return "\n".join(lines)
    rows = []
    for r in mem:
        if r["kind"] == "memwalk":
            verdict = ""
            if r["subject"].startswith("ovlfuse") and r["status"] == "ok":
                verdict = "pass" if r["hwm_kib"] / 1024 < limit else "MISS"
            elif r["status"] != "ok":
                verdict = "not measurable"
            rows.append([LABEL[r["subject"]], f"whole tree ({r['entries']:,} files)",
                         r["status"] + (f": {r['detail']}" if r.get("detail") else ""),
                         f"{r['wall']:.1f}", fmt_mib(r.get("hwm_mount_kib")), fmt_mib(r["hwm_kib"]),
                         str(r.get("fds", "-")), r.get("nofile") or "-", verdict])
        else:
            rows.append([LABEL[r["subject"]], f"first {r['dirs']} directories ({r.get('seen') or '?'} entries)",
                         r["status"] + (f": {r['detail']}" if r.get("detail") else ""),
                         f"{r['wall']:.1f}", fmt_mib(r.get("hwm_mount_kib")), fmt_mib(r["hwm_kib"]),
                         str(r.get("fds", "-")), "", ""])
    h = ["daemon", "walk", "result", "seconds", "RSS after mount", "peak RSS", "open fds at end",
         "RLIMIT_NOFILE soft / hard", "vs target"]
    lines.append("| " + " | ".join(h) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * 4 + ["---"] * 2) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    # Extrapolation from the partial walk, when the whole one failed.
    for r in mem:
        if r["kind"] == "memwalk-part" and r["status"] == "ok" and r.get("seen"):
            base = r.get("hwm_mount_kib") or 0
            per = (r["hwm_kib"] - base) / r["seen"]
            total = int(E["BENCH_MEM_ENTRIES"])
            est = (base + per * total) / 1024
            lines.append("")
            lines.append(f"- {LABEL[r['subject']]}: {per * 1024:.0f} bytes of peak RSS per entry on the "
                         f"partial walk; linear extrapolation to {total:,} entries: about "
                         f"**{est:.0f} MiB** (an estimate, not a measurement).")
    if any(r["status"] != "ok" and "EMFILE" in r.get("detail", "") for r in mem):
        lines.append("")
        lines.append("- **EMFILE: a regression.** The walk ran the daemon out of descriptors, "
                     "which its descriptor cache (`src/handles.rs`: at most half the soft "
                     "limit open, the rest reopened by file handle) exists to prevent "
                     f"({E['BENCH_NOFILE_NOTE']}). The whole-tree numbers above are those of "
                     "the failed walk.")
    return "\n".join(lines)


def cmd_fail(session, subject, rnd, reason, raw):
    """Records REASON for every workload of the session that has no record for this
    subject and round yet (a failed mount, a session killed by the outer timeout)."""
    have = set()
    if os.path.exists(raw):
        with open(raw) as f:
            for line in f:
                r = json.loads(line)
                if r.get("round") == int(rnd) and r.get("subject") == subject:
                    have.add(r["workload"])
    with open(raw, "a") as out:
        for work, _ in SESSIONS[session]:
            if work not in have:
                out.write(json.dumps({"round": int(rnd), "subject": subject, "session": session,
                                      "workload": work, "status": "failed", "detail": reason,
                                      "wall": None}) + "\n")
                print(f"  {subject:<14} {work:<20} FAILED: {reason}", file=sys.stderr)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "fail":
        return cmd_fail(*args)
    if cmd == "session":
        return cmd_session(*args)
    if cmd == "memwalk":
        return cmd_memwalk(*args)
    if cmd == "memwalk-part":
        return cmd_memwalk_part(*args)
    if cmd == "memtree":
        return cmd_memtree(*args)
    if cmd == "inputs":
        return cmd_inputs(*args)
    if cmd == "runtime":
        return cmd_runtime(*args)
    if cmd == "report":
        return cmd_report(*args)
    sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
