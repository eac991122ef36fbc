# shellcheck shell=bash
# shellcheck disable=SC2154 # hbrfs, timeout, work, mnt come from the sourcing script
# Helpers the bench scripts share; sourced, not run. They use the
# sourcing script's `hbrfs` (the binary), `repo`, `timeout` (seconds),
# `log` and `die`.

# prepare_bench DIR NEED_MIB TOOL...: checks the tools, refuses a tmpfs
# DIR (no O_DIRECT, no writeback: the figures would mean nothing) or one
# with NEED_MIB free or less, and builds the release binary unless BUILD=0
# (a no-op when it is up to date).
prepare_bench() {
    local dir=$1 need=$2 tool avail
    shift 2
    for tool in "$@"; do command -v "$tool" >/dev/null || die "$tool not found"; done
    [[ $(stat -f -c %T "$dir") != tmpfs ]] || die "BENCH_DIR $dir is tmpfs"
    avail=$(($(stat -f -c '%a * %S' "$dir") >> 20))
    ((avail > need)) || die "$dir has $avail MiB free, need $need"
    if [[ ${BUILD:-1} == 1 ]]; then
        log "cargo build --release"
        (cd "$repo" && cargo build --release --quiet) || die "cargo build failed"
    fi
}

# leave_work RC LOG...: the end of a run: on failure the last lines of each
# LOG, then the work dir removed (kept with KEEP=1, or while `mnt` is still
# mounted: removing it would walk into the mount); exits RC. Uses the
# sourcing script's `work` and `mnt`.
leave_work() {
    local rc=$1 f
    shift
    if ((rc != 0)); then
        for f in "$@"; do [[ -e $f ]] && { log "last lines of $f:"; tail -n 15 "$f" >&2; }; done
    fi
    if [[ -n $mnt ]] && is_mounted "$mnt"; then log "$mnt still mounted; leaving $work"
    elif [[ ${KEEP:-0} == 1 ]]; then log "kept $work"
    else rm -rf "$work"; fi
    exit "$rc"
}

# is_mounted DIR: whether something is mounted at DIR.
is_mounted() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# stop PID: SIGTERM, then SIGKILL after 30 s.
stop() {
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# wait_mounted DIR PID WHAT [SECONDS]: until DIR is mounted (polled every
# 10 ms, for at most SECONDS, 60 by default), or die when PID (the daemon,
# called WHAT) exits first.
wait_mounted() {
    local t0=${EPOCHREALTIME/./} limit=${4:-60}
    until is_mounted "$1"; do
        kill -0 "$2" 2>/dev/null || die "$3 exited before mounting $1"
        ((${EPOCHREALTIME/./} - t0 < limit * 1000000)) || die "$3 did not mount $1 within $limit s"
        sleep 0.01
    done
}

# wait_listen DIR PID: until `hbrfs serve DIR` (PID) wrote the address it
# listens on to DIR/.hbrfs/listen.
wait_listen() {
    for _ in $(seq 300); do
        [[ -s $1/.hbrfs/listen ]] && return
        kill -0 "$2" 2>/dev/null || die "hbrfs serve $1 exited"
        sleep 0.1
    done
    die "hbrfs serve $1 did not listen within 30 s"
}

now_ns() { date +%s%N; }
secs() { bc -l <<<"scale=2; $1 / 1000000000" | sed 's/^\./0./'; }
mib() { bc -l <<<"scale=1; $1 / 1048576" | sed 's/^\./0./'; }

# wait_caught_up PRIMARY_DIR SECONDARY_DIR PRIMARY_PID SECONDARY_PID: until
# nothing is dirty or shipping and the secondary applied the last point;
# prints the secondary's last applied epoch.
wait_caught_up() {
    local pd=$1 sd=$2 ppid=$3 spid=$4 t0 p s se
    t0=$(now_ns)
    while :; do
        kill -0 "$ppid" 2>/dev/null || die "hbrfs mount $pd exited"
        kill -0 "$spid" 2>/dev/null || die "hbrfs serve $sd exited"
        (($(now_ns) - t0 < timeout * 1000000000)) || die "not caught up within $timeout s"
        if p=$("$hbrfs" status -d "$pd" --json 2>/dev/null) &&
            s=$("$hbrfs" status -d "$sd" --json 2>/dev/null); then
            se=$(jq '.last_applied_epoch' <<<"$s")
            if jq -e --argjson se "$se" '.replication as $r | $r.connected and .dirty_blocks == 0
                and .ops == 0 and $r.last_applied_epoch > 0 and $r.shipping == null
                and $se >= $r.last_applied_epoch and $r.last_applied_epoch + 1 >= .current_epoch' \
                <<<"$p" >/dev/null; then
                echo "$se"
                return
            fi
        fi
        sleep 0.1
    done
}

# fio_job FILE SEED ARGS…: one O_DIRECT libaio job at queue depth 4,
# half-compressible fresh buffers (what a guest writes, roughly).
fio_job() {
    local file=$1 seed=$2
    shift 2
    fio --name=bench --filename="$file" --direct=1 --ioengine=libaio --iodepth=4 \
        --buffer_compress_percentage=50 --refill_buffers --randseed="$seed" \
        --output-format=terse "$@" >/dev/null || die "fio $* failed"
}
