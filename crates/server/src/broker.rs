//! The broker: its configuration, its virtual hosts and its durable store.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use warren_core::VirtualHost;
use warren_storage::FsyncPolicy;

use crate::config::{Config, Fsync};
use crate::store::{Recovered, Store, StoreError};

pub struct Broker {
    pub config: Config,
    vhosts: RwLock<HashMap<String, Arc<VirtualHost>>>,
    next_connection_id: AtomicU64,
    pub store: Arc<Store>,
    pub recovered: Recovered,
}

impl Broker {
    /// Opens the data directory and restores durable state.
    pub fn open(config: Config) -> Result<Broker, StoreError> {
        Self::open_with(config, Arc::new(warren_storage::FsBackend))
    }

    /// Same, with the message log on the given storage backend (tests use a
    /// simulated disk to cut power).
    pub fn open_with(config: Config, backend: Arc<dyn warren_storage::Backend>) -> Result<Broker, StoreError> {
        let mut vhosts: BTreeMap<String, Arc<VirtualHost>> =
            config.vhosts.iter().map(|name| (name.clone(), Arc::new(VirtualHost::new(name)))).collect();
        for (name, vhost) in &vhosts {
            // Validated with the configuration; an invalid one is skipped.
            let policies = config.policies.iter().filter(|p| &p.vhost == name).filter_map(|p| p.to_policy().ok());
            vhost.lock().set_policies(policies.collect());
        }
        let policy = match config.fsync {
            Fsync::Always => FsyncPolicy::Always,
            Fsync::Never => FsyncPolicy::Never,
        };
        let (store, recovered) =
            Store::open_with(backend, &config.data_dir, policy, config.segment_bytes_max, &mut vhosts)?;
        let consumer_timeout = (config.consumer_timeout_ms > 0).then_some(config.consumer_timeout_ms);
        for vhost in vhosts.values() {
            let mut state = vhost.lock();
            state.set_loader(store.clone());
            state.set_consumer_timeout(consumer_timeout);
            state.set_consumer_timeout_closes_channel(
                config.consumer_timeout_action == crate::config::ConsumerTimeoutAction::CloseChannel,
            );
        }
        Ok(Broker {
            config,
            vhosts: RwLock::new(vhosts.into_iter().collect()),
            next_connection_id: AtomicU64::new(1),
            store,
            recovered,
        })
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VirtualHost>> {
        self.vhosts.read().get(name).cloned()
    }

    pub fn vhosts(&self) -> Vec<Arc<VirtualHost>> {
        self.vhosts.read().values().cloned().collect()
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}
