//! Warren's network server: TCP listeners, the AMQP connection state machine
//! (handshake, channels, content assembly, confirms, transactions),
//! heartbeats, and graceful shutdown.
//!
//! Each connection runs two tasks: a reader that decodes a batch of frames
//! and applies it to the virtual host under one lock, and a writer that
//! drains the connection's [`outbox::ConnectionOutbox`] in large writes.
//! Deliveries from other connections land in the same outbox, so a busy
//! consumer receives many frames per syscall.

pub mod access;
pub mod alarm;
pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod files;
pub mod histogram;
pub mod outbox;
pub mod password;
pub mod quorum;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;

pub use broker::Broker;
pub use config::Config;
pub use server::Server;
