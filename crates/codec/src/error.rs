//! Codec errors. Each maps to the AMQP reply code a RabbitMQ client expects.

use crate::reply::{AmqpError, ReplyCode};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("frame of type {0} is not a valid frame type")]
    UnknownFrameType(u8),
    #[error("frame size {size} exceeds negotiated frame_max {frame_max}")]
    FrameTooLarge { size: u32, frame_max: u32 },
    #[error("frame end byte was {0:#04x}, expected 0xce")]
    BadFrameEnd(u8),
    #[error("unknown method {class_id}/{method_id}")]
    UnknownMethod { class_id: u16, method_id: u16 },
    #[error("malformed {what}")]
    Malformed { what: &'static str, class_id: u16, method_id: u16 },
}

impl CodecError {
    /// The connection-level error RabbitMQ raises for this decoding failure.
    pub fn to_amqp(&self) -> AmqpError {
        match self {
            CodecError::UnknownFrameType(_) | CodecError::FrameTooLarge { .. } | CodecError::BadFrameEnd(_) => {
                AmqpError::hard(ReplyCode::FrameError, self.to_string(), 0, 0)
            }
            CodecError::UnknownMethod { class_id, method_id } => AmqpError::hard(
                ReplyCode::CommandInvalid,
                format!("unknown method {class_id}/{method_id}"),
                *class_id,
                *method_id,
            ),
            CodecError::Malformed { what, class_id, method_id } => {
                AmqpError::hard(ReplyCode::SyntaxError, format!("malformed {what}"), *class_id, *method_id)
            }
        }
    }
}
