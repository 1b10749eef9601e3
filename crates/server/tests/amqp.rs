//! End-to-end behaviour through lapin, a real third-party client, against a
//! real server over TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{consume, reply, wait_count, TestServer};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

async fn connect(server: &TestServer) -> Connection {
    Connection::connect(&server.uri(), ConnectionProperties::default()).await.expect("connect")
}

async fn channel(conn: &Connection) -> Channel {
    conn.create_channel().await.expect("channel")
}

async fn declare(ch: &Channel, name: &str) -> String {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap()
        .name()
        .to_string()
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, BasicProperties::default())
        .await
        .unwrap();
}

/// The reply code a failed operation reports, if the broker closed with one.
fn reply_code(error: &lapin::Error) -> Option<u16> {
    Some(reply(error).0).filter(|&code| code != 0)
}

fn reply_text(error: &lapin::Error) -> String {
    reply(error).1
}

async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap().map(|m| m.delivery.data)
}

fn every_field_type() -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongString("v".into()));
    let mut headers = FieldTable::default();
    headers.insert("bool".into(), AMQPValue::Boolean(true));
    headers.insert("i8".into(), AMQPValue::ShortShortInt(-8));
    headers.insert("u8".into(), AMQPValue::ShortShortUInt(8));
    headers.insert("i16".into(), AMQPValue::ShortInt(-16));
    headers.insert("u16".into(), AMQPValue::ShortUInt(16));
    headers.insert("i32".into(), AMQPValue::LongInt(-32));
    headers.insert("u32".into(), AMQPValue::LongUInt(32));
    headers.insert("i64".into(), AMQPValue::LongLongInt(-64));
    headers.insert("f32".into(), AMQPValue::Float(3.5));
    headers.insert("f64".into(), AMQPValue::Double(6.25));
    headers.insert("decimal".into(), AMQPValue::DecimalValue(lapin::types::DecimalValue { scale: 2, value: 12345 }));
    headers.insert("str".into(), AMQPValue::LongString("héllo".into()));
    headers.insert(
        "array".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1), AMQPValue::Boolean(false)])),
    );
    headers.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
    headers.insert("table".into(), AMQPValue::FieldTable(nested));
    headers.insert("bytes".into(), AMQPValue::ByteArray(vec![0u8, 1, 2, 255].into()));
    headers.insert("void".into(), AMQPValue::Void);
    headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_preserves_every_property_and_field_type() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let queue = declare(&ch, "").await;
    assert!(queue.starts_with("amq.gen-"), "server-named queue: {queue}");
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(every_field_type())
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_expiration("60000".into())
        .with_message_id("m-1".into())
        .with_timestamp(1_234_567)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("shop".into());
    ch.basic_publish(
        "".into(),
        queue.as_str().into(),
        BasicPublishOptions::default(),
        b"{\"id\":1}",
        properties.clone(),
    )
    .await
    .unwrap();
    let mut consumer = consume(&ch, queue.as_str(), "", false).await;
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(delivery.data, b"{\"id\":1}");
    assert_eq!(delivery.properties, properties);
    assert_eq!(delivery.routing_key.as_str(), queue);
    assert!(!delivery.redelivered);
    delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_cross_many_frames_intact() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let queue = declare(&ch, "big").await;
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    publish(&ch, "", &queue, &body).await;
    publish(&ch, "", &queue, b"").await;
    assert_eq!(get_body(&ch, &queue).await.unwrap(), body);
    assert_eq!(get_body(&ch, &queue).await.unwrap(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_unacked_deliveries_and_acks_release_more() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let queue = declare(&ch, "prefetch").await;
    for i in 0..50u32 {
        publish(&ch, "", &queue, &i.to_be_bytes()).await;
    }
    wait_count(&ch, &queue, 50).await;
    let consumer_ch = channel(&conn).await;
    consumer_ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume(&consumer_ch, queue.as_str(), "c", false).await;
    let mut received = Vec::new();
    for _ in 0..10 {
        received.push(tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap());
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next()).await.is_err(),
        "an 11th delivery broke prefetch 10"
    );
    let order: Vec<u32> = received.iter().map(|d| u32::from_be_bytes(d.data[..4].try_into().unwrap())).collect();
    assert_eq!(order, (0..10).collect::<Vec<_>>(), "FIFO order");
    received[9].acker.ack(BasicAckOptions { multiple: true }).await.unwrap();
    for expected in 10..20u32 {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(u32::from_be_bytes(d.data[..4].try_into().unwrap()), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_share_round_robin() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let queue = declare(&ch, "work").await;
    let mut a = consume(&ch, queue.as_str(), "a", true).await;
    let ch2 = channel(&conn).await;
    let mut b = consume(&ch2, queue.as_str(), "b", true).await;
    for i in 0..10u8 {
        publish(&ch, "", &queue, &[i]).await;
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..5 {
        got_a.push(tokio::time::timeout(Duration::from_secs(5), a.next()).await.unwrap().unwrap().unwrap().data[0]);
        got_b.push(tokio::time::timeout(Duration::from_secs(5), b.next()).await.unwrap().unwrap().unwrap().data[0]);
    }
    assert_eq!(got_a, vec![0, 2, 4, 6, 8]);
    assert_eq!(got_b, vec![1, 3, 5, 7, 9]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_nacked_messages_requeue_in_place_or_vanish() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let queue = declare(&ch, "nack").await;
    for body in [b"a", b"b", b"c", b"d"] {
        publish(&ch, "", &queue, body).await;
    }
    wait_count(&ch, &queue, 4).await;
    let a = ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap().unwrap();
    let b = ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap().unwrap();
    let c = ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(c.message_count, 1);
    // b rejected for good; a and c back, a before c before d.
    b.delivery.acker.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    ch.basic_nack(c.delivery.delivery_tag, BasicNackOptions { multiple: true, requeue: true }).await.unwrap();
    let _ = a;
    let mut bodies = Vec::new();
    while let Some(m) = ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        bodies.push((m.delivery.data.clone(), m.delivery.redelivered));
    }
    assert_eq!(bodies, vec![(b"a".to_vec(), true), (b"c".to_vec(), true), (b"d".to_vec(), false)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_channel_or_connection_requeues_unacked_messages() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let queue = declare(&ch, "requeue").await;
    for i in 0..3u8 {
        publish(&ch, "", &queue, &[i]).await;
    }
    let other = connect(&server).await;
    let consumer_ch = channel(&other).await;
    let mut consumer = consume(&consumer_ch, queue.as_str(), "", false).await;
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    }
    wait_count(&ch, &queue, 0).await;
    other.close(200, "consumer dies".into()).await.unwrap();
    wait_count(&ch, &queue, 3).await;
    let first = ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(first.delivery.data, vec![0]);
    assert!(first.delivery.redelivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_redelivers_unacked_messages() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let queue = declare(&ch, "recover").await;
    publish(&ch, "", &queue, b"x").await;
    let mut consumer = consume(&ch, queue.as_str(), "", false).await;
    let first = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    assert!(!first.redelivered);
    ch.basic_recover(BasicRecoverOptions { requeue: true }).await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    assert!(again.redelivered);
    assert_eq!(again.data, b"x");
    assert!(again.delivery_tag > first.delivery_tag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_ack_every_publish_and_mandatory_unroutable_is_returned() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let queue = declare(&ch, "confirmed").await;
    let mut confirms = Vec::new();
    for i in 0..200u32 {
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
    let returned = ch
        .basic_publish(
            "".into(),
            "no-such-queue".into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"lost?",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(returned.is_ack(), "unroutable is still confirmed, as in RabbitMQ");
    let message = returned.take_message().expect("basic.return before the ack");
    assert_eq!(message.reply_code, 312);
    assert_eq!(message.data, b"lost?");
    wait_count(&ch, &queue, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_publish_and_ack_only_on_commit() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let queue = declare(&ch, "tx").await;
    ch.tx_select().await.unwrap();
    publish(&ch, "", &queue, b"1").await;
    ch.tx_rollback().await.unwrap();
    publish(&ch, "", &queue, b"2").await;
    let probe = channel(&conn).await;
    wait_count(&probe, &queue, 0).await;
    ch.tx_commit().await.unwrap();
    wait_count(&probe, &queue, 1).await;
    let got = ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(got.delivery.data, b"2");
    got.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    ch.tx_rollback().await.unwrap();
    // The ack was rolled back: the message is still unacked on this channel.
    ch.close(200, "done".into()).await.unwrap();
    wait_count(&probe, &queue, 1).await;
    let err = probe.confirm_select(ConfirmSelectOptions::default()).await.and(probe.tx_select().await).unwrap_err();
    assert_eq!(reply_code(&err), Some(406));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_types_route_as_rabbitmq_does() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    for (name, kind) in [
        ("t", ExchangeKind::Topic),
        ("f", ExchangeKind::Fanout),
        ("h", ExchangeKind::Headers),
        ("d", ExchangeKind::Direct),
    ] {
        ch.exchange_declare(name.into(), kind, ExchangeDeclareOptions::default(), FieldTable::default()).await.unwrap();
    }
    for q in ["q1", "q2", "q3"] {
        declare(&ch, q).await;
    }
    let none = FieldTable::default;
    ch.queue_bind("q1".into(), "t".into(), "order.*.shipped".into(), QueueBindOptions::default(), none())
        .await
        .unwrap();
    ch.queue_bind("q2".into(), "t".into(), "order.#".into(), QueueBindOptions::default(), none()).await.unwrap();
    ch.queue_bind("q1".into(), "f".into(), "".into(), QueueBindOptions::default(), none()).await.unwrap();
    ch.queue_bind("q2".into(), "f".into(), "".into(), QueueBindOptions::default(), none()).await.unwrap();
    let mut any = FieldTable::default();
    any.insert("x-match".into(), AMQPValue::LongString("any".into()));
    any.insert("format".into(), AMQPValue::LongString("pdf".into()));
    any.insert("kind".into(), AMQPValue::LongString("report".into()));
    ch.queue_bind("q3".into(), "h".into(), "".into(), QueueBindOptions::default(), any).await.unwrap();
    ch.queue_bind("q3".into(), "d".into(), "k".into(), QueueBindOptions::default(), none()).await.unwrap();

    publish(&ch, "t", "order.eu.shipped", b"t1").await; // q1, q2
    publish(&ch, "t", "order", b"t2").await; // q2
    publish(&ch, "t", "invoice.eu.shipped", b"t3").await; // none
    publish(&ch, "f", "whatever", b"f1").await; // q1, q2
    let mut headers = FieldTable::default();
    headers.insert("format".into(), AMQPValue::LongString("pdf".into()));
    ch.basic_publish(
        "h".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"h1",
        BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap();
    publish(&ch, "h", "", b"h2").await; // no headers: no match
    publish(&ch, "d", "k", b"d1").await;
    publish(&ch, "d", "other", b"d2").await;
    wait_count(&ch, "q3", 2).await;
    let drain = |q: &'static str| {
        let ch = ch.clone();
        async move {
            let mut out = Vec::new();
            while let Some(body) = get_body(&ch, q).await {
                out.push(String::from_utf8(body).unwrap());
            }
            out
        }
    };
    assert_eq!(drain("q1").await, vec!["t1", "f1"]);
    assert_eq!(drain("q2").await, vec!["t1", "t2", "f1"]);
    assert_eq!(drain("q3").await, vec!["h1", "d1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_bindings_alternate_exchange_and_sender_selected_distribution() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let none = FieldTable::default;
    ch.exchange_declare("fallback".into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), none())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert("alternate-exchange".into(), AMQPValue::LongString("fallback".into()));
    ch.exchange_declare("main".into(), ExchangeKind::Direct, ExchangeDeclareOptions::default(), args).await.unwrap();
    ch.exchange_declare("upstream".into(), ExchangeKind::Topic, ExchangeDeclareOptions::default(), none())
        .await
        .unwrap();
    ch.exchange_bind("main".into(), "upstream".into(), "#".into(), ExchangeBindOptions::default(), none())
        .await
        .unwrap();
    for q in ["routed", "unrouted", "cc", "bcc"] {
        declare(&ch, q).await;
    }
    ch.queue_bind("routed".into(), "main".into(), "good".into(), QueueBindOptions::default(), none()).await.unwrap();
    ch.queue_bind("unrouted".into(), "fallback".into(), "".into(), QueueBindOptions::default(), none()).await.unwrap();
    ch.queue_bind("cc".into(), "main".into(), "cc-key".into(), QueueBindOptions::default(), none()).await.unwrap();
    ch.queue_bind("bcc".into(), "main".into(), "bcc-key".into(), QueueBindOptions::default(), none()).await.unwrap();
    publish(&ch, "upstream", "good", b"via e2e").await;
    publish(&ch, "main", "bad", b"to alternate").await;
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString("cc-key".into())])));
    headers
        .insert("BCC".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString("bcc-key".into())])));
    ch.basic_publish(
        "main".into(),
        "good".into(),
        BasicPublishOptions::default(),
        b"selected",
        BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap();
    wait_count(&ch, "bcc", 1).await;
    assert_eq!(get_body(&ch, "routed").await.unwrap(), b"via e2e");
    assert_eq!(get_body(&ch, "routed").await.unwrap(), b"selected");
    assert_eq!(get_body(&ch, "unrouted").await.unwrap(), b"to alternate");
    let cc = ch.basic_get("cc".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    let cc_headers = cc.delivery.properties.headers().clone().unwrap();
    assert!(cc_headers.inner().contains_key("CC"));
    assert!(!cc_headers.inner().contains_key("BCC"), "BCC is stripped before delivery");
    assert_eq!(get_body(&ch, "bcc").await.unwrap(), b"selected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_errors_close_only_their_channel_with_rabbitmq_codes() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let healthy = channel(&conn).await;
    let queue = declare(&healthy, "errors").await;

    let ch = channel(&conn).await;
    let err = ch
        .queue_declare(
            "missing".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(404));
    assert_eq!(reply_text(&err), "NOT_FOUND - no queue 'missing' in vhost '/'");

    let ch = channel(&conn).await;
    let err = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(406));
    assert_eq!(reply_text(&err), "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'errors' in vhost '/': received 'true' but current is 'false'");

    // Its own connection: lapin keeps a confirm channel closed by the broker
    // registered for a moment, and would hand its number out again.
    let publisher = connect(&server).await;
    let ch = channel(&publisher).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirm = ch
        .basic_publish(
            "no-exchange".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    // The channel close reaches the pending confirm.
    let err = confirm.await.unwrap_err();
    assert_eq!(reply_code(&err), Some(404));

    let ch = channel(&conn).await;
    let err = ch
        .exchange_declare(
            "amq.custom".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(403));

    let ch = channel(&conn).await;
    let err = ch
        .queue_bind(queue.as_str().into(), "".into(), "k".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(403));

    let ch = channel(&conn).await;
    ch.basic_ack(999, BasicAckOptions::default()).await.unwrap();
    // The ack has no reply; whether lapin reports the close (406, checked
    // byte for byte in the raw-frame suite) or its own closed-channel state
    // depends on timing, but the channel is gone either way.
    let result = ch.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default()).await;
    let err = result.map(|_| ()).unwrap_err();
    assert!(matches!(reply_code(&err), Some(406) | None), "{err:?}");
    assert!(!ch.status().connected());

    // The first channel and the connection are untouched.
    publish(&healthy, "", &queue, b"still fine").await;
    assert_eq!(get_body(&healthy, &queue).await.unwrap(), b"still fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_and_auto_delete_queues_follow_their_owners() {
    let server = TestServer::start().await;
    let owner = connect(&server).await;
    let ch = channel(&owner).await;
    ch.queue_declare(
        "mine".into(),
        QueueDeclareOptions { exclusive: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "auto".into(),
        QueueDeclareOptions { auto_delete: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .unwrap();

    let stranger = connect(&server).await;
    let other = channel(&stranger).await;
    let err = other
        .basic_consume("mine".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(405));

    let consumer = consume(&ch, "auto", "c1", false).await;
    let probe = channel(&stranger).await;
    probe
        .queue_declare(
            "auto".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.basic_cancel("c1".into(), BasicCancelOptions::default()).await.unwrap();
    drop(consumer);
    let err = probe
        .queue_declare(
            "auto".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(404), "auto-delete queue goes with its last consumer");

    owner.close(200, "bye".into()).await.unwrap();
    let probe = channel(&stranger).await;
    let err = probe
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(404), "exclusive queue goes with its connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_delete_counts_and_consumer_cancel_notification() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let queue = declare(&ch, "counted").await;
    for _ in 0..5 {
        publish(&ch, "", &queue, b"x").await;
    }
    wait_count(&ch, &queue, 5).await;
    assert_eq!(ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()).await.unwrap(), 5);
    publish(&ch, "", &queue, b"y").await;
    wait_count(&ch, &queue, 1).await;
    let err = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions { if_empty: true, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(406));

    let ch = channel(&conn).await;
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, queue.as_str(), "watch", false).await;
    let first = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    first.acker.ack(BasicAckOptions::default()).await.unwrap();
    let err = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions { if_unused: true, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(406));
    let ch = channel(&conn).await;
    assert_eq!(ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap(), 0);
    // The server cancels the consumer; lapin ends the stream.
    let end = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap();
    assert!(end.is_none(), "consumer stream ends after basic.cancel from the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_with_direct_reply_to_and_a_named_reply_queue() {
    let server = TestServer::start().await;
    let client = connect(&server).await;
    let worker = connect(&server).await;
    let wch = channel(&worker).await;
    declare(&wch, "rpc").await;
    let mut requests = consume(&wch, "rpc", "", true).await;
    let worker_task = tokio::spawn(async move {
        for _ in 0..2 {
            let request = requests.next().await.unwrap().unwrap();
            let reply_to = request.properties.reply_to().clone().unwrap();
            let correlation = request.properties.correlation_id().clone().unwrap();
            let mut answer = b"answer:".to_vec();
            answer.extend_from_slice(&request.data);
            wch.basic_publish(
                "".into(),
                reply_to,
                BasicPublishOptions::default(),
                &answer,
                BasicProperties::default().with_correlation_id(correlation),
            )
            .await
            .unwrap();
        }
    });

    let cch = channel(&client).await;
    let mut replies = consume(&cch, "amq.rabbitmq.reply-to", "", true).await;
    cch.basic_publish(
        "".into(),
        "rpc".into(),
        BasicPublishOptions::default(),
        b"q1",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()).with_correlation_id("c-1".into()),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply.data, b"answer:q1");
    assert_eq!(reply.properties.correlation_id().as_ref().map(ShortString::as_str), Some("c-1"));

    let named = declare(&cch, "").await;
    let mut named_replies = consume(&cch, named.as_str(), "", true).await;
    cch.basic_publish(
        "".into(),
        "rpc".into(),
        BasicPublishOptions::default(),
        b"q2",
        BasicProperties::default().with_reply_to(named.as_str().into()).with_correlation_id("c-2".into()),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), named_replies.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply.data, b"answer:q2");
    assert_eq!(reply.properties.correlation_id().as_ref().map(ShortString::as_str), Some("c-2"));
    worker_task.await.unwrap();

    // Without a reply consumer on the channel, RabbitMQ refuses the publish.
    let lonely = channel(&client).await;
    lonely.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirm = lonely
        .basic_publish(
            "".into(),
            "rpc".into(),
            BasicPublishOptions::default(),
            b"q3",
            BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .unwrap();
    let err = confirm.await.unwrap_err();
    assert_eq!(reply_code(&err), Some(406));
    assert_eq!(reply_text(&err), "PRECONDITION_FAILED - fast reply consumer does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_unknown_vhost_are_refused() {
    let server = TestServer::start().await;
    let bad =
        Connection::connect(&format!("amqp://guest:wrong@{}/%2F", server.addr), ConnectionProperties::default()).await;
    let Err(err) = bad else { panic!("wrong password must fail") };
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    let unknown =
        Connection::connect(&format!("amqp://nobody:x@{}/%2F", server.addr), ConnectionProperties::default()).await;
    assert!(unknown.is_err());
    let vhost =
        Connection::connect(&format!("amqp://guest:guest@{}/nowhere", server.addr), ConnectionProperties::default())
            .await;
    let Err(err) = vhost else { panic!("unknown vhost must fail") };
    assert_eq!(reply_code(&err), Some(530), "{err:?}");
    // The broker still serves everyone else.
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    declare(&ch, "after-failures").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_flow_pauses_deliveries() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    let queue = declare(&ch, "flow").await;
    ch.channel_flow(ChannelFlowOptions { active: false }).await.unwrap();
    let mut consumer = consume(&ch, queue.as_str(), "", true).await;
    let pch = channel(&conn).await;
    publish(&pch, "", &queue, b"held").await;
    assert!(tokio::time::timeout(Duration::from_millis(300), consumer.next()).await.is_err());
    ch.channel_flow(ChannelFlowOptions { active: true }).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(d.data, b"held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_clients_with_320() {
    let server = TestServer::start().await;
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    declare(&ch, "bye").await;
    server.stop().await;
    let err = ch.queue_declare("x".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap_err();
    let closed_by_320 = reply_code(&err) == Some(320) || !conn.status().connected();
    assert!(closed_by_320, "{err:?}");
}

#[allow(dead_code)]
fn _types_used(_: LongString) {}
