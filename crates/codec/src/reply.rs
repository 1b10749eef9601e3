//! AMQP reply codes and the one error type every protocol failure becomes.
//!
//! Reply texts are prefixed with the code's name (`NOT_FOUND - no queue 'q' in
//! vhost '/'`) exactly as RabbitMQ sends them, because some clients match on
//! the text.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ReplyCode {
    ContentTooLarge = 311,
    NoRoute = 312,
    NoConsumers = 313,
    ConnectionForced = 320,
    InvalidPath = 402,
    AccessRefused = 403,
    NotFound = 404,
    ResourceLocked = 405,
    PreconditionFailed = 406,
    FrameError = 501,
    SyntaxError = 502,
    CommandInvalid = 503,
    ChannelError = 504,
    UnexpectedFrame = 505,
    ResourceError = 506,
    NotAllowed = 530,
    NotImplemented = 540,
    InternalError = 541,
}

impl ReplyCode {
    pub fn name(self) -> &'static str {
        match self {
            ReplyCode::ContentTooLarge => "CONTENT_TOO_LARGE",
            ReplyCode::NoRoute => "NO_ROUTE",
            ReplyCode::NoConsumers => "NO_CONSUMERS",
            ReplyCode::ConnectionForced => "CONNECTION_FORCED",
            ReplyCode::InvalidPath => "INVALID_PATH",
            ReplyCode::AccessRefused => "ACCESS_REFUSED",
            ReplyCode::NotFound => "NOT_FOUND",
            ReplyCode::ResourceLocked => "RESOURCE_LOCKED",
            ReplyCode::PreconditionFailed => "PRECONDITION_FAILED",
            ReplyCode::FrameError => "FRAME_ERROR",
            ReplyCode::SyntaxError => "SYNTAX_ERROR",
            ReplyCode::CommandInvalid => "COMMAND_INVALID",
            ReplyCode::ChannelError => "CHANNEL_ERROR",
            ReplyCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            ReplyCode::ResourceError => "RESOURCE_ERROR",
            ReplyCode::NotAllowed => "NOT_ALLOWED",
            ReplyCode::NotImplemented => "NOT_IMPLEMENTED",
            ReplyCode::InternalError => "INTERNAL_ERROR",
        }
    }

    pub fn code(self) -> u16 {
        self as u16
    }
}

/// A protocol failure as the peer will see it: the reply code and text, the
/// method that caused it, and whether it closes the channel (soft) or the
/// whole connection (hard).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmqpError {
    pub code: ReplyCode,
    /// Full reply text, already prefixed with the code name.
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
    pub hard: bool,
}

impl AmqpError {
    fn new(code: ReplyCode, detail: impl fmt::Display, class_id: u16, method_id: u16, hard: bool) -> Self {
        let mut text = format!("{} - {}", code.name(), detail);
        // A reply text is a shortstr: keep it within 255 bytes on a char boundary.
        if text.len() > 255 {
            let mut end = 255;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        AmqpError { code, text, class_id, method_id, hard }
    }

    /// A channel-level error: the channel is closed, the connection lives on.
    pub fn soft(code: ReplyCode, detail: impl fmt::Display, class_id: u16, method_id: u16) -> Self {
        Self::new(code, detail, class_id, method_id, false)
    }

    /// A connection-level error: the whole connection is closed.
    pub fn hard(code: ReplyCode, detail: impl fmt::Display, class_id: u16, method_id: u16) -> Self {
        Self::new(code, detail, class_id, method_id, true)
    }

    /// The same error, attributed to a method (errors raised deep in the core
    /// do not know which method triggered them).
    pub fn at(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 && self.method_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.text, self.code.code())
    }
}

impl std::error::Error for AmqpError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_prefixed_with_code_name_and_bounded() {
        let e = AmqpError::soft(ReplyCode::NotFound, "no queue 'q' in vhost '/'", 50, 10);
        assert_eq!(e.text, "NOT_FOUND - no queue 'q' in vhost '/'");
        assert!(!e.hard);
        let long = AmqpError::hard(ReplyCode::FrameError, "é".repeat(300), 0, 0);
        assert!(long.text.len() <= 255);
        assert!(long.hard);
    }
}
