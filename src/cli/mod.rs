//! The `hbrfs` command line: clap definitions and one function per
//! command. Every answer comes typed from [`crate::control`]; how it is
//! shown lives apart from what is asked.
//!
//! - this file: the arguments, [`main`], and the commands that ask the
//!   daemon (or read its state folder offline) and print the answer.
//! - `render`: tables, `--json`, byte and time formatting.
//! - `status`: `hbrfs status` for a primary or a secondary, and `--watch`.
//! - `roles`: `hbrfs promote` and `hbrfs demote`, and what they say.
//! - `objects`: `points ls`, `restore` and `promote` of an object store.

mod gc;
mod objects;
mod points;
mod render;
mod roles;
mod status;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::auth::AuthKey;
use crate::control::{self, Answer, Request};
use crate::daemon::{self, MountOptions, ServeOptions};
use crate::datastore::{Access, Datastore};
use crate::error::{Error, Result};
use crate::ids::BlockSize;
use crate::object::read::{DEFAULT_CACHE_BYTES, PointSource};
use crate::object::{S3Options, S3Url};
use crate::points::Retention;
use crate::replicate::{ReplicateOptions, Target as ReplicaTarget};
use crate::state::StatePaths;

/// Host-based replication for virtual-disk images.
#[derive(Debug, Parser)]
#[command(name = "hbrfs", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount BACKING at MOUNTPOINT as a tracked passthrough (foreground).
    Mount {
        /// The directory holding the images.
        backing: PathBuf,
        /// Where to mount it.
        mountpoint: PathBuf,
        /// Tracking granularity, fixed when the datastore is created
        /// (4K to 1M, a power of two).
        #[arg(long, value_parser = parse_block_size)]
        block_size: Option<BlockSize>,
        /// FUSE worker threads; at least the guests' queue depth for direct IO.
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Close an epoch this often (e.g. 5s, 500ms).
        #[arg(long, value_parser = parse_duration)]
        cut_every: Option<Duration>,
        /// Benchmarks only: pass through without tracking anything.
        #[arg(long, hide = true)]
        no_tracking: bool,
        /// Where points go.
        #[command(flatten)]
        to: TargetArgs,
        /// Recovery point objective, a ceiling: a change is cut into a point
        /// as soon as the link is idle (a few ms after it), and at the
        /// latest this long after it; the replica is never older than this
        /// plus one point's transfer.
        #[arg(long, value_parser = parse_duration, default_value = "5s")]
        rpo: Duration,
        /// How long a point waits for more changes after the first one,
        /// with the link idle (default 5ms; tests use it to batch a burst).
        #[arg(long, hide = true, value_parser = parse_duration)]
        coalesce: Option<Duration>,
        /// zstd level for shipped blocks; -1 by measurement (docs/design.md, "Compression that pays").
        #[arg(long, default_value_t = crate::replicate::DEFAULT_ZSTD_LEVEL, allow_hyphen_values = true)]
        zstd_level: i32,
        /// Cap on replication bandwidth in bytes per second (e.g. 50M).
        #[arg(long, value_parser = parse_bytes, value_name = "BYTES_PER_S")]
        max_rate: Option<u64>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9470).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Run a secondary: receive points into REPLICA_DIR and apply them atomically.
    Serve {
        /// The replica folder (created if missing).
        replica: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// Also mount a read-only mirror of the latest applied point here.
        #[arg(long, value_name = "MOUNTPOINT")]
        mount: Option<PathBuf>,
        /// The pre-shared key primaries must present (made if missing);
        /// default REPLICA/.hbrfs/auth.key.
        #[arg(long, value_name = "FILE")]
        auth_key: Option<PathBuf>,
        /// Let users other than the daemon's into the --mount mirror
        /// (FUSE allow_other); by default only the daemon's user sees it.
        #[arg(long, requires = "mount")]
        mirror_allow_other: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9471).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Create the character and block device nodes points carry. Off
        /// by default: a replica must not grow device nodes a primary
        /// chose; each one left out shows in `status` and the log.
        #[arg(long)]
        allow_devices: bool,
        /// Which points to keep as recovery points: STEP:SPAN tiers (one
        /// point per STEP for SPAN), or `none` to keep only the live
        /// replica (no undo is saved then).
        #[arg(long, value_parser = parse_keep, default_value = Retention::DEFAULT)]
        keep: KeepGrid,
        /// The most undo (bytes, e.g. 20G) the kept points may hold; the
        /// oldest points go first beyond it.
        #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
        keep_space: Option<u64>,
    },
    /// Mount a replica folder read-only (when no secondary serves it).
    MountReplica {
        /// The replica folder.
        replica: PathBuf,
        /// Where to mount it.
        mountpoint: PathBuf,
    },
    /// Mount one recovery point of a replica read-only (foreground), as
    /// it was when applied; `serve` may go on applying meanwhile. Of an
    /// object store (s3://BUCKET/PREFIX), the point is fetched lazily:
    /// only what is read travels.
    MountPoint {
        /// The replica folder, or s3://BUCKET/PREFIX.
        replica: String,
        /// The point: its epoch, its name (`hbrfs points ls`) or `latest`
        /// (of an object store: its SEQ or `latest`).
        point: String,
        /// Where to mount it.
        mountpoint: PathBuf,
        #[command(flatten)]
        s3: ObjectArgs,
    },
    /// Mount a writable sandbox of a recovery point (foreground), to boot
    /// a VM from it while replication goes on; stopping it discards
    /// every change. The point may be an object store's (read lazily).
    TestFailover {
        /// The replica folder, or s3://BUCKET/PREFIX.
        replica: String,
        /// The point: its epoch, its name (`hbrfs points ls`) or `latest`
        /// (of an object store: its SEQ or `latest`).
        #[arg(long, default_value = "latest")]
        point: String,
        /// Where the sandbox keeps what is written (a folder of its own
        /// inside); default REPLICA/.hbrfs/sandboxes (of an object store:
        /// the cache folder's sandboxes/).
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
        /// Where to mount it.
        mountpoint: PathBuf,
        #[command(flatten)]
        s3: ObjectArgs,
    },
    /// Write one point of an object store (s3://BUCKET/PREFIX) into DIR
    /// (absent or empty), whole: a replica folder for `hbrfs serve` or a
    /// backing folder for a new primary, so only differences travel next.
    Restore {
        /// s3://BUCKET/PREFIX.
        source: String,
        /// The point: its SEQ (`hbrfs points ls s3://…`) or `latest`.
        point: String,
        /// Where to write it (renamed into place once complete).
        dir: PathBuf,
        #[command(flatten)]
        s3: ObjectArgs,
    },
    /// Run a primary and a secondary on loopback under DIR: the demo.
    Up {
        /// Where to keep both sides.
        #[arg(default_value = "./hbrfs-demo")]
        dir: PathBuf,
        /// Recovery point objective, a ceiling (see `mount --rpo`).
        #[arg(long, value_parser = parse_duration, default_value = "2s")]
        rpo: Duration,
    },
    /// Replication state of a primary or a secondary.
    Status {
        #[command(flatten)]
        target: Target,
        /// Keep watching: a progress bar while a point (or the baseline)
        /// ships, a line when it is applied. Ctrl-C ends it.
        #[arg(long, conflicts_with = "check")]
        watch: bool,
        /// For monitoring (Nagios-style): print one line and exit 0 (ok),
        /// 1 (warning) or 2 (critical); see README "Monitoring".
        #[arg(long)]
        check: bool,
        /// With --check: the replica age that warns (twice it is critical).
        #[arg(long, value_parser = parse_duration, default_value = "30s", requires = "check")]
        max_age: Duration,
    },
    /// Compare primary and replica by block hashes at the last applied point;
    /// exits non-zero when they differ.
    Verify {
        #[command(flatten)]
        target: Target,
        /// Mark the differing blocks so the next point ships them.
        #[arg(long)]
        repair: bool,
    },
    /// Inspect the change journal (through the running daemon, or offline).
    Journal {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        what: JournalCommand,
    },
    /// The recovery points a replica keeps (`serve --keep`), or an object
    /// store holds: `hbrfs points ls REPLICA|s3://BUCKET/PREFIX` (or the
    /// older `hbrfs points REPLICA ls`).
    Points {
        /// The replica folder (older form: before `ls`).
        #[arg(value_name = "REPLICA")]
        replica: Option<String>,
        #[command(subcommand)]
        what: PointsCommand,
    },
    /// Write one image of a kept point as a qcow2 file: in full, or with
    /// --since only the blocks changed after an older point, over that
    /// point's export as the backing file.
    Export {
        /// The replica folder.
        replica: PathBuf,
        /// The point to export: its epoch, its name, or `latest`.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Export only what changed after this older point ...
        #[arg(long, requires = "backing")]
        since: Option<String>,
        /// ... over its export, stored as the backing file name as given
        /// (a relative name is resolved from OUT's folder).
        #[arg(long, requires = "since", value_name = "FILE")]
        backing: Option<String>,
        /// The image's path in the replica; needed when the point holds
        /// more than one file.
        #[arg(long, value_name = "PATH")]
        image: Option<String>,
        /// The qcow2 file to write (it must not exist).
        out: PathBuf,
    },
    /// Close the open epoch now.
    Cut {
        #[command(flatten)]
        target: Target,
    },
    /// Failover: turn a replica into a primary at its applied point (or at
    /// an older kept point it is rolled back to): the pair's common base.
    /// `hbrfs serve` must not run. Of an object store: restore the point
    /// (--point, default latest) into INTO, the new primary's backing.
    Promote {
        /// The replica folder, or s3://BUCKET/PREFIX.
        replica: String,
        /// Roll the replica back to this kept point first (an epoch or a
        /// point name, as `hbrfs points ls` shows them); of an object
        /// store, the point to restore (SEQ or `latest`).
        #[arg(long, value_name = "POINT")]
        point: Option<String>,
        /// With s3://: the folder to restore into (absent or empty).
        #[arg(long, value_name = "DIR")]
        into: Option<PathBuf>,
        #[command(flatten)]
        s3: ObjectArgs,
    },
    /// Failback: turn an old primary (its daemon stopped) into a secondary
    /// of the new one; what it wrote after its last shipped point becomes
    /// a resync list the new primary ships back over.
    Demote {
        /// The old primary's backing directory.
        backing: PathBuf,
    },
    /// Planned migration, the primary's half: ship a final point, stop the
    /// daemon (stop the guests first) and demote with an empty resync
    /// list. Then on the secondary: stop `hbrfs serve`, `hbrfs promote`.
    Migrate {
        /// The running primary: its backing directory or its mountpoint.
        datastore: PathBuf,
        /// How long to wait for the final point, and for the daemon to stop.
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        timeout: Duration,
    },
    /// Garbage-collect an object store (s3://BUCKET/PREFIX): delete the
    /// packs no live point needs once they have been candidates for the
    /// grace period; with --keep, apply the retention grid to every
    /// datastore's points first. One GC at a time (a lease object).
    Gc {
        /// The repository, s3://BUCKET/PREFIX.
        repo: String,
        /// The store's endpoint when it is not AWS (e.g. http://127.0.0.1:8333).
        #[arg(long, value_name = "URL")]
        s3_endpoint: Option<String>,
        /// Report what would be freed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long an unreferenced pack waits before it goes (and how
        /// old it must be to be a candidate): longer than any upload.
        #[arg(long, value_parser = parse_duration_or_zero, default_value = "24h")]
        grace: Duration,
        /// Apply this retention grid (as `mount --keep`) to every
        /// datastore's points first.
        #[arg(long, value_parser = parse_keep)]
        keep: Option<KeepGrid>,
        /// Where index segments and map chunks are cached between runs;
        /// default $XDG_CACHE_HOME/hbrfs/REPO-ID-gc.
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct Target {
    /// The datastore: its backing directory or its mountpoint.
    #[arg(short, long, default_value = ".", global = true)]
    datastore: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum PointsCommand {
    /// Every kept point, oldest first: epoch, time, files, changed
    /// blocks and the undo kept with it; of an object store, each point's
    /// SEQ, epoch, cut time, files and what it uploaded.
    Ls {
        /// The replica folder, or s3://BUCKET/PREFIX.
        #[arg(value_name = "REPLICA|s3://BUCKET/PREFIX")]
        source: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s3: ObjectArgs,
    },
}

/// What a command reading an object store's points adds to its address.
#[derive(Debug, Default, clap::Args)]
struct ObjectArgs {
    /// The object store's endpoint, for stores other than AWS (e.g.
    /// http://127.0.0.1:8333); default AWS_ENDPOINT_URL, else AWS's.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Which datastore's points (a repository shared by several holds a
    /// series of points per datastore: `points ls` shows them).
    #[arg(long = "datastore", value_name = "ID")]
    series: Option<String>,
    /// Where the local index of the repository is kept; default
    /// $XDG_CACHE_HOME/hbrfs/REPO-ID (else ~/.cache/hbrfs/REPO-ID).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Bytes of blocks a lazy mount keeps in memory (e.g. 1G).
    #[arg(long, value_parser = parse_bytes, value_name = "SIZE")]
    cache_size: Option<u64>,
}

/// The object-store point source `given` names, with `args`; `None` when
/// `given` is a folder (then no object flag may be set).
fn object_source(given: &str, args: ObjectArgs) -> Result<Option<PointSource>> {
    let Some(url) = S3Url::parse(given) else {
        let set = args.s3_endpoint.is_some()
            || args.series.is_some()
            || args.cache_dir.is_some()
            || args.cache_size.is_some();
        if set {
            return Err(Error::Usage(format!(
                "{given} is a folder: --s3-endpoint, --datastore, --cache-dir and --cache-size \
                 go with s3://BUCKET/PREFIX"
            )));
        }
        return Ok(None);
    };
    Ok(Some(PointSource {
        url: url?,
        opts: S3Options::reader(args.s3_endpoint),
        cache_dir: args.cache_dir,
        datastore: args.series,
        cache_bytes: args.cache_size.unwrap_or(DEFAULT_CACHE_BYTES),
    }))
}

#[derive(Debug, Subcommand)]
enum JournalCommand {
    /// Every tracked file with its dirty blocks.
    Ls,
    /// One file's dirty block ranges, merged into extents.
    Show {
        /// Path of the file, relative to the datastore or absolute.
        path: PathBuf,
    },
    /// The epochs: open, closed, merged, shipped.
    Epochs,
    /// The namespace operations in order.
    Ops,
    /// Totals.
    Stats,
}

fn parse_block_size(s: &str) -> std::result::Result<BlockSize, String> {
    let (num, mult) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with('K') => (t[..t.len() - 1].to_string(), 1024),
        t if t.ends_with('M') => (t[..t.len() - 1].to_string(), 1024 * 1024),
        t => (t, 1),
    };
    let bytes: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 64K)"))?;
    BlockSize::new(bytes * mult)
        .ok_or_else(|| format!("{s}: block size must be a power of two from 4K to 1M"))
}

fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().trim_end_matches("/s").trim_end_matches(['B', 'b']);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 50M)"))?;
    if n <= 0.0 {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok((n * mult as f64) as u64)
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d.is_zero() {
        return Err(format!("{:?}: must be positive", s.trim()));
    }
    Ok(d)
}

/// A duration that may be zero (`gc --grace 0s`, for tests and benches).
fn parse_duration_or_zero(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 5s)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        "w" => n * 7.0 * 86400.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m, h, d or w")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?}: out of range"))
}

/// A `--keep` grid: (step, span) tiers; one clap value.
#[derive(Clone, Debug)]
struct KeepGrid(Vec<(Duration, Duration)>);

/// Parses a `--keep` grid: `STEP:SPAN[,STEP:SPAN…]` (e.g. `1s:1h,1m:24h`),
/// or `none`.
fn parse_keep(s: &str) -> std::result::Result<KeepGrid, String> {
    if s.trim() == "none" {
        return Ok(KeepGrid(Vec::new()));
    }
    s.split(',')
        .map(|tier| {
            let (step, span) = tier
                .split_once(':')
                .ok_or_else(|| format!("{tier:?} is not STEP:SPAN (e.g. 1m:24h)"))?;
            let (step, span) = (parse_duration(step)?, parse_duration(span)?);
            if step > span {
                return Err(format!("{tier:?}: the step is longer than the span"));
            }
            Ok((step, span))
        })
        .collect::<std::result::Result<_, _>>()
        .map(KeepGrid)
}

/// Parses arguments, sets up logging and runs; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("hbrfs=info,warn"))
        .init();
    if let Command::Status {
        target,
        check: true,
        max_age,
        ..
    } = &cli.command
    {
        // A monitor reads the exit code: no path out of a check is 1 by
        // accident.
        return status::check(target, *max_age).code();
    }
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("hbrfs: {e}");
            1
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mount {
            backing,
            mountpoint,
            block_size,
            threads,
            cut_every,
            no_tracking,
            to,
            rpo,
            coalesce,
            zstd_level,
            max_rate,
            metrics,
        } => {
            let coalesce = coalesce.unwrap_or(crate::replicate::DEFAULT_COALESCE);
            let timing = Timing { rpo, coalesce };
            let replicate = replicate_options(to, timing, zstd_level, max_rate)?;
            daemon::run_mount(&MountOptions {
                backing,
                mountpoint,
                block_size,
                threads,
                cut_every,
                tracking: !no_tracking,
                replicate,
                metrics,
            })
        }
        Command::Serve {
            replica,
            listen,
            mount,
            auth_key,
            mirror_allow_other,
            metrics,
            allow_devices,
            keep,
            keep_space,
        } => daemon::run_serve(&ServeOptions {
            replica,
            listen,
            mount,
            auth_key,
            mirror_allow_other,
            metrics,
            allow_devices,
            keep: Retention::new(keep.0, keep_space),
        }),
        Command::MountReplica {
            replica,
            mountpoint,
        } => daemon::run_mount_replica(&replica, &mountpoint),
        Command::MountPoint {
            replica,
            point,
            mountpoint,
            s3,
        } => match object_source(&replica, s3)? {
            Some(src) => daemon::run_mount_object_point(&src, &point, &mountpoint),
            None => daemon::run_mount_point(Path::new(&replica), &point, &mountpoint),
        },
        Command::TestFailover {
            replica,
            point,
            scratch,
            mountpoint,
            s3,
        } => match object_source(&replica, s3)? {
            Some(src) => daemon::run_test_failover_object(&src, &point, scratch, &mountpoint),
            None => daemon::run_test_failover(Path::new(&replica), &point, scratch, &mountpoint),
        },
        Command::Restore {
            source,
            point,
            dir,
            s3,
        } => match object_source(&source, s3)? {
            Some(src) => objects::restore(&src, &point, &dir).map(drop),
            None => Err(Error::Usage(format!(
                "{source}: restore reads an object store (s3://BUCKET/PREFIX); a replica's \
                 point is served by `hbrfs mount-point` or promoted by `hbrfs promote`"
            ))),
        },
        Command::Up { dir, rpo } => daemon::run_up(&dir, rpo),
        Command::Status { target, watch, .. } => status::run(&target, watch),
        Command::Verify { target, repair } => verify(&target, repair),
        Command::Journal { target, what } => journal(&target, what),
        Command::Points { replica, what } => match what {
            PointsCommand::Ls { source, json, s3 } => {
                let given = match (replica, source) {
                    (Some(r), None) | (None, Some(r)) => r,
                    (Some(_), Some(_)) => {
                        return Err(Error::Usage(
                            "name the replica once: hbrfs points ls REPLICA".into(),
                        ));
                    }
                    (None, None) => {
                        return Err(Error::Usage(
                            "which points? hbrfs points ls REPLICA|s3://BUCKET/PREFIX".into(),
                        ));
                    }
                };
                match object_source(&given, s3)? {
                    Some(src) => objects::ls(&src, json),
                    None => points::ls(Path::new(&given), json),
                }
            }
        },
        Command::Export {
            replica,
            point,
            since,
            backing,
            image,
            out,
        } => points::export(&replica, &point, since.zip(backing), image.as_deref(), &out),
        Command::Cut { target } => {
            let backing = resolve_datastore(&target.datastore)?;
            ask_and_print(&backing, &Request::Cut, target.json)
        }
        Command::Promote {
            replica,
            point,
            into,
            s3,
        } => match (object_source(&replica, s3)?, into) {
            (Some(src), Some(into)) => {
                objects::promote(&src, point.as_deref().unwrap_or("latest"), &into)
            }
            (Some(_), None) => Err(Error::Usage(
                "promote from an object store restores the point into a folder: \
                 give it with --into DIR"
                    .into(),
            )),
            (None, Some(_)) => Err(Error::Usage(
                "--into goes with s3://BUCKET/PREFIX: a replica is promoted in place".into(),
            )),
            (None, None) => roles::promote(Path::new(&replica), point.as_deref()),
        },
        Command::Demote { backing } => roles::demote(&backing),
        Command::Migrate { datastore, timeout } => roles::migrate(&datastore, timeout),
        Command::Gc {
            repo,
            s3_endpoint,
            dry_run,
            grace,
            keep,
            cache_dir,
            json,
        } => gc::run(gc::GcArgs {
            repo,
            endpoint: s3_endpoint,
            grace,
            dry_run,
            keep: keep.map(|k| Retention::new(k.0, None)),
            cache_dir,
            json,
        }),
    }
}

/// When points are cut: `--rpo` and `--coalesce`.
struct Timing {
    rpo: Duration,
    coalesce: Duration,
}

/// `mount`'s flags saying where points go.
#[derive(clap::Args, Debug)]
struct TargetArgs {
    /// Replicate to the secondary at this address (e.g. 127.0.0.1:7070),
    /// or to an object store: s3://BUCKET/PREFIX (README, "Replicate to
    /// object storage").
    #[arg(long, value_name = "ADDR|s3://BUCKET/PREFIX")]
    replicate_to: Option<String>,
    /// The secondary's pre-shared key (a copy of its REPLICA/.hbrfs/auth.key).
    #[arg(long, value_name = "FILE")]
    auth_key: Option<PathBuf>,
    /// The object store's endpoint, for stores other than AWS (e.g.
    /// http://127.0.0.1:8333); default AWS_ENDPOINT_URL, else AWS's.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// With s3://: which of this datastore's points the repository keeps
    /// (STEP:SPAN tiers as `serve --keep`); default every point. What
    /// they no longer reference goes with `hbrfs gc`.
    #[arg(long, value_parser = parse_keep, value_name = "GRID")]
    keep: Option<KeepGrid>,
}

/// What `mount --replicate-to` asks for: a secondary needs `--auth-key`,
/// an object store takes `--s3-endpoint` and `--keep`.
fn replicate_options(
    to: TargetArgs,
    Timing { rpo, coalesce }: Timing,
    level: i32,
    max_rate: Option<u64>,
) -> Result<Option<ReplicateOptions>> {
    let TargetArgs {
        replicate_to,
        auth_key,
        s3_endpoint,
        keep,
    } = to;
    let target = |target| {
        Ok(Some(ReplicateOptions {
            target,
            rpo,
            coalesce,
            level,
            max_rate,
        }))
    };
    if let Some(url) = replicate_to.as_deref().and_then(S3Url::parse) {
        if auth_key.is_some() {
            return Err(Error::Usage(
                "--auth-key is a secondary's key; an object store takes its credentials from \
                 AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws (README, \"Replicate to object storage\")"
                    .into(),
            ));
        }
        return target(ReplicaTarget::Object {
            url: url?,
            s3: S3Options::writer(s3_endpoint),
            keep: keep.map(|k| Retention::new(k.0, None)),
        });
    }
    if s3_endpoint.is_some() || keep.is_some() {
        return Err(Error::Usage(
            "--s3-endpoint and --keep go with --replicate-to s3://BUCKET/PREFIX".into(),
        ));
    }
    match (replicate_to, auth_key) {
        (Some(addr), Some(key)) => target(ReplicaTarget::Secondary {
            addr,
            key: AuthKey::load(&key)?,
        }),
        (Some(_), None) => Err(Error::Usage(
            "--replicate-to needs --auth-key FILE: a copy of the secondary's key \
             (REPLICA/.hbrfs/auth.key on the secondary)"
                .into(),
        )),
        (None, _) => Ok(None),
    }
}

/// `hbrfs verify`: prints the report, and fails when anything differs so
/// scripts can act on the exit code.
fn verify(target: &Target, repair: bool) -> Result<()> {
    let backing = resolve_datastore(&target.datastore)?;
    let answer = query(&backing, &Request::Verify { repair })?;
    render::print(&answer, target.json);
    let Answer::Verify(report) = answer else {
        return Err(unexpected(&backing));
    };
    let diffs = report.differences.len();
    if diffs == 0 {
        return Ok(());
    }
    let what = if repair {
        "; they are marked and ship with the next point"
    } else {
        ""
    };
    Err(Error::Usage(format!(
        "verify: {diffs} file(s) differ from the replica{what}"
    )))
}

/// `hbrfs journal ...`: the journal subcommand as a control request.
fn journal(target: &Target, what: JournalCommand) -> Result<()> {
    let backing = resolve_datastore(&target.datastore)?;
    let req = match what {
        JournalCommand::Ls => Request::Ls,
        JournalCommand::Show { path } => Request::Show {
            path: relative_to_datastore(&path, &target.datastore, &backing),
        },
        JournalCommand::Epochs => Request::Epochs,
        JournalCommand::Ops => Request::Ops,
        JournalCommand::Stats => Request::Stats,
    };
    ask_and_print(&backing, &req, target.json)
}

/// Asks the datastore at `backing` and prints the answer as table or JSON.
fn ask_and_print(backing: &Path, req: &Request, json: bool) -> Result<()> {
    render::print(&query(backing, req)?, json);
    Ok(())
}

/// The error for an answer of the wrong kind: a daemon of another version.
fn unexpected(backing: &Path) -> Error {
    Error::BadState {
        path: StatePaths::of(backing).socket(),
        reason: "the daemon answered a different request".into(),
    }
}

/// The backing directory for a datastore given as backing dir or mountpoint.
fn resolve_datastore(given: &Path) -> Result<PathBuf> {
    let canon = given
        .canonicalize()
        .map_err(|e| Error::Usage(format!("datastore {}: {e}", given.display())))?;
    let ours = |m: &daemon::MountEntry| {
        m.point == canon
            && m.fstype.starts_with("fuse")
            && StatePaths::of(Path::new(&m.source)).dir.is_dir()
    };
    if let Some(m) = daemon::mounts().into_iter().find(ours) {
        return Ok(PathBuf::from(m.source));
    }
    Ok(canon)
}

/// A file path as the journal names it: relative to the datastore root.
///
/// A path that exists (from the current directory, through the mount or
/// in the backing directory) is made relative to whichever it lies in;
/// anything else is taken as relative to the datastore already.
fn relative_to_datastore(path: &Path, given: &Path, backing: &Path) -> String {
    let abs = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let strip = |base: &Path| {
        base.canonicalize()
            .ok()
            .and_then(|b| abs.strip_prefix(b).ok().map(Path::to_path_buf))
    };
    let rel = strip(given)
        .or_else(|| strip(backing))
        .unwrap_or_else(|| path.to_path_buf());
    rel.to_string_lossy().into_owned()
}

/// Asks the running daemon, or reads the state folder when none runs.
fn query(backing: &Path, req: &Request) -> Result<Answer> {
    let paths = StatePaths::of(backing);
    if let Some(answer) = control::ask(&paths.socket(), req)? {
        return Ok(answer);
    }
    let ds = Datastore::open(backing, Access::Inspect).map_err(|e| match e {
        Error::Journal { .. } => Error::Usage(format!(
            "{e} (is an hbrfs daemon running for {} without answering on {}?)",
            backing.display(),
            paths.socket().display()
        )),
        other => other,
    })?;
    ds.load_for_inspection()?;
    control::answer(&ds, req, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_and_durations() {
        assert_eq!(parse_block_size("64K").unwrap().bytes(), 65536);
        assert_eq!(parse_block_size("1m").unwrap().bytes(), 1 << 20);
        assert!(parse_block_size("3K").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration_or_zero("0s").unwrap(), Duration::ZERO);
        assert!(parse_duration_or_zero("99999999999999999999999w").is_err());
        assert_eq!(parse_bytes("50M").unwrap(), 50 << 20);
        assert_eq!(parse_bytes("1.5KB/s").unwrap(), 1536);
        assert!(parse_bytes("fast").is_err());
    }
}
