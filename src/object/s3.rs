//! Reaching the store: the `s3://BUCKET/PREFIX` address, credentials and
//! endpoint by the AWS conventions, and every request with a deadline.
//!
//! Settings, strongest first: `--s3-endpoint`; the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, and everything
//! else `object_store` reads from `AWS_*`); then the profile
//! (`AWS_PROFILE`, else `default`) in `~/.aws/credentials` and
//! `~/.aws/config` (`AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`).
//! Without a region, `us-east-1`. An `http://` endpoint is allowed (a
//! store on a private network or loopback).
//!
//! Retries and backoff are `object_store`'s [`RetryConfig`]; each request
//! has [`REQUEST_TIMEOUT`] and a connection [`CONNECT_TIMEOUT`], so no
//! wait is unbounded. Errors name the object and say what to check.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig,
};

use crate::block::HashKey;
use crate::error::{Error, IoContext, Result};
use crate::proto::object::RepoConfig;
use crate::state::now_ns;
use serde::{Deserialize, Serialize};

use super::FORMAT_VERSION;
use super::format;

/// The longest one request may take, retries aside: a 16 MiB pack at
/// 1 MB/s, with room.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a TCP (and TLS) connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reader's failing request (5xx, timeouts, refused
/// connections) is retried before its error is reported: a restore, a
/// lazy mount or a GC rides out a store restarting.
pub const READER_RETRY: Duration = Duration::from_secs(30);
/// The same for a primary's uploads: a failed point is shipped again whole
/// (finished packs are not re-sent), and `status` shows the cause within
/// seconds.
pub const WRITER_RETRY: Duration = Duration::from_secs(5);
/// Retries of one request at most: enough that the time, not the count,
/// ends them. A refused connection fails at once, so ten retries of the
/// default backoff were spent in under 2 s: a store restarting failed
/// restores and lazy reads.
const MAX_RETRIES: usize = 1000;
/// The longest wait between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// Requests this process made to object stores: what `status` and the
/// benchmark count (requests, not bytes, are what a store bills and
/// rate-limits).
#[derive(Debug)]
pub struct Requests {
    puts: AtomicU64,
    put_bytes: AtomicU64,
    gets: AtomicU64,
    get_bytes: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
}

/// The counts of [`Requests`], as `status` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// PUT requests that succeeded.
    pub puts: u64,
    /// Bytes of those PUTs.
    pub put_bytes: u64,
    /// GET requests (whole or ranged) that succeeded.
    pub gets: u64,
    /// Bytes of those GETs.
    pub get_bytes: u64,
    /// LIST calls.
    pub lists: u64,
    /// DELETE requests.
    pub deletes: u64,
}

/// This process's requests.
pub static REQUESTS: Requests = Requests {
    puts: AtomicU64::new(0),
    put_bytes: AtomicU64::new(0),
    gets: AtomicU64::new(0),
    get_bytes: AtomicU64::new(0),
    lists: AtomicU64::new(0),
    deletes: AtomicU64::new(0),
};

impl Requests {
    /// The counts so far.
    pub fn report(&self) -> RequestCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestCounts {
            puts: l(&self.puts),
            put_bytes: l(&self.put_bytes),
            gets: l(&self.gets),
            get_bytes: l(&self.get_bytes),
            lists: l(&self.lists),
            deletes: l(&self.deletes),
        }
    }

    fn put(&self, bytes: usize) {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.put_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn got(&self, bytes: usize) {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.get_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts one LIST call.
    pub fn listed(&self) {
        self.lists.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a repository lives: `s3://BUCKET/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The prefix inside it, without slashes at either end ("" for the
    /// bucket's root).
    pub prefix: String,
}

impl S3Url {
    /// Parses `s3://BUCKET[/PREFIX]`; `None` for anything else, so a caller
    /// can tell an object-store address from a host:port or a folder.
    pub fn parse(s: &str) -> Option<Result<S3Url>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_string();
        let bad_bucket = bucket.is_empty()
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if bad_bucket {
            return Some(Err(Error::Usage(format!(
                "{s}: a bucket name is lowercase letters, digits, '-' and '.'"
            ))));
        }
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Some(Err(Error::Usage(format!(
                "{s}: the prefix must not hold empty, '.' or '..' components"
            ))));
        }
        Some(Ok(S3Url {
            bucket: bucket.to_string(),
            prefix,
        }))
    }

    /// The key of `rel` (below the prefix).
    pub fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// The part of `key` below the prefix.
    pub fn rel<'a>(&self, key: &'a Key) -> &'a str {
        let k = key.as_ref();
        if self.prefix.is_empty() {
            return k;
        }
        k.strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or(k)
    }

    /// An error saying the object `rel` holds something we do not accept.
    pub fn damaged(&self, rel: &str, reason: impl Into<String>) -> Error {
        Error::BadState {
            path: PathBuf::from(format!("{self}/{rel}")),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// What the command line adds to the AWS conventions.
#[derive(Clone, Debug)]
pub struct S3Options {
    /// `--s3-endpoint`: a non-AWS store (e.g. `http://127.0.0.1:8333`).
    pub endpoint: Option<String>,
    /// How long a failing request is retried: [`READER_RETRY`] or
    /// [`WRITER_RETRY`].
    pub retry_for: Duration,
}

impl S3Options {
    /// For commands that read (and GC): patient.
    pub fn reader(endpoint: Option<String>) -> S3Options {
        S3Options {
            endpoint,
            retry_for: READER_RETRY,
        }
    }

    /// For a primary's uploads: quick to report.
    pub fn writer(endpoint: Option<String>) -> S3Options {
        S3Options {
            endpoint,
            retry_for: WRITER_RETRY,
        }
    }
}

/// Installs ring as the process's rustls provider once: `reqwest` is
/// built without one, so the binary carries tonic's ring and nothing else.
pub fn ensure_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Already installed (by a test or the daemon) is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// `key = value` pairs of `[section]` in the INI text `text`.
fn ini_section(text: &str, section: &str) -> HashMap<String, String> {
    let mut found = HashMap::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
        } else if inside && let Some((k, v)) = line.split_once('=') {
            found.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    found
}

/// The profile's settings from the shared files (credentials first, then
/// config), keyed as `object_store` reads them from the environment.
fn profile_settings() -> HashMap<String, String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let home = var("HOME").unwrap_or_default();
    let read = |env: &str, file: &str| {
        let path = var(env).unwrap_or_else(|| format!("{home}/.aws/{file}"));
        std::fs::read_to_string(path).unwrap_or_default()
    };
    let config_section = if profile == "default" {
        profile.clone()
    } else {
        format!("profile {profile}")
    };
    let mut settings = ini_section(&read("AWS_CONFIG_FILE", "config"), &config_section);
    settings.extend(ini_section(
        &read("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
        &profile,
    ));
    settings
}

/// A store for `url`: the profile, then the environment over it, then
/// `opts` over both.
pub fn connect(url: &S3Url, opts: &S3Options) -> Result<Arc<dyn ObjectStore>> {
    ensure_crypto_provider();
    let mut builder = AmazonS3Builder::new();
    for (k, v) in profile_settings() {
        if let Ok(key) = k.parse::<AmazonS3ConfigKey>() {
            builder = builder.with_config(key, v);
        }
    }
    let mut region = None;
    for (k, v) in std::env::vars() {
        let k = k.to_ascii_lowercase();
        if !k.starts_with("aws_") || k == "aws_profile" {
            continue;
        }
        if k == "aws_region" || k == "aws_default_region" {
            region.get_or_insert(v.clone());
        }
        if let Ok(key) = k.parse::<AmazonS3ConfigKey>() {
            builder = builder.with_config(key, v);
        }
    }
    if region.is_none()
        && builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .is_none()
    {
        builder = builder.with_region("us-east-1");
    }
    if let Some(endpoint) = &opts.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
    let http = endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    let client = ClientOptions::new()
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_allow_http(http);
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: MAX_BACKOFF,
            base: 2.0,
        },
        max_retries: MAX_RETRIES,
        retry_timeout: opts.retry_for,
    };
    let store = builder
        .with_bucket_name(&url.bucket)
        .with_client_options(client)
        .with_retry(retry)
        .build()
        .map_err(|e| Error::Usage(format!("{url}: {e}")))?;
    Ok(Arc::new(store))
}

/// Our error for `e`, met on the object `key` of `url` while `doing`:
/// names the object and what to check.
pub fn failed(url: &S3Url, doing: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    const CREDENTIALS: &str = " (check the credentials: AWS_ACCESS_KEY_ID and \
        AWS_SECRET_ACCESS_KEY, or the profile's in ~/.aws/credentials, and that they may use \
        this bucket)";
    let text = e.to_string();
    let has = |codes: &[&str]| codes.iter().any(|c| text.contains(c));
    let hint = if matches!(e, E::PermissionDenied { .. } | E::Unauthenticated { .. })
        || has(&[
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        ]) {
        CREDENTIALS
    } else if has(&["NoSuchBucket"]) {
        " (the bucket does not exist: create it first)"
    } else if has(&[
        "error sending request",
        "connection refused",
        "Connection refused",
    ]) {
        " (is the endpoint right, and the store up? --s3-endpoint or AWS_ENDPOINT_URL)"
    } else {
        ""
    };
    Error::Remote(format!("{url}: {doing}: {text}{hint}"))
}

/// Whole object `rel`, or `None` if there is none.
pub async fn get_opt(store: &dyn ObjectStore, url: &S3Url, rel: &str) -> Result<Option<Bytes>> {
    match store.get(&url.key(rel)).await {
        Ok(got) => {
            let bytes =
                (got.bytes().await).map_err(|e| failed(url, &format!("reading {rel}"), e))?;
            REQUESTS.got(bytes.len());
            Ok(Some(bytes))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(failed(url, &format!("reading {rel}"), e)),
    }
}

/// Bytes `range` of object `rel`.
pub async fn get_range(
    store: &dyn ObjectStore,
    url: &S3Url,
    rel: &str,
    range: std::ops::Range<u64>,
) -> Result<Bytes> {
    get_range_opt(store, url, rel, range).await?.ok_or_else(|| {
        Error::Remote(format!(
            "{url}: reading part of {rel}: there is no such object"
        ))
    })
}

/// Bytes `range` of object `rel`, or `None` if there is no such object (a
/// pack GC deleted: the reader looks for another copy).
pub async fn get_range_opt(
    store: &dyn ObjectStore,
    url: &S3Url,
    rel: &str,
    range: std::ops::Range<u64>,
) -> Result<Option<Bytes>> {
    let opts = GetOptions {
        range: Some(GetRange::Bounded(range)),
        ..GetOptions::default()
    };
    let doing = || format!("reading part of {rel}");
    let got = match store.get_opts(&url.key(rel), opts).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(failed(url, &doing(), e)),
    };
    let bytes = got.bytes().await.map_err(|e| failed(url, &doing(), e))?;
    REQUESTS.got(bytes.len());
    Ok(Some(bytes))
}

/// The last `n` bytes of object `rel`, and its length.
pub async fn get_tail(
    store: &dyn ObjectStore,
    url: &S3Url,
    rel: &str,
    n: u64,
) -> Result<(Bytes, u64)> {
    let opts = GetOptions {
        range: Some(GetRange::Suffix(n)),
        ..GetOptions::default()
    };
    let doing = || format!("reading the end of {rel}");
    let got = store
        .get_opts(&url.key(rel), opts)
        .await
        .map_err(|e| failed(url, &doing(), e))?;
    let size = got.meta.size;
    let bytes = got.bytes().await.map_err(|e| failed(url, &doing(), e))?;
    REQUESTS.got(bytes.len());
    Ok((bytes, size))
}

/// Writes `rel` (overwriting).
pub async fn put(store: &dyn ObjectStore, url: &S3Url, rel: &str, bytes: Vec<u8>) -> Result<()> {
    let len = bytes.len();
    store
        .put(&url.key(rel), PutPayload::from(bytes))
        .await
        .map_err(|e| failed(url, &format!("writing {rel}"), e))?;
    REQUESTS.put(len);
    Ok(())
}

/// Writes `rel` only if there is none (`If-None-Match: *`); `false` if
/// one was there.
pub async fn put_create(
    store: &dyn ObjectStore,
    url: &S3Url,
    rel: &str,
    bytes: Vec<u8>,
) -> Result<bool> {
    let opts = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    let len = bytes.len();
    match store
        .put_opts(&url.key(rel), PutPayload::from(bytes), opts)
        .await
    {
        Ok(_) => {
            REQUESTS.put(len);
            Ok(true)
        }
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(failed(url, &format!("creating {rel}"), e)),
    }
}

/// Every key below `rel/` with its size and time, sorted.
pub async fn list(
    store: &dyn ObjectStore,
    url: &S3Url,
    rel: &str,
) -> Result<Vec<object_store::ObjectMeta>> {
    list_after(store, url, rel, None).await
}

/// Every key below `rel/` sorting after `after` (below the prefix too;
/// `None`: all), with its size and time, sorted.
pub async fn list_after(
    store: &dyn ObjectStore,
    url: &S3Url,
    rel: &str,
    after: Option<&str>,
) -> Result<Vec<object_store::ObjectMeta>> {
    use futures_util::TryStreamExt;
    let prefix = url.key(rel);
    REQUESTS.listed();
    let listing = match after {
        Some(a) => store.list_with_offset(Some(&prefix), &url.key(a)),
        None => store.list(Some(&prefix)),
    };
    let mut found: Vec<_> = listing
        .try_collect()
        .await
        .map_err(|e| failed(url, &format!("listing {rel}/"), e))?;
    found.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(found)
}

/// Deletes `rel` (absent is fine).
pub async fn delete(store: &dyn ObjectStore, url: &S3Url, rel: &str) -> Result<()> {
    REQUESTS.deletes.fetch_add(1, Ordering::Relaxed);
    match store.delete(&url.key(rel)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(failed(url, &format!("deleting {rel}"), e)),
    }
}

/// The repository's config; with `create` (a writer's block size), one is
/// made create-only when none is there (two writers making it at once
/// both end with the one that won).
pub async fn load_or_create_config(
    store: &Arc<dyn ObjectStore>,
    url: &S3Url,
    create: Option<u32>,
) -> Result<RepoConfig> {
    if let Some(bytes) = get_opt(store.as_ref(), url, "config").await? {
        return format::open::<RepoConfig>(&bytes, url, "config");
    }
    let Some(block_size) = create else {
        return Err(Error::Usage(format!(
            "{url} holds no hbrfs repository (no {url}/config): nothing was replicated there"
        )));
    };
    let config = RepoConfig {
        version: FORMAT_VERSION,
        repo_id: crate::sys::random_bytes::<16>()
            .at("/dev/urandom")?
            .to_vec(),
        block_size,
        hash_key: HashKey::random().at("/dev/urandom")?.as_bytes().to_vec(),
        created_ns: now_ns(),
    };
    if put_create(store.as_ref(), url, "config", format::seal(&config)?).await? {
        log::info!("{url}: made a new repository ({block_size}-byte blocks)");
        return Ok(config);
    }
    let bytes = get_opt(store.as_ref(), url, "config")
        .await?
        .ok_or_else(|| url.damaged("config", "created by another writer, then gone"))?;
    format::open::<RepoConfig>(&bytes, url, "config")
}
