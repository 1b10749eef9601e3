//! Three `warren` processes on 127.0.0.1 form a cluster from one seed list,
//! list each other in `/api/nodes`, notice a `kill -9`, and a node with
//! another secret is refused and says why. Their metadata Raft group forms,
//! and elects a new leader when its leader is killed or paused. A quorum
//! queue keeps every confirmed message when its leader's node is killed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A port nothing listens on, below the kernel's ephemeral range (32768
/// on): a port found by binding port 0 is in that range, and a node's
/// outgoing connection could take it before the node meant to listen on it
/// starts. Ports are handed out in turn from a place of this process's.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id() % 12_000;
    loop {
        let port = 20_000 + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        let port = u16::try_from(port).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Node {
    child: Child,
    http: u16,
    amqp: u16,
    data: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn start(name: &str, cluster_port: u16, seeds: &[String], secret: &Path) -> Node {
    let data = std::env::temp_dir().join(format!("warren-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    start_in(name, cluster_port, seeds, secret, data)
}

/// Starts a node on the data directory `data` as it is (a restart).
fn start_in(name: &str, cluster_port: u16, seeds: &[String], secret: &Path, data: PathBuf) -> Node {
    let (http, amqp) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["--amqp-port", &amqp.to_string(), "--http-port", &http.to_string(), "--prometheus-port", "0"])
        .args(["--bind", "127.0.0.1", "--node-name", name])
        .args(["--log", &std::env::var("WARREN_TEST_LOG").unwrap_or_else(|_| "warn".into())])
        .args(["--cluster-port", &cluster_port.to_string(), "--cluster-seeds", &seeds.join(",")])
        // Snapshots every few entries: restarts and catching up go through
        // them, and through quorum queues' logs kept for their bodies.
        .args(["--cluster-snapshot-every", "8"])
        .arg("--cluster-secret-file")
        .arg(secret)
        .arg("--data-dir")
        .arg(&data)
        .stdout(log_to(name))
        .stderr(log_to(name))
        .spawn()
        .unwrap();
    Node { child, http, amqp, data }
}

/// Where a node's log goes: a file under `WARREN_TEST_LOGS` if set (to
/// read after a failure), else nowhere.
fn log_to(name: &str) -> Stdio {
    let Some(dir) = std::env::var_os("WARREN_TEST_LOGS") else { return Stdio::null() };
    let path = Path::new(&dir).join(format!("{name}.log"));
    match std::fs::OpenOptions::new().create(true).append(true).open(path) {
        Ok(file) => Stdio::from(file),
        Err(_) => Stdio::null(),
    }
}

/// `GET path` of `node`'s API as guest, or None while the API is not up
/// (or the answer is not JSON).
fn api_get(node: &Node, path: &str) -> Option<Value> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", node.http)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    serde_json::from_str::<Value>(body).ok()
}

/// `/api/nodes` as guest, or None while the API is not up.
fn nodes(node: &Node) -> Option<Vec<Value>> {
    api_get(node, "/api/nodes")?.as_array().cloned()
}

/// Names of the nodes `node` lists as running, itself included.
fn running(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = nodes(node)
        .unwrap_or_default()
        .iter()
        .filter(|n| n["running"] == Value::Bool(true))
        .filter_map(|n| n["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

/// Runs `work` on `runtime`, failing the test if it takes longer than
/// `seconds`: a broker that stops answering fails the suite instead of
/// hanging it.
fn within<T>(runtime: &tokio::runtime::Runtime, seconds: u64, work: impl std::future::Future<Output = T>) -> T {
    match runtime.block_on(async { tokio::time::timeout(Duration::from_secs(seconds), work).await }) {
        Ok(value) => value,
        Err(_) => panic!("a step of this test took longer than {seconds} s"),
    }
}

fn eventually(what: &str, seconds: u64, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(seconds), "never happened: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_processes_form_a_cluster_notice_a_kill_and_refuse_another_secret() {
    let dir = std::env::temp_dir().join(format!("warren-cluster-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "cookie\n").unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let seeds: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let a = start("a@test", ports[0], &seeds, &secret);
    let b = start("b@test", ports[1], &seeds, &secret);
    let mut c = start("c@test", ports[2], &seeds, &secret);
    let all = ["a@test", "b@test", "c@test"];
    eventually("every node lists all three running", 30, || [&a, &b, &c].iter().all(|node| running(node) == all));
    let listed = nodes(&a).unwrap();
    let links = listed[0]["cluster_links"].as_array().unwrap();
    assert_eq!(links.len(), 2, "{listed:?}");

    // Paused (SIGSTOP): no connection closes, the missing heartbeats tell.
    let signal = |name: &str, pid: u32| {
        assert!(Command::new("kill").args([name, &pid.to_string()]).status().unwrap().success());
    };
    signal("-STOP", c.child.id());
    let paused = Instant::now();
    eventually("a and b list the paused c as not running", 5, || {
        running(&a) == ["a@test", "b@test"] && running(&b) == ["a@test", "b@test"]
    });
    println!("a paused node was seen down after {:?}", paused.elapsed());
    signal("-CONT", c.child.id());
    eventually("c is back for everyone", 10, || [&a, &b, &c].iter().all(|node| running(node) == all));

    // kill -9: its connections close, the others see it down at once.
    let killed = Instant::now();
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    eventually("a and b list c as not running", 5, || {
        running(&a) == ["a@test", "b@test"] && running(&b) == ["a@test", "b@test"]
    });
    println!("a killed node was seen down after {:?}", killed.elapsed());

    // Another secret: refused, and the newcomer's API says why.
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "not the cookie").unwrap();
    let x = start("x@test", free_port(), &seeds[..1], &wrong);
    eventually("x reports the refusal", 30, || {
        nodes(&x)
            .unwrap_or_default()
            .iter()
            .any(|n| n["warren_cluster_error"].as_str().is_some_and(|e| e.contains("another cluster secret")))
    });
    assert_eq!(running(&x), ["x@test"]);
    assert_eq!(running(&a), ["a@test", "b@test"], "x is never counted a member");
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The metadata group as `node` sees it: (state, term, leader, members).
fn metadata(node: &Node) -> Option<(String, u64, Option<String>, usize)> {
    let listed = nodes(node)?;
    let m = &listed.first()?["warren_metadata"];
    Some((
        m["state"].as_str()?.to_string(),
        m["term"].as_u64()?,
        m["leader"].as_str().map(String::from),
        m["members"].as_array()?.len(),
    ))
}

#[test]
fn the_metadata_group_forms_and_elects_a_new_leader_after_a_kill_or_a_pause() {
    let dir = std::env::temp_dir().join(format!("warren-cluster-meta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "cookie\n").unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let seeds: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let names = ["a@meta", "b@meta", "c@meta"];
    let mut nodes: Vec<Node> = names.iter().zip(ports).map(|(name, port)| start(name, port, &seeds, &secret)).collect();
    // The leader all three agree on, once they do.
    let agreed = |nodes: &[Node]| -> Option<(u64, String)> {
        let views: Vec<_> = nodes.iter().map(metadata).collect::<Option<Vec<_>>>()?;
        let (_, term, leader, members) = views.first()?.clone();
        let leader = leader?;
        views
            .iter()
            .all(|v| v.1 == term && v.2.as_deref() == Some(leader.as_str()) && v.3 == 3 && members == 3)
            .then_some((term, leader))
    };
    let mut agreement = None;
    eventually("the metadata group forms with all three", 30, || {
        agreement = agreed(&nodes);
        agreement.is_some()
    });

    // kill -9 of the leader's process, three times: the others elect
    // another; the killed node restarts from its data and follows.
    let mut failovers = Vec::new();
    for _ in 0..3 {
        let (term, leader) = agreement.clone().unwrap();
        let i = names.iter().position(|n| *n == leader).unwrap();
        nodes[i].child.kill().unwrap();
        nodes[i].child.wait().unwrap();
        let killed = Instant::now();
        let others: Vec<usize> = (0..3).filter(|j| *j != i).collect();
        eventually("the others elect another leader", 20, || {
            others
                .iter()
                .all(|j| metadata(&nodes[*j]).is_some_and(|(_, t, l, _)| t > term && l.is_some_and(|l| l != leader)))
        });
        failovers.push(killed.elapsed());
        // The old process is gone; its data stays for the restart.
        let data = std::mem::take(&mut nodes[i].data);
        nodes[i] = start_in(names[i], ports[i], &seeds, &secret, data);
        eventually("the restarted node follows the new leader", 30, || {
            agreement = agreed(&nodes);
            agreement.is_some()
        });
    }
    println!("metadata leader killed: another elected after {failovers:?}");

    // A paused leader (SIGSTOP) is replaced once the failure detector
    // misses its heartbeats; woken, it follows the newer term.
    let (term, leader) = agreement.clone().unwrap();
    let i = names.iter().position(|n| *n == leader).unwrap();
    let signal = |name: &str, pid: u32| {
        assert!(Command::new("kill").args([name, &pid.to_string()]).status().unwrap().success());
    };
    signal("-STOP", nodes[i].child.id());
    let paused = Instant::now();
    let others: Vec<usize> = (0..3).filter(|j| *j != i).collect();
    eventually("a paused leader is replaced", 20, || {
        others
            .iter()
            .all(|j| metadata(&nodes[*j]).is_some_and(|(_, t, l, _)| t > term && l.is_some_and(|l| l != leader)))
    });
    println!("metadata leader paused: another elected after {:?}", paused.elapsed());
    signal("-CONT", nodes[i].child.id());
    eventually("the woken node follows the newer leader", 30, || {
        agreement = agreed(&nodes);
        agreement.as_ref().is_some_and(|(t, l)| *t > term && *l != leader)
    });
    assert_ne!(metadata(&nodes[i]).unwrap().0, "Leader", "no leader on a stale term");
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cluster_port_without_a_secret_file_is_refused_at_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["--amqp-port", "0", "--http-port", "0", "--prometheus-port", "0", "--cluster-port", "25672"])
        .arg("--data-dir")
        .arg(std::env::temp_dir().join(format!("warren-cluster-nosecret-{}", std::process::id())))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cluster_secret_file"), "{stderr}");
}

async fn connect(node: &Node) -> lapin::Connection {
    let uri = format!("amqp://guest:guest@127.0.0.1:{}/%2F", node.amqp);
    lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await.unwrap()
}

fn quorum() -> lapin::types::FieldTable {
    let mut arguments = lapin::types::FieldTable::default();
    arguments.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
    arguments
}

/// Publishes `bodies` with confirms; all must be acked.
async fn publish_confirmed(channel: &lapin::Channel, queue: &str, bodies: impl Iterator<Item = String>) {
    let mut pending = Vec::new();
    for body in bodies {
        let properties = lapin::BasicProperties::default().with_delivery_mode(2);
        let options = lapin::options::BasicPublishOptions::default();
        pending
            .push(channel.basic_publish("".into(), queue.into(), options, body.as_bytes(), properties).await.unwrap());
    }
    for confirm in pending {
        assert!(confirm.await.unwrap().is_ack(), "a publish into the quorum queue was nacked");
    }
}

#[test]
fn a_quorum_queue_keeps_every_confirmed_message_when_its_leaders_node_is_killed() {
    use futures_lite::StreamExt;
    use lapin::options::QueueDeclareOptions;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};

    let dir = std::env::temp_dir().join(format!("warren-quorum-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "cookie\n").unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let seeds: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut a = start("qa@test", ports[0], &seeds, &secret);
    let b = start("qb@test", ports[1], &seeds, &secret);
    let c = start("qc@test", ports[2], &seeds, &secret);
    eventually("the metadata group has three members and a leader", 30, || {
        [&a, &b, &c].iter().all(|n| metadata(n).is_some_and(|(_, _, leader, members)| leader.is_some() && members == 3))
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    within(&runtime, 120, async {
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        let conn = connect(&a).await;
        let channel = conn.create_channel().await.unwrap();
        let declared = channel.queue_declare("orders".into(), durable, quorum()).await.unwrap();
        assert_eq!(declared.message_count(), 0);
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        publish_confirmed(&channel, "orders", (0..500).map(|i| format!("m{i}"))).await;

        // `warren ctl quorum_status` names the members and the leader.
        let ctl = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["ctl", "--data-dir"])
            .arg(&a.data)
            .args(["quorum_status", "orders", "--api", &format!("127.0.0.1:{}", a.http)])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&ctl.stdout);
        assert!(ctl.status.success(), "{out} {}", String::from_utf8_lossy(&ctl.stderr));
        assert!(out.contains("leader qa@test"), "{out}");
        for member in ["qa@test", "qb@test", "qc@test"] {
            assert!(out.contains(member), "{out}");
        }

        // Another node knows the queue (passive declare answers from its
        // replica), and takes publishes for it: they are forwarded to the
        // leader, and confirmed once its group committed them.
        let other = connect(&b).await;
        let passive = QueueDeclareOptions { passive: true, ..durable };
        let seen = other.create_channel().await.unwrap().queue_declare("orders".into(), passive, quorum()).await;
        assert!(seen.is_ok(), "a follower answers a passive declare: {seen:?}");
        let through_b = other.create_channel().await.unwrap();
        through_b.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        publish_confirmed(&through_b, "orders", (0..20).map(|i| format!("f{i}"))).await;
        let refused = other.create_channel().await.unwrap();
        let got = refused.basic_get("orders".into(), lapin::options::BasicGetOptions::default()).await;
        assert!(got.is_err(), "basic.get through a node that does not lead the queue is refused, not answered empty");

        // 100 acked, 50 more delivered and left unacknowledged.
        let consumer_channel = conn.create_channel().await.unwrap();
        consumer_channel.basic_qos(150, BasicQosOptions::default()).await.unwrap();
        let options = BasicConsumeOptions::default();
        let mut consumer =
            consumer_channel.basic_consume("orders".into(), "c".into(), options, Default::default()).await.unwrap();
        for i in 0..150 {
            let delivery = consumer.next().await.unwrap().unwrap();
            assert_eq!(delivery.data, format!("m{i}").into_bytes(), "in order");
            if i < 100 {
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
        }
        // The acks are committed before the kill (a confirmed publish on
        // the same connection's other channel comes after them).
        publish_confirmed(&channel, "orders", std::iter::once("m500".to_string())).await;
        drop(other);
    });

    let killed = Instant::now();
    a.child.kill().unwrap();
    a.child.wait().unwrap();

    within(&runtime, 120, async {
        // A consumer through b: served by the new leader (b or c) once it
        // took the queue up.
        let conn = connect(&b).await;
        let channel = conn.create_channel().await.unwrap();
        let options = BasicConsumeOptions::default();
        let mut consumer =
            channel.basic_consume("orders".into(), "c2".into(), options, Default::default()).await.unwrap();
        println!("the quorum queue was served again {:?} after its leader was killed", killed.elapsed());
        let (mut direct, mut forwarded) = (Vec::new(), Vec::new());
        while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
            let delivery = delivery.unwrap();
            let body = String::from_utf8(delivery.data.clone()).unwrap();
            let n: usize = body[1..].parse().unwrap();
            if body.starts_with('f') {
                forwarded.push(n);
            } else {
                assert!(n >= 100, "{body} was acknowledged before the kill");
                if n < 150 {
                    assert!(delivery.redelivered, "{body} was delivered before: redelivered");
                }
                direct.push(n);
            }
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        let expected: Vec<usize> = (100..=500).collect();
        assert_eq!(direct, expected, "every confirmed message not acknowledged, once, in order");
        assert_eq!(forwarded, (0..20).collect::<Vec<_>>(), "the forwarded ones too");
        // It goes on taking confirmed publishes.
        let channel = conn.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        publish_confirmed(&channel, "orders", std::iter::once("m501".to_string())).await;
        let delivery = consumer.next().await.unwrap().unwrap();
        assert_eq!(delivery.data, b"m501");
    });
    drop((b, c));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `node` leads `queue` (`basic.get` works on its leader only; a
/// message it takes goes back when the channel closes).
async fn leads(node: &Node, queue: &str) -> bool {
    let conn = connect(node).await;
    let channel = conn.create_channel().await.unwrap();
    let got = channel.basic_get(queue.into(), lapin::options::BasicGetOptions::default()).await;
    let _ = conn.close(200, "probe".into()).await;
    got.is_ok()
}

/// Which of `nodes` leads `queue`, once one does.
async fn leader_among(nodes: &[&Node], queue: &str, patience: Duration) -> usize {
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < patience, "no node leads {queue}");
        for (i, node) in nodes.iter().enumerate() {
            if leads(node, queue).await {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Passive declare's message count of `queue` on `node` (its replica's).
async fn replica_count(node: &Node, queue: &str) -> Option<u32> {
    let uri = format!("amqp://guest:guest@127.0.0.1:{}/%2F", node.amqp);
    let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await.ok()?;
    let passive = lapin::options::QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
    let declared = conn.create_channel().await.ok()?.queue_declare(queue.into(), passive, quorum()).await.ok()?;
    Some(declared.message_count())
}

#[test]
fn a_paused_quorum_leader_is_replaced_steps_down_when_it_wakes_and_a_wiped_replica_catches_up() {
    use futures_lite::StreamExt;
    use lapin::options::{BasicAckOptions, ConfirmSelectOptions, QueueDeclareOptions};

    let dir = std::env::temp_dir().join(format!("warren-quorum-pause-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "cookie\n").unwrap();
    // c gets the first seed (it forms the metadata group and leads it):
    // wiping it below is the hardest case for formation.
    let mut seeds: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    seeds.sort();
    let port = |seed: &String| seed.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let ports = [port(&seeds[1]), port(&seeds[2]), port(&seeds[0])];
    let a = start("pa@test", ports[0], &seeds, &secret);
    let b = start("pb@test", ports[1], &seeds, &secret);
    let mut c = start("pc@test", ports[2], &seeds, &secret);
    eventually("the metadata group has three members and a leader", 30, || {
        [&a, &b, &c].iter().all(|n| metadata(n).is_some_and(|(_, _, leader, members)| leader.is_some() && members == 3))
    });
    let signal = |name: &str, pid: u32| {
        assert!(Command::new("kill").args([name, &pid.to_string()]).status().unwrap().success());
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    within(&runtime, 120, async {
        let conn = connect(&a).await;
        let channel = conn.create_channel().await.unwrap();
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        channel.queue_declare("jobs".into(), durable, quorum()).await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        publish_confirmed(&channel, "jobs", (0..200).map(|i| format!("j{i}"))).await;
    });

    // Paused: no connection closes; the failure detector's missing
    // heartbeats start the election.
    signal("-STOP", a.child.id());
    let paused = Instant::now();
    within(&runtime, 120, async {
        let led = leader_among(&[&b, &c], "jobs", Duration::from_secs(20)).await;
        println!("a paused quorum leader was replaced after {:?}", paused.elapsed());
        // Through the node that does not lead it: served by the leader.
        let conn = connect([&c, &b][led]).await;
        let channel = conn.create_channel().await.unwrap();
        let options = lapin::options::BasicConsumeOptions::default();
        let mut consumer = channel.basic_consume("jobs".into(), "c".into(), options, Default::default()).await.unwrap();
        for i in 0..200 {
            let delivery = consumer.next().await.unwrap().unwrap();
            assert_eq!(delivery.data, format!("j{i}").into_bytes());
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        let channel = conn.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        publish_confirmed(&channel, "jobs", (200..250).map(|i| format!("j{i}"))).await;
        drop(consumer);
        conn.close(200, "done".into()).await.unwrap();
    });

    // Woken, the old leader learns of the new term and gives the queue up:
    // it no longer serves it, and its replica has what the new leader took.
    signal("-CONT", a.child.id());
    within(&runtime, 120, async {
        let woken = Instant::now();
        loop {
            if !leads(&a, "jobs").await && replica_count(&a, "jobs").await == Some(50) {
                break;
            }
            assert!(woken.elapsed() < Duration::from_secs(15), "the woken old leader still serves the queue");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // A replica whose disk was lost comes back empty and catches up.
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    let data = c.data.clone();
    std::fs::remove_dir_all(&data).unwrap();
    let c = start_in("pc@test", ports[2], &seeds, &secret, data);
    within(&runtime, 120, async {
        let restarted = Instant::now();
        while replica_count(&c, "jobs").await != Some(50) {
            assert!(restarted.elapsed() < Duration::from_secs(20), "the wiped replica never caught up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // It caught up from a snapshot that carried the bodies (the leader's
    // log before it was purged): once it is the only member, it leads and
    // serves them all.
    for other in ["pa@test", "pb@test"] {
        let (ok, printed) = ctl(&c, &["delete_member", "jobs", other]);
        assert!(ok, "{printed}");
    }
    within(&runtime, 120, async {
        let alone = Instant::now();
        while !leads(&c, "jobs").await {
            assert!(alone.elapsed() < Duration::from_secs(20), "the caught-up node never led the queue alone");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let conn = connect(&c).await;
        let channel = conn.create_channel().await.unwrap();
        let mut got = Vec::new();
        while let Some(delivery) =
            channel.basic_get("jobs".into(), lapin::options::BasicGetOptions { no_ack: true }).await.unwrap()
        {
            got.push(String::from_utf8(delivery.delivery.data.clone()).unwrap());
        }
        assert_eq!(got, (200..250).map(|i| format!("j{i}")).collect::<Vec<_>>());
    });
    drop((a, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `warren ctl ARGS --api` against `node`: whether it succeeded, and what
/// it printed.
fn ctl(node: &Node, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["ctl", "--data-dir"])
        .arg(&node.data)
        .args(args)
        .args(["--api", &format!("127.0.0.1:{}", node.http)])
        .output()
        .unwrap();
    let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), printed)
}

#[test]
fn quorum_queue_members_are_added_and_removed_by_ctl_and_the_queue_carries_on() {
    use futures_lite::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, ConfirmSelectOptions, QueueDeclareOptions};

    let dir = std::env::temp_dir().join(format!("warren-quorum-members-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "cookie\n").unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let seeds: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let a = start("ma@test", ports[0], &seeds, &secret);
    let b = start("mb@test", ports[1], &seeds, &secret);
    let c = start("mc@test", ports[2], &seeds, &secret);
    eventually("the metadata group has three members and a leader", 30, || {
        [&a, &b, &c].iter().all(|n| metadata(n).is_some_and(|(_, _, leader, members)| leader.is_some() && members == 3))
    });
    let status = |node: &Node| api_get(node, "/api/warren/quorum/%2F/tasks").unwrap_or(Value::Null);
    let names = |value: &Value| -> Vec<String> {
        let mut names: Vec<String> = value
            .as_array()
            .map(|v| v.iter().filter_map(|n| n.as_str().map(String::from)).collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    within(&runtime, 120, async {
        // Two replicas: a (declaring, leading) and the next node up, b.
        let conn = connect(&a).await;
        let channel = conn.create_channel().await.unwrap();
        let mut arguments = quorum();
        arguments.insert("x-quorum-initial-group-size".into(), lapin::types::AMQPValue::LongInt(2));
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        channel.queue_declare("tasks".into(), durable, arguments).await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        publish_confirmed(&channel, "tasks", (0..100).map(|i| format!("t{i}"))).await;
    });
    assert_eq!(names(&status(&a)["voters"]), ["ma@test", "mb@test"]);

    // A third replica on c: it joins the group and catches up.
    let (ok, printed) = ctl(&b, &["add_member", "tasks", "mc@test"]);
    assert!(ok, "{printed}");
    assert!(printed.contains("ma@test, mb@test, mc@test"), "{printed}");
    eventually("c is a voter of the queue's group and holds its messages", 20, || {
        names(&status(&a)["voters"]).len() == 3 && status(&c)["messages"] == 100
    });
    let (ok, printed) = ctl(&b, &["add_member", "tasks", "mc@test"]);
    assert!(!ok && printed.contains("already a member"), "{printed}");
    let (ok, printed) = ctl(&b, &["add_member", "tasks", "nobody@test"]);
    assert!(!ok && printed.contains("not a running member of the cluster"), "{printed}");

    // The leader's own replica goes: another member leads, a drops its
    // replica, and the queue carries on with every message.
    let (ok, printed) = ctl(&c, &["delete_member", "tasks", "ma@test"]);
    assert!(ok, "{printed}");
    eventually("the group is b and c, led by one of them, and a's replica is gone", 20, || {
        let on_b = status(&b);
        names(&on_b["voters"]) == ["mb@test", "mc@test"]
            && on_b["leader"].as_str().is_some_and(|l| l != "ma@test")
            && status(&a)["raft_state"].is_null()
    });
    within(&runtime, 120, async {
        let conn = connect(&b).await;
        let channel = conn.create_channel().await.unwrap();
        let options = BasicConsumeOptions::default();
        let mut consumer =
            channel.basic_consume("tasks".into(), "c".into(), options, Default::default()).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 100 {
            let delivery =
                tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
            seen.push(String::from_utf8(delivery.data.clone()).unwrap());
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        let expected: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        assert_eq!(seen, expected);
    });

    // shrink takes c's replica out of every queue with another member;
    // grow puts a's back.
    let (ok, printed) = ctl(&a, &["shrink", "mc@test"]);
    assert!(ok && printed.contains("shrunk: mb@test"), "{printed}");
    let (ok, printed) = ctl(&a, &["grow", "ma@test", "all"]);
    assert!(ok && printed.contains("grown: mb@test, ma@test"), "{printed}");
    eventually("the group is a and b", 20, || names(&status(&b)["voters"]) == ["ma@test", "mb@test"]);
    let (ok, printed) = ctl(&a, &["delete_member", "tasks", "mc@test"]);
    assert!(!ok && printed.contains("not a member"), "{printed}");

    // c is stopped and forgotten: it leaves the queue and the metadata
    // group, and the two others carry on. A running node is not forgotten.
    let (ok, printed) = ctl(&a, &["add_member", "tasks", "mc@test"]);
    assert!(ok, "{printed}");
    eventually("c is a voter again", 20, || names(&status(&a)["voters"]).len() == 3);
    let (ok, printed) = ctl(&a, &["forget_cluster_node", "mc@test"]);
    assert!(!ok && printed.contains("is running: stop it first"), "{printed}");
    drop(c);
    eventually("c is seen down", 10, || !running(&a).contains(&"mc@test".to_string()));
    let (ok, printed) = ctl(&a, &["forget_cluster_node", "mc@test"]);
    assert!(ok, "{printed}");
    eventually("c left the queue's group and the metadata group", 20, || {
        names(&status(&a)["voters"]) == ["ma@test", "mb@test"]
            && [&a, &b]
                .iter()
                .all(|n| metadata(n).is_some_and(|(_, _, leader, members)| leader.is_some() && members == 2))
    });
    assert!(nodes(&a).unwrap_or_default().iter().all(|n| n["name"] != "mc@test"), "a forgotten node is not listed");
    let (ok, printed) = ctl(&a, &["forget_cluster_node", "nobody@test"]);
    assert!(!ok && printed.contains("not found"), "{printed}");
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}
