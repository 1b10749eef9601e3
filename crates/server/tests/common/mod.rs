//! Starts a real Warren server on an ephemeral loopback port for a test.

#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::sync::oneshot;
use warren_server::{Config, Server};

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::with_config(|_| {}).await
    }

    pub async fn with_config(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config { amqp_port: 0, bind: vec!["127.0.0.1".into()], ..Config::default() };
        adjust(&mut config);
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addrs()[0];
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer { addr, stop: Some(stop), task: Some(task) }
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2F", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
