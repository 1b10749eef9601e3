//! The kill -9 loop: a real broker process, real clients publishing
//! persistent messages with confirms and consuming with acks, SIGKILL at a
//! random moment, restart, repeat. The checker then counts every message:
//! confirmed but never delivered (lost, must be 0), delivered twice
//! (duplicates, allowed at-least-once), and restart times.
//!
//! Default: 10 cycles. `WARREN_KILL9_CYCLES=100 cargo test --release -p warren --test kill9`
//! runs the long version.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use parking_lot_free::Mutex;

mod parking_lot_free {
    /// std's Mutex with poisoning ignored (a panicking client task must not
    /// hide the history from the checker).
    pub struct Mutex<T>(std::sync::Mutex<T>);
    impl<T> Mutex<T> {
        pub fn new(value: T) -> Self {
            Mutex(std::sync::Mutex::new(value))
        }
        pub fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What every test here starts from: an empty data directory, a free port,
/// the URI of guest there, and a runtime for the clients.
struct Scene {
    data: std::path::PathBuf,
    port: u16,
    uri: String,
    runtime: tokio::runtime::Runtime,
}

fn scene(name: &str) -> Scene {
    let data = std::env::temp_dir().join(format!("warren-kill9-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let port = free_port();
    let uri = format!("amqp://guest:guest@127.0.0.1:{port}/%2F");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    Scene { data, port, uri, runtime }
}

fn start(port: u16, data: &Path) -> (Child, Duration) {
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "--amqp-port",
            &port.to_string(),
            "--http-port",
            "0",
            "--prometheus-port",
            "0",
            "--bind",
            "127.0.0.1",
            "--log",
            "warn",
            "--data-dir",
        ])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "broker did not come back");
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, started.elapsed())
}

#[derive(Default)]
struct History {
    confirmed: BTreeSet<u64>,
    /// seq -> (deliveries, any with redelivered set)
    delivered: BTreeMap<u64, (u32, bool)>,
}

async fn publisher(uri: String, next: Arc<AtomicU64>, history: Arc<Mutex<History>>, stop: Arc<AtomicBool>) {
    let Ok(conn) = Connection::connect(&uri, ConnectionProperties::default()).await else { return };
    let Ok(ch) = conn.create_channel().await else { return };
    if ch.confirm_select(ConfirmSelectOptions::default()).await.is_err() {
        return;
    }
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    if ch.queue_declare("torture".into(), durable, FieldTable::default()).await.is_err() {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        let mut window = Vec::new();
        for _ in 0..50 {
            let seq = next.fetch_add(1, Ordering::Relaxed);
            let props = BasicProperties::default().with_delivery_mode(2);
            match ch
                .basic_publish("".into(), "torture".into(), BasicPublishOptions::default(), &seq.to_be_bytes(), props)
                .await
            {
                Ok(confirm) => window.push((seq, confirm)),
                Err(_) => return,
            }
        }
        for (seq, confirm) in window {
            match confirm.await {
                Ok(c) if c.is_ack() => {
                    history.lock().confirmed.insert(seq);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

async fn consumer(uri: String, history: Arc<Mutex<History>>, stop: Arc<AtomicBool>) {
    let Ok(conn) = Connection::connect(&uri, ConnectionProperties::default()).await else { return };
    let Ok(ch) = conn.create_channel().await else { return };
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    if ch.queue_declare("torture".into(), durable, FieldTable::default()).await.is_err() {
        return;
    }
    let _ = ch.basic_qos(100, BasicQosOptions::default()).await;
    let Ok(mut deliveries) =
        ch.basic_consume("torture".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await
    else {
        return;
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_millis(200), deliveries.next()).await else {
            continue;
        };
        let seq = u64::from_be_bytes(delivery.data[..8].try_into().unwrap());
        {
            let mut h = history.lock();
            let entry = h.delivered.entry(seq).or_default();
            entry.0 += 1;
            entry.1 |= delivery.redelivered;
        }
        if delivery.acker.ack(BasicAckOptions::default()).await.is_err() {
            return;
        }
    }
}

#[test]
fn kill9_loop_loses_no_confirmed_message() {
    let cycles: usize = std::env::var("WARREN_KILL9_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let Scene { data, port, uri, runtime } = scene("confirms");
    let history = Arc::new(Mutex::new(History::default()));
    let next = Arc::new(AtomicU64::new(0));
    let mut restart_ms = Vec::new();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(std::process::id());
    for _ in 0..cycles {
        let (mut broker, took) = start(port, &data);
        restart_ms.push(u64::try_from(took.as_millis()).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = runtime.block_on(async {
            vec![
                tokio::spawn(publisher(uri.clone(), next.clone(), history.clone(), stop.clone())),
                tokio::spawn(consumer(uri.clone(), history.clone(), stop.clone())),
            ]
        });
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(300 + seed % 700));
        broker.kill().unwrap(); // SIGKILL
        broker.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        runtime.block_on(async {
            for task in tasks {
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            }
        });
    }
    // Final drain on a clean broker.
    let (mut broker, took) = start(port, &data);
    restart_ms.push(u64::try_from(took.as_millis()).unwrap());
    runtime.block_on(async {
        let conn = Connection::connect(&uri, ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare("torture".into(), durable, FieldTable::default()).await.unwrap();
        while let Some(m) = ch.basic_get("torture".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            let seq = u64::from_be_bytes(m.delivery.data[..8].try_into().unwrap());
            let mut h = history.lock();
            let entry = h.delivered.entry(seq).or_default();
            entry.0 += 1;
            entry.1 |= m.delivery.redelivered;
        }
    });
    broker.kill().unwrap();
    broker.wait().unwrap();

    let h = history.lock();
    let lost: Vec<u64> = h.confirmed.iter().filter(|seq| !h.delivered.contains_key(seq)).copied().collect();
    let duplicates = h.delivered.values().filter(|(n, _)| *n > 1).count();
    let unflagged_duplicates = h.delivered.values().filter(|(n, redelivered)| *n > 1 && !redelivered).count();
    restart_ms.sort_unstable();
    println!(
        "kill -9 loop: cycles {cycles}, confirmed {}, delivered {}, confirmed-then-lost {}, duplicates {duplicates} ({unflagged_duplicates} without redelivered), restart ms p50 {} max {}",
        h.confirmed.len(),
        h.delivered.len(),
        lost.len(),
        restart_ms[restart_ms.len() / 2],
        restart_ms[restart_ms.len() - 1],
    );
    assert!(h.confirmed.len() > 100 * cycles, "the workload ran: {} confirmed", h.confirmed.len());
    assert!(lost.is_empty(), "confirmed then lost: {:?}", &lost[..lost.len().min(20)]);
    assert_eq!(unflagged_duplicates, 0, "a message delivered twice must carry redelivered the second time");
    let _ = std::fs::remove_dir_all(&data);
}

/// Transactions under kill -9: every transaction answered `commit-ok` is
/// present in full after the restart; one published but never committed
/// left nothing. (A kill keeps what was written but not fsynced, so this
/// cannot tell a commit-ok sent before the fsync from one sent after; the
/// connection's unit tests, on a disk whose fsync fails, do.)
#[test]
fn kill9_keeps_committed_transactions_and_drops_uncommitted_ones() {
    const BATCH: u64 = 10;
    let Scene { data, port, uri, runtime } = scene("tx");
    let committed = Arc::new(Mutex::new(BTreeSet::new()));
    let (mut broker, _) = start(port, &data);
    let persistent = BasicProperties::default().with_delivery_mode(2);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (uri, committed, stop, persistent) = (uri.clone(), committed.clone(), stop.clone(), persistent.clone());
        runtime.spawn(async move {
            let conn = Connection::connect(&uri, ConnectionProperties::default()).await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            let durable = QueueDeclareOptions { durable: true, ..Default::default() };
            ch.queue_declare("ledger".into(), durable, FieldTable::default()).await.unwrap();
            // Published and never committed: must leave nothing.
            let pending = conn.create_channel().await.unwrap();
            pending.tx_select().await.unwrap();
            for i in 0..BATCH {
                let body = [u64::MAX.to_be_bytes(), i.to_be_bytes()].concat();
                pending
                    .basic_publish(
                        "".into(),
                        "ledger".into(),
                        BasicPublishOptions::default(),
                        &body,
                        persistent.clone(),
                    )
                    .await
                    .unwrap();
            }
            ch.tx_select().await.unwrap();
            let mut batch = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..BATCH {
                    let body = [batch.to_be_bytes(), i.to_be_bytes()].concat();
                    let options = BasicPublishOptions::default();
                    if ch.basic_publish("".into(), "ledger".into(), options, &body, persistent.clone()).await.is_err() {
                        return;
                    }
                }
                if ch.tx_commit().await.is_err() {
                    return;
                }
                committed.lock().insert(batch);
                batch += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    broker.kill().unwrap(); // SIGKILL
    broker.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    });

    let (mut broker, _) = start(port, &data);
    let present: BTreeMap<u64, u64> = runtime.block_on(async {
        let conn = Connection::connect(&uri, ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut present = BTreeMap::new();
        while let Some(m) = ch.basic_get("ledger".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            let batch = u64::from_be_bytes(m.delivery.data[..8].try_into().unwrap());
            *present.entry(batch).or_insert(0) += 1;
        }
        present
    });
    broker.kill().unwrap();
    broker.wait().unwrap();
    let committed = committed.lock();
    println!("transactions under kill -9: {} committed, batches present {}", committed.len(), present.len());
    assert!(committed.len() >= 5, "the workload ran: {} commits", committed.len());
    for batch in committed.iter() {
        assert_eq!(present.get(batch), Some(&BATCH), "committed transaction {batch} is not whole");
    }
    assert_eq!(present.get(&u64::MAX), None, "an uncommitted transaction left messages");
    // Beyond the committed ones, only the commit in flight at the kill.
    assert!(present.keys().filter(|b| !committed.contains(b)).count() <= 1, "{present:?}");
    let _ = std::fs::remove_dir_all(&data);
}

/// Deduplication under kill -9: a duplicate of a confirmed message is
/// recognised after the restart even when the broker died before it saved
/// its windows (every second).
#[test]
fn kill9_keeps_the_deduplication_key_of_a_confirmed_message() {
    let Scene { data, port, uri, runtime } = scene("dedup");
    let publish = |id: &'static str| {
        let uri = uri.clone();
        async move {
            let conn = Connection::connect(&uri, ConnectionProperties::default()).await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            let mut arguments = FieldTable::default();
            arguments.insert("x-message-deduplication".into(), lapin::types::AMQPValue::Boolean(true));
            arguments.insert("x-cache-ttl".into(), lapin::types::AMQPValue::LongLongInt(600_000));
            let durable = QueueDeclareOptions { durable: true, ..Default::default() };
            ch.queue_declare("orders".into(), durable, arguments).await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            let properties = BasicProperties::default().with_delivery_mode(2).with_message_id(id.into());
            ch.basic_publish("".into(), "orders".into(), BasicPublishOptions::default(), b"order", properties)
                .await
                .unwrap()
                .await
                .unwrap();
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            ch.queue_declare("orders".into(), passive, FieldTable::default()).await.unwrap().message_count()
        }
    };
    let (mut broker, _) = start(port, &data);
    // Several rounds: each kill lands within the second after the confirm,
    // mostly before the janitor saved the key.
    for round in 0..3u32 {
        assert_eq!(runtime.block_on(publish(["a", "b", "c"][round as usize])), round + 1);
        broker.kill().unwrap(); // SIGKILL
        broker.wait().unwrap();
        broker = start(port, &data).0;
        let count = runtime.block_on(publish(["a", "b", "c"][round as usize]));
        assert_eq!(count, round + 1, "round {round}: the duplicate was queued after the restart");
    }
    broker.kill().unwrap();
    broker.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data);
}

/// kill -9 while transient messages are paged out: the restart discards
/// their pages and gives the space back; persistent messages are intact.
#[test]
fn kill9_during_paging_discards_transient_pages_and_keeps_persistent_messages() {
    let Scene { data, port, uri, runtime } = scene("spill");
    let (mut broker, _) = start(port, &data);
    runtime.block_on(async {
        let conn = Connection::connect(&uri, ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare("mixed".into(), durable, FieldTable::default()).await.unwrap();
        let body = vec![7u8; 4096];
        for i in 0..3000u32 {
            let properties =
                if i % 30 == 0 { BasicProperties::default().with_delivery_mode(2) } else { BasicProperties::default() };
            ch.basic_publish("".into(), "mixed".into(), BasicPublishOptions::default(), &body, properties)
                .await
                .unwrap();
        }
        ch.wait_for_confirms().await.unwrap();
        // Paging moves two bodies per publish and waits at a persistent
        // message whose log entry is not written yet: on a loaded machine it
        // can trail the burst. More transient messages (into another queue,
        // so the count below stays exact) let it catch up.
        let spill = data.join("spill");
        let spilled =
            || -> u64 { std::fs::read_dir(&spill).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum() };
        ch.queue_declare("more".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
        for _ in 0..20 {
            if spilled() > 1_000_000 {
                break;
            }
            for _ in 0..1500 {
                let options = BasicPublishOptions::default();
                ch.basic_publish("".into(), "more".into(), options, &body, BasicProperties::default()).await.unwrap();
            }
            ch.wait_for_confirms().await.unwrap();
        }
        assert!(spilled() > 1_000_000, "transient bodies were paged out: {} bytes", spilled());
    });
    let spill = data.join("spill");
    broker.kill().unwrap(); // SIGKILL
    broker.wait().unwrap();

    let (mut broker, _) = start(port, &data);
    let count = runtime.block_on(async {
        let conn = Connection::connect(&uri, ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        ch.queue_declare("mixed".into(), passive, FieldTable::default()).await.unwrap().message_count()
    });
    assert_eq!(count, 100, "the persistent messages, and only they");
    // Checked once the broker answers (its port opens before it recovers).
    let files: Vec<u64> = std::fs::read_dir(&spill).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).collect();
    assert_eq!(files, vec![0], "the old pages are gone, one empty segment is open");
    broker.kill().unwrap();
    broker.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data);
}

/// A stream under kill -9: every confirmed message is in the stream after
/// the restarts, offsets run from 0 without a gap, and every (offset,
/// message) a consumer saw during the run is still at that offset at the
/// end (consumers are served only what is fsynced, so a crash never
/// renumbers what one saw).
#[test]
fn kill9_keeps_a_streams_confirmed_messages_at_the_offsets_consumers_saw() {
    let Scene { data, port, uri, runtime } = scene("stream");
    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = Arc::new(Mutex::new(BTreeMap::<u64, u64>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let stream_args = || {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("stream".into()));
        args
    };
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let offset_of = |delivery: &lapin::message::Delivery| -> u64 {
        let headers = delivery.properties.headers().as_ref().unwrap();
        match headers.inner().get("x-stream-offset").unwrap() {
            lapin::types::AMQPValue::LongLongInt(offset) => u64::try_from(*offset).unwrap(),
            other => panic!("x-stream-offset is {other:?}"),
        }
    };
    for cycle in 0..3u64 {
        let (mut broker, _) = start(port, &data);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = runtime.block_on(async {
            let publish = {
                let (uri, next, confirmed, stop) = (uri.clone(), next.clone(), confirmed.clone(), stop.clone());
                tokio::spawn(async move {
                    let Ok(conn) = Connection::connect(&uri, ConnectionProperties::default()).await else { return };
                    let Ok(ch) = conn.create_channel().await else { return };
                    let _ = ch.confirm_select(ConfirmSelectOptions::default()).await;
                    if ch.queue_declare("events".into(), durable, stream_args()).await.is_err() {
                        return;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        let mut window = Vec::new();
                        for _ in 0..50 {
                            let seq = next.fetch_add(1, Ordering::Relaxed);
                            let props = BasicProperties::default().with_delivery_mode(2);
                            let body = seq.to_be_bytes();
                            match ch.basic_publish("".into(), "events".into(), Default::default(), &body, props).await {
                                Ok(confirm) => window.push((seq, confirm)),
                                Err(_) => return,
                            }
                        }
                        for (seq, confirm) in window {
                            match confirm.await {
                                Ok(c) if c.is_ack() => {
                                    confirmed.lock().insert(seq);
                                }
                                Ok(_) => {}
                                Err(_) => return,
                            }
                        }
                    }
                })
            };
            let read = {
                let (uri, seen, stop) = (uri.clone(), seen.clone(), stop.clone());
                tokio::spawn(async move {
                    let Ok(conn) = Connection::connect(&uri, ConnectionProperties::default()).await else { return };
                    let Ok(ch) = conn.create_channel().await else { return };
                    if ch.queue_declare("events".into(), durable, stream_args()).await.is_err() {
                        return;
                    }
                    let _ = ch.basic_qos(200, BasicQosOptions::default()).await;
                    let mut args = FieldTable::default();
                    args.insert("x-stream-offset".into(), lapin::types::AMQPValue::LongString("first".into()));
                    let Ok(mut deliveries) =
                        ch.basic_consume("events".into(), "".into(), BasicConsumeOptions::default(), args).await
                    else {
                        return;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(Some(Ok(delivery))) =
                            tokio::time::timeout(Duration::from_millis(200), deliveries.next()).await
                        else {
                            continue;
                        };
                        let seq = u64::from_be_bytes(delivery.data[..8].try_into().unwrap());
                        seen.lock().insert(offset_of(&delivery), seq);
                        if delivery.acker.ack(BasicAckOptions::default()).await.is_err() {
                            return;
                        }
                    }
                })
            };
            vec![publish, read]
        });
        std::thread::sleep(Duration::from_millis(400 + 150 * cycle));
        broker.kill().unwrap();
        broker.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        runtime.block_on(async {
            for task in tasks {
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            }
        });
    }
    let (mut broker, _) = start(port, &data);
    let stream: BTreeMap<u64, u64> = runtime.block_on(async {
        let conn = Connection::connect(&uri, ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let declared = ch.queue_declare("events".into(), durable, stream_args()).await.unwrap();
        ch.basic_qos(1000, BasicQosOptions::default()).await.unwrap();
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), lapin::types::AMQPValue::LongString("first".into()));
        let mut deliveries =
            ch.basic_consume("events".into(), "".into(), BasicConsumeOptions::default(), args).await.unwrap();
        let mut stream = BTreeMap::new();
        while stream.len() < declared.message_count() as usize {
            let delivery =
                tokio::time::timeout(Duration::from_secs(10), deliveries.next()).await.unwrap().unwrap().unwrap();
            stream.insert(offset_of(&delivery), u64::from_be_bytes(delivery.data[..8].try_into().unwrap()));
            delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
        stream
    });
    broker.kill().unwrap();
    broker.wait().unwrap();
    let confirmed = confirmed.lock();
    let seen = seen.lock();
    let kept: BTreeSet<u64> = stream.values().copied().collect();
    let lost: Vec<u64> = confirmed.iter().filter(|seq| !kept.contains(seq)).copied().collect();
    let moved: Vec<(u64, u64)> = seen.iter().filter(|(o, s)| stream.get(o) != Some(s)).map(|(o, s)| (*o, *s)).collect();
    println!(
        "stream under kill -9: confirmed {}, in the stream {}, seen by the reader {}, lost {}, renumbered {}",
        confirmed.len(),
        stream.len(),
        seen.len(),
        lost.len(),
        moved.len()
    );
    assert!(confirmed.len() > 500, "the workload ran: {} confirmed", confirmed.len());
    assert!(!seen.is_empty(), "the reader read during the run");
    assert!(lost.is_empty(), "confirmed then lost: {:?}", &lost[..lost.len().min(20)]);
    assert!(
        moved.is_empty(),
        "an offset a consumer saw names another message now: {:?}",
        &moved[..moved.len().min(20)]
    );
    assert_eq!(stream.keys().copied().collect::<Vec<_>>(), (0..stream.len() as u64).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&data);
}

/// Server-side offset tracking and retention by age across a `kill -9`: a
/// consumer under the tag `billing` acks five messages; after the broker is
/// killed and restarted, the next `billing` consumer starts at offset 5. A
/// stream with `x-max-age` 2s and small segments drops its old segments
/// once they are older (the newest segment stays).
#[test]
fn kill9_keeps_tracked_stream_offsets_and_streams_expire_by_age() {
    use lapin::types::AMQPValue;
    let Scene { data, port, uri, runtime } = scene("tracked");
    let stream = |extra: &[(&str, AMQPValue)]| {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        for (key, value) in extra {
            args.insert((*key).into(), value.clone());
        }
        args
    };
    let aged = || {
        stream(&[
            ("x-max-age", AMQPValue::LongString("2s".into())),
            ("x-stream-max-segment-size-bytes", AMQPValue::LongLongInt(2000)),
        ])
    };
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let first_offsets = |ch: lapin::Channel, queue: &'static str, tag: &'static str, args: FieldTable, n: usize| async move {
        ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
        let mut deliveries =
            ch.basic_consume(queue.into(), tag.into(), BasicConsumeOptions::default(), args).await.unwrap();
        let mut offsets = Vec::new();
        while offsets.len() < n {
            let delivery =
                tokio::time::timeout(Duration::from_secs(5), deliveries.next()).await.unwrap().unwrap().unwrap();
            let headers = delivery.properties.headers().clone().unwrap();
            let Some(AMQPValue::LongLongInt(offset)) = headers.inner().get("x-stream-offset").cloned() else {
                panic!("no offset header")
            };
            offsets.push(offset);
            delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
        ch.basic_cancel(tag.into(), BasicCancelOptions::default()).await.unwrap();
        offsets
    };
    let (mut broker, _) = start(port, &data);
    runtime.block_on(async {
        let conn = Connection::connect(&uri, ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        ch.queue_declare("ledger".into(), durable, stream(&[])).await.unwrap();
        ch.queue_declare("recent".into(), durable, aged()).await.unwrap();
        for i in 0..20u32 {
            let body = i.to_be_bytes();
            let props = BasicProperties::default().with_delivery_mode(2);
            ch.basic_publish("".into(), "ledger".into(), Default::default(), &body, props.clone())
                .await
                .unwrap()
                .await
                .unwrap();
            let padding = [0u8; 500];
            ch.basic_publish("".into(), "recent".into(), Default::default(), &padding, props)
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let void = stream(&[("x-stream-offset", AMQPValue::Void)]);
        let reader = conn.create_channel().await.unwrap();
        assert_eq!(first_offsets(reader, "ledger", "billing", void, 5).await, vec![0, 1, 2, 3, 4]);
    });
    // Tracked offsets are saved once a second.
    std::thread::sleep(Duration::from_millis(1500));
    broker.kill().unwrap();
    broker.wait().unwrap();
    let (mut broker, _) = start(port, &data);
    runtime.block_on(async {
        let conn = Connection::connect(&uri, ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let void = stream(&[("x-stream-offset", AMQPValue::Void)]);
        assert_eq!(first_offsets(ch, "ledger", "billing", void, 2).await, vec![5, 6], "resumed after the last ack");
        // The old segments of `recent` are past 2 s now (checked every second).
        let ch = conn.create_channel().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut retained;
        loop {
            let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
            retained = ch.queue_declare("recent".into(), passive, aged()).await.unwrap().message_count();
            if retained < 20 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(0 < retained && retained < 20, "whole old segments went, the newest stayed: {retained} of 20 retained");
        let first = stream(&[("x-stream-offset", AMQPValue::LongString("first".into()))]);
        let from = first_offsets(ch, "recent", "reader", first, 1).await;
        assert_eq!(from, vec![20 - i64::from(retained)], "a read from `first` starts at the oldest retained");
    });
    broker.kill().unwrap();
    broker.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data);
}
