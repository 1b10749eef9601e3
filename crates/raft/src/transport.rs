//! How a node's groups reach other nodes: the cluster port
//! (`warren_cluster::Members`) in a running broker, a simulated network in
//! the fault-injection tests.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub type Call = Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>>;

pub trait Transport: Send + Sync + 'static {
    /// Sends `request` to node `peer`'s handler; its answer, or why none came.
    fn call(&self, peer: &str, request: Vec<u8>, timeout: Duration) -> Call;
    /// The nodes the failure detector holds up (this node not among them).
    fn up(&self) -> HashSet<String>;
    /// Each node's run, where the transport knows it: a number its process
    /// picked at start. A node that only missed heartbeats (a starved
    /// process) or was cut off (a partition) keeps its number, one that
    /// restarted has a new one.
    fn incarnations(&self) -> HashMap<String, u64> {
        HashMap::new()
    }
}

impl Transport for warren_cluster::Members {
    fn call(&self, peer: &str, request: Vec<u8>, timeout: Duration) -> Call {
        let members = self.clone();
        let peer = peer.to_string();
        Box::pin(async move { members.call_owned(&peer, request, timeout).await.map_err(|e| e.to_string()) })
    }

    fn up(&self) -> HashSet<String> {
        self.status().into_iter().filter(|p| p.up).map(|p| p.name).collect()
    }

    fn incarnations(&self) -> HashMap<String, u64> {
        self.status().into_iter().map(|p| (p.name, p.incarnation)).collect()
    }
}
