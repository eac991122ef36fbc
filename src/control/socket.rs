//! The socket itself: a listener thread, one thread per connection, and
//! [`ask`] for clients. Each line carries a [`Request`]; each reply line is
//! `{"ok": ANSWER}` or `{"error": MESSAGE}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Answer, Context, Request};
use crate::error::{Error, IoContext, Result};

/// One reply line: externally tagged, so `{"ok": ..}` or `{"error": ..}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply<T> {
    Ok(T),
    Error(String),
}

/// Serves the control socket on a thread until the process exits.
pub fn serve(ctx: Context) -> Result<()> {
    let path = ctx.ds.paths.socket();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).at(&path)?;
    // Only the daemon's user may connect (the daemon runs with umask 0).
    crate::state::set_private(&path, crate::state::STATE_FILE_MODE)?;
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
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match ctx.respond(&req) {
                Ok(answer) => Reply::Ok(answer),
                Err(e) => Reply::Error(e.to_string()),
            },
            Err(e) => Reply::Error(format!("bad request {line:?}: {e}")),
        };
        let Ok(text) = serde_json::to_string(&reply) else {
            return;
        };
        if writeln!(writer, "{text}").is_err() {
            return;
        }
    }
}

/// Asks the daemon behind `socket`; `Ok(None)` when no daemon listens.
pub fn ask(socket: &Path, req: &Request) -> Result<Option<Answer>> {
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
    let unreadable = |e: serde_json::Error| Error::BadState {
        path: socket.into(),
        reason: format!("daemon sent an unreadable answer: {e}"),
    };
    match decode(req, &reply).map_err(unreadable)? {
        Reply::Ok(answer) => Ok(Some(answer)),
        Reply::Error(e) => Err(Error::Usage(e)),
    }
}

/// Reads the reply line to `req`: the request, not the JSON, decides the
/// answer's variant (several answers share field names). One pass
/// straight into the typed answer, no `serde_json::Value` tree between:
/// building that tree was most of what `journal ls` of 10,000 files cost
/// the client.
fn decode(req: &Request, line: &str) -> serde_json::Result<Reply<Answer>> {
    fn typed<T: DeserializeOwned>(
        line: &str,
        variant: fn(T) -> Answer,
    ) -> serde_json::Result<Reply<Answer>> {
        Ok(match serde_json::from_str(line)? {
            Reply::Ok(v) => Reply::Ok(variant(v)),
            Reply::Error(e) => Reply::Error(e),
        })
    }
    match req {
        Request::Ls => typed(line, Answer::Ls),
        Request::Show { .. } => typed(line, Answer::Show),
        Request::Epochs => typed(line, Answer::Epochs),
        Request::Ops => typed(line, Answer::Ops),
        Request::Stats => typed(line, Answer::Stats),
        Request::Cut => typed(line, Answer::Cut),
        Request::Status => typed(line, Answer::Status),
        Request::Verify { .. } => typed(line, Answer::Verify),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::control::{BlockRun, Cut, Difference, EpochRow, Epochs, Role, Stats, Status};
    use crate::control::{VerifyReport, answers::Extent, answers::Extents};

    fn stats() -> Stats {
        Stats {
            block_size: 65536,
            files: 2,
            dirty_blocks: 6,
            dirty_bytes: 393_216,
            bytes_written: 339_968,
            current_epoch: 1,
            ops: 5,
            cuts: 1,
            cut_stall_p99_ns: 17,
            cut_stall_max_ns: 18,
            daemon_running: true,
        }
    }

    /// Each answer, as the daemon writes it and as `ask` reads it back.
    fn round_trip(req: &Request, answer: Answer) -> Value {
        let line = serde_json::to_string(&Reply::Ok(answer.clone())).unwrap();
        let Reply::Ok(v) = serde_json::from_str::<Reply<Value>>(&line).unwrap() else {
            panic!("not ok: {line}");
        };
        let Reply::Ok(decoded) = decode(req, &line).unwrap() else {
            panic!("not ok: {line}");
        };
        assert_eq!(decoded, answer);
        v
    }

    #[test]
    fn status_keeps_its_json_shape() {
        let v = round_trip(&Request::Status, {
            Answer::Status(Status {
                stats: stats(),
                role: Role::Primary,
                replication: None,
            })
        });
        assert_eq!(v["role"], "primary");
        assert_eq!(v["replication"], Value::Null);
        assert_eq!(v["dirty_bytes"], 393_216);
        assert_eq!(v.as_object().unwrap().len(), 13);
    }

    #[test]
    fn cut_keeps_its_json_shape() {
        let cuts = [
            (
                Cut::Empty { open_epoch: 3 },
                json!({"result": "empty", "open_epoch": 3}),
            ),
            (
                Cut::Deferred,
                json!({"result": "deferred: the closed epoch is being shipped"}),
            ),
            (
                Cut::Closed { epoch: 1 },
                json!({"result": "closed", "epoch": 1}),
            ),
            (
                Cut::Merged { epoch: 4, into: 2 },
                json!({"result": "merged", "epoch": 4, "into": 2}),
            ),
        ];
        for (cut, want) in cuts {
            assert_eq!(round_trip(&Request::Cut, Answer::Cut(cut)), want);
        }
    }

    #[test]
    fn journal_answers_keep_their_json_shape() {
        let epochs = Epochs {
            epochs: vec![EpochRow {
                epoch: 2,
                state: "open".into(),
                opened_ns: 5,
                closed_ns: None,
                files: 0,
                blocks: 0,
                merged_into: None,
            }],
        };
        let v = round_trip(&Request::Epochs, Answer::Epochs(epochs));
        assert_eq!(v["epochs"][0]["closed_ns"], Value::Null);
        assert_eq!(v["epochs"][0]["merged_into"], Value::Null);

        let show = Request::Show { path: "a".into() };
        let extents = Extents {
            path: "a".into(),
            id: 1,
            block_size: 4096,
            size: 8192,
            extents: vec![Extent {
                first_block: 1,
                blocks: 1,
                offset: 4096,
                length: 4096,
            }],
        };
        let v = round_trip(&show, Answer::Show(extents));
        assert_eq!(v["extents"][0]["offset"], 4096);
    }

    #[test]
    fn verify_keeps_its_json_shape() {
        let report = VerifyReport {
            epoch: 3,
            blocks_checked: 10,
            blocks_dirty_skipped: 1,
            differences: vec![Difference {
                path: "a".into(),
                file_id: 1,
                blocks: 2,
                replica_size: None,
                size: 8192,
                ranges: vec![BlockRun {
                    first_block: 0,
                    blocks: 2,
                }],
            }],
            repaired: false,
        };
        let v = round_trip(&Request::Verify { repair: false }, Answer::Verify(report));
        assert_eq!(v["differences"][0]["replica_size"], Value::Null);
    }

    #[test]
    fn errors_travel_as_error() {
        let line = serde_json::to_string(&Reply::<Answer>::Error("no".into())).unwrap();
        assert_eq!(line, r#"{"error":"no"}"#);
    }
}
