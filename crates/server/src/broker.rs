//! The broker: its configuration, its virtual hosts, its durable store, the
//! access definitions, and the registry of open connections that limits are
//! counted against.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use tracing::{info, warn};
use warren_codec::reply::ReplyCode;
use warren_core::{Clock, SystemClock, VirtualHost};
use warren_storage::FsyncPolicy;

use crate::access::{Access, AccessDefinitions, AccessError, AccessFile, Seed, User};
use crate::config::{Config, Fsync};
use crate::outbox::ConnectionOutbox;
use crate::password::LoginCache;
use crate::session::Session;
use crate::store::{Recovered, Store, StoreError};

/// What an operator is told of an open connection.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// RabbitMQ's form: `peer -> local`.
    pub name: String,
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub tls: bool,
    pub client_properties: warren_codec::types::FieldTable,
    pub connected_at_ms: u64,
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat_s: u16,
}

/// An open connection as the broker lists it.
#[derive(Clone, Debug)]
pub struct ConnectionView {
    pub id: u64,
    pub user: String,
    pub vhost: String,
    pub info: ConnectionInfo,
    pub traffic: crate::outbox::Traffic,
    /// Publishes waiting for their confirm.
    pub unconfirmed: u64,
}

/// Node-wide counters for operators (relaxed atomics: one add per event,
/// or per batch of confirms).
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub channels_opened: AtomicU64,
    pub channels_closed: AtomicU64,
    /// Publishes on channels in confirm mode.
    pub received_confirm: AtomicU64,
    /// Publishes acked to their publisher.
    pub confirmed: AtomicU64,
    /// Mandatory publishes returned as unroutable.
    pub returned_unroutable: AtomicU64,
    /// Publish-to-confirm time, one publish in flight per channel timed.
    pub confirm_latency: crate::histogram::LatencyHistogram,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// An open connection, as limits and runtime changes see it.
struct Registered {
    user: String,
    vhost: String,
    outbox: Arc<ConnectionOutbox>,
    info: ConnectionInfo,
}

#[derive(Default)]
struct Registry {
    connections: HashMap<u64, Registered>,
    per_vhost: HashMap<String, u64>,
    per_user: HashMap<String, u64>,
    user_channels: HashMap<String, u64>,
}

fn decrement(map: &mut HashMap<String, u64>, key: &str, by: u64) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(by);
        if *n == 0 {
            map.remove(key);
        }
    }
}

pub struct Broker {
    pub config: Config,
    pub counters: Counters,
    clock: Arc<dyn Clock>,
    vhosts: RwLock<HashMap<String, Arc<VirtualHost>>>,
    next_connection_id: AtomicU64,
    pub store: Arc<Store>,
    pub recovered: Recovered,
    access: RwLock<Arc<Access>>,
    /// Bumped whenever `access` is replaced; connections re-read their
    /// permissions when it moves.
    access_generation: AtomicU64,
    access_file: AccessFile,
    /// (modified time, length, inode) of the access file last loaded.
    access_stamp: Mutex<Option<(SystemTime, u64, u64)>>,
    registry: Mutex<Registry>,
    login_cache: LoginCache,
    logins: Mutex<HashSet<[u8; 32]>>,
    /// Password checks running at once: the KDF takes 19 MiB and tens of
    /// milliseconds each, so a login storm must queue, not fan out.
    verify_slots: tokio::sync::Semaphore,
    pub alarms: crate::alarm::Alarms,
    /// Memory use is above the paging ratio of the watermark: queues keep
    /// a short head in memory.
    paging_pressure: AtomicBool,
    /// One permit per connection still in its handshake
    /// (`max_pending_handshakes`).
    pub handshakes: Arc<tokio::sync::Semaphore>,
    /// Publishes into quorum queues wait on these (`store::tickets`).
    pub tickets: Arc<crate::store::tickets::Tickets>,
    /// In a cluster: the quorum queues (set once the cluster is up).
    pub replication: std::sync::OnceLock<Arc<crate::quorum::Replication>>,
    /// In a cluster: where a change of the access file made here goes.
    access_sink: std::sync::OnceLock<AccessSink>,
    /// The access definitions last shared with or taken from the cluster.
    access_shared: Mutex<Option<AccessDefinitions>>,
}

/// Takes the access definitions a node changed, to share them.
pub type AccessSink = Box<dyn Fn(AccessDefinitions) + Send + Sync>;

/// Why the broker could not open its data directory.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// What the broker runs on besides its configuration: the storage backend
/// its files live on and the clock its queues read. Tests swap in a
/// simulated disk that can lose power and a clock they move by hand.
#[derive(Clone)]
pub struct Environment {
    pub backend: Arc<dyn warren_storage::Backend>,
    pub clock: Arc<dyn Clock>,
}

impl Default for Environment {
    fn default() -> Environment {
        Environment { backend: Arc::new(warren_storage::FsBackend), clock: Arc::new(SystemClock) }
    }
}

impl Environment {
    /// Real time, files on `backend`.
    pub fn on(backend: Arc<dyn warren_storage::Backend>) -> Environment {
        Environment { backend, ..Environment::default() }
    }
}

impl Broker {
    /// Opens the data directory and restores durable state.
    pub fn open(config: Config) -> Result<Broker, BrokerError> {
        Self::open_with(config, Environment::default())
    }

    /// Same, on the given storage backend and clock.
    pub fn open_with(config: Config, environment: Environment) -> Result<Broker, BrokerError> {
        let Environment { backend, clock } = environment;
        let access_file = AccessFile::on(backend.clone(), &config.data_dir).with_hashing(&config.password_hashing);
        let definitions = load_access(&config, &access_file)?;
        let access = Access::compile(&definitions);
        let new_vhost = |name: &str| {
            let vhost = Arc::new(VirtualHost::new(name));
            vhost.lock().set_clock(clock.clone());
            vhost
        };
        let mut vhosts: BTreeMap<String, Arc<VirtualHost>> =
            access.vhost_names().map(|name| (name.clone(), new_vhost(name))).collect();
        let policy = match config.fsync {
            Fsync::Always => FsyncPolicy::Always,
            Fsync::Never => FsyncPolicy::Never,
        };
        let (store, recovered) =
            Store::open_with(backend, &config.data_dir, policy, config.segment_bytes_max, &mut vhosts)?;
        // Stored contents of a virtual host deleted while the broker was
        // down (or during a crash) go now.
        let orphaned: Vec<String> = vhosts.keys().filter(|n| access.vhost_limits(n).is_none()).cloned().collect();
        let handshake_slots = match config.max_pending_handshakes {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n.min(tokio::sync::Semaphore::MAX_PERMITS),
        };
        let tickets = store.tickets();
        let broker = Broker {
            config,
            counters: Counters::default(),
            clock,
            vhosts: RwLock::new(HashMap::new()),
            next_connection_id: AtomicU64::new(1),
            store,
            recovered,
            access: RwLock::new(Arc::new(access)),
            access_generation: AtomicU64::new(1),
            access_stamp: Mutex::new(stamp(&access_file)),
            access_file,
            registry: Mutex::new(Registry::default()),
            login_cache: LoginCache::new(),
            logins: Mutex::new(HashSet::new()),
            verify_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            ),
            alarms: crate::alarm::Alarms::default(),
            paging_pressure: AtomicBool::new(false),
            handshakes: Arc::new(tokio::sync::Semaphore::new(handshake_slots)),
            tickets,
            replication: std::sync::OnceLock::new(),
            access_sink: std::sync::OnceLock::new(),
            access_shared: Mutex::new(None),
        };
        for (name, vhost) in vhosts {
            broker.prepare_vhost(&vhost);
            broker.vhosts.write().insert(name, vhost);
        }
        for name in orphaned {
            info!(vhost = %name, "removing the contents of a deleted virtual host");
            broker.remove_vhost(&name);
        }
        Ok(broker)
    }

    fn prepare_vhost(&self, vhost: &VirtualHost) {
        let config = &self.config;
        let mut state = Session::open(vhost, &self.store);
        let name = state.name.clone();
        state.set_policies(self.compiled_policies(&self.access.read(), &name));
        // The clock first: recovered retries are held against it.
        state.set_clock(self.clock.clone());
        state.set_loader(self.store.clone());
        state.set_streams(self.store.streams());
        state.set_consumer_timeout((config.consumer_timeout_ms > 0).then_some(config.consumer_timeout_ms));
        state.set_consumer_timeout_closes_channel(
            config.consumer_timeout_action == crate::config::ConsumerTimeoutAction::CloseChannel,
        );
        let limits = self.access.read().vhost_limits(&state.name).unwrap_or_default();
        state.set_max_queues(limits.max_queues);
        state.set_paging(config.paging(self.paging_pressure.load(Ordering::Relaxed)));
    }

    /// Memory use is above the paging ratio: queues keep a short head.
    pub fn paging_pressure(&self) -> bool {
        self.paging_pressure.load(Ordering::Relaxed)
    }

    /// Starts or ends memory pressure: every queue's in-memory head shrinks
    /// to a few messages, or grows back. True if it changed.
    pub fn set_paging_pressure(&self, pressure: bool) -> bool {
        if self.paging_pressure.swap(pressure, Ordering::Relaxed) == pressure {
            return false;
        }
        let paging = self.config.paging(pressure);
        for vhost in self.vhosts() {
            vhost.lock().set_paging(paging);
        }
        true
    }

    /// A virtual host's policies: the configuration file's, then the
    /// runtime ones (API, `warren ctl`, imports), a runtime policy replacing
    /// a file policy of the same name.
    pub fn policies(&self, vhost: &str) -> Vec<crate::access::PolicyDef> {
        let access = self.access.read().clone();
        let runtime: Vec<_> = access.policies(vhost).cloned().collect();
        let from_file = self.config.policies.iter().filter(|p| p.vhost == vhost).map(|p| p.to_def());
        from_file.filter(|p| !runtime.iter().any(|r| r.name == p.name)).chain(runtime.iter().cloned()).collect()
    }

    fn compiled_policies(&self, access: &Access, vhost: &str) -> Vec<warren_core::policy::Policy> {
        let runtime: Vec<_> = access.policies(vhost).collect();
        let from_file =
            self.config.policies.iter().filter(|p| p.vhost == vhost && !runtime.iter().any(|r| r.name == p.name));
        // All were checked when written; one that no longer compiles is skipped.
        from_file.filter_map(|p| p.to_policy().ok()).chain(runtime.iter().filter_map(|p| p.to_policy().ok())).collect()
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VirtualHost>> {
        self.vhosts.read().get(name).cloned()
    }

    /// Names of the virtual hosts, sorted.
    pub fn vhost_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.vhosts.read().keys().cloned().collect();
        names.sort();
        names
    }

    pub fn vhosts(&self) -> Vec<Arc<VirtualHost>> {
        self.vhosts.read().values().cloned().collect()
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    // ---- access ---------------------------------------------------------

    pub fn access(&self) -> Arc<Access> {
        self.access.read().clone()
    }

    pub fn access_generation(&self) -> u64 {
        self.access_generation.load(Ordering::Acquire)
    }

    pub fn access_file(&self) -> &AccessFile {
        &self.access_file
    }

    /// Whether this password was already proved right for this user (and
    /// its current hash) since the broker started.
    pub fn login_cached(&self, user: &User, password: &str) -> bool {
        self.logins.lock().contains(&self.login_cache.digest(&user.name, user.password_hash(), password))
    }

    /// Checks a password with the slow KDF, off the async workers and at
    /// most one per core at a time.
    pub async fn verify_password(&self, user: Arc<User>, password: String) -> bool {
        let digest = self.login_cache.digest(&user.name, user.password_hash(), &password);
        let Ok(_slot) = self.verify_slots.acquire().await else {
            return false;
        };
        let ok = tokio::task::spawn_blocking(move || user.verify(&password)).await.unwrap_or(false);
        if ok {
            let mut logins = self.logins.lock();
            if logins.len() > 100_000 {
                logins.clear();
            }
            logins.insert(digest);
        }
        ok
    }

    /// Re-reads the access file if it changed on disk and applies it:
    /// virtual hosts created or deleted, connections of deleted users or
    /// virtual hosts closed, limits updated. Returns whether it changed.
    pub fn reload_access(&self) -> Result<bool, AccessError> {
        let now = stamp(&self.access_file);
        if now == *self.access_stamp.lock() {
            return Ok(false);
        }
        let Some(definitions) = self.access_file.read()? else {
            return Ok(false);
        };
        *self.access_stamp.lock() = now;
        self.apply(&definitions);
        if let Some(share) = self.access_sink.get() {
            let plain = AccessDefinitions { hashing: String::new(), ..definitions };
            let mut shared = self.access_shared.lock();
            if shared.as_ref() != Some(&plain) {
                *shared = Some(plain.clone());
                share(plain);
            }
        }
        Ok(true)
    }

    /// In a cluster: a change of the access file here (by `warren ctl` or
    /// the API) is handed to `sink` from now on.
    pub fn share_access(&self, sink: AccessSink) {
        let _ = self.access_sink.set(sink);
    }

    /// Replaces the access file with the cluster's definitions (another
    /// node changed them) and applies them; not shared again.
    pub fn adopt_access(&self, definitions: AccessDefinitions) -> Result<(), AccessError> {
        let plain = AccessDefinitions { hashing: String::new(), ..definitions };
        {
            let mut shared = self.access_shared.lock();
            if shared.as_ref() == Some(&plain) {
                return Ok(());
            }
            *shared = Some(plain.clone());
        }
        let seed = crate::access::Seed { vhosts: &[], users: Vec::new() };
        self.access_file.update(&seed, |current| {
            let hashing = std::mem::take(&mut current.hashing);
            *current = AccessDefinitions { hashing, ..plain };
            Ok(())
        })?;
        self.reload_access().map(drop)
    }

    fn apply(&self, definitions: &AccessDefinitions) {
        let access = Arc::new(Access::compile(definitions));
        let previous = std::mem::replace(&mut *self.access.write(), access.clone());
        self.access_generation.fetch_add(1, Ordering::AcqRel);
        let existing: Vec<String> = self.vhosts.read().keys().cloned().collect();
        for name in access.vhost_names().filter(|n| !existing.contains(n)) {
            info!(vhost = %name, "virtual host created");
            let vhost = Arc::new(VirtualHost::new(name));
            self.prepare_vhost(&vhost);
            self.vhosts.write().insert(name.clone(), vhost);
        }
        for name in existing.iter().filter(|n| access.vhost_limits(n).is_none()) {
            info!(vhost = %name, "virtual host deleted");
            self.force_close(|r| &r.vhost == name, &format!("vhost '{name}' is deleted"));
            self.remove_vhost(name);
        }
        for vhost in self.vhosts() {
            let mut state = Session::open(&vhost, &self.store);
            let limits = access.vhost_limits(&state.name).unwrap_or_default();
            state.set_max_queues(limits.max_queues);
            // Re-applying walks every queue: only when this vhost's changed.
            if !previous.policies(&state.name).eq(access.policies(&state.name)) {
                info!(vhost = %state.name, "policies changed");
                let policies = self.compiled_policies(&access, &state.name);
                state.set_policies(policies);
            }
        }
        let gone: Vec<String> = {
            let registry = self.registry.lock();
            registry.per_user.keys().filter(|u| access.user(u).is_none()).cloned().collect()
        };
        for user in gone {
            info!(%user, "user deleted: closing its connections");
            self.force_close(|r| r.user == user, &format!("user '{user}' is deleted"));
        }
    }

    /// Deletes a virtual host's queues (settling their stored messages) and
    /// definitions, and forgets it.
    fn remove_vhost(&self, name: &str) {
        let Some(vhost) = self.vhosts.write().remove(name) else {
            return;
        };
        let mut session = Session::open(&vhost, &self.store);
        session.delete_everything();
        if let Err(error) = session.finish() {
            warn!(%error, vhost = %name, "settling the virtual host's messages failed");
        }
        if let Err(error) = self.store.forget_vhost(name) {
            warn!(%error, vhost = %name, "removing the virtual host's definitions failed");
        }
    }

    /// Every open connection, by id.
    pub fn connections(&self) -> Vec<ConnectionView> {
        let registry = self.registry.lock();
        let mut out: Vec<ConnectionView> = registry
            .connections
            .iter()
            .map(|(&id, r)| ConnectionView {
                id,
                user: r.user.clone(),
                vhost: r.vhost.clone(),
                info: r.info.clone(),
                traffic: r.outbox.traffic(),
                unconfirmed: r.outbox.unconfirmed(),
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }

    /// Closes the connection of that name with 320 CONNECTION_FORCED and
    /// `reason` (an operator's request). Returns whether there was one.
    pub fn close_connection_named(&self, name: &str, reason: &str) -> bool {
        let registry = self.registry.lock();
        let mut found = false;
        for registered in registry.connections.values().filter(|r| r.info.name == name) {
            registered.outbox.force_close(ReplyCode::ConnectionForced, reason);
            found = true;
        }
        found
    }

    fn force_close(&self, select: impl Fn(&Registered) -> bool, text: &str) {
        let registry = self.registry.lock();
        for registered in registry.connections.values().filter(|r| select(r)) {
            registered.outbox.force_close(ReplyCode::ConnectionForced, text);
        }
    }

    // ---- connection limits ----------------------------------------------

    /// Counts a connection opening `vhost` as `user`, or refuses it with
    /// RabbitMQ's 530 text when a limit is reached.
    pub fn register(
        &self,
        id: u64,
        user: &User,
        vhost: &str,
        outbox: Arc<ConnectionOutbox>,
        info: ConnectionInfo,
    ) -> Result<(), String> {
        let access = self.access();
        let mut registry = self.registry.lock();
        let max = self.config.max_connections;
        if max > 0 && registry.connections.len() as u64 >= max {
            return Err(format!("connection refused: node connection limit ({max}) is reached"));
        }
        if let Some(max) = access.vhost_limits(vhost).and_then(|l| l.max_connections) {
            if registry.per_vhost.get(vhost).copied().unwrap_or(0) >= max {
                return Err(format!(
                    "access to vhost '{vhost}' refused for user '{}': connection limit ({max}) is reached",
                    user.name
                ));
            }
        }
        if let Some(max) = user.limits.max_connections {
            if registry.per_user.get(&user.name).copied().unwrap_or(0) >= max {
                return Err(format!(
                    "connection refused for user '{}': user connection limit ({max}) is reached",
                    user.name
                ));
            }
        }
        *registry.per_vhost.entry(vhost.to_string()).or_default() += 1;
        *registry.per_user.entry(user.name.clone()).or_default() += 1;
        registry.connections.insert(id, Registered { user: user.name.clone(), vhost: vhost.to_string(), outbox, info });
        Counters::add(&self.counters.connections_opened, 1);
        Ok(())
    }

    pub fn unregister(&self, id: u64, channels: u64) {
        let mut registry = self.registry.lock();
        if let Some(registered) = registry.connections.remove(&id) {
            decrement(&mut registry.per_vhost, &registered.vhost, 1);
            decrement(&mut registry.per_user, &registered.user, 1);
            decrement(&mut registry.user_channels, &registered.user, channels);
            Counters::add(&self.counters.connections_closed, 1);
            Counters::add(&self.counters.channels_closed, channels);
        }
    }

    /// Counts a channel against its user's `max-channels`; `Err` is
    /// RabbitMQ's text.
    pub fn open_channel(&self, user: &User) -> Result<(), String> {
        let mut registry = self.registry.lock();
        let open = registry.user_channels.entry(user.name.clone()).or_default();
        if let Some(max) = user.limits.max_channels {
            if *open >= max {
                return Err(format!(
                    "number of channels opened for user '{}' has reached the maximum allowed user limit of ({max})",
                    user.name
                ));
            }
        }
        *open += 1;
        Counters::add(&self.counters.channels_opened, 1);
        Ok(())
    }

    pub fn close_channel(&self, user: &str) {
        decrement(&mut self.registry.lock().user_channels, user, 1);
        Counters::add(&self.counters.channels_closed, 1);
    }

    pub fn connection_count(&self) -> usize {
        self.registry.lock().connections.len()
    }
}

/// Identifies a version of the access file: every update replaces it by
/// rename, so the inode changes even when time and size do not.
fn stamp(file: &AccessFile) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file.path()).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// Reads the access file, seeding it on first start, and applies the
/// configuration's users and virtual hosts.
pub fn load_access(config: &Config, file: &AccessFile) -> Result<AccessDefinitions, AccessError> {
    let guest_tags = vec!["administrator".to_string()];
    let mut seed_vhosts = config.vhosts.clone();
    // Virtual hosts that hold durable definitions from before access
    // definitions existed keep existing.
    if let Ok(Some(bytes)) = crate::files::read(file.backend(), &config.data_dir.join("definitions.json")) {
        if let Ok(stored) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(&bytes) {
            seed_vhosts.extend(stored.into_keys().filter(|v| !config.vhosts.contains(v)));
        }
    }
    let mut seed = Seed { vhosts: &seed_vhosts, users: Vec::new() };
    if config.users.is_empty() && config.default_user {
        seed.users.push(("guest", "guest", &guest_tags));
    }
    let (definitions, ()) = file.update(&seed, |definitions| {
        for vhost in &config.vhosts {
            if !definitions.has_vhost(vhost) {
                definitions.add_vhost(vhost)?;
            }
        }
        for user in &config.users {
            definitions.upsert_user(&user.name, &user.password, &user.tags)?;
            for vhost in &config.vhosts {
                if !definitions.permissions.iter().any(|p| p.user == user.name && &p.vhost == vhost) {
                    definitions.set_permissions(vhost, &user.name, ".*", ".*", ".*")?;
                }
            }
        }
        Ok(())
    })?;
    Ok(definitions)
}
