#!/usr/bin/env bash
# Write throughput of an hbrfs mount against the directory it passes through to.
#
# Four configurations, all on the same file system (one temp dir under
# BENCH_DIR, /var/tmp by default):
#   native       fio straight on a directory
#   no-tracking  hbrfs mount --no-tracking: the FUSE passthrough alone
#   tracking     hbrfs mount (default): passthrough + dirty bitmaps + journal
#   replicating  tracking, replicating to a local secondary: `hbrfs serve`
#                on 127.0.0.1 with its replica folder in the same temp dir,
#                `hbrfs mount --replicate-to ... --rpo BENCH_RPO`
# c/b isolates what change tracking costs; c/a is what a hypervisor sees;
# d/c is what replication costs the write path (target >= 0.95): the
# replicator reads, hashes, compresses and ships while fio writes, and the
# secondary applies on the same disk. Before each job the replicating
# configuration waits (untimed) until the secondary caught up, so that a
# job does not pay for shipping the previous one.
#
# Jobs (the write patterns of a VM image, see shared/PERF-NOTES.md):
#   seq-1m-buffered+fsync  1 MiB writes through the page cache, one fsync at
#                          the end (copying an image in). One pass over
#                          BENCH_SEQ_SIZE, not time based: a timed loop over a
#                          file that fits in RAM would measure the page cache.
#   seq-1m-direct          1 MiB O_DIRECT writes (QEMU cache=none, streaming)
#   rand-4k-buffered       4 KiB random buffered writes, QD1, fsync at the end
#   rand-4k-direct-qd1     4 KiB random O_DIRECT writes, psync, QD1
#   rand-4k-direct-qd16    4 KiB random O_DIRECT writes, libaio, QD16
# Reading the O_DIRECT rows: O_DIRECT on the mount bypasses the mount's page
# cache, but a daemon that opens its backing files without O_DIRECT (hbrfs
# does, see src/fs/mod.rs) lands those writes in the host page cache, so its
# figures can exceed native: compare them with that in mind.
# Sequential jobs report MB/s (10^6 bytes), random jobs IOPS. Each figure is
# the median of BENCH_RUNS runs; page cache is dropped before every run.
# The runs of the three configurations are interleaved (run 1 of a, b, c,
# then run 2 ...) so that drift of a noisy VM spreads over all of them.
#
# Environment knobs:
#   BENCH_RUNS=3           runs per job and configuration (median reported)
#   BENCH_RUNTIME=10       seconds per time-based job
#   BENCH_SEQ_SIZE=1G      file size for sequential jobs
#   BENCH_RAND_SIZE=256M   file size for random jobs
#   BENCH_DIR=/var/tmp     where the temp dir goes (must not be tmpfs)
#   BENCH_JOBS="..."       space-separated subset of the job names above
#   BENCH_CONFIGS="native no-tracking tracking replicating"  subset of configurations
#   BENCH_RPO=1s           --rpo of the replicating configuration
#   BENCH_CATCHUP_TIMEOUT=600  seconds to wait for the secondary to catch up
#   HBRFS_MOUNT_ARGS=""    extra `hbrfs mount` arguments, e.g. "--threads 16"
#   BENCH_FUSE_MAX_BACKGROUND=N  after each mount, set the FUSE connection's
#                          max_background to N and congestion_threshold to
#                          3N/4 (/sys/fs/fuse/connections; kernel defaults
#                          12 and 9): writeback requests are background
#                          requests, so this A/Bs the throttle without a
#                          rebuild
#   BENCH_KEEP_JSON=DIR    copy every fio JSON output into DIR
#
# Needs root (drop_caches, FUSE mount), fio with libaio, python3, jq.
# Default run: 4 timed jobs x 10 s x 3 runs x 4 configs + file preparation,
# cache drops and the replica's catch-up, ~11 minutes on a 2-core VM.
set -euo pipefail

runs=${BENCH_RUNS:-3}
runtime=${BENCH_RUNTIME:-10}
seq_size=${BENCH_SEQ_SIZE:-1G}
rand_size=${BENCH_RAND_SIZE:-256M}
bench_dir=${BENCH_DIR:-/var/tmp}
all_jobs="seq-1m-buffered+fsync seq-1m-direct rand-4k-buffered rand-4k-direct-qd1 rand-4k-direct-qd16"
jobs=${BENCH_JOBS:-$all_jobs}
configs=${BENCH_CONFIGS:-native no-tracking tracking replicating}
rpo=${BENCH_RPO:-1s}
max_background=${BENCH_FUSE_MAX_BACKGROUND:-}
# Read by wait_caught_up (common.sh).
timeout=${BENCH_CATCHUP_TIMEOUT:-600}
# Word splitting is the point: this carries several arguments.
read -r -a mount_args <<<"${HBRFS_MOUNT_ARGS:-}"
keep_json=${BENCH_KEEP_JSON:-}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
hbrfs=$repo/target/release/hbrfs

log() { printf '[fs.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root: dropping caches and mounting need it"
command -v fio >/dev/null || die "fio not found (apt-get install fio)"
command -v python3 >/dev/null || die "python3 not found"
command -v jq >/dev/null || die "jq not found"
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer"
for j in $jobs; do
    [[ " $all_jobs " == *" $j "* ]] || die "unknown job '$j' (known: $all_jobs)"
done
for c in $configs; do
    [[ $c == native || $c == no-tracking || $c == tracking || $c == replicating ]] ||
        die "unknown config '$c'"
done
# tmpfs has no O_DIRECT and no writeback: the comparison would be meaningless.
[[ $(stat -f -c %T "$bench_dir") != tmpfs ]] || die "BENCH_DIR $bench_dir is tmpfs"

if [[ " $configs " != " native " ]] && [[ ! -x $hbrfs ]]; then
    log "building $hbrfs"
    (cd "$repo" && cargo build --release --quiet) || die "cargo build --release failed"
fi

work=$(mktemp -d "$bench_dir/hbrfs-bench.XXXXXX")
mnt=$work/mnt
mkdir -p "$mnt" "$work/native" "$work/results"
daemon_pid=
serve_pid=
fio_pid=

# shellcheck source=contrib/bench/common.sh
source "$repo/contrib/bench/common.sh"

unmount() {
    if is_mounted "$mnt"; then
        fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null || {
            # A wedged daemon: killing it aborts the FUSE connection, after
            # which the lazy unmount cannot block.
            log "clean unmount of $mnt failed; killing the daemon"
            if [[ -n $daemon_pid ]]; then kill -9 "$daemon_pid" 2>/dev/null || true; fi
            umount -l "$mnt" 2>/dev/null || true
        }
    fi
    if [[ -n $daemon_pid ]]; then
        # Give the daemon time for its clean shutdown (journal flush; a
        # replicating one may finish shipping a point first).
        for _ in $(seq 300); do
            kill -0 "$daemon_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$daemon_pid" 2>/dev/null; then
            log "daemon $daemon_pid still running 30 s after unmount; killing it"
            kill -9 "$daemon_pid" 2>/dev/null || true
        fi
        wait "$daemon_pid" 2>/dev/null || true
        daemon_pid=
    fi
    if [[ -n $serve_pid ]]; then
        stop "$serve_pid"
        serve_pid=
    fi
}

cleanup() {
    local rc=$?
    if [[ -n $fio_pid ]]; then
        # TERM to timeout(1) is passed on to fio.
        kill "$fio_pid" 2>/dev/null || true
        wait "$fio_pid" 2>/dev/null || true
    fi
    unmount
    # Never delete while mounted: rm would walk into the mount.
    if is_mounted "$mnt"; then
        log "$mnt is still mounted; leaving $work in place"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# mount CONFIG: start the daemon on CONFIG's own backing dir (and for
# replicating, first the secondary on its own replica dir), wait for the mount.
mount_hbrfs() {
    local cfg=$1 backing=$work/backing-$1 replica=$work/replica-$1 extra=()
    if [[ $cfg == no-tracking ]]; then extra=(--no-tracking); fi
    if [[ $cfg == replicating ]]; then
        rm -f "$replica/.hbrfs/listen"
        "$hbrfs" serve "$replica" --listen 127.0.0.1:0 >>"$work/hbrfs-serve.log" 2>&1 &
        serve_pid=$!
        wait_listen "$replica" "$serve_pid"
        extra=(--replicate-to "$(<"$replica/.hbrfs/listen")" --auth-key "$replica/.hbrfs/auth.key"
            --rpo "$rpo")
    fi
    mkdir -p "$backing"
    "$hbrfs" mount "$backing" "$mnt" "${extra[@]}" "${mount_args[@]}" \
        >>"$work/hbrfs-$cfg.log" 2>&1 &
    daemon_pid=$!
    # Poll instead of sleeping a fixed time: mount time varies with the size
    # of the datastore (the mount walks the backing tree).
    for _ in $(seq 300); do
        if is_mounted "$mnt"; then
            tune_connection
            return 0
        fi
        if ! kill -0 "$daemon_pid" 2>/dev/null; then
            wait "$daemon_pid" || true
            daemon_pid=
            # A daemon that forks away still leaves the mount behind.
            if is_mounted "$mnt"; then tune_connection; return 0; fi
            tail -n 20 "$work/hbrfs-$cfg.log" >&2
            die "hbrfs mount ($cfg) exited before mounting"
        fi
        sleep 0.1
    done
    tail -n 20 "$work/hbrfs-$cfg.log" >&2
    die "hbrfs mount ($cfg) did not mount within 30 s"
}

# Applies BENCH_FUSE_MAX_BACKGROUND to the FUSE connection of the mount
# (its directory in /sys/fs/fuse/connections is named by the mount's device
# number).
tune_connection() {
    [[ -n $max_background ]] || return 0
    local conn
    conn=/sys/fs/fuse/connections/$(stat -c %d "$mnt")
    [[ -d $conn ]] || die "no FUSE connection directory $conn (is fusectl mounted?)"
    echo "$max_background" >"$conn/max_background"
    echo $((max_background * 3 / 4)) >"$conn/congestion_threshold"
}

# Directory the jobs of CONFIG write into.
target_dir() {
    if [[ $1 == native ]]; then echo "$work/native"; else echo "$mnt"; fi
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# fio arguments for JOB (file name relative to the target dir comes first).
job_args() {
    local timed=(--time_based --runtime="$runtime")
    case $1 in
    seq-1m-buffered+fsync)
        echo seq.dat --rw=write --bs=1M --size="$seq_size" --ioengine=psync \
            --direct=0 --end_fsync=1 ;;
    seq-1m-direct)
        echo seq.dat --rw=write --bs=1M --size="$seq_size" --ioengine=psync \
            --direct=1 "${timed[@]}" ;;
    rand-4k-buffered)
        echo rand.dat --rw=randwrite --bs=4k --size="$rand_size" --ioengine=psync \
            --direct=0 --end_fsync=1 "${timed[@]}" ;;
    rand-4k-direct-qd1)
        echo rand.dat --rw=randwrite --bs=4k --size="$rand_size" --ioengine=psync \
            --direct=1 "${timed[@]}" ;;
    rand-4k-direct-qd16)
        echo rand.dat --rw=randwrite --bs=4k --size="$rand_size" --ioengine=libaio \
            --iodepth=16 --direct=1 "${timed[@]}" ;;
    esac
}

# Write both data files in full before measuring, so every run overwrites
# allocated blocks (a VM image in steady state) instead of the first run
# paying for allocation or unwritten-extent conversion.
prepare_files() {
    local dir=$1
    fio --name=prep-seq --filename="$dir/seq.dat" --rw=write --bs=1M --size="$seq_size" \
        --end_fsync=1 --output=/dev/null
    fio --name=prep-rand --filename="$dir/rand.dat" --rw=write --bs=1M --size="$rand_size" \
        --end_fsync=1 --output=/dev/null
}

# run_job CONFIG JOB RUN: one fio run, JSON kept in results/. A failing job
# (e.g. O_DIRECT refused) is recorded and shown as such, not fatal.
run_job() {
    local cfg=$1 job=$2 run=$3 dir args out
    dir=$(target_dir "$cfg")
    read -r -a args <<<"$(job_args "$job")"
    out=$work/results/$cfg.$job.$run.json
    if [[ $cfg == replicating ]]; then
        wait_caught_up "$work/backing-$cfg" "$work/replica-$cfg" "$daemon_pid" "$serve_pid" >/dev/null
    fi
    drop_caches
    # The timeout bounds a daemon that stops answering: fio would wait forever.
    # fio runs in the background and we `wait` for it, because bash defers a
    # trap until a foreground child exits, while `wait` returns at once: a
    # Ctrl-C or TERM then unmounts right away instead of after the job.
    timeout --kill-after=30 $((runtime * 4 + 300)) \
        fio --name="$job" --filename="$dir/${args[0]}" "${args[@]:1}" \
        --output-format=json --output="$out" >"$work/fio.err" 2>&1 &
    fio_pid=$!
    if ! wait "$fio_pid"; then
        log "fio $job on $cfg (run $run) failed: $(tail -n 3 "$work/fio.err" | tr '\n' ' ')"
        rm -f "$out"
    fi
    fio_pid=
}

# The machine may be shared: the table says how busy it was.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
log "work dir $work; jobs: $jobs; configs: $configs; $runs runs of ${runtime}s; load $load_start"
for run in $(seq "$runs"); do
    for cfg in $configs; do
        if [[ $cfg != native ]]; then mount_hbrfs "$cfg"; fi
        if [[ $run -eq 1 ]]; then
            log "preparing files for $cfg"
            prepare_files "$(target_dir "$cfg")"
        fi
        for job in $jobs; do
            log "run $run/$runs: $cfg $job"
            run_job "$cfg" "$job" "$run"
        done
        if [[ $cfg != native ]]; then unmount; fi
    done
done

if [[ -n $keep_json ]]; then
    mkdir -p "$keep_json"
    cp "$work"/results/*.json "$keep_json"/ 2>/dev/null || true
    cp "$work"/hbrfs-*.log "$keep_json"/ 2>/dev/null || true
fi

# Medians and the table. bw_bytes and iops are fio's averages over the whole
# job, including the final fsync where there is one.
python3 - "$work/results" "$runs" "$jobs" "$configs" "${HBRFS_MOUNT_ARGS:-}" "$rpo" "$load_start" \
    "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, os, statistics, sys

results, runs, jobs, configs, margs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split(), sys.argv[5]
rpo, load_start, load_end = sys.argv[6:9]

def metric(job, cfg):
    vals = []
    for r in range(1, runs + 1):
        path = os.path.join(results, f"{cfg}.{job}.{r}.json")
        if not os.path.exists(path):
            continue
        w = json.load(open(path))["jobs"][0]["write"]
        vals.append(w["bw_bytes"] / 1e6 if job.startswith("seq") else w["iops"])
    # A median of fewer runs than asked would hide failures: report none.
    return statistics.median(vals) if len(vals) == runs else None

def fmt(job, v, cfg):
    if cfg not in configs:
        return "-"
    if v is None:
        return "failed"
    return f"{v:.0f} MB/s" if job.startswith("seq") else f"{v:.0f} IOPS"

def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"

print(f"\nmedian of {runs} runs; hbrfs mount args: {margs or '(none)'}; replicating: --rpo {rpo}; "
      f"load average {load_start} at the start, {load_end} at the end\n")
print("| job | native | no-tracking | tracking | replicating | tracking / no-tracking | tracking / native "
      "| replicating / tracking |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for job in jobs:
    m = {c: metric(job, c) if c in configs else None for c in ("native", "no-tracking", "tracking", "replicating")}
    print(f"| {job} | {fmt(job, m['native'], 'native')} | {fmt(job, m['no-tracking'], 'no-tracking')} | "
          f"{fmt(job, m['tracking'], 'tracking')} | {fmt(job, m['replicating'], 'replicating')} | "
          f"{ratio(m['tracking'], m['no-tracking'])} | {ratio(m['tracking'], m['native'])} | "
          f"{ratio(m['replicating'], m['tracking'])} |")
PY
