#!/usr/bin/env bash
# Initial-sync A/B: the initial full sync of replication.sh's mixed image
# (its generator, same seed, same mix) with several builds or settings,
# interleaved round by round so that the machine's drift spreads over all of
# them. Per run: a fresh primary (the image copied in while no secondary
# runs) and a fresh secondary; reported per variant: ship wall time (cut ->
# applied), non-zero bytes / ship time, the same bytes per primary and per
# secondary CPU-second, compression ratio and wire bytes, medians over the
# rounds.
#
#   sudo VARIANTS="base|/var/tmp/hbrfs-old|1| new|target/release/hbrfs|1|" contrib/bench/sync-ab.sh
#   sudo VARIANTS="l-1|target/release/hbrfs|-1| l1|target/release/hbrfs|1|" ROUNDS=3 contrib/bench/sync-ab.sh
#
# A variant is NAME|BINARY|ZSTD_LEVEL|ENV, space separated; ENV is a
# comma-separated list of VAR=VALUE given to both daemons (empty for none).
# Knobs: SIZE_GB=1, ROUNDS=2, SEED=1, BENCH_DIR=/var/tmp, RPO=1s,
# CATCHUP_TIMEOUT=600, KEEP=0 (1 keeps the temp dir and the logs).
set -euo pipefail

size_gb=${SIZE_GB:-1}
rounds=${ROUNDS:-2}
seed=${SEED:-1}
bench_dir=${BENCH_DIR:-/var/tmp}
rpo=${RPO:-1s}
catchup_timeout=${CATCHUP_TIMEOUT:-600}
keep=${KEEP:-0}
read -r -a variants <<<"${VARIANTS:?give VARIANTS=\"NAME|BINARY|LEVEL|ENV ...\"}"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log() { printf '[sync-ab.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
[[ $(id -u) -eq 0 ]] || die "run as root: FUSE mounts need it"
[[ $(stat -f -c %T "$bench_dir") != tmpfs ]] || die "BENCH_DIR $bench_dir is tmpfs"

# shellcheck source=contrib/bench/common.sh
source "$repo/contrib/bench/common.sh"

work=$(mktemp -d "$bench_dir/hbrfs-sync-ab.XXXXXX")
mnt=$work/mnt
primary_pid=
secondary_pid=
stop_all() {
    [[ -z $primary_pid ]] || stop "$primary_pid"
    primary_pid=
    is_mounted "$mnt" && { umount "$mnt" 2>/dev/null || umount -l "$mnt" || true; }
    [[ -z $secondary_pid ]] || stop "$secondary_pid"
    secondary_pid=
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all
    # Never delete while mounted: rm would walk into the mount.
    if [[ $keep == 1 ]] || is_mounted "$mnt"; then
        log "left $work in place"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# replication.sh's Python half: the generator, the copy, the polling.
sed -n "/^cat >\"\$work\/bench.py\" <<'PY'\$/,/^PY\$/p" "$repo/contrib/bench/replication.sh" |
    sed '1d;$d' >"$work/bench.py"
size_bytes=$(python3 -c "import sys; print(int(float(sys.argv[1]) * 2**30) // 65536 * 65536)" "$size_gb")
mkdir -p "$work/a" "$work/changes" "$work/res"
python3 -c 'import secrets; print(secrets.token_hex(32))' >"$work/auth.key"
chmod 600 "$work/auth.key"
log "load average $(cut -d' ' -f1-3 /proc/loadavg); generating $size_bytes bytes"
HBRFS=/bin/true python3 "$work/bench.py" gen "$work/a/disk.img" "$size_bytes" "$seed" "" "$work/changes" >&2

run() { # run ROUND NAME BINARY LEVEL ENV
    local round=$1 name=$2 bin=$3 level=$4 env_list=$5 port
    local envs=()
    [[ -z $env_list ]] || IFS=, read -r -a envs <<<"$env_list"
    rm -rf "$work/backing" "$work/replica" "$mnt"
    mkdir -p "$work/backing" "$work/replica" "$mnt"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    env "${envs[@]}" "$bin" mount "$work/backing" "$mnt" --replicate-to "127.0.0.1:$port" --rpo "$rpo" \
        --zstd-level="$level" --auth-key "$work/auth.key" >>"$work/primary-$name.log" 2>&1 &
    primary_pid=$!
    for _ in $(seq 300); do is_mounted "$mnt" && break; sleep 0.1; done
    is_mounted "$mnt" || die "$name: hbrfs mount did not mount"
    HBRFS=$bin python3 "$work/bench.py" copy "$work/a/disk.img" "$mnt/disk.img" >/dev/null
    env "${envs[@]}" "$bin" serve "$work/replica" --listen "127.0.0.1:$port" --auth-key "$work/auth.key" \
        >>"$work/secondary-$name.log" 2>&1 &
    secondary_pid=$!
    HBRFS=$bin python3 "$work/bench.py" initial-sync "$mnt" "$work/replica" "$primary_pid,$secondary_pid" \
        "$catchup_timeout" >"$work/res/$round-$name.json"
    python3 - "$work/res/$round-$name.json" "$primary_pid" "$secondary_pid" "$name" "$(cut -d' ' -f1 /proc/loadavg)" <<'EOF' >>"$work/res/rows.jsonl"
import json, sys
s = json.load(open(sys.argv[1])); r = s["status"]["replication"]
nonzero = r["bytes_offered"] - r["bytes_zero"]
cpu = s["cpu_s"]
print(json.dumps({"name": sys.argv[4], "caught_up": s["caught_up"], "ship_s": s["ship_s"], "nonzero": nonzero,
                  "pcpu": cpu[sys.argv[2]], "scpu": cpu[sys.argv[3]], "wire": r["wire_bytes"],
                  "ratio": r["compression_ratio"], "raw": r.get("blocks_raw"), "load": sys.argv[5]}))
EOF
    log "round $round $name: $(tail -n 1 "$work/res/rows.jsonl")"
    stop_all
    cmp -s "$work/a/disk.img" "$work/replica/disk.img" || die "$name: the replica differs from the image"
}

for round in $(seq "$rounds"); do
    for v in "${variants[@]}"; do
        IFS='|' read -r name bin level env_list <<<"$v"
        [[ $bin == /* ]] || bin=$repo/$bin
        run "$round" "$name" "$bin" "$level" "$env_list"
    done
done

python3 - "$work/res/rows.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
names = list(dict.fromkeys(r["name"] for r in rows))
print("| variant | runs | ship s | MB/s (non-zero / ship) | primary MB/CPU-s | secondary MB/CPU-s | ratio | wire MB | raw blocks | load |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
for n in names:
    rs = [r for r in rows if r["name"] == n and r["caught_up"]]
    med = lambda f: statistics.median(f(r) for r in rs)
    print(f"| {n} | {len(rs)} | {med(lambda r: r['ship_s']):.2f} | {med(lambda r: r['nonzero'] / r['ship_s'] / 1e6):.0f} "
          f"| {med(lambda r: r['nonzero'] / r['pcpu'] / 1e6):.0f} | {med(lambda r: r['nonzero'] / r['scpu'] / 1e6):.0f} "
          f"| {med(lambda r: r['ratio']):.2f} | {med(lambda r: r['wire'] / 1e6):.0f} | {rs[0]['raw']} "
          f"| {' '.join(r['load'] for r in rs)} |")
EOF
