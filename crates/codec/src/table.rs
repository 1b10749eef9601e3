//! Field tables: a non-allocating validator for tables that pass through the
//! broker untouched, and conversions to `amq-protocol`'s `FieldTable` for the
//! few places that need to look inside (arguments, headers routing, CC/BCC).
//!
//! Type tags follow RabbitMQ's dialect (`s` is a signed 16-bit integer, `l`
//! and `L` are 64-bit), the one every 0-9-1 client speaks.

use amq_protocol::types::{AMQPValue, FieldTable};

/// Walks one field table (length prefix included) and returns its total
/// encoded length, or `None` if it is malformed.
pub fn validate_table(bytes: &[u8]) -> Option<usize> {
    validate_table_depth(bytes, 0)
}

const MAX_DEPTH: usize = 32;

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

fn validate_table_depth(bytes: &[u8], depth: usize) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    let len = read_u32(bytes, 0)?;
    let body = bytes.get(4..4usize.checked_add(len)?)?;
    let mut at = 0;
    while at < body.len() {
        let name_len = *body.get(at)? as usize;
        at += 1;
        body.get(at..at + name_len)?;
        at += name_len;
        at += value_len(body.get(at..)?, depth)?;
    }
    Some(4 + len)
}

/// Length of one tagged value (tag included).
fn value_len(bytes: &[u8], depth: usize) -> Option<usize> {
    let tag = *bytes.first()?;
    let rest = bytes.get(1..)?;
    let len = match tag {
        b't' | b'b' | b'B' => 1,
        b's' | b'u' | b'U' => 2,
        b'I' | b'i' | b'f' => 4,
        b'l' | b'L' | b'd' | b'T' => 8,
        b'D' => 5,
        b'V' => 0,
        b'S' | b'x' => 4usize.checked_add(read_u32(rest, 0)?)?,
        b'F' => validate_table_depth(rest, depth + 1)?,
        b'A' => {
            let array_len = read_u32(rest, 0)?;
            let items = rest.get(4..4usize.checked_add(array_len)?)?;
            let mut at = 0;
            while at < items.len() {
                at += value_len(items.get(at..)?, depth + 1)?;
            }
            4 + array_len
        }
        _ => return None,
    };
    rest.get(..len)?;
    Some(1 + len)
}

/// Parses a whole table (length prefix included) into a `FieldTable`.
pub fn parse_table(bytes: &[u8]) -> Option<FieldTable> {
    amq_protocol::types::parsing::parse_field_table(bytes).ok().map(|(_, table)| table)
}

/// Encodes a `FieldTable` (length prefix included).
pub fn encode_table(table: &FieldTable, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail; an error here would be a bug in the
    // generator, and the table is then simply left empty.
    let start = out.len();
    if cookie_factory::gen_simple(amq_protocol::types::generation::gen_field_table(table), std::mem::take(out))
        .map(|v| *out = v)
        .is_err()
    {
        out.truncate(start);
        out.extend_from_slice(&0u32.to_be_bytes());
    }
}

/// Looks a key up in a table, returning the value.
pub fn get<'a>(table: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    table.inner().iter().find(|(k, _)| k.as_str() == key).map(|(_, v)| v)
}

/// Reads an integer argument of any integer type, as RabbitMQ accepts them.
pub fn as_i64(value: &AMQPValue) -> Option<i64> {
    match *value {
        AMQPValue::ShortShortInt(v) => Some(v.into()),
        AMQPValue::ShortShortUInt(v) => Some(v.into()),
        AMQPValue::ShortInt(v) => Some(v.into()),
        AMQPValue::ShortUInt(v) => Some(v.into()),
        AMQPValue::LongInt(v) => Some(v.into()),
        AMQPValue::LongUInt(v) => Some(v.into()),
        AMQPValue::LongLongInt(v) => Some(v),
        AMQPValue::Timestamp(v) => i64::try_from(v).ok(),
        _ => None,
    }
}

/// Reads a string argument (long or short string, or byte array).
pub fn as_str(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{FieldArray, LongString, ShortString};
    use proptest::prelude::*;

    fn sample() -> FieldTable {
        let mut inner = FieldTable::default();
        inner.insert(ShortString::from("n"), AMQPValue::LongLongInt(-5));
        let mut table = FieldTable::default();
        table.insert(ShortString::from("bool"), AMQPValue::Boolean(true));
        table.insert(ShortString::from("i8"), AMQPValue::ShortShortInt(-1));
        table.insert(ShortString::from("u8"), AMQPValue::ShortShortUInt(1));
        table.insert(ShortString::from("i16"), AMQPValue::ShortInt(-2));
        table.insert(ShortString::from("u16"), AMQPValue::ShortUInt(2));
        table.insert(ShortString::from("i32"), AMQPValue::LongInt(-3));
        table.insert(ShortString::from("u32"), AMQPValue::LongUInt(3));
        table.insert(ShortString::from("i64"), AMQPValue::LongLongInt(-4));
        table.insert(ShortString::from("f32"), AMQPValue::Float(1.5));
        table.insert(ShortString::from("f64"), AMQPValue::Double(2.5));
        table.insert(ShortString::from("str"), AMQPValue::LongString(LongString::from("hello")));
        table.insert(ShortString::from("ts"), AMQPValue::Timestamp(1_700_000_000));
        table.insert(ShortString::from("void"), AMQPValue::Void);
        table.insert(
            ShortString::from("arr"),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::LongString(LongString::from("x")),
            ])),
        );
        table.insert(ShortString::from("tbl"), AMQPValue::FieldTable(inner));
        table
    }

    #[test]
    fn validator_accepts_every_field_type_and_measures_exactly() {
        let mut bytes = Vec::new();
        encode_table(&sample(), &mut bytes);
        assert_eq!(validate_table(&bytes), Some(bytes.len()));
        assert_eq!(parse_table(&bytes), Some(sample()));
    }

    #[test]
    fn validator_rejects_truncations_and_bad_tags() {
        let mut bytes = Vec::new();
        encode_table(&sample(), &mut bytes);
        for cut in 0..bytes.len() {
            // A shorter table with a consistent length prefix would be valid;
            // a truncated buffer with the original prefix never is.
            assert_eq!(validate_table(&bytes[..cut]), None, "cut at {cut}");
        }
        let bad = [0, 0, 0, 3, 1, b'k', b'?'];
        assert_eq!(validate_table(&bad), None);
    }

    proptest! {
        #[test]
        fn validator_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = validate_table(&bytes);
        }
    }
}
