//! Durable definitions (exchanges, queues, bindings) as the log has them.
//!
//! A change is a log entry, written under its virtual host's lock like any
//! journal event and group-committed with the messages, so declaring is one
//! small append (no file rewrite under the lock), and the reply waits for
//! its entry to be durable. The store keeps the resulting definitions in
//! memory; the janitor writes them now and then to `definitions.json`
//! (atomically), stamped with the log index they cover. Recovery reads that
//! snapshot and applies the definition entries after its index.
//!
//! A definition entry pins its segment until a snapshot covers it. A
//! snapshot only covers entries that are durable, since the indices of
//! entries lost in a crash are given out again.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use warren_core::vhost::{BindingDefinition, ExchangeDefinition, JournalEvent, QueueDefinition};
use warren_core::Definitions;

use warren_storage::Backend;

use super::{Store, StoreError};

/// One change to the definitions of a virtual host.
pub(super) enum Change<'a> {
    QueueDeclared(&'a QueueDefinition),
    /// With the bindings to the queue.
    QueueDeleted(&'a str),
    ExchangeDeclared(&'a ExchangeDefinition),
    /// With the bindings from and to the exchange.
    ExchangeDeleted(&'a str),
    Bound(&'a BindingDefinition),
    Unbound(&'a BindingDefinition),
    VhostDeleted,
}

/// The change a definition journal event makes (`None` for the others).
pub(super) fn change_of(event: &JournalEvent) -> Option<Change<'_>> {
    Some(match event {
        JournalEvent::QueueDeclared(queue) => Change::QueueDeclared(queue),
        JournalEvent::QueueDeleted { queue } => Change::QueueDeleted(queue),
        JournalEvent::ExchangeDeclared(exchange) => Change::ExchangeDeclared(exchange),
        JournalEvent::ExchangeDeleted { name } => Change::ExchangeDeleted(name),
        JournalEvent::Bound(binding) => Change::Bound(binding),
        JournalEvent::Unbound(binding) => Change::Unbound(binding),
        _ => return None,
    })
}

/// (to a queue, destination, source, routing key, arguments as text): one
/// binding, ordered so that the bindings to a destination are a range.
type BindingKey = (bool, String, String, String, String);

fn binding_key(binding: &BindingDefinition) -> BindingKey {
    (
        binding.destination_is_queue,
        binding.destination.clone(),
        binding.source.clone(),
        binding.routing_key.clone(),
        format!("{:?}", binding.arguments),
    )
}

#[derive(Clone, Default)]
struct VhostDefinitions {
    exchanges: BTreeMap<String, ExchangeDefinition>,
    queues: BTreeMap<String, QueueDefinition>,
    bindings: BTreeMap<BindingKey, BindingDefinition>,
}

impl VhostDefinitions {
    fn from_stored(stored: Definitions) -> VhostDefinitions {
        VhostDefinitions {
            exchanges: stored.exchanges.into_iter().map(|x| (x.name.clone(), x)).collect(),
            queues: stored.queues.into_iter().map(|q| (q.name.clone(), q)).collect(),
            bindings: stored.bindings.into_iter().map(|b| (binding_key(&b), b)).collect(),
        }
    }

    fn to_stored(&self) -> Definitions {
        Definitions {
            exchanges: self.exchanges.values().cloned().collect(),
            queues: self.queues.values().cloned().collect(),
            bindings: self.bindings.values().cloned().collect(),
        }
    }

    fn unbind_destination(&mut self, to_queue: bool, destination: &str) {
        let from: BindingKey = (to_queue, destination.to_string(), String::new(), String::new(), String::new());
        let doomed: Vec<BindingKey> = self
            .bindings
            .range(from..)
            .take_while(|(key, _)| key.0 == to_queue && key.1 == destination)
            .map(|(key, _)| key.clone())
            .collect();
        for key in doomed {
            self.bindings.remove(&key);
        }
    }
}

/// The definitions of every virtual host, and how far the snapshot file
/// covers the log.
#[derive(Default)]
pub(super) struct DefinitionsLog {
    vhosts: BTreeMap<String, VhostDefinitions>,
    /// Log index the snapshot file covers.
    snapshot_index: u64,
    /// Index of the last definition entry applied.
    last_entry: u64,
    /// The oldest definition entry no snapshot covers.
    first_uncovered: Option<u64>,
}

impl DefinitionsLog {
    /// Applies the entry at log `index`.
    pub(super) fn apply(&mut self, index: u64, vhost: &str, change: Change<'_>) {
        self.last_entry = self.last_entry.max(index);
        self.first_uncovered.get_or_insert(index);
        if let Change::VhostDeleted = change {
            self.vhosts.remove(vhost);
            return;
        }
        let definitions = self.vhosts.entry(vhost.to_string()).or_default();
        match change {
            Change::QueueDeclared(queue) => {
                definitions.queues.insert(queue.name.clone(), queue.clone());
            }
            Change::QueueDeleted(name) => {
                definitions.queues.remove(name);
                definitions.unbind_destination(true, name);
            }
            Change::ExchangeDeclared(exchange) => {
                definitions.exchanges.insert(exchange.name.clone(), exchange.clone());
            }
            Change::ExchangeDeleted(name) => {
                definitions.exchanges.remove(name);
                definitions.unbind_destination(false, name);
                definitions.bindings.retain(|_, binding| binding.source != name);
            }
            Change::Bound(binding) => {
                definitions.bindings.insert(binding_key(binding), binding.clone());
            }
            Change::Unbound(binding) => {
                definitions.bindings.remove(&binding_key(binding));
            }
            Change::VhostDeleted => {}
        }
    }

    /// Whether entries after the snapshot's index would be lost without the log.
    pub(super) fn covers(&self, index: u64) -> bool {
        index <= self.snapshot_index
    }

    /// The oldest entry the log must keep for the definitions' sake.
    pub(super) fn pinned_from(&self) -> Option<u64> {
        self.first_uncovered
    }

    /// Every virtual host's definitions, for restoring them.
    pub(super) fn stored(&self) -> BTreeMap<String, Definitions> {
        self.vhosts.iter().map(|(name, definitions)| (name.clone(), definitions.to_stored())).collect()
    }
}

#[derive(Serialize, Deserialize)]
struct DefinitionsFile {
    /// The log index up to which the file holds every definition entry.
    log_index: u64,
    vhosts: BTreeMap<String, Definitions>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AnyDefinitionsFile {
    Current(DefinitionsFile),
    /// Written before definitions were log entries: the whole state, kept
    /// current by rewriting it on every change.
    Before(BTreeMap<String, Definitions>),
}

/// What recovery starts from: the snapshot (empty when there is none), and
/// whether it is in the format that predates definition entries (then it
/// already includes every change the log holds).
pub(super) fn read_snapshot(files: &dyn Backend, path: &Path) -> Result<(DefinitionsLog, bool), StoreError> {
    let Some(bytes) = crate::files::read(files, path)? else {
        return Ok((DefinitionsLog::default(), false));
    };
    let parsed: AnyDefinitionsFile = serde_json::from_slice(&bytes)
        .map_err(|source| StoreError::Definitions { path: path.to_path_buf(), source })?;
    let (log_index, vhosts, before) = match parsed {
        AnyDefinitionsFile::Current(file) => (file.log_index, file.vhosts, false),
        AnyDefinitionsFile::Before(vhosts) => (0, vhosts, true),
    };
    let vhosts = vhosts.into_iter().map(|(name, stored)| (name, VhostDefinitions::from_stored(stored))).collect();
    Ok((DefinitionsLog { vhosts, snapshot_index: log_index, last_entry: log_index, first_uncovered: None }, before))
}

/// Writes the snapshot file covering the log up to `log_index`.
pub(super) fn write_snapshot(
    files: &dyn Backend,
    path: &Path,
    log: &DefinitionsLog,
    log_index: u64,
) -> Result<(), StoreError> {
    let file = DefinitionsFile { log_index, vhosts: log.stored() };
    let bytes =
        serde_json::to_vec(&file).map_err(|source| StoreError::Definitions { path: path.to_path_buf(), source })?;
    Ok(crate::files::replace(files, path, &bytes)?)
}

impl Store {
    /// Writes `definitions.json` when definition entries were appended
    /// since the last time, once they are durable, so that their segments
    /// can be purged. Blocking (it may wait for an fsync and writes a
    /// file): run it off the async runtime. Returns whether it wrote.
    pub fn snapshot_definitions(&self) -> Result<bool, StoreError> {
        let (snapshot, covered) = {
            let definitions = self.definitions.lock();
            if definitions.last_entry <= definitions.snapshot_index {
                return Ok(false);
            }
            let snapshot = DefinitionsLog {
                vhosts: definitions.vhosts.clone(),
                snapshot_index: definitions.last_entry,
                last_entry: definitions.last_entry,
                first_uncovered: None,
            };
            (snapshot, definitions.last_entry)
        };
        // Only durable entries may be covered: a lost entry's index is
        // given out again after a restart.
        self.wait_durable(covered)?;
        write_snapshot(&*self.files, &self.definitions_path, &snapshot, covered)?;
        let mut definitions = self.definitions.lock();
        definitions.snapshot_index = covered;
        definitions.first_uncovered = (definitions.last_entry > covered).then_some(covered + 1);
        Ok(true)
    }

    /// Forgets a deleted virtual host's definitions (its queues and
    /// exchanges were deleted first, each with its own entry).
    pub fn forget_vhost(&self, vhost: &str) -> Result<u64, warren_storage::StorageError> {
        let mut scratch = Vec::new();
        super::record::encode_vhost_deleted(&mut scratch, vhost);
        let index = self.commit.append(&scratch)?;
        self.definitions.lock().apply(index, vhost, Change::VhostDeleted);
        Ok(index)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use warren_codec::types::FieldTable;
    use warren_storage::sim::{Faults, SimBackend};

    fn queue(name: &str) -> QueueDefinition {
        QueueDefinition { name: name.into(), auto_delete: false, arguments: FieldTable::default() }
    }

    pub(crate) fn binding(source: &str, destination: &str, to_queue: bool) -> BindingDefinition {
        BindingDefinition {
            source: source.into(),
            destination: destination.into(),
            destination_is_queue: to_queue,
            routing_key: "k".into(),
            arguments: FieldTable::default(),
        }
    }

    #[test]
    fn deletions_take_their_bindings_with_them() {
        let mut log = DefinitionsLog::default();
        let exchange = ExchangeDefinition {
            name: "x".into(),
            kind: "direct".into(),
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        };
        log.apply(1, "/", Change::ExchangeDeclared(&exchange));
        log.apply(2, "/", Change::QueueDeclared(&queue("q")));
        log.apply(3, "/", Change::QueueDeclared(&queue("r")));
        log.apply(4, "/", Change::Bound(&binding("x", "q", true)));
        log.apply(5, "/", Change::Bound(&binding("x", "r", true)));
        log.apply(6, "/", Change::Bound(&binding("amq.topic", "x", false)));
        log.apply(7, "/", Change::Bound(&binding("x", "q", true)));
        assert_eq!(log.stored()["/"].bindings.len(), 3, "binding twice stores it once");
        log.apply(8, "/", Change::QueueDeleted("q"));
        assert_eq!(log.stored()["/"].bindings.len(), 2);
        log.apply(9, "/", Change::ExchangeDeleted("x"));
        let stored = &log.stored()["/"];
        assert!(stored.bindings.is_empty() && stored.exchanges.is_empty());
        assert_eq!(stored.queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(), ["r"]);
        assert_eq!((log.pinned_from(), log.last_entry), (Some(1), 9));
        log.apply(10, "/", Change::VhostDeleted);
        assert!(log.stored().is_empty());
    }

    #[test]
    fn snapshots_round_trip_and_the_old_format_is_read() {
        let disk = SimBackend::new();
        let path = Path::new("/data/definitions.json");
        let mut log = DefinitionsLog::default();
        log.apply(3, "/", Change::QueueDeclared(&queue("q")));
        write_snapshot(&disk, path, &log, 3).unwrap();
        let (read, before) = read_snapshot(&disk, path).unwrap();
        assert!(!before);
        assert!(read.covers(3) && !read.covers(4));
        assert_eq!(read.stored(), log.stored());
        // As written before definition entries existed.
        disk.put_file(
            path,
            br#"{"/":{"exchanges":[],"queues":[{"name":"old","auto_delete":false,"arguments":{}}],"bindings":[]}}"#,
        );
        let (read, before) = read_snapshot(&disk, path).unwrap();
        assert!(before);
        assert_eq!(read.stored()["/"].queues[0].name, "old");
    }

    #[test]
    fn a_failed_snapshot_write_is_reported_and_leaves_the_previous_one() {
        let disk = SimBackend::new();
        let path = Path::new("/data/definitions.json");
        let mut log = DefinitionsLog::default();
        log.apply(3, "/", Change::QueueDeclared(&queue("q")));
        write_snapshot(&disk, path, &log, 3).unwrap();
        log.apply(4, "/", Change::QueueDeclared(&queue("r")));
        for faults in [
            Faults { fail_syncs: true, ..Faults::default() },
            Faults { fail_writes: true, ..Faults::default() },
            Faults { capacity_bytes: Some(10), ..Faults::default() },
        ] {
            disk.set_faults(faults.clone());
            let result = write_snapshot(&disk, path, &log, 4);
            assert!(matches!(result, Err(StoreError::File(_))), "{faults:?}: {result:?}");
            disk.power_cut();
            let (read, _) = read_snapshot(&disk, path).unwrap();
            assert!(read.covers(3) && !read.covers(4), "{faults:?}: the old snapshot is intact");
        }
    }

    #[test]
    fn a_snapshot_written_but_not_yet_in_a_synced_directory_is_old_or_new_after_a_power_cut() {
        for crash_after in 0..6 {
            let disk = SimBackend::new();
            let path = Path::new("/data/definitions.json");
            let mut log = DefinitionsLog::default();
            log.apply(3, "/", Change::QueueDeclared(&queue("q")));
            write_snapshot(&disk, path, &log, 3).unwrap();
            log.apply(4, "/", Change::QueueDeclared(&queue("r")));
            disk.set_faults(Faults { crash_after_ops: Some(disk.ops() + crash_after), ..Faults::default() });
            let written = write_snapshot(&disk, path, &log, 4).is_ok();
            disk.power_cut();
            let (read, _) = read_snapshot(&disk, path).unwrap();
            assert!(read.covers(3), "crash after {crash_after} operations: a snapshot survives");
            if written {
                assert!(read.covers(4), "a completed replace is durable");
            }
        }
    }
}
