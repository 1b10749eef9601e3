//! Queue features driven by `x-` arguments and message properties, through
//! lapin against a real server: dead-lettering, TTL, queue expiry, length
//! limits, delivery limits, and their survival across restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{args, consume, long, open, text, wait_count, TestServer};
use futures_lite::StreamExt;
use lapin::message::BasicGetMessage;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};

/// Lets the broker's timers run several times (they tick every 5 ms, and
/// consumer timeouts every 100 ms) with a manual clock standing still:
/// whatever is timed must not happen meanwhile, however slow the machine.
async fn timers_run() {
    tokio::time::sleep(Duration::from_millis(120)).await;
}

/// The ready count, by a passive declare.
async fn count(ch: &Channel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    ch.queue_declare(queue.into(), passive, FieldTable::default()).await.unwrap().message_count()
}

/// Whether `queue` exists (a passive declare on a channel of its own, since
/// a missing queue closes it).
async fn exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    ch.queue_declare(queue.into(), passive, FieldTable::default()).await.is_ok()
}

async fn queue(ch: &Channel, name: &str, durable: bool, arguments: FieldTable) {
    ch.queue_declare(name.into(), QueueDeclareOptions { durable, ..Default::default() }, arguments).await.unwrap();
}

/// A queue dead-lettering to `dlq` through the default exchange.
fn to_dlq(mut extra: Vec<(&str, AMQPValue)>) -> FieldTable {
    extra.push(("x-dead-letter-exchange", text("")));
    extra.push(("x-dead-letter-routing-key", text("dlq")));
    args(&extra)
}

async fn publish(ch: &Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, properties).await.unwrap();
}

async fn get(ch: &Channel, queue: &str) -> Option<BasicGetMessage> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap()
}

fn header<'a>(headers: &'a FieldTable, key: &str) -> &'a AMQPValue {
    headers.inner().get(key).unwrap_or_else(|| panic!("no header {key} in {headers:?}"))
}

fn string(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => s.to_string(),
        other => panic!("not a long string: {other:?}"),
    }
}

/// The x-death entries of a dead-lettered message, most recent first.
fn deaths(message: &BasicGetMessage) -> Vec<FieldTable> {
    let headers = message.delivery.properties.headers().as_ref().expect("headers");
    match header(headers, "x-death") {
        AMQPValue::FieldArray(array) => array
            .as_slice()
            .iter()
            .map(|d| match d {
                AMQPValue::FieldTable(t) => t.clone(),
                other => panic!("x-death entry is {other:?}"),
            })
            .collect(),
        other => panic!("x-death is {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_are_dead_lettered_with_their_history() {
    let server = TestServer::start().await;
    let (_conn, ch) = open(&server).await;
    ch.exchange_declare("dlx".into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    queue(&ch, "dlq", false, FieldTable::default()).await;
    ch.queue_bind("dlq".into(), "dlx".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    queue(&ch, "work", false, args(&[("x-dead-letter-exchange", text("dlx"))])).await;
    let properties = BasicProperties::default().with_message_id("m1".into()).with_expiration("60000".into());
    publish(&ch, "work", b"job", properties).await;
    let job = ch.basic_get("work".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    job.delivery.acker.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    wait_count(&ch, "dlq", 1).await;

    let dead = get(&ch, "dlq").await.unwrap();
    assert_eq!(dead.delivery.data, b"job");
    assert_eq!(dead.delivery.exchange.as_str(), "dlx");
    assert_eq!(dead.delivery.routing_key.as_str(), "work");
    assert_eq!(dead.delivery.properties.message_id().as_ref().map(|s| s.as_str()), Some("m1"));
    assert!(dead.delivery.properties.expiration().is_none(), "expiration is removed");
    let headers = dead.delivery.properties.headers().as_ref().unwrap();
    assert_eq!(string(header(headers, "x-first-death-reason")), "rejected");
    assert_eq!(string(header(headers, "x-first-death-queue")), "work");
    assert_eq!(string(header(headers, "x-first-death-exchange")), "");
    let history = deaths(&dead);
    assert_eq!(history.len(), 1);
    let death = &history[0];
    assert_eq!(header(death, "count"), &AMQPValue::LongLongInt(1));
    assert_eq!(string(header(death, "reason")), "rejected");
    assert_eq!(string(header(death, "queue")), "work");
    assert_eq!(string(header(death, "exchange")), "");
    assert_eq!(string(header(death, "original-expiration")), "60000");
    assert!(matches!(header(death, "time"), AMQPValue::Timestamp(t) if *t > 1_600_000_000));
    match header(death, "routing-keys") {
        AMQPValue::FieldArray(keys) => assert_eq!(keys.as_slice(), &[text("work")]),
        other => panic!("routing-keys is {other:?}"),
    }

    // Rejected again from the dead-letter queue's own consumer into a
    // second queue: the history grows, most recent first.
    queue(&ch, "dlq2", false, FieldTable::default()).await;
    queue(
        &ch,
        "retry",
        false,
        args(&[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("dlq2"))]),
    )
    .await;
    ch.basic_publish("".into(), "retry".into(), BasicPublishOptions::default(), b"job", dead.delivery.properties)
        .await
        .unwrap();
    let again = ch.basic_get("retry".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    again.delivery.acker.nack(BasicNackOptions { requeue: false, multiple: false }).await.unwrap();
    wait_count(&ch, "dlq2", 1).await;
    let twice = get(&ch, "dlq2").await.unwrap();
    let history: Vec<String> = deaths(&twice).iter().map(|d| string(header(d, "queue"))).collect();
    assert_eq!(history, vec!["retry", "work"]);
    let headers = twice.delivery.properties.headers().as_ref().unwrap();
    assert_eq!(string(header(headers, "x-first-death-queue")), "work", "the first death is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_limits_drop_the_oldest_or_nack_the_publisher() {
    let server = TestServer::start().await;
    let (_conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    queue(&ch, "dlq", false, FieldTable::default()).await;

    queue(&ch, "newest", false, to_dlq(vec![("x-max-length", long(2))])).await;
    for body in [b"1", b"2", b"3"] {
        publish(&ch, "newest", body, BasicProperties::default()).await;
    }
    wait_count(&ch, "dlq", 1).await;
    let dropped = get(&ch, "dlq").await.unwrap();
    assert_eq!(dropped.delivery.data, b"1");
    assert_eq!(string(header(&deaths(&dropped)[0], "reason")), "maxlen");
    assert_eq!(get(&ch, "newest").await.unwrap().delivery.data, b"2");

    for (name, overflow) in [("refusing", "reject-publish"), ("refusing-dlx", "reject-publish-dlx")] {
        queue(&ch, name, false, to_dlq(vec![("x-max-length", long(2)), ("x-overflow", text(overflow))])).await;
        let mut outcomes = Vec::new();
        for body in [b"a", b"b", b"c"] {
            let confirm = ch
                .basic_publish("".into(), name.into(), BasicPublishOptions::default(), body, BasicProperties::default())
                .await
                .unwrap();
            outcomes.push(confirm.await.unwrap().is_ack());
        }
        assert_eq!(outcomes, vec![true, true, false], "{overflow}: the third publish is nacked");
        assert_eq!(get(&ch, name).await.unwrap().delivery.data, b"a");
    }
    // Only reject-publish-dlx dead-letters what it refuses.
    wait_count(&ch, "dlq", 1).await;
    let refused = get(&ch, "dlq").await.unwrap();
    assert_eq!(refused.delivery.data, b"c");
    assert_eq!(string(header(&deaths(&refused)[0], "queue")), "refusing-dlx");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_expire_wherever_they_are_and_unused_queues_go_away() {
    let server = TestServer::with_manual_clock(|_| {}).await;
    let (conn, ch) = open(&server).await;
    queue(&ch, "dlq", false, FieldTable::default()).await;
    queue(&ch, "mixed", false, to_dlq(vec![])).await;
    publish(&ch, "mixed", b"stays", BasicProperties::default()).await;
    publish(&ch, "mixed", b"brief", BasicProperties::default().with_expiration("30".into())).await;
    wait_count(&ch, "mixed", 2).await;
    timers_run().await;
    assert_eq!(count(&ch, "dlq").await, 0, "nothing expires while the clock stands still");
    server.advance(31);
    wait_count(&ch, "dlq", 1).await;
    let expired = get(&ch, "dlq").await.unwrap();
    assert_eq!(expired.delivery.data, b"brief", "expired from behind the head");
    assert_eq!(string(header(&deaths(&expired)[0], "reason")), "expired");
    wait_count(&ch, "mixed", 1).await;

    queue(&ch, "ttl", false, to_dlq(vec![("x-message-ttl", long(30))])).await;
    for body in [b"1", b"2", b"3"] {
        publish(&ch, "ttl", body, BasicProperties::default()).await;
    }
    wait_count(&ch, "ttl", 3).await;
    server.advance(29);
    timers_run().await;
    assert_eq!(count(&ch, "ttl").await, 3, "29 ms of a 30 ms TTL");
    server.advance(2);
    wait_count(&ch, "dlq", 3).await;
    wait_count(&ch, "ttl", 0).await;

    // Looked at from the inside: a passive declare is a use and would
    // restart the expiry.
    let vhost = server.broker.vhost("/").unwrap();
    let present = || vhost.lock().queue("brief-queue").is_some();
    queue(&ch, "brief-queue", false, args(&[("x-expires", long(50))])).await;
    server.advance(49);
    timers_run().await;
    assert!(present(), "49 ms of a 50 ms x-expires");
    server.advance(2);
    for _ in 0..200 {
        if !present() {
            assert!(!exists(&conn, "brief-queue").await);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("an unused queue past its x-expires was not deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_after_its_delivery_limit() {
    let server = TestServer::start().await;
    let (_conn, ch) = open(&server).await;
    queue(&ch, "dlq", false, FieldTable::default()).await;
    queue(&ch, "jobs", false, to_dlq(vec![("x-delivery-limit", long(2))])).await;
    publish(&ch, "jobs", b"poison", BasicProperties::default()).await;
    let mut consumer = consume(&ch, "jobs", "worker", false).await;
    let mut counts = Vec::new();
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
        let count = delivery.properties.headers().as_ref().and_then(|h| h.inner().get("x-delivery-count").cloned());
        counts.push(count);
        delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
    }
    let expected: Vec<Option<AMQPValue>> = (0..3).map(|n| Some(AMQPValue::LongLongInt(n))).collect();
    assert_eq!(counts, expected, "counted from the first delivery, as quorum queues do");
    wait_count(&ch, "dlq", 1).await;
    let dead = get(&ch, "dlq").await.unwrap();
    assert_eq!(string(header(&deaths(&dead)[0], "reason")), "delivery_limit");
    assert!(tokio::time::timeout(Duration::from_millis(200), consumer.next()).await.is_err(), "not delivered again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_and_dead_letters_survive_a_restart() {
    let server = TestServer::with_manual_clock(|_| {}).await;
    {
        let (_conn, ch) = open(&server).await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        queue(&ch, "dlq", true, FieldTable::default()).await;
        queue(&ch, "slow", true, to_dlq(vec![("x-message-ttl", long(1500))])).await;
        queue(&ch, "rejects", true, to_dlq(vec![])).await;
        let persistent = BasicProperties::default().with_delivery_mode(2);
        for (queue, body) in [("slow", &b"expiring"[..]), ("rejects", b"rejected")] {
            ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, persistent.clone())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let bounded = args(&[("x-max-length", long(1)), ("x-overflow", text("reject-publish"))]);
        queue(&ch, "bounded", true, bounded).await;
        let rejected = ch.basic_get("rejects".into(), BasicGetOptions::default()).await.unwrap().unwrap();
        rejected.delivery.acker.reject(BasicRejectOptions { requeue: false }).await.unwrap();
        wait_count(&ch, "dlq", 1).await;
    }
    server.advance(1000);
    let server = server.restart().await;
    let (_conn, ch) = open(&server).await;
    let q = ch
        .queue_declare(
            "slow".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 1, "still within its TTL after the restart");
    wait_count(&ch, "rejects", 0).await;
    // The TTL counts from the original arrival, not from the restart: 1000
    // ms passed before it, 501 more expire the message.
    server.advance(501);
    wait_count(&ch, "dlq", 2).await;
    let first = get(&ch, "dlq").await.unwrap();
    assert_eq!(first.delivery.data, b"rejected");
    // The length limit is still in force.
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut outcomes = Vec::new();
    for body in [b"1", b"2"] {
        let confirm = ch
            .basic_publish(
                "".into(),
                "bounded".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
        outcomes.push(confirm.await.unwrap().is_ack());
    }
    assert_eq!(outcomes, vec![true, false]);
    let second = get(&ch, "dlq").await.unwrap();
    assert_eq!(second.delivery.data, b"expiring");
    assert_eq!(string(header(&deaths(&second)[0], "reason")), "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_are_served_highest_first_and_survive_a_restart() {
    let server = TestServer::start().await;
    let sent: [(&str, Option<u8>); 7] = [
        ("none", None),
        ("p0", Some(0)),
        ("p5a", Some(5)),
        ("p1", Some(1)),
        ("p5b", Some(5)),
        ("p9", Some(9)),
        ("p3", Some(3)),
    ];
    {
        let (_conn, ch) = open(&server).await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        queue(&ch, "ranked", true, args(&[("x-max-priority", long(5))])).await;
        for (body, priority) in sent {
            let mut properties = BasicProperties::default().with_delivery_mode(2);
            if let Some(priority) = priority {
                properties = properties.with_priority(priority);
            }
            ch.basic_publish("".into(), "ranked".into(), BasicPublishOptions::default(), body.as_bytes(), properties)
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    // Above the maximum counts as the maximum; FIFO within a priority.
    let expected: Vec<&str> = vec!["p5a", "p5b", "p9", "p3", "p1", "none", "p0"];
    let server = server.restart().await;
    let (_conn, ch) = open(&server).await;
    let mut order = Vec::new();
    while let Some(message) = get(&ch, "ranked").await {
        order.push(String::from_utf8(message.delivery.data).unwrap());
    }
    assert_eq!(order, expected);
}

/// Counts what each consumer receives within a short quiet period.
async fn drain(consumer: &mut lapin::Consumer) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await {
        bodies.push(delivery.data);
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_consumers_are_served_first_and_single_active_consumer_fails_over() {
    let server = TestServer::start().await;
    let (conn, ch) = open(&server).await;
    queue(&ch, "shared", false, FieldTable::default()).await;
    let mut consumers = Vec::new();
    for (tag, priority) in [("low", 0), ("high", 10)] {
        let channel = conn.create_channel().await.unwrap();
        channel.basic_qos(5, BasicQosOptions::default()).await.unwrap();
        let consumer = channel
            .basic_consume(
                "shared".into(),
                tag.into(),
                BasicConsumeOptions::default(),
                args(&[("x-priority", long(priority))]),
            )
            .await
            .unwrap();
        consumers.push((channel, consumer));
    }
    for i in 0..6u8 {
        publish(&ch, "shared", &[i], BasicProperties::default()).await;
    }
    let low = drain(&mut consumers[0].1).await;
    let high = drain(&mut consumers[1].1).await;
    assert_eq!((high.len(), low.len()), (5, 1), "the high-priority consumer fills its prefetch first");

    queue(&ch, "single", false, args(&[("x-single-active-consumer", AMQPValue::Boolean(true))])).await;
    let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut first = ch.basic_consume("single".into(), "first".into(), options, FieldTable::default()).await.unwrap();
    let mut second = ch.basic_consume("single".into(), "second".into(), options, FieldTable::default()).await.unwrap();
    for i in 0..4u8 {
        publish(&ch, "single", &[i], BasicProperties::default()).await;
    }
    assert_eq!(drain(&mut first).await.len(), 4);
    assert!(drain(&mut second).await.is_empty(), "an inactive consumer gets nothing");
    ch.basic_cancel("first".into(), BasicCancelOptions::default()).await.unwrap();
    for i in 0..2u8 {
        publish(&ch, "single", &[i], BasicProperties::default()).await;
    }
    assert_eq!(drain(&mut second).await.len(), 2, "the next consumer takes over");
}

fn delayed(millis: i64) -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2).with_headers(args(&[("x-delay", long(millis))]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_wait_for_their_time_even_across_a_restart() {
    let server = TestServer::with_manual_clock(|_| {}).await;
    let (_conn, ch) = open(&server).await;
    let refused = ch
        .exchange_declare(
            "no-type".into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert!(format!("{refused:?}").contains("'x-delayed-type' must be an existing exchange type"), "{refused:?}");

    let (_conn, ch) = open(&server).await;
    ch.exchange_declare(
        "later".into(),
        ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions { durable: true, ..Default::default() },
        args(&[("x-delayed-type", text("direct"))]),
    )
    .await
    .unwrap();
    queue(&ch, "timed", true, FieldTable::default()).await;
    ch.queue_bind("timed".into(), "later".into(), "k".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for (body, properties) in
        [(&b"soon"[..], delayed(200)), (b"now", BasicProperties::default()), (b"restart", delayed(1500))]
    {
        let confirm = ch
            .basic_publish(
                "later".into(),
                "k".into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                body,
                properties,
            )
            .await
            .unwrap();
        drop(confirm);
    }
    wait_count(&ch, "timed", 1).await;
    assert_eq!(get(&ch, "timed").await.unwrap().delivery.data, b"now", "no x-delay: routed at once");
    server.advance(199);
    timers_run().await;
    assert_eq!(count(&ch, "timed").await, 0, "199 ms of a 200 ms delay");
    server.advance(1);
    wait_count(&ch, "timed", 1).await;
    assert_eq!(get(&ch, "timed").await.unwrap().delivery.data, b"soon");

    let server = server.restart().await;
    let (_conn, ch) = open(&server).await;
    let q = ch
        .queue_declare(
            "timed".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0, "still waiting after the restart");
    server.advance(1299);
    timers_run().await;
    assert_eq!(count(&ch, "timed").await, 0, "1499 ms of a 1500 ms delay");
    server.advance(1);
    wait_count(&ch, "timed", 1).await;
    let message = get(&ch, "timed").await.unwrap();
    assert_eq!(message.delivery.data, b"restart");
    assert_eq!(message.delivery.exchange.as_str(), "later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_are_retried_with_growing_delays_then_dead_lettered() {
    let server = TestServer::with_manual_clock(|_| {}).await;
    let (_conn, ch) = open(&server).await;
    queue(&ch, "dlq", false, FieldTable::default()).await;
    let retrying = to_dlq(vec![
        ("x-retry-delay", long(100)),
        ("x-retry-multiplier", AMQPValue::Double(3.0)),
        ("x-delivery-limit", long(2)),
    ]);
    queue(&ch, "flaky", false, retrying).await;
    publish(&ch, "flaky", b"try me", BasicProperties::default()).await;
    let mut consumer = consume(&ch, "flaky", "worker", false).await;
    // Retries after 100 ms, then 300 ms, then the delivery limit.
    for wait in [None, Some(100), Some(300)] {
        if let Some(wait) = wait {
            server.advance(wait - 1);
            let early = tokio::time::timeout(Duration::from_millis(120), consumer.next()).await;
            assert!(early.is_err(), "retried before its {wait} ms delay");
            server.advance(2);
        }
        let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
        delivery.acker.reject(BasicRejectOptions { requeue: false }).await.unwrap();
        // A round trip on the channel: the reject was applied (at the
        // current clock) before the clock moves again.
        count(&ch, "flaky").await;
    }
    wait_count(&ch, "dlq", 1).await;
    let dead = get(&ch, "dlq").await.unwrap();
    assert_eq!(string(header(&deaths(&dead)[0], "reason")), "delivery_limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_waiting_out_its_retry_delay_still_waits_after_a_restart() {
    let server = TestServer::with_manual_clock(|_| {}).await;
    let (conn, ch) = open(&server).await;
    queue(&ch, "retry-later", true, args(&[("x-retry-delay", long(10_000))])).await;
    publish(&ch, "retry-later", b"try again", BasicProperties::default().with_delivery_mode(2)).await;
    let mut consumer = consume(&ch, "retry-later", "worker", false).await;
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    delivery.acker.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    count(&ch, "retry-later").await;
    conn.close(200, "bye".into()).await.unwrap();
    server.advance(4_000);

    let server = server.restart().await;
    let (_conn, ch) = open(&server).await;
    let mut consumer = consume(&ch, "retry-later", "worker", false).await;
    let early = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(early.is_err(), "ready at once after the restart, 6 s before its due time");
    server.advance(5_900);
    let early = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
    assert!(early.is_err(), "ready 100 ms before its due time");
    server.advance(200);
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(delivery.data, b"try again");
    assert!(delivery.redelivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_delivery_is_taken_back_after_the_consumer_timeout() {
    let server = TestServer::with_manual_clock(|_| {}).await;
    let (_conn, ch) = open(&server).await;
    queue(&ch, "slow-work", false, args(&[("x-consumer-timeout", long(200))])).await;
    publish(&ch, "slow-work", b"job", BasicProperties::default()).await;
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume(&ch, "slow-work", "worker", false).await;
    let first = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    assert!(!first.redelivered);
    server.advance(199);
    let early = tokio::time::timeout(Duration::from_millis(250), consumer.next()).await;
    assert!(early.is_err(), "taken back before its 200 ms timeout");
    server.advance(2);
    let second = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    assert!(second.redelivered, "taken back and delivered again");
    assert_eq!(second.data, b"job");
    // The late ack of the first delivery is not an error; the channel lives on.
    first.acker.ack(BasicAckOptions::default()).await.unwrap();
    second.acker.ack(BasicAckOptions::default()).await.unwrap();
    wait_count(&ch, "slow-work", 0).await;
    assert!(ch.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_from_the_configuration_apply_with_rabbitmq_precedence() {
    let policy: warren_server::config::PolicyConfig = toml::from_str(
        "name = \"capped\"\npattern = \"^capped\\\\.\"\napply-to = \"queues\"\n[definition]\n\
         max-length = 2\ndead-letter-exchange = \"\"\ndead-letter-routing-key = \"dlq\"\n",
    )
    .unwrap();
    let server = TestServer::with_config(|config| config.policies = vec![policy]).await;
    let (_conn, ch) = open(&server).await;
    queue(&ch, "dlq", false, FieldTable::default()).await;
    queue(&ch, "capped.plain", false, FieldTable::default()).await;
    queue(&ch, "capped.tighter", false, args(&[("x-max-length", long(1))])).await;
    queue(&ch, "free", false, FieldTable::default()).await;
    for queue in ["capped.plain", "capped.tighter", "free"] {
        for body in [b"1", b"2", b"3"] {
            publish(&ch, queue, body, BasicProperties::default()).await;
        }
    }
    wait_count(&ch, "capped.plain", 2).await;
    wait_count(&ch, "capped.tighter", 1).await;
    wait_count(&ch, "free", 3).await;
    // 1 from capped.plain and 2 from capped.tighter, dead-lettered by the
    // policy's exchange.
    wait_count(&ch, "dlq", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_confirmed_but_not_queued_and_the_window_survives_a_restart() {
    let server = TestServer::start().await;
    let dedup = || args(&[("x-message-deduplication", AMQPValue::Boolean(true)), ("x-cache-ttl", long(60_000))]);
    let publish_ids = |ch: Channel, ids: Vec<&'static str>| async move {
        let mut acks = Vec::new();
        for id in ids {
            let properties = BasicProperties::default().with_delivery_mode(2).with_message_id(id.into());
            let confirm = ch
                .basic_publish("".into(), "orders".into(), BasicPublishOptions::default(), id.as_bytes(), properties)
                .await
                .unwrap();
            acks.push(confirm.await.unwrap().is_ack());
        }
        acks
    };
    {
        let (_conn, ch) = open(&server).await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        queue(&ch, "orders", true, dedup()).await;
        let acks = publish_ids(ch.clone(), vec!["o-1", "o-2", "o-1"]).await;
        assert_eq!(acks, vec![true, true, true], "a duplicate is confirmed too");
        // A header key takes precedence over message_id.
        let keyed = BasicProperties::default()
            .with_message_id("o-3".into())
            .with_headers(args(&[("x-deduplication-header", text("o-1"))]));
        publish(&ch, "orders", b"same key as o-1", keyed).await;
        wait_count(&ch, "orders", 2).await;
        let bodies: Vec<Vec<u8>> =
            vec![get(&ch, "orders").await.unwrap().delivery.data, get(&ch, "orders").await.unwrap().delivery.data];
        assert_eq!(bodies, vec![b"o-1".to_vec(), b"o-2".to_vec()]);
    }
    let server = server.restart().await;
    let (_conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let acks = publish_ids(ch.clone(), vec!["o-2", "o-4"]).await;
    assert_eq!(acks, vec![true, true]);
    wait_count(&ch, "orders", 1).await;
    assert_eq!(get(&ch, "orders").await.unwrap().delivery.data, b"o-4", "o-2 was remembered across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_timeout_can_close_the_channel_as_rabbitmq_does() {
    let server = TestServer::with_manual_clock(|config| {
        config.consumer_timeout_action = warren_server::config::ConsumerTimeoutAction::CloseChannel;
    })
    .await;
    let (conn, ch) = open(&server).await;
    queue(&ch, "strict", false, args(&[("x-consumer-timeout", long(200))])).await;
    publish(&ch, "strict", b"job", BasicProperties::default()).await;
    let worker = conn.create_channel().await.unwrap();
    let mut consumer = consume(&worker, "strict", "w", false).await;
    let _held = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    server.advance(201);
    // The consumer sees its channel closed with RabbitMQ's 406.
    let closed = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap();
    let reason = format!("{closed:?}");
    assert!(reason.contains("PRECONDITION_FAILED - delivery acknowledgement on channel 2 timed out"), "{reason}");
    assert!(!worker.status().connected(), "the channel was closed");
    // Its delivery went back to the queue; the other channel is untouched.
    wait_count(&ch, "strict", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_counts_survive_a_restart() {
    let server = TestServer::start().await;
    let limited = || to_dlq(vec![("x-delivery-limit", long(2))]);
    let count_of = |message: &BasicGetMessage| {
        message.delivery.properties.headers().as_ref().and_then(|h| h.inner().get("x-delivery-count").cloned())
    };
    {
        let (_conn, ch) = open(&server).await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        queue(&ch, "dlq", true, FieldTable::default()).await;
        queue(&ch, "counted", true, limited()).await;
        let persistent = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish("".into(), "counted".into(), BasicPublishOptions::default(), b"poison", persistent)
            .await
            .unwrap()
            .await
            .unwrap();
        for expected in 0..2 {
            let m = ch.basic_get("counted".into(), BasicGetOptions::default()).await.unwrap().unwrap();
            assert_eq!(count_of(&m), Some(AMQPValue::LongLongInt(expected)));
            m.delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
        }
        wait_count(&ch, "counted", 1).await;
    }
    let server = server.restart().await;
    let (_conn, ch) = open(&server).await;
    let m = ch.basic_get("counted".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(count_of(&m), Some(AMQPValue::LongLongInt(2)), "the count went on from where it was");
    m.delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
    wait_count(&ch, "dlq", 1).await;
    wait_count(&ch, "counted", 0).await;
}
