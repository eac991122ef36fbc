//! Retention and garbage collection of an object store (issue 12), against
//! a real SeaweedFS and a real primary: `hbrfs gc` run again and again
//! while points upload loses nothing (every retained point reads back as
//! written, blob by blob through the repository's own index and checks),
//! two GCs never both hold the lease, and `--dry-run` changes nothing.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::Duration;

use hbrfs::block::BlockHash;
use hbrfs::object::cache::Cache;
use hbrfs::object::manifest::{decode_map, hash_of, list_points, list_series, load};
use hbrfs::object::{MAP_CHUNK_BLOCKS, Repo, S3Url, format, s3 as store_io};
use hbrfs::proto::object::GcLease;
use object_store::ObjectStore;
use serde_json::Value;

use crate::harness::{BLOCK, Mount, hbrfs, json_u64, pattern, sync_file, temp_dir};
use crate::object_publish::{PUBLISH_TIMEOUT, objects, runtime, s3_mount, wait_published};
use crate::s3::S3Server;

/// The image every test writes: 32 blocks.
const IMAGE: &str = "disk.raw";
const IMAGE_BYTES: usize = 32 * BLOCK as usize;

/// `hbrfs gc URL ARGS --json` against `server`.
fn gc(server: &S3Server, url: &str, args: &[&str]) -> Output {
    Command::new(hbrfs())
        .args(["gc", url, "--s3-endpoint"])
        .arg(server.endpoint())
        .args(args)
        .envs(server.env())
        .output()
        .expect("run hbrfs gc")
}

/// The JSON report of a GC that must succeed.
fn gc_ok(server: &S3Server, url: &str, args: &[&str]) -> Value {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = gc(server, url, &with_json);
    assert!(
        out.status.success(),
        "hbrfs gc {url} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("gc --json prints JSON")
}

/// The repository `bucket/prefix` on `server`, opened by the library.
fn open_repo(server: &S3Server, bucket: &str, prefix: &str) -> Repo {
    let url = S3Url::parse(&format!("s3://{bucket}/{prefix}"))
        .expect("an s3 url")
        .expect("a valid s3 url");
    let store: Arc<dyn ObjectStore> = server.store(bucket);
    runtime().block_on(async {
        // The primary makes the repository as it starts.
        let deadline = std::time::Instant::now() + PUBLISH_TIMEOUT;
        let config = loop {
            match store_io::load_or_create_config(&store, &url, None).await {
                Ok(config) => break config,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("no repository at {url}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let key = hbrfs::block::HashKey::from_bytes(&config.hash_key).expect("a hash key");
        Repo {
            store,
            url,
            config,
            key,
        }
    })
}

/// The one series and its points, ascending.
fn points(repo: &Repo) -> (String, Vec<u64>) {
    runtime().block_on(async {
        let series = list_series(repo).await.expect("list series");
        assert_eq!(series.len(), 1, "one datastore writes here: {series:?}");
        let seqs = list_points(repo, &series[0]).await.expect("list points");
        (series[0].clone(), seqs)
    })
}

/// `IMAGE` as point `seq` holds it, read blob by blob: the manifest, its
/// map chunks, each block fetched and checked against its keyed hash.
fn read_image(repo: &Repo, series: &str, seq: u64) -> Vec<u8> {
    let dir = temp_dir();
    runtime().block_on(async {
        let cache = Cache::open(dir.path(), repo).expect("open a cache");
        cache.sync(repo).await.expect("sync the cache");
        let m = load(repo, series, seq)
            .await
            .expect("load the manifest")
            .unwrap_or_else(|| panic!("point {seq} is gone"));
        let ino = m
            .namespace
            .iter()
            .find(|e| e.path == IMAGE.as_bytes())
            .unwrap_or_else(|| panic!("point {seq} has no {IMAGE}"))
            .ino;
        let file = m.files.iter().find(|f| f.file_id == ino).expect("its map");
        let mut data = vec![0u8; file.size as usize];
        for (c, chunk) in file.chunks.iter().enumerate() {
            let Some(h) = hash_of(chunk) else { continue };
            let get = |h: BlockHash| {
                let cache = &cache;
                async move {
                    let found = cache.read(repo, h).await;
                    let found = found.unwrap_or_else(|e| panic!("point {seq}: blob {h:?}: {e}"));
                    found
                        .unwrap_or_else(|| {
                            panic!("point {seq}: blob {h:?} is in no pack: GC lost it")
                        })
                        .1
                }
            };
            let map = decode_map(&get(h).await, repo, "map").expect("decode a map chunk");
            for (i, b) in map.iter().enumerate() {
                let Some(bh) = hash_of(b) else { continue };
                let at = (c as u64 * MAP_CHUNK_BLOCKS + i as u64) * BLOCK;
                let raw = get(bh).await;
                let end = (at as usize + raw.len()).min(data.len());
                data[at as usize..end].copy_from_slice(&raw[..end - at as usize]);
            }
        }
        data
    })
}

/// Writes `data` over the image through the mount, fsyncs, and waits for
/// the point; returns the series' newest sequence number.
fn write_point(m: &Mount, repo: &Repo, data: &[u8]) -> u64 {
    std::fs::write(m.mnt(IMAGE), data).expect("write the image");
    sync_file(&m.mnt(IMAGE));
    wait_published(m, PUBLISH_TIMEOUT);
    *points(repo).1.last().expect("a point")
}

/// A fresh server with `bucket`, a primary publishing to
/// `s3://BUCKET/repo` and the repository as the library opens it.
fn setup(bucket: &str) -> (S3Server, String, Mount, Repo) {
    let server = S3Server::start();
    server.create_bucket(bucket);
    let url = format!("s3://{bucket}/repo");
    let m = s3_mount(&server, &url, &server.env(), &[]);
    let repo = open_repo(&server, bucket, "repo");
    (server, url, m, repo)
}

/// GC, run every 300 ms with a 1 s grace period and a grid keeping one
/// point per 2 s, while a primary publishes a point after each change:
/// every GC succeeds, packs are deleted, and every point left reads back
/// exactly as it was written.
#[test]
fn gc_during_uploads_loses_nothing() {
    let (server, url, m, repo) = setup("gcrun");
    let url = url.as_str();
    let cache = temp_dir();
    let cache_dir = cache.path().to_str().expect("utf-8").to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let args = [
        "--grace",
        "1s",
        "--keep",
        "2s:4s",
        "--cache-dir",
        &cache_dir,
    ];
    let reports = std::thread::scope(|s| {
        let gcs = s.spawn(|| {
            let mut reports = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                reports.push(gc_ok(&server, url, &args));
                sleep(Duration::from_millis(300));
            }
            reports
        });
        let mut written = BTreeMap::new();
        let mut image = pattern(IMAGE_BYTES, 1);
        for round in 0..16u64 {
            if round % 4 == 0 {
                // All new blocks: the old ones go once their points do.
                image = pattern(IMAGE_BYTES, 100 + round);
            } else {
                let at = (round as usize * 3 % 32) * BLOCK as usize;
                let blocks = pattern(3 * BLOCK as usize, 200 + round);
                let end = (at + blocks.len()).min(image.len());
                image[at..end].copy_from_slice(&blocks[..end - at]);
            }
            let seq = write_point(&m, &repo, &image);
            written.insert(seq, image.clone());
        }
        // The grid lets the older points go, then their packs pass grace.
        sleep(Duration::from_secs(5));
        stop.store(true, Ordering::Relaxed);
        let mut reports = gcs.join().expect("the GC thread");
        for _ in 0..2 {
            sleep(Duration::from_millis(1100));
            reports.push(gc_ok(&server, url, &args));
        }
        let (series, kept) = points(&repo);
        assert!(
            kept.len() < written.len(),
            "the grid let points go: kept {kept:?}"
        );
        let mut checked = 0;
        for seq in &kept {
            if let Some(expected) = written.get(seq) {
                assert!(
                    read_image(&repo, &series, *seq) == *expected,
                    "point {seq} does not read back as written"
                );
                checked += 1;
            }
        }
        assert!(
            checked > 0,
            "no point written by a round was kept: {kept:?}"
        );
        assert!(
            written.contains_key(kept.last().expect("a point")),
            "the newest point is the last round's"
        );
        reports
    });
    let deleted: u64 = reports.iter().map(|r| json_u64(&r["deleted"])).sum();
    let dropped: usize = reports
        .iter()
        .map(|r| r["dropped"].as_array().map_or(0, Vec::len))
        .sum();
    assert!(deleted > 0, "GC deleted packs over {} runs", reports.len());
    assert!(dropped > 0, "retention let points go");
    eprintln!(
        "{} GC runs during uploads: {dropped} points let go, {deleted} packs deleted",
        reports.len()
    );
}

/// Writes a lease held by `holder` until `expires_ns`.
fn put_lease(repo: &Repo, holder: &str, expires_ns: u64) {
    let lease = GcLease {
        holder: holder.as_bytes().to_vec(),
        taken_ns: 1,
        expires_ns,
    };
    runtime().block_on(async {
        let sealed = format::seal(&lease).expect("seal a lease");
        store_io::put(repo.store.as_ref(), &repo.url, "gc/lease", sealed)
            .await
            .expect("write the lease");
    });
}

fn has_lease(repo: &Repo) -> bool {
    runtime().block_on(async {
        store_io::get_opt(repo.store.as_ref(), &repo.url, "gc/lease")
            .await
            .expect("read the lease")
            .is_some()
    })
}

/// One GC at a time: a live lease is a refusal naming its holder; an
/// expired one is taken over (and released at the end); of GCs started
/// together, each either runs or is refused by the lease.
#[test]
fn a_second_gc_is_refused_while_the_lease_is_held() {
    let (server, url, mut m, repo) = setup("gclease");
    let url = url.as_str();
    write_point(&m, &repo, &pattern(IMAGE_BYTES, 3));
    m.stop();

    let now = hbrfs::state::now_ns();
    put_lease(&repo, "otherhost pid 42", now + 600_000_000_000);
    let out = gc(&server, url, &["--grace", "0s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a GC ran beside a live lease");
    assert!(
        err.contains("another GC is running") && err.contains("otherhost pid 42"),
        "the refusal names the holder: {err}"
    );
    assert!(has_lease(&repo), "the refused GC left the lease alone");

    put_lease(&repo, "deadhost pid 7", now - 1);
    gc_ok(&server, url, &["--grace", "0s"]);
    assert!(
        !has_lease(&repo),
        "the GC that took over released the lease"
    );

    for _ in 0..3 {
        let outs: Vec<Output> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..3)
                .map(|_| s.spawn(|| gc(&server, url, &["--grace", "0s"])))
                .collect();
            runs.into_iter().map(|r| r.join().expect("a gc")).collect()
        });
        for out in &outs {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() || err.contains("another GC"),
                "a GC failed other than by the lease: {err}"
            );
        }
        assert!(!has_lease(&repo), "the GCs released the lease");
    }
}

/// `--dry-run` reports what retention and the sweep would do and leaves
/// every object as it was; the same run for real then does it: the grid
/// `none` keeps only the newest point.
#[test]
fn dry_run_changes_nothing_and_retention_keeps_the_newest() {
    let (server, url, mut m, repo) = setup("gcdry");
    let url = url.as_str();
    let mut last = Vec::new();
    for round in 0..4 {
        last = pattern(IMAGE_BYTES, 50 + round);
        write_point(&m, &repo, &last);
    }
    m.stop();
    let (series, before_points) = points(&repo);
    assert!(before_points.len() >= 4, "{before_points:?}");
    let newest = *before_points.last().expect("points");
    let before = objects(&server, "gcdry", "repo");

    let dry = gc_ok(
        &server,
        url,
        &["--dry-run", "--grace", "0s", "--keep", "none"],
    );
    assert_eq!(
        objects(&server, "gcdry", "repo"),
        before,
        "dry run changed objects"
    );
    assert_eq!(
        dry["dropped"].as_array().map(Vec::len),
        Some(before_points.len() - 1),
        "{dry:#}"
    );
    assert!(
        json_u64(&dry["young_packs"]) + json_u64(&dry["candidates"]) > 0,
        "{dry:#}"
    );

    let real = gc_ok(&server, url, &["--grace", "0s", "--keep", "none"]);
    assert_eq!(real["dropped"], dry["dropped"]);
    assert_eq!(points(&repo).1, vec![newest]);
    // Grace 0: the candidates of the first run go in the second.
    let second = gc_ok(&server, url, &["--grace", "0s"]);
    assert!(json_u64(&second["deleted"]) > 0, "{second:#}");
    assert_eq!(json_u64(&second["candidates"]), 0, "{second:#}");
    assert!(
        read_image(&repo, &series, newest) == last,
        "the newest point reads back"
    );
}
