//! The protocol's version and every limit a message must respect. Both
//! wings read them here: the primary to stay within them, the secondary to
//! refuse what exceeds them (invariant 4: sizes, counts and lengths from
//! the network are bounded). A leaf: it imports nothing of the crate.

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
/// Largest file size accepted: ext4's limit with 4 KiB blocks (16 TiB
/// less a block).
pub const MAX_FILE_SIZE: u64 = (1 << 44) - 4096;
