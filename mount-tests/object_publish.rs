//! Publishing points to an object store (issue 12), against a real
//! SeaweedFS: a primary mounted with `--replicate-to s3://…`, its faults
//! (the store killed mid-upload, two primaries on one prefix, wrong
//! credentials, a missing bucket), checked in the bucket itself.

use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use serde_json::Value;
use tokio_stream::StreamExt;

use crate::harness::{BLOCK, Mount, hbrfs, json_u64, path_str, pattern, run, sync_file, temp_dir};
use crate::replication::{
    flip_block_7_and_repair, primary_status, status_json, verify_json, wait_last_error,
};
use crate::s3::S3Server;

const POLL: Duration = Duration::from_millis(50);
/// How long a point may take to land on the loopback store.
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(90);

/// A primary replicating to `s3://BUCKET/PREFIX` on `server`, with `env`
/// (the server's credentials unless a test changes them).
pub(crate) fn s3_mount(
    server: &S3Server,
    url: &str,
    env: &[(&str, String)],
    extra: &[&str],
) -> Mount {
    let mut args = s3_args(server, url);
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Mount::start_with_env(&args, env)
}

/// The arguments that replicate to `url` on `server` with `--rpo 1s`.
fn s3_args(server: &S3Server, url: &str) -> Vec<String> {
    let endpoint = server.endpoint();
    [
        "--replicate-to",
        url,
        "--s3-endpoint",
        &endpoint,
        "--rpo",
        "1s",
    ]
    .map(str::to_string)
    .to_vec()
}

/// Polls the primary until nothing is dirty or pending and every closed
/// epoch is published; returns its status.
pub(crate) fn wait_published(m: &Mount, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let p = primary_status(m);
        let shipped = json_u64(&p["replication"]["last_applied_epoch"]);
        let done = p["replication"]["connected"] == Value::Bool(true)
            && json_u64(&p["dirty_blocks"]) == 0
            && json_u64(&p["ops"]) == 0
            && shipped > 0
            && shipped + 1 >= json_u64(&p["current_epoch"]);
        if done {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "points were not published within {timeout:?}\n--- status ---\n{p:#}\n--- log ---\n{}",
            m.log()
        );
        sleep(POLL);
    }
}

/// A current-thread runtime for one test's S3 reads.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

/// Every key under `prefix` in `bucket`, with its size.
pub(crate) fn objects(server: &S3Server, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
    let store = server.store(bucket);
    runtime().block_on(async {
        let prefix = ObjectPath::from(prefix);
        let mut list = store.list(Some(&prefix));
        let mut found = Vec::new();
        while let Some(meta) = list.next().await {
            let meta = meta.expect("list the bucket");
            found.push((meta.location.to_string(), meta.size));
        }
        found.sort();
        found
    })
}

/// The manifests' keys under `prefix`.
fn manifests(server: &S3Server, bucket: &str, prefix: &str) -> Vec<String> {
    objects(server, bucket, &format!("{prefix}/points"))
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// Writes `data` at the start of `rel` through the mount and fsyncs it.
fn write_image(m: &Mount, rel: &str, data: &[u8]) {
    std::fs::write(m.mnt(rel), data).expect("write the image");
    sync_file(&m.mnt(rel));
}

/// `hbrfs restore URL POINT DIR` with the server's endpoint and `env`.
pub(crate) fn restore(server: &S3Server, url: &str, point: &str, dir: &Path) {
    let out = Command::new(hbrfs())
        .args(["restore", url, point, path_str(dir), "--s3-endpoint"])
        .arg(server.endpoint())
        .envs(server.env())
        .output()
        .expect("run hbrfs restore");
    assert!(
        out.status.success(),
        "hbrfs restore {url} {point} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The newest point of `url` restores `rel` as `expected`.
fn assert_latest_restores(server: &S3Server, url: &str, rel: &str, expected: &[u8]) {
    let out = crate::harness::temp_dir();
    restore(server, url, "latest", &out.path().join("r"));
    let got = std::fs::read(out.path().join("r").join(rel)).expect("read the restored file");
    assert!(
        got == expected,
        "{rel} restored from {url} differs from what was written"
    );
}

/// The store killed while a point uploads: no partial point becomes
/// visible, the primary shows the failure within seconds, and after the
/// store restarts the point is published without sending again the packs
/// it had finished (every byte the primary PUT successfully is in the
/// bucket once: PUT bytes never exceed what the bucket holds). The point
/// restores byte for byte.
#[test]
fn the_store_killed_mid_upload_shows_no_partial_point_and_resumes_without_resending_packs() {
    let mut server = S3Server::start();
    server.create_bucket("kill");
    let url = "s3://kill/repo";
    // 4 MB/s: the 48 MiB point takes about 12 s, several packs.
    let m = s3_mount(&server, url, &server.env(), &["--max-rate", "4M"]);
    let data = pattern(48 << 20, 11);
    write_image(&m, "disk.raw", &data);
    // Wait for a finished pack (config, then at least one pack).
    let deadline = Instant::now() + PUBLISH_TIMEOUT;
    loop {
        let s = primary_status(&m);
        if json_u64(&s["replication"]["object_requests"]["puts"]) >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no pack was uploaded: {s:#}");
        sleep(POLL);
    }
    server.kill();
    let killed = Instant::now();
    let error = wait_last_error(&m, "s3://kill/repo", Duration::from_secs(60));
    eprintln!(
        "failure shown after {:.1} s: {error}",
        killed.elapsed().as_secs_f64()
    );
    server.restart();
    assert!(
        manifests(&server, "kill", "repo").is_empty(),
        "a manifest appeared for a point whose upload was cut"
    );
    let s = wait_published(&m, PUBLISH_TIMEOUT);
    let puts = &s["replication"]["object_requests"];
    let in_bucket: u64 = objects(&server, "kill", "repo").iter().map(|o| o.1).sum();
    assert!(
        json_u64(&puts["put_bytes"]) <= in_bucket,
        "the primary PUT {} bytes but the bucket holds {in_bucket}: a finished pack was sent again",
        json_u64(&puts["put_bytes"])
    );
    assert!(
        !manifests(&server, "kill", "repo").is_empty(),
        "the point was published"
    );
    assert_latest_restores(&server, url, "disk.raw", &data);
}

/// Two primaries of one datastore (a copied backing folder) replicating
/// to one prefix: one publishes the point, the other is refused with a
/// message naming the cause, and its blocks stay dirty.
#[test]
fn two_primaries_racing_for_one_prefix_one_wins_and_the_other_is_refused() {
    let server = S3Server::start();
    server.create_bucket("race");
    let url = "s3://race/repo";
    let mut first = Mount::start(&[]);
    write_image(&first, "disk.raw", &pattern(4 << 20, 1));
    first.stop();
    let dir = crate::harness::temp_dir();
    let (back2, mnt2) = (dir.path().join("back"), dir.path().join("mnt"));
    run(Command::new("cp").arg("-a").arg(&first.backing).arg(&back2));
    std::fs::create_dir(&mnt2).expect("mountpoint");
    let args = s3_args(&server, url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Mount::start_on_with_env(&first.backing, &first.mountpoint, &args, &server.env());
    let b = Mount::start_on_with_env(&back2, &mnt2, &args, &server.env());
    // Each writes something of its own, so each has a point to publish.
    write_image(&a, "a.raw", &pattern(1 << 20, 2));
    write_image(&b, "b.raw", &pattern(1 << 20, 3));
    let deadline = Instant::now() + PUBLISH_TIMEOUT;
    let (winner, loser) = loop {
        let refused = |m: &Mount| {
            let s = status_json(&m.backing);
            let e = s["replication"]["last_error"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (e.contains("another writer") || e.contains("histories diverged")).then_some(e)
        };
        match (refused(&a), refused(&b)) {
            (None, Some(e)) => break (&a, (&b, e)),
            (Some(e), None) => break (&b, (&a, e)),
            (Some(x), Some(y)) => panic!("both primaries were refused:\n{x}\n{y}"),
            (None, None) => {}
        }
        assert!(
            Instant::now() < deadline,
            "neither primary was refused\n--- a ---\n{}\n--- b ---\n{}",
            a.log(),
            b.log()
        );
        sleep(POLL);
    };
    let (loser, error) = loser;
    eprintln!("refused: {error}");
    wait_published(winner, PUBLISH_TIMEOUT);
    let s = status_json(&loser.backing);
    assert!(
        json_u64(&s["dirty_blocks"]) > 0,
        "the refused primary's blocks must stay dirty: {s:#}"
    );
    // The loser never overwrote a manifest: every published point is the
    // winner's, so its series restores the winner's files.
    let out = crate::harness::temp_dir();
    restore(&server, url, "latest", &out.path().join("r"));
    let mine = if std::ptr::eq(winner, &a) {
        "a.raw"
    } else {
        "b.raw"
    };
    let theirs = if mine == "a.raw" { "b.raw" } else { "a.raw" };
    assert!(
        out.path().join("r").join(mine).exists(),
        "the winner's file is in its point"
    );
    assert!(
        !out.path().join("r").join(theirs).exists(),
        "the refused primary's file reached the published point"
    );
}

/// Wrong credentials, then a missing bucket: each is a clear error in
/// `status` naming the cause, nothing is published, the blocks stay
/// dirty; with the cause fixed, the same data lands and restores exactly.
#[test]
fn wrong_credentials_or_a_missing_bucket_is_a_clear_error_and_nothing_is_lost() {
    let server = S3Server::start();
    server.create_bucket("creds");
    let mut env = server.env();
    for (k, v) in env.iter_mut() {
        if *k == "AWS_SECRET_ACCESS_KEY" {
            *v = "not-the-secret".into();
        }
    }
    let mut m = s3_mount(&server, "s3://creds/repo", &env, &[]);
    let data = pattern(2 << 20, 5);
    write_image(&m, "disk.raw", &data);
    let error = wait_last_error(&m, "check the credentials", Duration::from_secs(60));
    assert!(
        error.contains("s3://creds/repo"),
        "names the repository: {error}"
    );
    assert!(json_u64(&status_json(&m.backing)["dirty_blocks"]) > 0);
    m.stop();

    let backing = m.backing.clone();
    let mountpoint = m.mountpoint.clone();
    let missing = s3_args(&server, "s3://no-such-bucket/repo");
    let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
    let mut m2 = Mount::start_on_with_env(&backing, &mountpoint, &missing, &server.env());
    let error = wait_last_error(&m2, "does not exist", Duration::from_secs(60));
    assert!(
        error.contains("no-such-bucket"),
        "names the bucket: {error}"
    );
    assert!(json_u64(&status_json(&backing)["dirty_blocks"]) > 0);
    m2.stop();

    let good = s3_args(&server, "s3://creds/repo");
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    let m3 = Mount::start_on_with_env(&backing, &mountpoint, &good, &server.env());
    wait_published(&m3, PUBLISH_TIMEOUT);
    assert_latest_restores(&server, "s3://creds/repo", "disk.raw", &data);
    drop(m);
}

/// `mount --keep` with an object store: after each publish the points the
/// grid lets go are deleted, never the newest, and the newest restores.
#[test]
fn mount_keep_drops_the_points_outside_the_grid_after_each_publish() {
    let server = S3Server::start();
    server.create_bucket("keep");
    let url = "s3://keep/repo";
    let m = s3_mount(&server, url, &server.env(), &["--keep", "1s:3s"]);
    let mut last = Vec::new();
    for round in 0..16u64 {
        last = pattern(256 << 10, 100 + round);
        write_image(&m, "disk.raw", &last);
        wait_published(&m, PUBLISH_TIMEOUT);
        sleep(Duration::from_millis(400));
    }
    let s = primary_status(&m);
    let published = json_u64(&s["replication"]["epochs_shipped"]);
    let kept = manifests(&server, "keep", "repo");
    eprintln!(
        "{published} points published, {} kept: {kept:?}",
        kept.len()
    );
    assert!(published >= 16, "every round published a point: {s:#}");
    assert!(
        !kept.is_empty() && kept.len() <= 6,
        "a 1s:3s grid keeps about 4 of {published} points, kept {}",
        kept.len()
    );
    let newest = format!("{:020}", published);
    assert!(
        kept.last().is_some_and(|k| k.ends_with(&newest)),
        "the newest point ({newest}) stays: {kept:?}"
    );
    assert_latest_restores(&server, url, "disk.raw", &last);
}

/// `hbrfs verify` against an object store compares the primary with its
/// newest published point through the point's block maps (no block is
/// downloaded): clean once published, zero blocks and a short last block
/// included; a byte flipped in the primary's backing file behind hbrfs's
/// back is named exactly (that block) and verify exits non-zero;
/// `--repair` ships it again, the next verify is clean, and a restore
/// matches the primary.
#[test]
fn verify_against_the_object_store_names_a_flipped_block_and_repair_ships_it() {
    let server = S3Server::start();
    server.create_bucket("verify");
    let url = "s3://verify/repo";
    let m = s3_mount(&server, url, &server.env(), &[]);
    let mut data = pattern(32 * BLOCK as usize + 1000, 51);
    data[10 * BLOCK as usize..12 * BLOCK as usize].fill(0);
    std::fs::write(m.mnt("disk.img"), &data).unwrap();
    sync_file(&m.mnt("disk.img"));
    wait_published(&m, PUBLISH_TIMEOUT);
    let (ok, v) = verify_json(&m.backing, &[]);
    assert!(ok, "a clean primary failed verify: {v:#}");
    assert_eq!(v["differences"], Value::Array(vec![]), "{v:#}");
    assert!(json_u64(&v["blocks_checked"]) >= 33, "{v:#}");

    flip_block_7_and_repair(&m.backing, &m.back("disk.img"));
    wait_published(&m, PUBLISH_TIMEOUT);
    let (ok, v) = verify_json(&m.backing, &[]);
    assert!(ok, "still differs after repair: {v:#}");
    let dir = temp_dir();
    restore(&server, url, "latest", &dir.path().join("r"));
    assert!(
        std::fs::read(dir.path().join("r/disk.img")).unwrap()
            == std::fs::read(m.back("disk.img")).unwrap()
    );
}
