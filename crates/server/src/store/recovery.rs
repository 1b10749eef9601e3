//! Recovery: the log replayed once at start (each segment read and
//! checksummed once) into definitions and queue contents.
//!
//! Messages: every (entry, queue) pair costs 16 bytes, in index order, so a
//! settlement is a binary search; a queue's deletion is remembered as an
//! index, and entries of that queue before it are dropped when the entries
//! are placed (linear in the log, however many queues were deleted).
//! Definitions: the snapshot, then the definition entries after it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{info, warn};
use warren_core::VirtualHost;
use warren_storage::{Backend, FsyncPolicy, GroupCommit, Log, LogOptions};

use super::definitions::{self, Change};
use super::liveness::{Liveness, BUCKET_INDICES};
use super::record::{decode, encoded_summary, linked_summary, Record, INDEX_MASK, PRIORITY_SHIFT};
use super::{sidecar, Recovered, Store, StoreError};

impl Store {
    /// Opens the data directory with the message log on `backend`, restores
    /// durable definitions and messages into the virtual hosts (creating
    /// stored vhosts that are missing).
    pub fn open_with(
        backend: Arc<dyn Backend>,
        data_dir: &Path,
        policy: FsyncPolicy,
        segment_bytes_max: u64,
        vhosts: &mut BTreeMap<String, Arc<VirtualHost>>,
    ) -> Result<(Arc<Store>, Recovered), StoreError> {
        let started = Instant::now();
        backend.create_dir_all(data_dir).map_err(|source| StoreError::Io { path: data_dir.to_path_buf(), source })?;
        // The small files beside the log live on the same backend.
        let files = backend.clone();
        let definitions_path = data_dir.join("definitions.json");
        // The snapshot, then the definition entries after it (applied in
        // log order below). A file from before definition entries existed
        // already holds every change the log has.
        let (mut definitions, before_entries) = definitions::read_snapshot(&*files, &definitions_path)?;

        // Replay while the log recovers (each segment read and checksummed
        // once). Queues are interned; every (entry, queue) pair costs 16
        // bytes, in index order, so settling is a binary search.
        let mut queue_ids: HashMap<(String, String), u32> = HashMap::new();
        let mut queue_names: Vec<(String, String)> = Vec::new();
        // Consecutive records mostly name the same queue: that one is
        // checked first, without allocating.
        let mut last_interned: Option<u32> = None;
        let mut intern = |vhost: &str, queue: &str| -> u32 {
            if let Some(id) = last_interned {
                if let Some((v, q)) = queue_names.get(id as usize) {
                    if v == vhost && q == queue {
                        return id;
                    }
                }
            }
            let id = match queue_ids.get(&(vhost.to_string(), queue.to_string())) {
                Some(id) => *id,
                None => {
                    queue_names.push((vhost.to_string(), queue.to_string()));
                    // Fewer queues than u32::MAX (the `SETTLED` mark) ever appear in one log.
                    let id = u32::try_from(queue_names.len() - 1).unwrap_or(SETTLED - 1);
                    queue_ids.insert((vhost.to_string(), queue.to_string()), id);
                    id
                }
            };
            last_interned = Some(id);
            id
        };
        const SETTLED: u32 = u32::MAX;
        // Return counts by (log index, queue); moved entries carry theirs.
        let mut returns: HashMap<(u64, u32), u64> = HashMap::new();
        // (log index, queue) -> when a retry delay it was waiting out ends.
        let mut retries: HashMap<(u64, u32), u64> = HashMap::new();
        // (priority << 56 | log index, queue, body size): 16 bytes per
        // queue entry, in index order.
        let mut live: Vec<(u64, u32, u32)> = Vec::new();
        let mut undecodable = 0u64;
        // `L` entry -> (queue entries restored holding it, its body's entry).
        let mut links: HashMap<u64, (usize, u64)> = HashMap::new();
        // Queue -> log index of its last deletion.
        let mut deleted_at: HashMap<u32, u64> = HashMap::new();
        let (mut log, log_recovery) = Log::open_visiting(
            backend,
            &data_dir.join("wal"),
            LogOptions { segment_bytes_max },
            |index, _, payload| match decode(payload) {
                Some(Record::Published { vhost, queues, message }) => {
                    let (size, priority) = encoded_summary(message).unwrap_or((0, 0));
                    let key = index | u64::from(priority) << PRIORITY_SHIFT;
                    for queue in queues {
                        live.push((key, intern(vhost, queue), size));
                    }
                }
                Some(Record::Linked { body_at, vhost, queues, head, body_len }) => {
                    let (size, priority) = linked_summary(head, body_len).unwrap_or((0, 0));
                    let key = index | u64::from(priority) << PRIORITY_SHIFT;
                    for queue in queues {
                        live.push((key, intern(vhost, queue), size));
                    }
                    links.insert(index, (0, body_at));
                }
                Some(Record::Moved { from, vhost, queues, message }) => {
                    let (size, priority) = encoded_summary(message).unwrap_or((0, 0));
                    let key = index | u64::from(priority) << PRIORITY_SHIFT;
                    let ids: Vec<u32> = queues.iter().map(|q| intern(vhost, q)).collect();
                    let start = live.partition_point(|(i, _, _)| *i & INDEX_MASK < from);
                    for entry in live[start..].iter_mut().take_while(|(i, _, _)| *i & INDEX_MASK == from) {
                        if ids.contains(&entry.1) {
                            entry.1 = SETTLED;
                        }
                    }
                    for id in &ids {
                        if let Some(count) = returns.remove(&(from, *id)) {
                            returns.insert((index, *id), count);
                        }
                        if let Some(due) = retries.remove(&(from, *id)) {
                            retries.insert((index, *id), due);
                        }
                    }
                    live.extend(ids.into_iter().map(|id| (key, id, size)));
                }
                Some(Record::Returned { vhost, queue, stored, returns: count, retry_at_ms }) => {
                    let id = intern(vhost, queue);
                    returns.insert((stored, id), count);
                    // The latest return decides: a plain one (requeue) ends a wait.
                    match retry_at_ms {
                        Some(due) => retries.insert((stored, id), due),
                        None => retries.remove(&(stored, id)),
                    };
                }
                Some(Record::Settled { vhost, settled }) => {
                    for (stored, queue) in settled {
                        let id = intern(vhost, queue);
                        let start = live.partition_point(|(i, _, _)| *i & INDEX_MASK < stored);
                        for entry in live[start..].iter_mut().take_while(|(i, _, _)| *i & INDEX_MASK == stored) {
                            if entry.1 == id {
                                entry.1 = SETTLED;
                                break;
                            }
                        }
                    }
                }
                Some(Record::Deleted { vhost, queue }) => {
                    // Every entry of the queue before this one is gone:
                    // settled when the entries are placed, below.
                    deleted_at.insert(intern(vhost, queue), index);
                    if !before_entries && !definitions.covers(index) {
                        definitions.apply(index, vhost, Change::QueueDeleted(queue));
                    }
                }
                Some(Record::Definition { vhost, record }) => {
                    if !before_entries && !definitions.covers(index) {
                        definitions.apply(index, vhost, record.change());
                    }
                }
                None => undecodable += 1,
            },
        )?;
        if undecodable > 0 {
            warn!(undecodable, "log entries that are not Warren records were skipped");
        }
        // What was read back counts as durable from here on (the commit
        // thread starts from it), so make it so.
        log.sync()?;
        if before_entries {
            // Convert, so that entries written from now on are not taken as
            // already included at the next start.
            definitions::write_snapshot(&*files, &definitions_path, &definitions, log.next_index().saturating_sub(1))?;
            definitions = definitions::read_snapshot(&*files, &definitions_path)?.0;
        }
        for (name, stored) in definitions.stored() {
            let vhost = vhosts.entry(name.clone()).or_insert_with(|| Arc::new(VirtualHost::new(&name)));
            vhost.lock().restore(&stored);
        }
        let mut liveness = Liveness::default();
        let mut recovered = Recovered { log: log_recovery, ..Recovered::default() };
        let mut previous = 0;
        let mut bucket_run: Option<(u64, u64)> = None;
        // One lock per run of entries in the same virtual host.
        let mut locked: Option<(&str, parking_lot::MutexGuard<'_, warren_core::VirtualHostState>)> = None;
        for (key, id, size) in live.into_iter().filter(|(_, q, _)| *q != SETTLED) {
            let (index, priority) = (key & INDEX_MASK, (key >> PRIORITY_SHIFT) as u8);
            if deleted_at.get(&id).is_some_and(|&deleted| index < deleted) {
                continue;
            }
            let Some((vhost_name, queue)) = queue_names.get(id as usize) else { continue };
            if locked.as_ref().is_none_or(|(name, _)| *name != vhost_name.as_str()) {
                locked = None;
                let Some(vhost) = vhosts.get(vhost_name) else { continue };
                locked = Some((vhost_name.as_str(), vhost.lock()));
            }
            let Some((_, state)) = locked.as_mut() else { continue };
            let count = if returns.is_empty() { 0 } else { returns.get(&(index, id)).copied().unwrap_or(0) };
            let retry_at = if retries.is_empty() { None } else { retries.get(&(index, id)).copied() };
            if state.recover_stored(queue, index, u64::from(size), priority, count, retry_at) {
                recovered.queue_entries += 1;
                if !links.is_empty() {
                    if let Some((refs, _)) = links.get_mut(&index) {
                        *refs += 1;
                    }
                }
                if index != previous {
                    recovered.messages += 1;
                    previous = index;
                }
                // Entries come in index order: count a bucket's run at once.
                let bucket = index / BUCKET_INDICES;
                match &mut bucket_run {
                    Some((b, refs)) if *b == bucket => *refs += 1,
                    _ => {
                        if let Some((b, refs)) = bucket_run.replace((bucket, 1)) {
                            liveness.add_to_bucket(b, refs);
                        }
                    }
                }
            }
        }
        drop(locked);
        if let Some((bucket, refs)) = bucket_run {
            liveness.add_to_bucket(bucket, refs);
        }
        for (index, (refs, body_at)) in links {
            liveness.link(index, refs, body_at);
        }

        let (durable_tx, _) = watch::channel(log.next_index().saturating_sub(1));
        let durable = Arc::new(durable_tx);
        let notify = durable.clone();
        let commit = GroupCommit::start(log, policy, move |index| {
            notify.send_replace(index);
        })?;
        recovered.millis = started.elapsed().as_millis();
        info!(
            messages = recovered.messages,
            queue_entries = recovered.queue_entries,
            millis = recovered.millis,
            "durable state recovered"
        );
        // Deduplication windows, written every second by the janitor.
        let dedup_path = data_dir.join("dedup.json");
        let dedup_file = sidecar::read_dedup(&*files, &dedup_path);
        let (dedup, dedup_index) = match &dedup_file {
            Some(file) => {
                sidecar::apply_dedup(&file.windows, vhosts);
                (file.windows.clone(), file.log_index)
            }
            None => (sidecar::DedupKeys::new(), 0),
        };
        let tickets = Arc::new(crate::store::tickets::Tickets::default());
        let sync = policy == FsyncPolicy::Always;
        let streams = super::streams::Streams::open(files.clone(), &data_dir.join("streams"), tickets.clone(), sync)
            .map_err(|source| StoreError::Io { path: data_dir.join("streams"), source })?;
        let store = Store {
            commit,
            durable,
            live: Mutex::new(liveness),
            moved_until: Mutex::new(0),
            stuck: Mutex::new(None),
            compaction_scans: std::sync::atomic::AtomicU64::new(0),
            definitions_path,
            definitions: Mutex::new(definitions),
            dedup_path,
            dedup: Mutex::new(dedup),
            dedup_index: Mutex::new(dedup_index),
            spill: open_spill(files.clone(), &data_dir.join("spill"), segment_bytes_max),
            spill_failing: std::sync::atomic::AtomicBool::new(false),
            files,
            replicator: std::sync::OnceLock::new(),
            streams: Arc::new(streams),
            tickets,
        };
        store.replay_dedup(dedup_file.as_ref(), vhosts);
        Ok((Arc::new(store), recovered))
    }
}

/// The spill, emptied of what a previous run paged out (those transient
/// messages are gone with it). Without one, long queues keep their
/// transient messages in memory.
fn open_spill(
    backend: Arc<dyn warren_storage::Backend>,
    dir: &std::path::Path,
    segment_bytes: u64,
) -> Option<warren_storage::spill::Spill> {
    match warren_storage::spill::Spill::open(backend, dir, segment_bytes) {
        Ok(spill) => Some(spill),
        Err(error) => {
            tracing::warn!(%error, "no spill: transient messages of long queues stay in memory");
            None
        }
    }
}
