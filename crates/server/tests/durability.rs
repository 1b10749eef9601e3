//! Durable state across restarts, through lapin against real servers on
//! real files: what must survive does, what must not does not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{consume, count, eventually, open, persistent, TestServer};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};

/// Bytes of the message log on disk.
fn size(wal: &std::path::Path) -> u64 {
    std::fs::read_dir(wal).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

async fn drain(ch: &Channel, queue: &str) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    while let Some(m) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        out.push((m.delivery.data.clone(), m.delivery.redelivered));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_persistent_messages_and_durable_definitions_survive_a_restart() {
    let server = TestServer::start().await;
    let (conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1000));
    ch.queue_declare("orders".into(), durable, args.clone()).await.unwrap();
    ch.queue_declare("audit".into(), durable, FieldTable::default()).await.unwrap();
    ch.queue_declare("scratch".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let xdurable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare("events".into(), ExchangeKind::Topic, xdurable, FieldTable::default()).await.unwrap();
    ch.exchange_declare(
        "fleeting".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "orders".into(),
        "events".into(),
        "order.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind("audit".into(), "events".into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();

    // Fanned out to two durable queues: stored once, survives in both.
    for i in 0..50u32 {
        let confirm = ch
            .basic_publish(
                "events".into(),
                "order.created".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                persistent(),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }
    // Transient messages in a durable queue, and persistent ones in a transient queue, do not survive.
    ch.basic_publish(
        "".into(),
        "orders".into(),
        BasicPublishOptions::default(),
        b"transient",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    ch.basic_publish("".into(), "scratch".into(), BasicPublishOptions::default(), b"gone", persistent())
        .await
        .unwrap()
        .await
        .unwrap();
    // Ten acknowledged and five rejected from "orders" are settled for good.
    for _ in 0..15 {
        let got = ch.basic_get("orders".into(), BasicGetOptions::default()).await.unwrap().unwrap();
        let value = u32::from_be_bytes(got.delivery.data[..4].try_into().unwrap());
        if value < 10 {
            got.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        } else {
            got.delivery.acker.reject(BasicRejectOptions { requeue: false }).await.unwrap();
        }
    }
    // One left unacked when the broker goes down comes back, redelivered.
    let unacked = ch.basic_get("orders".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(u32::from_be_bytes(unacked.delivery.data[..4].try_into().unwrap()), 15);
    drop(conn);

    let server = server.restart().await;
    let (conn, ch) = open(&server).await;
    assert_eq!(count(&conn, "scratch").await, None, "transient queue is gone");
    assert_eq!(count(&conn, "audit").await, Some(50));
    assert_eq!(count(&conn, "orders").await, Some(35));
    let err = ch
        .queue_declare(
            "orders".into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await;
    assert!(err.is_err(), "arguments survived: redeclaring without x-max-length is inequivalent");
    let ch = conn.create_channel().await.unwrap();
    let orders = drain(&ch, "orders").await;
    let values: Vec<u32> = orders.iter().map(|(d, _)| u32::from_be_bytes(d[..4].try_into().unwrap())).collect();
    assert_eq!(values, (15..50).collect::<Vec<_>>(), "settled messages stay settled; order kept");
    assert!(orders.iter().all(|(_, redelivered)| *redelivered), "recovered messages may have been seen: redelivered");
    // Bindings and the durable exchange survived; the transient one did not.
    ch.basic_publish("events".into(), "order.paid".into(), BasicPublishOptions::default(), b"after", persistent())
        .await
        .unwrap();
    eventually("the publish after the restart is routed", || async { count(&conn, "orders").await == Some(1) }).await;
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    assert!(ch
        .exchange_declare("fleeting".into(), ExchangeKind::Fanout, passive, FieldTable::default())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_queues_and_purged_messages_stay_gone() {
    let server = TestServer::start().await;
    let (conn, ch) = open(&server).await;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    for q in ["purged", "deleted", "consumed"] {
        ch.queue_declare(q.into(), durable, FieldTable::default()).await.unwrap();
        for i in 0..5u8 {
            ch.basic_publish("".into(), q.into(), BasicPublishOptions::default(), &[i], persistent()).await.unwrap();
        }
    }
    for q in ["purged", "deleted", "consumed"] {
        eventually("the publishes are queued", || async { count(&conn, q).await == Some(5) }).await;
    }
    assert_eq!(ch.queue_purge("purged".into(), QueuePurgeOptions::default()).await.unwrap(), 5);
    ch.queue_delete("deleted".into(), QueueDeleteOptions::default()).await.unwrap();
    let mut consumer = consume(&ch, "consumed", "", true).await;
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    }
    // Re-created under the same name after deletion: only new messages count.
    ch.queue_declare("deleted".into(), durable, FieldTable::default()).await.unwrap();
    ch.basic_publish("".into(), "deleted".into(), BasicPublishOptions::default(), b"new", persistent()).await.unwrap();
    eventually("the new message is queued", || async { count(&conn, "deleted").await == Some(1) }).await;

    let server = server.restart().await;
    let (conn, ch) = open(&server).await;
    assert_eq!(count(&conn, "purged").await, Some(0));
    assert_eq!(count(&conn, "consumed").await, Some(0), "no-ack deliveries are settled");
    assert_eq!(drain(&ch, "deleted").await.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(), vec![b"new".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_space_is_given_back_once_messages_are_acknowledged() {
    let server = TestServer::with_config(|c| c.segment_bytes_max = 64 * 1024).await;
    let (_conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("bulk".into(), durable, FieldTable::default()).await.unwrap();
    let body = vec![1u8; 4096];
    for _ in 0..200 {
        ch.basic_publish("".into(), "bulk".into(), BasicPublishOptions::default(), &body, persistent()).await.unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    let wal = server.config.data_dir.join("wal");
    let full = size(&wal);
    assert!(full > 800 * 1024, "{full}");
    while let Some(m) = ch.basic_get("bulk".into(), BasicGetOptions::default()).await.unwrap() {
        m.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    // The janitor runs every second.
    let mut now = full;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = size(&wal);
        if now <= 2 * 64 * 1024 + 4096 * 16 {
            break;
        }
    }
    assert!(now <= 2 * 64 * 1024 + 4096 * 16, "disk use {now} of {full} after everything was acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flip_at_rest_costs_one_message_and_the_rest_is_served() {
    let server = TestServer::start().await;
    let (_conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("fragile".into(), durable, FieldTable::default()).await.unwrap();
    for i in 0..20u8 {
        let body = vec![i; 300];
        ch.basic_publish("".into(), "fragile".into(), BasicPublishOptions::default(), &body, persistent())
            .await
            .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    let config = server.stop_keeping_data().await;
    let data_dir = config.data_dir.clone();

    // Flip one bit in the body of the 11th message (all bodies are distinct runs).
    let wal = data_dir.join("wal");
    let segment = std::fs::read_dir(&wal).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&segment).unwrap();
    let run = vec![10u8; 300];
    let at = bytes.windows(300).position(|w| w == run.as_slice()).unwrap();
    bytes[at + 150] ^= 0x04;
    std::fs::write(&segment, &bytes).unwrap();

    let server = TestServer::with_config(|c| *c = config).await;
    let (_conn, ch) = open(&server).await;
    let bodies = drain(&ch, "fragile").await;
    let firsts: Vec<u8> = bodies.iter().map(|(b, _)| b[0]).collect();
    let expected: Vec<u8> = (0..20).filter(|i| *i != 10).collect();
    assert_eq!(firsts, expected, "the corrupt message is dropped, never served; the others are");
    assert!(bodies.iter().all(|(b, _)| b.iter().all(|x| *x == b[0])), "no altered payload served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_queue_pages_bodies_out_and_serves_them_back_in_order() {
    let server = TestServer::start().await;
    let (_conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("deep".into(), durable, FieldTable::default()).await.unwrap();
    // Far beyond the in-memory window, with transient messages mixed in.
    for i in 0..2500u32 {
        let mut body = i.to_be_bytes().to_vec();
        body.extend_from_slice(&[(i % 251) as u8; 200]);
        let props = if i % 1000 == 999 { BasicProperties::default() } else { persistent() };
        ch.basic_publish("".into(), "deep".into(), BasicPublishOptions::default(), &body, props).await.unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    let mut next = 0u32;
    while let Some(m) = ch.basic_get("deep".into(), BasicGetOptions::default()).await.unwrap() {
        let i = u32::from_be_bytes(m.delivery.data[..4].try_into().unwrap());
        assert_eq!(i, next, "FIFO across the in-memory window and the paged-out part");
        assert!(m.delivery.data[4..].iter().all(|b| *b == (i % 251) as u8), "body of {i} intact");
        assert_eq!(m.delivery.properties.delivery_mode().unwrap_or(1) == 2, i % 1000 != 999);
        if i % 2 == 0 {
            m.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        } else {
            m.delivery.acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await.unwrap();
        }
        next += 1;
    }
    assert_eq!(next, 2500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_old_unacknowledged_message_does_not_pin_the_disk() {
    let server = TestServer::with_config(|c| c.segment_bytes_max = 64 * 1024).await;
    let (_conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("pinned".into(), durable, FieldTable::default()).await.unwrap();
    ch.basic_publish("".into(), "pinned".into(), BasicPublishOptions::default(), b"old", persistent()).await.unwrap();
    ch.wait_for_confirms().await.unwrap();
    // The old message is taken and held, unacknowledged, all along.
    let held = ch.basic_get("pinned".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(held.delivery.data, b"old");
    let body = vec![3u8; 4096];
    for _ in 0..200 {
        ch.basic_publish("".into(), "pinned".into(), BasicPublishOptions::default(), &body, persistent())
            .await
            .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    while let Some(m) = ch.basic_get("pinned".into(), BasicGetOptions::default()).await.unwrap() {
        m.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let wal = server.config.data_dir.join("wal");
    let limit = 3 * 64 * 1024 + 4096 * 16;
    let mut now = size(&wal);
    // The janitor compacts once a second; a loaded machine can take several rounds.
    for _ in 0..200 {
        if now <= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = size(&wal);
    }
    assert!(now <= limit, "disk use {now} stays pinned by one old unacknowledged message");

    // The moved message is still the one held; after a restart it comes back exactly once.
    let config = server.stop_keeping_data().await;
    let server = TestServer::with_config(|c| *c = config).await;
    let (_conn, ch) = open(&server).await;
    let bodies: Vec<Vec<u8>> = drain(&ch, "pinned").await.into_iter().map(|(b, _)| b).collect();
    assert_eq!(bodies, vec![b"old".to_vec()]);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A data directory written by the release before definitions were log
/// entries (definitions.json rewritten whole on every change): a durable
/// topic exchange `fx`, queue `kept` (x-max-length 5) bound to it with
/// `a.#` and holding one persistent message, and queue `gone` deleted with
/// a message in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_from_before_definition_entries_is_recovered() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data-before-definition-entries");
    let data_dir = common::temp_data_dir();
    copy_dir(&fixture, &data_dir);
    let server = TestServer::with_config(|c| c.data_dir = data_dir.clone()).await;
    let (conn, ch) = open(&server).await;
    assert_eq!(count(&conn, "kept").await, Some(1));
    assert_eq!(count(&conn, "gone").await, None, "a deleted queue stays deleted");
    ch.basic_publish("fx".into(), "a.z".into(), BasicPublishOptions::default(), b"new", persistent()).await.unwrap();
    common::wait_count(&ch, "kept", 2).await;
    // The queue kept its arguments: redeclaring with others is refused.
    let other = FieldTable::from(std::collections::BTreeMap::from([("x-max-length".into(), AMQPValue::LongInt(6))]));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let refused = conn.create_channel().await.unwrap().queue_declare("kept".into(), durable, other).await;
    assert!(refused.is_err(), "x-max-length 5 was restored");
    drop(conn);
    // Converted on the way: a second start from the new format.
    let snapshot = std::fs::read_to_string(data_dir.join("definitions.json")).unwrap();
    assert!(snapshot.contains("\"log_index\""), "{snapshot}");
    let server = server.restart().await;
    let (_conn, ch) = open(&server).await;
    let bodies: Vec<Vec<u8>> = drain(&ch, "kept").await.into_iter().map(|(b, _)| b).collect();
    assert_eq!(bodies, vec![b"hello".to_vec(), b"new".to_vec()]);
}

/// Definition changes are log entries replayed in order on top of the
/// snapshot: whatever the last snapshot caught, the state after a restart
/// is the state before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_of_definition_changes_survives_restarts() {
    let server = TestServer::start().await;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let durable_x = ExchangeDeclareOptions { durable: true, ..Default::default() };
    for round in 0..3 {
        let (_conn, ch) = open(&server).await;
        let (q, x) = (format!("q{round}"), format!("x{round}"));
        ch.exchange_declare(x.as_str().into(), ExchangeKind::Direct, durable_x, FieldTable::default()).await.unwrap();
        for name in [q.as_str(), "doomed", "unbound"] {
            ch.queue_declare(name.into(), durable, FieldTable::default()).await.unwrap();
            ch.queue_bind(
                name.into(),
                x.as_str().into(),
                "k".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        }
        ch.queue_unbind("unbound".into(), x.as_str().into(), "k".into(), FieldTable::default()).await.unwrap();
        ch.queue_delete("doomed".into(), QueueDeleteOptions::default()).await.unwrap();
        if round > 0 {
            ch.exchange_delete(format!("x{}", round - 1).as_str().into(), ExchangeDeleteOptions::default())
                .await
                .unwrap();
        }
    }
    let server = server.restart().await;
    let (conn, ch) = open(&server).await;
    for name in ["q0", "q1", "q2", "unbound"] {
        assert_eq!(count(&conn, name).await, Some(0), "{name}");
    }
    assert_eq!(count(&conn, "doomed").await, None);
    ch.basic_publish("x2".into(), "k".into(), BasicPublishOptions::default(), b"m", persistent()).await.unwrap();
    common::wait_count(&ch, "q2", 1).await;
    assert_eq!(count(&conn, "unbound").await, Some(0), "its binding was removed");
    let gone = conn.create_channel().await.unwrap();
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    assert!(gone.exchange_declare("x1".into(), ExchangeKind::Direct, passive, FieldTable::default()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_that_cannot_move_an_unreadable_message_does_not_rescan_every_round() {
    let server = TestServer::with_config(|c| c.segment_bytes_max = 64 * 1024).await;
    let (_conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("rotten".into(), durable, FieldTable::default()).await.unwrap();
    let marker = b"an old message that rots on disk".to_vec();
    ch.basic_publish("".into(), "rotten".into(), BasicPublishOptions::default(), &marker, persistent()).await.unwrap();
    ch.wait_for_confirms().await.unwrap();
    ch.queue_declare("busy".into(), durable, FieldTable::default()).await.unwrap();
    let body = vec![5u8; 4096];
    for _ in 0..200 {
        ch.basic_publish("".into(), "busy".into(), BasicPublishOptions::default(), &body, persistent()).await.unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    // The old message's bytes go bad in the oldest segment (the broker
    // reads segments through a shared mapping, so it sees the change).
    let wal = server.config.data_dir.join("wal");
    let mut segments: Vec<_> = std::fs::read_dir(&wal).unwrap().map(|e| e.unwrap().path()).collect();
    segments.sort();
    let oldest = &segments[0];
    let mut bytes = std::fs::read(oldest).unwrap();
    let at =
        bytes.windows(marker.len()).position(|w| w == marker.as_slice()).expect("the message is in the oldest segment");
    bytes[at] ^= 0xFF;
    std::fs::write(oldest, &bytes).unwrap();
    while let Some(m) = ch.basic_get("busy".into(), BasicGetOptions::default()).await.unwrap() {
        m.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let store = server.broker.store.clone();
    // The janitor tries once a second; once it found the entry immovable,
    // it stops walking the queues for it until something changes.
    for _ in 0..50 {
        if store.compaction_scans() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let scans = store.compaction_scans();
    assert!(scans > 0, "compaction looked at the oldest segment");
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert!(store.compaction_scans() <= scans + 1, "rescanned: {} after {scans}", store.compaction_scans());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_transient_queue_pages_to_the_spill_and_a_restart_empties_it() {
    let server = TestServer::start().await;
    let (_conn, ch) = open(&server).await;
    ch.queue_declare("burst".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert("kept".into(), AMQPValue::LongString("as sent".into()));
    let properties = BasicProperties::default().with_headers(headers).with_priority(3).with_message_id("m".into());
    for i in 0..6000u32 {
        let mut body = i.to_be_bytes().to_vec();
        body.extend_from_slice(&[(i % 251) as u8; 1024]);
        ch.basic_publish("".into(), "burst".into(), BasicPublishOptions::default(), &body, properties.clone())
            .await
            .unwrap();
    }
    common::wait_count(&ch, "burst", 6000).await;
    let store = server.broker.store.clone();
    let spilled = store.spill_stats();
    assert!(spilled.live >= 4000, "the bodies past the in-memory window are on disk: {spilled:?}");
    let spill_dir = server.config.data_dir.join("spill");
    assert!(std::fs::read_dir(&spill_dir).unwrap().count() >= 1);

    // Served back in order, byte for byte, properties and all.
    let mut next = 0u32;
    while next < 3000 {
        let m = ch.basic_get("burst".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
        let i = u32::from_be_bytes(m.delivery.data[..4].try_into().unwrap());
        assert_eq!(i, next, "FIFO across memory and spill");
        assert!(m.delivery.data[4..].iter().all(|b| *b == (i % 251) as u8), "body of {i} intact");
        assert_eq!(m.delivery.properties.priority(), &Some(3));
        assert!(m.delivery.properties.headers().as_ref().is_some_and(|h| h.inner().contains_key("kept")));
        next += 1;
    }
    assert!(store.spill_stats().live < spilled.live, "read-back bodies gave their space back");
    // A purge gives back the rest.
    ch.queue_purge("burst".into(), QueuePurgeOptions::default()).await.unwrap();
    assert_eq!(store.spill_stats().live, 0);
    // So does deleting the queue.
    for i in 0..3000u32 {
        let body = [i.to_be_bytes().to_vec(), vec![2u8; 1024]].concat();
        ch.basic_publish("".into(), "burst".into(), BasicPublishOptions::default(), &body, properties.clone())
            .await
            .unwrap();
    }
    common::wait_count(&ch, "burst", 3000).await;
    assert!(store.spill_stats().live > 0);
    ch.queue_delete("burst".into(), QueueDeleteOptions::default()).await.unwrap();
    assert_eq!(store.spill_stats().live, 0);
    ch.queue_declare("burst".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();

    // Pages of a previous run are gone after a restart.
    for i in 0..3000u32 {
        let body = [i.to_be_bytes().to_vec(), vec![1u8; 1024]].concat();
        ch.basic_publish("".into(), "burst".into(), BasicPublishOptions::default(), &body, properties.clone())
            .await
            .unwrap();
    }
    common::wait_count(&ch, "burst", 3000).await;
    assert!(store.spill_stats().live > 0);
    drop(store);
    let server = server.restart().await;
    let stats = server.broker.store.spill_stats();
    assert_eq!((stats.live, stats.bytes), (0, 0), "{stats:?}");
    assert_eq!(std::fs::read_dir(server.config.data_dir.join("spill")).unwrap().count(), 1, "one empty segment");
}

/// Ready messages of `queue` in `/` whose bodies are in memory.
fn loaded(server: &TestServer, queue: &str) -> usize {
    server.broker.vhost("/").unwrap().lock().queue(queue).map_or(usize::MAX, |q| q.loaded_len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_keeps_its_bytes_bound_in_memory_and_pages_what_a_burst_left_behind() {
    let server = TestServer::with_config(|c| c.paging_queue_bytes = 64 * 1024).await;
    let (_conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("deep".into(), durable, FieldTable::default()).await.unwrap();
    ch.queue_declare("wide".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    // Persistent 4 KiB into a durable queue, published as one burst: the
    // newest wait for their log entries, so publishing alone leaves them
    // in memory; the broker pages them out once written. 64 KiB holds 16.
    let mut confirms = Vec::new();
    for i in 0..300u32 {
        let body = [i.to_be_bytes().to_vec(), vec![7u8; 4092]].concat();
        confirms.push(
            ch.basic_publish("".into(), "deep".into(), BasicPublishOptions::default(), &body, persistent())
                .await
                .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
    eventually("the durable queue keeps 16 bodies in memory", || async { loaded(&server, "deep") == 16 }).await;
    // Transient 1 KiB: 64 stay, the rest spill.
    for i in 0..300u32 {
        let body = [i.to_be_bytes().to_vec(), vec![1u8; 1020]].concat();
        ch.basic_publish("".into(), "wide".into(), BasicPublishOptions::default(), &body, BasicProperties::default())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    eventually("the transient queue keeps 64 bodies in memory", || async { loaded(&server, "wide") == 64 }).await;
    assert_eq!(server.broker.store.spill_stats().live, 300 - 64);
    for (queue, total) in [("deep", 300u32), ("wide", 300)] {
        let got = drain(&ch, queue).await;
        let order: Vec<u32> = got.iter().map(|(body, _)| u32::from_be_bytes(body[..4].try_into().unwrap())).collect();
        assert_eq!(order, (0..total).collect::<Vec<_>>(), "{queue} in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_paging_ratio_every_queue_keeps_a_short_head_in_memory() {
    // A paging threshold of about 1 KiB: the broker is above it at once.
    let server = TestServer::with_config(|c| {
        c.memory_high_watermark_bytes = 1 << 40;
        c.memory_high_watermark_paging_ratio = 1e-9;
    })
    .await;
    let (_conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for queue in ["a", "b"] {
        ch.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
        for i in 0..200u32 {
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    }
    let window = warren_core::queue::PRESSURE_WINDOW;
    eventually("both queues keep a short head", || async {
        loaded(&server, "a") == window && loaded(&server, "b") == window
    })
    .await;
    let got = drain(&ch, "a").await;
    assert_eq!(
        got.iter().map(|(body, _)| u32::from_be_bytes(body[..4].try_into().unwrap())).collect::<Vec<_>>(),
        (0..200).collect::<Vec<_>>()
    );
}

/// Durable queues `work` and `dlq`, `work` dead-lettering to `dlq`, on a
/// channel in confirm mode; returns the durable declare options.
async fn work_with_a_dead_letter_queue(ch: &Channel) -> QueueDeclareOptions {
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let dlx = common::args(&[
        ("x-dead-letter-exchange", common::text("")),
        ("x-dead-letter-routing-key", common::text("dlq")),
    ]);
    ch.queue_declare("work".into(), durable, dlx).await.unwrap();
    ch.queue_declare("dlq".into(), durable, FieldTable::default()).await.unwrap();
    durable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_copies_refer_to_the_stored_body_and_outlive_its_segment() {
    let server = TestServer::with_config(|c| c.segment_bytes_max = 256 * 1024).await;
    let (_conn, ch) = open(&server).await;
    let durable = work_with_a_dead_letter_queue(&ch).await;
    let body = |i: u32| [i.to_be_bytes().to_vec(), vec![(i % 251) as u8; 64 * 1024]].concat();
    for i in 0..20u32 {
        ch.basic_publish("".into(), "work".into(), BasicPublishOptions::default(), &body(i), persistent())
            .await
            .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    let wal = server.config.data_dir.join("wal");
    let before = size(&wal);
    while let Some(m) = ch.basic_get("work".into(), BasicGetOptions::default()).await.unwrap() {
        m.delivery.acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await.unwrap();
    }
    common::wait_count(&ch, "dlq", 20).await;
    let store = server.broker.store.clone();
    assert_eq!(store.linked_entries(), 20, "each copy refers to its original's body");
    let written = size(&wal) - before;
    assert!(written < 20 * 4096, "dead-lettering 20 × 64 KiB wrote {written} bytes: the bodies again?");

    // Filler through another queue fills segments; the originals' segment
    // then holds nothing but the bodies the copies refer to, and
    // compaction rewrites the copies whole so it can go.
    ch.queue_declare("filler".into(), durable, FieldTable::default()).await.unwrap();
    for _ in 0..3 {
        for _ in 0..60 {
            ch.basic_publish("".into(), "filler".into(), BasicPublishOptions::default(), &[9u8; 8192], persistent())
                .await
                .unwrap();
        }
        ch.wait_for_confirms().await.unwrap();
        ch.queue_purge("filler".into(), QueuePurgeOptions::default()).await.unwrap();
    }
    // The copies' bodies once (1.3 MB) and a few segments; with the
    // originals' segments kept it would be twice that.
    let limit = 20 * 64 * 1024 + 3 * 256 * 1024;
    for _ in 0..300 {
        if store.linked_entries() == 0 && size(&wal) < limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.linked_entries(), 0, "the copies were rewritten whole");
    assert!(size(&wal) < limit, "the originals' segments were reclaimed: {} bytes", size(&wal));
    drop(store);

    // After a restart the copies are whole, with their x-death, in order.
    let server = server.restart().await;
    let (_conn, ch) = open(&server).await;
    for i in 0..20u32 {
        let m = ch.basic_get("dlq".into(), BasicGetOptions::default()).await.unwrap().unwrap();
        assert_eq!(m.delivery.data, body(i));
        let headers = m.delivery.properties.headers().clone().unwrap();
        assert!(headers.inner().contains_key("x-death"));
        m.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_copies_survive_a_restart_and_let_the_body_go_once_settled() {
    let server = TestServer::start().await;
    let (_conn, ch) = open(&server).await;
    work_with_a_dead_letter_queue(&ch).await;
    // Delayed release links too: a durable delayed exchange routing to `work`.
    let delayed = ExchangeDeclareOptions { durable: true, ..Default::default() };
    let kind = common::args(&[("x-delayed-type", common::text("direct"))]);
    ch.exchange_declare("later".into(), ExchangeKind::Custom("x-delayed-message".into()), delayed, kind).await.unwrap();
    ch.queue_bind("work".into(), "later".into(), "work".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("x-delay".into(), AMQPValue::LongInt(50));
    let big = vec![5u8; 8192];
    ch.basic_publish(
        "later".into(),
        "work".into(),
        BasicPublishOptions::default(),
        &big,
        persistent().with_headers(headers),
    )
    .await
    .unwrap();
    ch.basic_publish("".into(), "work".into(), BasicPublishOptions::default(), b"small", persistent()).await.unwrap();
    ch.wait_for_confirms().await.unwrap();
    common::wait_count(&ch, "work", 2).await;
    let store = server.broker.store.clone();
    assert_eq!(store.linked_entries(), 1, "the released delayed message refers to its scheduled body");
    for _ in 0..2 {
        let m = ch.basic_get("work".into(), BasicGetOptions::default()).await.unwrap().unwrap();
        m.delivery.acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await.unwrap();
    }
    common::wait_count(&ch, "dlq", 2).await;
    assert_eq!(store.linked_entries(), 1, "a small body is written again; a copy of a linked copy links to the root");
    drop(store);

    let server = server.restart().await;
    assert_eq!(server.broker.store.linked_entries(), 1, "links are rebuilt from the log");
    let (_conn, ch) = open(&server).await;
    let got = drain(&ch, "dlq").await;
    let mut bodies: Vec<Vec<u8>> = got.into_iter().map(|(b, _)| b).collect();
    bodies.sort();
    assert_eq!(bodies, vec![big.clone(), b"small".to_vec()]);
    assert_eq!(server.broker.store.linked_entries(), 0);
}
