#!/usr/bin/env bash
# Replication benchmark: a primary `hbrfs mount --replicate-to` and a secondary
# `hbrfs serve` on 127.0.0.1, next to rsync on the same machine.
# (issue 3, section 8; targets and methods: shared/PERF-NOTES.md)
#
# (a) Catch-up after a change. A SIZE_GB raw image of mixed VM-like content
#     (by 64 KiB block: 25% zero, half of it holes and half written zeros;
#     25% text from /usr/share, /usr/include, ...; 35% ELF from /usr/bin,
#     /usr/lib, ...; 15% random) is generated in a native directory, copied
#     into the primary mount while no secondary runs, then a fresh secondary
#     is started: that first ship is the initial full sync. Then CHANGES
#     percent of the image's 64 KiB blocks (random blocks, new content of the
#     same mix, never a copy of data already in the image) are rewritten
#     through the mount and fsynced, one level after the other. For each
#     level: the time from the end of the fsync until the replica is caught
#     up (polled every 50 ms; includes waiting for the next RPO tick), the
#     ship time (end of the fsync -> the secondary's apply of the last point
#     of the change, from its status: no polling), the wire
#     bytes (delta of the primary's `wire_bytes`: every protobuf message it
#     sent) and the CPU time of both daemons. Next to it the same change is
#     made to a native copy A and `rsync --inplace --no-whole-file -z
#     --stats A/disk.img B/disk.img` brings the native copy B (the state
#     before the change) up to date, page cache dropped first: its wall
#     time, CPU time, "Total bytes sent" and "Total bytes received".
#     (--ignore-times is added: rsync's quick check would skip the file when
#     the change lands in the second the previous rsync finished in.)
#     hbrfs reads the changed blocks from a warm page cache (they were just
#     written, as on a live host); rsync reads both whole files from disk.
# (b) Sustained random writes: fio randwrite at each of RATES (O_DIRECT,
#     FIO_BS blocks, libaio QD FIO_IODEPTH, fresh half-compressible buffers)
#     on the replicated image for DURATION seconds, --rpo RPO. The replica's
#     age (`replica_age_ms`) is sampled every 100 ms; a sample counts as
#     min(age, time since fio started), since nothing was unreplicated before
#     fio began. Reported: p99 and max of that achieved RPO, CPU of the
#     primary and the secondary (utime+stime from /proc/PID/stat over the
#     run, in % of one core), fio's completion latency, and how long the
#     replica took to catch up once fio stopped. The same fio job runs first
#     for NATIVE_DURATION seconds on the native copy: the disk's own latency,
#     next to fio's latency through the mount. The primary is restarted
#     (clean unmount, mount again) before each rate so that (d) is per rate;
#     a clean restart must not make anything dirty.
# (c) Hash + compress throughput. Two numbers, not the same thing:
#     - `zstd -b<level> -B64K` on the image's non-zero 64 KiB blocks: the
#       compressor alone, one core, blocks compressed independently as hbrfs
#       does (the reference).
#     - hbrfs's own rate in the initial sync of (a): non-zero bytes hashed
#       and compressed divided by (i) the sync's wall time (the secondary's
#       start -> its apply of the last point: every point of the sync, and
#       the connection) and (ii) the
#       primary's CPU seconds during the sync (per core).
# (d) Cut stall: `cut_stall_p99_ns` and `cut_stall_max_ns` from `hbrfs
#     status` after each fio run of (b): how long cuts held the write gate
#     (from asking for it to releasing it), over the cuts of that run.
#
# Environment knobs:
#   SIZE_GB=4            image size in GiB (decimals allowed, e.g. 0.5)
#   CHANGES="0.1 1 10"   change levels of (a), percent of the image's blocks
#   RATES="50m 100m"     fio --rate values for (b) ("" skips (b) and (d))
#   DURATION=60          seconds per fio run
#   FIO_BS=64k           fio block size
#   FIO_IODEPTH=4        fio queue depth (libaio)
#   NATIVE_DURATION=15   seconds of the same fio job on the native copy, for
#                        the disk's own write latency (0 skips it)
#   RPO=1s               hbrfs mount --rpo
#   ZSTD_LEVEL=-1        hbrfs mount --zstd-level (its default) and the zstd -b level
#   ZSTD_SAMPLE_MB=1024  non-zero data zstd -b runs on (at most)
#   SEED=1               seed of the content and of the changed blocks
#   CATCHUP_TIMEOUT=600  seconds to wait for the replica to catch up
#   VERIFY=1             cmp the primary's and the replica's image at the end;
#                        2: also native A, primary, replica and rsync's B after
#                        (a); 0: no comparison (each cmp reads 2 x SIZE_GB)
#   BENCH_DIR=/var/tmp   where the temp dir goes (not tmpfs; ~5x SIZE_GB free)
#   REPLICA_BASE=        put the replica in a temp dir under this directory
#                        instead (e.g. /dev/shm, or another disk: a real
#                        secondary does not share the primary's disk)
#   KEEP=0               1 keeps the temp dir (images, logs, JSON results)
#   RESULTS=FILE         also write the final tables to FILE
#   HBRFS_MOUNT_ARGS=""  extra `hbrfs mount` arguments, e.g. "--threads 16"
#   BUILD=1              0: use target/release/hbrfs as it is (no cargo build)
#
# Needs root (FUSE mounts, drop_caches), python3, rsync, fio (libaio), zstd,
# cmp. Default run (4 GiB, 60 s per rate) takes about 10 minutes.
set -euo pipefail

size_gb=${SIZE_GB:-4}
changes=${CHANGES:-0.1 1 10}
rates=${RATES-50m 100m}
duration=${DURATION:-60}
fio_bs=${FIO_BS:-64k}
fio_iodepth=${FIO_IODEPTH:-4}
rpo=${RPO:-1s}
zstd_level=${ZSTD_LEVEL:--1}
zstd_sample_mb=${ZSTD_SAMPLE_MB:-1024}
native_duration=${NATIVE_DURATION:-15}
seed=${SEED:-1}
catchup_timeout=${CATCHUP_TIMEOUT:-600}
verify=${VERIFY:-1}
bench_dir=${BENCH_DIR:-/var/tmp}
replica_base=${REPLICA_BASE:-}
keep=${KEEP:-0}
results_file=${RESULTS:-}
# Word splitting is the point: this carries several arguments.
read -r -a mount_args <<<"${HBRFS_MOUNT_ARGS:-}"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
hbrfs=$repo/target/release/hbrfs
t_start=${EPOCHREALTIME/./}

elapsed() { echo $(((${EPOCHREALTIME/./} - t_start) / 1000000)); }
log() { printf '[replication.sh %4ss] %s\n' "$(elapsed)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root: FUSE mounts and dropping caches need it"
for tool in python3 fio rsync zstd cmp; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install $tool)"
done
[[ $size_gb =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "SIZE_GB must be a number"
[[ $duration =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer"
[[ $zstd_level =~ ^-?[0-9]+$ ]] || die "ZSTD_LEVEL must be an integer"
for c in $changes; do
    [[ $c =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "CHANGES: '$c' is not a percentage"
done
[[ $(stat -f -c %T "$bench_dir") != tmpfs ]] || die "BENCH_DIR $bench_dir is tmpfs"

if [[ ${BUILD:-1} == 1 || ! -x $hbrfs ]]; then
    # A no-op when the binary is up to date; a stale binary would measure
    # something else than the tree.
    log "cargo build --release"
    (cd "$repo" && cargo build --release --quiet) || die "cargo build --release failed"
fi

size_bytes=$(python3 -c "import sys; print(int(float(sys.argv[1]) * 2**30) // 65536 * 65536)" "$size_gb")
((size_bytes > 0)) || die "SIZE_GB is too small"
# Native A and B, the backing copy, the replica, and a staged epoch.
need=$((size_bytes * 5 + (1 << 30)))
avail=$(($(stat -f -c '%a * %S' "$bench_dir")))
((avail > need)) || die "$bench_dir has $((avail >> 30)) GiB free, need about $((need >> 30)) GiB"

work=$(mktemp -d "$bench_dir/hbrfs-repl-bench.XXXXXX")
mnt=$work/mnt
backing=$work/backing
replica=$work/replica
replica_tmp=
if [[ -n $replica_base ]]; then
    replica_tmp=$(mktemp -d "$replica_base/hbrfs-repl-bench-replica.XXXXXX")
    replica=$replica_tmp/replica
fi
res=$work/results
logs=$work/logs
mkdir -p "$mnt" "$backing" "$replica" "$res" "$logs" "$work/a" "$work/b"
primary_pid=
secondary_pid=
py_pid=
port=
# The pair's pre-shared key, made here because the primary starts first.
auth_args=()
if "$hbrfs" mount --help | grep -q -- --auth-key; then
    python3 -c 'import secrets; print(secrets.token_hex(32))' >"$work/auth.key"
    chmod 600 "$work/auth.key"
    auth_args=(--auth-key "$work/auth.key")
fi

is_mounted() {
    # /proc/self/mountinfo, not mountpoint(1): stat()ing a hung FUSE mount blocks.
    awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# Stops daemon $2 (called $1 in the log): SIGTERM, SIGKILL after 30 s.
stop_daemon() {
    local name=$1 pid=$2
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name $pid still running 30 s after SIGTERM; killing it"
        kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

stop_primary() {
    [[ -n $primary_pid ]] || return 0
    stop_daemon primary "$primary_pid"
    primary_pid=
    if is_mounted "$mnt"; then
        log "$mnt still mounted after the primary exited; unmounting"
        fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    fi
}

stop_secondary() {
    [[ -n $secondary_pid ]] || return 0
    stop_daemon secondary "$secondary_pid"
    secondary_pid=
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $py_pid ]]; then
        kill -TERM -- "-$py_pid" 2>/dev/null || true
        wait "$py_pid" 2>/dev/null || true
    fi
    stop_primary
    stop_secondary
    if ((rc != 0)); then
        for f in "$logs"/*.log; do
            [[ -e $f ]] || continue
            log "last lines of $f:"
            tail -n 15 "$f" >&2 || true
        done
    fi
    # Never delete while mounted: rm would walk into the mount.
    if is_mounted "$mnt"; then
        log "$mnt is still mounted; leaving $work in place"
    elif [[ $keep == 1 ]]; then
        log "kept $work ${replica_tmp:+and $replica_tmp}"
    else
        rm -rf "$work"
        [[ -z $replica_tmp ]] || rm -rf "$replica_tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_primary: mount BACKING at MNT replicating to 127.0.0.1:$port.
start_primary() {
    "$hbrfs" mount "$backing" "$mnt" --replicate-to "127.0.0.1:$port" --rpo "$rpo" \
        --zstd-level="$zstd_level" "${auth_args[@]}" "${mount_args[@]}" >>"$logs/primary.log" 2>&1 &
    primary_pid=$!
    for _ in $(seq 300); do
        is_mounted "$mnt" && return 0
        if ! kill -0 "$primary_pid" 2>/dev/null; then
            wait "$primary_pid" || true
            primary_pid=
            die "hbrfs mount exited before mounting"
        fi
        sleep 0.1
    done
    die "hbrfs mount did not mount within 30 s"
}

# start_secondary: serve REPLICA on 127.0.0.1:$port.
start_secondary() {
    rm -f "$replica/.hbrfs/listen"
    "$hbrfs" serve "$replica" --listen "127.0.0.1:$port" "${auth_args[@]}" >>"$logs/secondary.log" 2>&1 &
    secondary_pid=$!
    for _ in $(seq 300); do
        [[ -s $replica/.hbrfs/listen ]] && return 0
        if ! kill -0 "$secondary_pid" 2>/dev/null; then
            wait "$secondary_pid" || true
            secondary_pid=
            die "hbrfs serve exited before listening"
        fi
        sleep 0.1
    done
    die "hbrfs serve did not listen within 30 s"
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# ---------------------------------------------------------------------------
# The Python half: content generation, copies, polling, fio runs, the report.
cat >"$work/bench.py" <<'PY'
import json, os, random, stat, subprocess, sys, threading, time, resource

BS = 65536
KINDS = ["zero", "text", "elf", "random"]
WEIGHTS = [25, 25, 35, 15]
HBRFS = os.environ["HBRFS"]
TICK = os.sysconf("SC_CLK_TCK")

def out(obj):
    json.dump(obj, sys.stdout)
    sys.stdout.write("\n")

# --- content ---------------------------------------------------------------

SKIP_EXT = (".gz", ".xz", ".bz2", ".zst", ".lz4", ".zip", ".png", ".jpg", ".gif",
            ".ico", ".mo", ".pyc", ".so", ".a", ".o", ".ttf", ".otf", ".woff", ".woff2", ".jar",
            ".deb", ".db", ".cache", ".svgz", ".pdf")

PRINTABLE = bytes([9, 10, 13] + list(range(32, 127)) + list(range(128, 256)))

def looks_text(head):
    if b"\0" in head:
        return False
    return len(head.translate(None, PRINTABLE)) <= 0.03 * len(head)

def candidates(roots):
    files = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for n in sorted(filenames):
                p = os.path.join(dirpath, n)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size >= 4096:
                    files.append(p)
    return files

def pool(kind, cap, rng):
    """Up to `cap` bytes of real files of `kind`, from files in a seeded random order."""
    if kind == "text":
        roots = ["/usr/share", "/usr/include", "/usr/lib/python3", "/etc"]
        roots += [os.path.join("/usr/lib", d) for d in sorted(os.listdir("/usr/lib")) if d.startswith("python3")]
    else:
        roots = ["/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec"]
    files = candidates([r for r in roots if os.path.isdir(r)])
    rng.shuffle(files)
    buf = bytearray()
    seen = set()
    for p in files:
        if len(buf) >= cap:
            break
        try:
            real = os.path.realpath(p)
            if real in seen:
                continue
            seen.add(real)
            with open(p, "rb") as f:
                head = f.read(4096)
                if kind == "elf" and not head.startswith(b"\x7fELF"):
                    continue
                if kind == "text" and (p.endswith(SKIP_EXT) or not looks_text(head)):
                    continue
                buf += head
                buf += f.read(max(0, cap - len(buf)))
        except OSError:
            continue
    if len(buf) < 4 * BS:
        sys.exit(f"bench.py: found only {len(buf)} bytes of {kind} content")
    return bytes(buf[:cap])

class Content:
    def __init__(self, size, rng):
        mb = 1 << 20
        # Enough that the image rarely repeats a 64 KiB block (offsets into the
        # pools are random bytes, not block aligned), capped to bound memory.
        self.pools = {
            "text": pool("text", min(256 * mb, size // 4 + 4 * mb), rng),
            "elf": pool("elf", min(512 * mb, size * 35 // 100 + 4 * mb), rng),
        }
        self.rng = rng
        self.xor = {}

    def make(self, kind, length, fresh=False):
        """`length` bytes of `kind`. fresh: XOR with a random byte, so the data
        compresses as well as the original but matches nothing in the image
        (neither hbrfs's block hashes nor rsync's rolling checksum)."""
        rng = self.rng
        if kind == "zero":
            return bytes(length)
        if kind == "random":
            return rng.randbytes(length)
        p = self.pools[kind]
        parts, need, off = [], length, rng.randrange(len(p))
        while need:
            piece = p[off:off + need]
            parts.append(piece)
            need -= len(piece)
            off = 0
        data = b"".join(parts)
        if fresh:
            k = rng.randrange(1, 256)
            if k not in self.xor:
                self.xor[k] = bytes(i ^ k for i in range(256))
            data = data.translate(self.xor[k])
        return data

def gen(path, size, seed, changes, outdir):
    """The image, and the change sets of every level (made now, so that
    nothing is generated while hbrfs or rsync is being measured)."""
    rng = random.Random(seed)
    content = Content(size, rng)
    nblocks = size // BS
    counts = dict.fromkeys(KINDS + ["hole"], 0)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    b = 0
    while b < nblocks:
        n = min(rng.randint(1, 64), nblocks - b)
        kind = rng.choices(KINDS, WEIGHTS)[0]
        if kind == "zero" and rng.random() < 0.5:
            counts["hole"] += n
        else:
            counts[kind] += n
            os.pwrite(fd, content.make(kind, n * BS), b * BS)
        b += n
    os.ftruncate(fd, size)
    os.fsync(fd)
    os.close(fd)
    for level, pct in enumerate(changes, 1):
        content.rng = random.Random(seed * 1000 + level)
        n = max(1, round(nblocks * float(pct) / 100))
        blocks = sorted(content.rng.sample(range(nblocks), n))
        with open(os.path.join(outdir, f"change-{pct}.bin"), "wb") as f:
            for _ in blocks:
                f.write(content.make(content.rng.choices(KINDS, WEIGHTS)[0], BS, fresh=True))
        with open(os.path.join(outdir, f"change-{pct}.json"), "w") as f:
            json.dump(blocks, f)
    out({"blocks": nblocks, "counts": counts})

def copy(src, dst):
    """Copies src's data extents into dst (holes stay holes, written zeros are
    written), 1 MiB writes, fsync."""
    t0 = time.monotonic()
    fi = os.open(src, os.O_RDONLY)
    size = os.fstat(fi).st_size
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    off, copied = 0, 0
    while off < size:
        try:
            d = os.lseek(fi, off, os.SEEK_DATA)
        except OSError:
            break
        h = os.lseek(fi, d, os.SEEK_HOLE)
        pos = d
        while pos < h:
            buf = os.pread(fi, min(1 << 20, h - pos), pos)
            os.pwrite(fo, buf, pos)
            pos += len(buf)
            copied += len(buf)
        off = h
    os.ftruncate(fo, size)
    os.fsync(fo)
    os.close(fo)
    os.close(fi)
    out({"bytes": copied, "seconds": time.monotonic() - t0})

def nonzero_sample(src, dst, max_mb):
    fi = os.open(src, os.O_RDONLY)
    size = os.fstat(fi).st_size
    with open(dst, "wb") as fo:
        n, off = 0, 0
        while off < size and n < max_mb << 20:
            blk = os.pread(fi, BS, off)
            if blk.count(0) != len(blk):
                fo.write(blk)
                n += len(blk)
            off += BS
    os.close(fi)
    out({"bytes": n})

# --- daemons -----------------------------------------------------------------

def status(ds):
    r = subprocess.run([HBRFS, "status", "-d", ds, "--json"], capture_output=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"hbrfs status -d {ds}: {r.stderr.decode().strip()}")
    return json.loads(r.stdout)

def journal_stats(ds):
    r = subprocess.run([HBRFS, "journal", "-d", ds, "--json", "stats"], capture_output=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"hbrfs journal stats: {r.stderr.decode().strip()}")
    return json.loads(r.stdout)

def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime

def cpus(pids):
    return {p: cpu_ticks(p) for p in pids}

def cpu_seconds(before, after):
    return {p: (after[p] - before[p]) / TICK for p in before}

def wait_caught_up(mnt, applied_before, epoch_start, timeout, need_connect=False):
    """Polls every 50 ms until the primary has nothing dirty and the replica
    applied a point at or after epoch_start that is newer than applied_before.
    Returns (wall ns when first seen caught up, last status) or (None, status)."""
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        now = time.time_ns()
        st = status(mnt)
        r = st.get("replication") or {}
        applied = r.get("last_applied_epoch", 0)
        if (st["dirty_blocks"] == 0 and applied > applied_before and applied >= epoch_start
                and (r.get("connected") or not need_connect)):
            return now, st
        time.sleep(0.05)
    return None, st

def repl(st, key):
    return (st.get("replication") or {}).get(key, 0) or 0

def initial_sync(mnt, replica, pids, timeout):
    """The secondary was just started; the primary holds the whole image dirty."""
    c0 = cpus(pids)
    t0 = time.time_ns()
    st0 = status(mnt)
    done, st = wait_caught_up(mnt, repl(st0, "last_applied_epoch"), 0, timeout)
    c1 = cpus(pids)
    sec = status(replica)
    res = {
        "caught_up": done is not None,
        "since_secondary_start_s": (done - t0) / 1e9 if done else None,
        # The secondary's own apply time of the last point, no polling.
        "ship_s": (sec.get("applied_at_ns", 0) - t0) / 1e9 if done else None,
        "cpu_s": cpu_seconds(c0, c1),
        "status": st,
        "secondary": sec,
    }
    out(res)

def change(a_img, m_img, mnt, replica, pct, setdir, pids, timeout):
    blocks = json.load(open(os.path.join(setdir, f"change-{pct}.json")))
    with open(os.path.join(setdir, f"change-{pct}.bin"), "rb") as f:
        data = [f.read(BS) for _ in blocks]
    n = len(blocks)
    # The native copy first (rsync's source), outside the measured window.
    fd = os.open(a_img, os.O_WRONLY)
    for b, d in zip(blocks, data):
        os.pwrite(fd, d, b * BS)
    os.fsync(fd)
    os.close(fd)
    st0 = status(mnt)
    epoch_start = journal_stats(mnt)["current_epoch"]
    c0 = cpus(pids)
    t_write = time.time_ns()
    fd = os.open(m_img, os.O_WRONLY)
    for b, d in zip(blocks, data):
        os.pwrite(fd, d, b * BS)
    os.fsync(fd)
    os.close(fd)
    t_end = time.time_ns()
    done, st = wait_caught_up(mnt, repl(st0, "last_applied_epoch"), epoch_start, timeout)
    c1 = cpus(pids)
    sec = status(replica)
    out({
        "pct": pct, "blocks": n, "bytes": n * BS,
        "write_s": (t_end - t_write) / 1e9,
        "caught_up": done is not None,
        "catchup_s": (done - t_end) / 1e9 if done else None,
        # End of the fsync -> the secondary's apply of the last point (its
        # status, no polling): a change may span several points.
        "ship_s": (sec.get("applied_at_ns", 0) - t_end) / 1e9 if done else None,
        "wire_bytes": repl(st, "wire_bytes") - repl(st0, "wire_bytes"),
        "blocks_offered": repl(st, "blocks_offered") - repl(st0, "blocks_offered"),
        "blocks_sent": repl(st, "blocks_sent") - repl(st0, "blocks_sent"),
        "blocks_zero": repl(st, "blocks_zero") - repl(st0, "blocks_zero"),
        "epochs": repl(st, "epochs_shipped") - repl(st0, "epochs_shipped"),
        "cpu_s": sum(cpu_seconds(c0, c1).values()),
        "status": st,
    })

def run_rsync(src, dst):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    # --ignore-times: without it rsync's quick check (same size, same mtime
    # to the second) skips the file when the change lands in the second the
    # previous rsync finished in, and nothing is measured.
    r = subprocess.run(["rsync", "--inplace", "--no-whole-file", "-z", "--ignore-times", "--stats",
                        src, dst],
                       capture_output=True, text=True)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"rsync failed ({r.returncode}): {r.stderr}")
    stats = {}
    # "Number of regular files transferred: 1" must be there, else rsync
    # compared nothing (the report marks it).
    for line in r.stdout.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            v = v.strip().split(" ")[0].replace(",", "")
            if v.isdigit():
                stats[k.strip()] = int(v)
    out({
        "wall_s": wall,
        "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "sent": stats.get("Total bytes sent"),
        "received": stats.get("Total bytes received"),
        "literal": stats.get("Literal data"),
        "matched": stats.get("Matched data"),
        "files_transferred": stats.get("Number of regular files transferred"),
    })

def pctl(vals, p):
    if not vals:
        return None
    v = sorted(vals)
    return v[max(0, -(-len(v) * p // 100) - 1)]

def fio_args(img, rate, bs, iodepth, duration, size, fio_json):
    return ["fio", "--name=rate", f"--filename={img}", "--rw=randwrite",
            f"--bs={bs}", "--direct=1", "--ioengine=libaio", f"--iodepth={iodepth}",
            f"--rate={rate}", "--time_based", f"--runtime={duration}", f"--size={size}",
            "--refill_buffers", "--buffer_compress_percentage=50", "--randrepeat=0",
            "--output-format=json", f"--output={fio_json}"]

def fio_summary(fio_json):
    w = json.load(open(fio_json))["jobs"][0]["write"]
    clat = w.get("clat_ns", {})
    return {"write_MBps": w["bw_bytes"] / 1e6, "write_bytes": w["io_bytes"],
            "clat_p99_us": (clat.get("percentile") or {}).get("99.000000", 0) / 1e3,
            "clat_max_us": clat.get("max", 0) / 1e3}

def fio_native(img, rate, bs, iodepth, duration, size, fio_json):
    r = subprocess.run(fio_args(img, rate, bs, iodepth, duration, size, fio_json),
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"fio failed ({r.returncode}): {r.stderr}")
    out(fio_summary(fio_json))

def fio_rate(mnt, m_img, rate, bs, iodepth, duration, size, pids, timeout, fio_json):
    samples, stop = [], threading.Event()
    t_fio = [None]

    def sampler():
        nxt = time.monotonic()
        while not stop.is_set():
            now = time.time_ns()
            try:
                st = status(mnt)
            except Exception as e:  # noqa: a failed sample is recorded, not fatal
                samples.append({"t": now, "error": str(e)})
            else:
                samples.append({"t": now, "age": repl(st, "replica_age_ms"),
                                 "dirty": st["dirty_blocks"],
                                 "applied": repl(st, "last_applied_epoch")})
            nxt += 0.1
            time.sleep(max(0.0, nxt - time.monotonic()))

    st0 = status(mnt)
    c0 = cpus(pids)
    th = threading.Thread(target=sampler, daemon=True)
    t_fio[0] = time.time_ns()
    th.start()
    r = subprocess.run(fio_args(m_img, rate, bs, iodepth, duration, size, fio_json),
                       capture_output=True, text=True)
    t_end = time.time_ns()
    stop.set()
    th.join()
    c1 = cpus(pids)
    if r.returncode != 0:
        sys.exit(f"fio failed ({r.returncode}): {r.stderr}")
    epoch_end = journal_stats(mnt)["current_epoch"]
    done, st = wait_caught_up(mnt, 0, epoch_end - 1, timeout)
    fsum = fio_summary(fio_json)
    good = [s for s in samples if "age" in s and s["t"] <= t_end]
    ages = [min(s["age"], (s["t"] - t_fio[0]) / 1e6) for s in good]
    wall = (t_end - t_fio[0]) / 1e9
    cpu = cpu_seconds(c0, c1)
    out({
        "rate": rate, "bs": bs, "duration": duration,
        **fsum,
        "samples": len(good), "sample_errors": sum(1 for s in samples if "error" in s),
        "rpo_p99_ms": pctl(ages, 99), "rpo_max_ms": max(ages) if ages else None,
        "rpo_p50_ms": pctl(ages, 50),
        "max_dirty_blocks": max((s["dirty"] for s in good), default=None),
        "cpu_pct": {p: 100 * cpu[p] / wall for p in cpu},
        "drain_s": (done - t_end) / 1e9 if done else None,
        "wire_bytes": repl(st, "wire_bytes") - repl(st0, "wire_bytes"),
        "raw_bytes_sent": repl(st, "raw_bytes_sent") - repl(st0, "raw_bytes_sent"),
        "epochs": repl(st, "epochs_shipped") - repl(st0, "epochs_shipped"),
        "cuts": st.get("cuts"), "cut_stall_p99_ns": st.get("cut_stall_p99_ns"),
        "cut_stall_max_ns": st.get("cut_stall_max_ns", st.get("max_cut_stall_ns")),
        "status": st,
    })

# --- report ------------------------------------------------------------------

def load(path):
    with open(path) as f:
        return json.load(f)

def fb(n):
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"

def fs(s, digits=2):
    return "-" if s is None else f"{s:.{digits}f} s"

def report(res, roles):
    roles = json.loads(roles)
    P, S = roles["primary"], roles["secondary"]
    meta = load(os.path.join(res, "meta.json"))
    L = []
    p = L.append
    p(f"## hbrfs replication benchmark\n")
    p(f"{meta['when']} · {meta['host']} · {meta['cpus']} CPUs · kernel {meta['kernel']} · "
      f"hbrfs {meta['commit']} · rpo {meta['rpo']} · zstd level {meta['zstd_level']} · "
      f"mount args: {meta['mount_args'] or '(none)'} · replica on {meta['replica_dir']} · "
      f"load average before the run {meta['load_start']}\n")
    gen = load(os.path.join(res, "gen.json"))
    c = gen["counts"]
    nb = gen["blocks"]
    mix = ", ".join(f"{k} {100 * c[k] / nb:.0f}%" for k in ["hole", "zero", "text", "elf", "random"])
    p(f"Image: {fb(meta['size'])} raw, 64 KiB blocks: {mix} (zero = written zeros).\n")

    # (a) initial sync
    cp = load(os.path.join(res, "copyin.json"))
    sync = load(os.path.join(res, "sync.json"))
    st = sync["status"]["replication"]
    hashed = (st["blocks_offered"] - st["blocks_zero"]) * 65536
    pcpu = sync["cpu_s"].get(str(P), 0)
    scpu = sync["cpu_s"].get(str(S), 0)
    p("### (a) Initial full sync\n")
    p("| what | value |")
    p("| --- | ---: |")
    p(f"| copy into the mount (no secondary yet), {fb(cp['bytes'])} of data + fsync | "
      f"{fs(cp['seconds'])} ({cp['bytes'] / cp['seconds'] / 1e6:.0f} MB/s) |")
    if not sync["caught_up"]:
        p("| sync | **did not catch up** |")
    else:
        p(f"| sync: secondary started -> last point applied | {fs(sync['ship_s'])} |")
        p(f"| sync: secondary started -> caught up (incl. reconnect backoff) | {fs(sync['since_secondary_start_s'])} |")
    p(f"| blocks offered / zero markers / sent / \"have\" | {st['blocks_offered']} / {st['blocks_zero']} / "
      f"{st['blocks_sent']} / {st['blocks_have']} |")
    p(f"| raw bytes sent -> compressed | {fb(st['raw_bytes_sent'])} -> {fb(st['compressed_bytes_sent'])} "
      f"(ratio {st['compression_ratio']:.2f}) |")
    p(f"| wire bytes | {fb(st['wire_bytes'])} ({meta['size'] / max(st['wire_bytes'], 1):.2f}x less than the image size) |")
    p(f"| CPU: primary / secondary | {pcpu:.1f} s / {scpu:.1f} s |")
    p("")

    # (a) changes
    p("### (a) Catch-up after a change, next to rsync\n")
    p("hbrfs catch-up: end of the fsync of the change -> replica caught up (polled every 50 ms; "
      "includes up to one RPO of waiting for the next tick). ship: end of the fsync -> the secondary applied the "
      "last point of the change (its status: no polling). "
      "rsync: `rsync --inplace --no-whole-file -z --ignore-times --stats`, caches dropped. CPU: both hbrfs daemons / "
      "all rsync processes. Speedup = rsync wall / hbrfs catch-up (and / hbrfs ship); bytes ratio = rsync sent / hbrfs wire.\n")
    p("| change | blocks (bytes) | hbrfs catch-up | hbrfs ship | points | hbrfs wire | hbrfs CPU | rsync wall | "
      "rsync sent | rsync received | rsync CPU | speedup (catch-up) | speedup (ship) | bytes ratio |")
    p("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for pct in meta["changes"]:
        ch = load(os.path.join(res, f"change-{pct}.json"))
        rs = load(os.path.join(res, f"rsync-{pct}.json"))
        if ch["caught_up"]:
            speed = f"{rs['wall_s'] / ch['catchup_s']:.1f}x" if ch["catchup_s"] > 0 else "-"
            speed_ship = f"{rs['wall_s'] / ch['ship_s']:.1f}x" if ch["ship_s"] and ch["ship_s"] > 0 else "-"
            cu = fs(ch["catchup_s"])
        else:
            speed, speed_ship, cu = "-", "-", "**timeout**"
        ratio = f"{rs['sent'] / ch['wire_bytes']:.2f}" if ch["wire_bytes"] else "-"
        if rs.get("files_transferred") != 1:
            speed, speed_ship, ratio = "**rsync skipped the file**", "-", "-"
        p(f"| {pct}% | {ch['blocks']} ({fb(ch['bytes'])}) | {cu} | {fs(ch['ship_s'])} | {ch['epochs']} | {fb(ch['wire_bytes'])} | "
          f"{ch['cpu_s']:.2f} s | {fs(rs['wall_s'])} | {fb(rs['sent'])} | {fb(rs['received'])} | "
          f"{rs['cpu_s']:.2f} s | {speed} | {speed_ship} | {ratio} |")
    p("")

    # (b) + (d)
    rates = meta["rates"]
    if rates:
        p(f"### (b) Sustained random writes, --rpo {meta['rpo']}; (d) cut stall\n")
        p(f"fio randwrite O_DIRECT libaio QD{meta['fio_iodepth']}, bs {meta['fio_bs']}, half-compressible "
          f"fresh buffers, {meta['duration']} s on the replicated image. Achieved RPO: age of the applied "
          "point, sampled every 100 ms. CPU in % of one core over the fio run. Cut stall: how long cuts "
          "held the write gate during that run (the primary is restarted before each rate). points: points "
          "shipped during the run and the drain. native clat: the same fio job on the native copy "
          f"({meta['native_duration']} s), for the disk's own latency.\n")
        p("| rate | achieved | RPO p50 | RPO p99 | RPO max | points | drain after | CPU primary | CPU secondary | "
          "fio clat p99 / max | native clat p99 / max | wire / written | cut stall p99 | cut stall max | cuts |")
        p("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for rate in rates:
            f = load(os.path.join(res, f"fio-{rate}.json"))
            fr = load(os.path.join(res, f"roles-{rate}.json"))
            npath = os.path.join(res, f"fio-native-{rate}.json")
            nat = load(npath) if os.path.exists(npath) else None
            natc = f"{nat['clat_p99_us'] / 1000:.2f} / {nat['clat_max_us'] / 1000:.1f} ms" if nat else "-"
            ms = lambda v: "-" if v is None else f"{v / 1000:.2f} s"
            us = lambda v: "-" if v is None else f"{v / 1000:.3f} ms"
            p(f"| {rate} | {f['write_MBps']:.0f} MB/s | {ms(f['rpo_p50_ms'])} | {ms(f['rpo_p99_ms'])} | "
              f"{ms(f['rpo_max_ms'])} | {f['epochs']} | {fs(f['drain_s']) if f['drain_s'] is not None else '**timeout**'} | "
              f"{f['cpu_pct'][str(fr['primary'])]:.0f}% | {f['cpu_pct'][str(fr['secondary'])]:.0f}% | "
              f"{f['clat_p99_us'] / 1000:.2f} / {f['clat_max_us'] / 1000:.1f} ms | {natc} | "
              f"{fb(f['wire_bytes'])} / {fb(f['write_bytes'])} | {us(f['cut_stall_p99_ns'] / 1000 if f['cut_stall_p99_ns'] is not None else None)} | "
              f"{us(f['cut_stall_max_ns'] / 1000 if f['cut_stall_max_ns'] is not None else None)} | {f['cuts']} |")
        p("")

    # (c)
    z = load(os.path.join(res, "zstd.json"))
    p("### (c) Hash + compress throughput\n")
    p("| what | rate |")
    p("| --- | ---: |")
    p(f"| `zstd -b{meta['zstd_level']} -B64K` on {fb(z['bytes'])} of the image's non-zero blocks, one core "
      f"(compression only; reference) | {z['compress_MBps']:.0f} MB/s, ratio {z['ratio']:.2f} "
      f"(decompress {z['decompress_MBps']:.0f} MB/s) |")
    if sync["caught_up"] and sync["ship_s"]:
        p(f"| hbrfs initial sync: non-zero bytes hashed + compressed ({fb(hashed)}) / sync wall time "
          f"(secondary started -> last point applied) | {hashed / sync['ship_s'] / 1e6:.0f} MB/s |")
    if pcpu:
        p(f"| hbrfs initial sync: same bytes / primary CPU seconds (read + hash + compress + send, per core) "
          f"| {hashed / pcpu / 1e6:.0f} MB/s |")
    if scpu:
        p(f"| hbrfs initial sync: same bytes / secondary CPU seconds (receive + decompress + verify + apply) "
          f"| {hashed / scpu / 1e6:.0f} MB/s |")
    p("")

    # Targets
    p("### Targets (issue 3)\n")
    p("| target | measured | met |")
    p("| --- | --- | :---: |")
    lowest = min(meta["changes"], key=float) if meta["changes"] else None
    if lowest is not None:
        ch = load(os.path.join(res, f"change-{lowest}.json"))
        rs = load(os.path.join(res, f"rsync-{lowest}.json"))
        if ch["caught_up"] and ch["catchup_s"]:
            sp = rs["wall_s"] / ch["catchup_s"]
            ok = sp >= 20 and ch["wire_bytes"] < rs["sent"]
            ship = f", {rs['wall_s'] / ch['ship_s']:.1f}x on ship time" if ch["ship_s"] else ""
            p(f"| >= 20x faster than rsync at {lowest}% change, fewer bytes | {sp:.1f}x on catch-up{ship}; "
              f"{fb(ch['wire_bytes'])} vs {fb(rs['sent'])} sent | {'yes' if ok else 'no'} |")
    hundred = [r for r in rates if r.lower().startswith("100m")]
    if hundred:
        f = load(os.path.join(res, f"fio-{hundred[0]}.json"))
        ok = f["rpo_max_ms"] is not None and f["rpo_max_ms"] <= 2000
        p(f"| achieved RPO <= 2 s at 100 MB/s | max {f['rpo_max_ms'] / 1000 if f['rpo_max_ms'] is not None else float('nan'):.2f} s, "
          f"p99 {f['rpo_p99_ms'] / 1000 if f['rpo_p99_ms'] is not None else float('nan'):.2f} s | {'yes' if ok else 'no'} |")
    if pcpu:
        v = hashed / pcpu / 1e6
        p(f"| >= 600 MB/s per core hash + compress | {v:.0f} MB/s per primary CPU-second; "
          f"zstd alone {z['compress_MBps']:.0f} MB/s | {'yes' if v >= 600 else 'no'} |")
    if rates:
        worst = max((load(os.path.join(res, f"fio-{r}.json"))["cut_stall_p99_ns"] or 0) for r in rates)
        p(f"| cut stall p99 <= 1 ms | worst p99 {worst / 1e6:.3f} ms | {'yes' if worst <= 1e6 else 'no'} |")
    p("")
    v = meta.get("verify", [])
    if v:
        p("Verification: " + "; ".join(v) + "\n")
    print("\n".join(L))

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "gen":
        gen(args[0], int(args[1]), int(args[2]), args[3].split(), args[4])
    elif cmd == "copy":
        copy(args[0], args[1])
    elif cmd == "nonzero-sample":
        nonzero_sample(args[0], args[1], int(args[2]))
    elif cmd == "initial-sync":
        initial_sync(args[0], args[1], [int(x) for x in args[2].split(",")], float(args[3]))
    elif cmd == "change":
        change(args[0], args[1], args[2], args[3], args[4], args[5],
               [int(x) for x in args[6].split(",")], float(args[7]))
    elif cmd == "rsync":
        run_rsync(args[0], args[1])
    elif cmd == "fio":
        fio_rate(args[0], args[1], args[2], args[3], args[4], int(args[5]), int(args[6]),
                 [int(x) for x in args[7].split(",")], float(args[8]), args[9])
    elif cmd == "fio-native":
        fio_native(args[0], args[1], args[2], args[3], int(args[4]), int(args[5]), args[6])
    elif cmd == "status-field":
        st = status(args[0])
        for k in args[1].split("."):
            st = st[k]
        print(st)
    elif cmd == "report":
        report(args[0], args[1])
    else:
        sys.exit(f"bench.py: unknown command {cmd}")
PY
export HBRFS=$hbrfs
# In its own process group, in the background: a signal to this script is
# handled at once (bash runs traps only between foreground commands), and
# cleanup can stop the helper together with the fio or rsync it runs.
py() {
    setsid -w python3 "$work/bench.py" "$@" &
    py_pid=$!
    wait "$py_pid"
    local rc=$?
    py_pid=
    return "$rc"
}

meta_verify=()
pyjson_list() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@"; }

# ---------------------------------------------------------------------------
# Other work on the machine (a test suite, another benchmark) distorts
# everything here, rsync (disk bound) most: say so in the report.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
awk -v l="${load_start%% *}" 'BEGIN { exit !(l > 0.5) }' &&
    log "warning: load average $load_start before starting: other work runs on this machine"
log "work dir $work; image $size_bytes bytes; changes: $changes%; rates: ${rates:-none} x ${duration}s; rpo $rpo"

# A free port for the secondary, chosen now: the primary must know it before
# the secondary exists (the initial sync starts when the secondary appears).
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

log "generating the image (native, $work/a/disk.img)"
mkdir -p "$work/changes"
py gen "$work/a/disk.img" "$size_bytes" "$seed" "$changes" "$work/changes" >"$res/gen.json"
log "content: $(cat "$res/gen.json")"
py copy "$work/a/disk.img" "$work/b/disk.img" >/dev/null

log "mounting the primary (secondary not started yet)"
start_primary
log "copying the image into the mount"
py copy "$work/a/disk.img" "$mnt/disk.img" >"$res/copyin.json"
log "copy: $(cat "$res/copyin.json")"

log "starting the secondary on 127.0.0.1:$port: initial full sync"
start_secondary
py initial-sync "$mnt" "$replica" "$primary_pid,$secondary_pid" "$catchup_timeout" >"$res/sync.json"
python3 - "$res/sync.json" <<'EOF' >&2
import json, sys
s = json.load(open(sys.argv[1])); r = s["status"]["replication"]
print(f"  caught up: {s['caught_up']}, ship {s['ship_s']} s, wire {r['wire_bytes']} B, "
      f"ratio {r['compression_ratio']:.2f}, cpu {s['cpu_s']}")
EOF
grep -q '"caught_up": true' "$res/sync.json" || die "the initial sync did not catch up within ${catchup_timeout}s"
echo "{\"primary\": $primary_pid, \"secondary\": $secondary_pid}" >"$res/roles-a.json"

for pct in $changes; do
    log "change $pct% of the blocks"
    py change "$work/a/disk.img" "$mnt/disk.img" "$mnt" "$replica" "$pct" "$work/changes" \
        "$primary_pid,$secondary_pid" "$catchup_timeout" >"$res/change-$pct.json"
    python3 - "$res/change-$pct.json" <<'EOF' >&2
import json, sys
c = json.load(open(sys.argv[1]))
print(f"  hbrfs: {c['blocks']} blocks, caught up {c['caught_up']} in {c['catchup_s']} s "
      f"(ship {c['ship_s']} s, {c['epochs']} points), wire {c['wire_bytes']} B, cpu {c['cpu_s']:.2f} s")
EOF
    log "rsync for $pct% (caches dropped)"
    drop_caches
    py rsync "$work/a/disk.img" "$work/b/disk.img" >"$res/rsync-$pct.json"
    log "  rsync: $(cat "$res/rsync-$pct.json")"
done

if [[ $verify == 2 ]]; then
    log "verifying: native A, primary backing, replica, rsync copy B"
    for pair in "native A:$work/a/disk.img:primary:$backing/disk.img" \
        "primary:$backing/disk.img:replica:$replica/disk.img" \
        "native A:$work/a/disk.img:rsync copy B:$work/b/disk.img"; do
        IFS=: read -r n1 f1 n2 f2 <<<"$pair"
        if cmp -s "$f1" "$f2"; then
            meta_verify+=("after (a) $n1 == $n2")
        else
            meta_verify+=("after (a) **$n1 differs from $n2**")
            log "MISMATCH: $f1 vs $f2: $(cmp "$f1" "$f2" 2>&1 | head -n 1)"
        fi
    done
fi

log "zstd -b$zstd_level on the image's non-zero blocks"
py nonzero-sample "$work/a/disk.img" "$work/sample.bin" "$zstd_sample_mb" >/dev/null
# zstd 1.5 prints progress lines separated by \r, the last one with both
# speeds: " \-sample.bin :1073741824 -> 400000000 (x2.684), 512.3 MB/s, 2014.2 MB/s"
# (its final " 1#..." summary line comes out truncated when not on a tty).
if ((zstd_level < 0)); then zlevel=(--fast=$((-zstd_level)) -b); else zlevel=(-b"$zstd_level"); fi
zstd "${zlevel[@]}" -B64KiB -i3 "$work/sample.bin" >"$work/zstd.txt" 2>&1 || true
python3 - "$work/zstd.txt" <<'EOF' >"$res/zstd.json"
import json, re, sys
text = open(sys.argv[1], errors="replace").read()
pat = r":\s*(\d+)\s*->\s*(\d+)\s*\(x?([\d.]+)\),\s*([\d.]+)\s*MB/s\s*,\s*([\d.]+)\s*MB/s"
found = [m for seg in re.split(r"[\r\n]", text) for m in [re.search(pat, seg)] if m]
if not found:
    sys.exit(f"cannot parse zstd -b output: {text[-300:]!r}")
m = found[-1]
print(json.dumps({"bytes": int(m[1]), "compressed": int(m[2]), "ratio": float(m[3]),
                  "compress_MBps": float(m[4]), "decompress_MBps": float(m[5])}))
EOF
rm -f "$work/sample.bin"
log "  zstd: $(cat "$res/zstd.json")"

for rate in $rates; do
    if ((native_duration > 0)); then
        log "fio randwrite --rate=$rate bs=$fio_bs for ${native_duration}s on the native copy (latency baseline)"
        py fio-native "$work/a/disk.img" "$rate" "$fio_bs" "$fio_iodepth" "$native_duration" "$size_bytes" \
            "$work/fio-native-$rate.out.json" >"$res/fio-native-$rate.json"
    fi
    log "restarting the primary before fio at $rate"
    stop_primary
    start_primary
    # A clean restart must not dirty anything, and must reconnect.
    for _ in $(seq 200); do
        [[ $(py status-field "$mnt" replication.connected) == True ]] && break
        sleep 0.1
    done
    dirty=$(py status-field "$mnt" dirty_blocks)
    [[ $dirty == 0 ]] || log "ANOMALY: $dirty blocks dirty after a clean restart"
    echo "{\"primary\": $primary_pid, \"secondary\": $secondary_pid, \"dirty_after_restart\": $dirty}" >"$res/roles-$rate.json"
    log "fio randwrite --rate=$rate bs=$fio_bs for ${duration}s"
    py fio "$mnt" "$mnt/disk.img" "$rate" "$fio_bs" "$fio_iodepth" "$duration" "$size_bytes" \
        "$primary_pid,$secondary_pid" "$catchup_timeout" "$work/fio-$rate.out.json" >"$res/fio-$rate.json"
    python3 - "$res/fio-$rate.json" <<'EOF' >&2
import json, sys
f = json.load(open(sys.argv[1]))
print(f"  {f['write_MBps']:.0f} MB/s, RPO p99 {f['rpo_p99_ms']} ms max {f['rpo_max_ms']} ms, "
      f"drain {f['drain_s']} s, cpu {f['cpu_pct']}, stall p99 {f['cut_stall_p99_ns']} ns max {f['cut_stall_max_ns']} ns")
EOF
done

if [[ $verify == 1 && -z $rates ]] || [[ $verify != 0 && -n $rates ]]; then
    # After (b), or after (a) when there is no (b); VERIFY=2 checked (a) above.
    if cmp -s "$backing/disk.img" "$replica/disk.img"; then
        meta_verify+=("at the end primary == replica")
    else
        meta_verify+=("at the end **primary differs from replica**")
        log "MISMATCH at the end: $(cmp "$backing/disk.img" "$replica/disk.img" 2>&1 | head -n 1)"
    fi
fi

python3 - "$res/meta.json" "$size_bytes" "$rpo" "$zstd_level" "${HBRFS_MOUNT_ARGS:-}" "$fio_bs" \
    "$fio_iodepth" "$duration" "$native_duration" "$(cd "$repo" && git describe --always --dirty 2>/dev/null || echo unknown)" \
    "$changes" "$rates" "$(pyjson_list "${meta_verify[@]}")" "$load_start" \
    "$(stat -f -c %T "$replica") $(df --output=source "$replica" | tail -n 1)" <<'EOF'
import json, os, platform, sys, time
a = sys.argv
json.dump({"size": int(a[2]), "rpo": a[3], "zstd_level": a[4], "mount_args": a[5], "fio_bs": a[6],
           "fio_iodepth": a[7], "duration": int(a[8]), "native_duration": int(a[9]), "commit": a[10],
           "changes": a[11].split(), "rates": a[12].split(), "verify": json.loads(a[13]),
           "load_start": a[14], "replica_dir": a[15],
           "when": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "cpus": os.cpu_count(),
           "kernel": platform.release()}, open(a[1], "w"))
EOF

# Warnings and errors of both daemons, grouped (timestamps stripped).
{
    py report "$res" "$(cat "$res/roles-a.json")"
    echo "### Daemon warnings and errors"
    echo
    found=0
    for f in "$logs"/primary.log "$logs"/secondary.log; do
        [[ -e $f ]] || continue
        if grep -qE 'WARN|ERROR|panic' "$f"; then
            found=1
            echo "$(basename "$f"):"
            echo '```'
            grep -E 'WARN|ERROR|panic' "$f" | sed -E 's/^\[[^ ]+ /[/' | sort | uniq -c | sort -rn | head -n 20
            echo '```'
        fi
    done
    ((found)) || echo "none"
    echo
    echo "(A few \"connecting ... transport error\" warnings, one per backoff step, are expected: the primary runs before the secondary exists.)"
    echo
    echo "Total time: $(elapsed) s"
} | tee "$work/report.md"
[[ -z $results_file ]] || cp "$work/report.md" "$results_file"
