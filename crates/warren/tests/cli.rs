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
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("warren-cli-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("warren.toml");
    std::fs::write(
        &file,
        format!(
            "amqp_port = {port}\nbind = [\"127.0.0.1\"]\ndata_dir = \"{}\"\n[[users]]\nname = \"app\"\npassword = \"s3cret\"\n",
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
