//! The connection state machine driven with bytes, no socket: a broker on a
//! simulated disk, client frames encoded by the codec, the outbox decoded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use warren_codec::encode;
use warren_codec::frame::{FrameDecoder, FrameKind};
use warren_codec::method::{self, Method};
use warren_codec::properties::flag;
use warren_codec::spec::{basic, channel, confirm, connection, queue, tx, AMQPClass};
use warren_codec::types::{AMQPValue, FieldTable, LongString, ShortString};
use warren_storage::sim::{Faults, SimBackend};

use super::{Connection, Phase, Wait};
use crate::broker::Broker;
use crate::config::Config;

/// What the broker sent, decoded.
#[derive(Debug, PartialEq)]
enum Out {
    Method(AMQPClass),
    Ack { tag: u64, multiple: bool },
    Content,
}

struct Harness {
    conn: Connection,
    disk: Arc<SimBackend>,
    dir: std::path::PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn broker(config: impl FnOnce(&mut Config)) -> (Arc<Broker>, Arc<SimBackend>, std::path::PathBuf) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "warren-connection-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let mut settings = Config { data_dir: dir.clone(), ..Config::default() };
    config(&mut settings);
    let disk = Arc::new(SimBackend::new());
    match Broker::open_with(settings, crate::broker::Environment::on(disk.clone())) {
        Ok(broker) => (Arc::new(broker), disk, dir),
        Err(error) => panic!("broker did not open: {error}"),
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40_000)
}

impl Harness {
    fn new(config: impl FnOnce(&mut Config)) -> Harness {
        let (broker, disk, dir) = broker(config);
        let endpoints = super::Endpoints { peer: loopback(), local: loopback(), tls: false, certificate: None };
        Harness { conn: Connection::new(broker, endpoints), disk, dir }
    }

    /// A connection past `connection.open`, on vhost `/`.
    fn open(config: impl FnOnce(&mut Config)) -> Harness {
        let mut h = Harness::new(config);
        h.start_ok("guest", "guest", true);
        h.login();
        h.feed(|buf| {
            method(buf, 0, connection_tune_ok(0, 131_072));
            method(buf, 0, open_vhost());
        });
        assert_eq!(h.conn.phase, Phase::Running);
        h.output();
        h
    }

    fn feed(&mut self, frames: impl FnOnce(&mut BytesMut)) {
        let mut buf = BytesMut::new();
        frames(&mut buf);
        self.conn.process(&mut buf);
        assert!(buf.is_empty() || self.conn.waiting.is_some(), "a complete frame was left unread");
    }

    fn start_ok(&mut self, user: &str, password: &str, failure_close: bool) {
        let mut capabilities = FieldTable::default();
        capabilities.insert(ShortString::from("authentication_failure_close"), AMQPValue::Boolean(failure_close));
        let mut client = FieldTable::default();
        client.insert(ShortString::from("capabilities"), AMQPValue::FieldTable(capabilities));
        let response = format!("\0{user}\0{password}");
        self.feed(|buf| {
            method(
                buf,
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                    client_properties: client,
                    mechanism: ShortString::from("PLAIN"),
                    response: LongString::from(response.as_bytes()),
                    locale: ShortString::from("en_US"),
                })),
            )
        });
    }

    /// Runs the password check the connection waits for, as its I/O task
    /// does (synchronously here).
    fn login(&mut self) {
        match self.conn.take_wait() {
            Some(Wait::Password { user, password, mechanism }) => {
                let ok = user.verify(&password);
                self.conn.finish_login(ok, user, &mechanism);
            }
            _ => panic!("expected a password check"),
        }
    }

    fn output(&self) -> Vec<Out> {
        let mut bytes = BytesMut::new();
        self.conn.outbox.take(&mut bytes);
        let decoder = FrameDecoder::new(u32::MAX);
        let mut out = Vec::new();
        while let Ok(Some(frame)) = decoder.decode(&mut bytes) {
            match frame.kind {
                FrameKind::Method => match method::decode(&frame.payload) {
                    Ok(Method::Other(class)) => out.push(Out::Method(class)),
                    Ok(Method::Ack { delivery_tag, multiple }) => out.push(Out::Ack { tag: delivery_tag, multiple }),
                    other => panic!("unexpected method from the broker: {other:?}"),
                },
                FrameKind::Header => out.push(Out::Content),
                _ => {}
            }
        }
        assert!(bytes.is_empty(), "the broker wrote a partial frame");
        out
    }

    fn open_channel(&mut self, number: u16) {
        self.feed(|buf| method(buf, number, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))));
        assert_eq!(
            self.output(),
            vec![Out::Method(AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})))]
        );
    }
}

fn method(buf: &mut BytesMut, channel: u16, class: AMQPClass) {
    encode::method(buf, channel, &class);
}

fn open_vhost() -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open { virtual_host: ShortString::from("/") }))
}

fn connection_tune_ok(channel_max: u16, frame_max: u32) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk { channel_max, frame_max, heartbeat: 0 }))
}

/// A content header frame for class 60 with raw property bytes.
fn header(buf: &mut BytesMut, channel: u16, class_id: u16, body_size: u64, properties: &[u8]) {
    let payload_len = 12 + properties.len();
    buf.put_u8(2);
    buf.put_u16(channel);
    buf.put_u32(u32::try_from(payload_len).unwrap());
    buf.put_u16(class_id);
    buf.put_u16(0);
    buf.put_u64(body_size);
    buf.put_slice(properties);
    buf.put_u8(0xCE);
}

fn body(buf: &mut BytesMut, channel: u16, body: &[u8]) {
    buf.put_u8(3);
    buf.put_u16(channel);
    buf.put_u32(u32::try_from(body.len()).unwrap());
    buf.put_slice(body);
    buf.put_u8(0xCE);
}

const TRANSIENT: &[u8] = &[0, 0];
const PERSISTENT: &[u8] = &[(flag::DELIVERY_MODE >> 8) as u8, 0, 2];

fn publish(buf: &mut BytesMut, channel: u16, routing_key: &str, properties: &[u8], payload: &[u8]) {
    encode::basic_publish(buf, channel, b"", routing_key.as_bytes(), false);
    header(buf, channel, 60, payload.len() as u64, properties);
    body(buf, channel, payload);
}

fn close_code(out: &[Out]) -> Option<(u16, String)> {
    out.iter().find_map(|o| match o {
        Out::Method(AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
            Some((c.reply_code, c.reply_text.as_str().to_string()))
        }
        _ => None,
    })
}

fn channel_close_code(out: &[Out]) -> Option<(u16, String)> {
    out.iter().find_map(|o| match o {
        Out::Method(AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
            Some((c.reply_code, c.reply_text.as_str().to_string()))
        }
        _ => None,
    })
}

// ---- handshake -----------------------------------------------------------

#[test]
fn handshake_goes_start_tune_open_with_the_password_checked_off_the_state_machine() {
    let mut h = Harness::new(|_| {});
    let out = h.output();
    assert!(matches!(&out[..], [Out::Method(AMQPClass::Connection(connection::AMQPMethod::Start(_)))]), "{out:?}");
    h.start_ok("guest", "guest", true);
    assert!(h.output().is_empty(), "nothing is answered before the password is checked");
    h.login();
    let out = h.output();
    let [Out::Method(AMQPClass::Connection(connection::AMQPMethod::Tune(tune)))] = &out[..] else {
        panic!("expected tune, got {out:?}");
    };
    assert_eq!((tune.channel_max, tune.frame_max, tune.heartbeat), (2047, 131_072, 60));
    h.feed(|buf| {
        method(buf, 0, connection_tune_ok(10, 4096));
        method(buf, 0, open_vhost());
    });
    assert_eq!(
        h.output(),
        vec![Out::Method(AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})))]
    );
    assert_eq!((h.conn.phase, h.conn.channel_max, h.conn.outbox.frame_max()), (Phase::Running, 10, 4096));
}

#[test]
fn a_wrong_password_closes_with_403_in_rabbitmqs_words() {
    let mut h = Harness::new(|_| {});
    h.output();
    h.start_ok("guest", "wrong", true);
    h.login();
    let out = h.output();
    assert_eq!(
        close_code(&out),
        Some((
            403,
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile."
                .to_string()
        ))
    );
    assert_eq!(h.conn.phase, Phase::Closing);
}

#[test]
fn a_frame_max_below_the_minimum_is_refused_with_530() {
    let mut h = Harness::new(|_| {});
    h.start_ok("guest", "guest", true);
    h.login();
    h.output();
    h.feed(|buf| method(buf, 0, connection_tune_ok(0, 1024)));
    let (code, text) = close_code(&h.output()).unwrap_or_default();
    assert_eq!(code, 530);
    assert!(text.contains("frame_max=1024 < 4096 min size"), "{text}");
}

#[test]
fn a_channel_method_before_open_is_a_504_channel_error() {
    let mut h = Harness::new(|_| {});
    h.output();
    h.feed(|buf| method(buf, 1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))));
    assert_eq!(close_code(&h.output()).map(|(code, _)| code), Some(504));
}

// ---- content assembly ----------------------------------------------------

#[test]
fn a_method_where_a_content_header_belongs_is_a_505() {
    let mut h = Harness::open(|_| {});
    h.open_channel(1);
    h.feed(|buf| {
        encode::basic_publish(buf, 1, b"", b"q", false);
        method(buf, 1, AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })));
    });
    assert_eq!(
        close_code(&h.output()),
        Some((
            505,
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead".into()
        ))
    );
}

#[test]
fn a_body_longer_than_its_header_declared_is_a_501() {
    let mut h = Harness::open(|_| {});
    h.open_channel(1);
    h.feed(|buf| {
        encode::basic_publish(buf, 1, b"", b"q", false);
        header(buf, 1, 60, 3, TRANSIENT);
        body(buf, 1, b"four");
    });
    let (code, text) = close_code(&h.output()).unwrap_or_default();
    assert_eq!(code, 501);
    assert!(text.contains("content body exceeds the size declared in its header"), "{text}");
}

#[test]
fn a_content_header_for_another_class_is_a_501() {
    let mut h = Harness::open(|_| {});
    h.open_channel(1);
    h.feed(|buf| {
        encode::basic_publish(buf, 1, b"", b"q", false);
        header(buf, 1, 50, 0, TRANSIENT);
    });
    assert_eq!(close_code(&h.output()).map(|(code, _)| code), Some(501));
}

#[test]
fn a_body_frame_without_a_publish_is_a_505() {
    let mut h = Harness::open(|_| {});
    h.open_channel(1);
    h.feed(|buf| body(buf, 1, b"stray"));
    assert_eq!(close_code(&h.output()).map(|(code, _)| code), Some(505));
}

#[test]
fn an_oversized_message_closes_only_its_channel_with_406() {
    let mut h = Harness::open(|config| config.max_message_size = 10);
    h.open_channel(1);
    h.open_channel(2);
    h.feed(|buf| {
        encode::basic_publish(buf, 1, b"", b"q", false);
        header(buf, 1, 60, 11, TRANSIENT);
    });
    let (code, text) = channel_close_code(&h.output()).unwrap_or_default();
    assert_eq!(code, 406);
    assert!(text.contains("message size 11 is larger than configured max size 10"), "{text}");
    // The rest of the message is discarded and channel 2 carries on.
    h.feed(|buf| {
        body(buf, 1, b"01234567890");
        method(buf, 2, AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })));
    });
    assert_eq!(
        h.output(),
        vec![Out::Method(AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk { active: true })))]
    );
    assert_eq!(h.conn.phase, Phase::Running);
}

// ---- confirms ------------------------------------------------------------

fn declare(h: &mut Harness, name: &str, durable: bool, arguments: FieldTable) {
    h.feed(|buf| {
        method(
            buf,
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: ShortString::from(name),
                durable,
                arguments,
                ..queue::Declare::default()
            })),
        )
    });
    if let Some(Wait::Durable(deferred)) = h.conn.take_wait() {
        wait_for(|| h.conn.store.durable_index() >= deferred.index);
        h.conn.send_deferred(deferred, Ok(()));
    }
    let out = h.output();
    assert!(matches!(&out[..], [Out::Method(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)))]), "{out:?}");
}

fn confirm_select(h: &mut Harness) {
    h.feed(|buf| method(buf, 1, AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false }))));
    assert_eq!(h.output(), vec![Out::Method(AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})))]);
}

fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Publishes 1 (unroutable), 2 (persistent, into a durable queue) and 3
/// (unroutable) in one batch, and collects confirms until none waits.
fn publish_around_a_stored_one(h: &mut Harness, faults: Faults) -> Vec<Out> {
    h.open_channel(1);
    declare(h, "stored", true, FieldTable::default());
    confirm_select(h);
    h.disk.set_faults(faults);
    h.feed(|buf| {
        publish(buf, 1, "nowhere", TRANSIENT, b"one");
        publish(buf, 1, "stored", PERSISTENT, b"two");
        publish(buf, 1, "nowhere", TRANSIENT, b"three");
    });
    let mut confirms = h.output();
    wait_for(|| {
        h.conn.flush_confirms();
        confirms.extend(h.output());
        !h.conn.awaiting_store()
    });
    confirms
}

#[test]
fn a_stored_publish_holds_back_later_acks_until_it_is_durable() {
    let mut h = Harness::open(|_| {});
    let confirms = publish_around_a_stored_one(&mut h, Faults::default());
    // 1 at once; 2 and 3 together once 2 is durable (or all three at once
    // if the fsync was quicker than the batch).
    assert!(
        confirms == vec![Out::Ack { tag: 1, multiple: false }, Out::Ack { tag: 3, multiple: true }]
            || confirms == vec![Out::Ack { tag: 3, multiple: true }],
        "{confirms:?}"
    );
}

#[test]
fn a_stored_publish_whose_fsync_fails_is_nacked_and_the_next_still_acked_in_order() {
    let mut h = Harness::open(|_| {});
    let confirms = publish_around_a_stored_one(&mut h, Faults { fail_syncs: true, ..Faults::default() });
    let nack = Out::Method(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
        delivery_tag: 2,
        multiple: false,
        requeue: false,
    })));
    assert_eq!(confirms, vec![Out::Ack { tag: 1, multiple: false }, nack, Out::Ack { tag: 3, multiple: false }]);
}

#[test]
fn a_publish_a_full_queue_rejects_is_nacked_between_the_acks_around_it() {
    let mut h = Harness::open(|_| {});
    h.open_channel(1);
    let mut arguments = FieldTable::default();
    arguments.insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(1));
    arguments.insert(ShortString::from("x-overflow"), AMQPValue::LongString(LongString::from("reject-publish")));
    declare(&mut h, "one", false, arguments);
    confirm_select(&mut h);
    h.feed(|buf| {
        publish(buf, 1, "one", TRANSIENT, b"fits");
        publish(buf, 1, "one", TRANSIENT, b"rejected");
        publish(buf, 1, "nowhere", TRANSIENT, b"unroutable");
    });
    let out = h.output();
    let nack = Out::Method(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
        delivery_tag: 2,
        multiple: false,
        requeue: false,
    })));
    assert_eq!(out, vec![Out::Ack { tag: 1, multiple: false }, nack, Out::Ack { tag: 3, multiple: false }]);
}

fn tx(h: &mut Harness, class: tx::AMQPMethod) {
    h.feed(|buf| method(buf, 1, AMQPClass::Tx(class)));
}

/// Commits one persistent message into a durable queue; returns what the
/// connection answered once the log settled (durable or failed).
fn commit_one_persistent(h: &mut Harness, faults: Faults) -> Vec<Out> {
    h.open_channel(1);
    declare(h, "ledger", true, FieldTable::default());
    tx(h, tx::AMQPMethod::Select(tx::Select {}));
    assert_eq!(h.output(), vec![Out::Method(AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})))]);
    h.disk.set_faults(faults);
    h.feed(|buf| publish(buf, 1, "ledger", PERSISTENT, b"entry"));
    tx(h, tx::AMQPMethod::Commit(tx::Commit {}));
    let mut out = h.output();
    if let Some(Wait::Durable(deferred)) = h.conn.take_wait() {
        assert!(out.is_empty(), "nothing before the commit's fsync: {out:?}");
        let store = h.conn.store.clone();
        wait_for(|| store.durable_index() >= deferred.index || store.is_poisoned());
        let stored = if store.is_poisoned() { Err(warren_storage::StorageError::Poisoned) } else { Ok(()) };
        h.conn.send_deferred(deferred, stored);
        out.extend(h.output());
    }
    out
}

#[test]
fn tx_commit_answers_once_its_persistent_messages_are_durable() {
    let mut h = Harness::open(|_| {});
    let out = commit_one_persistent(&mut h, Faults::default());
    assert_eq!(out, vec![Out::Method(AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})))]);
    assert!(h.conn.store.durable_index() > 0);
}

#[test]
fn tx_commit_whose_fsync_fails_is_never_answered_commit_ok() {
    let mut h = Harness::open(|_| {});
    let out = commit_one_persistent(&mut h, Faults { fail_syncs: true, ..Faults::default() });
    assert!(!out.iter().any(|o| matches!(o, Out::Method(AMQPClass::Tx(tx::AMQPMethod::CommitOk(_))))), "{out:?}");
    assert_eq!(close_code(&out).map(|(code, _)| code), Some(541), "{out:?}");
}
