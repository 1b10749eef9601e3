//! Policies: settings applied by name pattern to queues and exchanges, the
//! way RabbitMQ's policies are. A queue takes the highest-priority policy
//! whose pattern matches its name; where its own `x-` argument sets the same
//! thing, RabbitMQ's precedence decides: the smaller value for limits and
//! TTLs, the argument for everything else.

use warren_codec::table;
use warren_codec::types::{FieldTable, ShortString};

use crate::settings::QueueSettings;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyTo {
    Queues,
    Exchanges,
    All,
}

impl ApplyTo {
    pub fn parse(value: &str) -> Option<ApplyTo> {
        match value {
            "queues" => Some(ApplyTo::Queues),
            "exchanges" => Some(ApplyTo::Exchanges),
            "all" => Some(ApplyTo::All),
            _ => None,
        }
    }
}

/// Keys a policy may set on queues (RabbitMQ's names, without `x-`).
const QUEUE_KEYS: &[&str] = &[
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "overflow",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "delivery-limit",
    "consumer-timeout",
    "retry-delay",
    "retry-multiplier",
    "retry-max-delay",
    "retry-jitter",
];

/// Keys where the smaller of policy and argument wins.
const LOWEST_WINS: &[&str] =
    &["message-ttl", "expires", "max-length", "max-length-bytes", "delivery-limit", "consumer-timeout"];

/// Keys a policy may set on exchanges.
const EXCHANGE_KEYS: &[&str] = &["alternate-exchange"];

/// RabbitMQ's keys for features Warren does not have (classic mirroring,
/// lazy mode, federation, stream retention...): accepted and kept, so that
/// RabbitMQ's exports and tooling apply, but they change nothing.
pub const IGNORED_KEYS: &[&str] = &[
    "ha-mode",
    "ha-params",
    "ha-sync-mode",
    "ha-sync-batch-size",
    "ha-promote-on-shutdown",
    "ha-promote-on-failure",
    "queue-mode",
    "queue-version",
    "queue-master-locator",
    "queue-leader-locator",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "initial-cluster-size",
    "max-age",
    "stream-max-segment-size-bytes",
    "federation-upstream",
    "federation-upstream-set",
    "federation-upstream-pattern",
];

#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pattern: regex::Regex,
    pub apply_to: ApplyTo,
    pub priority: i64,
    /// RabbitMQ's keys (`max-length`, `dead-letter-exchange`, ...).
    pub definition: FieldTable,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("policy '{0}': invalid pattern: {1}")]
    Pattern(String, String),
    #[error("policy '{0}': unknown key '{1}'")]
    UnknownKey(String, String),
    #[error("policy '{0}': invalid value for '{1}': {2}")]
    Value(String, String, String),
}

impl Policy {
    pub fn new(
        name: &str,
        pattern: &str,
        apply_to: ApplyTo,
        priority: i64,
        definition: FieldTable,
    ) -> Result<Policy, PolicyError> {
        let pattern =
            regex::Regex::new(pattern).map_err(|error| PolicyError::Pattern(name.into(), error.to_string()))?;
        for key in definition.inner().keys() {
            let key = key.as_str();
            if !QUEUE_KEYS.contains(&key) && !EXCHANGE_KEYS.contains(&key) && !IGNORED_KEYS.contains(&key) {
                return Err(PolicyError::UnknownKey(name.into(), key.into()));
            }
        }
        // The queue keys must make valid queue settings on their own.
        let as_arguments = merge(&FieldTable::default(), &definition);
        QueueSettings::from_arguments(&as_arguments)
            .map_err(|(key, problem)| PolicyError::Value(name.into(), key.trim_start_matches("x-").into(), problem))?;
        Ok(Policy { name: name.into(), pattern, apply_to, priority, definition })
    }

    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    fn applies(&self, name: &str, to_queue: bool) -> bool {
        let kind = match self.apply_to {
            ApplyTo::All => true,
            ApplyTo::Queues => to_queue,
            ApplyTo::Exchanges => !to_queue,
        };
        kind && self.pattern.is_match(name)
    }
}

/// The policy in effect for a queue or exchange: the highest priority among
/// those that match (the first listed on a tie).
pub fn effective<'a>(policies: &'a [Policy], name: &str, to_queue: bool) -> Option<&'a Policy> {
    policies.iter().filter(|p| p.applies(name, to_queue)).fold(None, |best: Option<&Policy>, p| match best {
        Some(b) if b.priority >= p.priority => Some(b),
        _ => Some(p),
    })
}

/// Queue arguments with a policy's definition folded in, by RabbitMQ's
/// precedence.
pub fn merge(arguments: &FieldTable, definition: &FieldTable) -> FieldTable {
    let mut merged = arguments.clone();
    for (key, value) in definition.inner() {
        let key = key.as_str();
        if !QUEUE_KEYS.contains(&key) {
            continue;
        }
        let x_key = format!("x-{key}");
        let chosen = match table::get(arguments, &x_key) {
            None => value.clone(),
            Some(own) if LOWEST_WINS.contains(&key) => match (table::as_i64(own), table::as_i64(value)) {
                (Some(a), Some(b)) if b < a => value.clone(),
                _ => own.clone(),
            },
            Some(own) => own.clone(),
        };
        merged.insert(ShortString::from(x_key), chosen);
    }
    merged
}

/// An exchange's alternate exchange from its arguments, else its policy.
pub fn alternate_exchange(arguments: &FieldTable, policy: Option<&Policy>) -> Option<String> {
    let from = |t: &FieldTable| table::get(t, "alternate-exchange").and_then(table::as_str).map(str::to_string);
    from(arguments).or_else(|| policy.and_then(|p| from(&p.definition)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::table;
    use warren_codec::types::{AMQPValue, LongString};

    #[test]
    fn highest_priority_matching_policy_applies_with_rabbitmq_precedence() {
        let low =
            Policy::new("low", ".*", ApplyTo::All, 0, table(&[("max-length", AMQPValue::LongLongInt(5))])).unwrap();
        let high = Policy::new(
            "jobs",
            "^jobs\\.",
            ApplyTo::Queues,
            10,
            table(&[
                ("max-length", AMQPValue::LongLongInt(100)),
                ("dead-letter-exchange", AMQPValue::LongString(LongString::from("policy-dlx"))),
            ]),
        )
        .unwrap();
        let policies = vec![low, high];
        assert_eq!(effective(&policies, "jobs.email", true).map(|p| p.name.as_str()), Some("jobs"));
        assert_eq!(effective(&policies, "other", true).map(|p| p.name.as_str()), Some("low"));
        assert_eq!(effective(&policies, "jobs.email", false).map(|p| p.name.as_str()), Some("low"));

        let own = table(&[
            ("x-max-length", AMQPValue::LongLongInt(50)),
            ("x-dead-letter-exchange", AMQPValue::LongString(LongString::from("own-dlx"))),
        ]);
        let settings = QueueSettings::from_arguments(&merge(&own, &policies[1].definition)).unwrap();
        assert_eq!(settings.max_length, Some(50), "the smaller limit wins");
        assert_eq!(settings.dead_letter_exchange.as_deref(), Some("own-dlx"), "the argument wins");
        let settings = QueueSettings::from_arguments(&merge(&FieldTable::default(), &policies[1].definition)).unwrap();
        assert_eq!(settings.max_length, Some(100));
        assert_eq!(settings.dead_letter_exchange.as_deref(), Some("policy-dlx"));
    }

    #[test]
    fn bad_policies_are_refused() {
        assert!(matches!(Policy::new("p", "(", ApplyTo::All, 0, FieldTable::default()), Err(PolicyError::Pattern(..))));
        assert!(matches!(
            Policy::new("p", ".", ApplyTo::All, 0, table(&[("max-lenght", AMQPValue::LongLongInt(1))])),
            Err(PolicyError::UnknownKey(..))
        ));
        assert!(matches!(
            Policy::new("p", ".", ApplyTo::All, 0, table(&[("max-length", AMQPValue::LongLongInt(-1))])),
            Err(PolicyError::Value(..))
        ));
    }

    #[test]
    fn rabbitmq_keys_without_a_warren_feature_are_kept_but_change_nothing() {
        let mirrored = table(&[("ha-mode", AMQPValue::LongString(LongString::from("all")))]);
        let policy = Policy::new("ha", ".", ApplyTo::Queues, 0, mirrored).unwrap();
        assert_eq!(merge(&FieldTable::default(), &policy.definition).inner().len(), 0);
    }
}
