#!/usr/bin/env bash
# Seeding benchmark: "seed a 4 GiB image, change 1%, start replication, and
# show the wire bytes".
#
# Why: over a thin link nobody wants the first point to ship a whole image.
# An operator copies the image to the secondary by other means first (cp, a
# restore, a disk in the mail) while the VM keeps running, then starts
# replication. `hbrfs serve` indexes the files already in its replica folder
# when the pair is made, so the first point carries hash references for the
# blocks the seed already holds and data only for the blocks that differ.
#
# What, in this order:
#  1. BACKING/disk.img: SIZE_GIB GiB from /dev/urandom. Incompressible and no
#     zero block, so neither zstd nor zero detection saves anything: every
#     byte not sent is the seed's doing.
#  2. The seed: `cp` of that image into the replica folder.
#  3. The change: CHANGE_PCT % of the image's 64 KiB blocks (distinct,
#     random, chosen from SEED) are overwritten with fresh random data in the
#     backing file with dd, before hbrfs ever runs: it has no record of which
#     blocks changed and must find them by comparing hashes.
#  4. Start replication: `hbrfs serve` on 127.0.0.1 (port 0), then
#     `hbrfs mount --replicate-to --rpo 1s`, page cache dropped first (a seed
#     and an image are not in the cache on real hosts). Wait until the first
#     point is applied and nothing is dirty or shipping.
#  5. Print the primary's counters (`hbrfs status --json`): blocks offered /
#     sent, wire bytes (every message the primary sent), their share of the
#     image, and the time from starting the mount to the secondary applying
#     the first point (includes the secondary indexing the seed and the
#     primary reading and hashing the whole image). Then `cmp` the backing
#     image and the replica byte for byte; a difference fails the script.
#
# Knobs: SIZE_GIB=4, CHANGE_PCT=1, SEED=1, WORKDIR=$BENCH_DIR or /var/tmp
# (temp dir made under it; needs 2 x SIZE_GIB + 1 GiB free, not tmpfs), TIMEOUT=1800 (s to
# wait for the first point), DROP_CACHES=1, KEEP=0 (1 keeps the temp dir),
# BUILD=1 (0: use the built binary as is), CARGO_TARGET_DIR (default: target/).
# Needs root (FUSE), jq, bc, cmp.
set -euo pipefail

size_gib=${SIZE_GIB:-4}
change_pct=${CHANGE_PCT:-1}
seed=${SEED:-1}
workdir=${WORKDIR:-${BENCH_DIR:-/var/tmp}}
timeout=${TIMEOUT:-1800}
bs=65536

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
hbrfs=$target/release/hbrfs
t_start=${EPOCHREALTIME/./}
load_start=$(cut -d' ' -f1-3 /proc/loadavg) # other work on the machine slows the timing

elapsed() { echo $(((${EPOCHREALTIME/./} - t_start) / 1000000)); }
log() { printf '[seeding.sh %4ss] %s\n' "$(elapsed)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (FUSE mounts)"
for tool in jq cmp bc; do command -v "$tool" >/dev/null || die "$tool not found"; done
[[ $size_gib =~ ^[1-9][0-9]*$ ]] || die "SIZE_GIB must be a positive integer"
[[ $change_pct =~ ^[1-9][0-9]?$|^100$ ]] || die "CHANGE_PCT must be a whole percentage, 1-100"
[[ $(stat -f -c %T "$workdir") != tmpfs ]] || die "WORKDIR $workdir is tmpfs"
size=$((size_gib << 30))
avail=$(($(stat -f -c '%a * %S' "$workdir")))
((avail > 2 * size + (1 << 30))) || die "$workdir has $((avail >> 30)) GiB free, need $((2 * size_gib + 1))"

if [[ ${BUILD:-1} == 1 ]]; then
    log "cargo build --release (target dir $target)"
    (cd "$repo" && CARGO_TARGET_DIR=$target cargo build --release --quiet) || die "cargo build failed"
fi

work=$(mktemp -d "$workdir/hbrfs-seeding.XXXXXX")
backing=$work/backing mnt=$work/mnt replica=$work/replica
mkdir -p "$backing" "$mnt" "$replica"
primary_pid='' secondary_pid=''

# shellcheck source=contrib/bench/common.sh
source "$repo/contrib/bench/common.sh"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -z $primary_pid ]] || stop "$primary_pid"
    is_mounted "$mnt" && { fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" || true; }
    [[ -z $secondary_pid ]] || stop "$secondary_pid"
    if ((rc != 0)); then
        for f in "$work"/*.log; do [[ -e $f ]] && { log "last lines of $f:"; tail -n 15 "$f" >&2; }; done
    fi
    if is_mounted "$mnt"; then log "$mnt still mounted; leaving $work"
    elif [[ ${KEEP:-0} == 1 ]]; then log "kept $work"
    else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. The image.
log "writing $size_gib GiB of random data to $backing/disk.img"
head -c "$size" /dev/urandom >"$backing/disk.img"
# 2. The seed.
log "seeding: cp to $replica/disk.img"
cp "$backing/disk.img" "$replica/disk.img"
# 3. The change, after the seed was taken and before replication starts.
blocks=$((size / bs))
changed=$(((blocks * change_pct + 99) / 100))
log "changing $changed of $blocks 64 KiB blocks ($change_pct%) in the backing image"
awk -v n="$blocks" -v k="$changed" -v s="$seed" 'BEGIN { srand(s)
    while (c < k) { b = int(rand() * n); if (!(b in seen)) { seen[b]; print b; c++ } } }' | while read -r b; do
    dd if=/dev/urandom of="$backing/disk.img" bs=$bs seek="$b" count=1 iflag=fullblock conv=notrunc status=none
done
sync
cmp -s "$backing/disk.img" "$replica/disk.img" && die "the change did not change the image"
if [[ ${DROP_CACHES:-1} == 1 ]]; then echo 3 >/proc/sys/vm/drop_caches; fi

# 4. Start replication: the secondary on a free port, then the primary.
RUST_LOG=info "$hbrfs" serve "$replica" --listen 127.0.0.1:0 >"$work/secondary.log" 2>&1 &
secondary_pid=$!
for _ in $(seq 300); do [[ -s $replica/.hbrfs/listen ]] && break; sleep 0.1; done
[[ -s $replica/.hbrfs/listen ]] || die "hbrfs serve did not listen within 30 s"
addr=$(<"$replica/.hbrfs/listen")
log "secondary on $addr; starting the replicating primary"
t0=$(date +%s%N)
"$hbrfs" mount "$backing" "$mnt" --replicate-to "$addr" --auth-key "$replica/.hbrfs/auth.key" \
    --rpo 1s --block-size 64K >"$work/primary.log" 2>&1 &
primary_pid=$!

first_applied_ns='' last_note=0
while :; do
    kill -0 "$primary_pid" 2>/dev/null || die "hbrfs mount exited"
    kill -0 "$secondary_pid" 2>/dev/null || die "hbrfs serve exited"
    now=$(date +%s%N)
    ((now - t0 < timeout * 1000000000)) || die "no caught-up first point within $timeout s"
    if p=$("$hbrfs" status -d "$backing" --json 2>/dev/null) && s=$("$hbrfs" status -d "$replica" --json 2>/dev/null); then
        sec_epoch=$(jq '.last_applied_epoch' <<<"$s")
        if [[ -z $first_applied_ns ]] && ((sec_epoch > 0)); then first_applied_ns=$(jq '.applied_at_ns' <<<"$s"); fi
        jq -e --argjson se "$sec_epoch" '.replication as $r | $r.connected and .dirty_blocks == 0 and .ops == 0
            and $r.last_applied_epoch > 0 and $r.shipping == null and $se >= $r.last_applied_epoch
            and $r.last_applied_epoch + 1 >= .current_epoch' <<<"$p" >/dev/null && break
        if ((now - last_note > 5000000000)); then
            last_note=$now
            log "$(jq -r '.replication.shipping | if . then "shipping: \(.blocks_done) of \(.blocks_total) blocks"
                else "not shipping (before the first cut, or the secondary applying)" end' <<<"$p")"
        fi
    fi
    sleep 0.2
done

# 5. The figures, then the byte-for-byte check.
r=$(jq '.replication' <<<"$p")
wire=$(jq '.wire_bytes' <<<"$r")
pct() { bc -l <<<"scale=3; 100 * $1 / $2" | sed 's/^\./0./'; }
grep -h 'seeding: ' "$work/secondary.log" | sed 's/^/  secondary: /' >&2 || log "warning: the secondary logged no seeding line"
log "comparing the backing image and the replica byte for byte"
cmp "$backing/disk.img" "$replica/disk.img" || die "REPLICA DIFFERS FROM THE PRIMARY"
cat <<EOF
image size:                $size bytes ($size_gib GiB, $blocks blocks of 64 KiB)
blocks changed:            $changed ($change_pct%, $((changed * bs)) bytes of new random data)
blocks offered:            $(jq '.blocks_offered' <<<"$r") (zero: $(jq '.blocks_zero' <<<"$r"))
blocks sent:               $(jq '.blocks_sent' <<<"$r") (held by the seed: $(jq '.blocks_have' <<<"$r"))
points shipped:            $(jq '.epochs_shipped' <<<"$r")
wire bytes:                $wire
wire bytes / image size:   $(pct "$wire" "$size")%
wire bytes / changed data: $(bc -l <<<"scale=3; $wire / ($changed * $bs)")x
time to first applied point: $(bc -l <<<"scale=2; ($first_applied_ns - $t0) / 1000000000") s (from starting hbrfs mount)
load average at start:     $load_start
replica == primary:        yes (cmp, $size bytes)
total run time:            $(elapsed) s
EOF
