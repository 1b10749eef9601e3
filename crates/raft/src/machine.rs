//! openraft's state machine around a Warren [`StateMachine`].
//!
//! The machine itself lives in memory; what outlives a restart is its
//! latest snapshot, in one file per group (written to a temporary file,
//! fsynced, renamed), and the log after it, replayed by openraft.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::{LogId, NodeId, Reply, StateMachine, TypeConfig};

type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

struct Inner<S> {
    state: S,
    applied: Option<LogId>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    /// The latest snapshot: its metadata, and its data unless it is in
    /// the file.
    current: Option<(Meta, Option<Vec<u8>>)>,
    built: u64,
    installed: u64,
    /// The first log index the current snapshot refers to.
    snapshot_keeps: Option<u64>,
}

/// A group's state machine as openraft drives it. Clones share it.
pub struct Machine<S> {
    inner: Arc<Mutex<Inner<S>>>,
    /// Where the latest snapshot is kept; none for a machine that needs
    /// no restart (tests).
    file: Option<PathBuf>,
    /// Held while a snapshot is written and made current: openraft may
    /// build one while another is being written (its policy, and the
    /// shared log's reclaim asking), and the older must not replace the
    /// newer.
    saving: Arc<tokio::sync::Mutex<()>>,
}

impl<S> Clone for Machine<S> {
    fn clone(&self) -> Self {
        Machine { inner: self.inner.clone(), file: self.file.clone(), saving: self.saving.clone() }
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: Meta,
    #[serde(with = "crate::bytes")]
    data: Vec<u8>,
}

/// [`SnapshotFile`] as written, without copying the data first (bincode
/// writes a slice as it writes a `Vec`).
#[derive(Serialize)]
struct SnapshotFileRef<'a> {
    meta: &'a Meta,
    #[serde(serialize_with = "crate::bytes::serialize")]
    data: &'a [u8],
}

fn read_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_snapshot(None, AnyError::new(&e)).into()
}

fn snapshot_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
}

impl<S: StateMachine> Machine<S> {
    /// A machine in its initial `state`, or restored from the snapshot in
    /// `file` if there is one.
    pub fn open(mut state: S, file: Option<PathBuf>) -> Result<Machine<S>, StorageError<NodeId>> {
        let mut applied = None;
        let mut membership = StoredMembership::default();
        let mut current = None;
        let mut snapshot_keeps = None;
        if let Some(path) = &file {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let saved: SnapshotFile = bincode::deserialize(&bytes)
                        .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, AnyError::new(&e))))?;
                    state
                        .restore(&saved.data)
                        .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, AnyError::error(e))))?;
                    applied = saved.meta.last_log_id;
                    snapshot_keeps = state.keep_log_from();
                    membership = saved.meta.last_membership.clone();
                    current = Some((saved.meta, None));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageIOError::read_snapshot(None, AnyError::new(&e)).into()),
            }
        }
        Ok(Machine {
            inner: Arc::new(Mutex::new(Inner {
                state,
                applied,
                membership,
                current,
                built: 0,
                installed: 0,
                snapshot_keeps,
            })),
            file,
            saving: Arc::default(),
        })
    }

    /// What is kept of the latest snapshot in memory: nothing when it is in
    /// its file (it is read back when a member needs it), all of it else.
    fn kept(&self, data: &[u8]) -> Option<Vec<u8>> {
        self.file.is_none().then(|| data.to_vec())
    }

    /// Runs `f` on the machine's state (for reads served by a replica).
    pub fn with<T>(&self, f: impl FnOnce(&S) -> T) -> T {
        f(&self.inner.lock().state)
    }

    /// The first log index the state or the current snapshot still reads.
    pub fn keep_log_from(&self) -> Option<u64> {
        let inner = self.inner.lock();
        match (inner.state.keep_log_from(), inner.snapshot_keeps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Snapshots received from a leader since opening.
    pub fn snapshots_installed(&self) -> u64 {
        self.inner.lock().installed
    }

    /// Writes the snapshot file, off the runtime's threads (it fsyncs).
    async fn save(&self, meta: &Meta, data: &[u8]) -> Result<(), StorageError<NodeId>> {
        let Some(path) = self.file.clone() else { return Ok(()) };
        let bytes = bincode::serialize(&SnapshotFileRef { meta, data }).map_err(snapshot_error)?;
        let write = move || -> std::io::Result<()> {
            use std::io::Write;
            let temporary = path.with_extension("tmp");
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_data()?;
            std::fs::rename(&temporary, &path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        match tokio::task::spawn_blocking(write).await {
            Ok(written) => written.map_err(snapshot_error),
            Err(e) => Err(snapshot_error(std::io::Error::other(e))),
        }
    }
}

impl<S: StateMachine> RaftSnapshotBuilder<TypeConfig> for Machine<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (meta, data) = {
            let mut inner = self.inner.lock();
            inner.built += 1;
            let id = match inner.applied {
                Some(applied) => format!("{}-{}-{}", applied.leader_id.term, applied.index, inner.built),
                None => format!("--{}", inner.built),
            };
            let meta = Meta { last_log_id: inner.applied, last_membership: inner.membership.clone(), snapshot_id: id };
            (meta, (inner.state.snapshot(), inner.state.keep_log_from()))
        };
        let (data, keeps) = data;
        let _saving = self.saving.lock().await;
        let newer_saved = {
            let inner = self.inner.lock();
            inner.current.as_ref().is_some_and(|(current, _)| current.last_log_id >= meta.last_log_id)
        };
        if !newer_saved {
            self.save(&meta, &data).await?;
            let mut inner = self.inner.lock();
            inner.current = Some((meta.clone(), self.kept(&data)));
            inner.snapshot_keeps = keeps;
        }
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl<S: StateMachine> RaftStateMachine<TypeConfig> for Machine<S> {
    type SnapshotBuilder = Machine<S>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, openraft::BasicNode>), StorageError<NodeId>> {
        let inner = self.inner.lock();
        Ok((inner.applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.inner.lock();
        let mut replies = Vec::new();
        for entry in entries {
            inner.applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(command) => {
                    let Some(commands) = crate::batch::decode(&command.0) else {
                        let e = std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed batch of commands");
                        return Err(StorageIOError::apply(entry.log_id, AnyError::new(&e)).into());
                    };
                    let replies: Vec<Vec<u8>> =
                        commands.into_iter().map(|c| inner.state.apply(entry.log_id.index, c)).collect();
                    crate::batch::encode(replies.iter().map(Vec::as_slice))
                }
                EntryPayload::Membership(membership) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Vec::new()
                }
            };
            replies.push(Reply(reply));
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let _saving = self.saving.lock().await;
        // Durable first: the log before it is purged once this returns.
        self.save(meta, &data).await?;
        let mut inner = self.inner.lock();
        inner
            .state
            .restore(&data)
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, AnyError::error(e))))?;
        inner.applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.current = Some((meta.clone(), self.kept(&data)));
        inner.snapshot_keeps = inner.state.keep_log_from();
        inner.installed += 1;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let (current, exporter) = {
            let inner = self.inner.lock();
            (inner.current.clone(), inner.state.exporter())
        };
        let Some((meta, kept)) = current else { return Ok(None) };
        let data = match (kept, &self.file) {
            (Some(data), _) => data,
            (None, Some(path)) => {
                let path = path.clone();
                let read = tokio::task::spawn_blocking(move || std::fs::read(path)).await;
                let bytes =
                    read.map_err(|e| std::io::Error::other(e.to_string())).and_then(|r| r).map_err(read_error)?;
                let saved: SnapshotFile = bincode::deserialize(&bytes).map_err(read_error)?;
                saved.data
            }
            (None, None) => return Ok(None),
        };
        // Made to stand alone: the node it goes to has none of our log.
        let data = match exporter {
            Some(export) => match tokio::task::spawn_blocking(move || export(data)).await {
                Ok(Ok(data)) => data,
                Ok(Err(e)) => return Err(read_error(std::io::Error::other(e))),
                Err(e) => return Err(read_error(std::io::Error::other(e.to_string()))),
            },
            None => data,
        };
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}
