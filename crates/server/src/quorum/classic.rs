//! Classic queues reachable from every node, as in a RabbitMQ cluster. A
//! classic queue lives on the node that declared it (its home) and is lost
//! with that node's disk; the metadata group places it there (a placement
//! with one member and no group started), and every other node holds a
//! stand-in: the quorum queues' stand-in with a "leader" that never moves.
//! Publishes through a stand-in are forwarded to the home node in batches
//! (relay request `P`) and confirmed once the home node stored them;
//! consumers are subscribed there as a quorum queue's are at its leader
//! (`relay.rs`).
//!
//! The home node keeps its queues and their placements matched
//! ([`Replication::sweep_classic`]): a queue declared here is placed (the
//! `declare-ok` waits for that), one gone (deleted, auto-deleted, expired,
//! or a transient one lost at a restart) loses its placement, and the
//! stand-ins go with it. A queue deleted through another node is deleted
//! here when its placement goes.
//!
//! `basic.get` through a stand-in takes the message on the home node,
//! which holds it until the client settles it (relay requests `T`, `K`);
//! `queue.delete` is made there (`Q`: `if-unused`, `if-empty`, the count).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{info, warn};
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_codec::types::FieldTable;
use warren_core::Message;

use super::placements::{Change, Classic, Placement};
use super::relay::{put_str, Reader, NOT_LEADER, OK, PUBLISH, UNKNOWN};
use super::{replica, Local, Replication, COMMIT_PATIENCE};
use crate::session::Session;

/// How often the home node matches its classic queues with their
/// placements.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// RabbitMQ's refusal for a queue whose node is down.
pub(super) fn home_down(home: &str, name: &str, vhost: &str, classic: Classic, class: u16, method: u16) -> AmqpError {
    let kind = if classic.durable { "durable queue" } else { "queue" };
    AmqpError::soft(
        ReplyCode::NotFound,
        format!("home node '{home}' of {kind} '{name}' in vhost '{vhost}' is down or inaccessible"),
        class,
        method,
    )
}

impl Replication {
    /// Places classic queue `name`, declared here, unless the cluster knows
    /// it already; the ticket resolves once the metadata group committed
    /// the placement (or gave up: the queue is here either way, and is
    /// placed again later), so `declare-ok` goes out after it.
    /// An exclusive queue's declaration does not wait (its own connection
    /// alone consumes from it; others learn its name from that client).
    pub fn place_classic(&self, vhost: &str, name: &str, classic: Classic, arguments: &FieldTable) -> Option<u64> {
        if self.metadata.with(|p| p.get(vhost, name).is_some()) {
            return None;
        }
        let committed = self.write_placement(vhost, name, classic, arguments)?;
        if classic.exclusive {
            return None;
        }
        self.ticket_for(committed, true)
    }

    /// Removes the placement of classic queue `name` (deleted here, or
    /// through its stand-in here); the ticket resolves once that is
    /// committed. `None` if it is not a placed classic queue.
    pub fn unplace_classic(&self, vhost: &str, name: &str) -> Option<u64> {
        self.metadata.with(|p| p.get(vhost, name).and_then(|p| p.classic))?;
        let committed = self.write_removal(vhost, name)?;
        self.ticket_for(committed, false)
    }

    /// Writes the placement (in order with this node's definition changes:
    /// a binding made next comes after it), once at a time per queue.
    fn write_placement(
        &self,
        vhost: &str,
        name: &str,
        classic: Classic,
        arguments: &FieldTable,
    ) -> Option<oneshot::Receiver<bool>> {
        let key = (vhost.to_string(), name.to_string());
        if !self.placing.lock().insert(key.clone()) {
            return None;
        }
        let change = Change::Declare {
            vhost: vhost.into(),
            name: name.into(),
            members: vec![self.node.name().to_string()],
            arguments: arguments.clone(),
            classic: Some(classic),
        };
        let (done, committed) = oneshot::channel();
        let (tell, told) = oneshot::channel();
        let sent = serde_json::to_vec(&change).is_ok_and(|command| self.defining.send((command, done)).is_ok());
        if !sent {
            self.placing.lock().remove(&key);
            return None;
        }
        let me = self.me.clone();
        tokio::spawn(async move {
            let ok = committed.await.unwrap_or(false);
            if let Some(this) = me.upgrade() {
                this.placing.lock().remove(&key);
                if !ok {
                    warn!(vhost = %key.0, queue = %key.1, "a classic queue could not be placed in the cluster yet");
                }
            }
            let _ = tell.send(ok);
        });
        Some(told)
    }

    fn write_removal(&self, vhost: &str, name: &str) -> Option<oneshot::Receiver<bool>> {
        let change = Change::Delete { vhost: vhost.into(), name: name.into(), origin: self.origin };
        let command = serde_json::to_vec(&change).ok()?;
        let (done, committed) = oneshot::channel();
        self.defining.send((command, done)).ok()?;
        Some(committed)
    }

    /// A classic queue's placement was applied: its home keeps the queue,
    /// every other node puts up a stand-in.
    pub(super) fn placed_classic(&self, placement: &Placement) {
        let local = Local::new(placement, None, false);
        let replaced = {
            let mut queues = self.queues.write();
            queues.entry(placement.vhost.clone()).or_default().insert(placement.name.clone(), local.clone())
        };
        if let Some(old) = replaced.filter(|old| old.group != local.group) {
            self.forget_subscriptions(&old);
        }
        if placement.home() != Some(self.node.name()) {
            self.put_stand_in(&local);
        }
    }

    /// A classic queue's placement went: its stand-in here goes (its
    /// consumers are cancelled), and on its home node, if another node
    /// asked, the queue itself (a queue deleted here is gone already).
    pub(super) fn removed_classic(&self, local: &Local, origin: u64) {
        self.forget_subscriptions(local);
        self.drop_stand_in(local);
        let Some((home, _)) = &local.home else { return };
        if home != self.node.name() || origin == self.origin {
            return;
        }
        let Some(broker) = self.broker.upgrade() else { return };
        let Some(vhost) = broker.vhost(&local.vhost) else { return };
        let mut session = Session::open(&vhost, &broker.store);
        if session.shareable(&local.name).is_some() {
            match session.delete_queue(0, &local.name, false, false) {
                Ok(count) => {
                    info!(vhost = %local.vhost, queue = %local.name, messages = count, "classic queue deleted through another node")
                }
                Err(error) => {
                    warn!(vhost = %local.vhost, queue = %local.name, %error, "cannot delete a classic queue deleted through another node")
                }
            }
        }
    }

    /// Keeps the stand-in up on a node that is not the queue's home.
    pub(super) fn watch_classic(&self, local: &Local) {
        let away = local.home.as_ref().is_some_and(|(home, _)| home != self.node.name());
        if away && !local.stand_in.load(Ordering::Acquire) {
            self.put_stand_in(local);
        }
    }

    /// Matches this node's classic queues with their placements: those not
    /// placed yet are placed, placements of queues no longer here go.
    pub(super) fn sweep_classic(&self) {
        {
            let mut swept = self.swept.lock();
            if swept.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
                return;
            }
            *swept = Some(Instant::now());
        }
        let Some(broker) = self.broker.upgrade() else { return };
        let me = self.node.name();
        let placed = self.metadata.with(|p| p.homed_at(me));
        let mut here = std::collections::HashSet::new();
        for vhost in broker.vhost_names() {
            let Some(host) = broker.vhost(&vhost) else { continue };
            let known = self.metadata.with(|p| p.names_in(&vhost));
            let unplaced: Vec<(String, Classic, FieldTable)> = {
                let state = host.lock();
                state
                    .shareable_names()
                    .into_iter()
                    .filter_map(|name| {
                        here.insert((vhost.clone(), name.to_string()));
                        if known.contains(&*name) {
                            return None;
                        }
                        let queue = state.shareable(&name)?;
                        Some((name.to_string(), Classic::of(&queue), queue.arguments))
                    })
                    .collect()
            };
            for (name, classic, arguments) in unplaced {
                if self.write_placement(&vhost, &name, classic, &arguments).is_some() {
                    info!(%vhost, queue = %name, "classic queue placed in the cluster");
                }
            }
        }
        for (vhost, name) in placed {
            if !here.contains(&(vhost.clone(), name.clone())) {
                self.write_removal(&vhost, &name);
            }
        }
    }

    /// Sends messages published here to classic queue `local` on its home
    /// node; whether each was accepted (stored there, if it is to be).
    pub(super) async fn forward_home<'a>(
        &self,
        home: &str,
        local: &Local,
        messages: impl ExactSizeIterator<Item = &'a Message>,
    ) -> Vec<bool> {
        let count = messages.len();
        let mut request = vec![PUBLISH];
        put_str(&mut request, &local.vhost);
        put_str(&mut request, &local.name);
        request.extend_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_le_bytes());
        for message in messages {
            let start = request.len();
            request.extend_from_slice(&[0; 4]);
            replica::encode_message(&mut request, message);
            let len = u32::try_from(request.len() - start - 4).unwrap_or(u32::MAX);
            request[start..start + 4].copy_from_slice(&len.to_le_bytes());
        }
        match self.call_within(home, &request, COMMIT_PATIENCE).await.as_deref() {
            Some([OK, accepted @ ..]) if accepted.len() == count => accepted.iter().map(|&a| a == 1).collect(),
            _ => vec![false; count],
        }
    }

    /// Takes in messages another node forwarded to a classic queue here
    /// (`P`), and answers once they are stored: `OK` and one byte per
    /// message (1: accepted).
    pub(super) async fn accept_forwarded(&self, mut reader: Reader<'_>) -> Vec<u8> {
        let (Some(vhost), Some(name), Some(count)) = (reader.str(), reader.str(), reader.u32()) else {
            return vec![UNKNOWN];
        };
        let Some(broker) = self.broker.upgrade() else { return vec![NOT_LEADER] };
        let Some(host) = broker.vhost(vhost) else { return vec![NOT_LEADER] };
        let mut answer = vec![OK];
        let appended = {
            let mut session = Session::open(&host, &broker.store);
            // Gone (deleted meanwhile): the messages are dropped, as a
            // publish routed to a queue deleted at that moment is.
            if session.shareable(name).is_none() {
                answer.resize(1 + count as usize, 1);
                return answer;
            }
            for _ in 0..count {
                let message = reader.u32().and_then(|len| reader.bytes(len as usize)).and_then(replica::decode_message);
                let accepted = message.is_some_and(|message| session.accept_forwarded(name, Arc::new(message)));
                answer.push(u8::from(accepted));
            }
            session.flush_indices()
        };
        let Ok(appended) = appended else { return vec![UNKNOWN] };
        let mut stored = true;
        if let Some(index) = appended.published {
            let mut durable = broker.store.durable_watch();
            let waited = tokio::time::timeout(COMMIT_PATIENCE, durable.wait_for(|&d| d >= index)).await;
            stored = matches!(waited, Ok(Ok(_))) && !broker.store.is_poisoned();
        }
        // Dead letters of the queue may have gone into quorum queues.
        if let Some(ticket) = appended.replicated {
            stored &= broker.tickets.wait(ticket).await;
        }
        if !stored {
            answer[1..].fill(0);
        }
        answer
    }
}
