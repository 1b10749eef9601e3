//! Message counters for operators (the management API's `message_stats`,
//! Prometheus). They are plain integers bumped under the virtual host's
//! lock the hot path already holds: no atomics, no extra lock.

/// Counts since the queue (or virtual host) was created. RabbitMQ's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageStats {
    /// Messages published: into the queue, or to the virtual host's
    /// exchanges.
    pub publish: u64,
    /// Delivered to consumers that acknowledge.
    pub deliver: u64,
    /// Delivered to consumers that do not acknowledge.
    pub deliver_no_ack: u64,
    /// Fetched with `basic.get`, to be acknowledged.
    pub get: u64,
    /// Fetched with `basic.get` without acknowledgement.
    pub get_no_ack: u64,
    /// Deliveries and gets of messages delivered before.
    pub redeliver: u64,
    /// Acknowledged by consumers.
    pub ack: u64,
    /// Virtual host only: published messages no queue took.
    pub unroutable: u64,
    /// `basic.get`s answered `get-empty`.
    pub get_empty: u64,
}

impl MessageStats {
    /// Adds another's counts (totals over virtual hosts).
    pub fn add(&mut self, other: &MessageStats) {
        self.publish += other.publish;
        self.deliver += other.deliver;
        self.deliver_no_ack += other.deliver_no_ack;
        self.get += other.get;
        self.get_no_ack += other.get_no_ack;
        self.redeliver += other.redeliver;
        self.ack += other.ack;
        self.unroutable += other.unroutable;
        self.get_empty += other.get_empty;
    }

    /// Every delivery and get, RabbitMQ's `deliver_get`.
    pub fn deliver_get(&self) -> u64 {
        self.deliver + self.deliver_no_ack + self.get + self.get_no_ack
    }

    pub(crate) fn delivered(&mut self, no_ack: bool, redelivered: bool) {
        if no_ack {
            self.deliver_no_ack += 1;
        } else {
            self.deliver += 1;
        }
        self.redeliver += u64::from(redelivered);
    }

    pub(crate) fn got(&mut self, no_ack: bool, redelivered: bool) {
        if no_ack {
            self.get_no_ack += 1;
        } else {
            self.get += 1;
        }
        self.redeliver += u64::from(redelivered);
    }
}

/// Queue churn of a virtual host (RabbitMQ's `churn_rates`, Prometheus'
/// `rabbitmq_queues_*_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueChurn {
    /// Successful `queue.declare`s (new or existing queue).
    pub declared: u64,
    pub created: u64,
    pub deleted: u64,
}
