//! Both sides at once on loopback (`hbrfs up`): a secondary with its
//! mirror, and a primary replicating to it, under one folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::primary::{MountOptions, start_primary};
use super::secondary::{ServeOptions, default_key_path, start_secondary};
use super::{on_signal, unmount};
use crate::auth::AuthKey;
use crate::error::{IoContext, Result};
use crate::replicate::{ReplicateOptions, Target};
use crate::state::ReplicaPaths;
use crate::sys;

/// Runs `hbrfs up`: a secondary (with its mirror) and a primary replicating
/// to it over loopback, under `dir`.
pub fn run_up(dir: &Path, rpo: Duration) -> Result<()> {
    sys::set_umask(0);
    sys::block_shutdown_signals().at("signal mask")?;
    let sub = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o755)
            .create(&p)
            .at(&p)?;
        p.canonicalize().at(&p)
    };
    let (backing, mnt, replica, replica_mnt) = (
        sub("backing")?,
        sub("mnt")?,
        sub("replica")?,
        sub("replica-mnt")?,
    );
    let mut secondary = start_secondary(&ServeOptions {
        replica,
        listen: "127.0.0.1:0".parse().expect("literal address"),
        mount: Some(replica_mnt.clone()),
        auth_key: None,
        mirror_allow_other: false,
        metrics: None,
        allow_devices: false,
        keep: crate::points::Retention::new(
            vec![(Duration::from_secs(1), Duration::from_secs(3600))],
            None,
        ),
    })?;
    let key = AuthKey::load(&default_key_path(&dir.join("replica")))?;
    let listen_path = ReplicaPaths::of(&dir.join("replica")).listen();
    let listen = std::fs::read_to_string(&listen_path).at(&listen_path)?;
    let mut primary = start_primary(&MountOptions {
        backing,
        mountpoint: mnt.clone(),
        block_size: None,
        threads: 8,
        cut_every: None,
        tracking: true,
        replicate: Some(ReplicateOptions {
            target: Target::Secondary {
                addr: listen.trim().to_string(),
                key,
            },
            rpo,
            coalesce: crate::replicate::DEFAULT_COALESCE,
            level: crate::replicate::DEFAULT_ZSTD_LEVEL,
            max_rate: None,
        }),
        metrics: None,
    })?;
    let mnt = primary.mountpoint.clone();
    eprintln!(
        "\nhbrfs is up.\n  primary datastore: {mnt}  (write images here)\n  replica, read-only: {rep}  (a change is there within a moment, at most {rpo:?} behind)\n\n\
         Try:\n  qemu-img create -f qcow2 {mnt}/disk.qcow2 1G\n  qemu-io -f qcow2 -t none -c 'write -P 0xab 0 1M' {mnt}/disk.qcow2\n  \
         hbrfs status -d {mnt}\n  qemu-img compare {mnt}/disk.qcow2 {rep}/disk.qcow2\n\
         A VM: qemu-system-x86_64 -drive file={mnt}/disk.qcow2,cache=none,aio=threads ...\n\nCtrl-C stops both sides.",
        mnt = mnt.display(),
        rep = replica_mnt.display(),
    );
    let mut unmounter = primary.session.unmount_callable();
    let stop_secondary = secondary.stopper();
    on_signal(move || {
        unmount(&mut unmounter, &mnt);
        stop_secondary();
    })?;
    let primary_result = primary.run();
    let secondary_result = secondary.run();
    primary_result.and(secondary_result)
}
