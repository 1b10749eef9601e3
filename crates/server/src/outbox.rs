//! A connection's outgoing bytes. Anyone holding the connection (its own
//! reader, or another connection's publish routed to one of its consumers)
//! appends encoded frames under a short lock; the writer task swaps the
//! buffer out and writes it with one syscall, so deliveries batch naturally.
//!
//! Back-pressure: above `limit` unsent bytes the outbox reports congestion
//! and the core stops delivering to it; the writer resumes deliveries once
//! the buffer has drained below half the limit.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::sync::Notify;
use warren_codec::encode;
use warren_codec::reply::ReplyCode;
use warren_core::{Message, Outbox, VirtualHost};

use crate::session::Session;
use crate::store::Store;

pub struct ConnectionOutbox {
    buf: Mutex<BytesMut>,
    pub(crate) notify: Notify,
    frame_max: AtomicU32,
    cancel_notify: AtomicBool,
    congested: AtomicBool,
    limit: usize,
    pub(crate) connection_id: u64,
    /// The virtual host the connection opened, and the store its sessions
    /// write to (set once, at `connection.open`).
    pub(crate) vhost: OnceLock<(Arc<VirtualHost>, Arc<Store>)>,
    /// Channels the core asked to close (consumer timeout), with the text.
    failed: Mutex<Vec<(u16, String)>>,
    pub(crate) failed_notify: Notify,
    /// Set when the broker closes the connection from outside (its user or
    /// virtual host was deleted): reply code and text.
    forced: Mutex<Option<(ReplyCode, String)>>,
    /// Socket traffic for operators: bytes and reads or writes, counted per
    /// socket call (not per frame).
    recv_oct: AtomicU64,
    recv_cnt: AtomicU64,
    send_oct: AtomicU64,
    send_cnt: AtomicU64,
    /// Publishes in confirm mode not yet acked or nacked (all channels).
    unconfirmed: AtomicU64,
}

/// A connection's socket traffic so far (RabbitMQ's `recv_oct`...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub recv_oct: u64,
    pub recv_cnt: u64,
    pub send_oct: u64,
    pub send_cnt: u64,
}

impl ConnectionOutbox {
    pub fn new(connection_id: u64, frame_max: u32, limit: usize) -> ConnectionOutbox {
        ConnectionOutbox {
            buf: Mutex::new(BytesMut::with_capacity(512)),
            notify: Notify::new(),
            frame_max: AtomicU32::new(frame_max),
            cancel_notify: AtomicBool::new(false),
            congested: AtomicBool::new(false),
            limit,
            connection_id,
            vhost: OnceLock::new(),
            failed: Mutex::new(Vec::new()),
            failed_notify: Notify::new(),
            forced: Mutex::new(None),
            recv_oct: AtomicU64::new(0),
            recv_cnt: AtomicU64::new(0),
            send_oct: AtomicU64::new(0),
            send_cnt: AtomicU64::new(0),
            unconfirmed: AtomicU64::new(0),
        }
    }

    pub(crate) fn add_unconfirmed(&self, n: u64) {
        self.unconfirmed.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sub_unconfirmed(&self, n: u64) {
        self.unconfirmed.fetch_sub(n, Ordering::Relaxed);
    }

    /// Publishes waiting for their confirm.
    pub fn unconfirmed(&self) -> u64 {
        self.unconfirmed.load(Ordering::Relaxed)
    }

    pub(crate) fn count_received(&self, bytes: usize) {
        self.recv_oct.fetch_add(bytes as u64, Ordering::Relaxed);
        self.recv_cnt.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_sent(&self, bytes: usize) {
        self.send_oct.fetch_add(bytes as u64, Ordering::Relaxed);
        self.send_cnt.fetch_add(1, Ordering::Relaxed);
    }

    pub fn traffic(&self) -> Traffic {
        Traffic {
            recv_oct: self.recv_oct.load(Ordering::Relaxed),
            recv_cnt: self.recv_cnt.load(Ordering::Relaxed),
            send_oct: self.send_oct.load(Ordering::Relaxed),
            send_cnt: self.send_cnt.load(Ordering::Relaxed),
        }
    }

    pub fn set_frame_max(&self, frame_max: u32) {
        self.frame_max.store(frame_max, Ordering::Relaxed);
    }

    pub fn frame_max(&self) -> u32 {
        self.frame_max.load(Ordering::Relaxed)
    }

    pub fn set_cancel_notify(&self, enabled: bool) {
        self.cancel_notify.store(enabled, Ordering::Relaxed);
    }

    /// Appends frames written by `write` and wakes the writer.
    pub fn write(&self, write: impl FnOnce(&mut BytesMut)) {
        let mut buf = self.buf.lock();
        write(&mut buf);
        if buf.len() > self.limit {
            self.congested.store(true, Ordering::Relaxed);
        }
        drop(buf);
        self.notify.notify_one();
    }

    /// Asks the connection's reader to close the connection.
    pub(crate) fn force_close(&self, code: ReplyCode, text: &str) {
        *self.forced.lock() = Some((code, text.to_string()));
        self.failed_notify.notify_one();
    }

    pub(crate) fn take_forced(&self) -> Option<(ReplyCode, String)> {
        self.forced.lock().take()
    }

    pub(crate) fn take_failed(&self) -> Vec<(u16, String)> {
        std::mem::take(&mut *self.failed.lock())
    }

    /// Swaps the pending bytes into `spare` (which must be empty).
    pub(crate) fn take(&self, spare: &mut BytesMut) {
        debug_assert!(spare.is_empty());
        std::mem::swap(&mut *self.buf.lock(), spare);
    }

    /// Called by the writer after a write: lifts congestion once drained.
    pub(crate) fn drained(&self) {
        if self.congested.load(Ordering::Relaxed) && self.buf.lock().len() < self.limit / 2 {
            self.congested.store(false, Ordering::Relaxed);
            if let Some((vhost, store)) = self.vhost.get() {
                Session::open(vhost, store).resume_connection(self.connection_id);
            }
        }
    }

    /// `basic.deliver` and the message's content, sent with `properties`.
    fn write_delivery(
        &self,
        channel: u16,
        consumer_tag: &str,
        delivery_tag: u64,
        redelivered: bool,
        message: &Message,
        properties: &[u8],
    ) {
        let frame_max = self.frame_max();
        self.write(|buf| {
            encode::basic_deliver(
                buf,
                channel,
                consumer_tag.as_bytes(),
                delivery_tag,
                redelivered,
                message.exchange(),
                message.routing_key(),
            );
            encode::content(buf, channel, properties, message.body(), frame_max);
        });
    }
}

impl Outbox for ConnectionOutbox {
    fn deliver(&self, channel: u16, consumer_tag: &str, delivery_tag: u64, redelivered: bool, message: &Message) {
        self.write_delivery(channel, consumer_tag, delivery_tag, redelivered, message, message.properties());
    }

    fn deliver_with_properties(
        &self,
        channel: u16,
        consumer_tag: &str,
        delivery_tag: u64,
        message: &Message,
        properties: &[u8],
    ) {
        self.write_delivery(channel, consumer_tag, delivery_tag, false, message, properties);
    }

    fn consumer_cancelled(&self, channel: u16, consumer_tag: &str) {
        if self.cancel_notify.load(Ordering::Relaxed) {
            self.write(|buf| encode::basic_cancel(buf, channel, consumer_tag.as_bytes()));
        }
    }

    fn is_congested(&self) -> bool {
        self.congested.load(Ordering::Relaxed)
    }

    fn fail_channel(&self, channel: u16, text: &str) {
        self.failed.lock().push((channel, text.to_string()));
        self.failed_notify.notify_one();
    }
}
