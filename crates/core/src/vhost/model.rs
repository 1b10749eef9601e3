//! The queue and channel state machine against a reference model: whatever
//! the interleaving of publishes, consumers, gets, acks, nacks, recovers,
//! qos changes and channel closes, every message is in exactly one place
//! (ready, unacked on one channel, or settled), prefetch is never exceeded,
//! and first deliveries leave in publish order.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use warren_codec::properties::Properties;

#[derive(Default)]
struct Recorder {
    deliveries: Mutex<Vec<(u16, u64, bool, u32)>>,
}

impl Outbox for Recorder {
    fn deliver(&self, channel: u16, _tag: &str, delivery_tag: u64, redelivered: bool, message: &Message) {
        let id = u32::from_be_bytes(message.body()[..4].try_into().unwrap());
        self.deliveries.lock().push((channel, delivery_tag, redelivered, id));
    }
    fn consumer_cancelled(&self, _channel: u16, _consumer_tag: &str) {}
    fn is_congested(&self) -> bool {
        false
    }
}

#[derive(Clone, Debug)]
enum Op {
    Publish,
    Consume(u16, u16),
    Cancel(u16),
    Get(u16, bool),
    Ack(u16, prop::sample::Index, bool),
    Nack(u16, prop::sample::Index, bool, bool),
    Recover(u16),
    Close(u16),
}

fn op() -> impl Strategy<Value = Op> {
    let channel = 1u16..=2;
    prop_oneof![
        4 => Just(Op::Publish),
        1 => (channel.clone(), 0u16..4).prop_map(|(c, p)| Op::Consume(c, p)),
        1 => channel.clone().prop_map(Op::Cancel),
        1 => (channel.clone(), any::<bool>()).prop_map(|(c, n)| Op::Get(c, n)),
        3 => (channel.clone(), any::<prop::sample::Index>(), any::<bool>()).prop_map(|(c, i, m)| Op::Ack(c, i, m)),
        2 => (channel.clone(), any::<prop::sample::Index>(), any::<bool>(), any::<bool>()).prop_map(|(c, i, m, r)| Op::Nack(c, i, m, r)),
        1 => channel.clone().prop_map(Op::Recover),
        1 => channel.prop_map(Op::Close),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn every_message_is_in_exactly_one_place(ops in proptest::collection::vec(op(), 1..120)) {
        let mut vhost = VirtualHostState::new("/");
        let recorder = Arc::new(Recorder::default());
        let key = |c: u16| ChannelKey { connection: 1, channel: c };
        for c in 1..=2 {
            vhost.open_channel(key(c), recorder.clone());
        }
        // Rejected messages, and those returned more than twice, go to
        // "dlq": they must neither vanish nor be duplicated.
        vhost.declare_queue(1, QueueDeclare::named("dlq")).unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-dead-letter-exchange".into(), warren_codec::types::AMQPValue::LongString("".into()));
        arguments.insert("x-dead-letter-routing-key".into(), warren_codec::types::AMQPValue::LongString("dlq".into()));
        arguments.insert("x-delivery-limit".into(), warren_codec::types::AMQPValue::LongLongInt(2));
        vhost.declare_queue(1, QueueDeclare::named("q").with_arguments(arguments)).unwrap();
        let mut published = 0u32;
        let mut settled: Vec<u32> = Vec::new();
        // Per channel: outstanding (delivery tag, id), in tag order.
        let mut outstanding: BTreeMap<u16, Vec<(u64, u32)>> = BTreeMap::new();
        let mut consuming: BTreeMap<u16, (bool, u16)> = BTreeMap::new();
        // Delivery tags each current consumer received (prefetch counts these).
        let mut consumer_tags: BTreeMap<u16, std::collections::HashSet<u64>> = BTreeMap::new();
        let mut seen = 0usize;
        let mut first_deliveries: Vec<u32> = Vec::new();
        for op in ops {
            match op {
                Op::Publish => {
                    let mut builder = Message::builder(b"", b"q", &Properties::empty(), 4);
                    builder.push_body(&published.to_be_bytes());
                    published += 1;
                    vhost.publish("", Arc::new(builder.finish()), &[]).unwrap();
                }
                Op::Consume(c, prefetch) => {
                    if let std::collections::btree_map::Entry::Vacant(slot) = consuming.entry(c) {
                        vhost.qos(key(c), 0, prefetch, false);
                        let no_ack = prefetch == 3;
                        vhost.consume(key(c), Consume { no_ack, ..Consume::new("q", "tag") }).unwrap();
                        slot.insert((no_ack, prefetch));
                        consumer_tags.insert(c, Default::default());
                    }
                }
                Op::Cancel(c) => {
                    if consuming.remove(&c).is_some() {
                        prop_assert!(vhost.cancel(key(c), "tag"));
                    }
                }
                Op::Get(c, no_ack) => {
                    if let Some(got) = vhost.get(key(c), "q", no_ack).unwrap() {
                        let id = u32::from_be_bytes(got.message.body()[..4].try_into().unwrap());
                        if !got.redelivered {
                            first_deliveries.push(id);
                        }
                        if no_ack {
                            settled.push(id);
                        } else {
                            outstanding.entry(c).or_default().push((got.delivery_tag, id));
                        }
                    }
                }
                Op::Ack(c, index, multiple) | Op::Nack(c, index, multiple, _) => {
                    let list = outstanding.entry(c).or_default();
                    if list.is_empty() {
                        continue;
                    }
                    let i = index.index(list.len());
                    let tag = list[i].0;
                    let taken: Vec<(u64, u32)> = if multiple { list.drain(..=i).collect() } else { vec![list.remove(i)] };
                    match op {
                        Op::Nack(_, _, _, true) => {
                            vhost.nack(key(c), tag, multiple, true).unwrap();
                        }
                        Op::Nack(_, _, _, false) => {
                            // Dead-lettered into "dlq", counted there.
                            vhost.nack(key(c), tag, multiple, false).unwrap();
                        }
                        _ => {
                            vhost.ack(key(c), tag, multiple).unwrap();
                            settled.extend(taken.iter().map(|t| t.1));
                        }
                    }
                }
                Op::Recover(c) => {
                    vhost.recover(key(c)).unwrap();
                    outstanding.remove(&c);
                }
                Op::Close(c) => {
                    vhost.close_channel(key(c));
                    outstanding.remove(&c);
                    consuming.remove(&c);
                    vhost.open_channel(key(c), recorder.clone());
                }
            }
            vhost.run_dispatch();
            for &(channel, tag, redelivered, id) in &recorder.deliveries.lock()[seen..] {
                if !redelivered {
                    first_deliveries.push(id);
                }
                match consuming.get(&channel) {
                    Some((true, _)) => settled.push(id),
                    _ => {
                        outstanding.entry(channel).or_default().push((tag, id));
                        consumer_tags.entry(channel).or_default().insert(tag);
                    }
                }
            }
            seen = recorder.deliveries.lock().len();

            // Conservation: ready + dead-lettered + unacked + settled is
            // every id once.
            let body_id = |m: crate::queue::EntryRef<'_>| u32::from_be_bytes(m.message.unwrap().body()[..4].try_into().unwrap());
            let mut all: Vec<u32> = vhost.queue("q").unwrap().entries().into_iter().map(body_id).collect();
            all.extend(vhost.queue("dlq").unwrap().entries().into_iter().map(body_id));
            for (c, list) in &outstanding {
                prop_assert_eq!(vhost.channel_unacked(key(*c)), list.len());
                all.extend(list.iter().map(|t| t.1));
            }
            all.extend(settled.iter().copied());
            all.sort_unstable();
            prop_assert_eq!(all, (0..published).collect::<Vec<_>>());
            // Prefetch is respected for acking consumers.
            for (c, (no_ack, prefetch)) in &consuming {
                if !no_ack && *prefetch > 0 {
                    let tags = consumer_tags.get(c);
                    let held = outstanding.get(c).map_or(0, |l| l.iter().filter(|t| tags.is_some_and(|s| s.contains(&t.0))).count());
                    prop_assert!(held <= usize::from(*prefetch), "prefetch {} exceeded on channel {}: {}", prefetch, c, held);
                }
            }
        }
        // First deliveries leave in publish order.
        let mut sorted = first_deliveries.clone();
        sorted.sort_unstable();
        prop_assert_eq!(first_deliveries, sorted);
    }
}
