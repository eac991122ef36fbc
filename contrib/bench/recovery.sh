#!/usr/bin/env bash
# Recovery benchmark (issue 10, item 8): reading a recovery point vs the
# live replica, and a failback that ships only the difference vs a full copy.
#
# Run as root from anywhere (~2.5 minutes with the defaults on 2 cores):
#
#   sudo contrib/bench/recovery.sh
#   sudo SIZE_MB=512 contrib/bench/recovery.sh      # a quick look
#
# One primary + secondary pair on 127.0.0.1 (`--rpo 1s`, the secondary
# with the default `--keep` grid and a `--mount` mirror), one raw image of
# SIZE_MB MiB, written with fio through the primary mount (O_DIRECT,
# half-compressible fresh buffers):
#   1. fill: sequential 1 MiB writes over the whole image; waited until the
#      replica caught up (the base point B);
#   2. change 1% on the primary: randwrite 64k, CHANGE_PCT % of the image
#      (distinct blocks; each change below hits another random set), waited until caught up (the live replica is then
#      one change newer than B).
# (d) point read: `hbrfs mount-point REPLICA B M`: time from starting it
#     until the mount is up; then `dd bs=1M` of the image to /dev/null,
#     page cache dropped before each read (`echo 3 > drop_caches`), through
#     the point mount (composed from the live replica and the undo), from
#     the live replica file, and through the live `serve --mount` mirror.
#     Ratio point / live.
# (e) failback at CHANGE_PCT % on each side:
#   3. the secondary is stopped; CHANGE_PCT % more is written through the
#      primary mount (never shipped), then the primary is killed (kill -9)
#      and its mount detached;
#   4. `hbrfs promote` of the replica; it is mounted as the new primary
#      (`--replicate-to` a free port, `--auth-key` a copy of the pair's
#      REPLICA/.hbrfs/auth.key) and CHANGE_PCT % is written there; then
#      it is unmounted cleanly (its dirty blocks stay recorded);
#   5. full-copy baseline: page cache dropped, `cp` of the new primary's
#      image to a fresh folder + `sync`, timed;
#   6. `hbrfs demote` of the old backing folder, `hbrfs serve` of it on that
#      port; page cache dropped; then the new primary is mounted again and
#      timed from its start until caught up (nothing dirty or shipping and
#      the old primary applied its last point). Counters from `hbrfs status
#      --json` of the new primary (`replication`: blocks_offered,
#      blocks_sent, raw_bytes_sent, wire_bytes; since that mount started);
#   7. `cmp` of the two images: any difference fails the script.
#   Reported: failback bytes / full-copy bytes, failback time / cp time.
#
# Knobs: SIZE_MB=4096, CHANGE_PCT=1, RPO=1s, BENCH_DIR=/var/tmp (temp dir
# under it; ~3 x SIZE_MB free, not tmpfs), TIMEOUT=600 (s to catch up),
# KEEP=0 (1 keeps the temp dir), BUILD=1 (0: use target/release/hbrfs as
# it is). Needs fio (libaio), jq, bc, cmp, python3 (a free port). Other
# work on the machine distorts the figures: compare the ratios of one run,
# the load average at the start is printed.
set -euo pipefail

size_mb=${SIZE_MB:-4096}
change_pct=${CHANGE_PCT:-1}
rpo=${RPO:-1s}
bench_dir=${BENCH_DIR:-/var/tmp}
timeout=${TIMEOUT:-600}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
hbrfs=$repo/target/release/hbrfs
t_start=${EPOCHREALTIME/./}
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

elapsed() { echo $(((${EPOCHREALTIME/./} - t_start) / 1000000)); }
log() { printf '[recovery.sh %4ss] %s\n' "$(elapsed)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
ratio() { bc -l <<<"scale=4; $1 / $2" | sed 's/^\./0./'; }
ratio2() { bc -l <<<"scale=2; $1 / $2" | sed 's/^\./0./'; }
rate() { bc -l <<<"scale=0; $1 * 1000000000 / $2 / 1048576"; } # rate BYTES NS: MiB/s
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

[[ $(id -u) -eq 0 ]] || die "run as root (FUSE mounts, drop_caches)"
[[ $size_mb =~ ^[1-9][0-9]*$ && $change_pct =~ ^[1-9][0-9]?$ ]] ||
    die "SIZE_MB is whole MiB, CHANGE_PCT a whole percent below 100"
((size_mb * change_pct >= 100 && size_mb > 16)) || die "SIZE_MB too small (CHANGE_PCT % must be 1 MiB)"
# shellcheck source=contrib/bench/common.sh
source "$repo/contrib/bench/common.sh"
prepare_bench "$bench_dir" $((3 * size_mb + 1024)) fio jq bc cmp python3

work=$(mktemp -d "$bench_dir/hbrfs-recovery.XXXXXX")
backing=$work/backing replica=$work/replica
mnt=$work/mnt mirror=$work/mirror pmnt=$work/point nmnt=$work/new-mnt
mkdir -p "$backing" "$replica" "$mnt" "$mirror" "$pmnt" "$nmnt" "$work/copy"
primary_pid='' secondary_pid='' point_pid='' new_pid='' old_sec_pid=''
change_mb=$((size_mb * change_pct / 100))

unmount() { ! is_mounted "$1" || fusermount3 -u "$1" 2>/dev/null || umount -l "$1" || true; }
cleanup() {
    local rc=$? m p
    trap - EXIT INT TERM
    for p in "$point_pid" "$primary_pid" "$new_pid" "$secondary_pid" "$old_sec_pid"; do
        [[ -z $p ]] || stop "$p"
    done
    for m in "$pmnt" "$mnt" "$nmnt" "$mirror"; do unmount "$m"; done
    if ((rc != 0)); then
        for f in "$work"/*.log; do [[ -e $f ]] && { log "last lines of $f:"; tail -n 15 "$f" >&2; }; done
    fi
    local busy=''
    for m in "$pmnt" "$mnt" "$nmnt" "$mirror"; do ! is_mounted "$m" || busy=$m; done
    if [[ -n $busy ]]; then log "$busy still mounted; leaving $work"
    elif [[ ${KEEP:-0} == 1 ]]; then log "kept $work"
    else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# change FILE K: CHANGE_PCT % of the image, distinct random 64 KiB blocks.
# fio draws the same offsets whatever --randseed, so each change K runs
# over a region shifted by K MiB: a different set of blocks each time.
change() {
    fio_job "$1" "$2" --end_fsync=1 --rw=randwrite --bs=64k --offset="${2}M" --size="$((size_mb - 8))M" \
        --io_size="${change_mb}M"
}

read_ns() { # read_ns FILE: cold sequential read with dd bs=1M; prints ns
    local t0
    drop_caches
    t0=$(now_ns)
    dd if="$1" of=/dev/null bs=1M status=none || die "reading $1 failed"
    echo $(($(now_ns) - t0))
}

# 1-2. The pair, the fill, 1% changed and shipped.
log "pair: serve $replica (mirror $mirror), mount $backing on $mnt"
RUST_LOG=info "$hbrfs" serve "$replica" --listen 127.0.0.1:0 --mount "$mirror" \
    >"$work/secondary.log" 2>&1 &
secondary_pid=$!
wait_listen "$replica" "$secondary_pid"
cp "$replica/.hbrfs/auth.key" "$work/pair.key"
"$hbrfs" mount "$backing" "$mnt" --replicate-to "$(<"$replica/.hbrfs/listen")" \
    --auth-key "$work/pair.key" --rpo "$rpo" >"$work/primary.log" 2>&1 &
primary_pid=$!
wait_mounted "$mnt" "$primary_pid" "hbrfs mount"
log "fill: $size_mb MiB sequential"
fio_job "$mnt/disk.img" 1 --end_fsync=1 --rw=write --bs=1M --size="${size_mb}M"
base=$(wait_caught_up "$backing" "$replica" "$primary_pid" "$secondary_pid")
log "base point $base applied; change $change_pct % ($change_mb MiB) on the primary"
change "$mnt/disk.img" 2
live=$(wait_caught_up "$backing" "$replica" "$primary_pid" "$secondary_pid")
wait_mounted "$mirror" "$secondary_pid" "the mirror"
log "point $live applied"

# (d) The base point: mount time, then cold reads.
t0=$(now_ns)
"$hbrfs" mount-point "$replica" "$base" "$pmnt" >"$work/point.log" 2>&1 &
point_pid=$!
wait_mounted "$pmnt" "$point_pid" "hbrfs mount-point"
mount_ns=$(($(now_ns) - t0))
log "point $base mounted in $(secs "$mount_ns") s; cold reads of $size_mb MiB"
size=$(stat -c %s "$pmnt/disk.img")
((size == size_mb * 1048576)) || die "the point's image is $size bytes"
point_read=$(read_ns "$pmnt/disk.img")
live_read=$(read_ns "$replica/disk.img")
mirror_read=$(read_ns "$mirror/disk.img")
stop "$point_pid"
point_pid=''
unmount "$pmnt"

# (e) 3. Unshipped writes on the old primary, then it dies.
log "secondary stopped; change $change_pct % on the primary, never shipped; kill -9"
stop "$secondary_pid"
secondary_pid=''
unmount "$mirror"
change "$mnt/disk.img" 3
kill -KILL "$primary_pid"
wait "$primary_pid" 2>/dev/null || true
primary_pid=''
unmount "$mnt"

# 4. Failover: promote, write on the new primary, unmount it cleanly.
"$hbrfs" promote "$replica" >"$work/promote.log" 2>&1 || die "promote failed: $(<"$work/promote.log")"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
new_primary() {
    "$hbrfs" mount "$replica" "$nmnt" --replicate-to "127.0.0.1:$port" \
        --auth-key "$work/pair.key" --rpo "$rpo" >>"$work/new-primary.log" 2>&1 &
    new_pid=$!
    wait_mounted "$nmnt" "$new_pid" "hbrfs mount (promoted)"
}
new_primary
log "promoted; change $change_pct % on the new primary"
change "$nmnt/disk.img" 4
stop "$new_pid"
new_pid=''
unmount "$nmnt"

# 5. Baseline: a full copy of the image.
log "full copy: cp of $size_mb MiB"
drop_caches
t0=$(now_ns)
cp "$replica/disk.img" "$work/copy/disk.img"
sync -f "$work/copy/disk.img"
cp_ns=$(($(now_ns) - t0))
rm -f "$work/copy/disk.img"

# 6. Failback: demote, serve the old primary, the new primary ships.
"$hbrfs" demote "$backing" >"$work/demote.log" 2>&1 || die "demote failed: $(<"$work/demote.log")"
log "demoted: $(tail -n 1 "$work/demote.log")"
RUST_LOG=info "$hbrfs" serve "$backing" --listen "127.0.0.1:$port" --auth-key "$work/pair.key" \
    >"$work/old-secondary.log" 2>&1 &
old_sec_pid=$!
wait_listen "$backing" "$old_sec_pid"
drop_caches
log "failback: new primary mounted again, replicating to the old one"
t0=$(now_ns)
new_primary
wait_caught_up "$replica" "$backing" "$new_pid" "$old_sec_pid" >/dev/null
fb_ns=$(($(now_ns) - t0))
st=$("$hbrfs" status -d "$replica" --json)
read -r offered sent raw wire points < <(jq -r '.replication |
    "\(.blocks_offered) \(.blocks_sent) \(.raw_bytes_sent) \(.wire_bytes) \(.epochs_shipped)"' <<<"$st")
stop "$new_pid"
new_pid=''
unmount "$nmnt"
stop "$old_sec_pid"
old_sec_pid=''

# 7. Identical?
log "cmp of the two images"
cmp "$replica/disk.img" "$backing/disk.img" || die "the images differ after failback"

bs=$(jq -r '.block_size // 65536' <<<"$st")
blocks=$((size / bs)) changed=$((change_mb * 1048576 / bs))
cat <<EOF

## Recovery ($size_mb MiB image, $change_pct % changed per step with fio randwrite 64k, --rpo $rpo)

| (d) point $base (live: $live) | mount, ms | cold read, MiB/s | point / live |
| --- | ---: | ---: | ---: |
| \`hbrfs mount-point\` | $(((mount_ns + 500000) / 1000000)) | $(rate "$size" "$point_read") | $(ratio2 "$live_read" "$point_read")x the file, $(ratio2 "$mirror_read" "$point_read")x the mirror |
| live replica file | | $(rate "$size" "$live_read") | 1 |
| live mirror (\`serve --mount\`) | | $(rate "$size" "$mirror_read") | |

| (e) failback, $changed blocks changed on each side ($blocks in the image, block $bs B) | failback | full copy (\`cp\`) | failback / full |
| --- | ---: | ---: | ---: |
| blocks offered / sent | $offered / $sent | $blocks | $(ratio "$offered" "$blocks"), $(ratio "$sent" "$blocks") |
| bytes sent before compression, MiB | $(mib "$raw") | $(mib "$size") | $(ratio "$raw" "$size") |
| bytes on the wire, MiB | $(mib "$wire") | $(mib "$size") | $(ratio "$wire" "$size") |
| time, s | $(secs "$fb_ns") | $(secs "$cp_ns") | $(ratio "$fb_ns" "$cp_ns") |

Points shipped in the failback: $points; images identical (\`cmp\`).
load average at start: $load_start, at the end: $(cut -d' ' -f1-3 /proc/loadavg); total run time $(elapsed) s
EOF
