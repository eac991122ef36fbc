//! The protocol's version and every limit a message must respect. Both
//! wings read them here: the primary to stay within them, the secondary to
//! refuse what exceeds them (invariant 4: sizes, counts and lengths from
//! the network are bounded), and the liveness limits of the replication
//! channel: keepalive and every deadline a wait on the network has (the
//! failure contract: nothing waits for ever, a stream that stops making
//! progress is noticed within 30 s). A leaf: it imports nothing of the
//! crate.

use std::time::Duration;

/// The protocol version this build speaks; Hello refuses any other.
/// Version 3: Begin is a header and a point's lists travel in Manifest
/// chunks; offers go file by file, blocks ascending. Version 4: a demoted
/// secondary hands its resync list to the new primary (`Resync`), and a
/// point names the list it covers. Version 5: offers stream ahead of the
/// blocks: several Offers messages may await their blocks at once, up to
/// [`MAX_WINDOW_OFFERS`] offers in all (version 4 wanted every block of
/// one Offers before the next, so a version 4 secondary would refuse the
/// second).
pub const PROTOCOL_VERSION: u32 = 5;
/// Most paths of a resync list (across its chunks), and most extents of
/// one path in one chunk: the primary holds the list while it marks it.
pub const MAX_RESYNC_PATHS: usize = MAX_ENTRIES;
/// Most extents one path of a resync list carries in one entry; a path
/// with more is split over several entries.
pub const MAX_RESYNC_EXTENTS: usize = 65_536;
/// Bytes of paths and extents after which a resync chunk is closed (well
/// under [`MAX_MESSAGE`]).
pub const RESYNC_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Largest gRPC message either side accepts.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Most offers in one message.
pub const MAX_OFFERS: usize = 65_536;
/// Most offers the secondary holds awaiting their blocks: from the first
/// offer whose block has not come to the last offer made, across Offers
/// messages. The primary keeps its offers outstanding within it, so that
/// Offers → Wants round trips overlap the blocks of earlier offers; the
/// secondary refuses an Offers that would exceed it.
pub const MAX_WINDOW_OFFERS: usize = MAX_OFFERS;
/// Most blocks in one message.
pub const MAX_BLOCKS: usize = 4_096;
/// Most namespace operations, files or paths' metadata in one point (across its Manifest
/// chunks). The secondary spills the lists to disk; what it keeps in
/// memory per entry is a few dozen bytes (a file's size, a hash of each
/// path an operation touches), so this bounds that memory.
pub const MAX_ENTRIES: usize = 1 << 20;
/// Longest path (relative to the datastore or replica root) a point may
/// name, in bytes: 16 × PATH_MAX less one. A path relative to the root
/// can be longer than PATH_MAX (a process below a deep folder names a
/// PATH_MAX-long path relative to it, as POSIX test suites do), and both
/// sides resolve paths one component at a time from a descriptor of the
/// root, so PATH_MAX does not bound them; this bounds what the journal
/// keeps and the secondary accepts. The primary refuses to make a deeper
/// name (`ENAMETOOLONG`), so it never has to ship one.
pub const MAX_PATH: usize = 16 * 4096 - 1;
/// Largest file size accepted: ext4's limit with 4 KiB blocks (16 TiB
/// less a block).
pub const MAX_FILE_SIZE: u64 = (1 << 44) - 4096;

// Liveness: keepalive and deadlines. A stalled connection (one that stops
// forwarding without closing) is noticed within 30 s whatever the stream
// is doing: by `NO_PROGRESS_TIMEOUT` while a point ships, by the keepalive
// while the primary waits for an apply or is idle.

/// HTTP/2 flow-control window of a stream and of a connection, in bytes,
/// on both sides (`HBRFS_H2_WINDOW`; 0 keeps the transport's defaults).
/// Blocks flow one way in big messages: a window smaller than a few
/// messages makes the sender wait a round trip for credit.
pub fn h2_window() -> Option<u32> {
    let bytes = tuned("HBRFS_H2_WINDOW", H2_WINDOW);
    (bytes != 0).then(|| bytes.clamp(65_535, (1 << 31) - 1) as u32)
}
/// The default of [`h2_window`]: 8 MiB, two Blocks messages, a window of
/// offers at 4 KiB blocks. The transport's default (64 KiB per stream,
/// raised by BDP probing) made the initial sync 1.3x slower on loopback
/// (`contrib/bench/sync-ab.sh`, `docs/design.md`).
pub const H2_WINDOW: u64 = 8 * 1024 * 1024;

/// How long a connection attempt (TCP and TLS) to the secondary may take:
/// a loopback or LAN handshake takes milliseconds, a WAN one well under a
/// second.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keepalive ping interval, on both sides and also while no stream
/// is open: pings go out after this long without a frame received, so a
/// silent peer is probed within 10 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may wait for its answer before the connection
/// is dropped: with the interval, a stalled connection is closed at most
/// 25 s after its last frame (inside the 30 s of the contract), and later
/// than a stalled ship's `NO_PROGRESS_TIMEOUT`, so a ship names the stall
/// itself. Pings are answered by the peer's HTTP/2 layer, not its work, so
/// a long apply never delays them.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a reply while a point ships (hello, Offers → Wants;
/// Manifest → Resumed has [`manifest_timeout`]) and for the stream to take the next message: each
/// answer is a few index lookups away and each message a few MiB, so 20 s
/// without one is a stalled connection (or a link slower than ~200 KiB/s),
/// noticed within the 30 s of the contract.
pub const NO_PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);
/// What the answer to a point's last Manifest chunk may take per chunk
/// sent, on top of [`NO_PROGRESS_TIMEOUT`]: the secondary checks every
/// operation against the replica (a few `lstat`s each) before it answers,
/// and chunks the connection buffered (flow control lets several MiB
/// through) are checked after the primary sent the last one. A 4 MiB chunk
/// is some 25,000 operations, well under a second on an idle disk; 5 s
/// leaves room for a loaded one. The keepalive meanwhile watches the
/// connection, so a stall is still noticed within 30 s.
pub const MANIFEST_CHUNK_WAIT: Duration = Duration::from_secs(5);

/// The deadline of the answer to a point's lists sent in `chunks` chunks.
pub fn manifest_timeout(chunks: u32) -> Duration {
    NO_PROGRESS_TIMEOUT + MANIFEST_CHUNK_WAIT * chunks
}

/// Commit → Applied: the apply of a big point writes every staged block
/// into the replica and syncs it, which can take minutes. The deadline is
/// generous, this base plus the point's bytes at [`APPLY_MIN_RATE`]; the
/// connection's liveness meanwhile is the keepalive's job, so this only
/// bounds an apply that hangs (a stuck disk on the secondary).
pub const APPLY_TIMEOUT_BASE: Duration = Duration::from_secs(300);
/// The slowest apply rate [`apply_timeout`] allows for, in bytes per
/// second: a slow disk still writes 4 MiB/s.
pub const APPLY_MIN_RATE: u64 = 4 * 1024 * 1024;
/// The answer `hbrfs status` waits for from a running secondary: a counter
/// read, so 2 s is plenty, and the command stays interactive.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The Commit → Applied deadline of a point of `bytes`.
pub fn apply_timeout(bytes: u64) -> Duration {
    APPLY_TIMEOUT_BASE + Duration::from_secs(bytes / APPLY_MIN_RATE)
}

/// A size of the replication pipeline that benchmarks vary without a
/// rebuild (`contrib/bench/sync-ab.sh`): the environment variable `var`
/// when it holds a number, `default` otherwise (also when it is not a
/// number: a typo must not stop a daemon).
pub fn tuned(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
