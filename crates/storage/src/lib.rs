//! Warren's storage engine. It stores opaque entries; it knows nothing of
//! AMQP, queues or messages.
//!
//! - [`backend`]: the narrow file interface everything goes through
//!   ([`backend::FsBackend`] for real files, [`sim::SimBackend`] for tests
//!   that inject EIO, disk-full and power cuts that lose unsynced bytes).
//! - [`log`]: a segmented log with the shape of a Raft log: entries carry an
//!   index, a term and a checksum; append a batch, read, truncate a suffix,
//!   purge a prefix; recovery cuts a torn tail and reports corruption.
//! - [`group`]: group commit on a dedicated thread: appends are buffered, one
//!   write and one fsync cover everything appended since the last sync, and
//!   the durable index is published after each sync.
//! - [`groups`]: many Raft groups' logs and votes multiplexed on one group
//!   commit, so one fsync serves every group.
//! - [`spill`]: unsynced append-only files for bodies that need not survive
//!   a restart but do not fit in memory, emptied at start.
//! - [`stream`]: a stream queue's own log of numbered records in chunks,
//!   read from any offset by many readers and trimmed a segment at a time.
//!
//! Invariant: an index is reported durable only after the bytes holding it
//! (and the directory entry of a new segment) were fsynced. After a failed
//! write or fsync the log is poisoned and never reports durability again.

#[cfg(not(target_pointer_width = "64"))]
compile_error!("Warren supports 64-bit targets only: file offsets and sizes are used as memory sizes");

/// A file size or offset as a memory size: lossless on the 64-bit targets
/// Warren builds for (see the `compile_error!` above).
#[expect(clippy::cast_possible_truncation, reason = "64-bit targets only")]
pub fn usize_of(n: u64) -> usize {
    n as usize
}

pub mod backend;
pub mod error;
pub mod group;
pub mod groups;
pub mod log;
pub mod sim;
pub mod spill;
pub mod stream;

pub use backend::{Backend, FsBackend, StorageFile};
pub use error::StorageError;
pub use group::{FsyncPolicy, GroupCommit, Stats};
pub use groups::{GroupId, GroupLog, GroupLogError, Vote as GroupVote};
pub use log::{Entry, Log, LogOptions, Recovery};
