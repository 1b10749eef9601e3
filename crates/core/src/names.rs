//! Server-generated names (`amq.gen-…` queues, `amq.ctag-…` consumer tags,
//! Direct Reply-To tokens). Unique, not secret: uniqueness comes from a
//! counter, the random part only keeps names from being guessable in order.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(1);

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.load(Ordering::Relaxed));
    hasher.finish()
}

/// `prefix` followed by 22 URL-safe characters, as RabbitMQ's names look.
pub fn generate(prefix: &str) -> String {
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut out = String::with_capacity(prefix.len() + 22);
    out.push_str(prefix);
    let mut bits = u128::from(random_u64()) << 64 | u128::from(counter);
    for _ in 0..22 {
        out.push(ALPHABET[(bits & 63) as usize] as char);
        bits >>= 6;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_names_are_unique_and_prefixed() {
        let a = super::generate("amq.gen-");
        let b = super::generate("amq.gen-");
        assert!(a.starts_with("amq.gen-") && a.len() == 30);
        assert_ne!(a, b);
    }
}
