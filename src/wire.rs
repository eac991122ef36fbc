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
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest gRPC message either side accepts.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Most offers in one message.
pub const MAX_OFFERS: usize = 65_536;
/// Most blocks in one message.
pub const MAX_BLOCKS: usize = 4_096;
/// Most namespace operations or files in one point.
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
/// Longest wait for a reply while a point ships (hello, Begin → Resumed,
/// Offers → Wants) and for the stream to take the next message: each
/// answer is a few index lookups away and each message a few MiB, so 20 s
/// without one is a stalled connection (or a link slower than ~200 KiB/s),
/// noticed within the 30 s of the contract.
pub const NO_PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);
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
