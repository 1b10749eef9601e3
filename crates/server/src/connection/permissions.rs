//! Permission checks on the channel path. The user's permissions in the
//! open virtual host are cached and re-read only when the access
//! definitions' generation moves, so a publish pays one atomic load.

use std::sync::Arc;

use warren_codec::reply::AmqpError;
use warren_core::VirtualHostState;

use super::{access_refused, Connection};
use crate::access::{Permission, Permissions, Resource};
use crate::broker::Broker;

#[derive(Default)]
pub(super) struct PermissionCache {
    permissions: Option<Arc<Permissions>>,
    /// The access generation `permissions` were read at.
    generation: u64,
}

impl PermissionCache {
    pub(super) fn set(&mut self, permissions: Arc<Permissions>, generation: u64) {
        self.permissions = Some(permissions);
        self.generation = generation;
    }

    pub(super) fn current(&mut self, broker: &Broker, user: &str, vhost: &str) -> Arc<Permissions> {
        let generation = broker.access_generation();
        match &self.permissions {
            Some(permissions) if generation == self.generation => permissions.clone(),
            _ => {
                let permissions = broker
                    .access()
                    .permissions(user, vhost)
                    .unwrap_or_else(|| Arc::new(Permissions::none(user, vhost)));
                self.set(permissions.clone(), generation);
                permissions
            }
        }
    }
}

impl Connection {
    /// Checks a permission as RabbitMQ does (403, channel closed), with the
    /// permissions re-read if the access definitions changed.
    pub(super) fn allow(&mut self, permission: Permission, resource: Resource, name: &str) -> Result<(), AmqpError> {
        self.current_permissions().check(permission, resource, name).map_err(access_refused)
    }

    pub(super) fn allow_topic(
        &mut self,
        permission: Permission,
        exchange: &str,
        routing_key: &str,
        state: &VirtualHostState,
    ) -> Result<(), AmqpError> {
        let permissions = self.current_permissions();
        if !permissions.has_topic_rules(exchange) || state.exchange(exchange).is_none_or(|e| e.type_name() != "topic") {
            return Ok(());
        }
        permissions.check_topic(permission, exchange, routing_key).map_err(access_refused)
    }

    /// queue.bind and unbind: write on the queue, read on the exchange (and
    /// its topic permission for the binding key).
    pub(super) fn allow_bind(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        state: &VirtualHostState,
    ) -> Result<(), AmqpError> {
        self.allow(Permission::Write, Resource::Queue, queue)?;
        self.allow(Permission::Read, Resource::Exchange, exchange)?;
        self.allow_topic(Permission::Read, exchange, routing_key, state)
    }

    pub(super) fn current_permissions(&mut self) -> Arc<Permissions> {
        self.permissions.current(&self.broker, &self.user, &self.vhost_name)
    }
}
