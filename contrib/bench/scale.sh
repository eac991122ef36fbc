#!/usr/bin/env bash
# Scale of the bookkeeping (issue 11, item 5): on a datastore of FILES small
# files and one BIG sparse image, `hbrfs status`, `hbrfs journal ls` and a
# cut each take under 50 ms, and the daemons' RSS follows the dirty set, not
# the disk size.
#
# Run as root from anywhere (~5 min with the defaults):
#
#   sudo contrib/bench/scale.sh
#   sudo FILES=1000 BIG=64G DIRTY_MB=128 contrib/bench/scale.sh   # a quick look
#
# Two datastores, one after the other, each a fresh primary + secondary pair
# on 127.0.0.1 (`hbrfs serve --listen 127.0.0.1:0`, `hbrfs mount
# --replicate-to`): FILES files of 4 KiB (made in the backing folder before
# the first mount, in 100 folders) and one raw image `disk.img` made sparse
# with `truncate` through the mount: BIG (1 TiB) in the first datastore,
# SMALL (1 GiB) in the second, for comparison. The primary runs with `--rpo
# 1h --coalesce 1h` (a change would otherwise wake a cut 5 ms later: --rpo
# is a ceiling), so that nothing is cut or shipped unless the script asks: a primary
# cuts and ships at once when it (re)connects, so each state is shipped by
# restarting the primary, which also times the mount start. Three states:
#   idle     nothing dirty (the initial sync applied);
#   10       10 random 64 KiB blocks of the image written (fio, O_DIRECT);
#   large    DIRTY_MB (1024) MiB of random 64 KiB writes (fio randwrite,
#            O_DIRECT, libaio QD4, every block once): 16,384 dirty blocks,
#            spread over the whole image (on SMALL that is every block).
# In each state, before it ships, the median of REPS (5) runs of:
#   status       `hbrfs status --json` of the primary, and of the secondary;
#   journal ls   `hbrfs journal ls` of the primary (a table, FILES + 1 rows);
#   cut          `hbrfs cut` of the primary: the whole command, as a user
#                sees it (in `10`, each run first writes the 10 blocks again,
#                so that every cut closes something; in `large` one cut, of
#                the whole set; in `idle` the cut finds nothing);
#   gate hold    `cut_stall_max_ns` of the primary's status after the cuts:
#                how long the cut held writes (benches/cut.rs times it
#                in-process);
# each a whole command (process start, control socket, answer, exit), with
# the mean CPU time of the command and the answering daemon next to it (on
# a shared machine the wall time is mostly waiting for a CPU), and
# then RSS (VmRSS, of which anonymous: RssAnon) of the primary with the
# dirty set unshipped. Then the primary is restarted: the time until its
# mount is up is `mount start` (the scan of FILES + 1 bitmaps), and once the
# secondary applied the set, the peak RSS of the new primary (VmHWM: its
# scan and the ship) and the secondary's RSS and peak (VmHWM, over its life
# so far: it grows with the states).
#
# Targets: status, journal ls and cut < 50 ms; RSS at BIG within a few MiB
# of RSS at SMALL in the same state (it follows the dirty set).
#
# Knobs: FILES=10000, BIG=1T, SMALL=1G (truncate sizes), DIRTY_MB=1024,
# REPS=5, BENCH_DIR=/var/tmp (temp dir under it, not tmpfs; needs ~2 x
# DIRTY_MB + 200 MiB free), TIMEOUT=900 (s to catch up), KEEP=0 (1 keeps the
# temp dir and the logs), BUILD=1 (0: use target/release/hbrfs as it is).
# Needs fio (libaio), jq, bc, python3. Other work on the machine distorts
# the times: the load average is printed with the table.
set -euo pipefail

files=${FILES:-10000}
big=${BIG:-1T}
small=${SMALL:-1G}
dirty_mb=${DIRTY_MB:-1024}
reps=${REPS:-5}
bench_dir=${BENCH_DIR:-/var/tmp}
timeout=${TIMEOUT:-900}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
hbrfs=$repo/target/release/hbrfs
t_start=${EPOCHREALTIME/./}
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

elapsed() { echo $(((${EPOCHREALTIME/./} - t_start) / 1000000)); }
log() { printf '[scale.sh %4ss] %s\n' "$(elapsed)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (FUSE mounts)"
[[ $files =~ ^[1-9][0-9]*$ && $dirty_mb =~ ^[1-9][0-9]*$ && $reps =~ ^[1-9][0-9]*$ ]] ||
    die "FILES, DIRTY_MB and REPS are positive integers"
# shellcheck source=contrib/bench/common.sh
source "$repo/contrib/bench/common.sh"
prepare_bench "$bench_dir" $((2 * dirty_mb + 200)) fio jq bc python3

work=$(mktemp -d "$bench_dir/hbrfs-scale.XXXXXX")
primary_pid='' secondary_pid='' mnt=''

unmount() { [[ -z $mnt ]] || ! is_mounted "$mnt" || fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" || true; }
stop_primary() {
    [[ -z $primary_pid ]] || stop "$primary_pid"
    primary_pid=''
    unmount
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_primary
    [[ -z $secondary_pid ]] || stop "$secondary_pid"
    leave_work "$rc" "$work"/*.log
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_primary: mounts $dir/backing on $mnt replicating to the secondary;
# sets mount_ms to the time until the mount was up.
start_primary() {
    local t0
    t0=${EPOCHREALTIME/./}
    "$hbrfs" mount "$dir/backing" "$mnt" --replicate-to "$(<"$dir/replica/.hbrfs/listen")" \
        --auth-key "$dir/replica/.hbrfs/auth.key" --rpo 1h --coalesce 1h >>"$dir/primary.log" 2>&1 &
    primary_pid=$!
    wait_mounted "$mnt" "$primary_pid" "hbrfs mount" "$timeout"
    mount_ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
}

# kib PID FIELD: a /proc/PID/status field (VmRSS, RssAnon, VmHWM) in KiB.
kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
# rss PID: "RSS (anon)" in MiB.
rss() { echo "$(mib $(($(kib "$1" VmRSS) * 1024))) ($(mib $(($(kib "$1" RssAnon) * 1024))))"; }
peak() { mib $(($(kib "$1" VmHWM) * 1024)); }

# cpu_ms: sets cpu_ms to the CPU time (user + system, ms) of the script's
# finished children (exact) and of the daemons in $daemons (in clock ticks
# of 10 ms: /proc/PID/stat counts the threads that exited too, and the
# control socket answers each request on a thread of its own), read
# without forking (a fork would count itself).
tck=$(getconf CLK_TCK)
cpu_ms() {
    local u s t f line total=0
    times >"$work/times"
    { read -r _ _; read -r u s; } <"$work/times"
    for t in "$u" "$s"; do # 0m1.234s
        f=${t#*m}
        total=$((total + ${t%%m*} * 60000 + 10#${f//[.s]/}))
    done
    for p in $daemons; do
        read -r line <"/proc/$p/stat"
        read -r -a f <<<"${line##*) }"
        total=$((total + (f[11] + f[12]) * 1000 / tck))
    done
    cpu_ms=$total
}

# timed CMD...: REPS runs of CMD; sets `took` to "WALL (CPU)": the median
# wall time, and the mean CPU time of the command and the daemons in
# $daemons, in ms. The command's output is discarded, a failure is fatal.
# When $prep names a function, it runs (untimed) before every run but the
# first.
prep=''
timed() {
    local t0 c0 i walls=() cpu=0
    for ((i = 0; i < reps; i++)); do
        [[ -z $prep || $i -eq 0 ]] || $prep
        cpu_ms
        c0=$cpu_ms t0=${EPOCHREALTIME/./}
        "$@" >/dev/null || die "$* failed"
        walls+=($((${EPOCHREALTIME/./} - t0)))
        cpu_ms
        cpu=$((cpu + cpu_ms - c0))
    done
    took="$(median "${walls[@]}" | awk '{ printf "%.1f", $1 / 1000 }') ($((cpu / reps)))"
}
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# write10: 10 random 64 KiB blocks of the image (the offsets differ per run).
write10() {
    write10_seed=$((${write10_seed:-0} + 1))
    fio_job "$mnt/disk.img" "$write10_seed" --rw=randwrite --bs=64k --size="$size" \
        --io_size=640k --randrepeat=0
}

# measure STATE: the timed commands and RSS in STATE, before it ships, then
# the restart that ships it; fills res[KEY.STATE].
declare -A res
measure() {
    local state=$1 key=$label.$1 stall
    log "$label/$state: status, journal ls, cut"
    daemons=$primary_pid
    timed "$hbrfs" status -d "$mnt" --json
    res[status_p.$key]=$took
    daemons=$secondary_pid
    timed "$hbrfs" status -d "$dir/replica" --json
    res[status_s.$key]=$took
    daemons=$primary_pid
    timed "$hbrfs" journal -d "$mnt" ls
    res[ls.$key]=$took
    res[dirty.$key]=$("$hbrfs" status -d "$mnt" --json | jq .dirty_blocks)
    case $state in
    10) prep=write10 ;;
    large) local saved=$reps; reps=1 ;;
    esac
    timed "$hbrfs" cut -d "$mnt"
    res[cut.$key]=$took
    prep=''
    [[ $state != large ]] || reps=$saved
    stall=$("$hbrfs" status -d "$mnt" --json | jq .cut_stall_max_ns)
    res[hold.$key]=$(bc -l <<<"scale=3; $stall / 1000000" | sed 's/^\./0./')
    res[rss_p.$key]=$(rss "$primary_pid")
    log "$label/$state: ${res[dirty.$key]} dirty; status ${res[status_p.$key]} ms, ls ${res[ls.$key]} ms, cut ${res[cut.$key]} ms; primary RSS ${res[rss_p.$key]} MiB"
    log "$label/$state: restarting the primary (it ships at once)"
    stop_primary
    start_primary
    res[mount.$key]=$mount_ms
    wait_caught_up "$dir/backing" "$dir/replica" "$primary_pid" "$secondary_pid" >/dev/null
    res[hwm_p.$key]=$(peak "$primary_pid")
    res[rss_s.$key]=$(rss "$secondary_pid")
    res[hwm_s.$key]=$(peak "$secondary_pid")
    log "$label/$state: mount start ${res[mount.$key]} ms; shipped; primary peak ${res[hwm_p.$key]} MiB, secondary ${res[rss_s.$key]} MiB, peak ${res[hwm_s.$key]}"
}

# start_secondary: `hbrfs serve` of $dir/replica on a free port.
start_secondary() {
    rm -f "$dir/replica/.hbrfs/listen"
    RUST_LOG=info "$hbrfs" serve "$dir/replica" --listen 127.0.0.1:0 >>"$dir/secondary.log" 2>&1 &
    secondary_pid=$!
    wait_listen "$dir/replica" "$secondary_pid"
}

# image LABEL SIZE: disk.img of SIZE (sparse, through the mount, the
# previous image removed) on a fresh start of both daemons, shipped, then
# the three states.
image() {
    label=$1 size=$2
    rm -f "$mnt/disk.img"
    truncate -s "$size" "$mnt/disk.img"
    log "$label: disk.img of $size; restarting both daemons, shipping"
    stop_primary
    stop "$secondary_pid"
    start_secondary
    start_primary
    wait_caught_up "$dir/backing" "$dir/replica" "$primary_pid" "$secondary_pid" >/dev/null
    measure idle
    write10
    measure 10
    log "$label: $dirty_mb MiB of random 64 KiB writes"
    fio_job "$mnt/disk.img" 1 --rw=randwrite --bs=64k --size="$size" --io_size="${dirty_mb}M"
    measure large
}

log "work dir $work; $files files, images $big and $small, $dirty_mb MiB dirty; load $load_start"
dir=$work mnt=$work/mnt
mkdir -p "$dir/backing" "$dir/replica" "$mnt"
log "$files files of 4 KiB in the backing folder"
python3 - "$dir/backing" "$files" <<'EOF2'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i % 100:02}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05}"), "wb") as f:
        f.write(os.urandom(4096))
EOF2
start_secondary
start_primary
first_mount=$mount_ms
log "first mount (scan of $files untracked files) $first_mount ms; initial sync"
wait_caught_up "$dir/backing" "$dir/replica" "$primary_pid" "$secondary_pid" >/dev/null
image big "$big"
image small "$small"

# The table: one column per datastore and state.
cols=(big.idle big.10 big.large small.idle small.10 small.large)
row() { # row TITLE KEY TARGET
    local c line="| $1 |"
    for c in "${cols[@]}"; do line+=" ${res[$2.$c]:--} |"; done
    echo "$line $3 |"
}
echo
echo "## Scale: $files files + one sparse image, $big vs $small"
echo
echo "Load average at the start: $load_start; at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
echo "$(nproc) CPUs, $(uname -r), commit $(cd "$repo" && git describe --always --dirty 2>/dev/null || echo unknown)."
echo "Times in ms: median wall time of $reps runs of the whole command (process start, control socket, answer, exit),"
echo "and in brackets the mean CPU time per run of the command and the daemon that answered (what an idle machine"
echo "would see as wall time, about). RSS in MiB: VmRSS (of which RssAnon)."
echo
echo "| | $big idle | $big 10 dirty | $big ${dirty_mb} MiB dirty | $small idle | $small 10 dirty | $small ${dirty_mb} MiB dirty | target |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
row "dirty blocks" dirty ""
row "\`status\` primary (ms)" status_p "< 50"
row "\`status\` secondary (ms)" status_s "< 50"
row "\`journal ls\` (ms)" ls "< 50"
row "\`hbrfs cut\` (ms)" cut "< 50"
row "cut gate hold, max (ms)" hold "≤ 1"
row "primary RSS, dirty set unshipped" rss_p "follows the dirty set"
row "mount start, restart (ms)" mount ""
row "primary peak RSS after restart + ship" hwm_p "follows the dirty set"
row "secondary RSS after apply" rss_s "follows the dirty set"
row "secondary peak RSS so far" hwm_s "follows the dirty set"
echo
echo "First mount (a scan that makes $files new bitmaps, each synced): $first_mount ms."
echo
echo "Total time: $(elapsed) s"
