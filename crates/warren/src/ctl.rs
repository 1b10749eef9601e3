//! `warren ctl`: users, virtual hosts, permissions and limits, with
//! rabbitmqctl's command names and arguments. It edits the access file in
//! the data directory; a running broker applies the change within a
//! quarter of a second, and a stopped one at its next start.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use warren_server::access::{AccessDefinitions, AccessFile, PolicyDef, Seed, KNOWN_TAGS};
use warren_server::Config;

#[derive(Args)]
pub struct CtlArgs {
    /// TOML configuration file (for its data directory and configured users).
    #[arg(long, env = "WARREN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory [default: ./warren-data, or the configuration's].
    #[arg(long, env = "WARREN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Args)]
struct VhostArg {
    /// Virtual host.
    #[arg(short = 'p', long = "vhost", default_value = "/")]
    vhost: String,
}

/// A quorum queue and a node, for `add_member` and `delete_member`.
#[derive(Args)]
struct MemberArgs {
    queue: String,
    node: String,
    #[command(flatten)]
    vhost: VhostArg,
    #[command(flatten)]
    broker: BrokerArg,
}

/// A running broker, reached through its management API.
#[derive(Args)]
struct BrokerArg {
    /// The management API's address [default: 127.0.0.1 and the configuration's http_port].
    #[arg(long, value_name = "HOST:PORT")]
    api: Option<String>,
    #[arg(long, env = "WARREN_CTL_USER", default_value = "guest")]
    user: String,
    #[arg(long, env = "WARREN_CTL_PASSWORD", default_value = "guest")]
    password: String,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// The cluster's nodes and its metadata group, as the running broker sees them.
    #[command(name = "cluster_status")]
    ClusterStatus {
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// A quorum queue's members and Raft state (ask its leader for every
    /// member's log index).
    #[command(name = "quorum_status")]
    QuorumStatus {
        queue: String,
        #[command(flatten)]
        vhost: VhostArg,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Removes a stopped node from the cluster for good: it leaves the
    /// metadata group and every quorum queue it is a member of.
    #[command(name = "forget_cluster_node")]
    ForgetClusterNode {
        node: String,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Adds a replica of a quorum queue on NODE (rabbitmq-queues' add_member).
    #[command(name = "add_member")]
    AddMember(MemberArgs),
    /// Removes a quorum queue's replica on NODE (rabbitmq-queues' delete_member).
    #[command(name = "delete_member")]
    DeleteMember(MemberArgs),
    /// Adds a replica on NODE to every quorum queue (`all`), or to those with
    /// an even number of members (`even`).
    Grow {
        node: String,
        #[arg(value_parser = ["all", "even"])]
        strategy: String,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Removes NODE's replica from every quorum queue that has another member.
    Shrink {
        node: String,
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Creates a user; the password is read from standard input if omitted.
    #[command(name = "add_user")]
    AddUser { name: String, password: Option<String> },
    /// Deletes a user, its permissions, and closes its connections.
    #[command(name = "delete_user")]
    DeleteUser { name: String },
    /// Sets a new password; the password is read from standard input if omitted.
    #[command(name = "change_password")]
    ChangePassword { name: String, password: Option<String> },
    /// Removes the password: only certificate (EXTERNAL) logins remain.
    #[command(name = "clear_password")]
    ClearPassword { name: String },
    /// Checks a password against the stored hash.
    #[command(name = "authenticate_user")]
    AuthenticateUser { name: String, password: Option<String> },
    /// Replaces a user's tags (administrator, management, monitoring, policymaker, impersonator).
    #[command(name = "set_user_tags")]
    SetUserTags { name: String, tags: Vec<String> },
    #[command(name = "list_users")]
    ListUsers,
    #[command(name = "add_vhost")]
    AddVhost { name: String },
    /// Deletes a virtual host with everything in it and closes its connections.
    #[command(name = "delete_vhost")]
    DeleteVhost { name: String },
    #[command(name = "list_vhosts")]
    ListVhosts,
    /// Grants configure, write and read regular expressions in a virtual host.
    #[command(name = "set_permissions")]
    SetPermissions {
        #[command(flatten)]
        vhost: VhostArg,
        user: String,
        configure: String,
        write: String,
        read: String,
    },
    #[command(name = "clear_permissions")]
    ClearPermissions {
        #[command(flatten)]
        vhost: VhostArg,
        user: String,
    },
    #[command(name = "list_permissions")]
    ListPermissions {
        #[command(flatten)]
        vhost: VhostArg,
    },
    #[command(name = "list_user_permissions")]
    ListUserPermissions { user: String },
    /// Restricts routing keys on a topic exchange ({username} and {vhost} expand).
    #[command(name = "set_topic_permissions")]
    SetTopicPermissions {
        #[command(flatten)]
        vhost: VhostArg,
        user: String,
        exchange: String,
        write: String,
        read: String,
    },
    #[command(name = "clear_topic_permissions")]
    ClearTopicPermissions {
        #[command(flatten)]
        vhost: VhostArg,
        user: String,
        exchange: Option<String>,
    },
    #[command(name = "list_topic_permissions")]
    ListTopicPermissions {
        #[command(flatten)]
        vhost: VhostArg,
    },
    /// Sets a virtual host's limits: '{"max-connections": N, "max-queues": N}' (negative = none).
    #[command(name = "set_vhost_limits")]
    SetVhostLimits {
        #[command(flatten)]
        vhost: VhostArg,
        limits: String,
    },
    #[command(name = "clear_vhost_limits")]
    ClearVhostLimits {
        #[command(flatten)]
        vhost: VhostArg,
    },
    /// Sets a user's limits: '{"max-connections": N, "max-channels": N}' (negative = none).
    #[command(name = "set_user_limits")]
    SetUserLimits { user: String, limits: String },
    #[command(name = "clear_user_limits")]
    ClearUserLimits { user: String },
    /// Sets a runtime policy, as rabbitmqctl does: NAME PATTERN DEFINITION (JSON).
    #[command(name = "set_policy")]
    SetPolicy {
        #[command(flatten)]
        vhost: VhostArg,
        /// queues, exchanges or all.
        #[arg(long = "apply-to", default_value = "all")]
        apply_to: String,
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i64,
        name: String,
        pattern: String,
        definition: String,
    },
    #[command(name = "clear_policy")]
    ClearPolicy {
        #[command(flatten)]
        vhost: VhostArg,
        name: String,
    },
    /// Runtime policies (those of the configuration file are not listed).
    #[command(name = "list_policies")]
    ListPolicies {
        #[command(flatten)]
        vhost: VhostArg,
    },
    /// Adds users, virtual hosts, permissions and limits from a definitions file (a RabbitMQ
    /// export works: its password hashes are kept).
    #[command(name = "import_definitions")]
    ImportDefinitions { file: PathBuf },
    /// Writes the access definitions as JSON ("-" = standard output).
    #[command(name = "export_definitions")]
    ExportDefinitions { file: PathBuf },
}

fn password_or_stdin(password: Option<String>) -> anyhow::Result<String> {
    if let Some(password) = password {
        return Ok(password);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn config(args: &CtlArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    Ok(config)
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    println!("{}", header.join("\t"));
    for row in rows {
        println!("{}", row.join("\t"));
    }
}

/// `GET path` on the running broker's management API; the JSON answer.
fn api_get(config: &Config, broker: &BrokerArg, path: &str) -> anyhow::Result<serde_json::Value> {
    api(config, broker, "GET", path)
}

fn api(config: &Config, broker: &BrokerArg, method: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    use base64::Engine;
    use std::io::{Read, Write};
    let address = broker.api.clone().unwrap_or_else(|| format!("127.0.0.1:{}", config.http_port));
    let mut stream = std::net::TcpStream::connect(&address)
        .with_context(|| format!("cannot reach the broker's management API at {address}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", broker.user, broker.password));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Basic {credentials}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    match status {
        "200" => Ok(serde_json::from_str(body).context("the broker's answer is not JSON")?),
        "404" => anyhow::bail!("not found: {path}"),
        other => anyhow::bail!("the broker answered {other}: {body}"),
    }
}

/// A path segment as the API takes it.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Adds (`add`) or removes `node`'s replica of a quorum queue.
fn set_member(
    config: &Config,
    broker: &BrokerArg,
    (vhost, queue, node): (&str, &str, &str),
    add: bool,
) -> anyhow::Result<Vec<String>> {
    let path = format!("/api/warren/quorum/{}/{}/members/{}", encode(vhost), encode(queue), encode(node));
    let answer = api(config, broker, if add { "PUT" } else { "DELETE" }, &path)?;
    Ok(answer["members"].as_array().map(|m| m.iter().map(text).collect()).unwrap_or_default())
}

fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Commands answered by the running broker, not the access file.
fn run_remote(config: &Config, command: &CtlCommand) -> anyhow::Result<bool> {
    match command {
        CtlCommand::ClusterStatus { broker } => {
            let nodes = api_get(config, broker, "/api/nodes")?;
            let nodes = nodes.as_array().cloned().unwrap_or_default();
            print_table(
                &["node", "running", "error"],
                nodes
                    .iter()
                    .map(|n| vec![text(&n["name"]), text(&n["running"]), text(&n["warren_cluster_error"])])
                    .collect(),
            );
            if let Some(meta) = nodes.first().map(|n| &n["warren_metadata"]).filter(|m| !m.is_null()) {
                println!(
                    "metadata group: leader {}, term {}, members {}",
                    text(&meta["leader"]),
                    text(&meta["term"]),
                    text(&meta["members"])
                );
            }
            Ok(true)
        }
        CtlCommand::AddMember(MemberArgs { queue, node, vhost, broker })
        | CtlCommand::DeleteMember(MemberArgs { queue, node, vhost, broker }) => {
            let add = matches!(command, CtlCommand::AddMember(_));
            let members = set_member(config, broker, (&vhost.vhost, queue, node), add)?;
            println!("quorum queue '{queue}' in vhost '{}': members {}", vhost.vhost, members.join(", "));
            Ok(true)
        }
        CtlCommand::ForgetClusterNode { node, broker } => {
            api(config, broker, "DELETE", &format!("/api/warren/nodes/{}", encode(node)))?;
            println!("node '{node}' removed from the cluster");
            Ok(true)
        }
        CtlCommand::Grow { node, strategy, broker } => {
            let placements = api_get(config, broker, "/api/warren/quorum")?;
            for placement in placements.as_array().cloned().unwrap_or_default() {
                let members: Vec<String> =
                    placement["members"].as_array().map(|m| m.iter().map(text).collect()).unwrap_or_default();
                if members.contains(node) || (strategy == "even" && !members.len().is_multiple_of(2)) {
                    continue;
                }
                let (vhost, queue) = (text(&placement["vhost"]), text(&placement["name"]));
                match set_member(config, broker, (&vhost, &queue, node), true) {
                    Ok(members) => println!("{vhost}\t{queue}\tgrown: {}", members.join(", ")),
                    Err(e) => println!("{vhost}\t{queue}\terror: {e}"),
                }
            }
            Ok(true)
        }
        CtlCommand::Shrink { node, broker } => {
            let placements = api_get(config, broker, "/api/warren/quorum")?;
            for placement in placements.as_array().cloned().unwrap_or_default() {
                let members: Vec<String> =
                    placement["members"].as_array().map(|m| m.iter().map(text).collect()).unwrap_or_default();
                if !members.contains(node) {
                    continue;
                }
                let (vhost, queue) = (text(&placement["vhost"]), text(&placement["name"]));
                if members.len() == 1 {
                    println!("{vhost}\t{queue}\tkept: its only member");
                    continue;
                }
                match set_member(config, broker, (&vhost, &queue, node), false) {
                    Ok(members) => println!("{vhost}\t{queue}\tshrunk: {}", members.join(", ")),
                    Err(e) => println!("{vhost}\t{queue}\terror: {e}"),
                }
            }
            Ok(true)
        }
        CtlCommand::QuorumStatus { queue, vhost, broker } => {
            let path = format!("/api/warren/quorum/{}/{}", encode(&vhost.vhost), encode(queue));
            let status = api_get(config, broker, &path)
                .with_context(|| format!("no quorum queue '{queue}' in vhost '{}'", vhost.vhost))?;
            println!(
                "quorum queue '{queue}' in vhost '{}': group {}, leader {}, term {} (as {} sees it)",
                vhost.vhost,
                text(&status["group"]),
                text(&status["leader"]),
                text(&status["term"]),
                text(&status["node"])
            );
            let matched = status["matched"].as_object().cloned().unwrap_or_default();
            let members = status["members"].as_array().cloned().unwrap_or_default();
            let leader = text(&status["leader"]);
            print_table(
                &["member", "role", "log index (on the leader)"],
                members
                    .iter()
                    .map(|m| {
                        let name = text(m);
                        let role = if name == leader { "leader" } else { "follower" };
                        let index = matched.get(&name).map(text).unwrap_or_else(|| "-".into());
                        vec![name, role.into(), index]
                    })
                    .collect(),
            );
            Ok(true)
        }
        _ => Ok(false),
    }
}

pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let config = config(&args)?;
    if run_remote(&config, &args.command)? {
        return Ok(());
    }
    let file = AccessFile::new(&config.data_dir).with_hashing(&config.password_hashing);
    // Seeds a new file exactly as the broker's first start would.
    let current = warren_server::broker::load_access(&config, &file)?;
    let update = |change: &dyn Fn(&mut AccessDefinitions) -> Result<(), warren_server::access::AccessError>| {
        file.update(&Seed { vhosts: &[], users: Vec::new() }, change).map(drop)
    };
    use CtlCommand as C;
    match args.command {
        C::AddUser { name, password } => {
            let password = password_or_stdin(password)?;
            println!("Adding user \"{name}\" ...");
            update(&|d| d.add_user(&name, &password))?;
        }
        C::DeleteUser { name } => {
            println!("Deleting user \"{name}\" ...");
            update(&|d| d.delete_user(&name))?;
        }
        C::ChangePassword { name, password } => {
            let password = password_or_stdin(password)?;
            println!("Changing password for user \"{name}\" ...");
            update(&|d| d.change_password(&name, &password))?;
        }
        C::ClearPassword { name } => {
            println!("Clearing password for user \"{name}\" ...");
            update(&|d| d.clear_password(&name))?;
        }
        C::AuthenticateUser { name, password } => {
            let password = password_or_stdin(password)?;
            let access = warren_server::access::Access::compile(&current);
            match access.user(&name) {
                Some(user) if user.verify(&password) => println!("Success"),
                _ => anyhow::bail!("Error: failed to authenticate user \"{name}\""),
            }
        }
        C::SetUserTags { name, tags } => {
            for tag in tags.iter().filter(|t| !KNOWN_TAGS.contains(&t.as_str())) {
                eprintln!("note: '{tag}' is not a tag Warren knows; it is stored anyway");
            }
            println!("Setting tags for user \"{name}\" to [{}] ...", tags.join(", "));
            update(&|d| d.set_user_tags(&name, &tags))?;
        }
        C::ListUsers => print_table(
            &["user", "tags"],
            current.users.iter().map(|u| vec![u.name.clone(), format!("[{}]", u.tags.join(", "))]).collect(),
        ),
        C::AddVhost { name } => {
            println!("Adding vhost \"{name}\" ...");
            update(&|d| d.add_vhost(&name))?;
        }
        C::DeleteVhost { name } => {
            println!("Deleting vhost \"{name}\" ...");
            update(&|d| d.delete_vhost(&name))?;
        }
        C::ListVhosts => print_table(&["name"], current.vhosts.iter().map(|v| vec![v.name.clone()]).collect()),
        C::SetPermissions { vhost: VhostArg { vhost }, user, configure, write, read } => {
            println!("Setting permissions for user \"{user}\" in vhost \"{vhost}\" ...");
            update(&|d| d.set_permissions(&vhost, &user, &configure, &write, &read))?;
        }
        C::ClearPermissions { vhost: VhostArg { vhost }, user } => {
            println!("Clearing permissions for user \"{user}\" in vhost \"{vhost}\" ...");
            update(&|d| d.clear_permissions(&vhost, &user))?;
        }
        C::ListPermissions { vhost: VhostArg { vhost } } => print_table(
            &["user", "configure", "write", "read"],
            current
                .permissions
                .iter()
                .filter(|p| p.vhost == vhost)
                .map(|p| vec![p.user.clone(), p.configure.clone(), p.write.clone(), p.read.clone()])
                .collect(),
        ),
        C::ListUserPermissions { user } => print_table(
            &["vhost", "configure", "write", "read"],
            current
                .permissions
                .iter()
                .filter(|p| p.user == user)
                .map(|p| vec![p.vhost.clone(), p.configure.clone(), p.write.clone(), p.read.clone()])
                .collect(),
        ),
        C::SetTopicPermissions { vhost: VhostArg { vhost }, user, exchange, write, read } => {
            println!("Setting topic permissions on \"{exchange}\" for user \"{user}\" in vhost \"{vhost}\" ...");
            update(&|d| d.set_topic_permissions(&vhost, &user, &exchange, &write, &read))?;
        }
        C::ClearTopicPermissions { vhost: VhostArg { vhost }, user, exchange } => {
            println!("Clearing topic permissions for user \"{user}\" in vhost \"{vhost}\" ...");
            update(&|d| d.clear_topic_permissions(&vhost, &user, exchange.as_deref()))?;
        }
        C::ListTopicPermissions { vhost: VhostArg { vhost } } => print_table(
            &["user", "exchange", "write", "read"],
            current
                .topic_permissions
                .iter()
                .filter(|p| p.vhost == vhost)
                .map(|p| vec![p.user.clone(), p.exchange.clone(), p.write.clone(), p.read.clone()])
                .collect(),
        ),
        C::SetVhostLimits { vhost: VhostArg { vhost }, limits } => {
            println!("Applying limits to vhost \"{vhost}\" ...");
            update(&|d| d.set_vhost_limits(&vhost, &limits))?;
        }
        C::ClearVhostLimits { vhost: VhostArg { vhost } } => {
            println!("Clearing limits of vhost \"{vhost}\" ...");
            update(&|d| d.clear_vhost_limits(&vhost))?;
        }
        C::SetUserLimits { user, limits } => {
            println!("Setting limits for user \"{user}\" ...");
            update(&|d| d.set_user_limits(&user, &limits))?;
        }
        C::ClearUserLimits { user } => {
            println!("Clearing limits of user \"{user}\" ...");
            update(&|d| d.clear_user_limits(&user))?;
        }
        C::SetPolicy { vhost: VhostArg { vhost }, apply_to, priority, name, pattern, definition } => {
            println!(
                "Setting policy \"{name}\" for pattern \"{pattern}\" to \"{definition}\" with priority \"{priority}\" for vhost \"{vhost}\" ..."
            );
            let definition: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&definition)
                .with_context(|| format!("the definition '{definition}' is not a JSON object"))?;
            let policy = PolicyDef { vhost, name, pattern, apply_to, definition, priority };
            update(&|d| d.set_policy(policy.clone()))?;
        }
        C::ClearPolicy { vhost: VhostArg { vhost }, name } => {
            println!("Clearing policy \"{name}\" on vhost \"{vhost}\" ...");
            update(&|d| d.clear_policy(&vhost, &name))?;
        }
        C::ListPolicies { vhost: VhostArg { vhost } } => print_table(
            &["vhost", "name", "pattern", "apply-to", "definition", "priority"],
            current
                .policies
                .iter()
                .filter(|p| p.vhost == vhost)
                .map(|p| {
                    let definition = serde_json::Value::Object(p.definition.clone()).to_string();
                    vec![
                        p.vhost.clone(),
                        p.name.clone(),
                        p.pattern.clone(),
                        p.apply_to.clone(),
                        definition,
                        p.priority.to_string(),
                    ]
                })
                .collect(),
        ),
        C::ImportDefinitions { file: path } => {
            let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let imported: AccessDefinitions = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a definitions file", path.display()))?;
            let counts = (imported.users.len(), imported.vhosts.len(), imported.permissions.len());
            println!("Importing definitions from \"{}\" ...", path.display());
            update(&|d| d.import(imported.clone()))?;
            println!("{} users, {} virtual hosts, {} permissions imported", counts.0, counts.1, counts.2);
        }
        // Answered by `run_remote` above.
        C::ClusterStatus { .. }
        | C::QuorumStatus { .. }
        | C::ForgetClusterNode { .. }
        | C::AddMember(_)
        | C::DeleteMember(_)
        | C::Grow { .. }
        | C::Shrink { .. } => {}
        C::ExportDefinitions { file: path } => {
            let text = serde_json::to_string_pretty(&current)?;
            if path.as_os_str() == "-" {
                println!("{text}");
            } else {
                std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}
