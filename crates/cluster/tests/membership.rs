//! Nodes on 127.0.0.1 with distinct ports: they find each other from their
//! seeds, refuse a node with another secret, and notice a node that stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::net::TcpListener;
use warren_cluster::{Cluster, ClusterConfig, PeerStatus};

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

fn start(name: &str, listener: TcpListener, seeds: &[String], secret: &[u8]) -> Cluster {
    let config = ClusterConfig { node_name: name.into(), seeds: seeds.to_vec(), secret: secret.to_vec() };
    Cluster::start(config, listener).unwrap()
}

fn up(cluster: &Cluster) -> Vec<String> {
    cluster.status().into_iter().filter(|p| p.up).map(|p| p.name).collect()
}

/// Waits up to 5 s for `check`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_with_one_seed_list_form_a_cluster_and_see_a_node_go() {
    let listeners = [listener().await, listener().await, listener().await];
    let seeds: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let [a, b, c] = listeners;
    let a = start("a", a, &seeds, b"cookie");
    let b = start("b", b, &seeds, b"cookie");
    let c = start("c", c, &seeds, b"cookie");
    eventually("each node sees the other two", || up(&a) == ["b", "c"] && up(&b) == ["a", "c"] && up(&c) == ["a", "b"])
        .await;
    assert!(a.status().iter().all(|p| p.name != "a"), "a node is not its own peer");
    eventually("each node knows which seed it is", || {
        [&a, &b, &c].iter().zip(&seeds).all(|(node, seed)| node.members().own_seed().as_ref() == Some(seed))
    })
    .await;

    // A node that stops is down for the others at once (its connections close).
    c.stop().await;
    eventually("c is down for a and b", || up(&a) == ["b"] && up(&b) == ["a"]).await;
    let c_seen_by_a: Vec<PeerStatus> = a.status().into_iter().filter(|p| p.name == "c").collect();
    assert_eq!(c_seen_by_a.len(), 1, "still known, as down: {c_seen_by_a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_later_joins_and_one_with_another_secret_is_refused() {
    let (la, lb) = (listener().await, listener().await);
    let a_addr = la.local_addr().unwrap().to_string();
    let a = start("a", la, &[], b"cookie");
    // Joins later, knowing only a.
    let b = start("b", lb, std::slice::from_ref(&a_addr), b"cookie");
    eventually("a and b see each other", || up(&a) == ["b"] && up(&b) == ["a"]).await;

    let intruder = start("x", listener().await, std::slice::from_ref(&a_addr), b"not the cookie");
    eventually("x is told why", || {
        intruder.status().iter().any(|p| p.error.as_deref().is_some_and(|e| e.contains("another cluster secret")))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(up(&intruder).is_empty());
    assert_eq!(up(&a), ["b"], "a never counts x as a peer");
}

/// Answers with the request reversed; sleeps first when asked to.
struct Reverse;

impl warren_cluster::Handler for Reverse {
    fn handle(
        &self,
        from: &str,
        request: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>> {
        let from = from.to_string();
        Box::pin(async move {
            if request == b"sleep" {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            let mut answer = request;
            answer.reverse();
            answer.extend_from_slice(from.as_bytes());
            answer
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_peers_handler_and_a_peer_that_goes_fails_its_calls() {
    use warren_cluster::CallError;
    let (la, lb) = (listener().await, listener().await);
    let b_addr = lb.local_addr().unwrap().to_string();
    let config = |name: &str, seeds: &[String]| ClusterConfig {
        node_name: name.into(),
        seeds: seeds.to_vec(),
        secret: b"cookie".to_vec(),
    };
    let a = start("a", la, std::slice::from_ref(&b_addr), b"cookie");
    let b = Cluster::start_with(config("b", &[]), lb, std::sync::Arc::new(Reverse)).unwrap();
    eventually("a and b connected", || up(&a) == ["b"] && up(&b) == ["a"]).await;
    let members = a.members();
    let second = Duration::from_secs(5);
    assert_eq!(members.call("b", b"abc", second).await.unwrap(), b"cbaa");
    // Large payloads and many calls at once are matched to their answers.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut expected = big.clone();
    expected.reverse();
    expected.push(b'a');
    assert_eq!(members.call("b", &big, second).await.unwrap(), expected);
    let calls: Vec<_> = (0..100u32)
        .map(|i| {
            let members = members.clone();
            tokio::spawn(async move { (i, members.call("b", &i.to_be_bytes(), Duration::from_secs(5)).await) })
        })
        .collect();
    for call in calls {
        let (i, answer) = call.await.unwrap();
        let mut want = i.to_be_bytes().to_vec();
        want.reverse();
        want.push(b'a');
        assert_eq!(answer.unwrap(), want);
    }
    // b serves nothing for a's calls to an unknown node, nor to a's own handler.
    assert!(matches!(members.call("nobody", b"x", second).await, Err(CallError::NotConnected(_))));
    assert_eq!(b.members().call("a", b"x", second).await.unwrap(), b"", "a has no handler: empty answers");
    // A call in flight when the peer goes fails at once, not at its timeout.
    let pending = tokio::spawn(async move { members.call("b", b"sleep", Duration::from_secs(20)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = std::time::Instant::now();
    b.stop().await;
    assert!(matches!(pending.await.unwrap(), Err(CallError::Lost(_))));
    assert!(stopped.elapsed() < Duration::from_secs(2), "failed after {:?}", stopped.elapsed());
}
