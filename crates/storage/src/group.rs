//! Group commit: callers append entries to an in-memory batch and get their
//! index at once; a dedicated thread writes the batch with one write, makes
//! it durable with one fsync, and publishes the new durable index. While an
//! fsync runs, the next batch accumulates, so the batch grows with the
//! sync's own duration: no timer.
//!
//! After a failed write or fsync the log is poisoned: the durable index stops
//! for good and [`GroupCommit::is_poisoned`] says so; callers must nack or
//! block, never confirm.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use tracing::error;

use crate::error::StorageError;
use crate::log::Log;

/// When an appended entry counts as durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// After fdatasync of the data (and directory, for new segments).
    #[default]
    Always,
    /// As soon as it is written to the operating system: survives a process
    /// crash, not a power cut. For users who knowingly trade safety for speed.
    Never,
}

#[derive(Default)]
struct Pending {
    /// Length-prefixed payloads, in index order.
    buf: Vec<u8>,
    count: u64,
    next_index: u64,
    shutdown: bool,
}

type Listener = Box<dyn Fn(u64) + Send + Sync>;

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    log: Mutex<Log>,
    durable: AtomicU64,
    /// Last index written to the files (readable), durable or not.
    written: AtomicU64,
    poisoned: AtomicBool,
    listener: Listener,
    policy: FsyncPolicy,
    syncs: AtomicU64,
    synced_entries: AtomicU64,
    /// Commits by entry count: bucket `i` holds batches of at most
    /// `BATCH_BOUNDS[i]` entries (the last, any larger).
    batch_sizes: [AtomicU64; BATCH_BOUNDS.len() + 1],
}

/// Upper bounds of the batch-size buckets: powers of four up to 16,384.
pub const BATCH_BOUNDS: [u64; 8] = [1, 4, 16, 64, 256, 1024, 4096, 16384];

/// Counters for benchmarks and metrics: fsyncs, entries made durable, and
/// commits per batch-size bucket (not cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub syncs: u64,
    pub entries: u64,
    pub batch_sizes: [u64; BATCH_BOUNDS.len() + 1],
}

pub struct GroupCommit {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl GroupCommit {
    /// Takes over a recovered log. `listener` is called from the commit
    /// thread with the new durable index after each batch. Fails when the
    /// commit thread cannot be started: nothing could ever be confirmed.
    pub fn start(
        log: Log,
        policy: FsyncPolicy,
        listener: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<GroupCommit, StorageError> {
        let next_index = log.next_index();
        let poisoned = log.is_poisoned();
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending { next_index, ..Pending::default() }),
            wake: Condvar::new(),
            log: Mutex::new(log),
            durable: AtomicU64::new(next_index - 1),
            written: AtomicU64::new(next_index - 1),
            poisoned: AtomicBool::new(poisoned),
            listener: Box::new(listener),
            policy,
            syncs: AtomicU64::new(0),
            synced_entries: AtomicU64::new(0),
            batch_sizes: Default::default(),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("warren-commit".into())
            .spawn(move || commit_loop(&worker))
            .map_err(StorageError::Thread)?;
        Ok(GroupCommit { shared, thread: Mutex::new(Some(thread)) })
    }

    /// Buffers one entry; returns its index. Durable once
    /// [`GroupCommit::durable_index`] reaches it.
    pub fn append(&self, payload: &[u8]) -> Result<u64, StorageError> {
        self.append_parts(&[payload])
    }

    /// [`GroupCommit::append`] of the entry `parts` make end to end (put
    /// together here, not in a buffer of the caller's first).
    pub fn append_parts(&self, parts: &[&[u8]]) -> Result<u64, StorageError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned);
        }
        let len: usize = parts.iter().map(|part| part.len()).sum();
        let mut pending = self.shared.pending.lock();
        let index = pending.next_index;
        pending.next_index += 1;
        // Entries are below 4 GiB (see `log::encode_record`).
        pending.buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        for part in parts {
            pending.buf.extend_from_slice(part);
        }
        pending.count += 1;
        if pending.count == 1 {
            self.shared.wake.notify_one();
        }
        Ok(index)
    }

    pub fn durable_index(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// Entries up to this index can be read back with [`GroupCommit::read`].
    pub fn written_index(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire)
    }

    /// Waits until `index` has been written (is readable), or the log is
    /// poisoned. Appending callers that hand an index to readers before the
    /// commit thread has written it (compaction re-keying queued messages)
    /// wait here first.
    pub fn wait_written(&self, index: u64) -> Result<(), StorageError> {
        while self.written_index() < index {
            if self.is_poisoned() {
                return Err(StorageError::Poisoned);
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        Ok(())
    }

    /// Reads a written entry (checksum verified).
    pub fn read(&self, index: u64) -> Result<crate::log::Entry, StorageError> {
        self.shared.log.lock().read(index)
    }

    /// Index the next append will get.
    pub fn next_index(&self) -> u64 {
        self.shared.pending.lock().next_index
    }

    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> Stats {
        Stats {
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            entries: self.shared.synced_entries.load(Ordering::Relaxed),
            batch_sizes: std::array::from_fn(|i| self.shared.batch_sizes[i].load(Ordering::Relaxed)),
        }
    }

    /// Runs `f` on the log (reads, purges) between commits.
    pub fn with_log<T>(&self, f: impl FnOnce(&mut Log) -> T) -> T {
        f(&mut self.shared.log.lock())
    }

    /// Deletes segments holding only entries below `before`. The files are
    /// deleted (and the directory synced) without holding the log, so
    /// appends and their fsyncs go on meanwhile. Returns how many.
    pub fn purge_prefix(&self, before: u64) -> Result<usize, StorageError> {
        let detached = self.shared.log.lock().detach_prefix(before);
        match detached.remove() {
            Ok(()) => Ok(detached.len()),
            Err(error) => Err(self.shared.log.lock().poison_with(error)),
        }
    }

    /// Writes and syncs what is pending, then stops the commit thread.
    /// Later appends are never committed.
    pub fn shutdown(&self) {
        self.shared.pending.lock().shutdown = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn commit_loop(shared: &Shared) {
    let mut batch = Vec::new();
    loop {
        let count = {
            let mut pending = shared.pending.lock();
            while pending.count == 0 && !pending.shutdown {
                shared.wake.wait(&mut pending);
            }
            if pending.count == 0 && pending.shutdown {
                return;
            }
            std::mem::swap(&mut pending.buf, &mut batch);
            std::mem::take(&mut pending.count)
        };
        // Append under the log lock; fsync outside it, so reads of written
        // entries are not held up by the disk.
        let payloads = Payloads { bytes: &batch, at: 0 };
        let appended = shared.log.lock().append(0, payloads).map(|first| first + count - 1);
        let result = appended.and_then(|last| {
            shared.written.store(last, Ordering::Release);
            if shared.policy == FsyncPolicy::Always {
                let plan = shared.log.lock().prepare_sync()?;
                let outcome = plan.run();
                shared.log.lock().finish_sync(plan, outcome)?;
            }
            Ok(last)
        });
        batch.clear();
        match result {
            Ok(last) => {
                shared.syncs.fetch_add(1, Ordering::Relaxed);
                shared.synced_entries.fetch_add(count, Ordering::Relaxed);
                let bucket = BATCH_BOUNDS.iter().position(|&b| count <= b).unwrap_or(BATCH_BOUNDS.len());
                shared.batch_sizes[bucket].fetch_add(1, Ordering::Relaxed);
                shared.durable.store(last, Ordering::Release);
                (shared.listener)(last);
            }
            Err(error) => {
                shared.poisoned.store(true, Ordering::Release);
                error!(%error, "group commit failed; the store is poisoned");
                // Wake whoever waits so they learn about the poison.
                (shared.listener)(shared.durable.load(Ordering::Acquire));
                // Drain and drop later appends: they can never become durable.
                let mut pending = shared.pending.lock();
                pending.buf.clear();
                pending.count = 0;
                if pending.shutdown {
                    return;
                }
            }
        }
    }
}

struct Payloads<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Payloads<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.bytes.get(self.at..self.at + 4)?.try_into().ok()?) as usize;
        let payload = self.bytes.get(self.at + 4..self.at + 4 + len)?;
        self.at += 4 + len;
        Some(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogOptions;
    use crate::sim::{Faults, SimBackend};
    use std::path::Path;
    use std::time::{Duration, Instant};

    fn wait_for(gc: &GroupCommit, index: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while gc.durable_index() < index {
            assert!(Instant::now() < deadline, "index {index} never became durable");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn concurrent_appends_share_fsyncs_and_survive_a_power_cut() {
        let sim = SimBackend::new();
        let (log, _) = Log::open(Arc::new(sim.clone()), Path::new("/wal"), LogOptions::default()).unwrap();
        let notified = Arc::new(AtomicU64::new(0));
        let seen = notified.clone();
        let gc =
            Arc::new(GroupCommit::start(log, FsyncPolicy::Always, move |d| seen.store(d, Ordering::SeqCst)).unwrap());
        let mut threads = Vec::new();
        for t in 0..4u8 {
            let gc = gc.clone();
            threads.push(std::thread::spawn(move || {
                let mut last = 0;
                for i in 0..500u32 {
                    last = gc.append(&[t, (i % 251) as u8]).unwrap();
                }
                last
            }));
        }
        let last = threads.into_iter().map(|t| t.join().unwrap()).max().unwrap();
        wait_for(&gc, last);
        assert_eq!(notified.load(Ordering::SeqCst), gc.durable_index());
        let stats = gc.stats();
        assert_eq!(stats.entries, 2000);
        assert!(stats.syncs < 2000, "fsyncs are shared: {stats:?}");
        assert_eq!(stats.batch_sizes.iter().sum::<u64>(), stats.syncs, "every commit is in one bucket");
        assert!(stats.batch_sizes[1..].iter().sum::<u64>() > 0, "some commits carried several entries");
        drop(gc);
        sim.power_cut();
        let (log, recovery) = Log::open(Arc::new(sim), Path::new("/wal"), LogOptions::default()).unwrap();
        assert_eq!(recovery.entries, 2000);
        assert_eq!(log.next_index(), 2001);
    }

    #[test]
    fn fsync_failure_stops_durability_for_good() {
        let sim = SimBackend::new();
        let (log, _) = Log::open(Arc::new(sim.clone()), Path::new("/wal"), LogOptions::default()).unwrap();
        let gc = GroupCommit::start(log, FsyncPolicy::Always, |_| {}).unwrap();
        let first = gc.append(b"ok").unwrap();
        wait_for(&gc, first);
        sim.set_faults(Faults { fail_syncs: true, ..Faults::default() });
        let doomed = gc.append(b"doomed").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gc.is_poisoned() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        sim.set_faults(Faults::default());
        assert!(gc.durable_index() < doomed);
        assert!(matches!(gc.append(b"later"), Err(StorageError::Poisoned)));
    }

    #[test]
    fn wait_written_returns_once_an_append_is_readable() {
        let sim = SimBackend::new();
        let (log, _) = Log::open(Arc::new(sim.clone()), Path::new("/wal"), LogOptions::default()).unwrap();
        let gc = GroupCommit::start(log, FsyncPolicy::Always, |_| {}).unwrap();
        let index = gc.append(b"moved").unwrap();
        gc.wait_written(index).unwrap();
        assert_eq!(&gc.read(index).unwrap().payload[..], b"moved");
        sim.set_faults(Faults { fail_writes: true, ..Faults::default() });
        let doomed = gc.append(b"never written").unwrap();
        assert!(matches!(gc.wait_written(doomed), Err(StorageError::Poisoned)));
    }
}
