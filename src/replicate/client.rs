//! The connection to the secondary: the authenticated TLS channel, its
//! deadlines, reading replies off a ship stream, and the one-shot status
//! query `hbrfs status` makes of a running secondary.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::auth::{AuthKey, PresentKey};
use crate::error::{Error, IoContext, Result};
use crate::proto::replication::replication_client::ReplicationClient;
use crate::proto::replication::{ShipReply, StatusRequest, ship_reply};
use crate::wire::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_MESSAGE, STATUS_TIMEOUT};

/// A client that authenticates every request.
pub(super) type Client = ReplicationClient<InterceptedService<Channel, PresentKey>>;

pub(super) use crate::wire::CONNECT_TIMEOUT;

/// Connects to the secondary at `addr` over the pair's TLS (`tls`),
/// presenting `key`, with HTTP/2 keepalive pings on the connection (also
/// while idle), so a connection that stalls is dropped within
/// [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`].
pub(super) async fn connect(addr: &str, key: &AuthKey, timeout: Duration) -> Result<Client> {
    let url = format!("https://{addr}");
    let endpoint = Channel::from_shared(url.clone())
        .map_err(|e| remote(&url, e))?
        .tls_config(crate::tls::client_config(key)?)
        .map_err(|e| remote(&url, e))?
        .connect_timeout(timeout)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(crate::wire::h2_window())
        .initial_connection_window_size(crate::wire::h2_window());
    // The whole attempt (TCP, TLS, HTTP/2) has the deadline, whatever
    // part of it the transport's own timeout covers.
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| {
            Error::Remote(format!(
                "connecting to {addr}: no answer within {} s (the connection stalled)",
                timeout.as_secs()
            ))
        })?
        .map_err(|e| connect_error(addr, &e))?;
    Ok(
        ReplicationClient::with_interceptor(channel, PresentKey(key.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
}

/// A failed connection, with every cause (the useful one, e.g. a refused
/// certificate, is deep in the chain) and what it most likely means.
fn connect_error(addr: &str, e: &tonic::transport::Error) -> Error {
    let mut causes = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    let all = causes.join(": ");
    let hint = if all.contains("certificate") {
        " (the secondary's TLS certificate is not from this pair's key: a wrong key; \
         --auth-key must be a copy of the secondary's REPLICA/.hbrfs/auth.key)"
    } else {
        ""
    };
    Error::Remote(format!("connecting to {addr}: {all}{hint}"))
}

/// A remote failure while doing `what`.
pub(super) fn remote(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Remote(format!("{what}: {e}"))
}

/// Waits for `fut` at most `limit`; past it, fails with an error saying
/// the secondary made no progress for that long while `what`.
pub(super) async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(stalled(limit, what)))
}

/// A wait that ran out: the connection stalled (or the secondary hangs).
pub(super) fn stalled(limit: Duration, what: &str) -> Error {
    remote(
        "secondary",
        format!(
            "no progress from the secondary for {} s {what}: the connection stalled; \
             dropping it to resume on a new one",
            limit.as_secs()
        ),
    )
}

/// The secondary's next reply on a ship stream, to the message `what`,
/// waited for at most `limit`.
pub(super) async fn next_reply(
    replies: &mut tonic::Streaming<ShipReply>,
    what: &str,
    limit: Duration,
) -> Result<ship_reply::Body> {
    let waiting = format!("(waiting for its answer to {what})");
    let message = within(limit, &waiting, async {
        replies.message().await.map_err(ship_status)
    })
    .await?;
    match message {
        Some(ShipReply { body: Some(body) }) => Ok(body),
        Some(_) => Err(remote(
            "secondary",
            format!("answered {what} with an empty reply"),
        )),
        None => Err(remote(
            "secondary",
            format!("closed the stream before answering {what}"),
        )),
    }
}

/// A reply that does not answer `what`.
pub(super) fn unexpected(what: &str, reply: &ship_reply::Body) -> Error {
    remote("secondary", format!("answered {what} with {reply:?}"))
}

/// An error status from the secondary during a ship: a refusal of the
/// point (invalid argument) or a failure, naming a keepalive that timed
/// out (a stalled connection) when that is what closed it.
pub(super) fn ship_status(s: tonic::Status) -> Error {
    if s.code() == tonic::Code::InvalidArgument {
        Error::Refused(format!("by the secondary: {}", s.message()))
    } else if keepalive_timed_out(&s) {
        remote(
            "secondary",
            format!(
                "no answer to HTTP/2 keepalive pings for {} s: the connection stalled ({})",
                KEEPALIVE_TIMEOUT.as_secs(),
                s.message()
            ),
        )
    } else {
        remote("secondary", s.message())
    }
}

/// Whether `s` comes from a keepalive ping that went unanswered.
fn keepalive_timed_out(s: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        if e.to_string().contains("keep-alive timed out") {
            return true;
        }
        source = e.source();
    }
    s.message().contains("keep-alive timed out")
}

/// A running secondary's counters, as `hbrfs status` shows them under
/// `counters`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondaryCounters {
    /// The newest epoch the secondary applied.
    pub last_applied_epoch: u64,
    /// Files in the replica.
    pub files: u64,
    /// Bytes received on ship streams.
    pub bytes_received: u64,
    /// Offered blocks it already held.
    pub blocks_have: u64,
    /// Blocks it asked for and received.
    pub blocks_sent: u64,
    /// Blocks kept from broken streams and not sent again.
    pub blocks_resumed: u64,
    /// Points applied since the secondary started.
    pub points_applied: u64,
    /// Things it refused to do in points it applied (device nodes without
    /// `--allow-devices`, owners it may not set), since it started.
    pub refusals: u64,
    /// The last of them, empty when none.
    pub last_refusal: String,
    /// Why its last stream failed or was refused, empty once a point
    /// applied since (the primary's `last_error` shows the same cause).
    pub last_error: String,
}

/// Asks a running secondary for its counters (for `hbrfs status`).
pub fn remote_status(addr: &str, key: &AuthKey) -> Result<SecondaryCounters> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .at("tokio runtime")?;
    rt.block_on(async {
        let mut client = connect(addr, key, STATUS_TIMEOUT).await?;
        let what = "(waiting for its answer to status)";
        let s = within(STATUS_TIMEOUT, what, async {
            client
                .status(StatusRequest {})
                .await
                .map_err(|e| remote(addr, e.message()))
        })
        .await?
        .into_inner();
        Ok(SecondaryCounters {
            last_applied_epoch: s.last_applied_epoch,
            files: s.files,
            bytes_received: s.bytes_received,
            blocks_have: s.blocks_have,
            blocks_sent: s.blocks_sent,
            blocks_resumed: s.blocks_resumed,
            points_applied: s.points_applied,
            refusals: s.refusals,
            last_refusal: s.last_refusal,
            last_error: s.last_error,
        })
    })
}

/// Runs blocking tracking, journal or disk work off the async workers
/// (`what` names it if the task dies).
pub(super) async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| remote(what, e))?
}
