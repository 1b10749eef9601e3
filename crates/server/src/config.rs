//! Broker configuration: defaults, the optional TOML file, and the values a
//! command line or environment overrides. Every limit lives here, with its
//! default, and is documented in README.md.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub password: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Refuse logins from anywhere but loopback (RabbitMQ's rule for guest).
    #[serde(default)]
    pub loopback_only: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// AMQP port; 0 picks a free one (tests).
    pub amqp_port: u16,
    /// Addresses to listen on. `localhost` means both 127.0.0.1 and ::1.
    pub bind: Vec<String>,
    pub data_dir: PathBuf,
    pub vhosts: Vec<String>,
    pub users: Vec<User>,
    /// Largest frame offered in `connection.tune`.
    pub frame_max: u32,
    /// Most channels per connection offered in `connection.tune`.
    pub channel_max: u16,
    /// Heartbeat interval offered in `connection.tune`, seconds (0 = off).
    pub heartbeat_s: u16,
    /// Largest message body accepted; larger ones close the channel with 406.
    pub max_message_size: u64,
    /// A connection must finish its handshake within this many seconds.
    pub handshake_timeout_s: u64,
    /// Unsent bytes above which a connection gets no more deliveries until
    /// its socket drains.
    pub connection_write_buffer_max: usize,
    /// When a persistent message counts as stored (and is confirmed).
    pub fsync: Fsync,
    /// Size at which the message log starts a new segment file.
    pub segment_bytes_max: u64,
    /// A delivery unacknowledged for this long (milliseconds) is taken back
    /// and returned to its queue (or retried); its channel stays open.
    /// Queues override it with `x-consumer-timeout`. 0 = no timeout.
    pub consumer_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Confirm after fsync (group commit): survives power loss.
    #[default]
    Always,
    /// Confirm once written to the OS: survives a broker crash, not a power cut.
    Never,
}

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(value: &str) -> Result<Fsync, String> {
        match value {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            other => Err(format!("fsync must be 'always' or 'never', not '{other}'")),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            amqp_port: 5672,
            bind: vec!["localhost".into()],
            data_dir: PathBuf::from("./warren-data"),
            vhosts: vec!["/".into()],
            users: vec![User {
                name: "guest".into(),
                password: "guest".into(),
                tags: vec!["administrator".into()],
                loopback_only: true,
            }],
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat_s: 60,
            max_message_size: 128 * 1024 * 1024,
            handshake_timeout_s: 10,
            connection_write_buffer_max: 4 * 1024 * 1024,
            fsync: Fsync::Always,
            segment_bytes_max: 16 * 1024 * 1024,
            consumer_timeout_ms: 30 * 60 * 1000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration in {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config: Config = toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.into(), source: Box::new(source) })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.frame_max != 0 && self.frame_max < warren_codec::frame::FRAME_MIN_SIZE {
            return Err(ConfigError::Invalid(format!(
                "frame_max {} is below the protocol minimum 4096",
                self.frame_max
            )));
        }
        if self.bind.is_empty() {
            return Err(ConfigError::Invalid("bind lists no address".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let config: Config =
            toml::from_str("amqp_port = 5999\nheartbeat_s = 5\n[[users]]\nname = \"app\"\npassword = \"pw\"\n")
                .unwrap();
        assert_eq!(config.amqp_port, 5999);
        assert_eq!(config.heartbeat_s, 5);
        assert_eq!(config.users[0].name, "app");
        assert_eq!(config.frame_max, 131_072);
        assert!(toml::from_str::<Config>("no_such_key = 1").is_err());
    }
}
