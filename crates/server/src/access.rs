//! Users, virtual hosts, permissions and limits: the access definitions.
//!
//! They live in `access.json` in the data directory, in the shape of a
//! RabbitMQ definitions export (`users`, `vhosts`, `permissions`,
//! `topic_permissions`, `parameters` with `vhost-limits`, `policies`), so a RabbitMQ
//! export can be imported as it is and Warren's file reads like one.
//! `warren ctl` edits the file under a lock; the broker notices the change
//! and applies it while running.
//!
//! Permission checks follow RabbitMQ: each of configure, write and read is a
//! regular expression matched (unanchored) against a resource name; an empty
//! expression allows only the empty name; the default exchange is checked
//! under the name `amq.default`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use regex::Regex;
use serde::{Deserialize, Serialize};
use warren_codec::types::{AMQPValue, FieldTable, LongString, ShortString};
use warren_core::policy::{ApplyTo, Policy};
use warren_storage::{Backend, FsBackend};

use crate::password;

pub const FILE_NAME: &str = "access.json";
const LOCK_NAME: &str = "access.lock";
pub const VHOST_LIMITS: &str = "vhost-limits";
pub const KNOWN_TAGS: [&str; 5] = ["administrator", "management", "monitoring", "policymaker", "impersonator"];

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("user '{0}' already exists")]
    UserExists(String),
    #[error("no such user '{0}'")]
    NoUser(String),
    #[error("virtual host '{0}' already exists")]
    VhostExists(String),
    #[error("no such virtual host '{0}'")]
    NoVhost(String),
    #[error("invalid regular expression '{pattern}': {reason}")]
    Regex { pattern: String, reason: String },
    #[error("invalid limits {0}")]
    Limits(String),
    #[error("user '{user}': {source}")]
    Password { user: String, source: password::PasswordError },
    #[error("cannot read or write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Policy(String),
    #[error("no such policy '{0}'")]
    NoPolicy(String),
    #[error("{path} is not a valid definitions file: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
}

/// Tags are a list in recent RabbitMQ exports and a comma-separated string
/// in older ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum Tags {
    List(Vec<String>),
    Text(String),
    #[default]
    #[serde(skip)]
    None,
}

impl Tags {
    fn to_vec(&self) -> Vec<String> {
        match self {
            Tags::List(list) => list.clone(),
            Tags::Text(text) => text.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect(),
            Tags::None => Vec::new(),
        }
    }
}

fn default_algorithm() -> String {
    // RabbitMQ's default when an export omits it.
    password::RABBIT_SHA256.into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserDef {
    pub name: String,
    #[serde(default)]
    pub password_hash: String,
    #[serde(default = "default_algorithm")]
    pub hashing_algorithm: String,
    #[serde(default, with = "tags_serde")]
    pub tags: Vec<String>,
    /// `max-connections`, `max-channels`; negative means no limit.
    #[serde(default)]
    pub limits: BTreeMap<String, i64>,
}

mod tags_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(tags: &[String], s: S) -> Result<S::Ok, S::Error> {
        tags.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(super::Tags::deserialize(d)?.to_vec())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostDef {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionDef {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPermissionDef {
    pub user: String,
    pub vhost: String,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParameterDef {
    pub vhost: String,
    pub component: String,
    pub name: String,
    pub value: serde_json::Value,
}

/// A runtime policy, in RabbitMQ's export and API shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyDef {
    pub vhost: String,
    pub name: String,
    pub pattern: String,
    #[serde(rename = "apply-to", alias = "apply_to", default = "default_apply_to")]
    pub apply_to: String,
    #[serde(default)]
    pub definition: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub priority: i64,
}

fn default_apply_to() -> String {
    "all".into()
}

impl PolicyDef {
    /// Compiles and checks it: the pattern, `apply-to` and every key.
    pub fn to_policy(&self) -> Result<Policy, AccessError> {
        let apply_to = ApplyTo::parse(&self.apply_to).ok_or_else(|| {
            AccessError::Policy(format!(
                "policy '{}': apply-to must be queues, exchanges or all, not '{}'",
                self.name, self.apply_to
            ))
        })?;
        if self.definition.is_empty() {
            return Err(AccessError::Policy(format!("policy '{}': the definition is empty", self.name)));
        }
        let mut definition = FieldTable::default();
        for (key, value) in &self.definition {
            definition.insert(ShortString::from(key.as_str()), amqp_value(value));
        }
        Policy::new(&self.name, &self.pattern, apply_to, self.priority, definition)
            .map_err(|error| AccessError::Policy(error.to_string()))
    }
}

/// A policy value as the field-table value queue arguments would carry.
fn amqp_value(value: &serde_json::Value) -> AMQPValue {
    use serde_json::Value;
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(items.iter().map(amqp_value).collect::<Vec<_>>().into()),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (key, value) in map {
                table.insert(ShortString::from(key.as_str()), amqp_value(value));
            }
            AMQPValue::FieldTable(table)
        }
    }
}

/// The access definitions as stored (and as RabbitMQ exports them; other
/// sections of an export are ignored).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AccessDefinitions {
    #[serde(default)]
    pub users: Vec<UserDef>,
    #[serde(default)]
    pub vhosts: Vec<VhostDef>,
    #[serde(default)]
    pub permissions: Vec<PermissionDef>,
    #[serde(default)]
    pub topic_permissions: Vec<TopicPermissionDef>,
    #[serde(default)]
    pub parameters: Vec<ParameterDef>,
    /// Runtime policies (those of the configuration file are not here).
    #[serde(default)]
    pub policies: Vec<PolicyDef>,
    /// The algorithm new passwords are hashed with (the file's owner's
    /// setting, not stored); empty means Argon2id.
    #[serde(skip)]
    pub hashing: String,
}

fn check_regex(pattern: &str) -> Result<(), AccessError> {
    Regex::new(pattern).map(drop).map_err(|e| AccessError::Regex { pattern: pattern.into(), reason: e.to_string() })
}

/// Parses `{"max-connections": 2, ...}`: only the given names, integers.
fn parse_limits(json: &str, allowed: &[&str]) -> Result<BTreeMap<String, i64>, AccessError> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| AccessError::Limits(format!("'{json}': {e}")))?;
    let object = value.as_object().ok_or_else(|| AccessError::Limits(format!("'{json}': not a JSON object")))?;
    let mut limits = BTreeMap::new();
    for (name, value) in object {
        if !allowed.contains(&name.as_str()) {
            return Err(AccessError::Limits(format!(
                "'{json}': unknown limit '{name}' (known: {})",
                allowed.join(", ")
            )));
        }
        let n = value.as_i64().ok_or_else(|| AccessError::Limits(format!("'{json}': '{name}' is not an integer")))?;
        limits.insert(name.clone(), n);
    }
    Ok(limits)
}

impl AccessDefinitions {
    pub fn user(&self, name: &str) -> Option<&UserDef> {
        self.users.iter().find(|u| u.name == name)
    }

    fn user_mut(&mut self, name: &str) -> Result<&mut UserDef, AccessError> {
        self.users.iter_mut().find(|u| u.name == name).ok_or_else(|| AccessError::NoUser(name.into()))
    }

    pub fn has_vhost(&self, name: &str) -> bool {
        self.vhosts.iter().any(|v| v.name == name)
    }

    fn need_vhost(&self, name: &str) -> Result<(), AccessError> {
        if self.has_vhost(name) {
            Ok(())
        } else {
            Err(AccessError::NoVhost(name.into()))
        }
    }

    pub fn add_user(&mut self, name: &str, password: &str) -> Result<(), AccessError> {
        if self.user(name).is_some() {
            return Err(AccessError::UserExists(name.into()));
        }
        let password_hash = self.hash(name, password)?;
        self.users.push(UserDef {
            name: name.into(),
            password_hash,
            hashing_algorithm: self.algorithm().into(),
            tags: Vec::new(),
            limits: BTreeMap::new(),
        });
        Ok(())
    }

    /// Creates the user or replaces its password and tags (configuration
    /// file users).
    pub fn upsert_user(&mut self, name: &str, password: &str, tags: &[String]) -> Result<(), AccessError> {
        if let Some(user) = self.user(name) {
            if !password::verify(&user.hashing_algorithm, &user.password_hash, password) {
                self.change_password(name, password)?;
            }
            self.user_mut(name)?.tags = tags.to_vec();
            return Ok(());
        }
        self.add_user(name, password)?;
        self.user_mut(name)?.tags = tags.to_vec();
        Ok(())
    }

    pub fn delete_user(&mut self, name: &str) -> Result<(), AccessError> {
        self.user_mut(name)?;
        self.users.retain(|u| u.name != name);
        self.permissions.retain(|p| p.user != name);
        self.topic_permissions.retain(|p| p.user != name);
        Ok(())
    }

    pub fn change_password(&mut self, name: &str, password: &str) -> Result<(), AccessError> {
        let password_hash = self.hash(name, password)?;
        let algorithm = self.algorithm().to_string();
        let user = self.user_mut(name)?;
        user.password_hash = password_hash;
        user.hashing_algorithm = algorithm;
        Ok(())
    }

    /// Leaves the user without a password: only certificate logins work.
    pub fn clear_password(&mut self, name: &str) -> Result<(), AccessError> {
        self.user_mut(name)?.password_hash.clear();
        Ok(())
    }

    pub fn set_user_tags(&mut self, name: &str, tags: &[String]) -> Result<(), AccessError> {
        self.user_mut(name)?.tags = tags.to_vec();
        Ok(())
    }

    pub fn add_vhost(&mut self, name: &str) -> Result<(), AccessError> {
        if self.has_vhost(name) {
            return Err(AccessError::VhostExists(name.into()));
        }
        self.vhosts.push(VhostDef { name: name.into() });
        Ok(())
    }

    pub fn delete_vhost(&mut self, name: &str) -> Result<(), AccessError> {
        self.need_vhost(name)?;
        self.vhosts.retain(|v| v.name != name);
        self.permissions.retain(|p| p.vhost != name);
        self.topic_permissions.retain(|p| p.vhost != name);
        self.parameters.retain(|p| p.vhost != name);
        self.policies.retain(|p| p.vhost != name);
        Ok(())
    }

    /// Adds or replaces a runtime policy (by virtual host and name).
    pub fn set_policy(&mut self, policy: PolicyDef) -> Result<(), AccessError> {
        self.need_vhost(&policy.vhost)?;
        policy.to_policy()?;
        self.policies.retain(|p| !(p.vhost == policy.vhost && p.name == policy.name));
        self.policies.push(policy);
        Ok(())
    }

    pub fn clear_policy(&mut self, vhost: &str, name: &str) -> Result<(), AccessError> {
        self.need_vhost(vhost)?;
        let before = self.policies.len();
        self.policies.retain(|p| !(p.vhost == vhost && p.name == name));
        if self.policies.len() == before {
            return Err(AccessError::NoPolicy(name.into()));
        }
        Ok(())
    }

    pub fn set_permissions(
        &mut self,
        vhost: &str,
        user: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<(), AccessError> {
        self.user_mut(user)?;
        self.need_vhost(vhost)?;
        for pattern in [configure, write, read] {
            check_regex(pattern)?;
        }
        self.permissions.retain(|p| !(p.user == user && p.vhost == vhost));
        self.permissions.push(PermissionDef {
            user: user.into(),
            vhost: vhost.into(),
            configure: configure.into(),
            write: write.into(),
            read: read.into(),
        });
        Ok(())
    }

    pub fn clear_permissions(&mut self, vhost: &str, user: &str) -> Result<(), AccessError> {
        self.user_mut(user)?;
        self.need_vhost(vhost)?;
        self.permissions.retain(|p| !(p.user == user && p.vhost == vhost));
        Ok(())
    }

    pub fn set_topic_permissions(
        &mut self,
        vhost: &str,
        user: &str,
        exchange: &str,
        write: &str,
        read: &str,
    ) -> Result<(), AccessError> {
        self.user_mut(user)?;
        self.need_vhost(vhost)?;
        for pattern in [write, read] {
            check_regex(&expand(pattern, "user", "vhost"))?;
        }
        self.topic_permissions.retain(|p| !(p.user == user && p.vhost == vhost && p.exchange == exchange));
        self.topic_permissions.push(TopicPermissionDef {
            user: user.into(),
            vhost: vhost.into(),
            exchange: exchange.into(),
            write: write.into(),
            read: read.into(),
        });
        Ok(())
    }

    /// Clears one exchange's topic permissions, or all of them.
    pub fn clear_topic_permissions(
        &mut self,
        vhost: &str,
        user: &str,
        exchange: Option<&str>,
    ) -> Result<(), AccessError> {
        self.user_mut(user)?;
        self.need_vhost(vhost)?;
        self.topic_permissions
            .retain(|p| !(p.user == user && p.vhost == vhost && exchange.is_none_or(|e| p.exchange == e)));
        Ok(())
    }

    /// Replaces a virtual host's limits (`{"max-connections": n,
    /// "max-queues": n}`; negative = no limit).
    pub fn set_vhost_limits(&mut self, vhost: &str, json: &str) -> Result<(), AccessError> {
        self.need_vhost(vhost)?;
        let limits = parse_limits(json, &["max-connections", "max-queues"])?;
        self.parameters.retain(|p| !(p.vhost == vhost && p.component == VHOST_LIMITS));
        self.parameters.push(ParameterDef {
            vhost: vhost.into(),
            component: VHOST_LIMITS.into(),
            name: "limits".into(),
            value: serde_json::to_value(limits).unwrap_or_default(),
        });
        Ok(())
    }

    pub fn clear_vhost_limits(&mut self, vhost: &str) -> Result<(), AccessError> {
        self.need_vhost(vhost)?;
        self.parameters.retain(|p| !(p.vhost == vhost && p.component == VHOST_LIMITS));
        Ok(())
    }

    /// Replaces a user's limits (`{"max-connections": n, "max-channels": n}`).
    pub fn set_user_limits(&mut self, user: &str, json: &str) -> Result<(), AccessError> {
        let limits = parse_limits(json, &["max-connections", "max-channels"])?;
        self.user_mut(user)?.limits = limits;
        Ok(())
    }

    pub fn clear_user_limits(&mut self, user: &str) -> Result<(), AccessError> {
        self.user_mut(user)?.limits.clear();
        Ok(())
    }

    pub fn vhost_limits(&self, vhost: &str) -> BTreeMap<String, i64> {
        self.parameters
            .iter()
            .filter(|p| p.vhost == vhost && p.component == VHOST_LIMITS)
            .filter_map(|p| p.value.as_object())
            .flat_map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_i64()?))))
            .collect()
    }

    /// Merges an export (RabbitMQ's or Warren's): users, virtual hosts,
    /// permissions and limits are added or replaced; nothing is removed.
    pub fn import(&mut self, other: AccessDefinitions) -> Result<(), AccessError> {
        for user in &other.users {
            password::check(&user.hashing_algorithm, &user.password_hash)
                .map_err(|source| AccessError::Password { user: user.name.clone(), source })?;
        }
        for p in &other.permissions {
            for pattern in [&p.configure, &p.write, &p.read] {
                check_regex(pattern)?;
            }
        }
        for p in &other.policies {
            p.to_policy()?;
        }
        for user in other.users {
            self.users.retain(|u| u.name != user.name);
            self.users.push(user);
        }
        for vhost in other.vhosts {
            if !self.has_vhost(&vhost.name) {
                self.vhosts.push(vhost);
            }
        }
        for p in other.permissions {
            self.permissions.retain(|q| !(q.user == p.user && q.vhost == p.vhost));
            self.permissions.push(p);
        }
        for p in other.topic_permissions {
            self.topic_permissions.retain(|q| !(q.user == p.user && q.vhost == p.vhost && q.exchange == p.exchange));
            self.topic_permissions.push(p);
        }
        for p in other.parameters.into_iter().filter(|p| p.component == VHOST_LIMITS) {
            self.parameters.retain(|q| !(q.vhost == p.vhost && q.component == VHOST_LIMITS));
            self.parameters.push(p);
        }
        for p in other.policies {
            self.policies.retain(|q| !(q.vhost == p.vhost && q.name == p.name));
            self.policies.push(p);
        }
        // Grants for users or virtual hosts the export does not define are
        // dropped, as RabbitMQ would refuse them.
        let users: Vec<String> = self.users.iter().map(|u| u.name.clone()).collect();
        let vhosts: Vec<String> = self.vhosts.iter().map(|v| v.name.clone()).collect();
        self.permissions.retain(|p| users.contains(&p.user) && vhosts.contains(&p.vhost));
        self.topic_permissions.retain(|p| users.contains(&p.user) && vhosts.contains(&p.vhost));
        self.parameters.retain(|p| vhosts.contains(&p.vhost));
        self.policies.retain(|p| vhosts.contains(&p.vhost));
        Ok(())
    }
}

impl AccessDefinitions {
    fn algorithm(&self) -> &str {
        if self.hashing.is_empty() {
            password::ARGON2ID
        } else {
            &self.hashing
        }
    }

    fn hash(&self, user: &str, password: &str) -> Result<String, AccessError> {
        password::hash_as(self.algorithm(), password)
            .map_err(|source| AccessError::Password { user: user.into(), source })
    }
}

/// Expands the variables RabbitMQ allows in topic permissions.
fn expand(pattern: &str, user: &str, vhost: &str) -> String {
    pattern.replace("{username}", &regex::escape(user)).replace("{vhost}", &regex::escape(vhost))
}

// ---- the file -------------------------------------------------------------

/// `access.json` in a data directory, read and written under an exclusive
/// lock so the broker and `warren ctl` never lose each other's changes.
/// The file is on the storage backend (with the log); the lock is always a
/// real file, since it coordinates processes.
pub struct AccessFile {
    path: PathBuf,
    lock_path: PathBuf,
    backend: Arc<dyn Backend>,
    /// `password_hashing` for passwords set through this file.
    hashing: String,
}

/// What a first start puts in a new file.
pub struct Seed<'a> {
    pub vhosts: &'a [String],
    /// (name, password, tags) of users created with full permissions on
    /// every seeded virtual host.
    pub users: Vec<(&'a str, &'a str, &'a [String])>,
}

impl AccessFile {
    pub fn new(data_dir: &Path) -> AccessFile {
        AccessFile::on(Arc::new(FsBackend), data_dir)
    }

    /// The access file of `data_dir` on `backend`.
    pub fn on(backend: Arc<dyn Backend>, data_dir: &Path) -> AccessFile {
        AccessFile {
            path: data_dir.join(FILE_NAME),
            lock_path: data_dir.join(LOCK_NAME),
            backend,
            hashing: String::new(),
        }
    }

    /// New passwords hashed with `algorithm` (the configuration's
    /// `password_hashing`).
    pub fn with_hashing(mut self, algorithm: &str) -> AccessFile {
        self.hashing = algorithm.to_string();
        self
    }

    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> AccessError {
        let path = path.to_path_buf();
        move |source| AccessError::Io { path: path.clone(), source }
    }

    /// The definitions, or `None` if the file does not exist yet.
    pub fn read(&self) -> Result<Option<AccessDefinitions>, AccessError> {
        match crate::files::read(&*self.backend, &self.path) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| AccessError::Json { path: self.path.clone(), source }),
            Ok(None) => Ok(None),
            Err(e) => Err(AccessError::Io { path: e.path, source: e.source }),
        }
    }

    /// Applies `change` to the stored definitions under the lock (a new file
    /// starts from `seed`) and replaces the file atomically. Returns the
    /// definitions written.
    pub fn update<T>(
        &self,
        seed: &Seed<'_>,
        change: impl FnOnce(&mut AccessDefinitions) -> Result<T, AccessError>,
    ) -> Result<(AccessDefinitions, T), AccessError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(self.io(dir))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(self.io(&self.lock_path))?;
        lock.lock().map_err(self.io(&self.lock_path))?;
        let mut definitions = match self.read()? {
            Some(definitions) => definitions,
            None => seeded(seed, &self.hashing)?,
        };
        definitions.hashing.clone_from(&self.hashing);
        let before = definitions.clone();
        let out = change(&mut definitions)?;
        let exists = self.backend.open(&self.path, false).is_ok();
        if definitions != before || !exists {
            let bytes = serde_json::to_vec_pretty(&definitions)
                .map_err(|source| AccessError::Json { path: self.path.clone(), source })?;
            crate::files::replace(&*self.backend, &self.path, &bytes)
                .map_err(|e| AccessError::Io { path: e.path, source: e.source })?;
        }
        drop(lock);
        Ok((definitions, out))
    }
}

fn seeded(seed: &Seed<'_>, hashing: &str) -> Result<AccessDefinitions, AccessError> {
    let mut definitions = AccessDefinitions { hashing: hashing.to_string(), ..AccessDefinitions::default() };
    for vhost in seed.vhosts {
        if !definitions.has_vhost(vhost) {
            definitions.add_vhost(vhost)?;
        }
    }
    for (name, password, tags) in &seed.users {
        definitions.upsert_user(name, password, tags)?;
        for vhost in seed.vhosts {
            definitions.set_permissions(vhost, name, ".*", ".*", ".*")?;
        }
    }
    Ok(definitions)
}

// ---- checks ---------------------------------------------------------------

/// One permission expression, with the common "everything" and "nothing"
/// answered without a regex.
#[derive(Clone, Debug)]
enum Matcher {
    All,
    /// RabbitMQ turns "" into "^$".
    EmptyOnly,
    Regex(Regex),
}

impl Matcher {
    fn new(pattern: &str) -> Matcher {
        match pattern {
            ".*" => Matcher::All,
            "" => Matcher::EmptyOnly,
            // Checked when set; a bad one stored by hand allows nothing.
            _ => Regex::new(pattern).map(Matcher::Regex).unwrap_or(Matcher::EmptyOnly),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Matcher::All => true,
            Matcher::EmptyOnly => name.is_empty(),
            Matcher::Regex(regex) => regex.is_match(name),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    Configure,
    Write,
    Read,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Queue,
    Exchange,
}

impl Resource {
    fn name(self) -> &'static str {
        match self {
            Resource::Queue => "queue",
            Resource::Exchange => "exchange",
        }
    }
}

#[derive(Debug)]
struct TopicRule {
    exchange: String,
    write: Matcher,
    read: Matcher,
}

/// A user's permissions in one virtual host, ready to check.
#[derive(Debug)]
pub struct Permissions {
    user: String,
    vhost: String,
    configure: Matcher,
    write: Matcher,
    read: Matcher,
    topics: Vec<TopicRule>,
}

impl Permissions {
    /// No permissions at all (they were cleared while connected).
    pub fn none(user: &str, vhost: &str) -> Permissions {
        Permissions {
            user: user.into(),
            vhost: vhost.into(),
            configure: Matcher::EmptyOnly,
            write: Matcher::EmptyOnly,
            read: Matcher::EmptyOnly,
            topics: Vec::new(),
        }
    }

    /// `Err` carries RabbitMQ's 403 text.
    pub fn check(&self, permission: Permission, resource: Resource, name: &str) -> Result<(), String> {
        let name = if resource == Resource::Exchange && name.is_empty() { "amq.default" } else { name };
        let matcher = match permission {
            Permission::Configure => &self.configure,
            Permission::Write => &self.write,
            Permission::Read => &self.read,
        };
        if matcher.matches(name) {
            return Ok(());
        }
        Err(format!(
            "access to {} '{name}' in vhost '{}' refused for user '{}'",
            resource.name(),
            self.vhost,
            self.user
        ))
    }

    /// Whether any topic permission names this exchange (publishes to other
    /// exchanges skip the topic check).
    pub fn has_topic_rules(&self, exchange: &str) -> bool {
        self.topics.iter().any(|t| t.exchange == exchange)
    }

    /// Topic authorisation on a topic exchange: with no rule for the
    /// exchange everything is allowed.
    pub fn check_topic(&self, permission: Permission, exchange: &str, routing_key: &str) -> Result<(), String> {
        let Some(rule) = self.topics.iter().find(|t| t.exchange == exchange) else {
            return Ok(());
        };
        let matcher = if permission == Permission::Write { &rule.write } else { &rule.read };
        if matcher.matches(routing_key) {
            return Ok(());
        }
        Err(format!(
            "access to topic '{routing_key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
            self.vhost, self.user
        ))
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: Option<u64>,
    pub max_channels: Option<u64>,
    pub max_queues: Option<u64>,
}

fn limits_of(map: &BTreeMap<String, i64>) -> Limits {
    let get = |name: &str| map.get(name).and_then(|&n| u64::try_from(n).ok());
    Limits { max_connections: get("max-connections"), max_channels: get("max-channels"), max_queues: get("max-queues") }
}

#[derive(Debug)]
pub struct User {
    pub name: String,
    pub tags: Vec<String>,
    pub limits: Limits,
    hashing_algorithm: String,
    password_hash: String,
}

impl User {
    pub fn verify(&self, password: &str) -> bool {
        password::verify(&self.hashing_algorithm, &self.password_hash, password)
    }

    /// Identifies the stored hash, so cached logins end when it changes.
    pub fn password_hash(&self) -> &str {
        &self.password_hash
    }
}

/// The definitions compiled for checking; replaced as a whole on change.
#[derive(Debug, Default)]
pub struct Access {
    users: HashMap<String, Arc<User>>,
    vhosts: BTreeMap<String, Limits>,
    permissions: HashMap<(String, String), Arc<Permissions>>,
    policies: Vec<PolicyDef>,
}

impl Access {
    pub fn compile(definitions: &AccessDefinitions) -> Access {
        let users = definitions
            .users
            .iter()
            .map(|u| {
                let user = User {
                    name: u.name.clone(),
                    tags: u.tags.clone(),
                    limits: limits_of(&u.limits),
                    hashing_algorithm: u.hashing_algorithm.clone(),
                    password_hash: u.password_hash.clone(),
                };
                (u.name.clone(), Arc::new(user))
            })
            .collect();
        let vhosts = definitions
            .vhosts
            .iter()
            .map(|v| (v.name.clone(), limits_of(&definitions.vhost_limits(&v.name))))
            .collect();
        let permissions = definitions
            .permissions
            .iter()
            .map(|p| {
                let topics = definitions
                    .topic_permissions
                    .iter()
                    .filter(|t| t.user == p.user && t.vhost == p.vhost)
                    .map(|t| TopicRule {
                        exchange: t.exchange.clone(),
                        write: Matcher::new(&expand(&t.write, &p.user, &p.vhost)),
                        read: Matcher::new(&expand(&t.read, &p.user, &p.vhost)),
                    })
                    .collect();
                let compiled = Permissions {
                    user: p.user.clone(),
                    vhost: p.vhost.clone(),
                    configure: Matcher::new(&p.configure),
                    write: Matcher::new(&p.write),
                    read: Matcher::new(&p.read),
                    topics,
                };
                ((p.user.clone(), p.vhost.clone()), Arc::new(compiled))
            })
            .collect();
        Access { users, vhosts, permissions, policies: definitions.policies.clone() }
    }

    /// The runtime policies of one virtual host.
    pub fn policies<'a>(&'a self, vhost: &'a str) -> impl Iterator<Item = &'a PolicyDef> + 'a {
        self.policies.iter().filter(move |p| p.vhost == vhost)
    }

    pub fn user(&self, name: &str) -> Option<Arc<User>> {
        self.users.get(name).cloned()
    }

    pub fn vhost_names(&self) -> impl Iterator<Item = &String> {
        self.vhosts.keys()
    }

    pub fn vhost_limits(&self, name: &str) -> Option<Limits> {
        self.vhosts.get(name).copied()
    }

    pub fn permissions(&self, user: &str, vhost: &str) -> Option<Arc<Permissions>> {
        self.permissions.get(&(user.to_string(), vhost.to_string())).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defs() -> AccessDefinitions {
        let mut d = AccessDefinitions::default();
        d.add_vhost("/").unwrap();
        d.add_vhost("v").unwrap();
        d.add_user("u", "pw").unwrap();
        d
    }

    #[test]
    fn permissions_follow_rabbitmq_rules() {
        let mut d = defs();
        d.set_permissions("v", "u", "^app\\.", "", ".*").unwrap();
        let access = Access::compile(&d);
        let p = access.permissions("u", "v").unwrap();
        assert!(p.check(Permission::Configure, Resource::Queue, "app.x").is_ok());
        assert_eq!(
            p.check(Permission::Configure, Resource::Queue, "xapp.x").unwrap_err(),
            "access to queue 'xapp.x' in vhost 'v' refused for user 'u'"
        );
        // "" allows nothing but the empty name; the default exchange is amq.default.
        assert_eq!(
            p.check(Permission::Write, Resource::Exchange, "").unwrap_err(),
            "access to exchange 'amq.default' in vhost 'v' refused for user 'u'"
        );
        assert!(p.check(Permission::Read, Resource::Exchange, "").is_ok());
        assert!(access.permissions("u", "/").is_none());
        assert!(d.set_permissions("v", "u", "(", ".*", ".*").is_err());
        assert!(d.set_permissions("v", "nobody", ".*", ".*", ".*").is_err());
        assert!(d.set_permissions("nowhere", "u", ".*", ".*", ".*").is_err());
    }

    #[test]
    fn topic_permissions_expand_variables() {
        let mut d = defs();
        d.set_permissions("v", "u", ".*", ".*", ".*").unwrap();
        d.set_topic_permissions("v", "u", "amq.topic", "^{username}\\.", "^public\\.").unwrap();
        let access = Access::compile(&d);
        let p = access.permissions("u", "v").unwrap();
        assert!(p.check_topic(Permission::Write, "amq.topic", "u.orders").is_ok());
        assert_eq!(
            p.check_topic(Permission::Write, "amq.topic", "w.orders").unwrap_err(),
            "access to topic 'w.orders' in exchange 'amq.topic' in vhost 'v' refused for user 'u'"
        );
        assert!(p.check_topic(Permission::Read, "amq.topic", "public.x").is_ok());
        assert!(p.check_topic(Permission::Read, "amq.topic", "u.x").is_err());
        assert!(p.check_topic(Permission::Write, "other", "anything").is_ok());
    }

    #[test]
    fn deleting_removes_grants_and_limits_parse() {
        let mut d = defs();
        d.set_permissions("v", "u", ".*", ".*", ".*").unwrap();
        d.set_vhost_limits("v", r#"{"max-connections": 2, "max-queues": -1}"#).unwrap();
        d.set_user_limits("u", r#"{"max-channels": 3}"#).unwrap();
        let access = Access::compile(&d);
        assert_eq!(
            access.vhost_limits("v"),
            Some(Limits { max_connections: Some(2), max_channels: None, max_queues: None })
        );
        assert_eq!(access.user("u").unwrap().limits.max_channels, Some(3));
        assert!(d.set_vhost_limits("v", r#"{"max-bananas": 1}"#).is_err());
        assert!(d.set_user_limits("u", r#"{"max-channels": "x"}"#).is_err());
        d.delete_vhost("v").unwrap();
        assert!(d.permissions.is_empty() && d.parameters.is_empty());
        d.add_vhost("v").unwrap();
        d.set_permissions("v", "u", ".*", ".*", ".*").unwrap();
        d.delete_user("u").unwrap();
        assert!(d.permissions.is_empty());
        assert!(matches!(d.delete_user("u"), Err(AccessError::NoUser(_))));
        assert!(matches!(d.add_vhost("v"), Err(AccessError::VhostExists(_))));
    }

    #[test]
    fn rabbitmq_export_imports() {
        // The shape of `rabbitmqctl export_definitions` (3.10), trimmed.
        let export = r#"{
          "rabbit_version": "3.10.8",
          "users": [
            {"name": "app", "password_hash": "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR",
             "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["management"], "limits": {}},
            {"name": "old", "password_hash": "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR",
             "tags": "administrator,monitoring"}
          ],
          "vhosts": [{"name": "/"}, {"name": "shop"}],
          "permissions": [{"user": "app", "vhost": "shop", "configure": "", "write": "^orders$", "read": ".*"}],
          "topic_permissions": [],
          "parameters": [{"value": {"max-connections": 5}, "vhost": "shop", "component": "vhost-limits", "name": "limits"}],
          "queues": [], "exchanges": [], "bindings": [], "policies": []
        }"#;
        let parsed: AccessDefinitions = serde_json::from_str(export).unwrap();
        let mut d = AccessDefinitions::default();
        d.import(parsed).unwrap();
        assert_eq!(d.user("old").unwrap().tags, vec!["administrator", "monitoring"]);
        assert_eq!(d.user("old").unwrap().hashing_algorithm, password::RABBIT_SHA256);
        let access = Access::compile(&d);
        assert_eq!(access.vhost_limits("shop").unwrap().max_connections, Some(5));
        assert!(access.permissions("app", "shop").is_some());
        let mut bad: AccessDefinitions = serde_json::from_str(export).unwrap();
        bad.users[0].hashing_algorithm = "rabbit_password_hashing_md5".into();
        assert!(AccessDefinitions::default().import(bad).is_err());
    }

    #[test]
    fn file_updates_are_seeded_locked_and_atomic() {
        let dir = std::env::temp_dir().join(format!("warren-access-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = AccessFile::new(&dir);
        assert!(file.read().unwrap().is_none());
        let tags = vec!["administrator".to_string()];
        let seed = Seed { vhosts: &["/".to_string()], users: vec![("guest", "guest", &tags)] };
        file.update(&seed, |d| d.add_user("u", "pw")).unwrap();
        let stored = file.read().unwrap().unwrap();
        assert!(stored.user("guest").is_some() && stored.user("u").is_some());
        assert_eq!(stored.permissions.len(), 1);
        assert!(Access::compile(&stored).user("guest").unwrap().verify("guest"));
        // A failed change leaves the file as it was.
        assert!(file.update(&seed, |d| d.add_user("u", "pw")).is_err());
        assert_eq!(file.read().unwrap().unwrap(), stored);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
