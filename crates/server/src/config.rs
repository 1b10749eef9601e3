//! Broker configuration: defaults, the optional TOML file, and the values a
//! command line or environment overrides. Every limit lives here, with its
//! default, and is documented in README.md.

use std::path::PathBuf;

use serde::Deserialize;

/// The largest `max_message_size` accepted (RabbitMQ's limit too); it
/// keeps every log entry far below the 4 GiB a record's length can say.
pub const MAX_MESSAGE_SIZE_CAP: u64 = 512 * 1024 * 1024;

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

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// AMQP port; 0 picks a free one (tests).
    pub amqp_port: u16,
    /// Management HTTP API port (RabbitMQ's 15672), on the `bind`
    /// addresses; 0 turns the API off.
    pub http_port: u16,
    /// Prometheus metrics port (RabbitMQ's 15692), on the `bind`
    /// addresses; 0 turns the endpoint off.
    pub prometheus_port: u16,
    /// How often the management API samples message counters for rates
    /// (RabbitMQ's `collect_statistics_interval`).
    pub collect_statistics_interval_ms: u64,
    /// Addresses to listen on. `localhost` means both 127.0.0.1 and ::1.
    pub bind: Vec<String>,
    pub data_dir: PathBuf,
    /// Virtual hosts created at every start if missing (more are added at
    /// runtime with `warren ctl add_vhost`).
    pub vhosts: Vec<String>,
    /// Users created at every start if missing, with the configured password
    /// and full permissions on the configured virtual hosts where they have
    /// none. Others are managed with `warren ctl`.
    pub users: Vec<User>,
    /// On the very first start with no `users` configured, create
    /// guest/guest (administrator) with full permissions on `/`.
    pub default_user: bool,
    /// Users that may log in only from a loopback address (RabbitMQ's
    /// `loopback_users`).
    pub loopback_users: Vec<String>,
    /// How new passwords are hashed: `warren_argon2id` (memory-hard, the
    /// default) or RabbitMQ's `rabbit_password_hashing_sha256`/`_sha512`,
    /// which RabbitMQ can import from Warren's definitions export.
    pub password_hashing: String,
    /// Most open connections on this node (0 = no limit); more are refused at
    /// `connection.open` with 530.
    pub max_connections: u64,
    /// Most consumers on one channel (0 = no limit); more close the
    /// connection with 530, as in RabbitMQ.
    pub consumer_max_per_channel: u64,
    /// Memory alarm threshold as a fraction of the machine's (or cgroup's)
    /// memory, RabbitMQ's `vm_memory_high_watermark.relative`.
    pub memory_high_watermark: f64,
    /// Absolute memory alarm threshold in bytes; overrides the relative one
    /// when non-zero.
    pub memory_high_watermark_bytes: u64,
    /// Disk alarm when the data directory's file system has less free space
    /// than this, in bytes (RabbitMQ's `disk_free_limit.absolute`).
    pub disk_free_limit_bytes: u64,
    /// How often memory is measured, milliseconds (disk: ten times less
    /// often).
    pub resource_check_interval_ms: u64,
    /// Most messages at the head of a queue kept in memory; the bodies of
    /// the rest are paged to disk.
    pub paging_queue_messages: usize,
    /// Most body bytes at the head of a queue kept in memory (judged by
    /// the queue's mean message size; at least one message stays).
    pub paging_queue_bytes: u64,
    /// Above this fraction of the memory high watermark, every queue keeps
    /// only a short head in memory (RabbitMQ's
    /// `vm_memory_high_watermark_paging_ratio`).
    pub memory_high_watermark_paging_ratio: f64,
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
    /// Connections still in their handshake (TCP or TLS accepted, AMQP
    /// `connection.open` not yet answered) at once; more are closed at
    /// accept. Bounds what half-open connections (slowloris) can hold:
    /// file descriptors the log needs, and memory. 0 = no limit.
    pub max_pending_handshakes: usize,
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
    /// What a consumer timeout does: `requeue` (take that delivery back,
    /// the channel stays open) or `close-channel` (RabbitMQ: 406, the
    /// channel closes and all its deliveries are requeued).
    pub consumer_timeout_action: ConsumerTimeoutAction,
    /// Settings applied by name pattern to queues and exchanges.
    pub policies: Vec<PolicyConfig>,
    /// AMQPS listeners (off unless configured).
    pub tls: Option<TlsConfig>,
    /// This node's name in a cluster (default `warren@` and the host name).
    pub node_name: Option<String>,
    /// Port for the other nodes of a cluster, on the first `bind` address;
    /// 0 (the default) runs a single node.
    pub cluster_port: u16,
    /// `host:port` cluster ports of nodes to join (this node's own may be
    /// among them).
    pub cluster_seeds: Vec<String>,
    /// File holding the secret every node of the cluster shares (RabbitMQ's
    /// Erlang cookie); required with `cluster_port`.
    pub cluster_secret_file: Option<PathBuf>,
    /// Log entries a Raft group (a quorum queue, the metadata) applies
    /// between snapshots.
    pub cluster_snapshot_every: u64,
}

/// AMQP over TLS, RabbitMQ's `ssl_options` under Warren's names.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// AMQPS port on the `bind` addresses; 0 picks a free one (tests).
    #[serde(default = "default_tls_port")]
    pub port: u16,
    /// HTTPS port for the management API (RabbitMQ's `management.ssl.port`,
    /// usually 15671), with this certificate; 0 (the default) serves no
    /// HTTPS. Client certificates are not asked for there.
    #[serde(default)]
    pub https_port: u16,
    /// The server's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates that client certificates must chain to (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Ask for a client certificate and verify it against `ca_file`.
    #[serde(default)]
    pub verify_peer: bool,
    /// Refuse clients that present no certificate (with `verify_peer`).
    #[serde(default)]
    pub fail_if_no_peer_cert: bool,
}

fn default_tls_port() -> u16 {
    5671
}

/// A policy as RabbitMQ defines one: `definition` uses RabbitMQ's keys
/// (`max-length`, `message-ttl`, `dead-letter-exchange`, ...).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    /// A regular expression matched against queue or exchange names.
    pub pattern: String,
    /// `queues`, `exchanges` or `all`.
    #[serde(default = "default_apply_to", rename = "apply-to", alias = "apply_to")]
    pub apply_to: String,
    #[serde(default)]
    pub priority: i64,
    pub definition: toml::Table,
}

fn default_vhost() -> String {
    "/".into()
}

fn default_apply_to() -> String {
    "all".into()
}

impl PolicyConfig {
    /// The same policy in the runtime shape, so both kinds are checked and
    /// compiled by one path.
    pub fn to_def(&self) -> crate::access::PolicyDef {
        let definition = match serde_json::to_value(&self.definition) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        crate::access::PolicyDef {
            vhost: self.vhost.clone(),
            name: self.name.clone(),
            pattern: self.pattern.clone(),
            apply_to: self.apply_to.clone(),
            definition,
            priority: self.priority,
        }
    }

    pub fn to_policy(&self) -> Result<warren_core::policy::Policy, ConfigError> {
        self.to_def().to_policy().map_err(|error| ConfigError::Invalid(error.to_string()))
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConsumerTimeoutAction {
    #[default]
    Requeue,
    CloseChannel,
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
            http_port: 15672,
            prometheus_port: 15692,
            collect_statistics_interval_ms: 5000,
            bind: vec!["localhost".into()],
            data_dir: PathBuf::from("./warren-data"),
            vhosts: vec!["/".into()],
            users: Vec::new(),
            default_user: true,
            loopback_users: vec!["guest".into()],
            password_hashing: crate::password::ARGON2ID.into(),
            max_connections: 0,
            consumer_max_per_channel: 0,
            memory_high_watermark: 0.4,
            memory_high_watermark_bytes: 0,
            disk_free_limit_bytes: 50_000_000,
            resource_check_interval_ms: 100,
            paging_queue_messages: warren_core::queue::Paging::default().messages,
            paging_queue_bytes: warren_core::queue::Paging::default().bytes,
            memory_high_watermark_paging_ratio: 0.5,
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat_s: 60,
            max_message_size: 128 * 1024 * 1024,
            handshake_timeout_s: 10,
            max_pending_handshakes: 1024,
            connection_write_buffer_max: 4 * 1024 * 1024,
            fsync: Fsync::Always,
            segment_bytes_max: 16 * 1024 * 1024,
            consumer_timeout_ms: 30 * 60 * 1000,
            consumer_timeout_action: ConsumerTimeoutAction::Requeue,
            policies: Vec::new(),
            tls: None,
            node_name: None,
            cluster_port: 0,
            cluster_seeds: Vec::new(),
            cluster_secret_file: None,
            cluster_snapshot_every: 8192,
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
        if !(self.memory_high_watermark > 0.0 && self.memory_high_watermark <= 1.0) {
            return Err(ConfigError::Invalid(format!(
                "memory_high_watermark {} must be a fraction in (0, 1]",
                self.memory_high_watermark
            )));
        }
        if !(self.memory_high_watermark_paging_ratio > 0.0 && self.memory_high_watermark_paging_ratio <= 1.0) {
            return Err(ConfigError::Invalid(format!(
                "memory_high_watermark_paging_ratio {} must be a fraction in (0, 1]",
                self.memory_high_watermark_paging_ratio
            )));
        }
        if self.paging_queue_messages == 0 || self.paging_queue_bytes == 0 {
            return Err(ConfigError::Invalid("paging_queue_messages and paging_queue_bytes must be at least 1".into()));
        }
        if self.max_message_size > MAX_MESSAGE_SIZE_CAP {
            return Err(ConfigError::Invalid(format!(
                "max_message_size {} is above the largest allowed, {MAX_MESSAGE_SIZE_CAP} (512 MiB, as RabbitMQ)",
                self.max_message_size
            )));
        }
        if self.segment_bytes_max > warren_storage::log::SEGMENT_BYTES_CAP {
            return Err(ConfigError::Invalid(format!(
                "segment_bytes_max {} is above the largest allowed, {} (1 GiB)",
                self.segment_bytes_max,
                warren_storage::log::SEGMENT_BYTES_CAP
            )));
        }
        if !crate::password::ALGORITHMS.contains(&self.password_hashing.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "password_hashing '{}' is not one of {}",
                self.password_hashing,
                crate::password::ALGORITHMS.join(", ")
            )));
        }
        if self.cluster_port != 0 && self.cluster_secret_file.is_none() {
            return Err(ConfigError::Invalid(
                "cluster_port is set but cluster_secret_file is not: the nodes of a cluster must share a secret".into(),
            ));
        }
        if self.bind.is_empty() {
            return Err(ConfigError::Invalid("bind lists no address".into()));
        }
        for policy in &self.policies {
            policy.to_policy()?;
        }
        Ok(())
    }

    /// The memory alarm threshold in bytes (`None` if total memory is unknown
    /// and no absolute value is set).
    pub fn memory_limit(&self) -> Option<u64> {
        if self.memory_high_watermark_bytes > 0 {
            return Some(self.memory_high_watermark_bytes);
        }
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a fraction in (0, 1] of a u64")]
        crate::alarm::total_memory().map(|total| (total as f64 * self.memory_high_watermark) as u64)
    }

    /// Above this resident memory, queues keep a short head in memory
    /// (`None` without a memory limit).
    pub fn paging_threshold(&self) -> Option<u64> {
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a fraction in (0, 1] of a u64")]
        self.memory_limit().map(|limit| (limit as f64 * self.memory_high_watermark_paging_ratio) as u64)
    }

    /// The queues' in-memory bounds, with or without memory pressure.
    pub fn paging(&self, pressure: bool) -> warren_core::queue::Paging {
        warren_core::queue::Paging { messages: self.paging_queue_messages, bytes: self.paging_queue_bytes, pressure }
    }

    /// This node's name: the configured one, else `warren@` and the host
    /// name.
    pub fn node_name(&self) -> String {
        if let Some(name) = &self.node_name {
            return name.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        format!("warren@{host}")
    }

    /// Whether `user` may log in only from loopback.
    pub fn loopback_only(&self, user: &str) -> bool {
        self.loopback_users.iter().any(|u| u == user) || self.users.iter().any(|u| u.name == user && u.loopback_only)
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

    #[test]
    fn policies_are_read_and_checked() {
        let text = "[[policies]]\nname = \"jobs\"\npattern = \"^jobs\\\\.\"\napply-to = \"queues\"\n\
                    [policies.definition]\nmax-length = 10\ndead-letter-exchange = \"dlx\"\n";
        let config: Config = toml::from_str(text).unwrap();
        config.validate().unwrap();
        let policy = config.policies[0].to_policy().unwrap();
        assert_eq!(policy.name, "jobs");
        let bad: Config = toml::from_str(&text.replace("max-length = 10", "max-length = -1")).unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn sizes_beyond_what_the_log_can_record_are_refused() {
        let too_big = Config { max_message_size: MAX_MESSAGE_SIZE_CAP + 1, ..Config::default() };
        assert!(too_big.validate().is_err());
        let segment = Config { segment_bytes_max: (1 << 30) + 1, ..Config::default() };
        assert!(segment.validate().is_err());
        assert!(Config { max_message_size: MAX_MESSAGE_SIZE_CAP, ..Config::default() }.validate().is_ok());
    }

    #[test]
    fn paging_bounds_must_leave_a_head_and_a_fraction() {
        for bad in [
            Config { paging_queue_messages: 0, ..Config::default() },
            Config { paging_queue_bytes: 0, ..Config::default() },
            Config { memory_high_watermark_paging_ratio: 0.0, ..Config::default() },
            Config { memory_high_watermark_paging_ratio: 1.5, ..Config::default() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let config = Config { memory_high_watermark_bytes: 1000, ..Config::default() };
        assert_eq!(config.paging_threshold(), Some(500));
        assert_eq!(config.paging(true).window(1, 1), warren_core::queue::PRESSURE_WINDOW);
    }
}
