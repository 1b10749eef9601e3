//! Password hashes: Warren's own (Argon2id, a memory-hard KDF with a random
//! salt, stored as a PHC string) and RabbitMQ's salted SHA-256/512, which
//! are verified as they are so that users imported from a RabbitMQ
//! definitions file keep their passwords.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use rand_core::OsRng;
use sha2::{Digest, Sha256, Sha512};

/// The `hashing_algorithm` of hashes Warren writes.
pub const ARGON2ID: &str = "warren_argon2id";
pub const RABBIT_SHA256: &str = "rabbit_password_hashing_sha256";
pub const RABBIT_SHA512: &str = "rabbit_password_hashing_sha512";
/// The algorithms new passwords may be hashed with.
pub const ALGORITHMS: [&str; 3] = [ARGON2ID, RABBIT_SHA256, RABBIT_SHA512];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordError {
    #[error("unsupported password hashing algorithm '{0}'")]
    Algorithm(String),
    #[error("malformed password hash: {0}")]
    Malformed(String),
}

/// Checks that a stored hash can ever be verified (on import, not at login).
pub fn check(algorithm: &str, hash: &str) -> Result<(), PasswordError> {
    match algorithm {
        ARGON2ID => PasswordHash::new(hash).map(drop).map_err(|e| PasswordError::Malformed(e.to_string())),
        RABBIT_SHA256 | RABBIT_SHA512 => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(hash)
                .map_err(|e| PasswordError::Malformed(e.to_string()))?;
            let digest = if algorithm == RABBIT_SHA256 { 32 } else { 64 };
            if decoded.len() != 4 + digest {
                return Err(PasswordError::Malformed(format!("{} bytes, expected {}", decoded.len(), 4 + digest)));
            }
            Ok(())
        }
        // A user without a password (RabbitMQ: an empty hash) can only log
        // in by certificate.
        _ if hash.is_empty() => Ok(()),
        other => Err(PasswordError::Algorithm(other.to_string())),
    }
}

/// A new Argon2id hash of `password` with a random salt (RFC 9106 / OWASP
/// parameters: 19 MiB, two passes, one lane).
pub fn hash(password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Malformed(e.to_string()))
}

/// A new hash of `password` with `algorithm` (one of [`ALGORITHMS`]).
/// RabbitMQ's are its own format, a 4-byte random salt, so RabbitMQ can
/// verify what Warren exports.
pub fn hash_as(algorithm: &str, password: &str) -> Result<String, PasswordError> {
    match algorithm {
        ARGON2ID => hash(password),
        RABBIT_SHA256 => Ok(hash_rabbit::<Sha256>(password)),
        RABBIT_SHA512 => Ok(hash_rabbit::<Sha512>(password)),
        other => Err(PasswordError::Algorithm(other.to_string())),
    }
}

fn hash_rabbit<D: Digest>(password: &str) -> String {
    use rand_core::RngCore;
    let mut salt = [0u8; 4];
    OsRng.fill_bytes(&mut salt);
    let mut digest = D::new();
    digest.update(salt);
    digest.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&digest.finalize());
    base64::engine::general_purpose::STANDARD.encode(out)
}

/// Whether `password` matches the stored hash. Unknown algorithms and empty
/// hashes never match.
pub fn verify(algorithm: &str, hash: &str, password: &str) -> bool {
    if hash.is_empty() {
        return false;
    }
    match algorithm {
        ARGON2ID => PasswordHash::new(hash)
            .is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()),
        RABBIT_SHA256 => verify_rabbit::<Sha256>(hash, password),
        RABBIT_SHA512 => verify_rabbit::<Sha512>(hash, password),
        _ => false,
    }
}

/// RabbitMQ's format: base64(salt(4) ++ H(salt ++ password)).
fn verify_rabbit<D: Digest>(hash: &str, password: &str) -> bool {
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(hash) else {
        return false;
    };
    if decoded.len() < 4 {
        return false;
    }
    let (salt, expected) = decoded.split_at(4);
    let mut digest = D::new();
    digest.update(salt);
    digest.update(password.as_bytes());
    same(&digest.finalize(), expected)
}

/// Constant-time comparison, so response timing does not leak a digest.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A keyed digest of a password that proved right, so a repeated login
/// skips the slow KDF. The key is random per process, so the digests mean
/// nothing outside it.
pub struct LoginCache {
    key: [u8; 32],
}

impl LoginCache {
    pub fn new() -> LoginCache {
        let mut key = [0u8; 32];
        let salt = SaltString::generate(&mut OsRng);
        let digest = Sha256::digest(salt.as_str().as_bytes());
        key.copy_from_slice(&digest);
        LoginCache { key }
    }

    /// The digest remembered for (user, stored hash, password): a changed
    /// hash gives a different digest, so a password change is never served
    /// from the cache.
    pub fn digest(&self, user: &str, stored_hash: &str, password: &str) -> [u8; 32] {
        let mut d = Sha256::new();
        d.update(self.key);
        for part in [user, stored_hash, password] {
            d.update((part.len() as u64).to_be_bytes());
            d.update(part.as_bytes());
        }
        d.finalize().into()
    }
}

impl Default for LoginCache {
    fn default() -> Self {
        LoginCache::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_round_trip_with_random_salt() {
        let a = hash("s3cret").unwrap();
        let b = hash("s3cret").unwrap();
        assert_ne!(a, b, "salts differ");
        assert!(a.starts_with("$argon2id$"));
        assert!(verify(ARGON2ID, &a, "s3cret"));
        for algorithm in ALGORITHMS {
            let h = hash_as(algorithm, "pw").unwrap();
            assert!(check(algorithm, &h).is_ok() && verify(algorithm, &h, "pw") && !verify(algorithm, &h, "pW"));
        }
        assert!(!verify(ARGON2ID, &a, "s3cret "));
        assert!(check(ARGON2ID, &a).is_ok());
    }

    #[test]
    fn rabbitmq_sha256_hashes_verify() {
        // Built as RabbitMQ builds them: salt 0x908DC60A, password "test12".
        let salt = [0x90u8, 0x8d, 0xc6, 0x0a];
        let mut raw = salt.to_vec();
        let mut d = Sha256::new();
        d.update(salt);
        d.update(b"test12");
        raw.extend_from_slice(&d.finalize());
        let stored = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert!(check(RABBIT_SHA256, &stored).is_ok());
        assert!(verify(RABBIT_SHA256, &stored, "test12"));
        assert!(!verify(RABBIT_SHA256, &stored, "test13"));
        assert!(!verify(RABBIT_SHA512, &stored, "test12"));
        assert!(check(RABBIT_SHA512, &stored).is_err());
        assert!(!verify("rabbit_password_hashing_md5", &stored, "test12"));
        assert!(check("rabbit_password_hashing_md5", &stored).is_err());
        assert!(!verify(RABBIT_SHA256, "", ""));
    }

    #[test]
    fn login_cache_digest_depends_on_every_part() {
        let cache = LoginCache::new();
        let base = cache.digest("u", "h", "p");
        assert_eq!(base, cache.digest("u", "h", "p"));
        assert_ne!(base, cache.digest("u", "h2", "p"));
        assert_ne!(base, cache.digest("u", "h", "p2"));
        assert_ne!(cache.digest("ab", "c", "p"), cache.digest("a", "bc", "p"));
        assert_ne!(base, LoginCache::new().digest("u", "h", "p"));
    }
}
