//! Object storage (issue 12): the S3 server the tests run against, driven
//! with the S3 client hbrfs uses (object_store), before any hbrfs code.

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio_stream::StreamExt;

use crate::harness::pattern;
use crate::s3::S3Server;

/// A current-thread runtime for one test's async client calls.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

/// Put, create-only put (the manifest publish), get, ranged get, list and
/// delete work against SeaweedFS, and objects survive a SIGKILL of the
/// server. Also pins down what object_store reports for wrong credentials
/// and a missing bucket, which hbrfs turns into its error messages.
#[test]
fn seaweedfs_serves_s3_and_survives_kill() {
    let mut server = S3Server::start();
    server.create_bucket("hbrfs-test");
    let rt = runtime();
    let store = server.store("hbrfs-test");
    let pack = pattern(3 << 20, 7);
    let manifest = pattern(1000, 8);
    let (pack_key, manifest_key) = (
        ObjectPath::from("repo/packs/p1"),
        ObjectPath::from("repo/points/1"),
    );
    rt.block_on(async {
        store
            .put(&pack_key, PutPayload::from(pack.clone()))
            .await
            .expect("put a pack");
        let create = || PutOptions::from(PutMode::Create);
        store
            .put_opts(&manifest_key, PutPayload::from(manifest.clone()), create())
            .await
            .expect("create-only put of a new key");
        let again = store
            .put_opts(&manifest_key, PutPayload::from(vec![1u8; 10]), create())
            .await;
        assert!(
            matches!(again, Err(object_store::Error::AlreadyExists { .. })),
            "a second create-only put must be refused as AlreadyExists: {again:?}"
        );
        let got = store.get(&pack_key).await.expect("get the pack");
        assert_eq!(got.bytes().await.expect("pack bytes"), pack[..]);
        let range = store
            .get_range(&pack_key, 1_000_000..1_000_100)
            .await
            .expect("ranged get");
        assert_eq!(range, pack[1_000_000..1_000_100]);
        let got = store.get(&manifest_key).await.expect("get the manifest");
        assert_eq!(got.bytes().await.expect("manifest bytes"), manifest[..]);
        let mut listing = store.list(Some(&ObjectPath::from("repo")));
        let mut listed = Vec::new();
        while let Some(meta) = listing.next().await {
            listed.push(meta.expect("list repo/").location.to_string());
        }
        listed.sort();
        assert_eq!(listed, ["repo/packs/p1", "repo/points/1"]);
        store.delete(&pack_key).await.expect("delete the pack");
        let gone = store.get(&pack_key).await;
        assert!(
            matches!(gone, Err(object_store::Error::NotFound { .. })),
            "a deleted object must be NotFound: {gone:?}"
        );
    });

    server.kill();
    server.restart();
    let store = server.store("hbrfs-test");
    rt.block_on(async {
        let got = store
            .get(&manifest_key)
            .await
            .expect("get the manifest after a restart");
        assert_eq!(got.bytes().await.expect("manifest bytes"), manifest[..]);

        let wrong = server.store_as("hbrfs-test", &server.access_key, "not-the-secret");
        let refused = wrong.get(&manifest_key).await;
        assert!(
            matches!(refused, Err(object_store::Error::PermissionDenied { .. })),
            "a wrong secret key must be PermissionDenied (403): {refused:?}"
        );
        let unknown = server.store_as("hbrfs-test", "no-such-key", &server.secret_key);
        let refused = unknown.get(&manifest_key).await;
        assert!(
            matches!(refused, Err(object_store::Error::PermissionDenied { .. })),
            "an unknown access key must be PermissionDenied (403): {refused:?}"
        );
        let missing = server.store("no-such-bucket");
        let put = missing
            .put(&pack_key, PutPayload::from(vec![1u8; 10]))
            .await;
        assert!(
            matches!(put, Err(object_store::Error::NotFound { .. })),
            "a put into a missing bucket must be NotFound (404): {put:?}"
        );
    });
}
