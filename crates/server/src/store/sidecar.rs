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

/// Reads the deduplication windows and puts them back into their queues.
pub(super) fn load_dedup(files: &dyn Backend, path: &Path, vhosts: &BTreeMap<String, Arc<VirtualHost>>) -> DedupKeys {
    let dedup: DedupKeys = match crate::files::read(files, path) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            warn!(%error, "deduplication keys unreadable; starting with empty windows");
            DedupKeys::new()
        }),
        Ok(None) => DedupKeys::new(),
        Err(error) => {
            warn!(%error, "deduplication keys unreadable; starting with empty windows");
            DedupKeys::new()
        }
    };
    for (vhost_name, queues) in &dedup {
        let Some(vhost) = vhosts.get(vhost_name) else { continue };
        let mut state = vhost.lock();
        for (queue, keys) in queues {
            let keys: Vec<(Vec<u8>, u64)> =
                keys.iter().filter_map(|(key, until)| Some((from_hex(key)?, *until))).collect();
            state.restore_dedup(queue, &keys);
        }
    }
    dedup
}

impl Store {
    /// Stores the deduplication windows that changed in each virtual host
    /// (atomically replaced file). Blocking: run it off the async runtime.
    pub fn save_dedup(&self, vhosts: &[Arc<VirtualHost>]) -> Result<(), StoreError> {
        let mut all = self.dedup.lock();
        let mut changed = false;
        for vhost in vhosts {
            let mut state = vhost.lock();
            let changes = state.take_dedup_changes();
            let queues = all.entry(state.name.clone()).or_default();
            for (queue, keys) in changes {
                changed = true;
                queues.insert(queue, keys.iter().map(|(key, until)| (to_hex(key), *until)).collect());
            }
            queues.retain(|queue, _| state.queue(queue).is_some());
        }
        if !changed {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&*all)
            .map_err(|source| StoreError::Definitions { path: self.dedup_path.clone(), source })?;
        Ok(crate::files::replace(&*self.files, &self.dedup_path, &bytes)?)
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
