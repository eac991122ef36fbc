#!/usr/bin/env bash
# Recovery-points benchmark (issue 10, item 8): what keeping points costs
# the secondary, and what an incremental export saves over a full one.
#
# Run as root from anywhere (a few minutes with the defaults):
#
#   sudo contrib/bench/points.sh
#   sudo SIZE_MB=256 IO_MB=128 contrib/bench/points.sh     # a quick look
#
# The same workload runs twice on a fresh primary + secondary pair on
# 127.0.0.1 (`--rpo 1s`): once with a secondary that keeps no points
# (`serve --keep none`: no undo is saved) and once with the default grid
# (`--keep 1s:1h,1m:24h,1h:7d`: every apply first saves the old content of
# what it overwrites). The workload, through the primary mount:
#   1. fill: fio writes a SIZE_MB raw image sequentially (1 MiB, O_DIRECT,
#      half-compressible buffers), waited until the replica caught up (the
#      baseline point);
#   2. change: fio randwrite 64k, IO_MB in all (O_DIRECT, libaio QD 4, fresh
#      half-compressible buffers), while the secondary applies a point a
#      second; then waited until the replica caught up.
# Measured:
#   (a) apply throughput: bytes of the blocks applied after the baseline
#       divided by the seconds the secondary spent on their points, from a
#       point's stream start to its applied record (points are applied in
#       place as they arrive; summed from its "epoch N applied: B blocks …
#       in S s (C s committing)" log lines),
#       and end to end: IO_MB over the time from the start of fio until
#       the replica caught up; undo / none is the ratio (target ≥ 0.7).
#   (b) undo per point: `hbrfs points ls --json` of the keeping run: the
#       undo bytes each point keeps vs the bytes the next point changed.
#   (c) export: `hbrfs export` of the last point in full, of the change
#       over the last point before it, and of the change since the
#       baseline point (chained onto a full export of the baseline, and
#       checked with `qemu-img compare` against the replica): time and size.
#
# Knobs: SIZE_MB=1024, IO_MB=512, RPO=1s, BENCH_DIR=/var/tmp (temp dir
# under it; ~4 x SIZE_MB free, not tmpfs), TIMEOUT=600 (s to catch up),
# KEEP=0 (1 keeps the temp dir), BUILD=1 (0: use target/release/hbrfs as
# it is). Needs fio (libaio), jq, bc, qemu-img. Other work on the machine
# distorts the figures: compare the ratios of one run, the load average
# at the start is printed.
set -euo pipefail

size_mb=${SIZE_MB:-1024}
io_mb=${IO_MB:-512}
rpo=${RPO:-1s}
bench_dir=${BENCH_DIR:-/var/tmp}
timeout=${TIMEOUT:-600}
bs=65536

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
hbrfs=$repo/target/release/hbrfs
t_start=${EPOCHREALTIME/./}
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

elapsed() { echo $(((${EPOCHREALTIME/./} - t_start) / 1000000)); }
log() { printf '[points.sh %4ss] %s\n' "$(elapsed)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
ratio() { bc -l <<<"scale=2; $1 / $2" | sed 's/^\./0./'; }

[[ $(id -u) -eq 0 ]] || die "run as root (FUSE mounts)"
[[ $size_mb =~ ^[1-9][0-9]*$ && $io_mb =~ ^[1-9][0-9]*$ ]] || die "SIZE_MB and IO_MB are whole MiB"
# shellcheck source=contrib/bench/common.sh
source "$repo/contrib/bench/common.sh"
prepare_bench "$bench_dir" $((4 * size_mb + 1024)) fio jq bc qemu-img

work=$(mktemp -d "$bench_dir/hbrfs-points.XXXXXX")
primary_pid='' secondary_pid='' mnt=''

stop_pair() {
    [[ -z $primary_pid ]] || stop "$primary_pid"
    [[ -z $mnt ]] || ! is_mounted "$mnt" || fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" || true
    [[ -z $secondary_pid ]] || stop "$secondary_pid"
    primary_pid='' secondary_pid=''
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pair
    leave_work "$rc" "$work"/*/*.log
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_pair DIR KEEP: a secondary serving DIR/replica with `--keep KEEP`
# and a primary mounting DIR/backing on DIR/mnt, replicating to it.
start_pair() {
    local dir=$1 keep=$2
    mkdir -p "$dir/backing" "$dir/mnt" "$dir/replica"
    mnt=$dir/mnt
    RUST_LOG=info "$hbrfs" serve "$dir/replica" --listen 127.0.0.1:0 --keep "$keep" \
        >"$dir/secondary.log" 2>&1 &
    secondary_pid=$!
    for _ in $(seq 300); do [[ -s $dir/replica/.hbrfs/listen ]] && break; sleep 0.1; done
    [[ -s $dir/replica/.hbrfs/listen ]] || die "hbrfs serve did not listen within 30 s"
    "$hbrfs" mount "$dir/backing" "$mnt" --replicate-to "$(<"$dir/replica/.hbrfs/listen")" \
        --auth-key "$dir/replica/.hbrfs/auth.key" --rpo "$rpo" >"$dir/primary.log" 2>&1 &
    primary_pid=$!
    for _ in $(seq 300); do is_mounted "$mnt" && break; sleep 0.1; done
    is_mounted "$mnt" || die "hbrfs mount did not mount within 30 s"
}


# applied DIR AFTER: "blocks seconds" applied after epoch AFTER, summed
# from the secondary's log.
applied() {
    sed -n 's/.*epoch \([0-9]*\) applied: \([0-9]*\) blocks .* in \([0-9.]*\) s (.*committing).*/\1 \2 \3/p' \
        "$1/secondary.log" | awk -v after="$2" '$1 > after { b += $2; s += $3 } END { print b + 0, s + 0 }'
}

# run_mode NAME KEEP: the workload on a fresh pair; leaves it running and
# sets base_epoch, blocks, apply_s, catchup_ns, total_ns.
run_mode() {
    local name=$1 keep=$2 dir=$work/$1 t_end t_fio t_caught
    log "$name: fresh pair (--keep $keep), fill of $size_mb MiB"
    start_pair "$dir" "$keep"
    fio_job "$mnt/disk.img" 1 --rw=write --bs=1M --size="${size_mb}M"
    base_epoch=$(wait_caught_up "$dir/backing" "$dir/replica" "$primary_pid" "$secondary_pid")
    log "$name: baseline applied (epoch $base_epoch); randwrite 64k, $io_mb MiB"
    t_fio=$(now_ns)
    fio_job "$mnt/disk.img" 1 --rw=randwrite --bs=64k --size="${size_mb}M" --io_size="${io_mb}M"
    t_end=$(now_ns)
    wait_caught_up "$dir/backing" "$dir/replica" "$primary_pid" "$secondary_pid" >/dev/null
    t_caught=$(now_ns)
    catchup_ns=$((t_caught - t_end)) total_ns=$((t_caught - t_fio))
    read -r blocks apply_s < <(applied "$dir" "$base_epoch")
    ((blocks > 0)) || die "$name: no block applied after the baseline"
    log "$name: $blocks blocks applied in $apply_s s of streams; caught up $(secs "$catchup_ns") s after fio"
}

run_mode none none
stop_pair
n_blocks=$blocks n_apply=$apply_s n_catchup=$catchup_ns n_total=$total_ns
run_mode undo "1s:1h,1m:24h,1h:7d"
u_blocks=$blocks u_apply=$apply_s u_catchup=$catchup_ns u_total=$total_ns
rep=$work/undo/replica
n_rate=$(bc -l <<<"$n_blocks * $bs / $n_apply / 1048576")
u_rate=$(bc -l <<<"$u_blocks * $bs / $u_apply / 1048576")
n_e2e=$(bc -l <<<"$io_mb * 1000000000 / $n_total")
u_e2e=$(bc -l <<<"$io_mb * 1000000000 / $u_total")

# (b) Undo kept per point vs what the next point changed.
points=$("$hbrfs" points "$rep" ls --json)
read -r n_points undo_bytes next_changed < <(jq -r --argjson bs "$bs" --argjson base "$base_epoch" '
    [range(0; length - 1) as $i | select(.[$i].epoch >= $base)
     | {undo: .[$i].undo_bytes, next: (.[$i + 1].changed_blocks * $bs)}]
    | "\(length) \(map(.undo) | add // 0) \(map(.next) | add // 0)"' <<<"$points")
((next_changed > 0)) || die "no point changed anything after another"

# (c) Exports of the keeping replica (the pair still runs).
last=$(jq '.[-1].epoch' <<<"$points")
prev=$(jq '.[-2].epoch' <<<"$points")
out=$work/exports
mkdir -p "$out"
export_timed() { # export_timed NAME ARGS…: sets t_ns and size
    local name=$1 t0
    shift
    t0=$(now_ns)
    "$hbrfs" export "$rep" --image disk.img "$@" "$out/$name.qcow2" >>"$work/undo/exports.log" 2>&1 ||
        die "export $name failed"
    t_ns=$(($(now_ns) - t0)) size=$(stat -c %s "$out/$name.qcow2")
}
log "exports: full of $last, full of $base_epoch, change $prev → $last, change $base_epoch → $last"
export_timed full --point "$last"
full_ns=$t_ns full_size=$size
export_timed base --point "$base_epoch"
export_timed prev --point "$prev"
export_timed one --point "$last" --since "$prev" --backing prev.qcow2
one_ns=$t_ns one_size=$size
export_timed since --point "$last" --since "$base_epoch" --backing base.qcow2
since_ns=$t_ns since_size=$size
qemu-img compare -q -f qcow2 -F raw "$out/since.qcow2" "$rep/disk.img" ||
    die "the chain base + since differs from the replica"
qemu-img compare -q -f qcow2 -F raw "$out/one.qcow2" "$rep/disk.img" ||
    die "the chain prev + one differs from the replica"
one_changed=$(jq --argjson e "$last" '.[] | select(.epoch == $e) | .changed_blocks' <<<"$points")
stop_pair

cat <<EOF

## Recovery points ($size_mb MiB image, $io_mb MiB of 64 KiB random writes, --rpo $rpo)

| measure | no points (--keep none) | points (default --keep) | ratio |
| --- | --- | --- | --- |
| blocks applied after the baseline | $n_blocks | $u_blocks | |
| seconds of their points' streams (start → applied) | $n_apply | $u_apply | |
| (a) apply throughput, MiB/s | $(printf %.1f "$n_rate") | $(printf %.1f "$u_rate") | $(ratio "$u_rate" "$n_rate")x (target ≥ 0.7) |
| (a) end to end, MiB/s (fio start → caught up) | $(printf %.1f "$n_e2e") | $(printf %.1f "$u_e2e") | $(ratio "$u_e2e" "$n_e2e")x |
| catch-up after fio ended, s | $(secs "$n_catchup") | $(secs "$u_catchup") | $(ratio "$u_catchup" "$n_catchup")x |

| (b) undo per point | |
| --- | --- |
| points after the baseline | $n_points |
| undo kept, MiB | $(mib "$undo_bytes") |
| bytes the next points changed, MiB | $(mib "$next_changed") |
| undo / changed bytes | $(ratio "$undo_bytes" "$next_changed") |

| (c) export of one image | time, s | size, MiB | vs full (time, size) |
| --- | --- | --- | --- |
| full, point $last | $(secs "$full_ns") | $(mib "$full_size") | 1, 1 |
| change $prev → $last ($one_changed blocks) | $(secs "$one_ns") | $(mib "$one_size") | $(ratio "$one_ns" "$full_ns"), $(ratio "$one_size" "$full_size") |
| change $base_epoch → $last (all of fio) | $(secs "$since_ns") | $(mib "$since_size") | $(ratio "$since_ns" "$full_ns"), $(ratio "$since_size" "$full_size") |

load average at start: $load_start; total run time $(elapsed) s
EOF
