//! Message rates: the counters of every queue and virtual host are sampled
//! on a fixed interval (RabbitMQ's `collect_statistics_interval`, 5 s by
//! default), and a rate is the change between the last two samples. The
//! hot path only bumps plain counters under the lock it already holds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use warren_core::MessageStats;
use warren_server::outbox::Traffic;

use crate::AppState;

/// What a sample holds of one queue or virtual host.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub stats: MessageStats,
    pub ready: u64,
    pub unacked: u64,
}

#[derive(Clone, Copy)]
struct Sampled {
    previous: Option<(Counts, Instant)>,
    latest: (Counts, Instant),
}

impl Sampled {
    fn rate(&self, pick: impl Fn(&Counts) -> u64) -> f64 {
        let Some((previous, at)) = self.previous else { return 0.0 };
        let (latest, now) = self.latest;
        let seconds = now.duration_since(at).as_secs_f64();
        if seconds <= 0.0 {
            return 0.0;
        }
        // Counters only grow; depths may shrink (a negative rate, as RabbitMQ shows).
        (pick(&latest) as f64 - pick(&previous) as f64) / seconds
    }
}

#[derive(Default)]
pub struct Rates {
    /// vhost -> queue -> samples.
    queues: Mutex<HashMap<String, HashMap<String, Sampled>>>,
    vhosts: Mutex<HashMap<String, Sampled>>,
    /// Node-wide counters ([`NodeCounts`]): previous and latest sample.
    node: Mutex<NodeSamples>,
    /// Connection id -> its received and sent bytes, previous and latest.
    traffic: Mutex<HashMap<u64, TrafficSamples>>,
}

type TrafficSamples = (Option<(Traffic, Instant)>, (Traffic, Instant));

/// The previous and the latest sample of the node-wide counters.
type NodeSamples = (Option<(NodeCounts, Instant)>, Option<(NodeCounts, Instant)>);

/// Reads one node-wide counter.
pub type NodeCounter = fn(&NodeCounts) -> u64;

/// The node-wide counters, as one sample holds them.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeCounts {
    pub connections_opened: u64,
    pub connections_closed: u64,
    pub channels_opened: u64,
    pub channels_closed: u64,
    pub queues_declared: u64,
    pub queues_created: u64,
    pub queues_deleted: u64,
    pub confirmed: u64,
    pub returned_unroutable: u64,
}

impl NodeCounts {
    /// The counters now (queue churn summed over every virtual host).
    pub fn now(state: &AppState) -> NodeCounts {
        use warren_server::broker::Counters;
        let c = &state.broker.counters;
        let mut counts = NodeCounts {
            connections_opened: Counters::get(&c.connections_opened),
            connections_closed: Counters::get(&c.connections_closed),
            channels_opened: Counters::get(&c.channels_opened),
            channels_closed: Counters::get(&c.channels_closed),
            confirmed: Counters::get(&c.confirmed),
            returned_unroutable: Counters::get(&c.returned_unroutable),
            ..NodeCounts::default()
        };
        for host in state.broker.vhosts() {
            let churn = host.lock().queue_churn();
            counts.queues_declared += churn.declared;
            counts.queues_created += churn.created;
            counts.queues_deleted += churn.deleted;
        }
        counts
    }
}

fn record<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Sampled>, key: K, counts: Counts, now: Instant) {
    match map.get_mut(&key) {
        Some(sampled) => {
            sampled.previous = Some(sampled.latest);
            sampled.latest = (counts, now);
        }
        None => {
            map.insert(key, Sampled { previous: None, latest: (counts, now) });
        }
    }
}

impl Rates {
    /// Takes one sample of every queue and virtual host.
    pub fn sample(&self, state: &AppState) {
        let now = Instant::now();
        let mut queues = HashMap::new();
        let mut vhosts = HashMap::new();
        for vhost in state.broker.vhost_names() {
            let Some(host) = state.broker.vhost(&vhost) else { continue };
            let mut total = Counts { stats: host.lock().message_stats(), ..Counts::default() };
            for q in crate::queues::summaries(state, &vhost) {
                total.ready += q.ready;
                total.unacked += q.unacked;
                queues.insert((vhost.clone(), q.name), Counts { stats: q.stats, ready: q.ready, unacked: q.unacked });
            }
            vhosts.insert(vhost, total);
        }
        let mut sampled = self.queues.lock();
        for (vhost, per_queue) in sampled.iter_mut() {
            per_queue.retain(|name, _| queues.contains_key(&(vhost.clone(), name.clone())));
        }
        for ((vhost, name), counts) in queues {
            record(sampled.entry(vhost).or_default(), name, counts, now);
        }
        drop(sampled);
        let mut sampled = self.vhosts.lock();
        sampled.retain(|key, _| vhosts.contains_key(key));
        for (key, counts) in vhosts {
            record(&mut sampled, key, counts, now);
        }
        drop(sampled);
        let node = NodeCounts::now(state);
        let mut samples = self.node.lock();
        samples.0 = samples.1.take();
        samples.1 = Some((node, now));
        drop(samples);
        let connections = state.broker.connections();
        let mut traffic = self.traffic.lock();
        traffic.retain(|id, _| connections.iter().any(|c| c.id == *id));
        for c in connections {
            let latest = (c.traffic, now);
            traffic.entry(c.id).and_modify(|s| *s = (Some(s.1), latest)).or_insert((None, latest));
        }
    }

    /// A connection's received and sent bytes per second.
    pub fn traffic(&self, connection: u64) -> (f64, f64) {
        let Some((Some((before, at)), (after, now))) = self.traffic.lock().get(&connection).copied() else {
            return (0.0, 0.0);
        };
        let seconds = now.duration_since(at).as_secs_f64();
        if seconds <= 0.0 {
            return (0.0, 0.0);
        }
        let per_second = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
        (per_second(before.recv_oct, after.recv_oct), per_second(before.send_oct, after.send_oct))
    }

    /// The rate of one node-wide counter between the last two samples.
    pub fn node_rate(&self, pick: NodeCounter) -> f64 {
        let samples = self.node.lock();
        match (samples.0, samples.1) {
            (Some((before, at)), Some((after, now))) => {
                let seconds = now.duration_since(at).as_secs_f64();
                if seconds > 0.0 {
                    (pick(&after) as f64 - pick(&before) as f64) / seconds
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }

    pub fn queue(&self, vhost: &str, queue: &str) -> Option<RateView> {
        self.queues.lock().get(vhost).and_then(|per_queue| per_queue.get(queue)).copied().map(RateView)
    }

    pub fn vhost(&self, vhost: &str) -> Option<RateView> {
        self.vhosts.lock().get(vhost).copied().map(RateView)
    }
}

/// The rates of one queue or virtual host.
#[derive(Clone, Copy)]
pub struct RateView(Sampled);

impl RateView {
    pub fn messages(&self) -> f64 {
        self.0.rate(|c| c.ready + c.unacked)
    }
    pub fn ready(&self) -> f64 {
        self.0.rate(|c| c.ready)
    }
    pub fn unacked(&self) -> f64 {
        self.0.rate(|c| c.unacked)
    }
}

fn detail(rate: f64) -> Value {
    json!({"rate": (rate * 10.0).round() / 10.0})
}

/// Reads one counter of a [`MessageStats`].
type Counter = fn(&MessageStats) -> u64;

/// RabbitMQ's counters, by name.
const COUNTERS: [(&str, &str, Counter); 10] = [
    ("publish", "publish_details", |s| s.publish),
    ("deliver", "deliver_details", |s| s.deliver),
    ("deliver_no_ack", "deliver_no_ack_details", |s| s.deliver_no_ack),
    ("get", "get_details", |s| s.get),
    ("get_no_ack", "get_no_ack_details", |s| s.get_no_ack),
    ("deliver_get", "deliver_get_details", MessageStats::deliver_get),
    ("redeliver", "redeliver_details", |s| s.redeliver),
    ("ack", "ack_details", |s| s.ack),
    ("drop_unroutable", "drop_unroutable_details", |s| s.unroutable),
    ("get_empty", "get_empty_details", |s| s.get_empty),
];

/// A rate as RabbitMQ writes it: `{"rate": 1.5}` (one decimal).
#[derive(serde::Serialize)]
pub struct Rate {
    rate: f64,
}

impl Rate {
    pub fn of(rate: Option<f64>) -> Rate {
        Rate { rate: (rate.unwrap_or(0.0) * 10.0).round() / 10.0 }
    }
}

/// `message_stats` serialized without an intermediate `Value`.
pub struct MessageStatsJson<'a> {
    pub stats: &'a MessageStats,
    pub rates: Option<RateView>,
}

impl serde::Serialize for MessageStatsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(COUNTERS.len() * 2))?;
        for (name, details, pick) in COUNTERS {
            map.serialize_entry(name, &pick(self.stats))?;
            map.serialize_entry(details, &Rate::of(self.rates.map(|r| r.0.rate(|c| pick(&c.stats)))))?;
        }
        map.end()
    }
}

/// RabbitMQ's `message_stats` object: each counter and its `_details.rate`.
/// Counts come from `stats` (current), rates from the samples.
pub fn message_stats_json(stats: &MessageStats, rates: Option<RateView>) -> Value {
    serde_json::to_value(MessageStatsJson { stats, rates }).unwrap_or_else(|_| Value::Object(Map::new()))
}

/// Several `message_stats` objects added up (the overview's, over the
/// virtual hosts a user sees).
pub fn sum_message_stats(parts: &[Value]) -> Value {
    let mut total = message_stats_json(&MessageStats::default(), None);
    let Value::Object(sum) = &mut total else { return total };
    for part in parts.iter().filter_map(Value::as_object) {
        for (key, value) in part {
            match (sum.get_mut(key), value) {
                (Some(Value::Number(n)), Value::Number(m)) => {
                    *n = (n.as_u64().unwrap_or(0) + m.as_u64().unwrap_or(0)).into();
                }
                (Some(Value::Object(d)), Value::Object(e)) => {
                    let rate = d.get("rate").and_then(Value::as_f64).unwrap_or(0.0)
                        + e.get("rate").and_then(Value::as_f64).unwrap_or(0.0);
                    d.insert("rate".into(), json!((rate * 10.0).round() / 10.0));
                }
                _ => {}
            }
        }
    }
    total
}

/// The `_details` of a depth field.
pub fn depth_detail(rate: Option<f64>) -> Value {
    detail(rate.unwrap_or(0.0))
}

/// Samples until the state's broker goes away.
pub async fn sample_forever(state: std::sync::Arc<AppState>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        state.rates.sample(&state);
    }
}
