//! AMQP 0-9-1 wire format for Warren: frame splitting, method decoding and
//! encoding, content-header property views, and reply codes.
//!
//! No I/O and no runtime: callers hand in bytes and get typed frames back, or
//! hand in values and get bytes appended to a buffer. Method argument codecs
//! for the long tail of methods come from the `amq-protocol` crate (the codec
//! lapin uses); the few methods on the per-message path (`basic.publish`,
//! `basic.deliver`, `basic.ack`, content headers and bodies) are decoded and
//! encoded here by hand so that they neither allocate nor reorder anything:
//! content-header property bytes pass from publisher to consumer untouched.

pub mod encode;
pub mod error;
pub mod frame;
pub mod method;
pub mod properties;
pub mod reply;
pub mod table;

pub use amq_protocol::protocol as spec;
pub use amq_protocol::types;
pub use error::CodecError;
pub use frame::{Frame, FrameDecoder, FrameKind};
pub use method::Method;
pub use properties::Properties;
pub use reply::{AmqpError, ReplyCode};

/// The protocol header a 0-9-1 client sends first, and the one a server
/// answers with when it sees anything else.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
