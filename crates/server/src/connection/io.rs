//! The tokio task around a [`Connection`]: reads the socket into it, runs
//! what it waits for, and writes its outbox with heartbeats.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::{debug, warn};
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_codec::{encode, PROTOCOL_HEADER};
use warren_storage::StorageError;

use super::{Connection, Endpoints, Phase, Wait};
use crate::broker::Broker;
use crate::outbox::ConnectionOutbox;
use crate::session::Session;
use crate::store::Store;

const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);

/// How long, at most, a connection whose `connection.close` was answered
/// waits for the client to close the socket (RabbitMQ's 30 s, or the
/// heartbeat interval when shorter).
const CLOSED_LINGER_MAX: Duration = Duration::from_secs(30);

/// Waits until the log is durable up to `index`, or the store is poisoned.
async fn wait_durable(durable: &mut watch::Receiver<u64>, store: &Store, index: u64) -> Result<(), StorageError> {
    loop {
        if store.is_poisoned() {
            return Err(StorageError::Poisoned);
        }
        match tokio::time::timeout(Duration::from_millis(100), durable.wait_for(|&d| d >= index)).await {
            Ok(Ok(_)) => return Ok(()),
            // The store is gone (shutting down).
            Ok(Err(_)) => return Err(StorageError::Poisoned),
            Err(_) => {}
        }
    }
}

/// Serves one plain TCP connection.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    handshake: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    let (reader, writer) = stream.into_split();
    let endpoints = Endpoints { peer, local, tls: false, certificate: None };
    serve_stream(reader, writer, endpoints, broker, shutdown, handshake).await;
}

/// Serves one connection after its TLS handshake; `certificate` is the
/// verified client certificate's common name (for EXTERNAL).
pub async fn serve_tls(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    certificate: Option<String>,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    handshake: OwnedSemaphorePermit,
) {
    let local = stream.get_ref().0.local_addr().unwrap_or(peer);
    let (reader, writer) = tokio::io::split(stream);
    let endpoints = Endpoints { peer, local, tls: true, certificate };
    serve_stream(reader, writer, endpoints, broker, shutdown, handshake).await;
}

async fn serve_stream<R, W>(
    mut reader: R,
    mut writer: W,
    endpoints: Endpoints,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
    handshake: OwnedSemaphorePermit,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let handshake_timeout = Duration::from_secs(broker.config.handshake_timeout_s.max(1));
    // Held until connection.open is answered (`max_pending_handshakes`).
    let mut handshake = Some(handshake);

    let mut header = [0u8; 8];
    match tokio::time::timeout(handshake_timeout, reader.read_exact(&mut header)).await {
        Ok(Ok(_)) if header == PROTOCOL_HEADER => {}
        Ok(Ok(_)) => {
            debug!(peer = %endpoints.peer, "bad protocol header");
            let _ = writer.write_all(&PROTOCOL_HEADER).await;
            let _ = writer.shutdown().await;
            return;
        }
        _ => return,
    }

    let mut conn = Connection::new(broker.clone(), endpoints);
    let outbox = conn.outbox.clone();
    let mut durable = broker.store.durable_watch();
    let mut replicated = broker.tickets.watch();
    let mut alarms = broker.alarms.subscribe();
    let (heartbeat_tx, heartbeat_rx) = watch::channel(0u16);
    let writer_task = tokio::spawn(write_loop(writer, outbox.clone(), heartbeat_rx));

    let mut buf = BytesMut::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + handshake_timeout;
    let mut close_deadline: Option<tokio::time::Instant> = None;
    loop {
        if conn.phase == Phase::Done {
            break;
        }
        let read_timeout = match (conn.phase, close_deadline) {
            (Phase::Closing, Some(at)) => at,
            (Phase::Running, _) if conn.heartbeat_s > 0 => {
                tokio::time::Instant::now() + Duration::from_secs(u64::from(conn.heartbeat_s) * 2)
            }
            (Phase::Running, _) => tokio::time::Instant::now() + Duration::from_secs(86_400 * 365),
            _ => deadline,
        };
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        tokio::select! {
            // A blocked connection is still read while it closes, for its close-ok.
            read = tokio::time::timeout_at(read_timeout, reader.read_buf(&mut buf)), if !conn.blocked || conn.phase == Phase::Closing => {
                match read {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        outbox.count_received(n);
                        if conn.publisher && !conn.blocked && alarms.borrow().any() {
                            conn.block_deferred_bytes = conn.block_deferred_bytes.saturating_add(n);
                        }
                    }
                    Err(_) => {
                        match conn.phase {
                            Phase::Running => warn!(peer = %conn.peer, heartbeat_s = conn.heartbeat_s, "missed heartbeats from client, closing"),
                            Phase::Closing => {}
                            _ => warn!(peer = %conn.peer, "handshake timed out"),
                        }
                        break;
                    }
                }
            }
            _ = alarms.changed() => {
                conn.apply_alarm(*alarms.borrow_and_update());
                continue;
            }
            _ = durable.changed(), if conn.awaiting_store() => {
                conn.flush_confirms();
                continue;
            }
            _ = replicated.changed(), if conn.awaiting_store() => {
                conn.flush_confirms();
                continue;
            }
            _ = outbox.failed_notify.notified() => {
                if let Some((code, text)) = outbox.take_forced() {
                    if conn.phase == Phase::Running {
                        conn.close_connection(AmqpError::hard(code, text, 0, 0));
                        close_deadline = Some(tokio::time::Instant::now() + CLOSE_OK_TIMEOUT);
                    }
                }
                conn.fail_channels();
                continue;
            }
            _ = shutdown.changed() => {
                if conn.phase == Phase::Running {
                    conn.close_connection(AmqpError::hard(ReplyCode::ConnectionForced, "broker forced connection closure with reason 'shutdown'", 0, 0));
                    close_deadline = Some(tokio::time::Instant::now() + CLOSE_OK_TIMEOUT);
                } else {
                    break;
                }
                continue;
            }
        }
        let before = conn.phase;
        conn.process(&mut buf);
        // The cluster's replication and this connection's virtual host, for
        // the waits that go to another node.
        let in_cluster = |conn: &Connection| {
            let vhost = conn.vhost.as_ref().map(|vhost| vhost.lock().name.to_string());
            broker.replication.get().cloned().zip(vhost)
        };
        // What made processing stop before the end of the input.
        loop {
            match conn.take_wait() {
                Some(Wait::Password { user, password, mechanism }) => {
                    let ok = broker.verify_password(user.clone(), password).await;
                    conn.finish_login(ok, user, &mechanism);
                }
                Some(Wait::Durable(deferred)) => {
                    let mut stored = wait_durable(&mut durable, &conn.store, deferred.index).await;
                    if let (Ok(()), Some(ticket)) = (&stored, deferred.ticket) {
                        if !broker.tickets.wait(ticket).await {
                            stored = Err(StorageError::Poisoned);
                        }
                    }
                    conn.send_deferred(deferred, stored);
                }
                Some(Wait::Quorum(declare)) => {
                    let placed = match (broker.replication.get(), &conn.vhost) {
                        (Some(replication), Some(vhost)) => {
                            let vhost = vhost.lock().name.to_string();
                            replication.declare(&vhost, &declare.name, &declare.arguments).await
                        }
                        _ => Ok(()),
                    };
                    conn.finish_quorum_declare(declare, placed);
                }
                Some(Wait::Counts(declare)) => {
                    let counts = match in_cluster(&conn) {
                        Some((replication, vhost)) => replication.leader_counts(&vhost, &declare.name).await,
                        None => None,
                    };
                    conn.finish_passive_declare(declare, counts);
                }
                Some(Wait::Get(get)) => {
                    let got = match in_cluster(&conn) {
                        Some((replication, vhost)) => replication.relayed_get(&vhost, &get.name, get.no_ack).await,
                        None => Ok(None),
                    };
                    conn.finish_remote_get(&get, got);
                }
                Some(Wait::Delete(delete)) => {
                    let deleted = match in_cluster(&conn) {
                        Some((replication, vhost)) => {
                            replication.delete_remote(&vhost, &delete.name, delete.if_unused, delete.if_empty).await
                        }
                        None => Ok(0),
                    };
                    conn.finish_remote_delete(&delete, deleted);
                }
                Some(Wait::Purge(purge)) => {
                    let purged = match in_cluster(&conn) {
                        Some((replication, vhost)) => replication.purge_remote(&vhost, &purge.name).await,
                        None => Ok(0),
                    };
                    conn.finish_remote_purge(purge, purged);
                }
                Some(Wait::Relay(consume)) => {
                    let key = warren_core::vhost::ChannelKey { connection: conn.id, channel: consume.channel };
                    let replication = broker.replication.get().cloned();
                    let vhost = conn.vhost.as_ref().map(|vhost| vhost.lock().name.to_string());
                    let accepted = match (&replication, &vhost) {
                        (Some(replication), Some(vhost)) => replication.relayed_consume(vhost, key, &consume.tag).await,
                        _ => Ok(()),
                    };
                    conn.finish_relayed_consume(&consume, accepted);
                    if let (Some(replication), Some(vhost)) = (replication, vhost) {
                        replication.relay_ready(&vhost, key, &consume.tag);
                    }
                }
                None => break,
            }
            conn.process(&mut buf);
        }
        if conn.publisher && !conn.blocked {
            conn.apply_alarm(*alarms.borrow());
        }
        if before != Phase::Running && conn.phase == Phase::Running {
            handshake.take();
            let _ = heartbeat_tx.send(conn.heartbeat_s);
        }
        if conn.phase == Phase::Closing && close_deadline.is_none() {
            close_deadline = Some(tokio::time::Instant::now() + CLOSE_OK_TIMEOUT);
        }
    }

    if let Some(vhost) = conn.vhost.clone() {
        Session::open(&vhost, &conn.store).close_connection(conn.id);
    }
    if conn.registered {
        broker.unregister(conn.id, conn.channels.len() as u64);
    }
    // Stop the writer after it has flushed what is queued.
    let _ = heartbeat_tx.send(u16::MAX);
    outbox.notify.notify_one();
    let writer = writer_task.await.ok().flatten();
    if conn.answered_close {
        // The client may still be writing frames it queued before its close
        // (they cross our close-ok). Closing the socket now would reset it
        // mid-write and lose the close-ok; as RabbitMQ, let the client close.
        let linger = match conn.heartbeat_s {
            0 => CLOSED_LINGER_MAX,
            seconds => CLOSED_LINGER_MAX.min(Duration::from_secs(u64::from(seconds))),
        };
        discard_until_closed(&mut reader, linger, &mut shutdown).await;
    }
    if let Some(mut writer) = writer {
        let _ = writer.shutdown().await;
    }
    debug!(peer = %conn.peer, user = %conn.user, "connection closed");
}

/// Reads and drops input until the peer closes, `linger` passes or the
/// broker shuts down.
async fn discard_until_closed<R: AsyncRead + Unpin>(
    reader: &mut R,
    linger: Duration,
    shutdown: &mut watch::Receiver<bool>,
) {
    let deadline = tokio::time::Instant::now() + linger;
    let mut scratch = vec![0u8; 8192];
    loop {
        tokio::select! {
            read = tokio::time::timeout_at(deadline, reader.read(&mut scratch)) => match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Writes the outbox to the socket, with heartbeats, until told to stop
/// (`u16::MAX` on the heartbeat watch); then flushes what is queued and
/// hands the writer back unclosed, or `None` if the socket failed.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    outbox: Arc<ConnectionOutbox>,
    mut heartbeat: watch::Receiver<u16>,
) -> Option<W> {
    let mut spare = BytesMut::with_capacity(512);
    loop {
        let interval = *heartbeat.borrow();
        if interval == u16::MAX {
            outbox.take(&mut spare);
            if !spare.is_empty() && writer.write_all(&spare).await.is_err() {
                return None;
            }
            outbox.count_sent(spare.len());
            let _ = writer.flush().await;
            return Some(writer);
        }
        let wait =
            if interval == 0 { Duration::from_secs(86_400 * 365) } else { Duration::from_secs(u64::from(interval)) };
        tokio::select! {
            _ = outbox.notify.notified() => {}
            _ = heartbeat.changed() => continue,
            _ = tokio::time::sleep(wait) => {
                outbox.write(encode::heartbeat);
                continue;
            }
        }
        outbox.take(&mut spare);
        if spare.is_empty() {
            continue;
        }
        if writer.write_all(&spare).await.is_err() {
            return None;
        }
        outbox.count_sent(spare.len());
        spare.clear();
        // Do not keep a huge buffer around after a burst.
        if spare.capacity() > 1 << 20 {
            spare = BytesMut::with_capacity(512);
        }
        outbox.drained();
    }
}
