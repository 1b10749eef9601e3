//! A queue: ready messages in FIFO order by sequence number, the consumers
//! attached to it, and a round-robin cursor over them.
//!
//! Invariant: `ready` is sorted by `seq`; a requeued message goes back to the
//! position its sequence number gives it, so it is redelivered before
//! anything published after it.

use std::collections::VecDeque;
use std::sync::Arc;

use warren_codec::types::FieldTable;

use crate::message::Message;
use crate::{ChannelKey, ConnectionId, QueueId};

#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub seq: u64,
    pub message: Arc<Message>,
    pub redelivered: bool,
}

#[derive(Debug, Clone)]
pub struct QueueConsumer {
    pub channel: ChannelKey,
    pub tag: Arc<str>,
    pub exclusive: bool,
}

#[derive(Debug)]
pub struct Queue {
    pub id: QueueId,
    pub name: Box<str>,
    pub durable: bool,
    pub exclusive_owner: Option<ConnectionId>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    ready: VecDeque<QueuedMessage>,
    ready_bytes: u64,
    next_seq: u64,
    pub consumers: Vec<QueueConsumer>,
    pub(crate) cursor: usize,
    pub(crate) had_consumer: bool,
    /// Messages delivered and not yet settled.
    pub unacked: u64,
}

impl Queue {
    pub fn new(
        id: QueueId,
        name: &str,
        durable: bool,
        exclusive_owner: Option<ConnectionId>,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Queue {
        Queue {
            id,
            name: name.into(),
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            ready: VecDeque::new(),
            ready_bytes: 0,
            next_seq: 0,
            consumers: Vec::new(),
            cursor: 0,
            had_consumer: false,
            unacked: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    pub fn ready_bytes(&self) -> u64 {
        self.ready_bytes
    }

    pub fn push(&mut self, message: Arc<Message>) {
        self.ready_bytes += message.body_len() as u64;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.ready.push_back(QueuedMessage { seq, message, redelivered: false });
    }

    /// Ready messages in delivery order.
    pub fn iter(&self) -> impl Iterator<Item = &QueuedMessage> {
        self.ready.iter()
    }

    pub fn front(&self) -> Option<&QueuedMessage> {
        self.ready.front()
    }

    pub fn pop(&mut self) -> Option<QueuedMessage> {
        let entry = self.ready.pop_front()?;
        self.ready_bytes -= entry.message.body_len() as u64;
        Some(entry)
    }

    /// Puts a delivered message back where it was, marked redelivered.
    pub fn requeue(&mut self, seq: u64, message: Arc<Message>) {
        self.ready_bytes += message.body_len() as u64;
        let entry = QueuedMessage { seq, message, redelivered: true };
        let position = self.ready.partition_point(|m| m.seq < seq);
        self.ready.insert(position, entry);
        debug_assert!(self.ready.iter().zip(self.ready.iter().skip(1)).all(|(a, b)| a.seq < b.seq));
    }

    /// Drops every ready message, handing each to `dropped` first.
    pub fn purge(&mut self, mut dropped: impl FnMut(&QueuedMessage)) -> usize {
        let count = self.ready.len();
        for entry in self.ready.drain(..) {
            dropped(&entry);
        }
        self.ready_bytes = 0;
        count
    }

    /// Adds a message recovered from the store. It may have been delivered
    /// before the restart, so it is marked redelivered.
    pub fn push_recovered(&mut self, message: Arc<Message>) {
        self.push(message);
        if let Some(last) = self.ready.back_mut() {
            last.redelivered = true;
        }
    }

    pub fn is_exclusive_to_other(&self, connection: ConnectionId) -> bool {
        self.exclusive_owner.is_some_and(|owner| owner != connection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_codec::properties::Properties;

    fn msg(body: &[u8]) -> Arc<Message> {
        let mut builder = Message::builder(b"", b"q", &Properties::empty(), body.len());
        builder.push_body(body);
        Arc::new(builder.finish())
    }

    #[test]
    fn requeued_messages_return_to_their_original_position() {
        let mut queue = Queue::new(1, "q", false, None, false, FieldTable::default());
        for body in [b"a", b"b", b"c", b"d"] {
            queue.push(msg(body));
        }
        let a = queue.pop().unwrap();
        let b = queue.pop().unwrap();
        queue.requeue(b.seq, b.message);
        queue.requeue(a.seq, a.message);
        let order: Vec<u8> = std::iter::from_fn(|| queue.pop()).map(|m| m.message.body()[0]).collect();
        assert_eq!(order, b"abcd");
        assert_eq!(queue.ready_bytes(), 0);
    }
}
