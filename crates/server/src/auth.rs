//! SASL PLAIN and AMQPLAIN: reading the credentials a client sends.
//! Checking them against users is `access` and `password`'s business.

use std::net::IpAddr;

use warren_codec::table;

#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// The mechanism is not one we offer (a connection error, 503).
    UnknownMechanism(String),
    /// Bad credentials, unknown user, or a loopback-only user from afar.
    Refused { mechanism: String, user: String },
}

pub const MECHANISMS: &str = "PLAIN AMQPLAIN";

/// Extracts (user, password) from a SASL response.
fn credentials(mechanism: &str, response: &[u8]) -> Option<(String, String)> {
    match mechanism {
        "PLAIN" => {
            // authzid \0 authcid \0 password
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = parts.next()?;
            let password = parts.next()?;
            if parts.next().is_some() {
                return None;
            }
            Some((String::from_utf8(user.to_vec()).ok()?, String::from_utf8(password.to_vec()).ok()?))
        }
        "AMQPLAIN" => {
            // A field table without its length prefix.
            let mut framed = (response.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(response);
            let parsed = table::parse_table(&framed)?;
            let user = table::as_str(table::get(&parsed, "LOGIN")?)?.to_string();
            let password = table::as_str(table::get(&parsed, "PASSWORD")?)?.to_string();
            Some((user, password))
        }
        _ => None,
    }
}

/// The (user, password) a SASL response carries, or why it is refused.
pub fn login(mechanism: &str, response: &[u8]) -> Result<(String, String), AuthError> {
    if !MECHANISMS.split(' ').any(|m| m == mechanism) {
        return Err(AuthError::UnknownMechanism(mechanism.to_string()));
    }
    credentials(mechanism, response)
        .ok_or_else(|| AuthError::Refused { mechanism: mechanism.to_string(), user: String::new() })
}

/// Whether a peer counts as loopback (IPv4-mapped IPv6 included).
pub fn is_loopback(peer: IpAddr) -> bool {
    peer.is_loopback() || peer.to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_amqplain_credentials() {
        assert_eq!(login("PLAIN", b"\0guest\0pw").unwrap(), ("guest".to_string(), "pw".to_string()));
        assert!(matches!(login("PLAIN", b"garbage"), Err(AuthError::Refused { .. })));
        assert!(matches!(login("PLAIN", b"\0a\0b\0c"), Err(AuthError::Refused { .. })));
        assert!(matches!(login("EXTERNAL", b""), Err(AuthError::UnknownMechanism(_))));
        let mut amqplain = Vec::new();
        for (k, v) in [("LOGIN", "guest"), ("PASSWORD", "guest")] {
            amqplain.push(k.len() as u8);
            amqplain.extend_from_slice(k.as_bytes());
            amqplain.push(b'S');
            amqplain.extend_from_slice(&(v.len() as u32).to_be_bytes());
            amqplain.extend_from_slice(v.as_bytes());
        }
        assert_eq!(login("AMQPLAIN", &amqplain).unwrap(), ("guest".to_string(), "guest".to_string()));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(!is_loopback("10.1.2.3".parse().unwrap()));
    }
}
