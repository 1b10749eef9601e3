//! Exchanges and their binding tables, one structure per exchange type so
//! that routing a message costs a hash lookup (direct), a list copy (fanout),
//! a trie walk (topic) or a scan of header bindings (headers).

use std::collections::HashMap;

use warren_codec::types::FieldTable;

use crate::headers::{self, MatchMode};
use crate::scheduler::Scheduler;
use crate::topic::TopicTrie;
use crate::QueueId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(name: &str) -> Option<ExchangeKind> {
        match name {
            "direct" => Some(ExchangeKind::Direct),
            "fanout" => Some(ExchangeKind::Fanout),
            "topic" => Some(ExchangeKind::Topic),
            "headers" => Some(ExchangeKind::Headers),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// Where a binding leads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    Queue(QueueId),
    Exchange(Box<str>),
}

/// A binding as declared: kept for equality on unbind and for listing.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: Box<str>,
    pub arguments: FieldTable,
}

#[derive(Debug)]
enum Table {
    Direct(HashMap<Box<[u8]>, Vec<Destination>>),
    Fanout(Vec<Destination>),
    Topic(TopicTrie<Destination>),
    Headers(Vec<(MatchMode, FieldTable, Destination)>),
}

#[derive(Debug)]
pub struct Exchange {
    pub name: Box<str>,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    pub alternate_exchange: Option<Box<str>>,
    /// An `x-delayed-message` exchange (routing by `kind`, its
    /// `x-delayed-type`): messages with an `x-delay` header wait here.
    pub delayed: Option<Delayed>,
    bindings: Vec<Binding>,
    table: Table,
}

/// Prefix of the log name of a delayed exchange's scheduled messages.
pub const DELAYED_PREFIX: &str = "amq.delayed/";

/// The exchange type name of delayed-message exchanges.
pub const DELAYED_TYPE: &str = "x-delayed-message";

#[derive(Debug)]
pub struct Delayed {
    /// The name scheduled messages are stored under in the log (a queue
    /// name no client can declare).
    pub store_name: std::sync::Arc<str>,
    pub scheduler: Scheduler,
}

impl Exchange {
    pub fn new(
        name: &str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        let alternate_exchange = warren_codec::table::get(&arguments, "alternate-exchange")
            .and_then(warren_codec::table::as_str)
            .map(Into::into);
        let table = match kind {
            ExchangeKind::Direct => Table::Direct(HashMap::new()),
            ExchangeKind::Fanout => Table::Fanout(Vec::new()),
            ExchangeKind::Topic => Table::Topic(TopicTrie::default()),
            ExchangeKind::Headers => Table::Headers(Vec::new()),
        };
        Exchange {
            name: name.into(),
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            alternate_exchange,
            delayed: None,
            bindings: Vec::new(),
            table,
        }
    }

    /// Makes this a delayed-message exchange routing as its `kind`.
    pub fn with_delay(mut self) -> Self {
        let store_name = format!("{}{}", DELAYED_PREFIX, self.name).into();
        self.delayed = Some(Delayed { store_name, scheduler: Scheduler::default() });
        self
    }

    /// The type a client declared.
    pub fn type_name(&self) -> &'static str {
        if self.delayed.is_some() {
            DELAYED_TYPE
        } else {
            self.kind.name()
        }
    }

    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    pub fn has_bindings(&self) -> bool {
        !self.bindings.is_empty()
    }

    /// Adds a binding; a duplicate is a no-op, as in RabbitMQ. `Err` carries
    /// the invalid `x-match` value of a headers binding.
    pub fn bind(&mut self, binding: Binding) -> Result<(), String> {
        if self.bindings.contains(&binding) {
            return Ok(());
        }
        let destination = binding.destination.clone();
        match &mut self.table {
            Table::Direct(map) => {
                map.entry(binding.routing_key.as_bytes().into()).or_default().push(destination);
            }
            Table::Fanout(list) => list.push(destination),
            Table::Topic(trie) => {
                trie.insert(&binding.routing_key, destination);
            }
            Table::Headers(list) => {
                let mode = MatchMode::from_arguments(&binding.arguments)?;
                list.push((mode, binding.arguments.clone(), destination));
            }
        }
        self.bindings.push(binding);
        Ok(())
    }

    /// Removes one binding; returns whether it existed.
    pub fn unbind(&mut self, binding: &Binding) -> bool {
        let Some(position) = self.bindings.iter().position(|b| b == binding) else {
            return false;
        };
        self.bindings.remove(position);
        let destination = &binding.destination;
        match &mut self.table {
            Table::Direct(map) => {
                if let Some(list) = map.get_mut(binding.routing_key.as_bytes()) {
                    if let Some(i) = list.iter().position(|d| d == destination) {
                        list.remove(i);
                    }
                    if list.is_empty() {
                        map.remove(binding.routing_key.as_bytes());
                    }
                }
            }
            Table::Fanout(list) => {
                if let Some(i) = list.iter().position(|d| d == destination) {
                    list.remove(i);
                }
            }
            Table::Topic(trie) => {
                // The trie holds one entry per (key, destination); another
                // binding with the same key and destination but different
                // arguments keeps it alive.
                let still_bound =
                    self.bindings.iter().any(|b| b.routing_key == binding.routing_key && &b.destination == destination);
                if !still_bound {
                    trie.remove(&binding.routing_key, destination);
                }
            }
            Table::Headers(list) => {
                if let Some(i) = list.iter().position(|(_, args, d)| d == destination && *args == binding.arguments) {
                    list.remove(i);
                }
            }
        }
        true
    }

    /// Removes every binding to `destination`; returns how many there were.
    pub fn unbind_destination(&mut self, destination: &Destination) -> usize {
        let doomed: Vec<Binding> = self.bindings.iter().filter(|b| &b.destination == destination).cloned().collect();
        for binding in &doomed {
            self.unbind(binding);
        }
        doomed.len()
    }

    /// Appends the destinations a message routes to (duplicates possible).
    pub fn route(&self, routing_key: &[u8], headers: Option<&FieldTable>, out: &mut Vec<Destination>) {
        match &self.table {
            Table::Direct(map) => {
                if let Some(list) = map.get(routing_key) {
                    out.extend(list.iter().cloned());
                }
            }
            Table::Fanout(list) => out.extend(list.iter().cloned()),
            Table::Topic(trie) => {
                if let Ok(key) = std::str::from_utf8(routing_key) {
                    trie.matches(key, out);
                }
            }
            Table::Headers(list) => {
                for (mode, arguments, destination) in list {
                    if headers::matches(*mode, arguments, headers) {
                        out.push(destination.clone());
                    }
                }
            }
        }
    }

    /// Headers exchanges need the message headers parsed; others do not.
    pub fn needs_headers(&self) -> bool {
        self.kind == ExchangeKind::Headers
    }
}
