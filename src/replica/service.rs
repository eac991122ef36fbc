//! The tonic service a primary ships to: Hello pairs, Ship receives one
//! point per stream (one stream at a time, each on a blocking thread that
//! owns its `Session`), Verify and Status answer from the store. Errors of
//! the parts become statuses here, and only here (`failed`): refusals
//! InvalidArgument, a failed staging or apply Unavailable with its cause
//! (the primary keeps the point and ships it again; the apply is retried
//! from its redo record at the next hello or stream), a hello or verify that cannot be answered
//! FailedPrecondition, a failed task Internal.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{Mutex as AsyncMutex, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::records::Pair;
use super::refused::Refused;
use super::session::Session;
use super::store::{PairError, ReplicaStore};
use super::verify::{self, VerifyError};
use crate::block::HashKey;
use crate::proto::replication::replication_server::{Replication, ReplicationServer};
use crate::proto::replication::{
    HelloReply, HelloRequest, ResyncChunk, ResyncRequest, ShipMessage, ShipReply, StatusReply,
    StatusRequest, VerifyReply, VerifyRequest, ship_message, ship_reply,
};
use crate::wire::{MAX_MESSAGE, NO_PROGRESS_TIMEOUT, PROTOCOL_VERSION};

/// Ends a stream (or a hello retrying an apply) with `refused`. A
/// refusal is InvalidArgument: the primary tells "refused" (never send
/// this point again as it is) from "failed" by the code. A failure of
/// this secondary (staging or applying: a full disk, an IO error) is
/// Unavailable: retryable, with its cause. Either is logged and kept as
/// the secondary's `last_error` for `status` until a point applies.
fn failed(store: &ReplicaStore, refused: Refused) -> Status {
    let cause = refused.cause(&store.root);
    store.stats.failed(&cause);
    store.stats.errors.count(refused.kind());
    if refused.is_retryable() {
        log::error!("{cause}; the point is kept and retried");
        Status::unavailable(cause)
    } else {
        log::error!("refused a point: {cause}");
        Status::invalid_argument(cause)
    }
}

impl From<PairError> for Status {
    /// A hello from another pair, or one the pair record failed for.
    fn from(e: PairError) -> Status {
        Status::failed_precondition(e.to_string())
    }
}

impl From<VerifyError> for Status {
    /// A verify that cannot be answered at this point.
    fn from(e: VerifyError) -> Status {
        Status::failed_precondition(e.to_string())
    }
}

/// The tonic service over one replica folder.
#[derive(Debug, Clone)]
pub struct ReplicaService {
    store: Arc<ReplicaStore>,
    /// One epoch at a time: a second stream waits its turn.
    shipping: Arc<AsyncMutex<()>>,
}

impl ReplicaService {
    /// A service for `store`.
    pub fn new(store: Arc<ReplicaStore>) -> ReplicaService {
        ReplicaService {
            store,
            shipping: Arc::new(AsyncMutex::new(())),
        }
    }

    /// The tonic server wrapper with our message limits.
    pub fn into_server(self) -> ReplicationServer<ReplicaService> {
        ReplicationServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

/// Handles one received message; `Some` reply to send back. A refusal
/// marks the session refused (the commit marks its own, having consumed
/// the session), so that nothing of the point is kept for resuming.
pub(super) fn handle(
    session: &mut Option<Session<'_>>,
    msg: ShipMessage,
) -> Result<Option<ShipReply>, Refused> {
    let result = handle_body(session, msg);
    if let (Err(e), Some(s)) = (&result, session.as_mut()) {
        if !e.is_retryable() {
            s.mark_refused();
        } else if e.out_of_space() {
            s.mark_out_of_space();
        }
    }
    result
}

fn handle_body(
    session: &mut Option<Session<'_>>,
    msg: ShipMessage,
) -> Result<Option<ShipReply>, Refused> {
    let Some(body) = msg.body else {
        return Err(Refused::EmptyMessage);
    };
    let s = session.as_mut().ok_or(Refused::AfterCommit)?;
    Ok(match body {
        ship_message::Body::Begin(b) => {
            s.begin(b)?;
            None
        }
        ship_message::Body::Manifest(m) => s.manifest(m)?.map(|r| ShipReply {
            body: Some(ship_reply::Body::Resumed(r)),
        }),
        ship_message::Body::Offers(o) => Some(ShipReply {
            body: Some(ship_reply::Body::Wants(s.offers(o)?)),
        }),
        ship_message::Body::Blocks(b) => {
            s.blocks(b)?;
            None
        }
        ship_message::Body::Commit(c) => {
            let applied = session.take().expect("checked above").commit(c)?;
            Some(ShipReply {
                body: Some(ship_reply::Body::Applied(applied)),
            })
        }
    })
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ShipReply, Status>> + Send>>;

#[tonic::async_trait]
impl Replication for ReplicaService {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let hello = request.into_inner();
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} offered; this secondary speaks version {PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        let key = HashKey::from_bytes(&hello.hash_key).ok_or_else(|| {
            Status::invalid_argument(format!("hash key of {} bytes", hello.hash_key.len()))
        })?;
        if crate::ids::BlockSize::new(u64::from(hello.block_size)).is_none() {
            return Err(Status::invalid_argument(format!(
                "block size {} out of range",
                hello.block_size
            )));
        }
        let pair = Pair {
            datastore_id: hello.datastore_id,
            block_size: hello.block_size,
            key,
        };
        // Pairing may index a seeded replica folder: disk work, off the runtime.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.accept(pair))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        // A committed point (its redo record written) is applied before
        // the answer, so the primary learns it is (or why it still is
        // not) before it ships: an apply that failed is retried here, and
        // one a stream is still running (its primary was killed after the
        // commit) is waited for. Answering the epoch before it, the
        // primary would cut its next point on that base, which this
        // replica, once at the committed point, refuses: histories that
        // look diverged. The wait is bounded below the primary's hello
        // deadline; past it the primary is told to come back.
        if self.store.apply_pending() {
            let wait = NO_PROGRESS_TIMEOUT / 2;
            let _turn = tokio::time::timeout(wait, self.shipping.lock())
                .await
                .map_err(|_| {
                    Status::unavailable(format!(
                        "a committed point is still being applied after {wait:?}; say hello again later"
                    ))
                })?;
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.finish_pending())
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|refused| failed(&self.store, refused))?;
        }
        self.store.stats.progressed();
        let applied = self.store.applied();
        Ok(Response::new(HelloReply {
            protocol_version: PROTOCOL_VERSION,
            last_applied_epoch: applied.epoch.0,
            last_applied_point: applied.point,
            resync_token: self.store.resync_token(),
        }))
    }

    type ResyncStream = Pin<Box<dyn Stream<Item = Result<ResyncChunk, Status>> + Send>>;

    async fn resync(
        &self,
        request: Request<ResyncRequest>,
    ) -> Result<Response<Self::ResyncStream>, Status> {
        let token = request.into_inner().token;
        if token.is_empty() || token != self.store.resync_token() {
            return Err(Status::failed_precondition(
                "no resync list with this token here (covered by a point applied since?)",
            ));
        }
        let store = self.store.clone();
        let chunks = tokio::task::spawn_blocking(move || store.resync_chunks(&token))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        self.store.stats.progressed();
        let stream = tokio_stream::iter(chunks.into_iter().map(Ok));
        Ok(Response::new(Box::pin(stream) as Self::ResyncStream))
    }

    type ShipStream = ReplyStream;

    async fn ship(
        &self,
        request: Request<Streaming<ShipMessage>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let store = self.store.clone();
        let shipping = self.shipping.clone();
        tokio::spawn(async move {
            let _turn = shipping.lock().await;
            // The session borrows the store; it lives on a blocking thread
            // fed by a bounded channel, so disk work stays off the runtime.
            let (msg_tx, mut msg_rx) = mpsc::channel::<ShipMessage>(4);
            let reply_tx = tx.clone();
            let stats_store = store.clone();
            let worker = tokio::task::spawn_blocking(move || {
                let mut session = match Session::new(&store) {
                    Ok(s) => Some(s),
                    Err(e) => return Err(e),
                };
                while let Some(msg) = msg_rx.blocking_recv() {
                    if let Some(reply) = handle(&mut session, msg)? {
                        if reply_tx.blocking_send(Ok(reply)).is_err() {
                            return Ok(());
                        }
                    }
                }
                Ok(())
            });
            loop {
                // A worker that stopped (a refusal, a full disk) ends the
                // stream at once: the primary may be waiting for an answer
                // to a message already queued, and sends nothing more.
                let next = tokio::select! {
                    next = incoming.message() => next,
                    () = msg_tx.closed() => break,
                };
                match next {
                    Ok(Some(msg)) => {
                        stats_store.stats.progressed();
                        if msg_tx.send(msg).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        log::warn!("ship stream broke: {status}");
                        break;
                    }
                }
            }
            drop(msg_tx);
            match worker.await {
                Ok(Ok(())) => {}
                Ok(Err(refused)) => {
                    let _ = tx.send(Err(failed(&stats_store, refused))).await;
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("apply task failed: {e}"))))
                        .await;
                }
            }
        });
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as ReplyStream
        ))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyReply>, Status> {
        let store = self.store.clone();
        let req = request.into_inner();
        tokio::task::spawn_blocking(move || verify::compare(&store, &req))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let applied = self.store.applied();
        let (epoch, at) = (applied.epoch.0, applied.at_ns);
        let stats = &self.store.stats;
        let counts = stats.counts();
        let (refusals, last_refusal) = stats.refusals();
        Ok(Response::new(StatusReply {
            last_applied_epoch: epoch,
            applied_at_ns: at,
            files: self.store.file_count() as u64,
            bytes_received: counts.bytes_received,
            blocks_have: counts.blocks_have,
            blocks_sent: counts.blocks_sent,
            blocks_resumed: counts.blocks_resumed,
            points_applied: stats.points_applied.load(Ordering::Relaxed),
            refusals,
            last_refusal,
            last_error: stats.last_error(),
        }))
    }
}

/// The connections `listener` accepts, with Nagle's algorithm off. The
/// server's `tcp_nodelay` covers only the listeners it makes itself; on
/// ours every small answer (Wants, Applied, a status) that followed
/// another unacknowledged one waited for the primary's delayed ACK: 40 ms
/// per round trip on Linux (a secondary's `status` took 40-50 ms for
/// 1 ms of work).
fn without_nagle(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        // Only slower with Nagle on: the connection is served all the same.
        if let Err(e) = stream.set_nodelay(true) {
            log::warn!("turning Nagle's algorithm off on a primary's connection: {e}");
        }
        Ok(stream)
    })
}

/// Serves `store` on `listener` over `tls` until `shutdown` resolves.
pub async fn serve_on(
    store: Arc<ReplicaStore>,
    key: crate::auth::AuthKey,
    tls: tonic::transport::ServerTlsConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // Keepalive on the secondary's side too: a primary whose connection
    // stalls is dropped within the same bound, which ends its ship stream
    // and frees the turn for the primary's next connection.
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(crate::wire::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(crate::wire::KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(crate::wire::h2_window())
        .initial_connection_window_size(crate::wire::h2_window())
        .tls_config(tls)?
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ReplicaService::new(store).into_server(),
            crate::auth::RequireKey(key),
        ))
        .serve_with_incoming_shutdown(without_nagle(listener), shutdown)
        .await
}
