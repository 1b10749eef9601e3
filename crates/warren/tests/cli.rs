//! The `warren` binary as an operator runs it: help, configuration file,
//! serving real clients, and a clean exit on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "broker did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn help_documents_the_operator_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_warren")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in ["--amqp-port", "--bind", "--data-dir", "--config", "--heartbeat", "perf"] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn a_bad_config_file_is_refused_with_its_path() {
    let dir = std::env::temp_dir().join(format!("warren-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "amqp_prot = 5672\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warren")).arg("--config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml") && stderr.contains("amqp_prot"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serves_clients_from_a_config_file_and_exits_cleanly_on_sigterm() {
    let (port, http) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("warren-cli-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("warren.toml");
    std::fs::write(
        &file,
        format!(
            "amqp_port = {port}\nhttp_port = {http}\nprometheus_port = 0\nbind = [\"127.0.0.1\"]\ndata_dir = \"{}\"\n[[users]]\nname = \"app\"\npassword = \"s3cret\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let mut broker = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--config")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    wait_for_port(http);
    assert!(dir.join("data").is_dir(), "data directory created at start");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let uri = format!("amqp://app:s3cret@127.0.0.1:{port}/%2F");
        let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .queue_declare("cli".into(), lapin::options::QueueDeclareOptions::default(), Default::default())
            .await
            .unwrap();
        // guest exists only when no users are configured.
        let guest = lapin::Connection::connect(
            &format!("amqp://guest:guest@127.0.0.1:{port}/%2F"),
            lapin::ConnectionProperties::default(),
        )
        .await;
        assert!(guest.is_err());

        Command::new("kill").arg("-TERM").arg(broker.id().to_string()).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = broker.try_wait().unwrap() {
                assert!(status.success(), "exit status {status}");
                break;
            }
            assert!(Instant::now() < deadline, "broker did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!conn.status().connected(), "clients are disconnected at shutdown");
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn ctl(data_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_warren")).arg("ctl").arg("--data-dir").arg(data_dir).args(args).output().unwrap()
}

#[test]
fn ctl_manages_users_vhosts_and_permissions_of_a_running_broker() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("warren-cli-ctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    // Before the first start: the file is seeded as the broker would seed it.
    let out = ctl(&data, &["add_vhost", "shop"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut broker = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "--amqp-port",
            &port.to_string(),
            "--http-port",
            "0",
            "--prometheus-port",
            "0",
            "--bind",
            "127.0.0.1",
            "--data-dir",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    // While it runs, with the password on standard input.
    let mut add = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("ctl")
        .arg("--data-dir")
        .arg(&data)
        .args(["add_user", "cart"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    add.stdin.take().unwrap().write_all(b"pa55\n").unwrap();
    assert!(add.wait().unwrap().success());
    assert!(ctl(&data, &["set_permissions", "-p", "shop", "cart", "^cart\\.", "^cart\\.", "^cart\\."])
        .status
        .success());
    let refused = ctl(&data, &["set_permissions", "-p", "nowhere", "cart", ".*", ".*", ".*"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no such virtual host 'nowhere'"));
    let users = String::from_utf8(ctl(&data, &["list_users"]).stdout).unwrap();
    assert!(users.contains("guest\t[administrator]") && users.contains("cart\t[]"), "{users}");
    assert!(ctl(&data, &["authenticate_user", "cart", "pa55"]).status.success());
    assert!(!ctl(&data, &["authenticate_user", "cart", "nope"]).status.success());

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        // Applied within the broker's quarter-second poll.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let uri = format!("amqp://cart:pa55@127.0.0.1:{port}/shop");
        let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .queue_declare("cart.orders".into(), lapin::options::QueueDeclareOptions::default(), Default::default())
            .await
            .unwrap();
        let err = channel
            .queue_declare("orders".into(), lapin::options::QueueDeclareOptions::default(), Default::default())
            .await
            .unwrap_err();
        assert!(format!("{err:?}").contains("ACCESS_REFUSED"), "{err:?}");
        let export = dir.join("export.json");
        assert!(ctl(&data, &["export_definitions", export.to_str().unwrap()]).status.success());
        assert!(ctl(&data, &["delete_user", "cart"]).status.success());
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!conn.status().connected(), "a deleted user's connection is closed");
        // Importing the export brings the user back with the same password.
        assert!(ctl(&data, &["import_definitions", export.to_str().unwrap()]).status.success());
        tokio::time::sleep(Duration::from_millis(600)).await;
        lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await.unwrap();

        // A runtime policy, as rabbitmqctl sets it, caps a queue at once.
        let guest = format!("amqp://guest:guest@127.0.0.1:{port}/%2F");
        let conn = lapin::Connection::connect(&guest, lapin::ConnectionProperties::default()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        let declare = lapin::options::QueueDeclareOptions::default();
        channel.queue_declare("capped".into(), declare, Default::default()).await.unwrap();
        let set = ctl(&data, &["set_policy", "--apply-to", "queues", "cap", "^capped$", r#"{"max-length": 1}"#]);
        assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
        let bad = ctl(&data, &["set_policy", "cap", ".", r#"{"max-lenght": 1}"#]);
        assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown key 'max-lenght'"), "{bad:?}");
        let listed = String::from_utf8(ctl(&data, &["list_policies"]).stdout).unwrap();
        assert!(listed.contains("cap\t^capped$\tqueues"), "{listed}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        for body in [b"1", b"2", b"3"] {
            let options = lapin::options::BasicPublishOptions::default();
            channel.basic_publish("".into(), "capped".into(), options, body, Default::default()).await.unwrap();
        }
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..declare };
        let queue = channel.queue_declare("capped".into(), passive, Default::default()).await.unwrap();
        assert_eq!(queue.message_count(), 1, "max-length 1 from the policy");
        assert!(ctl(&data, &["clear_policy", "cap"]).status.success());
        assert!(!ctl(&data, &["clear_policy", "cap"]).status.success());
    });
    broker.kill().unwrap();
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
