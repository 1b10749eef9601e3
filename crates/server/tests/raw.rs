//! Hostile and malformed input, byte by byte over a raw socket: each case
//! gets RabbitMQ's reply code (or a clean close), and the broker keeps
//! serving other clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_codec::frame::{Frame, FrameDecoder, FrameKind};
use warren_codec::method::{self, Method};
use warren_codec::spec::{basic, channel, confirm, connection, queue, AMQPClass};
use warren_codec::types::{FieldTable, LongString};
use warren_codec::{encode, PROTOCOL_HEADER};

struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl Raw {
    async fn connect(server: &TestServer) -> Raw {
        let stream = TcpStream::connect(server.addr).await.unwrap();
        Raw { stream, buf: BytesMut::new(), decoder: FrameDecoder::new(1 << 20) }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, channel: u16, class: AMQPClass) {
        let mut out = BytesMut::new();
        encode::method(&mut out, channel, &class);
        self.write(&out).await;
    }

    /// Next frame, or None when the server closed the socket.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf).unwrap() {
                return Some(frame);
            }
            let read = tokio::time::timeout(Duration::from_secs(5), self.stream.read_buf(&mut self.buf)).await;
            match read.expect("server answered within 5 s") {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    async fn method(&mut self) -> Option<AMQPClass> {
        loop {
            let frame = self.frame().await?;
            if frame.kind == FrameKind::Method {
                if let Method::Other(class) = method::decode(&frame.payload).unwrap() {
                    return Some(class);
                }
            }
        }
    }

    /// Logs in as guest with `password`, announcing authentication_failure_close.
    async fn start_ok(&mut self, password: &str) {
        let mut caps = FieldTable::default();
        caps.insert("authentication_failure_close".into(), true.into());
        caps.insert("consumer_cancel_notify".into(), true.into());
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), caps.into());
        let start_ok = connection::StartOk {
            client_properties: props,
            mechanism: "PLAIN".into(),
            response: LongString::from(format!("\0guest\0{password}")),
            locale: "en_US".into(),
        };
        self.send(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok))).await;
    }

    /// Completes the handshake and opens channel 1.
    async fn open(server: &TestServer, heartbeat: u16) -> Raw {
        let mut raw = Raw::connect(server).await;
        raw.write(&PROTOCOL_HEADER).await;
        assert!(matches!(raw.method().await, Some(AMQPClass::Connection(connection::AMQPMethod::Start(_)))));
        raw.start_ok("guest").await;
        let Some(AMQPClass::Connection(connection::AMQPMethod::Tune(tune))) = raw.method().await else {
            panic!("tune")
        };
        assert_eq!((tune.channel_max, tune.frame_max, tune.heartbeat), (2047, 131_072, 60));
        raw.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 8,
                frame_max: 131_072,
                heartbeat,
            })),
        )
        .await;
        raw.send(0, AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open { virtual_host: "/".into() })))
            .await;
        assert!(matches!(raw.method().await, Some(AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)))));
        raw.send(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
        assert!(matches!(raw.method().await, Some(AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))));
        raw
    }

    /// Waits for connection.close and returns (code, text).
    async fn connection_close(&mut self) -> (u16, String) {
        loop {
            match self.method().await {
                Some(AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
                    return (close.reply_code, close.reply_text.to_string());
                }
                Some(_) => continue,
                None => panic!("socket closed without connection.close"),
            }
        }
    }

    /// Declares a plain queue on channel 1; returns its ready count.
    async fn declared(&mut self, name: &str) -> u32 {
        self.send(1, declare(name)).await;
        let Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) = self.method().await else {
            panic!("declare-ok")
        };
        ok.message_count
    }

    async fn channel_close(&mut self) -> (u16, String) {
        loop {
            match self.method().await {
                Some(AMQPClass::Channel(channel::AMQPMethod::Close(close))) => {
                    return (close.reply_code, close.reply_text.to_string());
                }
                Some(_) => continue,
                None => panic!("socket closed without channel.close"),
            }
        }
    }
}

async fn still_serving(server: &TestServer) {
    let mut raw = Raw::open(server, 0).await;
    raw.send(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "".into(),
            passive: false,
            durable: false,
            exclusive: true,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    assert!(matches!(raw.method().await, Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)))));
}

fn declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

fn consume(queue: &str, consumer_tag: &str, no_ack: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: queue.into(),
        consumer_tag: consumer_tag.into(),
        no_local: false,
        no_ack,
        exclusive: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

/// A complete `basic.publish` of `body` to `queue` on `channel`.
fn publish(channel: u16, queue: &[u8], body: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    encode::basic_publish(&mut out, channel, b"", queue, false);
    let mut header = vec![0, 60, 0, 0];
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&[0, 0]);
    out.put_slice(&frame(2, channel, &header, 0xCE));
    out.put_slice(&frame(3, channel, body, 0xCE));
    out
}

fn frame(kind: u8, channel: u16, payload: &[u8], end: u8) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out.push(end);
    out
}

#[tokio::test]
async fn wrong_protocol_header_gets_ours_back_and_a_close() {
    let server = TestServer::start().await;
    let mut raw = Raw::connect(&server).await;
    raw.write(b"GET / HTTP/1.1\r\n\r\n").await;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.stream.read_to_end(&mut reply)).await.unwrap().unwrap();
    assert_eq!(reply, PROTOCOL_HEADER);
    still_serving(&server).await;
}

#[tokio::test]
async fn framing_errors_close_the_connection_with_501() {
    let server = TestServer::start().await;
    // Bad frame-end octet.
    let mut raw = Raw::open(&server, 0).await;
    raw.write(&frame(1, 1, &[0, 60, 0, 10, 0, 0, 0, 0, 0, 1, 0], 0x00)).await;
    assert_eq!(raw.connection_close().await.0, 501);
    // Unknown frame type.
    let mut raw = Raw::open(&server, 0).await;
    raw.write(&frame(9, 1, b"xyz", 0xCE)).await;
    assert_eq!(raw.connection_close().await.0, 501);
    // A frame claiming 4 GiB: refused from its header, nothing allocated.
    let mut raw = Raw::open(&server, 0).await;
    raw.write(&[3, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF]).await;
    let (code, text) = raw.connection_close().await;
    assert_eq!(code, 501);
    assert!(text.starts_with("FRAME_ERROR - "), "{text}");
    still_serving(&server).await;
}

#[tokio::test]
async fn unknown_methods_and_malformed_arguments_are_connection_errors() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(&server, 0).await;
    raw.write(&frame(1, 1, &[0, 60, 0, 250], 0xCE)).await;
    assert_eq!(raw.connection_close().await.0, 503);
    let mut raw = Raw::open(&server, 0).await;
    // queue.declare cut short in its arguments.
    raw.write(&frame(1, 1, &[0, 50, 0, 10, 0, 0, 5, b'q'], 0xCE)).await;
    assert_eq!(raw.connection_close().await.0, 502);
    still_serving(&server).await;
}

#[tokio::test]
async fn content_out_of_order_is_unexpected_frame_505() {
    let server = TestServer::start().await;
    // Body with no publish before it.
    let mut raw = Raw::open(&server, 0).await;
    raw.write(&frame(3, 1, b"body", 0xCE)).await;
    assert_eq!(
        raw.connection_close().await,
        (505, "UNEXPECTED_FRAME - expected method frame, got non method frame instead".into())
    );
    // A method where the content header should be.
    let mut raw = Raw::open(&server, 0).await;
    let mut out = BytesMut::new();
    encode::basic_publish(&mut out, 1, b"", b"q", false);
    encode::basic_publish(&mut out, 1, b"", b"q", false);
    raw.write(&out).await;
    assert_eq!(raw.connection_close().await.0, 505);
    // Content on channel 0.
    let mut raw = Raw::open(&server, 0).await;
    raw.write(&frame(2, 0, &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], 0xCE)).await;
    assert_eq!(raw.connection_close().await.0, 505);
    still_serving(&server).await;
}

#[tokio::test]
async fn body_larger_than_declared_is_a_frame_error() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(&server, 0).await;
    let mut out = BytesMut::new();
    encode::basic_publish(&mut out, 1, b"", b"q", false);
    // Header declares 3 bytes; the body frame carries 5.
    out.put_slice(&frame(2, 1, &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0], 0xCE));
    out.put_slice(&frame(3, 1, b"12345", 0xCE));
    raw.write(&out).await;
    assert_eq!(raw.connection_close().await.0, 501);
}

#[tokio::test]
async fn oversized_message_closes_the_channel_with_406() {
    let server = TestServer::with_config(|c| c.max_message_size = 1000).await;
    let mut raw = Raw::open(&server, 0).await;
    let mut out = BytesMut::new();
    encode::basic_publish(&mut out, 1, b"", b"q", false);
    let mut header = vec![0, 60, 0, 0];
    header.extend_from_slice(&2000u64.to_be_bytes());
    header.extend_from_slice(&[0, 0]);
    out.put_slice(&frame(2, 1, &header, 0xCE));
    out.put_slice(&frame(3, 1, &[0u8; 2000], 0xCE));
    raw.write(&out).await;
    let (code, text) = raw.channel_close().await;
    assert_eq!(code, 406);
    assert_eq!(text, "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1000");
    // The connection lives on: close-ok, then a new channel works.
    raw.send(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))).await;
    raw.send(2, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
    assert!(matches!(raw.method().await, Some(AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))));
}

#[tokio::test]
async fn channel_misuse_gets_rabbitmq_codes() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(&server, 0).await;
    raw.send(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
    assert_eq!(raw.connection_close().await, (504, "CHANNEL_ERROR - second 'channel.open' seen".into()));

    let mut raw = Raw::open(&server, 0).await;
    raw.send(5, AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos { prefetch_count: 1, global: false }))).await;
    assert_eq!(raw.connection_close().await, (504, "CHANNEL_ERROR - expected 'channel.open'".into()));

    // channel_max 8 was negotiated: the ninth open channel is refused.
    let mut raw = Raw::open(&server, 0).await;
    for number in 2..=8 {
        raw.send(number, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
        assert!(matches!(raw.method().await, Some(AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))));
    }
    raw.send(9, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
    let (code, text) = raw.connection_close().await;
    assert_eq!(code, 530);
    assert_eq!(text, "NOT_ALLOWED - number of channels opened (8) has reached the negotiated channel_max (8)");

    let mut raw = Raw::open(&server, 0).await;
    raw.send(1, AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 42, multiple: false }))).await;
    let (code, text) = raw.channel_close().await;
    assert_eq!((code, text.as_str()), (406, "PRECONDITION_FAILED - unknown delivery tag 42"));
    still_serving(&server).await;
}

#[tokio::test]
async fn partial_frame_then_silence_is_cut_by_the_handshake_timeout() {
    let server = TestServer::with_config(|c| c.handshake_timeout_s = 1).await;
    let mut raw = Raw::connect(&server).await;
    raw.write(b"AMQP").await;
    let mut rest = Vec::new();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), raw.stream.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    still_serving(&server).await;
}

#[tokio::test]
async fn a_silent_peer_is_disconnected_after_two_missed_heartbeats() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(&server, 1).await;
    let started = std::time::Instant::now();
    // Read (and ignore) the server's heartbeats until it hangs up.
    let mut heartbeats = 0;
    while let Some(frame) = raw.frame().await {
        if frame.kind == FrameKind::Heartbeat {
            heartbeats += 1;
        }
    }
    let elapsed = started.elapsed();
    assert!(heartbeats >= 1, "server sends heartbeats while idle");
    assert!(elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(4), "{elapsed:?}");
}

#[tokio::test]
async fn many_half_open_connections_do_not_starve_real_clients() {
    let server = TestServer::with_config(|c| c.handshake_timeout_s = 2).await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        let mut raw = Raw::connect(&server).await;
        raw.write(b"AM").await;
        idle.push(raw);
    }
    still_serving(&server).await;
    drop(idle);
}

#[tokio::test]
async fn half_open_connections_beyond_the_cap_are_closed_at_accept_and_open_ones_carry_on() {
    let server = TestServer::with_config(|c| {
        c.handshake_timeout_s = 2;
        c.max_pending_handshakes = 50;
    })
    .await;
    let mut open = Raw::open(&server, 0).await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        let mut raw = Raw::connect(&server).await;
        raw.write(b"AM").await;
        idle.push(raw);
    }
    for _ in 0..100 {
        if server.broker.handshakes.available_permits() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.broker.handshakes.available_permits(), 0);
    // The 51st is closed at once, without a byte.
    let mut refused = Raw::connect(&server).await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(1), refused.stream.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed at accept: {read:?}");
    // An established connection is not affected.
    open.send(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "".into(),
            passive: false,
            durable: false,
            exclusive: true,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    assert!(matches!(open.method().await, Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)))));
    // The handshake timeout frees the slots; new clients get in again.
    for _ in 0..100 {
        if server.broker.handshakes.available_permits() == 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.broker.handshakes.available_permits(), 50);
    still_serving(&server).await;
    drop(idle);
}

#[tokio::test]
async fn refused_logins_get_403_with_authentication_failure_close() {
    let server = TestServer::start().await;
    let mut raw = Raw::connect(&server).await;
    raw.write(&PROTOCOL_HEADER).await;
    raw.method().await;
    raw.start_ok("nope").await;
    assert_eq!(
        raw.connection_close().await,
        (
            403,
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile."
                .into()
        )
    );
}

#[tokio::test]
async fn a_consumer_that_stops_reading_does_not_make_the_broker_buffer_everything() {
    let server = TestServer::with_config(|c| c.connection_write_buffer_max = 256 * 1024).await;
    // A no-ack consumer (no prefetch limit applies) that never reads its socket.
    let mut stalled = Raw::open(&server, 0).await;
    let declare = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: "firehose".into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }));
    stalled.send(1, declare.clone()).await;
    stalled.method().await;
    stalled.send(1, consume("firehose", "stalled", true)).await;
    stalled.method().await;

    // 64 MiB of 64 KiB messages.
    let mut publisher = Raw::open(&server, 0).await;
    let body = vec![7u8; 64 * 1024];
    for _ in 0..1024 {
        let mut out = BytesMut::new();
        encode::basic_publish(&mut out, 1, b"", b"firehose", false);
        let mut header = vec![0, 60, 0, 0];
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        header.extend_from_slice(&[0, 0]);
        out.put_slice(&frame(2, 1, &header, 0xCE));
        out.put_slice(&frame(3, 1, &body, 0xCE));
        publisher.write(&out).await;
    }
    // Everything the socket buffers and the outbox could not take stays queued.
    let mut ready = 0;
    for _ in 0..50 {
        let passive = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "firehose".into(),
            passive: true,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        }));
        publisher.send(1, passive).await;
        let Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) = publisher.method().await else { panic!() };
        ready = ok.message_count;
        if ready > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready >= 900, "only {ready} of 1024 messages held back; the rest went to an unread socket's buffer");

    // Once the consumer reads again, everything arrives.
    let mut received = 0usize;
    while received < 1024 * body.len() {
        let frame = stalled.frame().await.expect("deliveries resume");
        if frame.kind == FrameKind::Body {
            received += frame.payload.len();
        }
    }
}

#[tokio::test]
async fn a_publish_written_frame_by_frame_completes_before_an_alarm_blocks() {
    // A disk limit no disk meets: the disk alarm is on from the start.
    let server = TestServer::with_config(|c| c.disk_free_limit_bytes = 1 << 62).await;
    for _ in 0..100 {
        if server.broker.alarms.state().any() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.broker.alarms.state().any(), "disk alarm raised");
    let mut raw = Raw::open(&server, 0).await;
    raw.send(1, AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false }))).await;
    assert!(matches!(raw.method().await, Some(AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)))));
    raw.declared("split").await;
    // Method, header and body in separate writes, as pika sends them.
    let header = frame(2, 1, &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0], 0xCE);
    let body = frame(3, 1, b"first", 0xCE);
    let mut publish = BytesMut::new();
    encode::basic_publish(&mut publish, 1, b"", b"split", false);
    raw.write(&publish).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw.write(&header).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw.write(&body).await;
    let confirm = raw.frame().await.expect("a frame");
    assert!(matches!(method::decode(&confirm.payload), Ok(Method::Ack { delivery_tag: 1, multiple: false })));
    // Now the connection is blocked: a second message waits unread.
    let mut second = publish.clone();
    second.put_slice(&header);
    second.put_slice(&body);
    raw.write(&second).await;
    let unanswered = tokio::time::timeout(Duration::from_millis(700), raw.frame()).await;
    assert!(unanswered.is_err(), "a blocked connection's publish is not read: {unanswered:?}");
    still_serving(&server).await;
}

/// amqplib multiplexes channels, so `connection.close` can overtake the
/// content frames a channel still has queued. The broker answers close-ok
/// and lets the client finish writing and close the socket: resetting it
/// mid-write lost the close-ok and failed the client's writes with EPIPE.
#[tokio::test]
async fn connection_close_overtaking_content_frames_gets_close_ok_and_no_reset() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(&server, 0).await;
    raw.declared("overtaken").await;
    // A publish whose body is still to come, then the close.
    let mut out = BytesMut::new();
    encode::basic_publish(&mut out, 1, b"", b"overtaken", false);
    out.put_slice(&frame(2, 1, &[0, 60, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0], 0xCE));
    encode::method(
        &mut out,
        0,
        &AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    );
    raw.write(&out).await;
    assert!(matches!(raw.method().await, Some(AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))));
    // The rest of what the client had queued keeps arriving after close-ok.
    let body = frame(3, 1, &[0u8; 4], 0xCE);
    for _ in 0..20 {
        raw.stream.write_all(&publish(1, b"overtaken", &[1u8; 16 * 1024])).await.expect("broker still reads");
        raw.stream.write_all(&body).await.expect("broker still reads");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The client closes; the broker closes its side cleanly, without a reset.
    raw.stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), raw.stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "clean close after close-ok: {read:?}");
    // Nothing sent after the close was taken as a publish.
    let mut other = Raw::open(&server, 0).await;
    assert_eq!(other.declared("overtaken").await, 0);
}

/// After a soft error the broker discards what the client still sends on
/// that channel until its close-ok; the connection and the channel number
/// are usable afterwards.
#[tokio::test]
async fn frames_in_flight_on_a_closing_channel_are_discarded_until_close_ok() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(&server, 0).await;
    raw.declared("in-flight").await;
    let mut out = BytesMut::new();
    encode::method(
        &mut out,
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 7, multiple: false })),
    );
    for _ in 0..50 {
        out.put_slice(&publish(1, b"in-flight", b"late"));
    }
    raw.write(&out).await;
    assert_eq!(raw.channel_close().await.0, 406);
    raw.write(&publish(1, b"in-flight", b"later still")).await;
    raw.send(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))).await;
    raw.send(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
    assert!(matches!(raw.method().await, Some(AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))));
    assert_eq!(raw.declared("in-flight").await, 0);
}

/// As RabbitMQ: the reply to `queue.delete` comes before the `basic.cancel`
/// it causes for a consumer on the same channel (py-amqp, and so kombu,
/// raises ConsumerCancelled while waiting for delete-ok otherwise).
#[tokio::test]
async fn queue_delete_answers_delete_ok_before_cancelling_the_channels_consumer() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(&server, 0).await;
    raw.send(2, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
    assert!(matches!(raw.method().await, Some(AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))));
    raw.declared("deleted").await;
    for (number, tag) in [(1, "same-channel"), (2, "other-channel")] {
        raw.send(number, consume("deleted", tag, false)).await;
        assert!(matches!(raw.method().await, Some(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)))));
    }
    raw.send(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: "deleted".into(),
            if_unused: false,
            if_empty: false,
            nowait: false,
        })),
    )
    .await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let frame = raw.frame().await.expect("a frame");
        let Ok(Method::Other(class)) = method::decode(&frame.payload) else { continue };
        seen.push(match class {
            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_)) => format!("{}:delete-ok", frame.channel),
            AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => format!("{}:cancel {}", frame.channel, c.consumer_tag),
            other => format!("{}:{other:?}", frame.channel),
        });
    }
    assert_eq!(seen[0], "1:delete-ok", "{seen:?}");
    seen[1..].sort();
    assert_eq!(seen[1..], ["1:cancel same-channel", "2:cancel other-channel"], "{seen:?}");
}
