//! Changes to a virtual host from the API: applied in one
//! [`Session`] (dispatch and the journal's write included), answered once
//! what they wrote to the log is durable, as an AMQP reply would be.

use std::time::Duration;

use warren_codec::reply::AmqpError;
use warren_server::session::Session;
use warren_server::store::{Appended, Store};

use crate::error::ApiError;
use crate::AppState;

/// The connection id the API's changes are made under (exclusive queues of
/// real connections stay theirs).
pub const HTTP_CONNECTION: u64 = u64::MAX;

/// Runs `apply` on the virtual host and waits until its log entries (a
/// definition change, a persistent message) are durable, and in a cluster
/// until what it handed to Raft groups (a definition every node must know,
/// a message into a quorum queue) is committed.
pub async fn change<T>(
    state: &AppState,
    vhost: &str,
    apply: impl FnOnce(&mut Session<'_>) -> Result<T, AmqpError>,
) -> Result<T, ApiError> {
    let host = state.broker.vhost(vhost).ok_or(ApiError::NotFound)?;
    let store = state.broker.store.clone();
    let (result, appended) = {
        let mut session = Session::open(&host, &store);
        let result = apply(&mut session);
        let appended = session.flush_indices();
        // Dropping the session runs dispatch and writes what it journaled.
        drop(session);
        (result, appended)
    };
    let value = result.map_err(|e| ApiError::from_amqp(&e))?;
    let appended = appended.map_err(|_| not_stored())?;
    let ticket = appended.replicated;
    if let Some(index) = wanted(appended) {
        wait_durable(&store, index).await?;
    }
    if let Some(ticket) = ticket {
        if !state.broker.tickets.wait(ticket).await {
            return Err(ApiError::Internal("the change could not be replicated (see the broker log)".into()));
        }
    }
    Ok(value)
}

fn wanted(appended: Appended) -> Option<u64> {
    match (appended.definitions, appended.published) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn not_stored() -> ApiError {
    ApiError::Internal("the change could not be stored (see the broker log)".into())
}

async fn wait_durable(store: &Store, index: u64) -> Result<(), ApiError> {
    let mut durable = store.durable_watch();
    loop {
        if store.is_poisoned() {
            return Err(not_stored());
        }
        match tokio::time::timeout(Duration::from_millis(100), durable.wait_for(|&d| d >= index)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(_)) => return Err(not_stored()),
            Err(_) => {}
        }
    }
}
