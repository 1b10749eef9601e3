//! Content assembly (`basic.publish`, its header and body frames) and
//! routing the complete message.

use std::sync::Arc;

use bytes::Bytes;
use warren_codec::encode;
use warren_codec::frame::{Frame, FrameKind};
use warren_codec::method::{self, BasicPublish};
use warren_codec::properties::{flag, Properties};
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_core::message::MessageBuilder;
use warren_core::vhost::REPLY_TO_QUEUE;
use warren_core::Message;

use super::confirms::Pending;
use super::methods::TxOp;
use super::Connection;
use crate::broker::Counters;
use crate::session::Session;
use crate::store::Appended;

pub(super) struct Content {
    /// Validated UTF-8; a slice of the method frame, not a copy.
    exchange: Bytes,
    routing_key: Bytes,
    mandatory: bool,
    builder: Option<MessageBuilder>,
}

pub(super) fn str_of(bytes: &[u8]) -> Result<&str, AmqpError> {
    std::str::from_utf8(bytes)
        .map_err(|_| AmqpError::hard(ReplyCode::SyntaxError, "short string is not valid UTF-8", 0, 0))
}

/// CC and BCC header routing keys (sender-selected distribution); BCC is
/// removed from the message the queues receive.
pub(super) fn sender_selected(message: Message) -> (Message, Vec<Vec<u8>>) {
    let properties = message.properties_view();
    let selected = properties.sender_selected();
    if selected.is_empty() {
        return (message, Vec::new());
    }
    let rewritten = properties.without_header("BCC");
    let mut keys = selected.cc;
    keys.extend(selected.bcc);
    match rewritten {
        Some(rewritten) => (message.with_properties(&rewritten), keys),
        None => (message, keys),
    }
}

impl Connection {
    pub(super) fn start_publish(&mut self, number: u16, publish: BasicPublish) -> Result<(), AmqpError> {
        if publish.immediate {
            return Err(AmqpError::hard(ReplyCode::NotImplemented, "immediate=true", 60, 40));
        }
        str_of(&publish.exchange)?;
        self.publisher = true;
        let exchange = publish.exchange;
        if let Some(ch) = self.channels.get_mut(&number) {
            ch.content = Some(Content {
                exchange,
                routing_key: publish.routing_key,
                mandatory: publish.mandatory,
                builder: None,
            });
        }
        Ok(())
    }

    pub(super) fn handle_content(
        &mut self,
        number: u16,
        frame: Frame,
        state: Option<&mut Session<'_>>,
    ) -> Result<(), AmqpError> {
        let max_message_size = self.broker.config.max_message_size;
        let key = self.key(number);
        let unexpected = |text: &str| AmqpError::hard(ReplyCode::UnexpectedFrame, text, 60, 40);
        let Some(content) = self.channels.get_mut(&number).and_then(|c| c.content.as_mut()) else {
            return Err(unexpected("expected method frame, got non method frame instead"));
        };
        match (frame.kind, content.builder.is_some()) {
            (FrameKind::Header, false) => {
                let payload = &frame.payload;
                if payload.len() < 14 {
                    return Err(AmqpError::hard(ReplyCode::FrameError, "content header frame too short", 60, 40));
                }
                let class_id = u16::from_be_bytes([payload[0], payload[1]]);
                if class_id != method::CLASS_BASIC {
                    return Err(AmqpError::hard(
                        ReplyCode::FrameError,
                        format!("content header for unknown class {class_id}"),
                        60,
                        40,
                    ));
                }
                let mut size_bytes = [0u8; 8];
                size_bytes.copy_from_slice(&payload[4..12]);
                let body_size = u64::from_be_bytes(size_bytes);
                let Some(mut properties) = Properties::parse(payload.slice(12..)) else {
                    return Err(AmqpError::hard(ReplyCode::FrameError, "malformed content header properties", 60, 40));
                };
                if body_size > max_message_size {
                    let error = AmqpError::soft(
                        ReplyCode::PreconditionFailed,
                        format!("message size {body_size} is larger than configured max size {max_message_size}"),
                        60,
                        40,
                    );
                    self.channel_error(number, error, state);
                    return Ok(());
                }
                if properties.flags() & flag::USER_ID != 0 {
                    if let Some(claimed) = properties.user_id().filter(|claimed| *claimed != self.user) {
                        let error = AmqpError::soft(
                            ReplyCode::PreconditionFailed,
                            format!("user_id property set to '{claimed}' but authenticated user was '{}'", self.user),
                            60,
                            40,
                        );
                        self.channel_error(number, error, state);
                        return Ok(());
                    }
                }
                if let Some(Err(problem)) = properties.expiration().map(warren_core::message::parse_expiration) {
                    let text =
                        format!("invalid expiration '{}': {problem}", properties.expiration().unwrap_or_default());
                    let error = AmqpError::soft(ReplyCode::PreconditionFailed, text, 60, 40);
                    self.channel_error(number, error, state);
                    return Ok(());
                }
                if properties.reply_to() == Some(REPLY_TO_QUEUE) {
                    match state.as_deref().and_then(|s| s.reply_to_address(key)) {
                        Some(address) => properties = properties.with_reply_to(&address),
                        None => {
                            let error = AmqpError::soft(
                                ReplyCode::PreconditionFailed,
                                "fast reply consumer does not exist",
                                60,
                                40,
                            );
                            self.channel_error(number, error, state);
                            return Ok(());
                        }
                    }
                }
                // At most max_message_size (checked above), so it fits.
                let body_size = usize::try_from(body_size).unwrap_or(0);
                let builder = Message::builder(&content.exchange, &content.routing_key, &properties, body_size);
                content.builder = Some(builder);
            }
            (FrameKind::Body, true) => {
                if let Some(builder) = content.builder.as_mut() {
                    if !builder.push_body(&frame.payload) {
                        return Err(AmqpError::hard(
                            ReplyCode::FrameError,
                            "content body exceeds the size declared in its header",
                            60,
                            40,
                        ));
                    }
                }
            }
            (FrameKind::Header, true) => return Err(unexpected("expected content body, got content header instead")),
            _ => return Err(unexpected("expected content header for class 60, got non content header frame instead")),
        }
        if !content.builder.as_ref().is_some_and(MessageBuilder::is_complete) {
            return Ok(());
        }
        let Some(ch) = self.channels.get_mut(&number) else {
            return Ok(());
        };
        let Some(Content { exchange, mandatory, builder: Some(builder), .. }) = ch.content.take() else {
            return Ok(());
        };
        let in_tx = ch.tx.is_some();
        let (message, extra_keys) = sender_selected(builder.finish());
        let Some(state) = state else {
            return Ok(());
        };
        let exchange_name = str_of(&exchange)?;
        if in_tx {
            if let Err(error) = state.check_publish(exchange_name) {
                self.channel_error(number, error.at(60, 40), Some(state));
                return Ok(());
            }
            if let Some(ops) = self.channels.get_mut(&number).and_then(|c| c.tx.as_mut()) {
                ops.push(TxOp::Publish { exchange, message, mandatory, extra_keys });
            }
            return Ok(());
        }
        match self.route(number, exchange_name, Arc::new(message), mandatory, &extra_keys, state) {
            Ok(_) => Ok(()),
            Err(error) if error.hard => Err(error),
            Err(error) => {
                self.channel_error(number, error.at(60, 40), Some(state));
                Ok(())
            }
        }
    }

    /// Routes a complete message; sends `basic.return` when mandatory and
    /// unroutable; counts it for publisher confirms. Returns the log index
    /// its persistence waits for and the ticket of what quorum queues or
    /// streams must commit, if any (`Err` if the store refused it).
    pub(super) fn route(
        &mut self,
        number: u16,
        exchange: &str,
        message: Arc<Message>,
        mandatory: bool,
        extra_keys: &[Vec<u8>],
        state: &mut Session<'_>,
    ) -> Result<Result<WaitsFor, ()>, AmqpError> {
        let seq = self.channels.get_mut(&number).and_then(|ch| ch.confirms.publish());
        if seq.is_some() {
            Counters::add(&self.broker.counters.received_confirm, 1);
            self.outbox.add_unconfirmed(1);
        }
        let routed = state.publish(exchange, message.clone(), extra_keys)?;
        let stored = state.flush_indices();
        let waits_for = match &stored {
            Ok(appended) => Ok((appended.published, appended.replicated)),
            Err(_) if message.persistent => Err(()),
            Err(_) => Ok((None, None)),
        };
        if let (Some(seq), Some(ch)) = (seq, self.channels.get_mut(&number)) {
            match stored {
                // A queue at its length limit refused it (reject-publish).
                _ if routed.rejected => ch.confirms.wait(seq, Pending::Refused),
                Ok(Appended { published, replicated, .. }) if published.is_some() || replicated.is_some() => {
                    let (index, ticket) = (published.unwrap_or(0), replicated.unwrap_or(0));
                    ch.confirms.wait(seq, Pending::Stored { index, ticket })
                }
                Err(_) if message.persistent => ch.confirms.wait(seq, Pending::Refused),
                _ => {}
            }
        }
        if routed.queues == 0 && mandatory {
            Counters::add(&self.broker.counters.returned_unroutable, 1);
            let frame_max = self.outbox.frame_max();
            self.outbox.write(|buf| {
                encode::basic_return(
                    buf,
                    number,
                    ReplyCode::NoRoute.code(),
                    "NO_ROUTE",
                    message.exchange(),
                    message.routing_key(),
                );
                encode::content(buf, number, message.properties(), message.body(), frame_max);
            });
        }
        Ok(waits_for)
    }
}

/// What a routed message's persistence waits for: a log index, and a ticket
/// (`store::tickets`).
pub(super) type WaitsFor = (Option<u64>, Option<u64>);
