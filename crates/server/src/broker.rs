//! The broker: its configuration and its virtual hosts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use warren_core::VirtualHost;

use crate::config::Config;

pub struct Broker {
    pub config: Config,
    vhosts: RwLock<HashMap<String, Arc<VirtualHost>>>,
    next_connection_id: AtomicU64,
}

impl Broker {
    pub fn new(config: Config) -> Broker {
        let vhosts = config.vhosts.iter().map(|name| (name.clone(), Arc::new(VirtualHost::new(name)))).collect();
        Broker { config, vhosts: RwLock::new(vhosts), next_connection_id: AtomicU64::new(1) }
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VirtualHost>> {
        self.vhosts.read().get(name).cloned()
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}
