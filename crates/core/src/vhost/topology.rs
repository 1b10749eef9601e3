//! Declaring, deleting and binding exchanges and queues, with RabbitMQ's
//! checks of names, properties and arguments (argument values are read in
//! `settings.rs`).

use super::*;

pub(super) fn bool_str(value: bool) -> &'static str {
    if value {
        "true"
    } else {
        "false"
    }
}

/// Queue arguments whose values must be equal on redeclaration.
pub(super) const EQUIVALENT_QUEUE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-queue-type",
    "x-queue-mode",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-queue-master-locator",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
];

pub(super) fn describe(value: Option<&warren_codec::types::AMQPValue>) -> String {
    use warren_codec::types::AMQPValue as V;
    match value {
        None => "none".into(),
        Some(v) => match v {
            V::LongString(_) | V::ShortString(_) => {
                format!("the value '{}' of type 'longstr'", warren_codec::table::as_str(v).unwrap_or(""))
            }
            V::Boolean(b) => format!("the value '{b}' of type 'bool'"),
            other => match warren_codec::table::as_i64(other) {
                Some(n) => format!("the value '{n}' of type '{}'", int_type(other)),
                None => format!("the value '{other:?}'"),
            },
        },
    }
}

/// A value as RabbitMQ quotes it when both sides of a comparison have one.
pub(super) fn plain(value: &warren_codec::types::AMQPValue) -> String {
    use warren_codec::types::AMQPValue as V;
    match value {
        V::Boolean(b) => b.to_string(),
        other => warren_codec::table::as_str(other)
            .map(str::to_string)
            .or_else(|| warren_codec::table::as_i64(other).map(|n| n.to_string()))
            .unwrap_or_else(|| format!("{other:?}")),
    }
}

/// Argument equality as RabbitMQ sees it: integers compare by value
/// whatever their width.
pub(super) fn equivalent(
    a: Option<&warren_codec::types::AMQPValue>,
    b: Option<&warren_codec::types::AMQPValue>,
) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => match (warren_codec::table::as_i64(x), warren_codec::table::as_i64(y)) {
            (Some(m), Some(n)) => m == n,
            _ => x == y,
        },
        (None, None) => true,
        _ => false,
    }
}

/// Types of the queue arguments Warren knows, checked on declaration.
pub(super) fn validate_queue_argument(key: &str, value: &warren_codec::types::AMQPValue) -> Result<(), &'static str> {
    use warren_codec::types::AMQPValue as V;
    let type_name = match value {
        V::LongString(_) | V::ShortString(_) => "longstr",
        V::Boolean(_) => "bool",
        V::FieldTable(_) => "table",
        V::FieldArray(_) => "array",
        V::Void => "void",
        V::Float(_) | V::Double(_) => "double",
        V::ByteArray(_) => "binary",
        _ => "integer",
    };
    let wants_integer = matches!(
        key,
        "x-message-ttl"
            | "x-expires"
            | "x-max-length"
            | "x-max-length-bytes"
            | "x-max-priority"
            | "x-delivery-limit"
            | "x-stream-max-segment-size-bytes"
            | "x-initial-cluster-size"
    );
    let wants_string = matches!(
        key,
        "x-dead-letter-exchange" | "x-dead-letter-routing-key" | "x-overflow" | "x-queue-type" | "x-queue-mode"
    );
    if wants_integer && type_name != "integer" {
        return Err(match type_name {
            "longstr" => "expected integer, got longstr",
            "bool" => "expected integer, got bool",
            _ => "expected integer",
        });
    }
    if wants_string && type_name != "longstr" {
        return Err("expected longstr");
    }
    Ok(())
}

impl VirtualHostState {
    /// Types and values of a declaration's arguments, as RabbitMQ checks them.
    pub(super) fn check_queue_arguments(&self, name: &str, arguments: &FieldTable) -> Result<(), AmqpError> {
        for (key, value) in arguments.inner() {
            let key = key.as_str();
            if matches!(key, "x-dead-letter-exchange" | "x-dead-letter-routing-key")
                && warren_codec::table::as_str(value).is_none()
            {
                return Err(precondition(format!(
                    "invalid type '{}' for arg '{key}' in queue '{name}' in vhost '{}'",
                    value_type(value),
                    self.name
                )));
            }
            if let Err(problem) = validate_queue_argument(key, value) {
                return Err(precondition(format!(
                    "invalid arg '{key}' for queue '{name}' in vhost '{}': \"{problem}\"",
                    self.name
                )));
            }
        }
        let segment = warren_codec::table::get(arguments, "x-stream-max-segment-size-bytes");
        if segment.and_then(warren_codec::table::as_i64).is_some_and(|n| n > crate::stream::MAX_SEGMENT_BYTES as i64) {
            return Err(precondition("Exceeded max value for x-stream-max-segment-size-bytes"));
        }
        QueueSettings::from_arguments(arguments).map_err(|(key, problem)| {
            precondition(format!("invalid arg '{key}' for queue '{name}' in vhost '{}': {problem}", self.name))
        })?;
        Ok(())
    }
    pub(super) fn type_refusal(&self, name: &str, queue_type: QueueType, refusal: TypeRefusal) -> AmqpError {
        let vhost = &self.name;
        precondition(match refusal {
            TypeRefusal::UnknownType(problem) => {
                format!("invalid arg 'x-queue-type' for queue '{name}' in vhost '{vhost}': {problem}")
            }
            TypeRefusal::Argument(key) => format!(
                "invalid arg '{key}' for queue '{name}' in vhost '{vhost}' of queue type {}",
                queue_type.rabbitmq_name()
            ),
            TypeRefusal::Property(property) => {
                format!("invalid property '{property}' for queue '{name}' in vhost '{vhost}'")
            }
        })
    }
    /// Deletes every queue (their stored messages settled) and every
    /// exchange but the predeclared ones: the virtual host is going away.
    pub fn delete_everything(&mut self) {
        let ids: Vec<QueueId> = self.queues.keys().copied().collect();
        for id in ids {
            self.remove_queue(id);
        }
        let names: Vec<String> =
            self.exchanges.keys().filter(|n| !n.is_empty() && !n.starts_with("amq.")).map(|n| n.to_string()).collect();
        for name in names {
            let _ = self.delete_exchange(&name, false);
        }
    }
    pub fn declare_exchange(&mut self, declare: ExchangeDeclare<'_>) -> Result<(), AmqpError> {
        let ExchangeDeclare { name, kind, passive, durable, auto_delete, internal, arguments } = declare;
        if name.is_empty() {
            return Err(soft(ReplyCode::AccessRefused, "operation not permitted on the default exchange"));
        }
        if let Some(existing) = self.exchanges.get(name) {
            if passive {
                return Ok(());
            }
            if existing.type_name() != kind {
                return Err(precondition(format!(
                    "inequivalent arg 'type' for exchange '{name}' in vhost '{}': received '{kind}' but current is '{}'",
                    self.name,
                    existing.type_name()
                )));
            }
            for (what, received, current) in [
                ("durable", durable, existing.durable),
                ("auto_delete", auto_delete, existing.auto_delete),
                ("internal", internal, existing.internal),
            ] {
                if received != current {
                    return Err(precondition(format!(
                        "inequivalent arg '{what}' for exchange '{name}' in vhost '{}': received '{}' but current is '{}'",
                        self.name,
                        bool_str(received),
                        bool_str(current)
                    )));
                }
            }
            return Ok(());
        }
        if passive {
            return Err(self.not_found_exchange(name));
        }
        if name.starts_with("amq.") {
            return Err(soft(
                ReplyCode::AccessRefused,
                format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let unknown =
            |kind: &str| AmqpError::hard(ReplyCode::CommandInvalid, format!("unknown exchange type '{kind}'"), 0, 0);
        let delayed = kind == DELAYED_TYPE;
        let kind = if delayed {
            // As the RabbitMQ delayed-message plugin: routing follows the
            // type named by `x-delayed-type`.
            match warren_codec::table::get(&arguments, "x-delayed-type").and_then(warren_codec::table::as_str) {
                Some(DELAYED_TYPE) => {
                    return Err(precondition(
                        "Invalid argument, 'x-delayed-message' can't be used for 'x-delayed-type'",
                    ))
                }
                Some(inner) => ExchangeKind::parse(inner).ok_or_else(|| unknown(inner))?,
                None => {
                    return Err(precondition("Invalid argument, 'x-delayed-type' must be an existing exchange type"))
                }
            }
        } else {
            ExchangeKind::parse(kind).ok_or_else(|| unknown(kind))?
        };
        let mut exchange = Exchange::new(name, kind, durable, auto_delete, internal, arguments);
        if delayed {
            exchange = exchange.with_delay();
            self.delayed_exchanges += 1;
        }
        let policy = policy::effective(&self.policies, name, false);
        exchange.alternate_exchange = policy::alternate_exchange(&exchange.arguments, policy).map(Into::into);
        if durable {
            self.journal.push(JournalEvent::ExchangeDeclared(ExchangeDefinition {
                name: name.to_string(),
                kind: exchange.type_name().to_string(),
                auto_delete,
                internal,
                arguments: exchange.arguments.clone(),
            }));
        }
        self.exchanges.insert(name.into(), exchange);
        Ok(())
    }
    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<(), AmqpError> {
        if name.is_empty() {
            return Err(soft(ReplyCode::AccessRefused, "operation not permitted on the default exchange"));
        }
        if name.starts_with("amq.") {
            return Err(soft(
                ReplyCode::AccessRefused,
                format!("deletion of system exchange '{name}' in vhost '{}' not allowed", self.name),
            ));
        }
        let Some(exchange) = self.exchanges.get(name) else {
            // RabbitMQ answers delete-ok for a missing exchange.
            return Ok(());
        };
        if if_unused && exchange.has_bindings() {
            return Err(precondition(format!("exchange '{name}' in vhost '{}' in use", self.name)));
        }
        if let Some(exchange) = self.exchanges.remove(name) {
            if exchange.durable {
                self.journal.push(JournalEvent::ExchangeDeleted { name: Arc::from(&*exchange.name) });
            }
            if let Some(mut delayed) = exchange.delayed {
                self.delayed_exchanges = self.delayed_exchanges.saturating_sub(1);
                // Scheduled messages go with their exchange.
                let journal = &mut self.journal;
                let store_name = delayed.store_name.clone();
                delayed.scheduler.clear(|stored| {
                    journal.push(JournalEvent::Settled { queue: store_name.clone(), stored });
                });
                if exchange.durable {
                    self.journal.push(JournalEvent::QueueDeleted { queue: store_name });
                }
                self.delaying.remove(name);
            }
        }
        let destination = Destination::Exchange(name.into());
        self.unbind_everywhere(&destination);
        Ok(())
    }
    /// Removes every binding to `destination`, then auto-deletes source
    /// exchanges left without bindings.
    pub(super) fn unbind_everywhere(&mut self, destination: &Destination) {
        let mut emptied = Vec::new();
        for exchange in self.exchanges.values_mut() {
            if exchange.unbind_destination(destination) > 0 && exchange.auto_delete && !exchange.has_bindings() {
                emptied.push(exchange.name.clone());
            }
        }
        for name in emptied {
            self.remove_auto_deleted_exchange(&name);
        }
    }
    pub(super) fn source_exchange(&self, name: &str) -> Result<(), AmqpError> {
        if name.is_empty() {
            return Err(soft(ReplyCode::AccessRefused, "operation not permitted on the default exchange"));
        }
        if self.exchanges.contains_key(name) {
            Ok(())
        } else {
            Err(self.not_found_exchange(name))
        }
    }
    /// An auto-delete exchange left without bindings goes, and the bindings
    /// to it with it.
    pub(super) fn remove_auto_deleted_exchange(&mut self, name: &str) {
        if self.exchanges.remove(name).is_some_and(|x| x.durable) {
            self.journal.push(JournalEvent::ExchangeDeleted { name: Arc::from(name) });
        }
        self.unbind_everywhere(&Destination::Exchange(name.into()));
    }
    /// The stored name of a binding's destination: durable exchanges and
    /// durable queues that are not exclusive are stored, others are not.
    pub(super) fn stored_destination(&self, destination: &Destination) -> Option<(String, bool)> {
        match destination {
            Destination::Queue(id) => self
                .queues
                .get(id)
                .filter(|q| q.durable && q.exclusive_owner.is_none())
                .map(|q| (q.name.to_string(), true)),
            Destination::Exchange(name) => {
                self.exchanges.get(&**name).filter(|x| x.durable).map(|_| (name.to_string(), false))
            }
        }
    }
    pub(super) fn binding_change(&mut self, source: &str, binding: Binding, bind: bool) -> Result<(), AmqpError> {
        let vhost = self.name.clone();
        // Only bindings between durable ends are stored.
        let stored = match self.exchanges.get(source).filter(|x| x.durable) {
            Some(_) => self.stored_destination(&binding.destination).map(|(destination, destination_is_queue)| {
                BindingDefinition {
                    source: source.to_string(),
                    destination,
                    destination_is_queue,
                    routing_key: binding.routing_key.to_string(),
                    arguments: binding.arguments.clone(),
                }
            }),
            None => None,
        };
        if let Some(definition) = stored {
            self.journal.push(if bind { JournalEvent::Bound(definition) } else { JournalEvent::Unbound(definition) });
        }
        let Some(exchange) = self.exchanges.get_mut(source) else {
            return Err(soft(ReplyCode::NotFound, format!("no exchange '{source}' in vhost '{vhost}'")));
        };
        if bind {
            exchange.bind(binding).map_err(|bad| {
                precondition(format!(
                    "invalid x-match field value {bad}; expected one of all, any, all-with-x, any-with-x"
                ))
            })?;
        } else {
            exchange.unbind(&binding);
            if exchange.auto_delete && !exchange.has_bindings() {
                self.remove_auto_deleted_exchange(source);
            }
        }
        Ok(())
    }
    pub fn bind_queue(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
        bind: bool,
    ) -> Result<(), AmqpError> {
        if !bind
            && (!self.exchanges.contains_key(exchange) || !self.queue_ids.contains_key(queue))
            && !exchange.is_empty()
        {
            // RabbitMQ answers unbind-ok when there is nothing to unbind.
            return Ok(());
        }
        self.source_exchange(exchange)?;
        let id = self.queue_id(connection, queue)?;
        let binding = Binding { destination: Destination::Queue(id), routing_key: routing_key.into(), arguments };
        self.binding_change(exchange, binding, bind)
    }
    pub fn bind_exchange(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
        bind: bool,
    ) -> Result<(), AmqpError> {
        if !bind && (!self.exchanges.contains_key(source) || !self.exchanges.contains_key(destination)) {
            return Ok(());
        }
        self.source_exchange(source)?;
        self.source_exchange(destination)?;
        let binding = Binding {
            destination: Destination::Exchange(destination.into()),
            routing_key: routing_key.into(),
            arguments,
        };
        self.binding_change(source, binding, bind)
    }
    pub fn declare_queue(
        &mut self,
        connection: ConnectionId,
        declare: QueueDeclare<'_>,
    ) -> Result<QueueDeclared, AmqpError> {
        self.declare_queue_as(connection, declare, &mut |_| Ok(()))
    }
    /// `declare_queue` with `admit` asked first about the queue's final
    /// name (a server-generated one for `""`), before any other check, as
    /// RabbitMQ checks configure permission. Passive declares skip it.
    pub fn declare_queue_as(
        &mut self,
        connection: ConnectionId,
        declare: QueueDeclare<'_>,
        admit: &mut dyn FnMut(&str) -> Result<(), AmqpError>,
    ) -> Result<QueueDeclared, AmqpError> {
        let QueueDeclare { name, passive, durable, exclusive, auto_delete, arguments } = declare;
        if passive {
            if name == REPLY_TO_QUEUE {
                // As RabbitMQ: the pseudo-queue always reports one consumer.
                return Ok(QueueDeclared { name: name.to_string(), message_count: 0, consumer_count: 1 });
            }
            let id = self.queue_id(connection, name)?;
            let now = self.clock.now_ms();
            if let Some(queue) = self.queues.get_mut(&id) {
                queue.last_used = now;
            }
            return Ok(self.declared(id));
        }
        let server_named = name.is_empty();
        let generated;
        let name = if server_named {
            generated = crate::names::generate("amq.gen-");
            generated.as_str()
        } else {
            name
        };
        admit(name)?;
        let queue_type = self.check_queue_type(name, durable, exclusive, auto_delete, &arguments)?;
        let now = self.clock.now_ms();
        if let Some(&id) = self.queue_ids.get(name) {
            if let Some(queue) = self.queues.get_mut(&id) {
                queue.last_used = now;
            }
            let Some(queue) = self.queues.get(&id) else {
                return Err(self.not_found_queue(name));
            };
            if queue.is_exclusive_to_other(connection) || exclusive != queue.exclusive_owner.is_some() {
                return Err(self.locked(name));
            }
            for (what, received, current) in
                [("durable", durable, queue.durable), ("auto_delete", auto_delete, queue.auto_delete)]
            {
                if received != current {
                    return Err(precondition(format!(
                        "inequivalent arg '{what}' for queue '{name}' in vhost '{}': received '{}' but current is '{}'",
                        self.name,
                        bool_str(received),
                        bool_str(current)
                    )));
                }
            }
            for key in EQUIVALENT_QUEUE_ARGS {
                let received = warren_codec::table::get(&arguments, key);
                let current = warren_codec::table::get(&queue.arguments, key);
                // No x-queue-type means classic.
                let same_type = *key == "x-queue-type" && queue_type == queue.settings.queue_type;
                if !same_type && !equivalent(received, current) {
                    let (received, current) = match (received, current) {
                        (Some(r), Some(c)) => (format!("'{}'", plain(r)), format!("'{}'", plain(c))),
                        (r, c) => (describe(r), describe(c)),
                    };
                    return Err(precondition(format!(
                        "inequivalent arg '{key}' for queue '{name}' in vhost '{}': received {received} but current is {current}",
                        self.name
                    )));
                }
            }
            self.churn.declared += 1;
            return Ok(self.declared(id));
        }
        if !server_named && !self.declaring_shared && name.starts_with("amq.") {
            return Err(soft(
                ReplyCode::AccessRefused,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        if self.max_queues.is_some_and(|max| self.queues.len() as u64 >= max) {
            return Err(precondition(format!(
                "cannot declare queue '{name}': queue limit in vhost '{}' ({}) is reached",
                self.name,
                self.max_queues.unwrap_or_default()
            )));
        }
        let name = name.to_string();
        let id = self.next_queue_id;
        self.next_queue_id += 1;
        let owner = exclusive.then_some(connection);
        let settings = self.queue_settings(&name, &arguments).map_err(|(key, problem)| {
            precondition(format!("invalid arg '{key}' for queue '{name}' in vhost '{}': {problem}", self.name))
        })?;
        if settings.is_timed() {
            self.timed.insert(id);
        }
        self.note_consumer_timeout(&settings);
        // Exclusive queues go with their connection: never stored.
        if durable && !exclusive {
            self.journal.push(JournalEvent::QueueDeclared(QueueDefinition {
                name: name.clone(),
                auto_delete,
                arguments: arguments.clone(),
            }));
        }
        let mut queue = Queue::new(id, &name, durable, owner, auto_delete, arguments, settings);
        queue.last_used = now;
        queue.paging = self.paging;
        let stream = queue_type == QueueType::Stream;
        self.queues.insert(id, queue);
        self.queue_ids.insert(name.as_str().into(), id);
        if stream {
            if let Err(error) = self.open_stream(id) {
                tracing::error!(queue = %name, %error, "stream cannot be opened");
                self.queues.remove(&id);
                self.queue_ids.remove(name.as_str());
                self.journal.retain(|e| !matches!(e, JournalEvent::QueueDeclared(q) if q.name == name));
                return Err(AmqpError::hard(
                    ReplyCode::InternalError,
                    format!("cannot open the log of stream '{name}' in vhost '{}'", self.name),
                    0,
                    0,
                ));
            }
        }
        self.churn.declared += 1;
        self.churn.created += 1;
        Ok(self.declared(id))
    }
    /// The checks of a declaration's type, arguments and properties;
    /// returns the type.
    fn check_queue_type(
        &self,
        name: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: &FieldTable,
    ) -> Result<QueueType, AmqpError> {
        let queue_type =
            QueueType::from_arguments(arguments).map_err(|r| self.type_refusal(name, QueueType::Classic, r))?;
        // As RabbitMQ: the values of the arguments the type takes are
        // checked first, then an argument it does not take is refused.
        match queue_type.unsupported_argument(arguments) {
            Some(key) => {
                self.check_queue_arguments(name, &queue_type.supported_arguments(arguments))?;
                return Err(self.type_refusal(name, queue_type, TypeRefusal::Argument(key)));
            }
            None => self.check_queue_arguments(name, arguments)?,
        }
        queue_type
            .check_properties(durable, exclusive, auto_delete)
            .map_err(|r| self.type_refusal(name, queue_type, r))?;
        Ok(queue_type)
    }
    /// Whether declaring a queue named `name` (not here yet) would be
    /// refused, and why; its type otherwise. For declarations that are
    /// made elsewhere (a quorum queue placed through the cluster).
    pub fn check_new_queue(&self, declare: &QueueDeclare<'_>) -> Result<QueueType, AmqpError> {
        let QueueDeclare { name, durable, exclusive, auto_delete, arguments, .. } = declare;
        let queue_type = self.check_queue_type(name, *durable, *exclusive, *auto_delete, arguments)?;
        if name.starts_with("amq.") {
            return Err(soft(
                ReplyCode::AccessRefused,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        Ok(queue_type)
    }
    /// Whether a queue of this name is in the virtual host.
    pub fn has_queue(&self, name: &str) -> bool {
        self.queue_ids.contains_key(name)
    }
    pub(super) fn declared(&self, id: QueueId) -> QueueDeclared {
        match self.queues.get(&id) {
            Some(queue) => QueueDeclared {
                name: queue.name.to_string(),
                message_count: match queue.stream {
                    Some(_) => count_u32(usize::try_from(self.stream_len(queue)).unwrap_or(usize::MAX)),
                    None => count_u32(queue.len()),
                },
                consumer_count: count_u32(queue.consumers.len()),
            },
            None => QueueDeclared { name: String::new(), message_count: 0, consumer_count: 0 },
        }
    }
    pub fn purge_queue(&mut self, connection: ConnectionId, name: &str) -> Result<u32, AmqpError> {
        let id = self.queue_id(connection, name)?;
        if self.queues.get(&id).is_some_and(|q| q.stream.is_some()) {
            return Err(self.not_for_streams("queue.purge", name));
        }
        let Some(queue) = self.queues.get_mut(&id) else {
            return Ok(0);
        };
        let journal = &mut self.journal;
        let (durable, queue_name) = (queue.durable, queue.name.clone());
        let count = queue.purge(self.loader.as_deref(), |stored| {
            if durable && stored != 0 {
                journal.push(JournalEvent::Settled { queue: queue_name.clone(), stored });
            }
        });
        Ok(count_u32(count))
    }
    pub fn delete_queue(
        &mut self,
        connection: ConnectionId,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, AmqpError> {
        let Some(&id) = self.queue_ids.get(name) else {
            // RabbitMQ answers delete-ok with 0 for a missing queue.
            return Ok(0);
        };
        let id = self.queue_id(connection, name).map(|_| id)?;
        if let Some(queue) = self.queues.get(&id) {
            if if_unused && !queue.consumers.is_empty() {
                return Err(precondition(format!("queue '{name}' in vhost '{}' in use", self.name)));
            }
            if if_empty && !queue.is_empty() {
                return Err(precondition(format!("queue '{name}' in vhost '{}' not empty", self.name)));
            }
        }
        Ok(self.remove_queue(id))
    }
    /// Deletes a queue, cancelling its consumers; returns its ready count.
    pub(super) fn remove_queue(&mut self, id: QueueId) -> u32 {
        let Some(queue) = self.queues.remove(&id) else {
            return 0;
        };
        self.churn.deleted += 1;
        self.queue_ids.remove(&*queue.name);
        self.timed.remove(&id);
        // Every stored message it held is settled (durable queues), ready or
        // unacked, so the store can reclaim them; spilled bodies give their
        // space back; then the deletion itself.
        let (journal, loader) = (&mut self.journal, self.loader.as_deref());
        queue.for_each_entry(|entry| {
            if queue.durable && entry.stored != 0 {
                journal.push(JournalEvent::Settled { queue: queue.name.clone(), stored: entry.stored });
            }
            if let (Some(loader), true) = (loader, entry.spilled != 0) {
                loader.release_spilled(entry.spilled);
            }
        });
        if queue.durable {
            // A stream's deliveries are no stored entries of its own (a
            // message it shares with a durable queue has that queue's).
            let stored_here = queue.stream.is_none();
            for channel in self.channels.values().filter(|_| stored_here) {
                for unacked in channel.unacked.iter().filter(|u| u.queue == id && u.message.stored_index() != 0) {
                    self.journal.push(JournalEvent::Settled {
                        queue: queue.name.clone(),
                        stored: unacked.message.stored_index(),
                    });
                }
            }
            for message in queue.retrying().filter(|m| m.stored_index() != 0) {
                self.journal.push(JournalEvent::Settled { queue: queue.name.clone(), stored: message.stored_index() });
            }
            self.journal.push(JournalEvent::QueueDeleted { queue: queue.name.clone() });
        }
        for consumer in &queue.consumers {
            if let Some(channel) = self.channels.get_mut(&consumer.channel) {
                channel.consumers.remove(&consumer.tag);
                self.cancel_notices.push((channel.outbox.clone(), consumer.channel.channel, consumer.tag.clone()));
            }
        }
        self.unbind_everywhere(&Destination::Queue(id));
        count_u32(queue.len())
    }
}
