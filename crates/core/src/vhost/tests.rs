use super::*;
use warren_codec::properties::Properties;

type Delivery = (u16, String, u64, bool, Vec<u8>);

#[derive(Default)]
struct Recorder {
    deliveries: Mutex<Vec<Delivery>>,
    cancelled: Mutex<Vec<String>>,
}

impl Outbox for Recorder {
    fn deliver(&self, channel: u16, consumer_tag: &str, delivery_tag: u64, redelivered: bool, message: &Message) {
        self.deliveries.lock().push((channel, consumer_tag.into(), delivery_tag, redelivered, message.body().to_vec()));
    }
    fn consumer_cancelled(&self, _channel: u16, consumer_tag: &str) {
        self.cancelled.lock().push(consumer_tag.into());
    }
    fn is_congested(&self) -> bool {
        false
    }
}

fn message(routing_key: &str, body: &[u8]) -> Arc<Message> {
    let mut builder = Message::builder(b"", routing_key.as_bytes(), &Properties::empty(), body.len());
    builder.push_body(body);
    Arc::new(builder.finish())
}

fn setup() -> (VirtualHostState, Arc<Recorder>, ChannelKey) {
    let mut vhost = VirtualHostState::new("/");
    let recorder = Arc::new(Recorder::default());
    let key = ChannelKey { connection: 1, channel: 1 };
    vhost.open_channel(key, recorder.clone());
    (vhost, recorder, key)
}

/// A manual clock at 5 s, queue "q" dead-lettering to queue "dlq".
fn setup_expiring() -> (VirtualHostState, Arc<Recorder>, ChannelKey, Arc<crate::ManualClock>) {
    let (mut vhost, recorder, key) = setup();
    let clock = Arc::new(crate::ManualClock::new(5_000));
    vhost.set_clock(clock.clone());
    vhost.declare_queue(1, QueueDeclare::named("dlq")).unwrap();
    let dl = args(&[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("dlq"))]);
    vhost.declare_queue(1, QueueDeclare::named("q").with_arguments(dl)).unwrap();
    (vhost, recorder, key, clock)
}

use crate::test_support::{table as args, text};

fn int(value: i64) -> warren_codec::types::AMQPValue {
    warren_codec::types::AMQPValue::LongLongInt(value)
}

fn bodies(vhost: &mut VirtualHostState, key: ChannelKey, queue: &str) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| vhost.get(key, queue, true).unwrap()).map(|m| m.message.body().to_vec()).collect()
}

fn with_expiration(routing_key: &str, body: &[u8], millis: &str) -> Arc<Message> {
    let mut encoded = vec![u8::try_from(millis.len()).unwrap()];
    encoded.extend_from_slice(millis.as_bytes());
    let props = Properties::empty().with_field(warren_codec::properties::flag::EXPIRATION, Some(&encoded));
    let mut builder = Message::builder(b"", routing_key.as_bytes(), &props, body.len());
    builder.push_body(body);
    Arc::new(builder.finish())
}

#[test]
fn rejected_messages_go_to_the_dead_letter_exchange_and_cycles_stop() {
    let (mut vhost, recorder, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("dlq")).unwrap();
    let dl = args(&[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("dlq"))]);
    vhost.declare_queue(1, QueueDeclare::named("work").with_arguments(dl)).unwrap();
    vhost.consume(key, Consume::new("work", "c")).unwrap();
    vhost.publish("", message("work", b"a"), &[]).unwrap();
    vhost.publish("", message("work", b"b"), &[]).unwrap();
    vhost.run_dispatch();
    assert_eq!(recorder.deliveries.lock().len(), 2);
    vhost.nack(key, 2, true, false).unwrap();
    vhost.cancel(key, "c");
    assert_eq!(bodies(&mut vhost, key, "dlq"), vec![b"a".to_vec(), b"b".to_vec()]);

    // An expiring queue dead-lettering into itself: dropped as a cycle.
    let clock = Arc::new(crate::ManualClock::new(1_000));
    vhost.set_clock(clock.clone());
    let selfish = args(&[
        ("x-message-ttl", int(10)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text("loop")),
    ]);
    vhost.declare_queue(1, QueueDeclare::named("loop").with_arguments(selfish)).unwrap();
    vhost.publish("", message("loop", b"x"), &[]).unwrap();
    clock.advance(10);
    vhost.tick();
    assert_eq!(vhost.queue("loop").map(Queue::len), Some(1), "due only once strictly past its deadline");
    clock.advance(1);
    vhost.tick();
    assert_eq!(vhost.queue("loop").map(Queue::len), Some(0), "back into the queue it died in: a cycle, dropped");
}

#[test]
fn length_limits_drop_the_head_or_refuse_the_publish() {
    let (mut vhost, _, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("dlq")).unwrap();
    let drop_head = args(&[
        ("x-max-length", int(2)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text("dlq")),
    ]);
    vhost.declare_queue(1, QueueDeclare::named("head").with_arguments(drop_head)).unwrap();
    for body in [b"1", b"2", b"3"] {
        assert!(!vhost.publish("", message("head", body), &[]).unwrap().rejected);
    }
    assert_eq!(bodies(&mut vhost, key, "head"), vec![b"2".to_vec(), b"3".to_vec()]);
    assert_eq!(bodies(&mut vhost, key, "dlq"), vec![b"1".to_vec()]);

    let reject = args(&[("x-max-length-bytes", int(10)), ("x-overflow", text("reject-publish"))]);
    vhost.declare_queue(1, QueueDeclare::named("bytes").with_arguments(reject)).unwrap();
    let outcomes: Vec<bool> = [&b"123456"[..], b"1234", b"1"]
        .iter()
        .map(|body| vhost.publish("", message("bytes", body), &[]).unwrap().rejected)
        .collect();
    assert_eq!(outcomes, vec![false, false, true]);
    assert_eq!(vhost.queue("bytes").map(Queue::bytes), Some(10));
}

#[test]
fn expired_messages_leave_from_anywhere_and_are_never_delivered() {
    let (mut vhost, recorder, key, clock) = setup_expiring();
    vhost.publish("", with_expiration("q", b"long", "1000"), &[]).unwrap();
    vhost.publish("", with_expiration("q", b"short", "10"), &[]).unwrap();
    vhost.publish("", message("q", b"forever"), &[]).unwrap();
    clock.advance(11);
    vhost.tick();
    assert_eq!(vhost.queue("q").map(Queue::len), Some(2), "the short one left from behind the head");
    assert_eq!(bodies(&mut vhost, key, "dlq"), vec![b"short".to_vec()]);

    // Due but not yet ticked: a consumer still never sees it.
    clock.advance(1_000);
    vhost.consume(key, Consume { no_ack: true, ..Consume::new("q", "c") }).unwrap();
    vhost.run_dispatch();
    let delivered: Vec<Vec<u8>> = recorder.deliveries.lock().iter().map(|d| d.4.clone()).collect();
    assert_eq!(delivered, vec![b"forever".to_vec()]);
    assert_eq!(bodies(&mut vhost, key, "dlq"), vec![b"long".to_vec()]);

    // x-expires: an unused queue goes away.
    vhost.declare_queue(1, QueueDeclare::named("brief").with_arguments(args(&[("x-expires", int(100))]))).unwrap();
    clock.advance(99);
    vhost.tick();
    assert!(vhost.queue("brief").is_some());
    clock.advance(1);
    vhost.tick();
    assert!(vhost.queue("brief").is_none());
}

#[test]
fn a_zero_ttl_reaches_a_waiting_consumer_however_late_the_dispatch() {
    let (mut vhost, recorder, key, clock) = setup_expiring();
    vhost.qos(key, 0, 1, false);
    vhost.consume(key, Consume::new("q", "c")).unwrap();
    vhost.run_dispatch();
    vhost.publish("", with_expiration("q", b"waited-for", "0"), &[]).unwrap();
    clock.advance(5);
    vhost.run_dispatch();
    // The consumer's one credit is taken: the next has no one waiting.
    vhost.publish("", with_expiration("q", b"too-late", "0"), &[]).unwrap();
    vhost.run_dispatch();
    clock.advance(1);
    vhost.ack(key, 1, false).unwrap();
    vhost.run_dispatch();
    let delivered: Vec<Vec<u8>> = recorder.deliveries.lock().iter().map(|d| d.4.clone()).collect();
    assert_eq!(delivered, vec![b"waited-for".to_vec()]);
    vhost.cancel(key, "c");
    assert_eq!(bodies(&mut vhost, key, "dlq"), vec![b"too-late".to_vec()]);
}

#[test]
fn a_delivery_limit_counts_returns_then_dead_letters() {
    let (mut vhost, recorder, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("dlq")).unwrap();
    let limited = args(&[
        ("x-delivery-limit", int(1)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text("dlq")),
    ]);
    vhost.declare_queue(1, QueueDeclare::named("q").with_arguments(limited)).unwrap();
    vhost.publish("", message("q", b"poison"), &[]).unwrap();
    vhost.consume(key, Consume::new("q", "c")).unwrap();
    vhost.run_dispatch();
    vhost.nack(key, 1, false, true).unwrap();
    vhost.run_dispatch();
    {
        let deliveries = recorder.deliveries.lock();
        assert_eq!(deliveries.len(), 2);
        assert!(deliveries[1].3, "second delivery is flagged redelivered");
    }
    vhost.nack(key, 2, false, true).unwrap();
    vhost.run_dispatch();
    assert_eq!(recorder.deliveries.lock().len(), 2, "not delivered a third time");
    vhost.cancel(key, "c");
    let dead = vhost.get(key, "dlq", true).unwrap().unwrap();
    let headers = dead.message.properties_view().headers().unwrap();
    let first = warren_codec::table::get(&headers, "x-first-death-reason").and_then(warren_codec::table::as_str);
    assert_eq!(first, Some("delivery_limit"));
}

#[test]
fn prefetch_limits_deliveries_and_acks_release_more() {
    let (mut vhost, recorder, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("q")).unwrap();
    vhost.qos(key, 0, 2, false);
    vhost.consume(key, Consume::new("q", "c")).unwrap();
    for i in 0..5u8 {
        vhost.publish("", message("q", &[i]), &[]).unwrap();
    }
    vhost.run_dispatch();
    assert_eq!(recorder.deliveries.lock().len(), 2);
    vhost.ack(key, 2, true).unwrap();
    vhost.run_dispatch();
    let bodies: Vec<u8> = recorder.deliveries.lock().iter().map(|d| d.4[0]).collect();
    assert_eq!(bodies, vec![0, 1, 2, 3]);
    assert!(vhost.ack(key, 2, false).is_err(), "double ack is an unknown tag");
}

#[test]
fn closing_a_channel_requeues_in_original_order_with_redelivered() {
    let (mut vhost, recorder, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("q")).unwrap();
    vhost.consume(key, Consume::new("q", "c")).unwrap();
    for i in 0..3u8 {
        vhost.publish("", message("q", &[i]), &[]).unwrap();
    }
    vhost.run_dispatch();
    assert_eq!(recorder.deliveries.lock().len(), 3);
    vhost.close_channel(key);
    let queue = vhost.queue("q").unwrap();
    assert_eq!(queue.len(), 3);
    assert!(queue.entries()[0].redelivered);
    let other = ChannelKey { connection: 1, channel: 2 };
    vhost.open_channel(other, recorder.clone());
    let got = vhost.get(other, "q", true).unwrap().unwrap();
    assert_eq!(got.message.body(), &[0]);
    assert!(got.redelivered);
    assert_eq!(got.message_count, 2);
}

/// Found by the model test: acking a delivery made to a cancelled
/// consumer used to free credit of a new consumer with the same tag.
#[test]
fn reusing_a_consumer_tag_does_not_inherit_old_unacked_credit() {
    let (mut vhost, recorder, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("q")).unwrap();
    for i in 0..3u8 {
        vhost.publish("", message("q", &[i]), &[]).unwrap();
    }
    vhost.consume(key, Consume::new("q", "tag")).unwrap();
    vhost.run_dispatch();
    assert!(vhost.cancel(key, "tag"));
    for i in 3..5u8 {
        vhost.publish("", message("q", &[i]), &[]).unwrap();
    }
    vhost.qos(key, 0, 1, false);
    vhost.consume(key, Consume::new("q", "tag")).unwrap();
    vhost.run_dispatch();
    assert_eq!(recorder.deliveries.lock().len(), 4);
    vhost.ack(key, 1, false).unwrap();
    vhost.run_dispatch();
    assert_eq!(recorder.deliveries.lock().len(), 4, "the new consumer still holds its one message");
}

#[test]
fn journal_records_persistent_messages_in_durable_queues_and_their_settlement() {
    let (mut vhost, _recorder, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("durable").durable()).unwrap();
    vhost.declare_queue(1, QueueDeclare::named("transient")).unwrap();
    vhost.declare_exchange(ExchangeDeclare::new("fan", "fanout").durable()).unwrap();
    vhost.bind_queue(1, "durable", "fan", "", FieldTable::default(), true).unwrap();
    vhost.bind_queue(1, "transient", "fan", "", FieldTable::default(), true).unwrap();
    let mut definitions = Vec::new();
    vhost.drain_journal(&mut definitions);
    let kinds: Vec<String> = definitions
        .iter()
        .map(|e| match e {
            JournalEvent::QueueDeclared(q) => format!("Q{}", q.name),
            JournalEvent::ExchangeDeclared(x) => format!("X{}", x.name),
            JournalEvent::Bound(b) => format!("B{}>{}", b.source, b.destination),
            _ => "other".into(),
        })
        .collect();
    assert_eq!(kinds, ["Qdurable", "Xfan", "Bfan>durable"], "only durable definitions are journaled");
    let props = Properties::parse(bytes::Bytes::from_static(&[0x10, 0, 2])).unwrap();
    let transient = Properties::empty();
    let mut events = Vec::new();
    // What a store does: record where each published message went.
    let mut publish = |vhost: &mut VirtualHostState, index: u64, persistent: bool| {
        let mut builder = Message::builder(b"fan", b"", if persistent { &props } else { &transient }, 1);
        builder.push_body(b"x");
        vhost.publish("fan", Arc::new(builder.finish()), &[]).unwrap();
        let start = events.len();
        vhost.drain_journal(&mut events);
        for event in &events[start..] {
            if let JournalEvent::Published { message, .. } = event {
                message.set_stored_index(index);
            }
        }
    };
    publish(&mut vhost, 7, true);
    publish(&mut vhost, 0, false);
    publish(&mut vhost, 8, true);
    let got = vhost.get(key, "durable", false).unwrap().unwrap();
    vhost.ack(key, got.delivery_tag, false).unwrap();
    vhost.purge_queue(1, "durable").unwrap();
    vhost.drain_journal(&mut events);
    let summary: Vec<String> = events
        .iter()
        .map(|e| match e {
            JournalEvent::Published { message, queues } => format!("P{}{:?}", message.stored_index(), queues),
            JournalEvent::Settled { queue, stored } => format!("S{stored}{queue}"),
            JournalEvent::QueueDeleted { queue } => format!("D{queue}"),
            JournalEvent::Returned { queue, stored, returns, retry_at_ms: None } => {
                format!("R{stored}{queue}{returns}")
            }
            JournalEvent::Returned { queue, stored, returns, retry_at_ms: Some(due) } => {
                format!("R{stored}{queue}{returns}@{due}")
            }
            _ => "definition".into(),
        })
        .collect();
    assert_eq!(summary, vec!["P7[\"durable\"]", "P8[\"durable\"]", "S7durable", "S8durable"]);
    let definitions = vhost.durable_definitions();
    assert_eq!(definitions.queues.len(), 1);
    assert_eq!(definitions.exchanges.len(), 1);
    assert_eq!(definitions.bindings.len(), 1, "only bindings between durable ends are stored");
    let mut restored = VirtualHostState::new("/");
    restored.restore(&definitions);
    assert_eq!(restored.durable_definitions(), definitions);
}

#[test]
fn round_robin_between_competing_consumers() {
    let (mut vhost, recorder, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("q")).unwrap();
    vhost.consume(key, Consume { no_ack: true, ..Consume::new("q", "a") }).unwrap();
    vhost.consume(key, Consume { no_ack: true, ..Consume::new("q", "b") }).unwrap();
    for i in 0..4u8 {
        vhost.publish("", message("q", &[i]), &[]).unwrap();
        vhost.run_dispatch();
    }
    let tags: Vec<String> = recorder.deliveries.lock().iter().map(|d| d.1.clone()).collect();
    assert_eq!(tags, vec!["a", "b", "a", "b"]);
}

#[test]
fn exchange_to_exchange_cycles_and_alternate_exchange() {
    let (mut vhost, _recorder, _key) = setup();
    let none = FieldTable::default;
    vhost.declare_exchange(ExchangeDeclare::new("x1", "fanout")).unwrap();
    vhost.declare_exchange(ExchangeDeclare::new("x2", "fanout")).unwrap();
    vhost.bind_exchange("x2", "x1", "", none(), true).unwrap();
    vhost.bind_exchange("x1", "x2", "", none(), true).unwrap();
    vhost.declare_queue(1, QueueDeclare::named("q")).unwrap();
    vhost.bind_queue(1, "q", "x2", "", none(), true).unwrap();
    assert_eq!(vhost.publish("x1", message("k", b"m"), &[]).unwrap().queues, 1);
    let mut args = FieldTable::default();
    args.insert("alternate-exchange".into(), warren_codec::types::AMQPValue::LongString("x1".into()));
    vhost.declare_exchange(ExchangeDeclare::new("d", "direct").with_arguments(args)).unwrap();
    assert_eq!(vhost.publish("d", message("nothing-bound", b"m"), &[]).unwrap().queues, 1);
    assert_eq!(vhost.queue("q").unwrap().len(), 2);
}

#[test]
fn deleting_a_queue_cancels_its_consumers() {
    let (mut vhost, recorder, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("q")).unwrap();
    vhost.consume(key, Consume::new("q", "c")).unwrap();
    vhost.delete_queue(1, "q", false, false).unwrap();
    // Held until the caller has written delete-ok.
    assert!(recorder.cancelled.lock().is_empty());
    vhost.send_notices();
    assert_eq!(*recorder.cancelled.lock(), vec!["c".to_string()]);
    assert!(vhost.publish("", message("q", b"x"), &[]).unwrap().queues == 0);
}

#[test]
fn a_queues_unacked_count_follows_deliveries_settlements_and_closed_channels() {
    let (mut vhost, _recorder, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("q")).unwrap();
    for i in 0..4u8 {
        vhost.publish("", message("q", &[i]), &[]).unwrap();
    }
    vhost.consume(key, Consume::new("q", "tag")).unwrap();
    vhost.run_dispatch();
    let counts = |vhost: &VirtualHostState| vhost.queue_summary("q").map(|q| (q.ready, q.unacked));
    assert_eq!(counts(&vhost), Some((0, 4)));
    vhost.ack(key, 1, false).unwrap();
    vhost.nack(key, 2, false, false).unwrap();
    assert_eq!(counts(&vhost), Some((0, 2)));
    let other = ChannelKey { connection: 1, channel: 2 };
    vhost.open_channel(other, Arc::new(Recorder::default()));
    vhost.close_channel(key);
    assert_eq!(counts(&vhost), Some((2, 0)), "a closed channel's deliveries are ready again, none unacked");
}

#[test]
fn message_stats_count_publishes_deliveries_gets_redeliveries_and_acks() {
    let (mut vhost, _recorder, key) = setup();
    vhost.declare_queue(1, QueueDeclare::named("q")).unwrap();
    for i in 0..3u8 {
        vhost.publish("", message("q", &[i]), &[]).unwrap();
    }
    vhost.publish("", message("nowhere", b"x"), &[]).unwrap();
    let got = vhost.get(key, "q", true).unwrap().unwrap();
    assert!(!got.redelivered);
    vhost.consume(key, Consume::new("q", "tag")).unwrap();
    vhost.run_dispatch();
    vhost.nack(key, 2, false, true).unwrap();
    vhost.run_dispatch();
    vhost.ack(key, 0, true).unwrap();
    let q = vhost.queue_summary("q").unwrap().stats;
    assert_eq!((q.publish, q.get_no_ack, q.deliver, q.redeliver, q.ack), (3, 1, 3, 1, 2));
    assert_eq!(q.deliver_get(), 4);
    let all = vhost.message_stats();
    assert_eq!((all.publish, all.unroutable, all.deliver, all.ack), (4, 1, 3, 2));
}

/// A message routed to a durable queue and to a stream is stored once, for
/// the durable queue: neither reading it from the stream, nor deleting the
/// stream with the delivery unacked, settles that entry.
#[test]
fn a_stream_sharing_a_stored_message_never_settles_it() {
    let (mut vhost, recorder, key) = setup();
    vhost.declare_exchange(ExchangeDeclare::new("orders", "fanout").durable()).unwrap();
    vhost.declare_queue(1, QueueDeclare::named("jobs").durable()).unwrap();
    let stream = args(&[("x-queue-type", text("stream"))]);
    vhost.declare_queue(1, QueueDeclare::named("log").durable().with_arguments(stream)).unwrap();
    vhost.bind_queue(1, "jobs", "orders", "", FieldTable::default(), true).unwrap();
    vhost.bind_queue(1, "log", "orders", "", FieldTable::default(), true).unwrap();
    let mut journal = Vec::new();
    vhost.drain_journal(&mut journal);
    let mut shared = message("", b"order 1");
    Arc::get_mut(&mut shared).unwrap().persistent = true;
    journal.clear();
    vhost.publish("orders", shared.clone(), &[]).unwrap();
    vhost.drain_journal(&mut journal);
    assert_eq!(journal.len(), 2, "{journal:?}");
    assert!(journal
        .iter()
        .any(|e| matches!(e, JournalEvent::StreamAppended { first: 0, queue, .. } if &**queue == "log")));
    assert!(journal
        .iter()
        .any(|e| matches!(e, JournalEvent::Published { queues, .. } if queues.iter().map(|q| &**q).eq(["jobs"]))));
    // The store gave the message its entry, and made the stream durable.
    shared.set_stored_index(7);
    vhost.stream_durable("log", 1);
    vhost.qos(key, 0, 10, false);
    let mut consume = Consume::new("log", "reader");
    consume.arguments = args(&[("x-stream-offset", text("first"))]);
    vhost.consume(key, consume).unwrap();
    vhost.run_dispatch();
    assert_eq!(recorder.deliveries.lock().len(), 1);
    journal.clear();
    vhost.delete_queue(1, "log", false, false).unwrap();
    vhost.drain_journal(&mut journal);
    assert!(!journal.iter().any(|e| matches!(e, JournalEvent::Settled { .. })), "nothing settled: {journal:?}");
    assert!(journal.iter().any(|e| matches!(e, JournalEvent::QueueDeleted { queue } if &**queue == "log")));
    vhost.ack(key, 1, false).unwrap();
    vhost.drain_journal(&mut journal);
    assert!(!journal.iter().any(|e| matches!(e, JournalEvent::Settled { .. })));
    assert_eq!(bodies(&mut vhost, key, "jobs"), vec![b"order 1".to_vec()]);
}

/// A consumer of a stand-in is answered (`consume-ok`) once the leader
/// accepted it. If this node takes the queue over first, the queue's
/// messages wait for that answer: a delivery before it names a consumer
/// the client does not know yet.
#[test]
fn a_stand_in_consumer_taken_over_gets_nothing_before_its_answer() {
    let (mut vhost, recorder, key) = setup();
    vhost.declare_replicated("orders", args(&[("x-queue-type", text("quorum"))]), true).unwrap();
    vhost.consume(key, Consume::new("orders", "c")).unwrap();
    vhost.promote_replicated("orders");
    vhost.accept_replicated("orders", message("orders", b"m1"));
    vhost.run_dispatch();
    assert_eq!(recorder.deliveries.lock().len(), 0, "not answered yet");
    vhost.consumer_answered(key, "c");
    vhost.run_dispatch();
    assert_eq!(recorder.deliveries.lock().len(), 1);
}
