//! What the store needs: the journal of durable changes, the durable
//! definitions, and putting recovered messages back (and re-keying them
//! after compaction).

use super::*;

impl VirtualHostState {
    /// Moves the journal events recorded so far into `out`.
    pub fn drain_journal(&mut self, out: &mut Vec<JournalEvent>) {
        out.append(&mut self.journal);
    }
    pub fn has_journal(&self) -> bool {
        !self.journal.is_empty()
    }
    pub(super) fn settled(&mut self, unacked: &Unacked) {
        let Some(q) = self.queues.get_mut(&unacked.queue) else {
            return;
        };
        if q.remote {
            self.relay_settle(unacked, Outcome::Ack);
            return;
        }
        if q.stream.is_some() {
            if let Some(q) = self.queues.get(&unacked.queue) {
                self.stream_acked(q, unacked);
            }
            return;
        }
        if !q.returns.is_empty() {
            q.returns.remove(&unacked.seq);
        }
        let stored = unacked.message.stored_index();
        if stored != 0 && q.durable {
            self.journal.push(JournalEvent::Settled { queue: q.name.clone(), stored });
        }
    }
    /// Deduplication windows of durable queues that changed since the last
    /// call: (queue, [(key, forgotten at ms)]).
    pub fn take_dedup_changes(&mut self) -> Vec<(String, DedupEntries)> {
        let mut changed = Vec::new();
        for queue in self.queues.values_mut().filter(|q| q.durable && q.dedup.changed) {
            queue.dedup.changed = false;
            let entries = queue.dedup.entries().map(|(key, until)| (key.to_vec(), until)).collect();
            changed.push((queue.name.to_string(), entries));
        }
        changed
    }
    /// Whether a durable queue here deduplicates (its windows are saved).
    pub fn has_durable_dedup(&self) -> bool {
        self.queues.values().any(|q| q.durable && q.settings.dedup.is_some())
    }
    /// The virtual host's clock, in its milliseconds (what deduplication
    /// windows and retry times are measured in).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
    /// Remembers the keys of messages recovered from the log that the last
    /// saved window may not hold, as if published at `published_by_ms` (no
    /// later than that): a duplicate of a confirmed message is still
    /// recognised after a crash.
    pub fn restore_dedup_published(&mut self, queue: &str, keys: &[Vec<u8>], published_by_ms: u64) {
        let Some(window) = self.queue_ids.get(queue).and_then(|id| self.queues.get(id)).and_then(|q| q.settings.dedup)
        else {
            return;
        };
        let until = published_by_ms.saturating_add(window.window_ms);
        if until <= self.clock.now_ms() || keys.is_empty() {
            return;
        }
        let Some(q) = self.queue_ids.get(queue).and_then(|id| self.queues.get_mut(id)) else { return };
        for key in keys {
            if !q.dedup.contains(key, until.saturating_sub(1)) {
                q.dedup.remember(Arc::from(key.as_slice()), until, window.max_keys);
            }
        }
        // Saved again at the next snapshot.
        q.dedup.changed = true;
    }
    /// Restores a durable queue's deduplication keys (at start).
    pub fn restore_dedup(&mut self, queue: &str, entries: &[(Vec<u8>, u64)]) {
        let now = self.clock.now_ms();
        let Some(q) = self.queue_ids.get(queue).and_then(|id| self.queues.get_mut(id)) else { return };
        let Some(dedup) = q.settings.dedup else { return };
        let mut sorted: Vec<&(Vec<u8>, u64)> = entries.iter().filter(|(_, until)| *until > now).collect();
        sorted.sort_by_key(|(_, until)| *until);
        for (key, until) in sorted {
            q.dedup.remember(Arc::from(key.as_slice()), *until, dedup.max_keys);
        }
        q.dedup.changed = false;
    }
    /// The durable exchanges, queues and bindings (exclusive queues excluded).
    pub fn durable_definitions(&self) -> Definitions {
        let mut definitions = Definitions::default();
        // Replicated queues are their group's to keep, not this node's.
        let durable_queue =
            |id: &QueueId| self.queues.get(id).filter(|q| q.durable && q.exclusive_owner.is_none() && !q.replicated);
        for exchange in self.exchanges.values().filter(|x| x.durable) {
            if !exchange.name.starts_with("amq.") {
                definitions.exchanges.push(ExchangeDefinition {
                    name: exchange.name.to_string(),
                    kind: exchange.type_name().to_string(),
                    auto_delete: exchange.auto_delete,
                    internal: exchange.internal,
                    arguments: exchange.arguments.clone(),
                });
            }
            for binding in exchange.bindings() {
                let (destination, destination_is_queue) = match &binding.destination {
                    Destination::Queue(id) => match durable_queue(id) {
                        Some(q) => (q.name.to_string(), true),
                        None => continue,
                    },
                    Destination::Exchange(name) => match self.exchanges.get(&**name) {
                        Some(x) if x.durable => (name.to_string(), false),
                        _ => continue,
                    },
                };
                definitions.bindings.push(BindingDefinition {
                    source: exchange.name.to_string(),
                    destination,
                    destination_is_queue,
                    routing_key: binding.routing_key.to_string(),
                    arguments: binding.arguments.clone(),
                });
            }
        }
        for queue in self.queues.values().filter(|q| q.durable && q.exclusive_owner.is_none() && !q.replicated) {
            definitions.queues.push(QueueDefinition {
                name: queue.name.to_string(),
                auto_delete: queue.auto_delete,
                arguments: queue.arguments.clone(),
            });
        }
        definitions.exchanges.sort_by(|a, b| a.name.cmp(&b.name));
        definitions.queues.sort_by(|a, b| a.name.cmp(&b.name));
        definitions
    }
    /// Declares stored definitions (at start, before any client).
    pub fn restore(&mut self, definitions: &Definitions) {
        for x in &definitions.exchanges {
            if let Err(error) = self.declare_exchange(ExchangeDeclare {
                auto_delete: x.auto_delete,
                internal: x.internal,
                ..ExchangeDeclare::new(&x.name, &x.kind).durable().with_arguments(x.arguments.clone())
            }) {
                tracing::warn!(exchange = %x.name, %error, "stored exchange not restored");
            }
        }
        for q in &definitions.queues {
            if let Err(error) = self.declare_queue(
                0,
                QueueDeclare {
                    auto_delete: q.auto_delete,
                    ..QueueDeclare::named(&q.name).durable().with_arguments(q.arguments.clone())
                },
            ) {
                tracing::warn!(queue = %q.name, %error, "stored queue not restored");
            }
        }
        for b in &definitions.bindings {
            let result = if b.destination_is_queue {
                self.bind_queue(0, &b.destination, &b.source, &b.routing_key, b.arguments.clone(), true)
            } else {
                self.bind_exchange(&b.destination, &b.source, &b.routing_key, b.arguments.clone(), true)
            };
            if let Err(error) = result {
                tracing::warn!(source = %b.source, destination = %b.destination, %error, "stored binding not restored");
            }
        }
        // Restored from the store: nothing to write back.
        self.journal.clear();
    }
    /// Puts a message recovered from the store back into a durable queue,
    /// paged out (read back from the log when delivered).
    pub fn recover_stored(
        &mut self,
        queue: &str,
        stored: u64,
        size: u64,
        priority: u8,
        returns: u64,
        retry_at_ms: Option<u64>,
    ) -> bool {
        if let Some(exchange) = queue.strip_prefix(DELAYED_PREFIX) {
            return match self.exchanges.get_mut(exchange).and_then(|x| x.delayed.as_mut()) {
                Some(delayed) => {
                    delayed.scheduler.recover(stored);
                    self.delaying.insert(exchange.into());
                    true
                }
                None => false,
            };
        }
        let id = match &self.recovering {
            Some((name, id)) if &**name == queue => Some(*id),
            _ => self.queue_ids.get(queue).copied(),
        };
        match id.and_then(|id| self.queues.get_mut(&id)) {
            Some(q) if q.durable => {
                if self.recovering.as_ref().is_none_or(|(_, id)| *id != q.id) {
                    self.recovering = Some((q.name.clone(), q.id));
                }
                let seq = q.push_stored(stored, size, priority);
                if returns > 0 {
                    q.returns.insert(seq, returns);
                }
                // Held back once the store can read it ([`Self::set_loader`]).
                if let Some(due) = retry_at_ms {
                    self.recovered_retries.push((q.id, seq, due));
                }
                true
            }
            _ => false,
        }
    }
    /// Stored messages whose log index `wanted` picks, with the durable
    /// queues (and delayed exchanges) holding them, ready, retrying or
    /// unacked, for compaction.
    pub fn stored_where(&self, wanted: impl Fn(u64) -> bool) -> Vec<(u64, Vec<Arc<str>>)> {
        let mut found: std::collections::BTreeMap<u64, Vec<Arc<str>>> = std::collections::BTreeMap::new();
        // A replicated queue's keys are its group's, not the store's.
        for queue in self.queues.values().filter(|q| q.durable && !q.replicated) {
            queue.for_each_entry(|entry| {
                if entry.stored != 0 && wanted(entry.stored) {
                    found.entry(entry.stored).or_default().push(queue.name.clone());
                }
            });
            for stored in queue.retrying().map(|m| m.stored_index()).filter(|s| *s != 0 && wanted(*s)) {
                found.entry(stored).or_default().push(queue.name.clone());
            }
        }
        for channel in self.channels.values() {
            for unacked in &channel.unacked {
                let stored = unacked.message.stored_index();
                if stored != 0 && wanted(stored) {
                    if let Some(queue) = self.queues.get(&unacked.queue).filter(|q| q.durable && !q.replicated) {
                        found.entry(stored).or_default().push(queue.name.clone());
                    }
                }
            }
        }
        for exchange in self.exchanges.values().filter(|x| x.durable) {
            if let Some(delayed) = &exchange.delayed {
                for stored in delayed.scheduler.stored().filter(|s| *s != 0 && wanted(*s)) {
                    found.entry(stored).or_default().push(delayed.store_name.clone());
                }
            }
        }
        found.into_iter().collect()
    }
    /// Re-keys stored messages moved to new log indices (compaction).
    pub fn rekey_stored(&mut self, moved: &HashMap<u64, u64>) {
        for queue in self.queues.values_mut().filter(|q| q.durable) {
            queue.for_each_entry(|entry| {
                if let Some(message) = entry.message {
                    if let Some(new) = moved.get(&entry.stored) {
                        message.moved_to(*new);
                    }
                }
            });
            for message in queue.retrying() {
                if let Some(new) = moved.get(&message.stored_index()) {
                    message.moved_to(*new);
                }
            }
            queue.rekey(moved);
        }
        for channel in self.channels.values() {
            for unacked in &channel.unacked {
                if let Some(new) = moved.get(&unacked.message.stored_index()) {
                    unacked.message.moved_to(*new);
                }
            }
        }
        for exchange in self.exchanges.values_mut() {
            if let Some(delayed) = &mut exchange.delayed {
                delayed.scheduler.rekey(moved);
            }
        }
    }
    /// Where paged-out messages are read back from.
    pub fn set_loader(&mut self, loader: Arc<dyn MessageLoader>) {
        self.loader = Some(loader);
        self.hold_recovered_retries();
    }

    /// Messages that were waiting out a retry delay when the broker stopped
    /// wait again until their due time, instead of being ready at once.
    fn hold_recovered_retries(&mut self) {
        let now = self.clock.now_ms();
        for (id, seq, due) in std::mem::take(&mut self.recovered_retries) {
            let loader = self.loader.as_deref();
            let Some(q) = self.queues.get_mut(&id) else { continue };
            if due <= now || !q.hold_for_retry(seq, due, loader) {
                continue;
            }
            self.timed.insert(id);
        }
    }
}
