//! Read-only views of a virtual host for operators (the management API and
//! metrics): plain values copied out under the lock, so a caller can
//! release it between chunks of a long listing.

use super::*;
use crate::settings::QueueType;
use crate::stats::MessageStats;

/// A queue as an operator sees it.
#[derive(Clone, Debug)]
pub struct QueueSummary {
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    /// Owned by a connection (`exclusive`).
    pub exclusive: bool,
    pub arguments: FieldTable,
    /// `classic` or `quorum`.
    pub queue_type: &'static str,
    pub consumers: usize,
    /// Ready messages (not delivered, not waiting for a retry).
    pub ready: u64,
    /// Delivered and not yet settled.
    pub unacked: u64,
    /// Body bytes of the ready messages.
    pub ready_bytes: u64,
    /// Ready messages whose bodies are in memory (the rest are paged out).
    pub ready_ram: u64,
    /// Consumer tag of the exclusive consumer, if there is one.
    pub exclusive_consumer_tag: Option<String>,
    pub stats: MessageStats,
    /// When a client last used the queue (declare, consume, get),
    /// milliseconds since the epoch; 0 if never.
    pub last_used_ms: u64,
    /// The policy in effect: its name and definition.
    pub policy: Option<(String, FieldTable)>,
}

/// A channel as an operator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSummary {
    pub channel: u16,
    pub consumers: usize,
    pub unacked: usize,
    /// `basic.qos global=false`: for each new consumer.
    pub prefetch_count: u16,
    /// `basic.qos global=true`: shared by the channel.
    pub global_prefetch_count: u16,
    pub confirm: bool,
    pub transactional: bool,
}

/// An exchange as an operator sees it.
#[derive(Clone, Debug)]
pub struct ExchangeSummary {
    pub name: String,
    pub kind: &'static str,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// A binding as an operator sees it: from exchange `source` to a queue or
/// an exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct BindingSummary {
    pub source: String,
    pub destination: String,
    /// The destination is a queue (else an exchange).
    pub to_queue: bool,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// A consumer as an operator sees it.
#[derive(Clone, Debug)]
pub struct ConsumerSummary {
    pub queue: String,
    pub channel: ChannelKey,
    pub tag: String,
    pub exclusive: bool,
    pub priority: i64,
    /// Acknowledgements required (not `no_ack`).
    pub ack_required: bool,
    /// The consumer's prefetch (0: none).
    pub prefetch_count: u16,
}

impl VirtualHostState {
    /// Queues declared, created and deleted in this virtual host.
    pub fn queue_churn(&self) -> crate::stats::QueueChurn {
        self.churn
    }

    /// Message counters of the whole virtual host.
    pub fn message_stats(&self) -> MessageStats {
        self.stats
    }

    /// Names of every queue, in no order: cheap enough to take under the
    /// lock (a pointer copy each); sort them after releasing it.
    pub fn queue_name_list(&self) -> Vec<Arc<str>> {
        self.queues.values().map(|q| q.name.clone()).collect()
    }

    /// Names of every queue, sorted.
    pub fn sorted_queue_names(&self) -> Vec<Arc<str>> {
        let mut names = self.queue_name_list();
        names.sort_unstable();
        names
    }

    /// The queue's summary, if it exists.
    pub fn queue_summary(&self, name: &str) -> Option<QueueSummary> {
        let queue = self.queue(name)?;
        Some(QueueSummary {
            name: queue.name.to_string(),
            durable: queue.durable,
            auto_delete: queue.auto_delete,
            exclusive: queue.exclusive_owner.is_some(),
            arguments: queue.arguments.clone(),
            queue_type: match queue.settings.queue_type {
                QueueType::Classic => "classic",
                QueueType::Quorum => "quorum",
                QueueType::Stream => "stream",
            },
            consumers: queue.consumers.len(),
            // A stream's messages are its retained ones (RabbitMQ's count).
            ready: if queue.stream.is_some() { self.stream_len(queue) } else { queue.len() as u64 },
            unacked: queue.unacked,
            ready_bytes: queue.bytes(),
            ready_ram: queue.loaded_len() as u64,
            exclusive_consumer_tag: queue.consumers.iter().find(|c| c.exclusive).map(|c| c.tag.to_string()),
            stats: queue.stats,
            last_used_ms: queue.last_used,
            policy: crate::policy::effective(&self.policies, name, true)
                .map(|p| (p.name.clone(), p.definition.clone())),
        })
    }

    /// Every exchange, sorted by name, the default exchange (`""`) first.
    pub fn exchange_summaries(&self) -> Vec<ExchangeSummary> {
        let mut out: Vec<ExchangeSummary> = self
            .exchanges
            .values()
            .map(|x| ExchangeSummary {
                name: x.name.to_string(),
                kind: x.type_name(),
                durable: x.durable,
                auto_delete: x.auto_delete,
                internal: x.internal,
                arguments: x.arguments.clone(),
            })
            .collect();
        // The default exchange routes by queue name without being a table
        // entry; RabbitMQ lists it (as `""`, a durable direct exchange).
        if !self.exchanges.contains_key("") {
            out.push(ExchangeSummary {
                name: String::new(),
                kind: "direct",
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: FieldTable::default(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every binding: the default exchange's implicit binding of each queue
    /// first (as RabbitMQ lists them), then the declared ones by source.
    pub fn binding_summaries(&self) -> Vec<BindingSummary> {
        let mut out: Vec<BindingSummary> = self
            .sorted_queue_names()
            .into_iter()
            .map(|name| BindingSummary {
                source: String::new(),
                destination: name.to_string(),
                to_queue: true,
                routing_key: name.to_string(),
                arguments: FieldTable::default(),
            })
            .collect();
        let mut declared = Vec::new();
        for exchange in self.exchanges.values() {
            for binding in exchange.bindings() {
                let (destination, to_queue) = match &binding.destination {
                    Destination::Queue(id) => match self.queues.get(id) {
                        Some(queue) => (queue.name.to_string(), true),
                        None => continue,
                    },
                    Destination::Exchange(name) => (name.to_string(), false),
                };
                declared.push(BindingSummary {
                    source: exchange.name.to_string(),
                    destination,
                    to_queue,
                    routing_key: binding.routing_key.to_string(),
                    arguments: binding.arguments.clone(),
                });
            }
        }
        declared.sort_by(|a, b| {
            (&a.source, &a.destination, &a.routing_key).cmp(&(&b.source, &b.destination, &b.routing_key))
        });
        out.extend(declared);
        out
    }

    /// Every consumer of every queue.
    pub fn consumer_summaries(&self) -> Vec<ConsumerSummary> {
        let mut out = Vec::new();
        for queue in self.queues.values() {
            for consumer in &queue.consumers {
                let state = self.channels.get(&consumer.channel).and_then(|c| c.consumers.get(&consumer.tag));
                out.push(ConsumerSummary {
                    queue: queue.name.to_string(),
                    channel: consumer.channel,
                    tag: consumer.tag.to_string(),
                    exclusive: consumer.exclusive,
                    priority: consumer.priority,
                    ack_required: state.is_none_or(|s| !s.no_ack),
                    prefetch_count: state.map_or(0, |s| s.prefetch_count),
                });
            }
        }
        out
    }

    /// Channels of a connection: (channel number, consumers, unacked).
    pub fn channel_summaries(&self, connection: ConnectionId) -> Vec<ChannelSummary> {
        let mut out: Vec<ChannelSummary> = self
            .channels
            .iter()
            .filter(|(key, _)| key.connection == connection)
            .map(|(key, channel)| ChannelSummary {
                channel: key.channel,
                consumers: channel.consumers.len(),
                unacked: channel.unacked.len(),
                prefetch_count: channel.consumer_prefetch,
                global_prefetch_count: channel.prefetch_count,
                confirm: channel.confirm,
                transactional: channel.transactional,
            })
            .collect();
        out.sort_unstable_by_key(|c| c.channel);
        out
    }
}
