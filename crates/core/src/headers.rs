//! Headers-exchange matching, as RabbitMQ defines it: `x-match` is `all`
//! (default), `any`, `all-with-x` or `any-with-x`; keys starting with `x-` take
//! part only in the `-with-x` forms; a binding value of type void matches any
//! message value under that key; other values must be equal in type and value.

use warren_codec::table;
use warren_codec::types::{AMQPValue, FieldTable};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchMode {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

impl MatchMode {
    /// Reads `x-match` from binding arguments; `Err` carries the bad value.
    pub fn from_arguments(arguments: &FieldTable) -> Result<MatchMode, String> {
        match table::get(arguments, "x-match") {
            None => Ok(MatchMode::All),
            Some(value) => match table::as_str(value) {
                Some("all") => Ok(MatchMode::All),
                Some("any") => Ok(MatchMode::Any),
                Some("all-with-x") => Ok(MatchMode::AllWithX),
                Some("any-with-x") => Ok(MatchMode::AnyWithX),
                other => Err(format!("{other:?}")),
            },
        }
    }
}

pub fn matches(mode: MatchMode, binding: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let with_x = matches!(mode, MatchMode::AllWithX | MatchMode::AnyWithX);
    let considered = binding
        .inner()
        .iter()
        .filter(|(key, _)| key.as_str() != "x-match" && (with_x || !key.as_str().starts_with("x-")));
    let value_matches = |key: &str, wanted: &AMQPValue| {
        let found = headers.and_then(|h| table::get(h, key));
        match (wanted, found) {
            (_, None) => false,
            (AMQPValue::Void, Some(_)) => true,
            (wanted, Some(found)) => wanted == found,
        }
    };
    match mode {
        MatchMode::All | MatchMode::AllWithX => considered.into_iter().all(|(k, v)| value_matches(k.as_str(), v)),
        MatchMode::Any | MatchMode::AnyWithX => considered.into_iter().any(|(k, v)| value_matches(k.as_str(), v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_codec::types::{LongString, ShortString};

    fn t(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in pairs {
            table.insert(ShortString::from(*k), v.clone());
        }
        table
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    #[test]
    fn all_any_and_with_x() {
        let headers = t(&[("format", s("pdf")), ("type", s("report")), ("x-tag", s("a"))]);
        let all = t(&[("x-match", s("all")), ("format", s("pdf")), ("type", s("report"))]);
        assert!(matches(MatchMode::from_arguments(&all).unwrap(), &all, Some(&headers)));
        let all_miss = t(&[("format", s("pdf")), ("type", s("log"))]);
        assert!(!matches(MatchMode::All, &all_miss, Some(&headers)));
        assert!(matches(MatchMode::Any, &all_miss, Some(&headers)));
        let x_only = t(&[("x-tag", s("a"))]);
        assert!(matches(MatchMode::All, &x_only, Some(&headers)), "x- keys are ignored by all");
        assert!(!matches(MatchMode::Any, &x_only, Some(&headers)), "any with no considered key matches nothing");
        assert!(matches(MatchMode::AnyWithX, &x_only, Some(&headers)));
        let void = t(&[("format", AMQPValue::Void)]);
        assert!(matches(MatchMode::All, &void, Some(&headers)));
        assert!(!matches(MatchMode::All, &void, None));
        let typed = t(&[("n", AMQPValue::LongInt(1))]);
        assert!(!matches(MatchMode::All, &typed, Some(&t(&[("n", AMQPValue::LongLongInt(1))]))));
        assert_eq!(MatchMode::from_arguments(&t(&[("x-match", s("bogus"))])), Err("Some(\"bogus\")".into()));
    }
}
