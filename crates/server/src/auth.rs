//! SASL PLAIN and AMQPLAIN against the configured users.

use std::net::IpAddr;

use warren_codec::table;

use crate::config::User;

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

/// Constant-time comparison, so response timing does not leak a password.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn authenticate<'a>(
    users: &'a [User],
    mechanism: &str,
    response: &[u8],
    peer: IpAddr,
) -> Result<&'a User, AuthError> {
    if !MECHANISMS.split(' ').any(|m| m == mechanism) {
        return Err(AuthError::UnknownMechanism(mechanism.to_string()));
    }
    let refused = |user: &str| AuthError::Refused { mechanism: mechanism.to_string(), user: user.to_string() };
    let (name, password) = credentials(mechanism, response).ok_or_else(|| refused(""))?;
    let user = users.iter().find(|u| u.name == name).ok_or_else(|| refused(&name))?;
    if !same(user.password.as_bytes(), password.as_bytes()) {
        return Err(refused(&name));
    }
    if user.loopback_only && !peer.is_loopback() && !peer.to_canonical().is_loopback() {
        return Err(refused(&name));
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Vec<User> {
        vec![User { name: "guest".into(), password: "guest".into(), tags: vec![], loopback_only: true }]
    }

    #[test]
    fn plain_and_amqplain_with_loopback_rule() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(authenticate(&users(), "PLAIN", b"\0guest\0guest", local).is_ok());
        assert!(authenticate(&users(), "PLAIN", b"\0guest\0guest", "::1".parse().unwrap()).is_ok());
        assert!(matches!(authenticate(&users(), "PLAIN", b"\0guest\0guest", remote), Err(AuthError::Refused { .. })));
        assert!(matches!(authenticate(&users(), "PLAIN", b"\0guest\0nope", local), Err(AuthError::Refused { .. })));
        assert!(matches!(authenticate(&users(), "PLAIN", b"garbage", local), Err(AuthError::Refused { .. })));
        assert!(matches!(authenticate(&users(), "EXTERNAL", b"", local), Err(AuthError::UnknownMechanism(_))));
        let mut amqplain = Vec::new();
        for (k, v) in [("LOGIN", "guest"), ("PASSWORD", "guest")] {
            amqplain.push(k.len() as u8);
            amqplain.extend_from_slice(k.as_bytes());
            amqplain.push(b'S');
            amqplain.extend_from_slice(&(v.len() as u32).to_be_bytes());
            amqplain.extend_from_slice(v.as_bytes());
        }
        assert!(authenticate(&users(), "AMQPLAIN", &amqplain, local).is_ok());
    }
}
