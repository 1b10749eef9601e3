//! Quorum queues led from another node: a stand-in in the virtual host
//! takes publishes and forwards them to the leader in batches (confirmed
//! once committed); the leader's node takes in forwarded messages as its
//! replica applies them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::warn;
use warren_raft::GroupId;

use super::{replica, Local, Replication, COMMIT_PATIENCE, FORWARD_BATCH_BYTES};
use crate::session::Session;

impl Replication {
    pub(super) fn put_stand_in(&self, local: &Local) {
        let Some(broker) = self.broker.upgrade() else { return };
        let Some(vhost) = broker.vhost(&local.vhost) else { return };
        let _applying = super::definitions::Applying::enter();
        let mut session = Session::open(&vhost, &broker.store);
        if session.has_queue(&local.name) {
            return;
        }
        let declared = match &local.home {
            Some((_, classic)) => session.declare_stand_in(&local.name, classic.stand_in(local.arguments.clone())),
            None => session.declare_replicated(&local.name, local.arguments.clone(), true),
        };
        match declared {
            Ok(()) => {
                local.stand_in.store(true, Ordering::Release);
                self.bind_known(&mut session, local);
            }
            // Said once: the watch tries again every few milliseconds.
            Err(error) if !local.refused.swap(true, Ordering::AcqRel) => {
                warn!(queue = %local.name, %error, "cannot put a queue's stand-in here");
            }
            Err(_) => {}
        }
    }

    pub(super) fn drop_stand_in(&self, local: &Local) {
        if !local.stand_in.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(broker) = self.broker.upgrade() else { return };
        if let Some(vhost) = broker.vhost(&local.vhost) {
            Session::open(&vhost, &broker.store).drop_replicated(&local.name);
        }
    }

    /// A forwarded message the group committed: the leader's queue takes
    /// it in, unless it was in the replica the queue was rebuilt from.
    pub(super) fn applied_event(&self, group: GroupId, applied: replica::Applied) {
        let local = self.queues.read().values().flat_map(|q| q.values()).find(|l| l.group == group).cloned();
        let Some(local) = local else { return };
        let restored = local.restored.lock();
        if !restored.is_some_and(|(from, _)| applied.index > from) {
            return;
        }
        // A leader deposed while it could not hear (paused) applies the
        // next leader's entries before it notices: its queue must not take
        // them in, the next leader's does.
        let term = restored.map(|(_, term)| term);
        if self.node.status(group).is_none_or(|s| s.state != "Leader" || Some(s.term) != term) {
            return;
        }
        let Some(broker) = self.broker.upgrade() else { return };
        if let Some(vhost) = broker.vhost(&local.vhost) {
            Session::open(&vhost, &broker.store).accept_replicated(&local.name, Arc::new(applied.message));
        }
    }

    /// Queues messages published here for the leader; the receiver hears
    /// whether they were committed.
    pub(super) fn forward(
        self: &Arc<Self>,
        local: &Arc<Local>,
        message: Arc<warren_core::Message>,
    ) -> tokio::sync::oneshot::Receiver<bool> {
        let (done, committed) = tokio::sync::oneshot::channel();
        let start = {
            let mut forwarding = local.forwarding.lock();
            forwarding.waiting.push((message, done));
            !std::mem::replace(&mut forwarding.sending, true)
        };
        if start {
            let (this, local) = (self.clone(), local.clone());
            tokio::spawn(async move { this.send_forwarded(&local).await });
        }
        committed
    }

    /// Sends the queued forwarded messages, a batch per command, until
    /// none are left.
    pub(super) async fn send_forwarded(&self, local: &Local) {
        loop {
            let (number, batch): (u64, Vec<_>) = {
                let mut forwarding = local.forwarding.lock();
                if forwarding.waiting.is_empty() {
                    forwarding.sending = false;
                    return;
                }
                let mut bytes = 0;
                let count = forwarding
                    .waiting
                    .iter()
                    .take_while(|(message, _)| {
                        bytes += message.body_len() + 64;
                        bytes <= FORWARD_BATCH_BYTES
                    })
                    .count()
                    .max(1);
                forwarding.batches += 1;
                (forwarding.batches, forwarding.waiting.drain(..count).collect())
            };
            if let Some((home, _)) = &local.home {
                let accepted = self.forward_home(home, local, batch.iter().map(|(message, _)| &**message)).await;
                for (i, (_, done)) in batch.into_iter().enumerate() {
                    let _ = done.send(accepted.get(i).copied().unwrap_or(false));
                }
                continue;
            }
            let mut command = Vec::new();
            replica::encode_forwarded(&mut command, self.origin, number, batch.iter().map(|(message, _)| &**message));
            let ok = self.node.write_anywhere(local.group, command, COMMIT_PATIENCE).await.is_ok();
            for (_, done) in batch {
                let _ = done.send(ok);
            }
        }
    }
}
