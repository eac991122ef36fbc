#!/usr/bin/env bash
# Installs the pjdfstest POSIX conformance suite (the Rust port from crates.io)
# and the two unprivileged accounts it switches to, for mount-tests/posix.rs.
#
# Idempotent: every step checks first, so CI can call it on every run and a
# machine that already has everything pays nothing. Needs root (the suite's
# permission tests seteuid() to other users, and the accounts must exist).
#
# Environment:
#   PJDFSTEST_ROOT     install prefix (default /opt/pjdfstest; the test looks
#                      for $PJDFSTEST_ROOT/bin/pjdfstest, or $PJDFSTEST)
#   PJDFSTEST_VERSION  crate version (default 0.2.2: the one KNOWN_GAPS.md was
#                      written against; a new version brings new cases)
set -euo pipefail

root=${PJDFSTEST_ROOT:-/opt/pjdfstest}
version=${PJDFSTEST_VERSION:-0.2.2}
bin=$root/bin/pjdfstest

if [[ $(id -u) -ne 0 ]]; then
    echo "install-pjdfstest.sh: must run as root (creates users, installs to $root)" >&2
    exit 1
fi

# The version check matters: an older binary left on a reused machine would
# run a different set of cases than KNOWN_GAPS.md describes.
if [[ -x $bin ]] && "$bin" --version 2>/dev/null | grep -qx "pjdfstest $version"; then
    echo "pjdfstest $version already in $bin"
else
    # --locked: build with the crate's own Cargo.lock, so a new release of a
    # dependency cannot break (or change) the suite under us.
    cargo install --locked --force --root "$root" --version "=$version" pjdfstest
fi

# mount-tests/pjdfstest.toml names two users, each with its primary group:
# nobody/nogroup and tests/tests. Debian ships `nobody` (uid 65534) but on
# minimal images without a group 65534, and pjdfstest refuses to start when a
# configured user or group does not resolve.
if ! getent group nogroup >/dev/null; then
    if getent group 65534 >/dev/null; then
        echo "gid 65534 exists under another name; fix mount-tests/pjdfstest.toml" >&2
        exit 1
    fi
    groupadd --gid 65534 nogroup
fi
if ! getent passwd nobody >/dev/null; then
    useradd --uid 65534 --gid nogroup --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin nobody
fi
if ! getent passwd tests >/dev/null; then
    # A system account with no home and no login: it only ever exists as an
    # euid inside the test process.
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "pjdfstest dummy user" tests
fi

echo "pjdfstest ready: $bin"
