//! Simulated power cuts: the message log runs on a simulated disk that
//! throws away everything not fsynced. Publishers with confirms run at full
//! speed, the power goes, the broker restarts on what survived, and the
//! checker counts confirmed-then-lost messages. The same run with
//! `fsync = never` (confirm once written, before fsync) must be caught
//! losing confirmed messages: the checker can fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_server::config::Fsync;
use warren_server::Config;
use warren_storage::sim::{Faults, SimBackend};

/// Publishes numbered persistent messages with confirms to `queue`
/// (declared with `arguments`) until the broker stops answering; returns
/// the confirmed numbers.
async fn publish_until_cut(
    uri: String,
    cut_after: Duration,
    sim: SimBackend,
    queue: &str,
    arguments: FieldTable,
) -> BTreeSet<u64> {
    let conn = Connection::connect(&uri, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(queue.into(), durable, arguments).await.unwrap();
    let mut confirmed = BTreeSet::new();
    let started = std::time::Instant::now();
    let mut seq = 0u64;
    loop {
        let mut window = Vec::new();
        for _ in 0..100 {
            seq += 1;
            let props = BasicProperties::default().with_delivery_mode(2);
            let confirm = ch
                .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &seq.to_be_bytes(), props)
                .await
                .unwrap();
            window.push((seq, confirm));
        }
        if started.elapsed() >= cut_after {
            // The power goes now: whatever the disk has not made durable is
            // gone, and the disk accepts nothing more.
            sim.power_cut_and_stay_off();
        }
        for (seq, confirm) in window {
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), confirm).await {
                if c.is_ack() {
                    confirmed.insert(seq);
                }
            }
        }
        if started.elapsed() >= cut_after {
            return confirmed;
        }
    }
}

/// Restarts the broker on what the simulated disk kept (faults cleared),
/// drains `queue` (numbered messages) and runs `then` on the channel
/// before stopping.
async fn restart_and_drain<F, Fut>(sim: &SimBackend, config: Config, queue: &str, then: F) -> BTreeSet<u64>
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    sim.set_faults(Faults::default());
    let (addr, stop, task) = common::start_on(Arc::new(sim.clone()), config).await;
    let conn =
        Connection::connect(&format!("amqp://guest:guest@{addr}/%2F"), ConnectionProperties::default()).await.unwrap();
    let mut ch = conn.create_channel().await.unwrap();
    let mut recovered = BTreeSet::new();
    loop {
        match ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await {
            Ok(Some(m)) => {
                recovered.insert(u64::from_be_bytes(m.delivery.data[..8].try_into().unwrap()));
            }
            Ok(None) => break,
            // With `fsync = never` the queue's own declaration can be lost
            // too: nothing was recovered.
            Err(_) => {
                ch = conn.create_channel().await.unwrap();
                break;
            }
        }
    }
    then(ch).await;
    let _ = stop.send(());
    let _ = task.await;
    recovered
}

fn sim_config(data_dir: &std::path::Path, segment_bytes_max: u64) -> Config {
    Config {
        amqp_port: 0,
        bind: vec!["127.0.0.1".into()],
        data_dir: data_dir.to_path_buf(),
        segment_bytes_max,
        ..Config::default()
    }
}

/// Runs one power cut; returns (confirmed, confirmed-then-lost).
async fn one_cut(fsync: Fsync) -> (usize, usize) {
    let sim = SimBackend::new();
    let data_dir = common::temp_data_dir();
    let config = Config { fsync, ..sim_config(&data_dir, 256 * 1024) };
    let (addr, stop, task) = common::start_on(Arc::new(sim.clone()), config.clone()).await;
    let uri = format!("amqp://guest:guest@{addr}/%2F");
    let confirmed =
        publish_until_cut(uri, Duration::from_millis(600), sim.clone(), "power", FieldTable::default()).await;
    let _ = stop.send(());
    let _ = task.await;

    // Power is back.
    let recovered = restart_and_drain(&sim, config, "power", |_| async {}).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    let lost = confirmed.difference(&recovered).count();
    (confirmed.len(), lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_loses_no_confirmed_message() {
    for _ in 0..3 {
        let (confirmed, lost) = one_cut(Fsync::Always).await;
        println!("power cut (fsync always): confirmed {confirmed}, confirmed-then-lost {lost}");
        assert!(confirmed > 100, "the workload ran: {confirmed}");
        assert_eq!(lost, 0);
    }
}

/// A stream through power cuts: every confirmed message is in the stream
/// after the restart, at contiguous offsets from 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_loses_no_confirmed_message_of_a_stream() {
    use futures_lite::StreamExt;
    use lapin::types::AMQPValue;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
    for _ in 0..3 {
        let sim = SimBackend::new();
        let data_dir = common::temp_data_dir();
        let config = sim_config(&data_dir, 256 * 1024);
        let (addr, stop, task) = common::start_on(Arc::new(sim.clone()), config.clone()).await;
        let uri = format!("amqp://guest:guest@{addr}/%2F");
        let confirmed =
            publish_until_cut(uri, Duration::from_millis(600), sim.clone(), "events", arguments.clone()).await;
        let _ = stop.send(());
        let _ = task.await;

        sim.set_faults(Faults::default());
        let (addr, stop, task) = common::start_on(Arc::new(sim.clone()), config).await;
        let conn = Connection::connect(&format!("amqp://guest:guest@{addr}/%2F"), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        let retained = ch.queue_declare("events".into(), durable, arguments.clone()).await.unwrap().message_count();
        ch.basic_qos(1000, BasicQosOptions::default()).await.unwrap();
        let mut from_first = FieldTable::default();
        from_first.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
        let mut deliveries =
            ch.basic_consume("events".into(), "".into(), BasicConsumeOptions::default(), from_first).await.unwrap();
        let mut kept = BTreeSet::new();
        let mut offsets = Vec::new();
        while kept.len() < retained as usize {
            let delivery =
                tokio::time::timeout(Duration::from_secs(5), deliveries.next()).await.unwrap().unwrap().unwrap();
            let headers = delivery.properties.headers().clone().unwrap();
            if let Some(AMQPValue::LongLongInt(offset)) = headers.inner().get("x-stream-offset") {
                offsets.push(*offset);
            }
            kept.insert(u64::from_be_bytes(delivery.data[..8].try_into().unwrap()));
            delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
        let _ = conn.close(200, "done".into()).await;
        let _ = stop.send(());
        let _ = task.await;
        let _ = std::fs::remove_dir_all(&data_dir);
        let lost = confirmed.difference(&kept).count();
        println!("power cut (stream): confirmed {}, retained {retained}, confirmed-then-lost {lost}", confirmed.len());
        assert!(confirmed.len() > 100, "the workload ran: {}", confirmed.len());
        assert_eq!(lost, 0);
        assert_eq!(offsets, (0..i64::from(retained)).collect::<Vec<_>>(), "offsets run from 0 without a gap");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirming_before_fsync_is_caught_by_the_checker() {
    let mut caught = false;
    for _ in 0..5 {
        let (confirmed, lost) = one_cut(Fsync::Never).await;
        println!("power cut (fsync never): confirmed {confirmed}, confirmed-then-lost {lost}");
        if lost > 0 {
            caught = true;
            break;
        }
    }
    assert!(caught, "confirming before fsync must show up as confirmed-then-lost messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_nacks_publishers_and_loses_nothing_confirmed() {
    let sim = SimBackend::new();
    let data_dir = common::temp_data_dir();
    let config = sim_config(&data_dir, 64 * 1024);
    sim.set_faults(Faults { capacity_bytes: Some(256 * 1024), ..Faults::default() });
    let (addr, stop, task) = common::start_on(Arc::new(sim.clone()), config.clone()).await;
    let conn =
        Connection::connect(&format!("amqp://guest:guest@{addr}/%2F"), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("full".into(), durable, FieldTable::default()).await.unwrap();
    let body = vec![9u8; 1024];
    let (mut acked, mut nacked) = (BTreeSet::new(), 0);
    for seq in 0..600u64 {
        let mut payload = seq.to_be_bytes().to_vec();
        payload.extend_from_slice(&body);
        let props = BasicProperties::default().with_delivery_mode(2);
        let confirm =
            ch.basic_publish("".into(), "full".into(), BasicPublishOptions::default(), &payload, props).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), confirm).await {
            Ok(Ok(c)) if c.is_ack() => {
                acked.insert(seq);
            }
            Ok(Ok(_)) => nacked += 1,
            other => panic!("publisher neither acked nor nacked: {other:?}"),
        }
    }
    println!("disk full: acked {}, nacked {nacked}", acked.len());
    assert!(!acked.is_empty() && nacked > 0, "the disk filled up part way: acked {}, nacked {nacked}", acked.len());
    let _ = stop.send(());
    let _ = task.await;

    // Space comes back; the broker restarts, serves every confirmed message
    // and accepts new persistent messages again.
    let recovered = restart_and_drain(&sim, config, "full", |ch| async move {
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let props = BasicProperties::default().with_delivery_mode(2);
        let confirm =
            ch.basic_publish("".into(), "full".into(), BasicPublishOptions::default(), b"again", props).await.unwrap();
        assert!(confirm.await.unwrap().is_ack());
    })
    .await;
    assert!(acked.is_subset(&recovered), "confirmed then lost: {:?}", acked.difference(&recovered).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Dead-lettering while the power goes: every confirmed message is after
/// restart in its queue or in the dead-letter queue (the copy is written
/// before the original is settled); some may be in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettering_through_a_power_cut_loses_nothing() {
    for _ in 0..3 {
        let sim = SimBackend::new();
        let data_dir = common::temp_data_dir();
        let config = sim_config(&data_dir, 128 * 1024);
        let (addr, stop, task) = common::start_on(Arc::new(sim.clone()), config.clone()).await;
        let conn = Connection::connect(&format!("amqp://guest:guest@{addr}/%2F"), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare("dlq".into(), durable, FieldTable::default()).await.unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-dead-letter-exchange".into(), lapin::types::AMQPValue::LongString("".into()));
        arguments.insert("x-dead-letter-routing-key".into(), lapin::types::AMQPValue::LongString("dlq".into()));
        ch.queue_declare("src".into(), durable, arguments).await.unwrap();
        let mut confirmed = BTreeSet::new();
        for seq in 0..1500u64 {
            let props = BasicProperties::default().with_delivery_mode(2);
            let confirm = ch
                .basic_publish("".into(), "src".into(), BasicPublishOptions::default(), &seq.to_be_bytes(), props)
                .await
                .unwrap();
            if seq % 100 == 99 {
                confirm.await.unwrap();
            }
        }
        confirmed.extend(0..1500u64);
        // A consumer rejects everything; the power goes part way.
        let consumer = conn.create_channel().await.unwrap();
        let cutter = sim.clone();
        let cut = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cutter.power_cut_and_stay_off();
        });
        let mut rejected = 0;
        while !cut.is_finished() {
            let Ok(Ok(Some(m))) = tokio::time::timeout(
                Duration::from_secs(1),
                consumer.basic_get("src".into(), BasicGetOptions::default()),
            )
            .await
            else {
                break;
            };
            let _ = m.delivery.acker.reject(BasicRejectOptions { requeue: false }).await;
            rejected += 1;
        }
        cut.await.unwrap();
        let _ = stop.send(());
        let _ = task.await;

        let mut in_dlq = BTreeSet::new();
        let in_src = restart_and_drain(&sim, config, "src", |ch| {
            let in_dlq = &mut in_dlq;
            async move {
                while let Some(m) = ch.basic_get("dlq".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
                    in_dlq.insert(u64::from_be_bytes(m.delivery.data[..8].try_into().unwrap()));
                }
            }
        })
        .await;
        let _ = std::fs::remove_dir_all(&data_dir);
        let both = in_src.intersection(&in_dlq).count();
        let all: BTreeSet<u64> = in_src.union(&in_dlq).copied().collect();
        let lost: Vec<&u64> = confirmed.difference(&all).collect();
        println!(
            "dead-lettering power cut: rejected {rejected}, in source {}, dead-lettered {}, in both {both}, lost {}",
            in_src.len(),
            in_dlq.len(),
            lost.len()
        );
        assert!(rejected > 50 && !in_dlq.is_empty(), "dead-lettering ran: {rejected} rejected");
        assert!(lost.is_empty(), "confirmed then lost: {lost:?}");
    }
}

/// A declaration whose log entry cannot be written is not answered
/// `declare-ok`: the client gets 541 INTERNAL_ERROR (connection closed),
/// and the queue does not come back after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_the_disk_refuses_is_an_error_for_the_client() {
    let sim = SimBackend::new();
    let data_dir = common::temp_data_dir();
    let config = sim_config(&data_dir, 256 * 1024);
    let (addr, stop, task) = common::start_on(Arc::new(sim.clone()), config.clone()).await;
    let conn =
        Connection::connect(&format!("amqp://guest:guest@{addr}/%2F"), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("written".into(), durable, FieldTable::default()).await.unwrap();
    sim.set_faults(Faults { fail_writes: true, fail_syncs: true, ..Faults::default() });
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        ch.queue_declare("refused".into(), durable, FieldTable::default()),
    )
    .await
    .expect("answered");
    let error = refused.expect_err("declare-ok for a queue that was not stored");
    assert!(error.to_string().contains("INTERNAL_ERROR"), "{error}");
    let _ = stop.send(());
    let _ = task.await;
    let found = restart_and_drain(&sim, config, "written", |ch| async move {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        assert!(ch.queue_declare("refused".into(), passive, FieldTable::default()).await.is_err());
    })
    .await;
    assert!(found.is_empty());
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_while_paging_transient_messages_keeps_them_in_memory_and_in_order() {
    let sim = SimBackend::new();
    let data_dir = common::temp_data_dir();
    let mut config = sim_config(&data_dir, 64 * 1024);
    config.paging_queue_messages = 16;
    // Room for the log's first segment and a little spill, not for 2 MiB.
    sim.set_faults(Faults { capacity_bytes: Some(512 * 1024), ..Faults::default() });
    let (addr, stop, task) = common::start_on(Arc::new(sim.clone()), config).await;
    let conn =
        Connection::connect(&format!("amqp://guest:guest@{addr}/%2F"), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    ch.queue_declare("burst".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let total = 2000u32;
    for i in 0..total {
        let body = [i.to_be_bytes().to_vec(), vec![4u8; 1020]].concat();
        let confirm = ch
            .basic_publish("".into(), "burst".into(), BasicPublishOptions::default(), &body, BasicProperties::default())
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack(), "a transient message is accepted whatever the spill can take");
    }
    let used = sim.total_bytes();
    assert!(used > 400 * 1024 && used <= 512 * 1024, "the spill filled the disk: {used} bytes");
    let mut next = 0u32;
    while let Some(m) = ch.basic_get("burst".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        assert_eq!(u32::from_be_bytes(m.delivery.data[..4].try_into().unwrap()), next, "in order");
        assert_eq!(m.delivery.data.len(), 1024);
        next += 1;
    }
    assert_eq!(next, total, "nothing lost");
    // Still serving: a new queue takes and gives back a message.
    ch.queue_declare("after".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    ch.basic_publish("".into(), "after".into(), BasicPublishOptions::default(), b"x", BasicProperties::default())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ch.basic_get("after".into(), BasicGetOptions { no_ack: true }).await.unwrap().is_some());
    let _ = stop.send(());
    let _ = task.await;
    let _ = std::fs::remove_dir_all(&data_dir);
}
