//! Users, permissions, virtual hosts and limits through lapin: each refusal
//! with RabbitMQ's code and text, the right scope closed, nothing created
//! that was refused, and every other client carrying on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{consume, eventually, reply, TestServer};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

async fn connect(uri: &str) -> Result<Connection, lapin::Error> {
    Connection::connect(uri, ConnectionProperties::default()).await
}

async fn declare(ch: &Channel, name: &str) -> Result<(), lapin::Error> {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), FieldTable::default()).await.map(drop)
}

/// Whether the queue exists (on a fresh channel: a miss closes it).
async fn exists(conn: &Connection, name: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(name.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .is_ok()
}

/// A server with vhost `v`, user `u` (password `pw`), and guest allowed
/// everywhere (to look at what `u` did or did not create).
async fn server_with_user(configure: &str, write: &str, read: &str) -> TestServer {
    let server = TestServer::start().await;
    let (c, w, r) = (configure.to_string(), write.to_string(), read.to_string());
    server.ctl(move |d| {
        d.add_vhost("v")?;
        d.add_user("u", "pw")?;
        d.set_permissions("v", "guest", ".*", ".*", ".*")?;
        d.set_permissions("v", "u", &c, &w, &r)
    });
    server
}

async fn guest_channel(server: &TestServer) -> (Connection, Channel) {
    let conn = connect(&server.uri_as("guest", "guest", "v")).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_are_hashed_checked_and_changeable() {
    let server = server_with_user(".*", ".*", ".*").await;
    let stored = std::fs::read_to_string(server.config.data_dir.join("access.json")).unwrap();
    assert!(stored.contains("$argon2id$") && !stored.contains("\"pw\""), "only a salted hash is stored");
    // First login runs the KDF, the second is served from the login cache.
    for _ in 0..2 {
        connect(&server.uri_as("u", "pw", "v")).await.unwrap().close(200, "bye".into()).await.unwrap();
    }
    let err = connect(&server.uri_as("u", "wrong", "v")).await.unwrap_err();
    assert_eq!(reply(&err).0, 403);
    let open = connect(&server.uri_as("u", "pw", "v")).await.unwrap();
    server.ctl(|d| d.change_password("u", "new"));
    assert_eq!(reply(&connect(&server.uri_as("u", "pw", "v")).await.unwrap_err()).0, 403, "old password refused");
    connect(&server.uri_as("u", "new", "v")).await.unwrap();
    // The connection opened before the change is untouched.
    open.create_channel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_without_permissions_is_refused_at_open() {
    let server = server_with_user(".*", ".*", ".*").await;
    let err = connect(&server.uri_as("u", "pw", "/")).await.unwrap_err();
    assert_eq!(reply(&err), (530, "NOT_ALLOWED - access to vhost '/' refused for user 'u'".into()));
    connect(&server.uri_as("u", "pw", "v")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_write_and_read_are_checked_where_rabbitmq_checks_them() {
    let server = server_with_user("^app\\.", "^app\\.", "^app\\.").await;
    let (guest, g) = guest_channel(&server).await;
    declare(&g, "other").await.unwrap();
    let conn = connect(&server.uri_as("u", "pw", "v")).await.unwrap();

    // configure: declare and delete.
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "app.jobs").await.unwrap();
    let err = declare(&ch, "xapp.jobs").await.unwrap_err();
    assert_eq!(
        reply(&err),
        (403, "ACCESS_REFUSED - access to queue 'xapp.jobs' in vhost 'v' refused for user 'u'".into())
    );
    assert!(!exists(&guest, "xapp.jobs").await, "nothing created");
    // A passive declare needs no permission.
    let ch = conn.create_channel().await.unwrap();
    assert!(exists(&conn, "other").await);
    let err = ch.queue_delete("other".into(), QueueDeleteOptions::default()).await.unwrap_err();
    assert_eq!(reply(&err).0, 403);
    assert!(exists(&guest, "other").await, "not deleted");
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .exchange_declare("logs".into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(
        reply(&err),
        (403, "ACCESS_REFUSED - access to exchange 'logs' in vhost 'v' refused for user 'u'".into())
    );
    // A server-named queue is checked under its generated name.
    let ch = conn.create_channel().await.unwrap();
    let err = declare(&ch, "").await.unwrap_err();
    assert!(reply(&err).1.contains("access to queue 'amq.gen-"), "{err:?}");

    // write: publishing, checked against amq.default for the default exchange.
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirm = ch
        .basic_publish("".into(), "app.jobs".into(), BasicPublishOptions::default(), b"x", BasicProperties::default())
        .await;
    let err = match confirm {
        Ok(confirm) => confirm.await.unwrap_err(),
        Err(err) => err,
    };
    assert_eq!(
        reply(&err),
        (403, "ACCESS_REFUSED - access to exchange 'amq.default' in vhost 'v' refused for user 'u'".into())
    );
    assert_eq!(
        g.queue_declare(
            "app.jobs".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default()
        )
        .await
        .unwrap()
        .message_count(),
        0
    );

    // read: consume and get.
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .basic_consume("other".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(reply(&err), (403, "ACCESS_REFUSED - access to queue 'other' in vhost 'v' refused for user 'u'".into()));
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(reply(&ch.basic_get("other".into(), BasicGetOptions::default()).await.unwrap_err()).0, 403);
    let ch = conn.create_channel().await.unwrap();
    ch.basic_get("app.jobs".into(), BasicGetOptions::default()).await.unwrap();

    // bind: write on the queue, read on the exchange.
    let err = ch
        .queue_bind(
            "app.jobs".into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        reply(&err),
        (403, "ACCESS_REFUSED - access to exchange 'amq.direct' in vhost 'v' refused for user 'u'".into())
    );
    // The connection survives every channel error.
    assert!(conn.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_permissions_restrict_routing_keys() {
    let server = server_with_user(".*", ".*", ".*").await;
    server.ctl(|d| d.set_topic_permissions("v", "u", "amq.topic", "^{username}\\.", "^public\\."));
    let conn = connect(&server.uri_as("u", "pw", "v")).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "mine").await.unwrap();
    ch.queue_bind(
        "mine".into(),
        "amq.topic".into(),
        "public.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let ok = ch
        .basic_publish(
            "amq.topic".into(),
            "u.x".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ok.is_ack());
    let err = match ch
        .basic_publish(
            "amq.topic".into(),
            "w.x".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
    {
        Ok(confirm) => confirm.await.unwrap_err(),
        Err(err) => err,
    };
    assert_eq!(
        reply(&err),
        (
            403,
            "ACCESS_REFUSED - access to topic 'w.x' in exchange 'amq.topic' in vhost 'v' refused for user 'u'".into()
        )
    );
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .queue_bind(
            "mine".into(),
            "amq.topic".into(),
            "private.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply(&err).0, 403);
    // Other exchanges are not restricted by it.
    let ch = conn.create_channel().await.unwrap();
    ch.queue_bind("mine".into(), "amq.direct".into(), "w.x".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_and_user_limits() {
    let server = server_with_user(".*", ".*", ".*").await;
    server.ctl(|d| d.set_vhost_limits("v", r#"{"max-connections": 2, "max-queues": 1}"#));
    let a = connect(&server.uri_as("u", "pw", "v")).await.unwrap();
    let _b = connect(&server.uri_as("guest", "guest", "v")).await.unwrap();
    let err = connect(&server.uri_as("u", "pw", "v")).await.unwrap_err();
    assert_eq!(
        reply(&err),
        (530, "NOT_ALLOWED - access to vhost 'v' refused for user 'u': connection limit (2) is reached".into())
    );
    let ch = a.create_channel().await.unwrap();
    declare(&ch, "one").await.unwrap();
    declare(&ch, "one").await.unwrap();
    let err = declare(&ch, "two").await.unwrap_err();
    assert_eq!(
        reply(&err),
        (406, "PRECONDITION_FAILED - cannot declare queue 'two': queue limit in vhost 'v' (1) is reached".into())
    );
    a.close(200, "bye".into()).await.unwrap();
    // Kept open: it counts towards the user limit below.
    let _again = connect(&server.uri_as("u", "pw", "v")).await.unwrap();

    server.ctl(|d| {
        d.clear_vhost_limits("v")?;
        d.set_user_limits("u", r#"{"max-connections": 2, "max-channels": 2}"#)
    });
    let c = connect(&server.uri_as("u", "pw", "v")).await.unwrap();
    let err = connect(&server.uri_as("u", "pw", "v")).await.unwrap_err();
    assert_eq!(
        reply(&err),
        (530, "NOT_ALLOWED - connection refused for user 'u': user connection limit (2) is reached".into())
    );
    let _c1 = c.create_channel().await.unwrap();
    let _c2 = c.create_channel().await.unwrap();
    let err = c.create_channel().await.unwrap_err();
    assert_eq!(reply(&err).0, 530, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_connection_and_consumer_limits() {
    let server = TestServer::with_config(|c| {
        c.max_connections = 2;
        c.consumer_max_per_channel = 1;
    })
    .await;
    let a = connect(&server.uri()).await.unwrap();
    let _b = connect(&server.uri()).await.unwrap();
    let err = connect(&server.uri()).await.unwrap_err();
    assert_eq!(reply(&err), (530, "NOT_ALLOWED - connection refused: node connection limit (2) is reached".into()));
    let ch = a.create_channel().await.unwrap();
    declare(&ch, "q").await.unwrap();
    // Kept alive: lapin cancels a consumer whose handle is dropped.
    let _first = consume(&ch, "q", "", false).await;
    // A connection error: lapin reports it through the pending consume or,
    // depending on timing, only as a connection event.
    let mut events = a.events_listener();
    let err = match ch.basic_consume("q".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await
    {
        Err(err) => err,
        Ok(_) => loop {
            let event = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap();
            if let lapin::Event::Error(err) = event {
                break err;
            }
        },
    };
    assert_eq!(reply(&err), (530, "NOT_ALLOWED - reached maximum (1) of consumers per channel".into()));
    eventually("a connection error closes the connection, as in RabbitMQ", || async { !a.status().connected() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhosts_and_users_change_while_running() {
    let server = server_with_user(".*", ".*", ".*").await;
    // A new vhost is usable at once; its definitions are separate.
    server.ctl(|d| {
        d.add_vhost("w")?;
        d.set_permissions("w", "u", ".*", ".*", ".*")
    });
    let in_w = connect(&server.uri_as("u", "pw", "w")).await.unwrap();
    let ch = in_w.create_channel().await.unwrap();
    declare(&ch, "only-in-w").await.unwrap();
    let in_v = connect(&server.uri_as("u", "pw", "v")).await.unwrap();
    assert!(!exists(&in_v, "only-in-w").await);

    // Permissions cleared: the next operation is refused.
    server.ctl(|d| d.clear_permissions("w", "u"));
    let err = declare(&ch, "again").await.unwrap_err();
    assert_eq!(reply(&err).0, 403);

    // Deleting the vhost closes its connections and drops its contents.
    server.ctl(|d| d.delete_vhost("w"));
    eventually("the connection on a deleted vhost is closed", || async { !in_w.status().connected() }).await;
    server.ctl(|d| {
        d.add_vhost("w")?;
        d.set_permissions("w", "u", ".*", ".*", ".*")
    });
    let again = connect(&server.uri_as("u", "pw", "w")).await.unwrap();
    assert!(!exists(&again, "only-in-w").await, "a recreated vhost starts empty");

    // Deleting the user closes its connections; guest is untouched.
    let (guest, _) = guest_channel(&server).await;
    server.ctl(|d| d.delete_user("u"));
    eventually("the deleted user's connections are closed", || async {
        !in_v.status().connected() && !again.status().connected()
    })
    .await;
    assert!(guest.status().connected());
    assert_eq!(reply(&connect(&server.uri_as("u", "pw", "v")).await.unwrap_err()).0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_guest_is_loopback_only_and_can_be_deleted() {
    let server = TestServer::start().await;
    assert!(server.config.loopback_only("guest"));
    server.ctl(|d| {
        d.add_user("admin", "pw")?;
        d.set_permissions("/", "admin", ".*", ".*", ".*")?;
        d.delete_user("guest")
    });
    assert_eq!(reply(&connect(&server.uri()).await.unwrap_err()).0, 403);
    let config = server.stop_keeping_data().await;
    // The deletion persists across a restart.
    let server = TestServer::with_config(|c| *c = config).await;
    assert_eq!(reply(&connect(&server.uri()).await.unwrap_err()).0, 403);
    connect(&server.uri_as("admin", "pw", "/")).await.unwrap();
}
