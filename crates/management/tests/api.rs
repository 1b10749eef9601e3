//! The management API against a real broker over real TCP, through
//! `rabbitmq_http_client` (the Rust client `rabbitmqadmin` v2 is built on,
//! which deserializes RabbitMQ's JSON strictly), lapin for the AMQP side, and
//! raw HTTP where status codes and headers are the point.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rabbitmq_http_client::blocking_api::Client;
use rabbitmq_http_client::requests::{ExchangeParams, QueueParams};
use serde_json::{json, Value};
use warren_server::config::User;
use warren_server::{Config, Server};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A broker and its management API on ephemeral loopback ports, in a
/// runtime of their own (the HTTP client under test is blocking).
struct Node {
    amqp: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

fn user(name: &str, password: &str, tags: &[&str]) -> User {
    User {
        name: name.into(),
        password: password.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        loopback_only: false,
    }
}

impl Node {
    fn start() -> Node {
        Node::start_with(|_| {})
    }

    fn start_with(adjust: impl FnOnce(&mut Config)) -> Node {
        let dir = std::env::temp_dir().join(format!(
            "warren-mgmt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let config = Config {
            amqp_port: 0,
            http_port: 0,
            collect_statistics_interval_ms: 100,
            bind: vec!["127.0.0.1".into()],
            data_dir: dir.clone(),
            users: vec![
                user("boss", "boss-pw", &["administrator"]),
                user("app", "app-pw", &["management"]),
                user("plain", "plain-pw", &[]),
            ],
            ..Config::default()
        };
        let mut config = config;
        adjust(&mut config);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                let server = Server::bind(config).await.unwrap();
                let amqp = server.local_addrs()[0];
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let http = listener.local_addr().unwrap();
                let listeners = vec![warren_management::Listener { protocol: "amqp", address: amqp }];
                let prometheus = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let metrics = prometheus.local_addr().unwrap();
                let management = warren_management::Management::new(server.broker(), vec![listener], listeners)
                    .with_prometheus(vec![prometheus]);
                let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
                let http_task = tokio::spawn(management.run(async move {
                    let _ = http_stopped.await;
                }));
                ready_tx.send((amqp, http, metrics)).unwrap();
                server
                    .run(async move {
                        let _ = stopped.await;
                    })
                    .await;
                let _ = stop_http.send(());
                let _ = http_task.await;
            });
        });
        let (amqp, http, metrics) = ready_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        Node { amqp, http, metrics, stop: Some(stop), thread: Some(thread), dir }
    }

    fn client(&self, user: &str, password: &str) -> Client<String, String, String> {
        Client::new(format!("http://{}/api", self.http), user.to_string(), password.to_string())
    }

    fn admin(&self) -> Client<String, String, String> {
        self.client("boss", "boss-pw")
    }

    fn amqp_uri(&self) -> String {
        format!("amqp://boss:boss-pw@{}/%2F", self.amqp)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTP/1.1 request: (status, headers lower-cased, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: Option<&str>,
) -> (u16, HashMap<String, String>, String) {
    http_as(addr, method, path, auth, body, "application/json")
}

/// The same with another `Content-Type`.
fn http_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: Option<&str>,
    content_type: &str,
) -> (u16, HashMap<String, String>, String) {
    use base64::Engine;
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some((user, password)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        request.push_str(&format!("Authorization: Basic {token}\r\n"));
    }
    let body = body.unwrap_or("");
    request.push_str(&format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// The status of a POST announcing `length` bytes of which only the start
/// is sent: a server that checks the limit answers without the rest.
fn oversized_post(addr: SocketAddr, path: &str, length: usize) -> u16 {
    use base64::Engine;
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let token = base64::engine::general_purpose::STANDARD.encode("boss:boss-pw");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{\"payload\":\""
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut response = [0u8; 64];
    let n = stream.read(&mut response).unwrap_or(0);
    let text = String::from_utf8_lossy(&response[..n]);
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

const ADMIN: Option<(&str, &str)> = Some(("boss", "boss-pw"));

#[test]
fn a_strict_client_reads_the_overview_whoami_and_node() {
    let node = Node::start();
    let client = node.admin();
    let overview = client.overview().unwrap();
    assert!(overview.node.starts_with("warren@"), "{}", overview.node);
    assert!(overview.listeners.iter().any(|l| l.protocol == "amqp" && l.port == u32::from(node.amqp.port())));
    assert_eq!(overview.object_totals.exchanges, 6, "the default exchange and the five amq.* ones");
    let me = client.current_user().unwrap();
    assert_eq!(me.name, "boss");
    assert_eq!(client.list_nodes().unwrap().len(), 1);
    let (status, _, body) = http(node.http, "GET", "/api/nodes", ADMIN, None);
    assert_eq!(status, 200, "{body}");
    let nodes = json_of(&body);
    let node_json = &nodes[0];
    assert_eq!(node_json["warren_spill_messages"], json!(0));
    assert_eq!(node_json["warren_paging_pressure"], json!(false));
    assert!(node_json["warren_paging_threshold"].as_u64().unwrap() > 0);
    let vhosts = client.list_vhosts().unwrap();
    assert_eq!(vhosts.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["/"]);
}

#[test]
fn queues_are_declared_published_to_peeked_purged_and_deleted_over_http() {
    let node = Node::start();
    let client = node.admin();
    let mut arguments = serde_json::Map::new();
    arguments.insert("x-max-length".into(), json!(10));
    client.declare_queue("/", &QueueParams::new_durable_classic_queue("orders", Some(arguments))).unwrap();
    let info = client.get_queue_info("/", "orders").unwrap();
    assert!(info.durable && !info.exclusive && info.queue_type == "classic");
    assert_eq!(info.arguments.0.get("x-max-length"), Some(&json!(10)));

    let properties = serde_json::Map::from_iter([("delivery_mode".to_string(), json!(2))]);
    let routed = client.publish_message("/", "amq.default", "orders", "first order", properties.clone()).unwrap();
    assert!(routed.routed);
    let unrouted = client.publish_message("/", "amq.default", "nowhere", "lost", properties).unwrap();
    assert!(!unrouted.routed);

    // A peek leaves the message in the queue, marked redelivered.
    let peeked = client.get_messages("/", "orders", 5, "ack_requeue_true").unwrap();
    assert_eq!(peeked.len(), 1);
    assert_eq!(peeked[0].payload, "first order");
    assert_eq!(client.get_queue_info("/", "orders").unwrap().message_count, 1);
    let again = client.get_messages("/", "orders", 1, "ack_requeue_true").unwrap();
    assert!(again[0].redelivered);

    let (status, _, body) = http(node.http, "DELETE", "/api/queues/%2F/orders?if-empty=true", ADMIN, None);
    assert_eq!(status, 400, "not empty: {body}");
    client.purge_queue("/", "orders").unwrap();
    assert_eq!(client.get_queue_info("/", "orders").unwrap().message_count, 0);
    client.delete_queue("/", "orders", false).unwrap();
    assert!(client.get_queue_info("/", "orders").is_err(), "gone");
    let (status, _, body) = http(node.http, "GET", "/api/queues/%2F/orders", ADMIN, None);
    assert_eq!(status, 404);
    assert_eq!(json_of(&body), json!({"error": "Object Not Found", "reason": "Not Found"}));
}

#[test]
fn an_amqp_clients_queue_consumer_and_connection_are_listed_and_the_connection_closed_with_320() {
    let node = Node::start();
    let client = node.admin();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (conn, _consumer) = runtime.block_on(async {
        let conn = lapin::Connection::connect(&node.amqp_uri(), lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let options = lapin::options::QueueDeclareOptions::default();
        ch.queue_declare("work".into(), options, lapin::types::FieldTable::default()).await.unwrap();
        for _ in 0..3 {
            ch.basic_publish(
                "".into(),
                "work".into(),
                lapin::options::BasicPublishOptions::default(),
                b"job",
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
        }
        let worker = conn.create_channel().await.unwrap();
        worker.basic_qos(1, lapin::options::BasicQosOptions::default()).await.unwrap();
        let consumer = worker
            .basic_consume(
                "work".into(),
                "worker-1".into(),
                lapin::options::BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        (conn, consumer)
    });
    let mut info = client.get_queue_info("/", "work").unwrap();
    for _ in 0..100 {
        if info.unacknowledged_message_count == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        info = client.get_queue_info("/", "work").unwrap();
    }
    assert_eq!((info.message_count, info.unacknowledged_message_count, info.consumer_count), (3, 1, 1));
    let consumers = client.list_consumers().unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0].consumer_tag, "worker-1");
    let (_, _, body) = http(node.http, "GET", "/api/consumers", ADMIN, None);
    let consumer = &json_of(&body)[0];
    assert_eq!((consumer["prefetch_count"].clone(), consumer["ack_required"].clone()), (json!(1), json!(true)));
    let connections = client.list_connections().unwrap();
    assert_eq!(connections.len(), 1);
    assert_eq!(connections[0].username, "boss");
    assert_eq!(connections[0].channel_count, 2);
    assert_eq!(client.list_channels().unwrap().len(), 2);
    // Per connection, with the worker channel's prefetch.
    let path = format!("/api/connections/{}/channels", connections[0].name.replace(' ', "%20").replace('>', "%3E"));
    let (status, _, body) = http(node.http, "GET", &path, ADMIN, None);
    assert_eq!(status, 200, "{body}");
    let channels = json_of(&body);
    let worker = channels.as_array().unwrap().iter().find(|c| c["number"] == 2).expect("channel 2").clone();
    assert_eq!((worker["prefetch_count"].clone(), worker["consumer_count"].clone()), (json!(1), json!(1)));
    let name = worker["name"]
        .as_str()
        .unwrap()
        .replace(' ', "%20")
        .replace('>', "%3E")
        .replace('(', "%28")
        .replace(')', "%29");
    let (status, _, body) = http(node.http, "GET", &format!("/api/channels/{name}"), ADMIN, None);
    assert_eq!((status, json_of(&body)["messages_unacknowledged"].clone()), (200, json!(1)));

    let mut events = conn.events_listener();
    client.close_connection(&connections[0].name, Some("maintenance"), false).unwrap();
    let closed = runtime.block_on(async {
        use futures_lite::StreamExt;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(5), events.next()).await.ok().flatten();
            match event {
                Some(lapin::Event::Error(error)) => break Some(error),
                Some(_) => continue,
                None => break None,
            }
        }
    });
    let closed = closed.map(|error| match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => (amqp.get_id(), amqp.get_message().to_string()),
        other => (0, format!("{other:?}")),
    });
    assert_eq!(closed, Some((320, "CONNECTION_FORCED - maintenance".to_string())));
    let closed = !conn.status().connected();
    assert!(closed, "the connection was closed");
    for _ in 0..100 {
        if client.list_connections().unwrap().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the closed connection is still listed");
}

#[test]
fn exchanges_and_bindings_are_declared_listed_and_removed() {
    let node = Node::start();
    let client = node.admin();
    client.declare_exchange("/", &ExchangeParams::durable_fanout("events", None)).unwrap();
    client.declare_queue("/", &QueueParams::new_durable_classic_queue("audit", None)).unwrap();
    client.bind_queue("/", "audit", "events", Some("anything"), None).unwrap();
    let bindings = client.list_queue_bindings("/", "audit").unwrap();
    assert_eq!(bindings.len(), 2, "the default exchange's and ours: {bindings:?}");
    assert!(bindings.iter().any(|b| b.source == "events" && b.routing_key == "anything"));
    let routed = client.publish_message("/", "events", "", "event", serde_json::Map::new()).unwrap();
    assert!(routed.routed);
    assert!(client.list_exchanges().unwrap().iter().any(|x| x.name == "events" && x.exchange_type == "fanout"));

    let (status, _, body) = http(node.http, "GET", "/api/exchanges/%2F/events/bindings/source", ADMIN, None);
    assert_eq!(status, 200);
    let key = json_of(&body)[0]["properties_key"].as_str().unwrap().to_string();
    assert_eq!(key, "anything");
    let (status, _, _) = http(node.http, "DELETE", &format!("/api/bindings/%2F/e/events/q/audit/{key}"), ADMIN, None);
    assert_eq!(status, 204);
    assert_eq!(client.list_queue_bindings("/", "audit").unwrap().len(), 1);
    client.delete_exchange("/", "events", false).unwrap();
    assert!(!client.list_exchanges().unwrap().iter().any(|x| x.name == "events"));
}

#[test]
fn health_checks_answer_200_or_503_as_rabbitmq_does() {
    let node = Node::start();
    let client = node.admin();
    client.health_check_cluster_wide_alarms().unwrap();
    client.health_check_local_alarms().unwrap();
    client.health_check_port_listener(node.amqp.port()).unwrap();
    let (status, _, body) = http(node.http, "GET", "/api/health/checks/port-listener/1", ADMIN, None);
    assert_eq!(status, 503);
    assert_eq!(json_of(&body)["status"], "failed");
    let (status, _, _) = http(node.http, "GET", "/api/health/checks/protocol-listener/amqp", ADMIN, None);
    assert_eq!(status, 200);
    let (status, _, _) = http(node.http, "GET", "/api/health/checks/virtual-hosts", ADMIN, None);
    assert_eq!(status, 200);
}

#[test]
fn credentials_and_tags_are_checked_as_rabbitmq_checks_them() {
    let node = Node::start();
    let (status, headers, body) = http(node.http, "GET", "/api/overview", None, None);
    assert_eq!(status, 401);
    assert_eq!(headers.get("www-authenticate").map(String::as_str), Some("Basic realm=\"RabbitMQ Management\""));
    assert_eq!(json_of(&body)["error"], "not_authorised");
    let (status, headers, _) = http(node.http, "GET", "/api/overview", Some(("boss", "wrong")), None);
    assert_eq!(status, 401);
    assert!(!headers.contains_key("www-authenticate"), "no challenge for wrong credentials: a browser would prompt");
    let (status, _, body) = http(node.http, "GET", "/api/overview", Some(("plain", "plain-pw")), None);
    assert_eq!(status, 401);
    assert_eq!(json_of(&body)["reason"], "Not management user");
    // A management user sees the API, but not the users.
    let (status, _, _) = http(node.http, "GET", "/api/queues", Some(("app", "app-pw")), None);
    assert_eq!(status, 200);
    let (status, _, _) = http(node.http, "GET", "/api/users", Some(("app", "app-pw")), None);
    assert_eq!(status, 401);
    let users = node.admin().list_users().unwrap();
    let boss = users.iter().find(|u| u.name == "boss").unwrap();
    assert!(boss.password_hash.is_some(), "hashes are exported, as RabbitMQ does");
}

#[test]
fn bad_input_gets_rabbitmqs_status_and_changes_nothing() {
    let node = Node::start();
    let (status, _, body) = http(node.http, "PUT", "/api/queues/%2F/q", ADMIN, Some("{not json"));
    assert_eq!((status, json_of(&body)), (400, json!({"error": "bad_request", "reason": "not_json"})));
    // `curl -d` sends a form type: the body is JSON all the same, as for RabbitMQ.
    let form = "application/x-www-form-urlencoded";
    let declare = r#"{"durable":true,"arguments":{"x-max-length":7}}"#;
    let (status, _, _) = http_as(node.http, "PUT", "/api/queues/%2F/curl-q", ADMIN, Some(declare), form);
    assert_eq!(status, 201);
    let (_, _, body) = http(node.http, "GET", "/api/queues/%2F/curl-q", ADMIN, None);
    assert_eq!(json_of(&body)["arguments"], json!({"x-max-length": 7}), "the arguments were not dropped");
    let (status, _, _) = http(node.http, "PUT", "/api/queues/nowhere/q", ADMIN, Some("{}"));
    assert_eq!(status, 404);
    let (status, _, body) =
        http(node.http, "PUT", "/api/queues/%2F/q", ADMIN, Some(r#"{"arguments":{"x-max-length":"many"}}"#));
    assert_eq!(status, 400, "{body}");
    assert_eq!(json_of(&body)["error"], "bad_request");
    let (status, _, _) = http(node.http, "PUT", "/api/queues/%2F/amq.mine", ADMIN, Some("{}"));
    assert_eq!(status, 401, "as RabbitMQ answers a reserved name");
    let (status, _, _) = http(node.http, "GET", "/api/queues/%2F/q", ADMIN, None);
    assert_eq!(status, 404, "nothing was declared");
    // The classic Python rabbitmqadmin sends booleans as strings.
    let (status, _, _) = http(node.http, "PUT", "/api/queues/%2F/q", ADMIN, Some(r#"{"durable":"false"}"#));
    assert_eq!(status, 201);
    let (status, _, _) = http(node.http, "PUT", "/api/queues/%2F/q", ADMIN, Some(r#"{"durable":"false"}"#));
    assert_eq!(status, 204, "declaring it again changes nothing");
    let (status, _, body) = http(node.http, "PUT", "/api/queues/%2F/q", ADMIN, Some(r#"{"durable":true}"#));
    assert_eq!(status, 400);
    assert!(json_of(&body)["reason"].as_str().unwrap().contains("inequivalent arg 'durable'"), "{body}");
    // Percent-encoded names arrive decoded (rabbitmqadmin v2 encodes '.').
    let (status, _, _) = http(node.http, "PUT", "/api/queues/%2F/my%2Eq", ADMIN, Some("{}"));
    assert_eq!(status, 201);
    let (status, _, body) = http(node.http, "GET", "/api/queues/%2F/my.q", ADMIN, None);
    assert_eq!((status, json_of(&body)["name"].as_str()), (200, Some("my.q")));
    // A name that looks like a path is only a name: nothing outside the
    // object it names is reached.
    let (status, _, _) = http(node.http, "GET", "/api/queues/%2F/..%2F..%2Fusers", ADMIN, None);
    assert_eq!(status, 404);
    let (status, _, _) = http(node.http, "PUT", "/api/queues/%2F/..%2F..%2Fescape", ADMIN, Some("{}"));
    assert_eq!(status, 201);
    let (_, _, body) = http(node.http, "GET", "/api/queues/%2F", ADMIN, None);
    assert!(json_of(&body).as_array().unwrap().iter().any(|q| q["name"] == "../../escape"));
    assert!(!node.dir.join("..").join("..").join("escape").exists());
    // Bodies over the documented 16 MiB limit are refused before parsing.
    assert_eq!(oversized_post(node.http, "/api/exchanges/%2F/amq.default/publish", 17 * 1024 * 1024), 413);
    let (_, _, body) = http(node.http, "GET", "/api/queues/%2F/my.q", ADMIN, None);
    assert_eq!(json_of(&body)["messages"], 0, "nothing was published");
}

#[test]
fn lists_page_filter_and_sort_in_rabbitmqs_envelope() {
    let node = Node::start();
    let client = node.admin();
    for name in ["a1", "a2", "b1", "b2", "b3"] {
        client.declare_queue("/", &QueueParams::new_durable_classic_queue(name, None)).unwrap();
    }
    let (status, _, body) =
        http(node.http, "GET", "/api/queues/%2F?page=2&page_size=2&name=b&sort=name&sort_reverse=true", ADMIN, None);
    assert_eq!(status, 200);
    let page = json_of(&body);
    assert_eq!(page["total_count"], 5);
    assert_eq!(page["filtered_count"], 3);
    assert_eq!(page["page_count"], 2);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["name"], "b1");
}

#[test]
fn definitions_export_in_rabbitmqs_format() {
    let node = Node::start();
    let client = node.admin();
    client.declare_queue("/", &QueueParams::new_durable_classic_queue("kept", None)).unwrap();
    client.declare_exchange("/", &ExchangeParams::durable_direct("routes", None)).unwrap();
    client.bind_queue("/", "kept", "routes", Some("k"), None).unwrap();
    let definitions = client.export_cluster_wide_definitions_as_data().unwrap();
    assert!(definitions.queues.iter().any(|q| q.name == "kept"));
    assert!(definitions.exchanges.iter().any(|x| x.name == "routes"));
    assert!(definitions.bindings.iter().any(|b| b.source == "routes" && b.destination == "kept"));
    assert!(definitions.users.iter().any(|u| u.name == "boss"));
}

#[test]
fn message_stats_count_and_rates_follow_the_traffic() {
    let node = Node::start();
    let client = node.admin();
    client.declare_queue("/", &QueueParams::new_durable_classic_queue("busy", None)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let publisher = runtime.block_on(async {
        let conn = lapin::Connection::connect(&node.amqp_uri(), lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        (conn, ch)
    });
    // Publish for about a second, so that two samples (100 ms apart) see
    // messages arrive.
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_millis(1000) {
        runtime.block_on(async {
            for _ in 0..20 {
                publisher
                    .1
                    .basic_publish(
                        "".into(),
                        "busy".into(),
                        lapin::options::BasicPublishOptions::default(),
                        b"m",
                        lapin::BasicProperties::default(),
                    )
                    .await
                    .unwrap();
            }
        });
        sent += 20;
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, _, body) = http(node.http, "GET", "/api/queues/%2F/busy", ADMIN, None);
    let queue = json_of(&body);
    let published = queue["message_stats"]["publish"].as_u64().unwrap();
    assert!(published > 0 && published <= sent, "{published} of {sent}");
    let rate = queue["message_stats"]["publish_details"]["rate"].as_f64().unwrap();
    assert!(rate > 10.0, "publishing about a thousand a second shows a rate: {rate}");
    let depth_rate = queue["messages_details"]["rate"].as_f64().unwrap();
    assert!(depth_rate > 0.0, "the queue grows: {depth_rate}");
    let got = client.get_messages("/", "busy", 3, "ack_requeue_false").unwrap();
    assert_eq!(got.len(), 3);
    let overview = client.overview().unwrap();
    assert!(overview.message_stats.publishing_details.is_some_and(|r| r.rate >= 0.0));
    let (_, _, body) = http(node.http, "GET", "/api/queues/%2F/busy", ADMIN, None);
    assert_eq!(json_of(&body)["message_stats"]["get_no_ack"], 3);
    drop(publisher);
}

/// The samples of a scrape, parsed by a Prometheus text-format parser.
fn scrape(node: &Node, path: &str) -> prometheus_parse::Scrape {
    let (status, headers, body) = http(node.metrics, "GET", path, None, None);
    assert_eq!(status, 200);
    assert!(headers.get("content-type").is_some_and(|t| t.starts_with("application/openmetrics-text")));
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))).map(
        |s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        },
    )
}

#[test]
fn prometheus_metrics_carry_rabbitmqs_names_and_parse() {
    let node = Node::start();
    let client = node.admin();
    client.declare_queue("/", &QueueParams::new_durable_classic_queue("metered", None)).unwrap();
    for _ in 0..3 {
        client.publish_message("/", "amq.default", "metered", "m", serde_json::Map::new()).unwrap();
    }
    client.publish_message("/", "amq.default", "nowhere", "m", serde_json::Map::new()).unwrap();
    let aggregated = scrape(&node, "/metrics");
    assert_eq!(value(&aggregated, "rabbitmq_queues", &[]), Some(1.0));
    assert_eq!(value(&aggregated, "rabbitmq_queue_messages_ready", &[]), Some(3.0));
    assert_eq!(value(&aggregated, "rabbitmq_global_messages_received_total", &[("protocol", "amqp091")]), Some(4.0));
    assert_eq!(value(&aggregated, "rabbitmq_global_messages_unroutable_dropped_total", &[]), Some(1.0));
    assert!(value(&aggregated, "rabbitmq_process_resident_memory_bytes", &[]).is_some_and(|v| v > 0.0));
    assert!(value(&aggregated, "warren_log_bytes", &[]).is_some());
    assert!(aggregated.samples.iter().any(|s| s.metric == "rabbitmq_identity_info"
        && s.labels.get("rabbitmq_node").is_some_and(|n| n.starts_with("warren@"))));
    // Publisher-side counters and churn, from an AMQP client.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let conn = lapin::Connection::connect(&node.amqp_uri(), lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.unwrap();
        for (key, mandatory) in [("metered", false), ("metered", false), ("nowhere", true)] {
            let options = lapin::options::BasicPublishOptions { mandatory, ..Default::default() };
            ch.basic_publish("".into(), key.into(), options, b"c", lapin::BasicProperties::default())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        // Everything published was confirmed: nothing counts as unconfirmed.
        let during = scrape(&node, "/metrics");
        assert_eq!(value(&during, "rabbitmq_channel_messages_unconfirmed", &[]), Some(0.0));
        assert_eq!(value(&during, "rabbitmq_channel_messages_confirmed_total", &[]), Some(3.0));
        // Its socket traffic, counted per read and write.
        let listed = json_of(&http(node.http, "GET", "/api/connections", ADMIN, None).2);
        let traffic = &listed[0];
        assert!(traffic["recv_oct"].as_u64().is_some_and(|n| n > 3 * 8), "{traffic}");
        assert!(traffic["send_oct"].as_u64().is_some_and(|n| n > 0), "{traffic}");
        assert!(traffic["recv_cnt"].as_u64().is_some_and(|n| n > 0), "{traffic}");
        conn.close(200, "bye".into()).await.unwrap();
    });
    let after = scrape(&node, "/metrics");
    assert_eq!(value(&after, "rabbitmq_global_messages_received_confirm_total", &[]), Some(3.0));
    assert_eq!(value(&after, "rabbitmq_global_messages_confirmed_total", &[]), Some(3.0));
    assert_eq!(value(&after, "rabbitmq_global_messages_unroutable_returned_total", &[]), Some(1.0));
    assert_eq!(value(&after, "rabbitmq_queues_created_total", &[]), Some(1.0));
    assert_eq!(value(&after, "rabbitmq_connections_opened_total", &[]), Some(1.0));
    assert_eq!(value(&after, "rabbitmq_channels_opened_total", &[]), Some(1.0));
    // Warren's histograms: confirm latency (timed publishes) and commit batches.
    assert!(histogram_count(&after, "warren_confirm_latency_seconds") >= 1.0);
    assert!(histogram_count(&after, "warren_log_entries_per_fsync") >= 1.0, "the durable queue's declaration");
    for _ in 0..100 {
        if value(&scrape(&node, "/metrics"), "rabbitmq_connections_closed_total", &[]) == Some(1.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let closed = scrape(&node, "/metrics");
    assert_eq!(value(&closed, "rabbitmq_connections_closed_total", &[]), Some(1.0));
    assert_eq!(value(&closed, "rabbitmq_channels_closed_total", &[]), Some(1.0));
    let overview: Value = json_of(&http(node.http, "GET", "/api/overview", ADMIN, None).2);
    assert_eq!(overview["churn_rates"]["queue_created"], 1);
    assert_eq!(overview["message_stats"]["confirm"], 3);
    let per_object = scrape(&node, "/metrics/per-object");
    assert_eq!(
        value(&per_object, "rabbitmq_queue_messages", &[("vhost", "/"), ("queue", "metered")]),
        Some(5.0),
        "3 over HTTP, 2 over AMQP"
    );
    // Only the groups asked for, per object, in the vhosts asked for.
    let detailed =
        scrape(&node, "/metrics/detailed?family=queue_coarse_metrics&family=connection_churn_metrics&vhost=%2F");
    let queue = [("vhost", "/"), ("queue", "metered")];
    assert_eq!(value(&detailed, "rabbitmq_detailed_queue_messages", &queue), Some(5.0));
    assert_eq!(value(&detailed, "rabbitmq_detailed_connections_opened_total", &[]), Some(1.0));
    assert_eq!(value(&detailed, "rabbitmq_detailed_queue_consumers", &queue), None, "not asked for");
    assert_eq!(value(&detailed, "rabbitmq_queues", &[]), None);
    let elsewhere = scrape(&node, "/metrics/detailed?family=queue_coarse_metrics&vhost=other");
    assert_eq!(value(&elsewhere, "rabbitmq_detailed_queue_messages", &queue), None);
}

/// Observations in a histogram: its +Inf bucket.
fn histogram_count(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    let sample = scrape.samples.iter().find(|s| s.metric == name).unwrap_or_else(|| panic!("no {name}"));
    match &sample.value {
        prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

#[test]
fn administrators_manage_users_vhosts_and_permissions() {
    let node = Node::start();
    let (status, _, _) =
        http(node.http, "PUT", "/api/users/ops", ADMIN, Some(r#"{"password":"ops-pw","tags":"monitoring"}"#));
    assert_eq!(status, 201);
    let (status, _, body) = http(node.http, "GET", "/api/whoami", Some(("ops", "ops-pw")), None);
    assert_eq!((status, json_of(&body)["tags"].clone()), (200, json!(["monitoring"])));
    let (status, _, _) =
        http(node.http, "PUT", "/api/users/ops", ADMIN, Some(r#"{"password":"ops-pw","tags":["monitoring"]}"#));
    assert_eq!(status, 204);
    // A management user may not do this.
    let (status, _, _) =
        http(node.http, "PUT", "/api/users/sneaky", Some(("app", "app-pw")), Some(r#"{"password":"x"}"#));
    assert_eq!(status, 401);

    let (status, _, _) = http(node.http, "PUT", "/api/vhosts/staging", ADMIN, None);
    assert_eq!(status, 201);
    let (status, _, _) = http(node.http, "PUT", "/api/vhosts/staging", ADMIN, None);
    assert_eq!(status, 204);
    let (status, _, body) = http(node.http, "GET", "/api/permissions/staging/boss", ADMIN, None);
    assert_eq!((status, json_of(&body)["write"].clone()), (200, json!(".*")), "its creator may use it, as in RabbitMQ");
    let permissions = r#"{"configure":"^ops-","write":".*","read":".*"}"#;
    let (status, _, _) = http(node.http, "PUT", "/api/permissions/staging/ops", ADMIN, Some(permissions));
    assert_eq!(status, 201);
    let (status, _, body) = http(node.http, "GET", "/api/permissions/staging/ops", ADMIN, None);
    assert_eq!((status, json_of(&body)["configure"].clone()), (200, json!("^ops-")));
    // The permission is enforced: ops may declare ops-* queues only.
    let (status, _, _) = http(node.http, "PUT", "/api/queues/staging/ops-q", Some(("ops", "ops-pw")), Some("{}"));
    assert_eq!(status, 201);
    let (status, _, _) = http(node.http, "PUT", "/api/queues/staging/other", Some(("ops", "ops-pw")), Some("{}"));
    assert_eq!(status, 403);

    let (status, _, _) = http(node.http, "DELETE", "/api/permissions/staging/ops", ADMIN, None);
    assert_eq!(status, 204);
    let (status, _, _) = http(node.http, "DELETE", "/api/vhosts/staging", ADMIN, None);
    assert_eq!(status, 204);
    let (status, _, _) = http(node.http, "GET", "/api/vhosts/staging", ADMIN, None);
    assert_eq!(status, 404);
    let (status, _, _) = http(node.http, "DELETE", "/api/users/ops", ADMIN, None);
    assert_eq!(status, 204);
    let (status, _, _) = http(node.http, "GET", "/api/whoami", Some(("ops", "ops-pw")), None);
    assert_eq!(status, 401);
    let (status, _, _) = http(node.http, "DELETE", "/api/users/ops", ADMIN, None);
    assert_eq!(status, 404);
}

#[test]
fn a_rabbitmq_definitions_file_imports_with_its_password_hashes() {
    let node = Node::start();
    // As RabbitMQ 3.10 exports them: a SHA-256 hash of "imported-pw".
    let definitions = json!({
        "rabbit_version": "3.10.8",
        "users": [{"name": "imported", "password_hash": "kI3GChLqEN7RG0Rk8H1CL/7+souXxMjQVvKT3sAUjH+bBEk/",
                   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["management"], "limits": {}}],
        "vhosts": [{"name": "shop", "limits": [], "metadata": {"description": "", "tags": []}}],
        "permissions": [{"user": "imported", "vhost": "shop", "configure": ".*", "write": ".*", "read": ".*"}],
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [{"name": "cluster_name", "value": "rabbit@old"}],
        "policies": [],
        "queues": [{"name": "orders", "vhost": "shop", "durable": true, "auto_delete": false,
                    "arguments": {"x-queue-type": "classic", "x-max-length": 100}}],
        "exchanges": [{"name": "events", "vhost": "shop", "type": "topic", "durable": true,
                       "auto_delete": false, "internal": false, "arguments": {}}],
        "bindings": [{"source": "events", "vhost": "shop", "destination": "orders",
                      "destination_type": "queue", "routing_key": "order.#", "arguments": {}}]
    });
    let (status, _, body) = http(node.http, "POST", "/api/definitions", ADMIN, Some(&definitions.to_string()));
    assert_eq!(status, 204, "{body}");
    let imported = node.client("imported", "imported-pw");
    assert_eq!(imported.current_user().unwrap().name, "imported");
    let queue = imported.get_queue_info("shop", "orders").unwrap();
    assert_eq!(queue.arguments.0.get("x-max-length"), Some(&json!(100)));
    let routed = imported.publish_message("shop", "events", "order.paid", "x", serde_json::Map::new()).unwrap();
    assert!(routed.routed, "the binding came along");
    // What Warren exports imports again unchanged.
    let (_, _, exported) = http(node.http, "GET", "/api/definitions", ADMIN, None);
    let (status, _, _) = http(node.http, "POST", "/api/definitions", ADMIN, Some(&exported));
    assert_eq!(status, 204);
    let (status, _, _) = http(node.http, "POST", "/api/definitions", ADMIN, Some(r#"{"queues":[{"name":"q"}]}"#));
    assert_eq!(status, 400, "a queue without its vhost is refused");
}

fn depth(node: &Node, queue: &str) -> u64 {
    let (status, _, body) = http(node.http, "GET", &format!("/api/queues/%2F/{queue}"), ADMIN, None);
    assert_eq!(status, 200, "{body}");
    json_of(&body)["messages"].as_u64().unwrap()
}

fn publish_n(node: &Node, queue: &str, n: usize) {
    for i in 0..n {
        let message =
            json!({"properties": {}, "routing_key": queue, "payload": format!("m{i}"), "payload_encoding": "string"});
        let (status, _, body) =
            http(node.http, "POST", "/api/exchanges/%2F/amq.default/publish", ADMIN, Some(&message.to_string()));
        assert_eq!((status, json_of(&body)["routed"].clone()), (200, json!(true)));
    }
}

#[test]
fn runtime_policies_apply_to_new_and_existing_queues_and_go_away_when_deleted() {
    let node = Node::start();
    let (status, _, _) = http(node.http, "PUT", "/api/queues/%2F/capped.old", ADMIN, Some(r#"{"durable":true}"#));
    assert_eq!(status, 201);
    // The classic rabbitmqadmin sends the priority as a string.
    let policy = r#"{"pattern":"^capped\\.","definition":{"max-length":2},"apply-to":"queues","priority":"1"}"#;
    let (status, _, body) = http(node.http, "PUT", "/api/policies/%2F/cap", ADMIN, Some(policy));
    assert_eq!(status, 201, "{body}");
    let (status, _, _) = http(node.http, "PUT", "/api/queues/%2F/capped.new", ADMIN, Some(r#"{"durable":true}"#));
    assert_eq!(status, 201);
    publish_n(&node, "capped.old", 5);
    publish_n(&node, "capped.new", 5);
    assert_eq!((depth(&node, "capped.old"), depth(&node, "capped.new")), (2, 2), "drop-head at 2");
    let (_, _, body) = http(node.http, "GET", "/api/queues/%2F/capped.new", ADMIN, None);
    assert_eq!(json_of(&body)["policy"], json!("cap"));

    // A strict client reads it back.
    let listed = node.admin().list_policies().unwrap();
    let cap = listed.iter().find(|p| p.name == "cap").expect("listed");
    assert_eq!((cap.pattern.as_str(), cap.priority), ("^capped\\.", 1));
    let (status, _, body) = http(node.http, "GET", "/api/policies/%2F/cap", ADMIN, None);
    assert_eq!((status, json_of(&body)["definition"]["max-length"].clone()), (200, json!(2)));

    // Refused, and nothing changes: an unknown key, a bad pattern, no
    // definition, a user who is no policymaker.
    for (who, body, expected) in [
        (ADMIN, r#"{"pattern":".","definition":{"max-lenght":1}}"#, 400),
        (ADMIN, r#"{"pattern":"(","definition":{"max-length":1}}"#, 400),
        (ADMIN, r#"{"pattern":"."}"#, 400),
        (ADMIN, r#"{"pattern":".","definition":{"max-length":1},"apply-to":"streams"}"#, 400),
        (Some(("app", "app-pw")), r#"{"pattern":".","definition":{"max-length":1}}"#, 401),
    ] {
        let (status, _, answer) = http(node.http, "PUT", "/api/policies/%2F/cap", who, Some(body));
        assert_eq!(status, expected, "{body}: {answer}");
    }
    let (_, _, body) = http(node.http, "GET", "/api/policies/%2F/cap", ADMIN, None);
    assert_eq!(json_of(&body)["definition"], json!({"max-length": 2}));

    // A policymaker manages policies in its virtual hosts.
    let (status, _, _) =
        http(node.http, "PUT", "/api/users/pm", ADMIN, Some(r#"{"password":"pm-pw","tags":"policymaker"}"#));
    assert_eq!(status, 201);
    let (status, _, _) = http(
        node.http,
        "PUT",
        "/api/permissions/%2F/pm",
        ADMIN,
        Some(r#"{"configure":".*","write":".*","read":".*"}"#),
    );
    assert_eq!(status, 201);
    let mirrored = r#"{"pattern":"^ha\\.","definition":{"ha-mode":"all"}}"#;
    let (status, _, body) = http(node.http, "PUT", "/api/policies/%2F/ha", Some(("pm", "pm-pw")), Some(mirrored));
    assert_eq!(status, 201, "RabbitMQ's mirroring keys are accepted (and change nothing): {body}");

    let (status, _, _) = http(node.http, "DELETE", "/api/policies/%2F/cap", ADMIN, None);
    assert_eq!(status, 204);
    let (status, _, _) = http(node.http, "DELETE", "/api/policies/%2F/cap", ADMIN, None);
    assert_eq!(status, 404);
    publish_n(&node, "capped.old", 3);
    assert_eq!(depth(&node, "capped.old"), 5, "no longer capped");
}

#[test]
fn per_vhost_definitions_export_and_import_with_policies() {
    let node = Node::start();
    let (status, _, _) = http(node.http, "PUT", "/api/queues/%2F/jobs.a", ADMIN, Some(r#"{"durable":true}"#));
    assert_eq!(status, 201);
    let policy = r#"{"pattern":"^jobs\\.","definition":{"message-ttl":60000},"apply-to":"queues"}"#;
    let (status, _, _) = http(node.http, "PUT", "/api/policies/%2F/ttl", ADMIN, Some(policy));
    assert_eq!(status, 201);
    let (status, _, body) = http(node.http, "GET", "/api/definitions/%2F", ADMIN, None);
    assert_eq!(status, 200);
    let exported = json_of(&body);
    assert!(exported.get("users").is_none(), "a per-vhost export has no users");
    assert!(exported["queues"].as_array().unwrap().iter().any(|q| q["name"] == "jobs.a" && q.get("vhost").is_none()));
    assert!(exported["policies"].as_array().unwrap().iter().any(|p| p["name"] == "ttl"));

    let (status, _, _) = http(node.http, "PUT", "/api/vhosts/copy", ADMIN, None);
    assert_eq!(status, 201);
    let (status, _, answer) = http(node.http, "POST", "/api/definitions/copy", ADMIN, Some(&body));
    assert_eq!(status, 204, "{answer}");
    let (status, _, answer) = http(node.http, "GET", "/api/queues/copy/jobs.a", ADMIN, None);
    assert_eq!((status, json_of(&answer)["policy"].clone()), (200, json!("ttl")), "{answer}");
    let (status, _, answer) = http(node.http, "GET", "/api/policies/copy", ADMIN, None);
    assert_eq!((status, json_of(&answer).as_array().map(Vec::len)), (200, Some(1)));
}

#[test]
fn topic_permissions_and_limits_are_written_over_http_and_enforced() {
    let node = Node::start();
    let rule = r#"{"exchange":"amq.topic","write":"^public\\.","read":".*"}"#;
    let (status, _, _) = http(node.http, "PUT", "/api/topic-permissions/%2F/app", ADMIN, Some(rule));
    assert_eq!(status, 201);
    let (status, _, body) = http(node.http, "GET", "/api/topic-permissions/%2F/app", ADMIN, None);
    assert_eq!((status, json_of(&body)[0]["write"].clone()), (200, json!("^public\\.")));
    let (status, _, _) = http(node.http, "PUT", "/api/topic-permissions/%2F/app", ADMIN, Some(r#"{"exchange":"x"}"#));
    assert_eq!(status, 400);
    let (status, _, _) = http(node.http, "DELETE", "/api/topic-permissions/%2F/app", ADMIN, None);
    assert_eq!(status, 204);
    let (status, _, _) = http(node.http, "GET", "/api/topic-permissions/%2F/app", ADMIN, None);
    assert_eq!(status, 404);

    // A virtual host limit of one queue is enforced at once.
    let (status, _, _) = http(node.http, "PUT", "/api/vhost-limits/%2F/max-queues", ADMIN, Some(r#"{"value":1}"#));
    assert_eq!(status, 204);
    let (_, _, body) = http(node.http, "GET", "/api/vhost-limits/%2F", ADMIN, None);
    assert_eq!(json_of(&body)[0]["value"], json!({"max-queues": 1}));
    let (status, _, _) = http(node.http, "PUT", "/api/queues/%2F/first", ADMIN, Some("{}"));
    assert_eq!(status, 201);
    let (status, _, body) = http(node.http, "PUT", "/api/queues/%2F/second", ADMIN, Some("{}"));
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = http(node.http, "PUT", "/api/vhost-limits/%2F/max-queues", ADMIN, Some(r#"{"value":"x"}"#));
    assert_eq!(status, 400);
    let (status, _, _) = http(node.http, "PUT", "/api/vhost-limits/%2F/max-cheese", ADMIN, Some(r#"{"value":1}"#));
    assert_eq!(status, 400);
    let (status, _, _) = http(node.http, "DELETE", "/api/vhost-limits/%2F/max-queues", ADMIN, None);
    assert_eq!(status, 204);
    let (status, _, _) = http(node.http, "PUT", "/api/queues/%2F/second", ADMIN, Some("{}"));
    assert_eq!(status, 201);

    let (status, _, _) = http(node.http, "PUT", "/api/user-limits/app/max-channels", ADMIN, Some(r#"{"value":3}"#));
    assert_eq!(status, 204);
    let (_, _, body) = http(node.http, "GET", "/api/user-limits/app", ADMIN, None);
    assert_eq!(json_of(&body)[0]["value"], json!({"max-channels": 3}));
    let (status, _, _) = http(node.http, "DELETE", "/api/user-limits/app/max-channels", ADMIN, None);
    assert_eq!(status, 204);
    let (_, _, body) = http(node.http, "GET", "/api/user-limits/app", ADMIN, None);
    assert_eq!(json_of(&body), json!([]));
    let (status, _, _) = http(node.http, "PUT", "/api/user-limits/nobody/max-channels", ADMIN, Some(r#"{"value":3}"#));
    assert_eq!(status, 404);
}

#[test]
fn with_rabbitmqs_password_hashing_the_export_carries_hashes_rabbitmq_verifies() {
    let node = Node::start_with(|c| c.password_hashing = "rabbit_password_hashing_sha256".into());
    let (status, _, _) =
        http(node.http, "PUT", "/api/users/carol", ADMIN, Some(r#"{"password":"carol-pw","tags":"management"}"#));
    assert_eq!(status, 201);
    assert_eq!(node.client("carol", "carol-pw").current_user().unwrap().name, "carol");
    let (_, _, body) = http(node.http, "GET", "/api/definitions", ADMIN, None);
    let exported = json_of(&body);
    let carol = exported["users"].as_array().unwrap().iter().find(|u| u["name"] == "carol").unwrap().clone();
    assert_eq!(carol["hashing_algorithm"], "rabbit_password_hashing_sha256");
    // RabbitMQ's format: base64 of a 4-byte salt and SHA-256(salt ++ password).
    use base64::Engine;
    use sha2::Digest;
    let raw = base64::engine::general_purpose::STANDARD.decode(carol["password_hash"].as_str().unwrap()).unwrap();
    let (salt, digest) = raw.split_at(4);
    assert_eq!(digest, sha2::Sha256::new_with_prefix(salt).chain_update(b"carol-pw").finalize().as_slice());
}

#[test]
fn every_metric_rabbitmqs_overview_dashboard_charts_is_served() {
    let node = Node::start();
    let fixture = include_str!("fixtures/grafana-overview-metrics.txt");
    let names: Vec<&str> = fixture.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    assert!(names.len() > 30, "the fixture lists the dashboard's metrics");
    let served = scrape(&node, "/metrics");
    let missing: Vec<&&str> = names.iter().filter(|name| !served.samples.iter().any(|s| s.metric == **name)).collect();
    assert!(missing.is_empty(), "the Overview dashboard queries these, not served: {missing:?}");
    let identity = served.samples.iter().find(|s| s.metric == "rabbitmq_identity_info").expect("identity");
    assert!(identity.labels.get("rabbitmq_cluster").is_some() && identity.labels.get("rabbitmq_node").is_some());
}

#[test]
fn transient_bodies_paged_to_the_spill_show_in_the_metrics() {
    let node = Node::start();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let conn = lapin::Connection::connect(&node.amqp_uri(), lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let options = lapin::options::QueueDeclareOptions::default();
        ch.queue_declare("deep".into(), options, lapin::types::FieldTable::default()).await.unwrap();
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.unwrap();
        for _ in 0..1100 {
            let options = lapin::options::BasicPublishOptions::default();
            ch.basic_publish("".into(), "deep".into(), options, b"page me", lapin::BasicProperties::default())
                .await
                .unwrap();
        }
        ch.wait_for_confirms().await.unwrap();
    });
    let paged = scrape(&node, "/metrics");
    // Past the 1,024-message window, two bodies are paged per publish.
    assert!(
        value(&paged, "warren_spill_messages", &[]).is_some_and(|n| n >= 70.0),
        "{:?}",
        value(&paged, "warren_spill_messages", &[])
    );
    assert!(value(&paged, "warren_spill_bytes", &[]).is_some_and(|n| n > 0.0));
}
