#!/usr/bin/env bash
# Object-storage benchmark (issue 12, item 7): requests and bytes per point
# at 0.1 %, 1 % and 10 % change of an image published to an S3 store, next
# to a POSIX secondary on the same data; restore throughput; time to the
# first byte and a sequential read through a lazy `mount-point`; GC time
# over 100 points.
#
# Run as root from anywhere (~5 minutes with the defaults on 2 cores):
#
#   sudo contrib/bench/object.sh
#   sudo SIZE_MB=512 contrib/bench/object.sh      # a quick look
#
# The store is SeaweedFS (`weed mini`, the pinned version contrib/test.sh
# installs; HBRFS_WEED names another binary) on 127.0.0.1, its data in the
# work dir on the same disk. Steps:
#   1. object store: `hbrfs mount B M --replicate-to s3://bench/repo
#      --rpo RPO`; fill: SIZE_MB MiB of sequential 1 MiB fio writes
#      (O_DIRECT, half-compressible fresh buffers), timed until published;
#      then for each of 0.1, 1, 10 %: that share of the image rewritten as
#      distinct random 64 KiB blocks, timed from the end of fio's fsync
#      until published. Per step: the primary's `object_requests` deltas
#      (PUTs, PUT bytes, GETs, GET bytes, LISTs) from `status --json`.
#   2. POSIX secondary: the same fill and changes into `hbrfs serve` on
#      loopback (same RPO, TLS on); per step the primary's `wire_bytes`
#      delta and the time until applied.
#   3. restore: `hbrfs restore s3://bench/repo latest DIR` timed (page
#      cache dropped first), MiB/s of image size; `cmp` with the primary's
#      image (a difference fails the script).
#   4. lazy mount: `hbrfs mount-point s3://bench/repo latest M`; time from
#      starting it until the first 4 KiB of the image is read, then a
#      cold sequential `dd bs=1M` of the whole image (MiB/s), `cmp`ed.
#   5. GC: 100 more points (one 64 KiB write + fsync each, waited until
#      published), then `hbrfs gc s3://bench/repo --grace 0s` timed; once
#      more with `--keep 1s:10s` (retention drops most of them, sparse
#      packs are repacked); then twice more, the last timed: what they
#      left unreferenced becomes a candidate, then goes.
#
# Knobs: SIZE_MB=4096, RPO=1s, GC_POINTS=100, BENCH_DIR=/var/tmp (~4 x
# SIZE_MB free, not tmpfs), TIMEOUT=900 (s per wait), KEEP=0, BUILD=1.
# Needs fio, jq, bc, cmp, python3. Compare the ratios of one run; the load
# average at the start is printed.
set -euo pipefail

size_mb=${SIZE_MB:-4096}
rpo=${RPO:-1s}
gc_points=${GC_POINTS:-100}
bench_dir=${BENCH_DIR:-/var/tmp}
timeout=${TIMEOUT:-900}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
hbrfs=$repo/target/release/hbrfs
weed=${HBRFS_WEED:-${HBRFS_TEST_VENV:-/opt/hbrfs-test-venv}/bin/weed}
t_start=${EPOCHREALTIME/./}
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

elapsed() { echo $(((${EPOCHREALTIME/./} - t_start) / 1000000)); }
log() { printf '[object.sh %4ss] %s\n' "$(elapsed)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
ratio2() { bc -l <<<"scale=2; $1 / $2" | sed 's/^\./0./'; }
rate() { bc -l <<<"scale=0; $1 * 1000000000 / $2 / 1048576"; } # rate BYTES NS: MiB/s
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

[[ $(id -u) -eq 0 ]] || die "run as root (FUSE mounts, drop_caches)"
if ! [[ $size_mb =~ ^[1-9][0-9]*$ ]] || ((size_mb < 64)); then die "SIZE_MB is whole MiB, at least 64"; fi
[[ -x $weed ]] || die "no SeaweedFS at $weed: run contrib/test.sh (it installs it) or set HBRFS_WEED"
# shellcheck source=contrib/bench/common.sh
source "$repo/contrib/bench/common.sh"
prepare_bench "$bench_dir" $((4 * size_mb + 1024)) fio jq bc cmp python3

work=$(mktemp -d "$bench_dir/hbrfs-object.XXXXXX")
mnt=$work/mnt pmnt=$work/point
mkdir -p "$work/weed" "$work/b-obj" "$work/b-posix" "$work/replica" "$mnt" "$pmnt"
weed_pid='' primary_pid='' secondary_pid='' point_pid=''

unmount() { ! is_mounted "$1" || fusermount3 -u "$1" 2>/dev/null || umount -l "$1" || true; }
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "$point_pid" "$primary_pid" "$secondary_pid"; do [[ -z $p ]] || stop "$p"; done
    [[ -z $weed_pid ]] || kill -9 -- "-$weed_pid" 2>/dev/null || true
    unmount "$pmnt"
    unmount "$mnt"
    if ((rc != 0)); then
        for f in "$work"/*.log; do [[ -e $f ]] && { log "last lines of $f:"; tail -n 15 "$f" >&2; }; done
    fi
    if is_mounted "$mnt" || is_mounted "$pmnt"; then log "still mounted; leaving $work"
    elif [[ ${KEEP:-0} == 1 ]]; then log "kept $work"
    else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The store: every listener on a free loopback port, no auto-created
# buckets, credentials from a config file.
# Each gRPC port is given too: the default (port + 10000) overflows for a
# high free port.
declare -A port
for p in s3 s3_grpc master master_grpc volume volume_grpc filer filer_grpc admin admin_grpc; do
    port[$p]=$(free_port)
done
s3_port=${port[s3]}
cat >"$work/s3.json" <<'EOF'
{"identities":[{"name":"bench","credentials":[{"accessKey":"bench","secretKey":"bench-secret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
setsid "$weed" mini -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.config="$work/s3.json" \
    -s3.autoCreateBucket=false -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.telemetry=false -filer.localSocket="$work/filer.sock" -s3.localSocket="$work/s3.sock" \
    -s3.port="$s3_port" -s3.port.grpc="${port[s3_grpc]}" \
    -master.port="${port[master]}" -master.port.grpc="${port[master_grpc]}" \
    -volume.port="${port[volume]}" -volume.port.grpc="${port[volume_grpc]}" \
    -filer.port="${port[filer]}" -filer.port.grpc="${port[filer_grpc]}" \
    -admin.port="${port[admin]}" -admin.port.grpc="${port[admin_grpc]}" \
    >"$work/weed.log" 2>&1 &
weed_pid=$!
endpoint=http://127.0.0.1:$s3_port
for _ in $(seq 300); do
    curl -s -o /dev/null "$endpoint/" && break
    sleep 0.1
done
curl -s -o /dev/null "$endpoint/" || die "the store did not answer at $endpoint"
created=0
for _ in $(seq 50); do
    if echo "s3.bucket.create -name bench" |
        "$weed" shell -master="127.0.0.1:${port[master]}.${port[master_grpc]}" \
            -filer="127.0.0.1:${port[filer]}.${port[filer_grpc]}" 2>&1 | grep -q "created bucket"; then
        created=1
        break
    fi
    sleep 0.2
done
((created)) || die "weed shell could not create the bucket"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
url=s3://bench/repo
s3=(--s3-endpoint "$endpoint")

# change FILE PERMILLE SEED: that share (in 1/1000) of the image rewritten
# as distinct random 64 KiB blocks, fsynced.
change() {
    local kib=$((size_mb * 1024 * $2 / 1000))
    fio_job "$1" "$3" --end_fsync=1 --rw=randwrite --bs=64k --size="${size_mb}M" \
        --io_size="$(((kib + 63) / 64 * 64))k" --randrepeat=0
}

# write_step STEP SEED: the fill (timed from its start) or a change (timed
# from the end of its fsync) through $mnt; sets t0.
write_step() {
    if [[ $1 == fill ]]; then
        t0=$(now_ns)
        fio_job "$mnt/disk.img" "$2" --end_fsync=1 --rw=write --bs=1M --size="${size_mb}M"
    else
        change "$mnt/disk.img" "$1" "$2"
        t0=$(now_ns)
    fi
}

# wait_published DIR PID: until nothing is dirty, pending or shipping and
# every closed epoch is published; prints the primary's status JSON.
wait_published() {
    local t0 p
    t0=$(now_ns)
    while :; do
        kill -0 "$2" 2>/dev/null || die "hbrfs mount $1 exited"
        (($(now_ns) - t0 < timeout * 1000000000)) || die "not published within $timeout s"
        if p=$("$hbrfs" status -d "$1" --json 2>/dev/null) &&
            jq -e '.replication as $r | $r.connected and .dirty_blocks == 0 and .ops == 0
                and $r.shipping == null and $r.last_applied_epoch > 0
                and $r.last_applied_epoch + 1 >= .current_epoch' <<<"$p" >/dev/null; then
            echo "$p"
            return
        fi
        sleep 0.05
    done
}

req() { jq -r ".replication.object_requests.$2" <<<"$1"; } # req STATUS FIELD
wire() { jq -r '.replication.wire_bytes' <<<"$1"; }

steps=(fill 1 10 100) # fill, then per mille: 0.1 %, 1 %, 10 %
declare -A o_ns o_puts o_putb o_gets o_getb o_lists p_ns p_wire

# 1. Object store.
log "object store: mount $work/b-obj -> $url ($endpoint), fill $size_mb MiB"
RUST_LOG=info "$hbrfs" mount "$work/b-obj" "$mnt" --replicate-to "$url" "${s3[@]}" --rpo "$rpo" \
    >"$work/primary-obj.log" 2>&1 &
primary_pid=$!
wait_mounted "$mnt" "$primary_pid" "hbrfs mount (object)"
before=$("$hbrfs" status -d "$work/b-obj" --json)
seed=1
for step in "${steps[@]}"; do
    write_step "$step" "$seed"
    after=$(wait_published "$work/b-obj" "$primary_pid")
    o_ns[$step]=$(($(now_ns) - t0))
    for f in puts put_bytes gets get_bytes lists; do
        d=$(($(req "$after" "$f") - $(req "$before" "$f")))
        case $f in
        puts) o_puts[$step]=$d ;; put_bytes) o_putb[$step]=$d ;; gets) o_gets[$step]=$d ;;
        get_bytes) o_getb[$step]=$d ;; lists) o_lists[$step]=$d ;;
        esac
    done
    log "object $step: $(secs "${o_ns[$step]}") s, ${o_puts[$step]} PUTs ($(mib "${o_putb[$step]}") MiB), ${o_gets[$step]} GETs"
    before=$after
    seed=$((seed + 1))
done
cp --sparse=always "$work/b-obj/disk.img" "$work/primary.img"

# 2. POSIX secondary, same data (same fio seeds).
log "POSIX secondary: serve $work/replica, mount $work/b-posix"
stop "$primary_pid"
primary_pid=''
unmount "$mnt"
RUST_LOG=info "$hbrfs" serve "$work/replica" --listen 127.0.0.1:0 >"$work/secondary.log" 2>&1 &
secondary_pid=$!
wait_listen "$work/replica" "$secondary_pid"
cp "$work/replica/.hbrfs/auth.key" "$work/pair.key"
"$hbrfs" mount "$work/b-posix" "$mnt" --replicate-to "$(<"$work/replica/.hbrfs/listen")" \
    --auth-key "$work/pair.key" --rpo "$rpo" >"$work/primary-posix.log" 2>&1 &
primary_pid=$!
wait_mounted "$mnt" "$primary_pid" "hbrfs mount (POSIX)"
before=$("$hbrfs" status -d "$work/b-posix" --json)
seed=1
for step in "${steps[@]}"; do
    write_step "$step" "$seed"
    wait_caught_up "$work/b-posix" "$work/replica" "$primary_pid" "$secondary_pid" >/dev/null
    p_ns[$step]=$(($(now_ns) - t0))
    after=$("$hbrfs" status -d "$work/b-posix" --json)
    p_wire[$step]=$(($(wire "$after") - $(wire "$before")))
    log "POSIX $step: $(secs "${p_ns[$step]}") s, $(mib "${p_wire[$step]}") MiB on the wire"
    before=$after
    seed=$((seed + 1))
done
stop "$primary_pid"
primary_pid=''
stop "$secondary_pid"
secondary_pid=''
unmount "$mnt"

# 3. Restore.
log "restore $url latest"
drop_caches
t0=$(now_ns)
"$hbrfs" restore "$url" latest "$work/restored" "${s3[@]}" >"$work/restore.log" 2>&1 || die "restore failed"
restore_ns=$(($(now_ns) - t0))
cmp "$work/restored/disk.img" "$work/primary.img" || die "the restored image differs from the primary's"
rm -rf "$work/restored"

# 4. Lazy mount: first byte, then a sequential read.
log "mount-point $url latest (lazy)"
drop_caches
t0=$(now_ns)
"$hbrfs" mount-point "$url" latest "$pmnt" "${s3[@]}" >"$work/point.log" 2>&1 &
point_pid=$!
wait_mounted "$pmnt" "$point_pid" "hbrfs mount-point"
dd if="$pmnt/disk.img" of=/dev/null bs=4k count=1 status=none || die "reading the lazy mount failed"
first_ns=$(($(now_ns) - t0))
t0=$(now_ns)
dd if="$pmnt/disk.img" of=/dev/null bs=1M status=none || die "reading the lazy mount failed"
seq_ns=$(($(now_ns) - t0))
cmp "$pmnt/disk.img" "$work/primary.img" || die "the lazy mount differs from the primary's image"
stop "$point_pid"
point_pid=''
unmount "$pmnt"

# 5. GC over GC_POINTS more points.
log "GC: $gc_points more points"
RUST_LOG=info "$hbrfs" mount "$work/b-obj" "$mnt" --replicate-to "$url" "${s3[@]}" --rpo "$rpo" \
    >>"$work/primary-obj.log" 2>&1 &
primary_pid=$!
wait_mounted "$mnt" "$primary_pid" "hbrfs mount (object)"
for i in $(seq "$gc_points"); do
    dd if=/dev/urandom of="$mnt/disk.img" bs=64k count=1 seek=$((i * 7)) conv=notrunc,fsync status=none
    wait_published "$work/b-obj" "$primary_pid" >/dev/null
done
points=$("$hbrfs" points ls "$url" "${s3[@]}" --json | jq 'length')
stop "$primary_pid"
primary_pid=''
unmount "$mnt"
t0=$(now_ns)
"$hbrfs" gc "$url" "${s3[@]}" --grace 0s --json >"$work/gc1.json" 2>"$work/gc1.log" || die "gc failed"
gc_ns=$(($(now_ns) - t0))
t0=$(now_ns)
"$hbrfs" gc "$url" "${s3[@]}" --grace 0s --keep 1s:10s --json >"$work/gc2.json" 2>"$work/gc2.log" ||
    die "gc --keep failed"
gck_ns=$(($(now_ns) - t0))
left=$("$hbrfs" points ls "$url" "${s3[@]}" --json | jq 'length')
# Two more runs: the first lists what retention and the repack left
# unreferenced as candidates, the second (grace 0 s) deletes them.
"$hbrfs" gc "$url" "${s3[@]}" --grace 0s --json >"$work/gc3.json" 2>"$work/gc3.log" || die "gc failed"
t0=$(now_ns)
"$hbrfs" gc "$url" "${s3[@]}" --grace 0s --json >"$work/gc4.json" 2>"$work/gc4.log" || die "gc failed"
gcd_ns=$(($(now_ns) - t0))
# gc_what FILE: what one run did, from its JSON report.
gc_what() {
    jq -r '"\(.dropped | length) points let go, \(.deleted) packs deleted (\(.freed_bytes / 1048576 | floor) MiB), \(.candidates) candidates, \(.repacked) sparse packs repacked (\(.repacked_bytes / 1048576 | floor) MiB live), \(.requests.gets) GETs"' "$1"
}

size=$((size_mb * 1048576))
echo
echo "object.sh: $size_mb MiB image, --rpo $rpo, SeaweedFS $("$weed" version 2>/dev/null | head -1 | awk '{print $3}') on loopback, load at start $load_start"
echo
echo "| step | object: s | PUTs | PUT MiB | GETs | GET MiB | LISTs | POSIX secondary: s | wire MiB | object / POSIX time |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for step in "${steps[@]}"; do
    name=$step
    [[ $step == fill ]] || name="$(bc -l <<<"scale=1; $step / 10" | sed 's/^\./0./') %"
    echo "| $name | $(secs "${o_ns[$step]}") | ${o_puts[$step]} | $(mib "${o_putb[$step]}") | ${o_gets[$step]} | $(mib "${o_getb[$step]}") | ${o_lists[$step]} | $(secs "${p_ns[$step]}") | $(mib "${p_wire[$step]}") | $(ratio2 "${o_ns[$step]}" "${p_ns[$step]}") |"
done
echo
echo "| what | figure |"
echo "| --- | ---: |"
echo "| restore, whole image | $(secs "$restore_ns") s, $(rate "$size" "$restore_ns") MiB/s |"
echo "| lazy mount: start to first 4 KiB read | $(secs "$first_ns") s |"
echo "| lazy mount: sequential read | $(rate "$size" "$seq_ns") MiB/s |"
echo "| gc over $points points (--grace 0s) | $(secs "$gc_ns") s: $(gc_what "$work/gc1.json") |"
echo "| gc --keep 1s:10s (points left: $left) | $(secs "$gck_ns") s: $(gc_what "$work/gc2.json") |"
echo "| gc, two runs later (grace 0 s) | $(secs "$gcd_ns") s: $(gc_what "$work/gc4.json") |"
