//! The `hbrfs` command line: clap definitions, and rendering of the
//! control answers as tables (default) or JSON (`--json`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::auth::AuthKey;
use crate::control::{self, Request};
use crate::daemon::{self, MountOptions, ServeOptions};
use crate::datastore::{Access, Datastore};
use crate::error::{Error, Result};
use crate::ids::BlockSize;
use crate::replica::Applied;
use crate::replicate::ReplicateOptions;
use crate::state::{ReplicaPaths, STATE_DIR, StatePaths};

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
        /// Replicate to the secondary at this address (e.g. 127.0.0.1:7070).
        #[arg(long, value_name = "ADDR")]
        replicate_to: Option<String>,
        /// Recovery point objective: cut and ship a point this often.
        #[arg(long, value_parser = parse_duration, default_value = "5s")]
        rpo: Duration,
        /// zstd level for shipped blocks (see PERF-NOTES: 1 gives 2.7x at ~500 MB/s per core).
        #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
        zstd_level: i32,
        /// Cap on replication bandwidth in bytes per second (e.g. 50M).
        #[arg(long, value_parser = parse_rate, value_name = "BYTES_PER_S")]
        max_rate: Option<u64>,
        /// The secondary's pre-shared key (a copy of its REPLICA/.hbrfs/auth.key).
        #[arg(long, value_name = "FILE")]
        auth_key: Option<PathBuf>,
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
    },
    /// Mount a replica folder read-only (when no secondary serves it).
    MountReplica {
        /// The replica folder.
        replica: PathBuf,
        /// Where to mount it.
        mountpoint: PathBuf,
    },
    /// Run a primary and a secondary on loopback under DIR: the demo.
    Up {
        /// Where to keep both sides.
        #[arg(default_value = "./hbrfs-demo")]
        dir: PathBuf,
        /// Recovery point objective.
        #[arg(long, value_parser = parse_duration, default_value = "2s")]
        rpo: Duration,
    },
    /// Replication state of a primary or a secondary.
    Status {
        #[command(flatten)]
        target: Target,
        /// Keep watching: a progress bar while a point (or the baseline)
        /// ships, a line when it is applied. Ctrl-C ends it.
        #[arg(long)]
        watch: bool,
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
    /// Close the open epoch now.
    Cut {
        #[command(flatten)]
        target: Target,
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

fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().trim_end_matches("/s").trim_end_matches(['B', 'b']);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (e.g. 50M)"))?;
    if n <= 0.0 {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok((n * mult as f64) as u64)
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
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
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    if secs <= 0.0 {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses arguments, sets up logging and runs; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("hbrfs=info,warn"))
        .init();
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
            replicate_to,
            rpo,
            zstd_level,
            max_rate,
            auth_key,
        } => {
            let replicate = match (replicate_to, auth_key) {
                (Some(addr), Some(key)) => Some(ReplicateOptions {
                    addr,
                    rpo,
                    level: zstd_level,
                    key: AuthKey::load(&key)?,
                    max_rate,
                }),
                (Some(_), None) => {
                    return Err(Error::Usage(
                        "--replicate-to needs --auth-key FILE: a copy of the secondary's key \
                         (REPLICA/.hbrfs/auth.key on the secondary)"
                            .into(),
                    ));
                }
                (None, _) => None,
            };
            daemon::run_mount(&MountOptions {
                backing,
                mountpoint,
                block_size,
                threads,
                cut_every,
                tracking: !no_tracking,
                replicate,
            })
        }
        Command::Serve {
            replica,
            listen,
            mount,
            auth_key,
        } => daemon::run_serve(&ServeOptions {
            replica,
            listen,
            mount,
            auth_key,
        }),
        Command::MountReplica {
            replica,
            mountpoint,
        } => daemon::run_mount_replica(&replica, &mountpoint),
        Command::Up { dir, rpo } => daemon::run_up(&dir, rpo),
        Command::Status { target, watch } => {
            let dir = resolve_datastore(&target.datastore)?;
            let primary = StatePaths::of(&dir).format().exists();
            if watch && primary {
                return watch_primary(&dir);
            }
            let value = if primary {
                query(&dir, &Request::Status)?
            } else {
                secondary_status(&dir)?
            };
            print(&Request::Status, &value, target.json);
            Ok(())
        }
        Command::Verify { target, repair } => {
            let backing = resolve_datastore(&target.datastore)?;
            let req = Request::Verify { repair };
            let v = query(&backing, &req)?;
            print(&req, &v, target.json);
            let diffs = v["differences"].as_array().map_or(0, Vec::len);
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
        Command::Journal { target, what } => {
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
            let value = query(&backing, &req)?;
            print(&req, &value, target.json);
            Ok(())
        }
        Command::Cut { target } => {
            let backing = resolve_datastore(&target.datastore)?;
            let value = query(&backing, &Request::Cut)?;
            print(&Request::Cut, &value, target.json);
            Ok(())
        }
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
fn query(backing: &Path, req: &Request) -> Result<Value> {
    let paths = StatePaths::of(backing);
    if let Some(v) = control::ask(&paths.socket(), req)? {
        return Ok(v);
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

fn print(req: &Request, v: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let s = |v: &Value, k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let rows: Vec<Vec<String>> = match req {
        Request::Ls => table_rows(
            &v["files"],
            &[
                "PATH",
                "ID",
                "SIZE",
                "DIRTY BLOCKS",
                "DIRTY",
                "WRITTEN",
                "LAST WRITE",
            ],
            |f| {
                vec![
                    s(f, "path"),
                    s(f, "id"),
                    bytes(u(f, "size")),
                    s(f, "dirty_blocks"),
                    bytes(u(f, "dirty_bytes")),
                    bytes(u(f, "bytes_written")),
                    time(u(f, "last_write_ns")),
                ]
            },
        ),
        Request::Show { .. } => {
            println!(
                "{} (file id {}): {} , block size {}",
                s(v, "path"),
                s(v, "id"),
                bytes(u(v, "size")),
                bytes(u(v, "block_size"))
            );
            table_rows(
                &v["extents"],
                &["FIRST BLOCK", "BLOCKS", "OFFSET", "LENGTH"],
                |e| {
                    vec![
                        s(e, "first_block"),
                        s(e, "blocks"),
                        s(e, "offset"),
                        bytes(u(e, "length")),
                    ]
                },
            )
        }
        Request::Epochs => table_rows(
            &v["epochs"],
            &[
                "EPOCH",
                "STATE",
                "OPENED",
                "CLOSED",
                "FILES",
                "BLOCKS",
                "MERGED INTO",
            ],
            |e| {
                vec![
                    s(e, "epoch"),
                    s(e, "state"),
                    time(u(e, "opened_ns")),
                    time(u(e, "closed_ns")),
                    s(e, "files"),
                    s(e, "blocks"),
                    s(e, "merged_into"),
                ]
            },
        ),
        Request::Ops => table_rows(
            &v["ops"],
            &[
                "SEQ", "EPOCH", "OP", "PATH", "TARGET", "SIZE", "TIME", "SEEN",
            ],
            |o| {
                let seen = if o["found_at_mount"].as_bool() == Some(true) {
                    "at mount"
                } else {
                    "live"
                };
                vec![
                    s(o, "seq"),
                    s(o, "epoch"),
                    s(o, "op"),
                    s(o, "path"),
                    s(o, "target"),
                    s(o, "size"),
                    time(u(o, "time_ns")),
                    seen.into(),
                ]
            },
        ),
        Request::Verify { .. } => {
            println!(
                "epoch {}: {} blocks compared, {} dirty (they ship with the next point)",
                s(v, "epoch"),
                s(v, "blocks_checked"),
                s(v, "blocks_dirty_skipped")
            );
            let mut rows = vec![vec![
                "PATH".to_string(),
                "FIRST BLOCK".into(),
                "BLOCKS".into(),
            ]];
            for d in v["differences"].as_array().into_iter().flatten() {
                for r in d["ranges"].as_array().into_iter().flatten() {
                    rows.push(vec![s(d, "path"), s(r, "first_block"), s(r, "blocks")]);
                }
            }
            rows
        }
        Request::Stats | Request::Cut | Request::Status => {
            print_fields("", v);
            return;
        }
    };
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// Prints an object's fields one a line, nested objects indented.
fn print_fields(indent: &str, v: &Value) {
    let Value::Object(map) = v else { return };
    for (k, val) in map {
        match val {
            Value::Object(_) => {
                println!("{indent}{k}:");
                print_fields(&format!("{indent}  "), val);
            }
            Value::String(s) => println!("{indent}{k:<24} {s}"),
            other => println!("{indent}{k:<24} {other}"),
        }
    }
}

/// Follows a primary's replication: a progress bar per point shipped.
fn watch_primary(dir: &Path) -> Result<()> {
    let style =
        indicatif::ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} blocks  {msg}")
            .expect("literal template")
            .progress_chars("=> ");
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut last_applied = None;
    let mut last_error = String::new();
    loop {
        let v = query(dir, &Request::Status)?;
        let r = &v["replication"];
        if r.is_null() {
            return Err(Error::Usage(format!(
                "{}: this datastore does not replicate",
                dir.display()
            )));
        }
        let applied = r["last_applied_epoch"].as_u64();
        let p = &r["shipping"];
        if p.is_null() {
            if let Some(b) = bar.take() {
                b.finish();
            }
            if applied != last_applied {
                let age = r["replica_age_ms"]
                    .as_u64()
                    .map_or("-".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
                println!(
                    "point {} applied at the secondary (replica age {age})",
                    applied.unwrap_or(0)
                );
            }
        } else {
            let total = p["blocks_total"].as_u64().unwrap_or(0);
            let b = bar.get_or_insert_with(|| {
                let b = indicatif::ProgressBar::new(total).with_style(style.clone());
                let what = if p["baseline"].as_bool() == Some(true) {
                    "baseline"
                } else {
                    "point"
                };
                b.set_prefix(what);
                b
            });
            b.set_length(total);
            b.set_position(p["blocks_done"].as_u64().unwrap_or(0));
            let rate = p["wire_bytes_per_s"].as_f64().unwrap_or(0.0) as u64;
            let eta = p["eta_s"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.0} s"));
            b.set_message(format!("{}/s  ETA {eta}", bytes(rate)));
        }
        last_applied = applied;
        let error = r["last_error"].as_str().unwrap_or("").to_string();
        if r["connected"] == Value::Bool(false) && !error.is_empty() && error != last_error {
            eprintln!("not connected: {error}");
        }
        last_error = error;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A secondary's status: its applied point, and its counters when serving.
fn secondary_status(dir: &Path) -> Result<Value> {
    let paths = ReplicaPaths::of(dir);
    if !paths.dir.is_dir() {
        return Err(Error::Usage(format!(
            "{}: neither an hbrfs datastore nor a replica (no {STATE_DIR} folder)",
            dir.display(),
        )));
    }
    let Applied {
        epoch: crate::ids::Epoch(epoch),
        at_ns: at,
        ..
    } = Applied::read(&paths)?;
    let mut v = serde_json::json!({
        "role": "secondary",
        "replica": dir.display().to_string(),
        "consistent_point": if epoch == 0 { "none yet: the first point (the baseline) has not been applied" } else { "yes" },
        "last_applied_epoch": epoch,
        "applied_at_ns": at,
        "serving": false,
    });
    if let Ok(addr) = std::fs::read_to_string(paths.listen()) {
        v["listen"] = Value::String(addr.trim().to_string());
        let live = AuthKey::load(&daemon::default_key_path(dir))
            .and_then(|key| crate::replicate::remote_status(addr.trim(), &key));
        if let Ok(live) = live {
            v["serving"] = Value::Bool(true);
            v["counters"] = live;
        }
    }
    Ok(v)
}

fn table_rows(
    items: &Value,
    header: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) -> Vec<Vec<String>> {
    let mut rows = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    if let Value::Array(items) = items {
        rows.extend(items.iter().map(row));
    }
    rows
}

/// Bytes in binary units, for tables.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A unix-nanosecond time as UTC `YYYY-MM-DD HH:MM:SS`, `-` for none.
fn time(ns: u64) -> String {
    if ns == 0 {
        return "-".into();
    }
    let secs = ns / 1_000_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_rate("50M").unwrap(), 50 << 20);
        assert_eq!(parse_rate("1.5KB/s").unwrap(), 1536);
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn formats_times_in_utc() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_700_000_000 * 1_000_000_000), "2023-11-14 22:13:20");
    }
}
