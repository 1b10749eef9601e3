//! The one way into a virtual host's state for connections, timers and
//! runtime changes: a [`Session`] holds the virtual host's lock and, however
//! it ends, runs dispatch and writes the core's journal into the store
//! before the lock is released, so nothing can forget either.
//!
//! This is the seam a replicated queue enters through: the channel layer
//! sees only a session and the log index it must wait for before replying
//! or confirming. A queue whose owner is elsewhere (a Raft group) turns the
//! same calls into commands and answers with that group's commit index
//! instead of the local log's; the connection's waiting stays as it is.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use parking_lot::MutexGuard;
use warren_core::vhost::JournalEvent;
use warren_core::{VirtualHost, VirtualHostState};
use warren_storage::StorageError;

use crate::store::{Appended, Store};

thread_local! {
    /// Reusable buffers for writing journals: journal events, and one
    /// encoded record. Borrowed only inside [`Session::flush_indices`].
    static SCRATCH: RefCell<(Vec<JournalEvent>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A locked virtual host whose changes reach the store.
///
/// Dereferences to the core's [`VirtualHostState`]. After each change whose
/// log index matters, call [`Session::flush`] (or [`Session::flush_indices`]); end with [`Session::finish`]
/// to learn whether everything was stored, or drop the session (dispatch
/// and the final write still happen; a store error is logged by the store
/// and shows up as nacked confirms).
pub struct Session<'a> {
    state: MutexGuard<'a, VirtualHostState>,
    store: &'a Store,
    /// The store refused an append in this session (it is poisoned then).
    failed: bool,
    finished: bool,
}

impl<'a> Session<'a> {
    pub fn open(vhost: &'a VirtualHost, store: &'a Store) -> Session<'a> {
        Session { state: vhost.lock(), store, failed: false, finished: false }
    }

    /// Writes the journal entries of the changes so far, returning their log
    /// indices. Consumer-cancel notices stay queued: they follow the reply
    /// of the frame that caused them ([`Session::flush`]).
    pub fn flush_indices(&mut self) -> Result<Appended, StorageError> {
        // Most frames journal nothing (transient messages, acks of them).
        if !self.state.has_journal() {
            return Ok(Appended::default());
        }
        let result = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (events, record) = &mut *scratch;
            let result = self.store.flush(&mut self.state, events, record);
            events.clear();
            // A burst's large record is not kept for the thread's lifetime.
            if record.capacity() > 1 << 20 {
                *record = Vec::new();
            }
            result
        });
        self.failed |= result.is_err();
        result
    }

    /// Ends one frame's changes, after its reply: sends the consumer-cancel
    /// notices it caused and writes its journal entries. A refusal is logged
    /// by the store, poisons it (so every waiting confirm becomes a nack)
    /// and is reported by [`Session::finish`].
    pub fn flush(&mut self) {
        self.state.send_notices();
        // A refusal is recorded in `failed` by `flush_indices`.
        self.flush_indices().ok();
    }

    /// Runs dispatch, writes what it journaled, releases the lock, and
    /// returns whether the store refused anything in the session.
    pub fn finish(mut self) -> Result<(), StorageError> {
        self.close();
        if self.failed {
            Err(StorageError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn close(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.state.run_dispatch();
        self.flush();
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

impl Deref for Session<'_> {
    type Target = VirtualHostState;
    fn deref(&self) -> &VirtualHostState {
        &self.state
    }
}

impl DerefMut for Session<'_> {
    fn deref_mut(&mut self) -> &mut VirtualHostState {
        &mut self.state
    }
}
