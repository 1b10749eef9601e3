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
            // The response came in one frame: its length fits a u32.
            let mut framed = u32::try_from(response.len()).unwrap_or(u32::MAX).to_be_bytes().to_vec();
            framed.extend_from_slice(response);
            let parsed = table::parse_table(&framed)?;
            let user = table::as_str(table::get(&parsed, "LOGIN")?)?.to_string();
            let password = table::as_str(table::get(&parsed, "PASSWORD")?)?.to_string();
            Some((user, password))
        }
        _ => None,
    }
}

/// Mechanisms offered on a connection with a verified client certificate.
pub const MECHANISMS_WITH_CERTIFICATE: &str = "PLAIN AMQPLAIN EXTERNAL";

/// How a login is to be checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Login {
    Password {
        user: String,
        password: String,
    },
    /// EXTERNAL: the client certificate's common name, already verified.
    Certificate {
        user: String,
    },
}

/// What a SASL response asks for, or why it is refused. `certificate` is
/// the verified client certificate's common name, if any.
pub fn login(mechanism: &str, response: &[u8], certificate: Option<&str>) -> Result<Login, AuthError> {
    if mechanism == "EXTERNAL" {
        // The response (an authorisation identity) is ignored, as RabbitMQ
        // does: the certificate decides.
        return match certificate {
            Some(user) => Ok(Login::Certificate { user: user.to_string() }),
            None => Err(AuthError::UnknownMechanism(mechanism.to_string())),
        };
    }
    if !MECHANISMS.split(' ').any(|m| m == mechanism) {
        return Err(AuthError::UnknownMechanism(mechanism.to_string()));
    }
    let (user, password) = credentials(mechanism, response)
        .ok_or_else(|| AuthError::Refused { mechanism: mechanism.to_string(), user: String::new() })?;
    Ok(Login::Password { user, password })
}

#[cfg(test)]
fn login_password(mechanism: &str, response: &[u8]) -> Result<(String, String), AuthError> {
    match login(mechanism, response, None)? {
        Login::Password { user, password } => Ok((user, password)),
        Login::Certificate { user } => Ok((user, String::new())),
    }
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
        assert_eq!(login_password("PLAIN", b"\0guest\0pw").unwrap(), ("guest".to_string(), "pw".to_string()));
        assert!(matches!(login_password("PLAIN", b"garbage"), Err(AuthError::Refused { .. })));
        assert!(matches!(login_password("PLAIN", b"\0a\0b\0c"), Err(AuthError::Refused { .. })));
        assert!(matches!(login("EXTERNAL", b"", None), Err(AuthError::UnknownMechanism(_))));
        assert_eq!(login("EXTERNAL", b"x", Some("cn")).unwrap(), Login::Certificate { user: "cn".into() });
        let mut amqplain = Vec::new();
        for (k, v) in [("LOGIN", "guest"), ("PASSWORD", "guest")] {
            amqplain.push(u8::try_from(k.len()).unwrap());
            amqplain.extend_from_slice(k.as_bytes());
            amqplain.push(b'S');
            amqplain.extend_from_slice(&u32::try_from(v.len()).unwrap().to_be_bytes());
            amqplain.extend_from_slice(v.as_bytes());
        }
        assert_eq!(login_password("AMQPLAIN", &amqplain).unwrap(), ("guest".to_string(), "guest".to_string()));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(!is_loopback("10.1.2.3".parse().unwrap()));
    }
}
