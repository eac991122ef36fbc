//! Mount tests: each one spawns the real `hbrfs` binary, mounts a real FUSE
//! filesystem over a fresh temp datastore and drives it with real clients
//! (qemu-img, qemu-io, fio, coreutils, util-linux). Run as root with
//! /dev/fuse: `cargo test --test mount -- --test-threads=2`.

mod bounded;
mod crash;
mod export;
mod harness;
mod health;
mod metadata;
mod object_gc;
mod object_publish;
mod object_recover;
mod object_storage;
mod passthrough;
mod paths;
mod points;
mod posix;
mod privacy;
mod recovery;
mod replication;
mod resilience;
mod roles;
mod s3;
mod space;
mod tracking;
