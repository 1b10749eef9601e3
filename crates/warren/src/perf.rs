//! `warren perf`: a lean AMQP 0-9-1 load generator.
//!
//! It speaks the protocol itself with pre-encoded frames, large writes and
//! cumulative acks, so that it costs well under a microsecond of CPU per
//! message and the broker, not the client, is what gets measured. Each
//! message carries its send time in the first 8 body bytes; consumers turn
//! that into end-to-end latency. With `--broker-pid` it reads the broker's
//! CPU time from /proc and reports CPU per message, the fair figure when the
//! machine (not the broker) is saturated.

// Counters, rates and latencies of a benchmark run: far inside every
// type's range, and a rounding error in a statistic is harmless.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use warren_codec::frame::{Frame, FrameDecoder, FrameKind};
use warren_codec::method::{self, Method};
use warren_codec::properties::flag;
use warren_codec::spec::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use warren_codec::types::{AMQPValue, FieldTable, LongString};
use warren_codec::{encode, PROTOCOL_HEADER};

#[derive(Args, Clone, Debug)]
pub struct PerfArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 5672)]
    port: u16,
    #[arg(long, default_value = "guest")]
    user: String,
    #[arg(long, default_value = "guest")]
    password: String,
    #[arg(long, default_value = "/")]
    vhost: String,
    /// Publishing connections.
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Consuming connections.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Body size in bytes (at least 8: the send timestamp).
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Publisher confirm window (0: no confirms).
    #[arg(long, default_value_t = 0)]
    confirm: u64,
    /// Consumer prefetch (0: unlimited).
    #[arg(long, default_value_t = 1000)]
    prefetch: u16,
    /// Consume without acknowledgements.
    #[arg(long)]
    no_ack: bool,
    /// Total publish rate in msg/s (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds to publish for.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Queue name (a fresh one by default). Deleted at the end unless --publish-only.
    #[arg(long)]
    queue: Option<String>,
    /// Publish persistent messages (delivery_mode 2) to a durable queue.
    #[arg(long)]
    persistent: bool,
    /// Only publish (fill the queue); no consumers.
    #[arg(long)]
    publish_only: bool,
    /// Only consume (drain a filled queue, e.g. after --publish-only); stops
    /// after --duration or once nothing arrived for a second.
    #[arg(long)]
    consume_only: bool,
    /// Stop after this many messages per producer (0: no limit).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// PID of the broker, to report its CPU time per message.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Print one JSON line instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Memory scenario instead of load: open this many idle connections
    /// (one channel each), report the broker's RSS per connection.
    #[arg(long, default_value_t = 0)]
    idle_connections: usize,
    /// With --idle-connections: also declare this many queues.
    #[arg(long, default_value_t = 0)]
    idle_queues: usize,
    /// Queue argument for the declared queue, `KEY=VALUE` (an integer value
    /// is sent as a number), e.g. `x-message-ttl=60000`. Repeatable.
    #[arg(long = "queue-arg", value_name = "KEY=VALUE")]
    queue_args: Vec<String>,
    /// Consumer argument, `KEY=VALUE` as --queue-arg, e.g.
    /// `x-stream-offset=first` to read a stream from its start. Repeatable.
    #[arg(long = "consume-arg", value_name = "KEY=VALUE")]
    consume_args: Vec<String>,
    /// Message priority property to publish with.
    #[arg(long)]
    priority: Option<u8>,
    /// Delayed-message scenario: schedule this many messages on an
    /// `x-delayed-message` exchange, due at --due-rate per second after
    /// all are published; report the broker's RSS growth while they wait
    /// and how late each is delivered.
    #[arg(long, default_value_t = 0)]
    delayed: u64,
    /// With --delayed: messages falling due per second.
    #[arg(long, default_value_t = 10_000)]
    due_rate: u64,
    /// Expiry scenario: fill a queue with this many messages under a
    /// --ttl-ms queue TTL, then time how fast they expire while a probe
    /// publisher (1,000 msg/s with confirms) measures its confirm latency.
    #[arg(long, default_value_t = 0)]
    expire: u64,
    /// With --expire: the queue's x-message-ttl.
    #[arg(long, default_value_t = 5_000)]
    ttl_ms: u64,
}

impl PerfArgs {
    fn arguments(&self) -> anyhow::Result<FieldTable> {
        Self::table(&self.queue_args)
    }

    fn table(pairs: &[String]) -> anyhow::Result<FieldTable> {
        let mut table = FieldTable::default();
        for pair in pairs {
            let (key, value) = pair.split_once('=').with_context(|| format!("{pair}: expected KEY=VALUE"))?;
            let value = match value.parse::<i64>() {
                Ok(n) => AMQPValue::LongLongInt(n),
                Err(_) => AMQPValue::LongString(LongString::from(value)),
            };
            table.insert(key.into(), value);
        }
        Ok(table)
    }

    /// Content-header properties: delivery mode and priority as asked.
    fn properties(&self) -> Vec<u8> {
        let mut flags = 0u16;
        let mut fields = Vec::new();
        if self.persistent {
            flags |= flag::DELIVERY_MODE;
            fields.push(2);
        }
        if let Some(priority) = self.priority {
            flags |= flag::PRIORITY;
            fields.push(priority);
        }
        let mut out = flags.to_be_bytes().to_vec();
        out.extend_from_slice(&fields);
        out
    }
}

struct Shared {
    start: Instant,
    /// Publish-to-confirm latencies in microseconds (per write batch).
    confirm_latencies_us: parking_lot::Mutex<Vec<u32>>,
    published: AtomicU64,
    confirmed: AtomicU64,
    consumed: AtomicU64,
    stop_publishing: AtomicBool,
    stop_consuming: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

struct Conn {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    decoder: FrameDecoder,
    buf: BytesMut,
    frame_max: u32,
}

impl Conn {
    async fn next_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf)? {
                return Ok(frame);
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed by broker");
            }
        }
    }

    async fn expect_method(&mut self) -> anyhow::Result<AMQPClass> {
        loop {
            let frame = self.next_frame().await?;
            if frame.kind != FrameKind::Method {
                continue;
            }
            match method::decode(&frame.payload)? {
                Method::Other(AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
                    bail!("broker closed the connection: {} {}", close.reply_code, close.reply_text.as_str())
                }
                Method::Other(AMQPClass::Channel(channel::AMQPMethod::Close(close))) => {
                    bail!("broker closed the channel: {} {}", close.reply_code, close.reply_text.as_str())
                }
                Method::Other(class) => return Ok(class),
                _ => continue,
            }
        }
    }

    async fn send(&mut self, class: AMQPClass, channel: u16) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        encode::method(&mut out, channel, &class);
        self.writer.write_all(&out).await?;
        Ok(())
    }

    async fn open(args: &PerfArgs) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("connecting to {}:{}", args.host, args.port))?;
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
        let mut conn = Conn {
            reader,
            writer,
            decoder: FrameDecoder::new(131_072),
            buf: BytesMut::with_capacity(65536),
            frame_max: 131_072,
        };
        conn.writer.write_all(&PROTOCOL_HEADER).await?;
        let _start = conn.expect_method().await?;
        let mut response = vec![0u8];
        response.extend_from_slice(args.user.as_bytes());
        response.push(0);
        response.extend_from_slice(args.password.as_bytes());
        let mut client = FieldTable::default();
        client.insert("product".into(), AMQPValue::LongString(LongString::from("warren perf")));
        conn.send(
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: client,
                mechanism: "PLAIN".into(),
                response: LongString::from(response),
                locale: "en_US".into(),
            })),
            0,
        )
        .await?;
        let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) = conn.expect_method().await? else {
            bail!("expected connection.tune (wrong credentials?)");
        };
        conn.frame_max = if tune.frame_max == 0 { 131_072 } else { tune.frame_max.min(131_072) };
        conn.decoder = FrameDecoder::new(conn.frame_max);
        conn.send(
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max: conn.frame_max,
                heartbeat: 0,
            })),
            0,
        )
        .await?;
        conn.send(
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: args.vhost.as_str().into(),
            })),
            0,
        )
        .await?;
        conn.expect_method().await?;
        conn.send(AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})), 1).await?;
        conn.expect_method().await?;
        Ok(conn)
    }

    async fn declare(&mut self, name: &str, durable: bool) -> anyhow::Result<()> {
        self.declare_with(name, durable, FieldTable::default()).await
    }

    async fn declare_with(&mut self, name: &str, durable: bool, arguments: FieldTable) -> anyhow::Result<()> {
        self.send(queue_declare(name, false, durable, arguments), 1).await?;
        self.expect_method().await?;
        Ok(())
    }

    /// Ready messages in a queue (passive declare).
    async fn message_count(&mut self, name: &str) -> anyhow::Result<u32> {
        self.send(queue_declare(name, true, false, FieldTable::default()), 1).await?;
        match self.expect_method().await? {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => Ok(ok.message_count),
            other => bail!("expected queue.declare-ok, got {other:?}"),
        }
    }

    async fn delete_queue(&mut self, name: &str) -> anyhow::Result<()> {
        let delete = AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: name.into(),
            if_unused: false,
            if_empty: false,
            nowait: false,
        }));
        self.send(delete, 1).await?;
        self.expect_method().await?;
        Ok(())
    }
}

fn queue_declare(name: &str, passive: bool, durable: bool, arguments: FieldTable) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive,
        durable,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments,
    }))
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

async fn producer(args: PerfArgs, queue: String, shared: Arc<Shared>, rate: u64) -> anyhow::Result<()> {
    let mut conn = Conn::open(&args).await?;
    conn.declare_with(&queue, args.persistent, args.arguments()?).await?;
    if args.confirm > 0 {
        conn.send(AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false })), 1).await?;
        conn.expect_method().await?;
    }
    // One pre-encoded message; only the timestamp changes per send.
    let mut template = BytesMut::new();
    encode::basic_publish(&mut template, 1, b"", queue.as_bytes(), false);
    let properties = args.properties();
    let body = vec![0xABu8; args.size.max(8)];
    let body_at = template.len() + 7 + 12 + properties.len() + 1 + 7;
    encode::content(&mut template, 1, &properties, &body, conn.frame_max);
    let template = template.freeze();

    let Conn { mut reader, mut writer, decoder, mut buf, .. } = conn;
    let confirmed = Arc::new(AtomicU64::new(0));
    // (last sequence number of a write batch, when it was sent)
    let batches: Arc<parking_lot::Mutex<std::collections::VecDeque<(u64, u64)>>> = Arc::default();
    let reader_batches = batches.clone();
    let confirm_notify = Arc::new(Notify::new());
    if args.confirm > 0 {
        let confirmed = confirmed.clone();
        let notify = confirm_notify.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                while let Ok(Some(frame)) = decoder.decode(&mut buf) {
                    if let Ok(Method::Ack { delivery_tag, multiple }) = method::decode(&frame.payload) {
                        let before = confirmed.load(Ordering::Relaxed);
                        let now = if multiple { delivery_tag.max(before) } else { before + 1 };
                        confirmed.store(now, Ordering::Relaxed);
                        shared.confirmed.fetch_add(now - before, Ordering::Relaxed);
                        let at = shared.now_ns();
                        let mut batches = reader_batches.lock();
                        while batches.front().is_some_and(|(last, _)| *last <= now) {
                            if let Some((_, sent)) = batches.pop_front() {
                                shared.confirm_latencies_us.lock().push((at.saturating_sub(sent) / 1000) as u32);
                            }
                        }
                        drop(batches);
                        notify.notify_one();
                    }
                }
                buf.reserve(64 * 1024);
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
    } else {
        tokio::spawn(async move {
            let mut sink = vec![0u8; 4096];
            while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
        });
    }

    let mut out = BytesMut::with_capacity(128 * 1024);
    let mut sent: u64 = 0;
    let started = Instant::now();
    while !shared.stop_publishing.load(Ordering::Relaxed) && (args.count == 0 || sent < args.count) {
        let mut batch = 64 * 1024 / template.len().max(1);
        batch = batch.max(1);
        if args.confirm > 0 {
            let outstanding = sent - confirmed.load(Ordering::Relaxed);
            if outstanding >= args.confirm {
                let _ = tokio::time::timeout(Duration::from_millis(50), confirm_notify.notified()).await;
                continue;
            }
            batch = batch.min((args.confirm - outstanding) as usize);
        }
        if rate > 0 {
            let allowed = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            if sent >= allowed {
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            }
            batch = batch.min((allowed - sent) as usize);
        }
        if args.count > 0 {
            batch = batch.min((args.count - sent) as usize);
        }
        out.clear();
        let now = shared.now_ns().to_be_bytes();
        for _ in 0..batch {
            let at = out.len() + body_at;
            out.put_slice(&template);
            out[at..at + 8].copy_from_slice(&now);
        }
        if args.confirm > 0 {
            batches.lock().push_back((sent + batch as u64, u64::from_be_bytes(now)));
        }
        writer.write_all(&out).await?;
        sent += batch as u64;
        shared.published.fetch_add(batch as u64, Ordering::Relaxed);
    }
    if args.confirm > 0 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while confirmed.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(50), confirm_notify.notified()).await;
        }
    }
    Ok(())
}

async fn consumer(args: PerfArgs, queue: String, shared: Arc<Shared>) -> anyhow::Result<Vec<u32>> {
    let mut conn = Conn::open(&args).await?;
    conn.declare_with(&queue, args.persistent, args.arguments()?).await?;
    conn.send(AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos { prefetch_count: args.prefetch, global: false })), 1)
        .await?;
    conn.expect_method().await?;
    conn.send(
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue.as_str().into(),
            consumer_tag: "".into(),
            no_local: false,
            no_ack: args.no_ack,
            exclusive: false,
            nowait: false,
            arguments: PerfArgs::table(&args.consume_args)?,
        })),
        1,
    )
    .await?;
    conn.expect_method().await?;
    let Conn { mut reader, mut writer, decoder, mut buf, .. } = conn;
    let mut latencies_us = Vec::with_capacity(1 << 20);
    let mut last_tag = 0u64;
    let mut acked_tag = 0u64;
    let ack_every = u64::from(args.prefetch.max(4) / 4).max(1);
    let mut out = BytesMut::with_capacity(256);
    let mut expect_body_header = false;
    let mut first_body_frame = false;
    loop {
        while let Some(frame) = decoder.decode(&mut buf)? {
            match frame.kind {
                FrameKind::Method => {
                    if let Ok(Method::Other(AMQPClass::Basic(basic::AMQPMethod::Deliver(d)))) =
                        method::decode(&frame.payload)
                    {
                        last_tag = d.delivery_tag;
                        expect_body_header = true;
                    } else if frame.payload.get(..4) == Some(&[0, 60, 0, 60]) {
                        // basic.deliver: tag sits after the consumer tag.
                        let tag_len = frame.payload[4] as usize;
                        if let Some(tag) = frame.payload.get(5 + tag_len..13 + tag_len) {
                            last_tag = u64::from_be_bytes(tag.try_into().unwrap_or([0; 8]));
                        }
                        expect_body_header = true;
                    }
                }
                FrameKind::Header if expect_body_header => {
                    expect_body_header = false;
                    first_body_frame = true;
                }
                FrameKind::Body if first_body_frame => {
                    first_body_frame = false;
                    // Delayed messages are timed from their due time.
                    let stamp_at = if args.delayed > 0 { 8 } else { 0 };
                    if let Some(stamp) = frame.payload.get(stamp_at..stamp_at + 8) {
                        let sent = u64::from_be_bytes(stamp.try_into().unwrap_or([0; 8]));
                        let now = shared.now_ns();
                        latencies_us.push((now.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32);
                    }
                    shared.consumed.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        if !args.no_ack && last_tag >= acked_tag + ack_every {
            out.clear();
            encode::basic_ack(&mut out, 1, last_tag, true);
            writer.write_all(&out).await?;
            acked_tag = last_tag;
        }
        if shared.stop_consuming.load(Ordering::Relaxed) {
            break;
        }
        buf.reserve(64 * 1024);
        let read = tokio::time::timeout(Duration::from_millis(100), reader.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) => bail!("broker closed the consumer connection"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                // Idle: flush a pending partial ack window.
                if !args.no_ack && last_tag > acked_tag {
                    out.clear();
                    encode::basic_ack(&mut out, 1, last_tag, true);
                    writer.write_all(&out).await?;
                    acked_tag = last_tag;
                }
            }
        }
    }
    Ok(latencies_us)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Opens idle connections (and queues) and reports what they cost the broker.
async fn idle(args: PerfArgs) -> anyhow::Result<()> {
    let pid = args.broker_pid.context("--idle-connections needs --broker-pid")?;
    let before = rss_kib(pid).context("cannot read the broker's RSS")?;
    let mut connections = Vec::with_capacity(args.idle_connections);
    let started = Instant::now();
    for i in 0..args.idle_connections {
        let mut conn = Conn::open(&args).await.with_context(|| format!("opening idle connection {i}"))?;
        if i < args.idle_queues {
            conn.declare(&format!("idle-{}-{i}", std::process::id()), false).await?;
        }
        connections.push(conn);
        if !args.json && (i + 1) % 1000 == 0 {
            eprintln!("{} connections open", i + 1);
        }
    }
    let queues_on_extra = args.idle_queues.saturating_sub(args.idle_connections);
    if queues_on_extra > 0 {
        let mut conn = Conn::open(&args).await?;
        for i in 0..queues_on_extra {
            conn.declare(&format!("idle-{}-x{i}", std::process::id()), false).await?;
        }
        connections.push(conn);
    }
    let open_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid).context("cannot read the broker's RSS")?;
    let per_connection = (after.saturating_sub(before)) as f64 / args.idle_connections.max(1) as f64;
    if args.json {
        println!(
            "{{\"connections\":{},\"queues\":{},\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"kib_per_connection\":{per_connection:.1},\"open_s\":{open_s:.2}}}",
            args.idle_connections, args.idle_queues
        );
    } else {
        println!(
            "{} idle connections, {} queues: broker RSS {} -> {} KiB ({per_connection:.1} KiB per connection); opened in {open_s:.1} s",
            args.idle_connections, args.idle_queues, before, after
        );
    }
    drop(connections);
    Ok(())
}

fn new_shared() -> Arc<Shared> {
    Arc::new(Shared {
        start: Instant::now(),
        confirm_latencies_us: parking_lot::Mutex::new(Vec::new()),
        published: AtomicU64::new(0),
        confirmed: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        stop_publishing: AtomicBool::new(false),
        stop_consuming: AtomicBool::new(false),
    })
}

/// Schedules `--delayed` messages on a delayed-message exchange, due at
/// `--due-rate` per second once all are published, and reports RSS growth
/// and lateness.
async fn delayed(args: PerfArgs) -> anyhow::Result<()> {
    let pid = args.broker_pid.context("--delayed needs --broker-pid")?;
    let queue = format!("perf-delayed-{}", std::process::id());
    let exchange_name = queue.clone();
    let shared = new_shared();
    let mut conn = Conn::open(&args).await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-delayed-type".into(), AMQPValue::LongString(LongString::from("direct")));
    conn.send(
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: exchange_name.as_str().into(),
            kind: "x-delayed-message".into(),
            passive: false,
            durable: args.persistent,
            auto_delete: false,
            internal: false,
            nowait: false,
            arguments,
        })),
        1,
    )
    .await?;
    conn.expect_method().await?;
    conn.declare(&queue, args.persistent).await?;
    conn.send(
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: queue.as_str().into(),
            exchange: exchange_name.as_str().into(),
            routing_key: "k".into(),
            nowait: false,
            arguments: FieldTable::default(),
        })),
        1,
    )
    .await?;
    conn.expect_method().await?;
    conn.send(AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false })), 1).await?;
    conn.expect_method().await?;
    let consumer_task = tokio::spawn(consumer(args.clone(), queue.clone(), shared.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let rss_before = rss_kib(pid).context("cannot read the broker's RSS")?;
    // Due times start after a lead long enough to publish everything (at a
    // conservative 20,000 msg/s) and are spread at --due-rate.
    let lead_ms = args.delayed * 1000 / 20_000 + 2_000;
    let due_rate = args.due_rate.max(1);
    let started = Instant::now();
    let body_len = args.size.max(16);
    let mut out = BytesMut::with_capacity(256 * 1024);
    for i in 0..args.delayed {
        let sent_ns = shared.now_ns();
        let delay_ms = lead_ms.saturating_sub(started.elapsed().as_millis() as u64) + i * 1000 / due_rate;
        let due_ns = sent_ns + delay_ms * 1_000_000;
        let mut headers = FieldTable::default();
        headers.insert("x-delay".into(), AMQPValue::LongLongInt(delay_ms as i64));
        let mut properties = Vec::new();
        let flags: u16 = flag::HEADERS | if args.persistent { flag::DELIVERY_MODE } else { 0 };
        properties.extend_from_slice(&flags.to_be_bytes());
        warren_codec::table::encode_table(&headers, &mut properties);
        if args.persistent {
            properties.push(2);
        }
        let mut body = vec![0u8; body_len];
        body[..8].copy_from_slice(&sent_ns.to_be_bytes());
        body[8..16].copy_from_slice(&due_ns.to_be_bytes());
        encode::basic_publish(&mut out, 1, exchange_name.as_bytes(), b"k", false);
        encode::content(&mut out, 1, &properties, &body, conn.frame_max);
        // Every 1,000 a round trip, so the broker's arrival time (which its
        // x-delay counts from) stays within a few ms of the send time.
        if (i + 1) % 1000 == 0 || i + 1 == args.delayed {
            conn.writer.write_all(&out).await?;
            out.clear();
            conn.message_count(&queue).await?;
        }
    }
    // All scheduled: a round trip on the same channel proves it.
    conn.message_count(&queue).await?;
    let publish_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_scheduled = rss_kib(pid).context("cannot read the broker's RSS")?;
    if !args.json {
        eprintln!(
            "{} scheduled in {publish_s:.1} s; broker RSS {rss_before} -> {rss_scheduled} KiB; waiting for them",
            args.delayed
        );
    }
    let spread_s = args.delayed as f64 / due_rate as f64;
    let deadline = Instant::now() + Duration::from_secs_f64(lead_ms as f64 / 1000.0 + spread_s + 10.0);
    while shared.consumed.load(Ordering::Relaxed) < args.delayed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shared.stop_consuming.store(true, Ordering::Relaxed);
    let mut lateness = consumer_task.await??;
    lateness.sort_unstable();
    let delivered = lateness.len();
    let _ = conn.delete_queue(&queue).await;
    let (p50, p99, max) =
        (percentile(&lateness, 0.5), percentile(&lateness, 0.99), lateness.last().copied().unwrap_or(0));
    let growth_mib = rss_scheduled.saturating_sub(rss_before) as f64 / 1024.0;
    if args.json {
        println!(
            "{{\"scheduled\":{},\"delivered\":{delivered},\"due_per_s\":{due_rate},\"rss_before_kib\":{rss_before},\"rss_scheduled_kib\":{rss_scheduled},\"rss_growth_mib\":{growth_mib:.1},\"late_us_p50\":{p50},\"late_us_p99\":{p99},\"late_us_max\":{max}}}",
            args.delayed
        );
    } else {
        println!("scheduled {} (published in {publish_s:.1} s), delivered {delivered}", args.delayed);
        println!("broker RSS while scheduled: +{growth_mib:.1} MiB ({rss_before} -> {rss_scheduled} KiB)");
        println!("lateness after due time (us), at {due_rate} due/s: p50 {p50}  p99 {p99}  max {max}");
    }
    Ok(())
}

/// Fills a queue under a TTL and times its expiry, with a probe publisher
/// measuring confirm latency meanwhile.
async fn expire(args: PerfArgs) -> anyhow::Result<()> {
    let queue = format!("perf-expire-{}", std::process::id());
    let mut fill_args = args.clone();
    fill_args.count = args.expire;
    fill_args.confirm = fill_args.confirm.max(1000);
    fill_args.rate = 0;
    fill_args.queue_args.push(format!("x-message-ttl={}", args.ttl_ms));
    let shared = new_shared();
    let fill_started = Instant::now();
    producer(fill_args, queue.clone(), shared.clone(), 0).await?;
    let fill_s = fill_started.elapsed().as_secs_f64();
    let mut watcher = Conn::open(&args).await?;
    let filled = watcher.message_count(&queue).await?;
    if !args.json {
        eprintln!("{filled} messages queued in {fill_s:.1} s; waiting for the TTL");
    }
    // The probe: 1,000 msg/s with confirms into another queue.
    let probe_queue = format!("{queue}-probe");
    let probe_shared = new_shared();
    let mut probe_args = args.clone();
    probe_args.queue_args.clear();
    probe_args.confirm = 100;
    probe_args.count = 0;
    let probe = tokio::spawn(producer(probe_args, probe_queue.clone(), probe_shared.clone(), 1000));
    let mut first_drop = None;
    let mut last = filled;
    let poll_deadline = Instant::now() + Duration::from_millis(args.ttl_ms) + Duration::from_secs(120);
    let emptied = loop {
        let count = watcher.message_count(&queue).await?;
        if count < last && first_drop.is_none() {
            first_drop = Some(Instant::now());
        }
        last = count;
        if count == 0 {
            break Instant::now();
        }
        if Instant::now() > poll_deadline {
            bail!("queue still holds {count} messages");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    probe_shared.stop_publishing.store(true, Ordering::Relaxed);
    probe.await??;
    let expiry_s = emptied.duration_since(first_drop.unwrap_or(emptied)).as_secs_f64().max(0.001);
    let rate = f64::from(filled) / expiry_s;
    let mut confirm = std::mem::take(&mut *probe_shared.confirm_latencies_us.lock());
    confirm.sort_unstable();
    let (c50, c99, cmax) =
        (percentile(&confirm, 0.5), percentile(&confirm, 0.99), confirm.last().copied().unwrap_or(0));
    let _ = watcher.delete_queue(&queue).await;
    let _ = watcher.delete_queue(&probe_queue).await;
    if args.json {
        println!(
            "{{\"expired\":{filled},\"expiry_s\":{expiry_s:.3},\"expired_per_s\":{rate:.0},\"probe_confirm_us_p50\":{c50},\"probe_confirm_us_p99\":{c99},\"probe_confirm_us_max\":{cmax}}}"
        );
    } else {
        println!("{filled} messages expired in {expiry_s:.2} s: {rate:.0} msg/s");
        println!("probe publisher meanwhile, confirm latency (us): p50 {c50}  p99 {c99}  max {cmax}");
    }
    Ok(())
}

pub async fn run(args: PerfArgs) -> anyhow::Result<()> {
    if args.idle_connections > 0 {
        return idle(args).await;
    }
    if args.delayed > 0 {
        return delayed(args).await;
    }
    if args.expire > 0 {
        return expire(args).await;
    }
    if args.size < 8 {
        bail!("--size must be at least 8 (the send timestamp)");
    }
    let queue = args.queue.clone().unwrap_or_else(|| format!("perf-{}", std::process::id()));
    let shared = new_shared();
    let mut consumers = Vec::new();
    if !args.publish_only {
        for _ in 0..args.consumers {
            consumers.push(tokio::spawn(consumer(args.clone(), queue.clone(), shared.clone())));
        }
        // Let consumers declare and subscribe before publishing starts (a
        // drain is timed from the start: a fast one is over in 300 ms).
        if !args.consume_only {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let per_producer_rate = if args.rate > 0 { (args.rate / args.producers.max(1) as u64).max(1) } else { 0 };
    let cpu_before = args.broker_pid.and_then(cpu_seconds);
    let rss_before = args.broker_pid.and_then(rss_kib);
    let self_cpu_before = cpu_seconds(std::process::id());
    let measure_start = Instant::now();
    let consumed_before = shared.consumed.load(Ordering::Relaxed);
    let mut producers = Vec::new();
    let producer_count = if args.consume_only { 0 } else { args.producers };
    for _ in 0..producer_count {
        producers.push(tokio::spawn(producer(args.clone(), queue.clone(), shared.clone(), per_producer_rate)));
    }
    let deadline = measure_start + Duration::from_secs(args.duration);
    let mut last_report = Instant::now();
    let mut last_consumed = (0, Instant::now());
    while Instant::now() < deadline && (args.consume_only || !producers.iter().all(|p| p.is_finished())) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if args.consume_only {
            let consumed = shared.consumed.load(Ordering::Relaxed);
            if consumed != last_consumed.0 {
                last_consumed = (consumed, Instant::now());
            } else if consumed > 0 && last_consumed.1.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        if !args.json && last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!(
                "t={:>4.1}s published={} confirmed={} consumed={}",
                measure_start.elapsed().as_secs_f64(),
                shared.published.load(Ordering::Relaxed),
                shared.confirmed.load(Ordering::Relaxed),
                shared.consumed.load(Ordering::Relaxed)
            );
        }
    }
    let elapsed = if args.consume_only {
        // The drain ended when the last message arrived.
        last_consumed.1.duration_since(measure_start).as_secs_f64().max(0.001)
    } else {
        measure_start.elapsed().as_secs_f64()
    };
    let consumed_in_window = shared.consumed.load(Ordering::Relaxed) - consumed_before;
    let published = shared.published.load(Ordering::Relaxed);
    let cpu_after = args.broker_pid.and_then(cpu_seconds);
    let rss_after = args.broker_pid.and_then(rss_kib);
    let self_cpu_after = cpu_seconds(std::process::id());
    shared.stop_publishing.store(true, Ordering::Relaxed);
    for p in producers {
        p.await??;
    }
    let confirmed = shared.confirmed.load(Ordering::Relaxed);
    // Give consumers a moment to drain what is in flight, then stop them.
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    while !args.publish_only && shared.consumed.load(Ordering::Relaxed) < published && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.stop_consuming.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for c in consumers {
        latencies.extend(c.await??);
    }
    latencies.sort_unstable();
    if !args.publish_only && !args.consume_only {
        // Leave nothing behind for the next scenario.
        if let Ok(mut conn) = Conn::open(&args).await {
            let delete = AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: queue.as_str().into(),
                if_unused: false,
                if_empty: false,
                nowait: false,
            }));
            if conn.send(delete, 1).await.is_ok() {
                let _ = conn.expect_method().await;
            }
        }
    }
    let publish_rate = published as f64 / elapsed;
    let consume_rate = consumed_in_window as f64 / elapsed;
    let broker_cpu_us = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) if consumed_in_window + published > 0 => {
            let messages = if args.publish_only { published } else { consumed_in_window.max(1) };
            Some((b - a) * 1e6 / messages as f64)
        }
        _ => None,
    };
    let client_cpu_us = match (self_cpu_before, self_cpu_after) {
        (Some(a), Some(b)) => Some((b - a) * 1e6 / published.max(1) as f64),
        _ => None,
    };
    let mut confirm_latencies = std::mem::take(&mut *shared.confirm_latencies_us.lock());
    confirm_latencies.sort_unstable();
    let (c50, c99) = (percentile(&confirm_latencies, 0.50), percentile(&confirm_latencies, 0.99));
    let (p50, p95, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.95),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0),
    );
    if args.json {
        println!(
            "{{\"published_per_s\":{publish_rate:.0},\"consumed_per_s\":{consume_rate:.0},\"published\":{published},\"confirmed\":{confirmed},\"latency_us_p50\":{p50},\"latency_us_p95\":{p95},\"latency_us_p99\":{p99},\"latency_us_max\":{max},\"confirm_us_p50\":{c50},\"confirm_us_p99\":{c99},\"broker_cpu_us_per_msg\":{},\"client_cpu_us_per_msg\":{},\"rss_before_kib\":{},\"rss_after_kib\":{}}}",
            broker_cpu_us.map_or("null".into(), |v| format!("{v:.2}")),
            client_cpu_us.map_or("null".into(), |v| format!("{v:.2}")),
            rss_before.map_or("null".into(), |v| v.to_string()),
            rss_after.map_or("null".into(), |v| v.to_string()),
        );
    } else {
        println!("published: {published} ({publish_rate:.0} msg/s), confirmed: {confirmed}");
        println!("consumed:  {consume_rate:.0} msg/s");
        println!("latency (us): p50 {p50}  p95 {p95}  p99 {p99}  max {max}");
        if args.confirm > 0 {
            println!("confirm latency (us): p50 {c50}  p99 {c99}");
        }
        if let Some(cpu) = broker_cpu_us {
            println!("broker CPU: {cpu:.2} us/msg");
        }
        if let Some(cpu) = client_cpu_us {
            println!("perf client CPU: {cpu:.2} us/msg");
        }
        if let (Some(before), Some(after)) = (rss_before, rss_after) {
            println!("broker RSS: {before} -> {after} KiB");
        }
    }
    Ok(())
}
