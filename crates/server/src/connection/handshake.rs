//! The connection's own methods (channel 0): start-ok and login, tune-ok,
//! open, close, update-secret.

use std::sync::Arc;

use tracing::{debug, warn};
use warren_codec::frame::{FrameDecoder, FRAME_MIN_SIZE};
use warren_codec::method::Method;
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_codec::spec::{connection, AMQPClass};
use warren_codec::table;
use warren_codec::types::{AMQPValue, FieldTable, LongString};

use super::{short, Connection, Phase, Wait};
use crate::access::User;
use crate::auth::{self, AuthError};
use crate::broker::ConnectionInfo;
use warren_core::Clock;

pub(super) fn server_properties() -> FieldTable {
    let mut capabilities = FieldTable::default();
    for name in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        capabilities.insert(short(name), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert(short("capabilities"), AMQPValue::FieldTable(capabilities));
    props.insert(short("cluster_name"), AMQPValue::LongString(LongString::from("warren")));
    props.insert(short("copyright"), AMQPValue::LongString(LongString::from("Warren contributors")));
    props.insert(short("information"), AMQPValue::LongString(LongString::from("Warren: an AMQP 0-9-1 message broker")));
    props.insert(short("platform"), AMQPValue::LongString(LongString::from("Rust")));
    props.insert(short("product"), AMQPValue::LongString(LongString::from("Warren")));
    props.insert(short("version"), AMQPValue::LongString(LongString::from(env!("CARGO_PKG_VERSION"))));
    props
}

pub(super) fn client_capability(client_properties: &FieldTable, name: &str) -> bool {
    match table::get(client_properties, "capabilities") {
        Some(AMQPValue::FieldTable(caps)) => {
            matches!(table::get(caps, name), Some(AMQPValue::Boolean(true)))
        }
        _ => false,
    }
}

impl Connection {
    pub(super) fn login_accepted(&mut self, user: Arc<User>) {
        self.user = user.name.clone();
        self.account = Some(user);
        let config = &self.broker.config;
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: config.channel_max,
                frame_max: config.frame_max,
                heartbeat: config.heartbeat_s,
            })),
        );
        self.phase = Phase::TuneOk;
    }

    pub(super) fn login_refused(&mut self, mechanism: &str, user: &str) -> Result<(), AmqpError> {
        warn!(peer = %self.peer, %user, "login refused");
        if self.auth_failure_close {
            Err(AmqpError::hard(
                ReplyCode::AccessRefused,
                format!(
                    "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                ),
                10,
                11,
            ))
        } else {
            // Pre-capability clients expect the socket to close.
            self.phase = Phase::Done;
            Ok(())
        }
    }

    /// Ends a login that waited for the password check.
    pub(super) fn finish_login(&mut self, ok: bool, user: Arc<User>, mechanism: &str) {
        if ok {
            self.login_accepted(user);
        } else if let Err(error) = self.login_refused(mechanism, &user.name) {
            self.close_connection(error);
        }
    }

    pub(super) fn handle_connection_method(&mut self, method: Method) -> Result<(), AmqpError> {
        let Method::Other(AMQPClass::Connection(method)) = method else {
            return Err(AmqpError::hard(ReplyCode::CommandInvalid, "only connection methods may use channel 0", 0, 0));
        };
        use connection::AMQPMethod as M;
        match (self.phase, method) {
            (Phase::StartOk, M::StartOk(start_ok)) => {
                self.auth_failure_close =
                    client_capability(&start_ok.client_properties, "authentication_failure_close");
                self.outbox.set_cancel_notify(client_capability(&start_ok.client_properties, "consumer_cancel_notify"));
                self.blocked_capability = client_capability(&start_ok.client_properties, "connection.blocked");
                self.client_properties = start_ok.client_properties.clone();
                let mechanism = start_ok.mechanism.as_str().to_string();
                let (name, password) =
                    match auth::login(&mechanism, start_ok.response.as_bytes(), self.certificate.as_deref()) {
                        Ok(auth::Login::Password { user, password }) => (user, Some(password)),
                        Ok(auth::Login::Certificate { user }) => (user, None),
                        Err(AuthError::UnknownMechanism(m)) => {
                            return Err(AmqpError::hard(
                                ReplyCode::CommandInvalid,
                                format!("unknown authentication mechanism '{m}'"),
                                10,
                                11,
                            ))
                        }
                        Err(AuthError::Refused { .. }) => return self.login_refused(&mechanism, ""),
                    };
                let Some(user) = self.broker.access().user(&name) else {
                    return self.login_refused(&mechanism, &name);
                };
                if self.broker.config.loopback_only(&name) && !auth::is_loopback(self.peer.ip()) {
                    return self.login_refused(&mechanism, &name);
                }
                match password {
                    None => self.login_accepted(user),
                    Some(password) if self.broker.login_cached(&user, &password) => self.login_accepted(user),
                    // The KDF runs off this task; see `serve_stream`.
                    Some(password) => self.waiting = Some(Wait::Password { user, password, mechanism }),
                }
                Ok(())
            }
            (Phase::StartOk, M::SecureOk(_)) => {
                Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected connection.secure-ok", 10, 21))
            }
            (Phase::TuneOk, M::TuneOk(tune_ok)) => {
                let config = &self.broker.config;
                let frame_max = if tune_ok.frame_max == 0 { config.frame_max } else { tune_ok.frame_max };
                if frame_max < FRAME_MIN_SIZE {
                    return Err(AmqpError::hard(
                        ReplyCode::NotAllowed,
                        format!("frame_max={frame_max} < {FRAME_MIN_SIZE} min size"),
                        10,
                        31,
                    ));
                }
                if config.frame_max != 0 && frame_max > config.frame_max {
                    return Err(AmqpError::hard(
                        ReplyCode::NotAllowed,
                        format!("frame_max={frame_max} > {} max size", config.frame_max),
                        10,
                        31,
                    ));
                }
                self.channel_max = match (tune_ok.channel_max, config.channel_max) {
                    (0, server) => server,
                    (client, 0) => client,
                    (client, server) => client.min(server),
                };
                if self.channel_max == 0 {
                    self.channel_max = u16::MAX;
                }
                self.heartbeat_s = tune_ok.heartbeat;
                self.decoder = FrameDecoder::new(frame_max);
                self.outbox.set_frame_max(frame_max);
                self.phase = Phase::Open;
                Ok(())
            }
            (Phase::Open, M::Open(open)) => {
                let name = open.virtual_host.as_str();
                let Some(vhost) = self.broker.vhost(name) else {
                    return Err(AmqpError::hard(ReplyCode::NotAllowed, format!("vhost {name} not found"), 10, 40));
                };
                let Some(user) = self.account.clone() else {
                    return Err(AmqpError::hard(ReplyCode::InternalError, "no user", 10, 40));
                };
                // Read before the permissions, so a change in between is seen later.
                let generation = self.broker.access_generation();
                let Some(permissions) = self.broker.access().permissions(&user.name, name) else {
                    return Err(AmqpError::hard(
                        ReplyCode::NotAllowed,
                        format!("access to vhost '{name}' refused for user '{}'", user.name),
                        10,
                        40,
                    ));
                };
                let info = ConnectionInfo {
                    name: format!("{} -> {}", self.peer, self.local),
                    peer: self.peer,
                    local: self.local,
                    tls: self.tls,
                    client_properties: std::mem::take(&mut self.client_properties),
                    connected_at_ms: warren_core::SystemClock.now_ms(),
                    channel_max: self.channel_max,
                    frame_max: self.outbox.frame_max(),
                    heartbeat_s: self.heartbeat_s,
                };
                self.broker
                    .register(self.id, &user, name, self.outbox.clone(), info)
                    .map_err(|text| AmqpError::hard(ReplyCode::NotAllowed, text, 10, 40))?;
                self.registered = true;
                self.permissions.set(permissions, generation);
                self.vhost_name = name.to_string();
                let _ = self.outbox.vhost.set((vhost.clone(), self.store.clone()));
                self.vhost = Some(vhost);
                self.send(0, AMQPClass::Connection(M::OpenOk(connection::OpenOk {})));
                self.phase = Phase::Running;
                debug!(peer = %self.peer, user = %self.user, vhost = name, "connection open");
                Ok(())
            }
            (_, M::Close(close)) => {
                debug!(peer = %self.peer, code = close.reply_code, text = close.reply_text.as_str(), "client closed connection");
                self.answer_close();
                Ok(())
            }
            (Phase::Running, M::UpdateSecret(_)) => {
                // Password-based users: the new secret is accepted as is.
                self.send(0, AMQPClass::Connection(M::UpdateSecretOk(connection::UpdateSecretOk {})));
                Ok(())
            }
            (Phase::Running, M::Blocked(_) | M::Unblocked(_)) => Ok(()),
            (_, other) => Err(AmqpError::hard(
                ReplyCode::CommandInvalid,
                format!("unexpected method {other:?} in connection state {:?}", self.phase)
                    .chars()
                    .take(200)
                    .collect::<String>(),
                0,
                0,
            )),
        }
    }
}
