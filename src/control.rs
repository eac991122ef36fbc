//! The daemon's control socket (`BACKING/.hbrfs/control.sock`) and the
//! answers it gives. One JSON request per line, one JSON answer per line.
//! The same `answer` function serves `hbrfs journal` offline, so what the
//! command shows does not depend on whether a daemon runs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::datastore::Datastore;
use crate::error::{Error, IoContext, Result};
use crate::journal::{epoch_state_name, op_name};
use crate::replicate::{ReplStats, Replicator};
use crate::tracking::CutOutcome;

/// What a client can ask.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Every tracked file with its dirty counts.
    Ls,
    /// One file's dirty extents.
    Show {
        /// Path relative to the datastore root.
        path: String,
    },
    /// The epochs.
    Epochs,
    /// The namespace operations.
    Ops,
    /// Totals.
    Stats,
    /// Close the open epoch now.
    Cut,
    /// Tracking totals and replication state.
    Status,
    /// Compare primary and replica by block hashes.
    Verify {
        /// Mark differing blocks so the next point ships them.
        repair: bool,
    },
}

/// What the control socket answers from: the datastore and, when the
/// daemon replicates, the replicator's counters.
#[derive(Debug, Clone)]
pub struct Context {
    /// The open datastore.
    pub ds: Arc<Datastore>,
    /// The replicator, when replicating.
    pub replication: Option<Replication>,
}

/// The running replicator and the runtime it runs on, for the requests
/// that need it (status counters, verify).
#[derive(Debug, Clone)]
pub struct Replication {
    /// The replicator.
    pub replicator: Arc<Replicator>,
    /// Its runtime, to run `verify` from the control thread.
    pub runtime: tokio::runtime::Handle,
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Computes the answer to `req` from an open datastore.
pub fn answer(ds: &Datastore, req: &Request, daemon_running: bool) -> Result<Value> {
    answer_with(ds, None, req, daemon_running)
}

fn answer_with(
    ds: &Datastore,
    repl: Option<&ReplStats>,
    req: &Request,
    daemon_running: bool,
) -> Result<Value> {
    let bs = ds.format.block_size.bytes();
    match req {
        Request::Ls => {
            let mut files = Vec::new();
            for (id, rec) in ds.journal.files()? {
                let size = std::fs::metadata(ds.root.join(std::ffi::OsStr::from_bytes(&rec.path)))
                    .map_or(0, |m| m.len());
                let (dirty, counters) = match ds.tracker.file(id) {
                    Some(f) => (
                        f.dirty_extents().iter().map(|r| r.end - r.start).sum(),
                        f.counters(),
                    ),
                    None => (0, Default::default()),
                };
                files.push(json!({
                    "path": lossy(&rec.path),
                    "id": id.0,
                    "size": size,
                    "dirty_blocks": dirty,
                    "dirty_bytes": dirty * bs,
                    "bytes_written": counters.bytes_written,
                    "last_write_ns": counters.last_write_ns,
                }));
            }
            Ok(json!({ "files": files }))
        }
        Request::Show { path } => {
            let wanted = path.trim_start_matches("./").trim_matches('/').as_bytes();
            let (id, rec) = ds
                .journal
                .files()?
                .into_iter()
                .find(|(_, r)| r.path == wanted)
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "{path}: not a tracked file of {}",
                        ds.root.display()
                    ))
                })?;
            let size = std::fs::metadata(ds.root.join(std::ffi::OsStr::from_bytes(&rec.path)))
                .map_or(0, |m| m.len());
            let extents: Vec<Value> = ds
                .tracker
                .file(id)
                .map(|f| f.dirty_extents())
                .unwrap_or_default()
                .into_iter()
                .map(|r| {
                    json!({
                        "first_block": r.start,
                        "blocks": r.end - r.start,
                        "offset": r.start * bs,
                        "length": (r.end - r.start) * bs,
                    })
                })
                .collect();
            Ok(
                json!({ "path": lossy(&rec.path), "id": id.0, "block_size": bs, "size": size, "extents": extents }),
            )
        }
        Request::Epochs => {
            let epochs: Vec<Value> = ds
                .journal
                .epochs()?
                .into_iter()
                .map(|(e, r)| {
                    json!({
                        "epoch": e.0,
                        "state": epoch_state_name(r.state()),
                        "opened_ns": r.opened_ns,
                        "closed_ns": (r.closed_ns != 0).then_some(r.closed_ns),
                        "files": r.files,
                        "blocks": r.blocks,
                        "merged_into": (r.merged_into != 0).then_some(r.merged_into),
                    })
                })
                .collect();
            Ok(json!({ "epochs": epochs }))
        }
        Request::Ops => {
            let ops: Vec<Value> = ds
                .journal
                .ops()?
                .into_iter()
                .map(|(seq, op)| {
                    json!({
                        "seq": seq,
                        "epoch": op.epoch,
                        "op": op_name(op.kind()),
                        "file_id": (op.file_id != 0).then_some(op.file_id),
                        "path": lossy(&op.path),
                        "target": (!op.target.is_empty()).then(|| lossy(&op.target)),
                        "size": op.size,
                        "time_ns": op.time_ns,
                        "found_at_mount": op.found_at_mount,
                    })
                })
                .collect();
            Ok(json!({ "ops": ops }))
        }
        Request::Verify { .. } => Err(Error::Usage(format!(
            "{}: verify needs the running daemon that replicates this datastore",
            ds.root.display()
        ))),
        Request::Status => {
            let mut v = answer_with(ds, repl, &Request::Stats, daemon_running)?;
            v["role"] = json!("primary");
            v["replication"] = repl.map_or(Value::Null, |r| {
                serde_json::to_value(r.report()).unwrap_or_default()
            });
            Ok(v)
        }
        Request::Stats => {
            let files = ds.tracker.all_files();
            let dirty: u64 = files
                .iter()
                .map(|f| {
                    f.dirty_extents()
                        .iter()
                        .map(|r| r.end - r.start)
                        .sum::<u64>()
                })
                .sum();
            let written: u64 = files.iter().map(|f| f.counters().bytes_written).sum();
            let stalls = ds.tracker.cut_stalls();
            Ok(json!({
                "block_size": bs,
                "files": files.len(),
                "dirty_blocks": dirty,
                "dirty_bytes": dirty * bs,
                "bytes_written": written,
                "current_epoch": ds.tracker.current_epoch().0,
                "ops": ds.journal.op_count(),
                "cuts": stalls.0,
                "cut_stall_p99_ns": stalls.1,
                "cut_stall_max_ns": stalls.2,
                "daemon_running": daemon_running,
            }))
        }
        Request::Cut => {
            if !daemon_running {
                return Err(Error::Usage(format!(
                    "{}: no hbrfs daemon is running for this datastore; epochs are cut by the daemon",
                    ds.root.display()
                )));
            }
            let outcome = match ds.tracker.cut()? {
                CutOutcome::Empty => {
                    json!({ "result": "empty", "open_epoch": ds.tracker.current_epoch().0 })
                }
                CutOutcome::Deferred => {
                    json!({ "result": "deferred: the closed epoch is being shipped" })
                }
                CutOutcome::Closed(e) => json!({ "result": "closed", "epoch": e.0 }),
                CutOutcome::Merged { epoch, into } => {
                    json!({ "result": "merged", "epoch": epoch.0, "into": into.0 })
                }
            };
            Ok(outcome)
        }
    }
}

/// Serves the control socket on a thread until the process exits.
pub fn serve(ctx: Context) -> Result<()> {
    let path = ctx.ds.paths.socket();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).at(&path)?;
    std::thread::Builder::new()
        .name("hbrfs-control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new()
                    .name("hbrfs-control-conn".into())
                    .spawn(move || handle(&ctx, stream));
            }
        })
        .at(&path)?;
    Ok(())
}

fn handle(ctx: &Context, stream: UnixStream) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut writer = writer;
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Verify { repair }) => match &ctx.replication {
                Some(r) => match r.runtime.block_on(r.replicator.verify(repair)) {
                    Ok(v) => json!({ "ok": v }),
                    Err(e) => json!({ "error": e.to_string() }),
                },
                None => {
                    json!({ "error": "this datastore does not replicate: nothing to verify against" })
                }
            },
            Ok(req) => match answer_with(
                &ctx.ds,
                ctx.replication.as_ref().map(|r| &*r.replicator.stats),
                &req,
                true,
            ) {
                Ok(v) => json!({ "ok": v }),
                Err(e) => json!({ "error": e.to_string() }),
            },
            Err(e) => json!({ "error": format!("bad request {line:?}: {e}") }),
        };
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

/// Asks the daemon behind `socket`; `Ok(None)` when no daemon listens.
pub fn ask(socket: &Path, req: &Request) -> Result<Option<Value>> {
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(Error::Io {
                path: socket.into(),
                source: e,
            });
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .at(socket)?;
    let mut writer = stream.try_clone().at(socket)?;
    let line = serde_json::to_string(req).map_err(|e| Error::Usage(e.to_string()))?;
    writeln!(writer, "{line}").at(socket)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).at(socket)?;
    let value: Value = serde_json::from_str(&reply).map_err(|e| Error::BadState {
        path: socket.into(),
        reason: format!("daemon sent an unreadable answer: {e}"),
    })?;
    match (value.get("ok"), value.get("error")) {
        (Some(ok), _) => Ok(Some(ok.clone())),
        (_, Some(err)) => Err(Error::Usage(
            err.as_str().unwrap_or("daemon error").to_string(),
        )),
        _ => Err(Error::BadState {
            path: socket.into(),
            reason: "daemon answer has neither ok nor error".into(),
        }),
    }
}
