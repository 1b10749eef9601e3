//! Files beside the log: the deduplication windows (`dedup.json`), written
//! by the janitor every second and read back at start.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tracing::warn;
use warren_core::VirtualHost;
use warren_storage::Backend;

use super::{Store, StoreError};

pub(super) type DedupKeys = BTreeMap<String, BTreeMap<String, Vec<(String, u64)>>>;

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// How long after its save a window may miss keys: the janitor saves every
/// second; the rest is slack for a busy machine.
const SAVE_LAG_MS: u64 = 2_000;

/// `dedup.json`: the windows, when they were saved, and the log index up to
/// which every key is in them.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub(super) struct DedupFile {
    /// In the virtual hosts' clock (ms).
    pub saved_at_ms: u64,
    pub log_index: u64,
    pub windows: DedupKeys,
}

/// Reads `dedup.json` (or its older form, the bare windows), or `None` if
/// there is none.
pub(super) fn read_dedup(files: &dyn Backend, path: &Path) -> Option<DedupFile> {
    let bytes = match crate::files::read(files, path) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return None,
        Err(error) => {
            warn!(%error, "deduplication keys unreadable; starting with empty windows");
            return Some(DedupFile::default());
        }
    };
    if let Ok(file) = serde_json::from_slice::<DedupFile>(&bytes) {
        return Some(file);
    }
    match serde_json::from_slice::<DedupKeys>(&bytes) {
        // No index: nothing after it is known to be missing.
        Ok(windows) => Some(DedupFile { saved_at_ms: 0, log_index: u64::MAX, windows }),
        Err(error) => {
            warn!(%error, "deduplication keys unreadable; starting with empty windows");
            Some(DedupFile::default())
        }
    }
}

/// Puts the saved windows back into their queues.
pub(super) fn apply_dedup(windows: &DedupKeys, vhosts: &BTreeMap<String, Arc<VirtualHost>>) {
    for (vhost_name, queues) in windows {
        let Some(vhost) = vhosts.get(vhost_name) else { continue };
        let mut state = vhost.lock();
        for (queue, keys) in queues {
            let keys: Vec<(Vec<u8>, u64)> =
                keys.iter().filter_map(|(key, until)| Some((from_hex(key)?, *until))).collect();
            state.restore_dedup(queue, &keys);
        }
    }
}

impl Store {
    /// After a crash the saved windows can miss the keys of the last
    /// second: the messages published after the saved log index are read
    /// back and their keys remembered, as if published just before the
    /// next save was due (without a saved file: as if published now).
    pub(super) fn replay_dedup(&self, file: Option<&DedupFile>, vhosts: &BTreeMap<String, Arc<VirtualHost>>) {
        let any = vhosts.values().any(|v| v.lock().has_durable_dedup());
        let from = file.map_or(1, |f| f.log_index.saturating_add(1));
        let last = self.commit.durable_index();
        if !any || from > last {
            return;
        }
        let mut replayed = 0u64;
        for index in from..=last {
            let Ok(entry) = self.commit.read(index) else { continue };
            use super::record::{build_message, decode, decode_message, Record};
            // The key is in the headers: a linked copy's body is not needed.
            let (vhost_name, queues, message) = match decode(&entry.payload) {
                Some(Record::Published { vhost, queues, message } | Record::Moved { vhost, queues, message, .. }) => {
                    (vhost, queues, decode_message(message))
                }
                Some(Record::Linked { vhost, queues, head, .. }) => (vhost, queues, build_message(head, &[])),
                _ => continue,
            };
            let Some(vhost) = vhosts.get(vhost_name) else { continue };
            let Some(key) = message.as_ref().and_then(warren_core::vhost::dedup_key) else {
                continue;
            };
            let mut state = vhost.lock();
            let published_by = match file {
                Some(f) => f.saved_at_ms.saturating_add(SAVE_LAG_MS),
                None => state.now_ms(),
            };
            for queue in queues {
                state.restore_dedup_published(queue, std::slice::from_ref(&key), published_by);
            }
            replayed += 1;
        }
        if replayed > 0 {
            tracing::info!(messages = replayed, "deduplication keys of the last messages before the stop restored");
        }
    }

    /// Stores the deduplication windows that changed in each virtual host
    /// (atomically replaced file), with the log index they are complete up
    /// to. While any durable queue deduplicates, the file is rewritten once
    /// the log moved on, so a restart replays at most about a second of it.
    /// Blocking: run it off the async runtime.
    pub fn save_dedup(&self, vhosts: &[Arc<VirtualHost>]) -> Result<(), StoreError> {
        // Taken first: a key remembered after this is in a later entry.
        let log_index = self.commit.written_index();
        let mut all = self.dedup.lock();
        let mut changed = false;
        let mut deduplicating = false;
        let mut saved_at_ms = 0;
        for vhost in vhosts {
            let mut state = vhost.lock();
            saved_at_ms = saved_at_ms.max(state.now_ms());
            deduplicating |= state.has_durable_dedup();
            let changes = state.take_dedup_changes();
            let queues = all.entry(state.name.clone()).or_default();
            for (queue, keys) in changes {
                changed = true;
                queues.insert(queue, keys.iter().map(|(key, until)| (to_hex(key), *until)).collect());
            }
            queues.retain(|queue, _| state.queue(queue).is_some());
        }
        let mut saved_index = self.dedup_index.lock();
        let moved_on = deduplicating && log_index > *saved_index;
        if !changed && !moved_on {
            return Ok(());
        }
        #[derive(serde::Serialize)]
        struct Saved<'a> {
            saved_at_ms: u64,
            log_index: u64,
            windows: &'a DedupKeys,
        }
        let bytes = serde_json::to_vec(&Saved { saved_at_ms, log_index, windows: &all })
            .map_err(|source| StoreError::Definitions { path: self.dedup_path.clone(), source })?;
        crate::files::replace(&*self.files, &self.dedup_path, &bytes)?;
        *saved_index = log_index;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(from_hex(&to_hex(b"\x00\xffid-1")), Some(b"\x00\xffid-1".to_vec()));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }
}
