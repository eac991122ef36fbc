# Helpers the bench scripts share; sourced, not run.

# is_mounted DIR: whether something is mounted at DIR.
is_mounted() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# stop PID: SIGTERM, then SIGKILL after 30 s.
stop() {
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
