//! Starts a real Warren server on an ephemeral loopback port for a test,
//! with its own data directory (removed when the test ends), and the lapin
//! steps the tests share (open, consume, count, arguments, replies).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use std::sync::Arc;

use tokio::sync::oneshot;
use warren_core::{Clock, ManualClock, SystemClock};
use warren_server::broker::Environment;
use warren_server::{Config, Server};

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

pub struct TestServer {
    pub addr: SocketAddr,
    pub config: Config,
    pub broker: std::sync::Arc<warren_server::Broker>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    owns_dir: bool,
    /// The queues' clock when the test moves time by hand.
    clock: Option<Arc<ManualClock>>,
}

pub fn temp_data_dir() -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("warren-test-{}-{n}", std::process::id()))
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::with_config(|_| {}).await
    }

    pub async fn with_config(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config =
            Config { amqp_port: 0, bind: vec!["127.0.0.1".into()], data_dir: temp_data_dir(), ..Config::default() };
        adjust(&mut config);
        Self::from_config(config, true, None).await
    }

    /// A server whose queues read a clock that moves only when the test
    /// calls [`TestServer::advance`] (TTLs, delays, timeouts, expiry),
    /// starting at the current wall-clock time.
    pub async fn with_manual_clock(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config =
            Config { amqp_port: 0, bind: vec!["127.0.0.1".into()], data_dir: temp_data_dir(), ..Config::default() };
        adjust(&mut config);
        let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
        Self::from_config(config, true, Some(clock)).await
    }

    /// Moves the manual clock forward; the broker's timers see it within
    /// their next tick (5 ms; consumer timeouts 100 ms).
    pub fn advance(&self, millis: u64) {
        self.clock.as_ref().expect("a server with a manual clock").advance(millis);
    }

    async fn from_config(config: Config, owns_dir: bool, clock: Option<Arc<ManualClock>>) -> TestServer {
        let mut environment = Environment::default();
        if let Some(clock) = &clock {
            environment.clock = clock.clone();
        }
        let server = Server::bind_with(config.clone(), environment).await.expect("bind");
        let addr = server.local_addrs()[0];
        let broker = server.broker();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer { addr, config, broker, stop: Some(stop), task: Some(task), owns_dir, clock }
    }

    /// Changes the access definitions as `warren ctl` does (through the
    /// file) and applies them at once.
    pub fn ctl(
        &self,
        change: impl FnOnce(&mut warren_server::access::AccessDefinitions) -> Result<(), warren_server::access::AccessError>,
    ) {
        let seed = warren_server::access::Seed { vhosts: &[], users: Vec::new() };
        self.broker.access_file().update(&seed, change).expect("access change");
        self.broker.reload_access().expect("reload");
    }

    /// A URI for `user` on virtual host `vhost`.
    pub fn uri_as(&self, user: &str, password: &str, vhost: &str) -> String {
        let vhost = vhost.replace('%', "%25").replace('/', "%2F");
        format!("amqp://{user}:{password}@{}/{vhost}", self.addr)
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2F", self.addr)
    }

    /// Stops the server cleanly and starts a new one on the same data.
    pub async fn restart(mut self) -> TestServer {
        let config = self.config.clone();
        self.owns_dir = false;
        self.shutdown().await;
        let mut restarted = Self::from_config(config, false, self.clock.clone()).await;
        restarted.owns_dir = true;
        restarted
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    /// Stops cleanly and leaves the data directory for the caller.
    pub async fn stop_keeping_data(mut self) -> Config {
        self.owns_dir = false;
        self.shutdown().await;
        self.config.clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.config.data_dir);
        }
    }
}

/// A server whose message log lives on a simulated disk that can lose power.
pub async fn start_on(
    backend: std::sync::Arc<dyn warren_storage::Backend>,
    config: Config,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let server = Server::bind_with(config, warren_server::broker::Environment::on(backend)).await.expect("bind");
    let addr = server.local_addrs()[0];
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

/// Waits until `queue` holds `expected` ready messages (passive declares,
/// for up to 2 s); panics otherwise.
pub async fn wait_count(ch: &lapin::Channel, queue: &str, expected: u32) {
    for _ in 0..200 {
        let q = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("passive declare");
        if q.message_count() == expected {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("queue {queue} never reached {expected} messages");
}

/// Waits until `check` holds (polled every 10 ms, for up to 5 s); panics
/// with `what` otherwise. For effects that land asynchronously (a publish
/// without a confirm, a connection closed by the broker), instead of a
/// fixed sleep that is too short on a loaded machine and too long on an
/// idle one.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// A connection as guest on `/` and a channel on it.
pub async fn open(server: &TestServer) -> (lapin::Connection, lapin::Channel) {
    let conn =
        lapin::Connection::connect(&server.uri(), lapin::ConnectionProperties::default()).await.expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    (conn, channel)
}

/// A consumer on `queue`; its handle must be kept (lapin cancels a consumer
/// whose handle is dropped).
pub async fn consume(ch: &lapin::Channel, queue: &str, consumer_tag: &str, no_ack: bool) -> lapin::Consumer {
    let options = lapin::options::BasicConsumeOptions { no_ack, ..Default::default() };
    ch.basic_consume(queue.into(), consumer_tag.into(), options, lapin::types::FieldTable::default())
        .await
        .expect("basic.consume")
}

/// Ready messages of a queue, on a channel of its own (a 404 closes it);
/// `None` if there is no such queue.
pub async fn count(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    let ch = conn.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    ch.queue_declare(queue.into(), passive, lapin::types::FieldTable::default()).await.ok().map(|q| q.message_count())
}

pub fn persistent() -> lapin::BasicProperties {
    lapin::BasicProperties::default().with_delivery_mode(2)
}

/// A field table of `x-` arguments or headers.
pub fn args(pairs: &[(&str, lapin::types::AMQPValue)]) -> lapin::types::FieldTable {
    let mut table = lapin::types::FieldTable::default();
    for (key, value) in pairs {
        table.insert((*key).into(), value.clone());
    }
    table
}

pub fn text(value: &str) -> lapin::types::AMQPValue {
    lapin::types::AMQPValue::LongString(lapin::types::LongString::from(value))
}

pub fn long(value: i64) -> lapin::types::AMQPValue {
    lapin::types::AMQPValue::LongLongInt(value)
}

/// The reply code and text a failed operation reports (0 and the error's
/// debug form when the broker sent none).
pub fn reply(error: &lapin::Error) -> (u16, String) {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => (amqp.get_id(), amqp.get_message().to_string()),
        other => (0, format!("{other:?}")),
    }
}
