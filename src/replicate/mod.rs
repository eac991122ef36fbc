//! The primary's replicator: it cuts a point, offers a keyed hash per dirty
//! block, sends zstd-compressed only what the secondary wants (zero blocks
//! as markers), commits, and forgets the point only once the secondary
//! says it is applied. A point whose stream breaks is held and shipped
//! again unchanged after the reconnect, resuming where the secondary
//! stopped; a point the secondary refuses is folded into the next cut.
//! Either way the replica only ever moves between consistent points.
//!
//! # When a point is cut
//!
//! `--rpo` is a ceiling, not a period. One point is in flight at a time;
//! with the link idle, the first change after a cut (a file's first write
//! or resize of the epoch, or any namespace operation: create, rename,
//! unlink, setattr...) wakes the replicator through
//! [`crate::tracking::Dirtied`], which waits [`DEFAULT_COALESCE`] (5 ms;
//! `--coalesce`) for the rest of the burst and cuts: a change reaches the
//! secondary in about a round trip plus its transfer. A change made while a
//! point ships leaves a permit, so the next point is cut as soon as that
//! one is applied: under sustained writes points grow instead of queueing.
//! With nothing waking it, the replicator still ticks every RPO (an empty
//! tick costs one hold of the cut gate) so the replica age in `status`
//! drops to zero when nothing changed. While disconnected it only
//! reconnects after its backoff (250 ms doubling to 5 s): changes never
//! make it retry sooner.
//!
//! # Layout
//!
//! - [`client`]: connecting (TLS, key, deadlines), reading replies, and the
//!   status query of a running secondary.
//! - [`point`]: a point's life (cut → pending → shipping → applied), its one
//!   owner and the only writer of the point record in the journal.
//! - `meta`: which paths' metadata a point changed, read from the backing.
//! - `resync`: failback: a demoted secondary's resync list, checked and
//!   marked into tracking.
//! - `ship`: one point over one stream: Begin, offers, wants, blocks, Commit.
//! - `verify`: `hbrfs verify`, the clean blocks against the replica.
//! - [`stats`]: the counters and their typed report for `hbrfs status`.

pub mod client;
mod meta;
mod object;
pub mod point;
mod resync;
mod ship;
pub mod stats;
pub mod verify;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::AuthKey;
use crate::block::{self, HashKey};
use crate::datastore::Datastore;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::ids::Epoch;
use crate::object::{S3Options, S3Url};
use crate::points::Retention;
use crate::proto::replication::HelloRequest;
use crate::state::{now_ns, write_durably};
use crate::throttle::Throttle;
use crate::wire::{NO_PROGRESS_TIMEOUT, PROTOCOL_VERSION};

pub use client::{SecondaryCounters, remote_status};
pub use stats::{ReplStats, ReplicationReport, ShipProgress};
pub use verify::{BlockRun, Difference, VerifyReport};

use client::{CONNECT_TIMEOUT, Client, remote};
use object::ObjectLink;
use point::Points;

/// A connection to where points go.
#[derive(Debug)]
enum Link {
    /// A secondary's gRPC client.
    Secondary(Client),
    /// An object-store repository.
    Object(Box<ObjectLink>),
}

/// The default zstd level of shipped blocks (`--zstd-level`): -1, chosen
/// by measurement (`docs/design.md`, "Compression that pays": 93% of level
/// 1's saving on the wire for 12% less primary CPU).
pub const DEFAULT_ZSTD_LEVEL: i32 = -1;

/// Where points go.
#[derive(Clone, Debug)]
pub enum Target {
    /// A secondary (`hbrfs serve`), e.g. `127.0.0.1:7070`, and the key it
    /// expects.
    Secondary {
        /// Its address.
        addr: String,
        /// Its pre-shared key.
        key: AuthKey,
    },
    /// An object-store repository (`s3://BUCKET/PREFIX`).
    Object {
        /// Where it is.
        url: S3Url,
        /// Endpoint and the rest of the command line's settings.
        s3: S3Options,
        /// Which points of this datastore's series stay (`--keep`);
        /// `None` keeps every point.
        keep: Option<Retention>,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Secondary { addr, .. } => write!(f, "secondary {addr}"),
            Target::Object { url, .. } => write!(f, "{url}"),
        }
    }
}

/// How to replicate.
#[derive(Clone, Debug)]
pub struct ReplicateOptions {
    /// Where points go.
    pub target: Target,
    /// The ceiling: the longest a change waits before a point is cut, when
    /// nothing woke the replicator sooner (see the module doc).
    pub rpo: Duration,
    /// How long a change waits for the ones following it (a guest's burst)
    /// before a point is cut with the link idle.
    pub coalesce: Duration,
    /// zstd level for blocks.
    pub level: i32,
    /// Cap on replication bandwidth, bytes per second.
    pub max_rate: Option<u64>,
}

/// The first wait before connecting again after a failure; it doubles
/// with every failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// The longest wait before connecting again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The default of `--coalesce`, measured (docs/design.md, "When a point is
/// cut"): long enough that one guest flush lands in one point, short
/// against a round trip of a real link.
pub const DEFAULT_COALESCE: Duration = Duration::from_millis(5);

/// The pair's hash key, made once and kept in the state folder.
fn pair_key(ds: &Datastore) -> Result<HashKey> {
    let path = ds.paths.pair_key();
    if let Ok(bytes) = std::fs::read(&path) {
        return HashKey::from_bytes(&bytes).ok_or_else(|| Error::BadState {
            path: path.clone(),
            reason: format!(
                "hash key of {} bytes, expected {}",
                bytes.len(),
                block::SECRET_LEN
            ),
        });
    }
    let key = HashKey::random().at("/dev/urandom")?;
    write_durably(&path, key.as_bytes())?;
    Ok(key)
}

/// The primary's replicator.
#[derive(Debug)]
pub struct Replicator {
    ds: Arc<Datastore>,
    opts: ReplicateOptions,
    key: HashKey,
    /// Counters, shared with the control socket.
    pub stats: Arc<ReplStats>,
    /// The `--max-rate` bucket; no `.await` happens under the lock.
    throttle: Option<Mutex<Throttle>>,
    /// Held by a tick and by `verify`, so verify never runs while a point
    /// is shipping or applying.
    turn: tokio::sync::Mutex<()>,
    /// The points' life, and the one in flight.
    points: Points,
}

impl Replicator {
    /// A replicator for `ds`; makes the pair key on first use.
    pub fn new(ds: Arc<Datastore>, opts: ReplicateOptions) -> Result<Replicator> {
        let key = pair_key(&ds)?;
        let stats = Arc::new(ReplStats::default());
        let _ = stats.target.set(opts.target.to_string());
        let points = Points::new(ds.clone(), stats.clone());
        stats
            .max_rate
            .store(opts.max_rate.unwrap_or(0), Ordering::Relaxed);
        stats
            .last_applied
            .store(points.last_shipped_epoch()?.0, Ordering::Relaxed);
        Ok(Replicator {
            throttle: opts.max_rate.map(|r| Mutex::new(Throttle::new(r))),
            turn: tokio::sync::Mutex::new(()),
            points,
            ds,
            opts,
            key,
            stats,
        })
    }

    /// Ships points until `shutdown` turns true: a point is cut
    /// `coalesce` after the first change the link is free for, and at
    /// least every RPO (see the module doc); while disconnected, it
    /// connects again after a backoff.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut client: Option<(Link, Epoch)> = None;
        let mut backoff = FIRST_BACKOFF;
        loop {
            // A (re)connect is followed by a tick at once, in the same turn.
            if client.is_some() {
                self.next_turn(&mut shutdown).await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
            }
            if *shutdown.borrow() {
                return;
            }
            if client.is_none() {
                match self.connect().await {
                    Ok(c) => {
                        backoff = FIRST_BACKOFF;
                        client = Some(c);
                    }
                    Err(e) => {
                        self.stats.fail(&e);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            let (mut c, applied) = client.take().expect("connected above");
            let turn = self.turn.lock().await;
            let ticked = self.tick(&mut c, applied).await;
            drop(turn);
            match ticked {
                Ok(applied) => client = Some((c, applied)),
                Err(e) => self.stats.fail(&e),
            }
        }
    }

    /// Waits, with the link idle, for the next tick: `coalesce` after the
    /// first change since the last cut (at once plus `coalesce` when one
    /// came before, e.g. while the last point shipped), or one RPO,
    /// whichever is first; or until shutdown.
    async fn next_turn(&self, shutdown: &mut watch::Receiver<bool>) {
        let dirtied = self.ds.tracker.dirtied();
        tokio::select! {
            _ = async {
                // Still up when the last tick cut nothing (it shipped a
                // held point again): its wake-up is spent, the change not.
                if !dirtied.is_raised() {
                    dirtied.changed().await;
                }
                tokio::time::sleep(self.opts.coalesce).await;
            } => {}
            _ = tokio::time::sleep(self.opts.rpo) => {}
            _ = shutdown.changed() => {}
        }
    }

    /// Connects to the target and reconciles the histories; returns the
    /// link and the epoch the target holds.
    async fn connect(&self) -> Result<(Link, Epoch)> {
        match &self.opts.target {
            Target::Secondary { addr, key } => {
                let (client, applied) = self.connect_secondary(addr, key).await?;
                Ok((Link::Secondary(client), applied))
            }
            Target::Object { url, s3, .. } => {
                let (link, applied) = self.connect_object(url, s3).await?;
                Ok((Link::Object(Box::new(link)), applied))
            }
        }
    }

    /// Says hello and reconciles the histories; returns the client and the
    /// replica's last applied epoch.
    async fn connect_secondary(&self, addr: &str, key: &AuthKey) -> Result<(Client, Epoch)> {
        let mut client = client::connect(addr, key, CONNECT_TIMEOUT).await?;
        let hello = HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            datastore_id: self.ds.format.id.clone(),
            block_size: self.ds.format.block_size.bytes() as u32,
            hash_key: self.key.as_bytes().to_vec(),
        };
        let what = "(waiting for its answer to hello)";
        let reply = client::within(NO_PROGRESS_TIMEOUT, what, async {
            client
                .hello(hello)
                .await
                .map_err(|s| remote(&format!("hello to secondary {addr}"), s.message()))
        })
        .await?
        .into_inner();
        self.stats.progressed();
        let applied = Epoch(reply.last_applied_epoch);
        if reply.resync_token.is_empty() {
            let remedy = "If this primary is right, reseed the secondary: stop it and run \
                          `rm -rf REPLICA_DIR/.hbrfs` there (a full resync), or replicate to a new \
                          replica folder.";
            self.points
                .reconcile(
                    applied,
                    &reply.last_applied_point,
                    &format!("the secondary {addr}"),
                    remedy,
                )
                .await?;
        } else {
            self.fail_back(&mut client, addr, applied, reply.resync_token)
                .await?;
        }
        log::info!("connected to secondary {addr} (at epoch {applied})");
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.last_applied.store(applied.0, Ordering::Relaxed);
        Ok((client, applied))
    }

    /// The secondary is a demoted old primary holding a resync list: its
    /// history after the common base is that list, not a point of ours.
    /// Marks the list into tracking; the next point cut covers it.
    async fn fail_back(
        &self,
        client: &mut Client,
        addr: &str,
        applied: Epoch,
        token: Vec<u8>,
    ) -> Result<()> {
        let now = self.ds.tracker.current_epoch();
        if applied >= now {
            return Err(Error::Remote(format!(
                "the demoted secondary {addr} is at epoch {applied}, not behind this primary (epoch {now}):                  it cannot take this primary's points. Was it promoted from another replica?",
            )));
        }
        let bs = self.ds.format.block_size.bytes();
        let list = resync::fetch(client, &token, bs).await?;
        self.stats.progressed();
        let entries = list.len();
        let ds = self.ds.clone();
        let marked = client::blocking("marking the resync list", move || {
            resync::mark(&ds, list, applied)
        })
        .await?;
        log::info!(
            "failback: the demoted secondary {} (at epoch {applied}) listed {entries} paths written after              the common base: {} blocks marked, {} files whole, {} paths to remove; they ship with the next point",
            addr,
            marked.blocks,
            marked.whole,
            marked.removed
        );
        self.points.resync_marked(token);
        Ok(())
    }

    /// One tick: cut and ship if anything changed; returns the
    /// replica's epoch afterwards.
    async fn tick(&self, link: &mut Link, applied: Epoch) -> Result<Epoch> {
        let Some(point) = self.points.next(applied).await? else {
            // Nothing changed since the last point: the replica equals the
            // primary now, so its age is zero (not the time since a cut).
            self.stats
                .last_applied_cut_ns
                .store(now_ns(), Ordering::Relaxed);
            return Ok(applied);
        };
        let (before, started) = (self.stats.report(), std::time::Instant::now());
        let shipped = match link {
            Link::Secondary(client) => self.ship(client, &point).await,
            Link::Object(link) => self.ship_object(link, &point).await,
        };
        match shipped {
            Ok(()) => {
                // The secondary holds the point: say so before the blocks
                // turn clean, so status never shows clean blocks and an
                // older point.
                let end = point.epoch();
                let cut = self.ds.journal.epoch(end)?.map_or(0, |r| r.closed_ns);
                let now_at = end.max(applied);
                self.stats.last_applied.store(now_at.0, Ordering::Relaxed);
                self.stats.last_applied_cut_ns.store(cut, Ordering::Relaxed);
                self.stats.epochs_shipped.fetch_add(1, Ordering::Relaxed);
                self.stats.log_shipped(end, &before, started.elapsed());
                self.points.applied(point).await?;
                Ok(now_at)
            }
            Err(e) if e.kind() == ErrorKind::Refused => {
                // Sending it again would be refused again: fold it into
                // the next cut.
                self.points.refused(point);
                Err(e)
            }
            Err(e) => {
                // The connection broke: the same point ships again on
                // reconnect, from where the secondary says it stopped.
                self.points.broken(point);
                Err(e)
            }
        }
    }
}
