//! AMQP field tables as the management API's JSON, both ways (queue and
//! exchange arguments, binding arguments, message headers).

use serde_json::{Map, Number, Value};
use warren_codec::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

/// A field table serialized as a JSON object straight from the table (no
/// intermediate `Value`): for long listings.
pub struct TableJson<'a>(pub &'a FieldTable);

impl serde::Serialize for TableJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.inner().len()))?;
        for (key, value) in self.0.inner() {
            map.serialize_entry(key.as_str(), &ValueJson(value))?;
        }
        map.end()
    }
}

struct ValueJson<'a>(&'a AMQPValue);

impl serde::Serialize for ValueJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            AMQPValue::FieldTable(table) => TableJson(table).serialize(serializer),
            AMQPValue::FieldArray(array) => serializer.collect_seq(array.as_slice().iter().map(ValueJson)),
            other => value_to_json(other).serialize(serializer),
        }
    }
}

pub fn table_to_json(table: &FieldTable) -> Value {
    let mut map = Map::new();
    for (key, value) in table.inner() {
        map.insert(key.as_str().to_string(), value_to_json(value));
    }
    Value::Object(map)
}

fn value_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => Value::from(d.value),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ByteArray(bytes) => Value::String(String::from_utf8_lossy(bytes.as_slice()).into_owned()),
        AMQPValue::FieldArray(array) => Value::Array(array.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::FieldTable(table) => table_to_json(table),
        AMQPValue::Void => Value::Null,
    }
}

/// A JSON object as a field table; `None` for something that is not an
/// object (or `null`, an empty table).
pub fn json_to_table(value: &Value) -> Option<FieldTable> {
    let mut table = FieldTable::default();
    match value {
        Value::Null => {}
        Value::Object(map) => {
            for (key, value) in map {
                table.insert(ShortString::from(key.as_str()), json_to_value(value));
            }
        }
        _ => return None,
    }
    Some(table)
}

fn json_to_value(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::Void,
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => {
            AMQPValue::FieldArray(FieldArray::from(items.iter().map(json_to_value).collect::<Vec<_>>()))
        }
        Value::Object(_) => AMQPValue::FieldTable(json_to_table(value).unwrap_or_default()),
    }
}

/// A boolean the classic Python `rabbitmqadmin` may send as a string.
pub fn flag(value: Option<&Value>) -> Option<bool> {
    match value? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// A count the classic Python `rabbitmqadmin` may send as a string.
pub fn count(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A signed integer sent as a number or as a string of digits (the classic
/// `rabbitmqadmin` sends strings).
pub fn integer(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A request body parsed as JSON whatever its `Content-Type` says, as
/// RabbitMQ's API does (`curl -d` sends a form type); an empty body is `{}`.
/// Anything else that is not JSON is refused with RabbitMQ's `not_json`.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> axum::extract::FromRequest<S> for JsonBody {
    type Rejection = axum::response::Response;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<JsonBody, Self::Rejection> {
        use axum::response::IntoResponse;
        // Announced over the limit: refused before a byte of it is read.
        let announced = request.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
        if announced.and_then(|v| v.parse::<usize>().ok()).is_some_and(|n| n > crate::BODY_LIMIT_BYTES) {
            let reason = format!("the request body is larger than {} bytes", crate::BODY_LIMIT_BYTES);
            let body = serde_json::json!({"error": "bad_request", "reason": reason});
            return Err((axum::http::StatusCode::PAYLOAD_TOO_LARGE, axum::Json(body)).into_response());
        }
        // Over the limit without saying so: the extractor's own 413.
        let bytes = axum::body::Bytes::from_request(request, state).await.map_err(IntoResponse::into_response)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(Value::Object(Map::new())));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|_| crate::error::ApiError::BadRequest("not_json".into()).into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_through_json() {
        let json = serde_json::json!({"x-max-length": 10, "x-overflow": "reject-publish", "flag": true,
            "nested": {"a": [1, "b"]}, "ratio": 0.5});
        let table = json_to_table(&json).unwrap();
        assert_eq!(table_to_json(&table), json);
        assert!(json_to_table(&serde_json::json!([1])).is_none());
    }

    #[test]
    fn strings_stand_for_booleans_and_counts() {
        assert_eq!(flag(Some(&serde_json::json!("true"))), Some(true));
        assert_eq!(flag(Some(&serde_json::json!(false))), Some(false));
        assert_eq!(flag(Some(&serde_json::json!("yes"))), None);
        assert_eq!(count(Some(&serde_json::json!("12"))), Some(12));
        assert_eq!(count(Some(&serde_json::json!(3))), Some(3));
    }
}
