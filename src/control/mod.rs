//! The daemon's control socket (`BACKING/.hbrfs/control.sock`): one
//! request enum, one typed answer per request. One JSON request per line,
//! one JSON answer per line. The same [`answer`] function serves
//! `hbrfs journal` offline, so what the command shows does not depend on
//! whether a daemon runs.
//!
//! - [`answers`]: the answer types and how each is computed.
//! - `socket`: the listener, one thread per connection, and [`ask`].

pub mod answers;
mod socket;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::datastore::Datastore;
use crate::error::{Error, Result};
use crate::replicate::{ReplStats, Replicator};

pub use crate::replicate::{BlockRun, Difference, ReplicationReport, VerifyReport};
pub use answers::{
    Cut, EpochRow, Epochs, Extent, Extents, FileRow, Files, OpRow, Ops, Role, Stats, Status,
};
pub use socket::{ask, serve};

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

/// The answer to one [`Request`], one variant per request, so the CLI
/// renders typed values instead of looking keys up in JSON.
///
/// On the socket an answer is its bare JSON object (untagged): the
/// request says which variant it is (see `socket::decode`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// To [`Request::Ls`].
    Ls(Files),
    /// To [`Request::Show`].
    Show(Extents),
    /// To [`Request::Epochs`].
    Epochs(Epochs),
    /// To [`Request::Ops`].
    Ops(Ops),
    /// To [`Request::Stats`].
    Stats(Stats),
    /// To [`Request::Cut`].
    Cut(Cut),
    /// To [`Request::Status`].
    Status(Status),
    /// To [`Request::Verify`].
    Verify(VerifyReport),
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

impl Context {
    /// The running daemon's answer to `req`.
    fn respond(&self, req: &Request) -> Result<Answer> {
        let Request::Verify { repair } = *req else {
            let stats = self.replication.as_ref().map(|r| &*r.replicator.stats);
            return answer_with(&self.ds, stats, req, true);
        };
        let r = self.replication.as_ref().ok_or_else(|| {
            Error::Usage("this datastore does not replicate: nothing to verify against".into())
        })?;
        let report = r.runtime.block_on(r.replicator.verify(repair))?;
        Ok(Answer::Verify(report))
    }
}

/// Computes the answer to `req` from an open datastore.
pub fn answer(ds: &Datastore, req: &Request, daemon_running: bool) -> Result<Answer> {
    answer_with(ds, None, req, daemon_running)
}

fn answer_with(
    ds: &Datastore,
    repl: Option<&ReplStats>,
    req: &Request,
    daemon_running: bool,
) -> Result<Answer> {
    Ok(match req {
        Request::Ls => Answer::Ls(Files::of(ds)?),
        Request::Show { path } => Answer::Show(Extents::of(ds, path)?),
        Request::Epochs => Answer::Epochs(Epochs::of(ds)?),
        Request::Ops => Answer::Ops(Ops::of(ds)?),
        Request::Stats => Answer::Stats(Stats::of(ds, daemon_running)),
        Request::Status => Answer::Status(Status::of(ds, repl, daemon_running)),
        Request::Cut => Answer::Cut(Cut::now(ds, daemon_running)?),
        Request::Verify { .. } => {
            return Err(Error::Usage(format!(
                "{}: verify needs the running daemon that replicates this datastore",
                ds.root.display()
            )));
        }
    })
}
