//! Private RabbitMQ nodes and clusters on loopback, started per test, for broker faults.
//!
//! The machine's own node (`rabbit@localhost`, port 5672) is shared by every test and must
//! never crash, block or change membership. A test that needs a node to do exactly that
//! starts its own here: a name, ports, data, logs, config and Erlang cookie of its own,
//! no plugins (so nothing else binds 15672 or 15692), everything under a temp dir that is
//! removed on drop.
//!
//! The scripts in `/usr/lib/rabbitmq/bin` are used directly: `/usr/sbin/rabbitmq-server`
//! and `/usr/sbin/rabbitmqctl` are wrappers that switch to the `rabbitmq` user when run as
//! root, which drops our `HOME` (and so our cookie) and our environment.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the unwrapped RabbitMQ scripts live; `SLUICE_TEST_RABBITMQ_BIN` overrides it.
const DEFAULT_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";

/// How long a node may take to boot before the test fails with its log.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a clean `stop` may take before the node is killed instead.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A RabbitMQ node of the installed server, private to one test. Killed (SIGKILL) and its
/// directories removed when dropped: a test never waits for a graceful shutdown it does
/// not ask for.
pub struct RabbitNode {
    name: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
    server: Option<Child>,
    beam_pid: Option<u32>,
}

impl RabbitNode {
    /// Start a node named `sluice-<tag>-<random>@localhost` and wait until it accepts AMQP.
    /// Panics with the tail of its log when it is not up within 90 s.
    pub fn start(tag: &str) -> Self {
        let mut node = Self::spawn(tag, &random_hex(20));
        node.await_started();
        node
    }

    /// Launch the server without waiting for it, so a cluster's nodes boot side by side.
    fn spawn(tag: &str, cookie: &str) -> Self {
        let name = format!("sluice-{tag}-{}@localhost", random_hex(8));
        let dir = std::env::temp_dir().join(format!(
            "sluice-rabbit-{}",
            name.trim_end_matches("@localhost")
        ));
        for sub in ["home", "data", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("node directories");
        }
        let cookie_path = dir.join("home/.erlang.cookie");
        std::fs::write(&cookie_path, cookie).expect("write Erlang cookie");
        std::fs::set_permissions(&cookie_path, std::fs::Permissions::from_mode(0o400))
            .expect("chmod 0400 Erlang cookie");
        let [port, dist_port] = free_ports();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("write rabbitmq.conf");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        // Replaces /etc/rabbitmq/rabbitmq-env.conf, which names the machine's own node.
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");

        let mut node = Self {
            name,
            port,
            dist_port,
            dir,
            server: None,
            beam_pid: None,
        };
        let out = std::fs::File::create(node.dir.join("server.out")).expect("server.out");
        let err = out.try_clone().expect("server.out");
        let server = node
            .command("rabbitmq-server")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: kill() reaches the shell script and the Erlang VM under it.
            .process_group(0)
            .spawn()
            .expect("start rabbitmq-server");
        node.server = Some(server);
        node
    }

    /// Wait for the boot to finish (`await_startup`), then note the VM's pid for `kill()`.
    fn await_started(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .server
                .as_mut()
                .and_then(|s| s.try_wait().ok().flatten())
            {
                self.fail_start(&format!("rabbitmq-server exited with {status}"));
            }
            // Fails at once while the node is not yet registered with epmd, hence the loop.
            if self
                .ctl(&["await_startup", "--timeout", "10"])
                .status
                .success()
            {
                break;
            }
            if Instant::now() >= deadline {
                self.fail_start(&format!("not up within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let output = self.ctl(&["eval", "os:getpid()."]);
        self.beam_pid = String::from_utf8_lossy(&output.stdout)
            .trim()
            .trim_matches('"')
            .parse()
            .ok();
        assert!(
            self.beam_pid.is_some(),
            "node {}: cannot read the Erlang VM's pid: {output:?}",
            self.name
        );
    }

    fn fail_start(&mut self, why: &str) -> ! {
        let logs = self.log_tail(40);
        self.kill_vm();
        panic!("RabbitMQ node {} did not start: {why}\n{logs}", self.name);
    }

    /// The node's Erlang name, `sluice-<tag>-<random>@localhost`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The AMQP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`: guest is allowed from loopback here.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Whether the server process is still running (false after `kill` or `stop`).
    pub fn is_running(&mut self) -> bool {
        matches!(self.server.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Run `rabbitmqctl -n <this node> args...` with the node's cookie, so it can never
    /// reach the machine's own node.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.cli("rabbitmqctl", args)
    }

    /// Run `rabbitmq-queues -n <this node> args...` (quorum queue status and membership).
    pub fn queues(&self, args: &[&str]) -> Output {
        self.cli("rabbitmq-queues", args)
    }

    fn cli(&self, tool: &str, args: &[&str]) -> Output {
        self.command(tool)
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"))
    }

    /// `rabbitmqctl set_vm_memory_high_watermark <fraction>`: a tiny fraction such as
    /// 0.0000001 raises the memory alarm, which blocks every publishing connection; 0.4
    /// (the default) lifts it.
    pub fn set_memory_high_watermark(&self, fraction: f64) {
        let output = self.ctl(&["set_vm_memory_high_watermark", &fraction.to_string()]);
        assert!(
            output.status.success(),
            "set_vm_memory_high_watermark {fraction} on {}: {}",
            self.name,
            describe(&output)
        );
    }

    /// SIGKILL the Erlang VM, as a crash or an OOM kill would: no clean shutdown, no
    /// goodbye to the cluster peers. Returns once the VM is gone.
    pub fn kill(&mut self) {
        if let Some(pid) = self.kill_vm() {
            panic!("the Erlang VM {pid} of {} survived SIGKILL", self.name);
        }
    }

    /// SIGKILL the server's process group and the VM; the VM's pid if it is still alive
    /// 10 s later (never panics, for `Drop`).
    fn kill_vm(&mut self) -> Option<u32> {
        let beam_pid = self.beam_pid.take();
        if let Some(mut server) = self.server.take() {
            // The whole group (script and VM), then the VM by pid in case it left the group.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", server.id())])
                .stderr(Stdio::null())
                .status();
            if let Some(pid) = beam_pid {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = server.kill();
            let _ = server.wait();
        }
        let pid = beam_pid?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        process_alive(pid).then_some(pid)
    }

    /// Stop the node cleanly (`rabbitmqctl stop`), killing it if it takes more than 30 s.
    pub fn stop(&mut self) {
        if !self.is_running() {
            return;
        }
        let _ = self.ctl(&["stop"]);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
    }

    /// The last `lines` lines of the node's log and of the server's own output.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.name));
        format!(
            "--- {} (last {lines} lines) ---\n{}\n--- server output (last {lines} lines) ---\n{}",
            log.display(),
            tail(&log, lines),
            tail(&self.dir.join("server.out"), lines)
        )
    }

    /// A RabbitMQ script with this node's environment. Every CLI call needs the same
    /// `HOME` (the cookie), and the server needs the rest.
    fn command(&self, tool: &str) -> Command {
        let bin_dir =
            std::env::var("SLUICE_TEST_RABBITMQ_BIN").unwrap_or_else(|_| DEFAULT_BIN_DIR.into());
        let mut command = Command::new(Path::new(&bin_dir).join(tool));
        let dir = &self.dir;
        command
            .current_dir(dir)
            .env("HOME", dir.join("home"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("data"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            // Distribution (epmd and the inter-node port) on loopback only.
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            // The listener is in rabbitmq.conf; a second one from the environment would
            // collide with it.
            .env_remove("RABBITMQ_NODE_PORT")
            .env_remove("RABBITMQ_NODE_IP_ADDRESS");
        command
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.kill_vm();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Several private nodes with one cookie, joined into one cluster (nodes 2..n joined to
/// node 1), for quorum queues and the loss of a node.
///
/// A quorum queue gets `quorum_cluster_size` replicas (3 by default on 3.10, so one on
/// every node of a 3-node cluster; a larger cluster still gets 3 unless the queue sets
/// `x-quorum-initial-group-size`).
pub struct RabbitCluster {
    nodes: Vec<RabbitNode>,
    down: Vec<bool>,
}

impl RabbitCluster {
    /// Start `n` nodes side by side, join them to the first and wait until
    /// `cluster_status` lists all `n` as running. Panics with the logs on failure.
    pub fn start(tag: &str, n: usize) -> Self {
        assert!(n >= 1, "a cluster needs a node");
        let cookie = random_hex(20);
        let mut nodes: Vec<RabbitNode> = (1..=n)
            .map(|i| RabbitNode::spawn(&format!("{tag}{i}"), &cookie))
            .collect();
        for node in &mut nodes {
            node.await_started();
        }
        let first = nodes[0].name.clone();
        for node in &nodes[1..] {
            for args in [
                vec!["stop_app"],
                vec!["join_cluster", first.as_str()],
                vec!["start_app"],
            ] {
                let output = node.ctl(&args);
                assert!(
                    output.status.success(),
                    "{} {args:?}: {}\n{}",
                    node.name,
                    describe(&output),
                    node.log_tail(30)
                );
            }
        }
        let cluster = Self {
            down: vec![false; n],
            nodes,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let running = cluster.running_nodes();
            if running.len() == n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster of {n}: only {running:?} running after {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        cluster
    }

    /// The nodes, in start order: index 0 is the one the others joined.
    pub fn nodes(&self) -> &[RabbitNode] {
        &self.nodes
    }

    /// One node, by index.
    pub fn node(&self, i: usize) -> &RabbitNode {
        &self.nodes[i]
    }

    /// Every node's AMQP URL, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RabbitNode::amqp_url).collect()
    }

    /// The URLs joined by commas, as `amqp.url` accepts a list of brokers.
    pub fn comma_url(&self) -> String {
        self.urls().join(",")
    }

    /// Names of the running nodes, as a live node's `cluster_status` reports them.
    pub fn running_nodes(&self) -> Vec<String> {
        let Some(node) = self.live_node() else {
            return Vec::new();
        };
        let output = node.ctl(&["cluster_status", "--formatter", "json"]);
        serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .ok()
            .and_then(|status| {
                status["running_nodes"].as_array().map(|nodes| {
                    nodes
                        .iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Which node leads quorum queue `queue` now, by index; `None` while there is no
    /// leader (an election after the leader died) or the queue does not exist.
    ///
    /// Asks a live node `rabbitmq-queues quorum_status <queue> --formatter json`, which
    /// lists each member as `{"Node Name": ..., "Raft State": "leader" | "follower" |
    /// ["nodedown", ...], ...}`.
    pub fn quorum_leader(&self, queue: &str) -> Option<usize> {
        let node = self.live_node()?;
        let output = node.queues(&["quorum_status", queue, "--formatter", "json"]);
        let members: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        let leader = members
            .as_array()?
            .iter()
            .find(|m| m["Raft State"] == "leader")?["Node Name"]
            .as_str()?
            .to_owned();
        self.nodes.iter().position(|n| n.name == leader)
    }

    /// Which nodes hold a replica of quorum queue `queue`, by index (empty when no live
    /// node can tell).
    pub fn quorum_members(&self, queue: &str) -> Vec<usize> {
        let Some(node) = self.live_node() else {
            return Vec::new();
        };
        let output = node.queues(&["quorum_status", queue, "--formatter", "json"]);
        let members: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        members
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["Node Name"].as_str())
            .filter_map(|name| self.nodes.iter().position(|n| n.name == name))
            .collect()
    }

    /// Wait (polling) until a live node leads `queue`; `None` after `timeout`.
    pub fn await_quorum_leader(&self, queue: &str, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.quorum_leader(queue).filter(|&i| !self.down[i]) {
                return Some(i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL node `i` (see [`RabbitNode::kill`]); the others keep running.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
        self.down[i] = true;
    }

    fn live_node(&self) -> Option<&RabbitNode> {
        self.nodes
            .iter()
            .zip(&self.down)
            .find(|(_, down)| !**down)
            .map(|(node, _)| node)
    }
}

/// Two distinct free loopback ports below the kernel's ephemeral range (32768 and up), so
/// that no outgoing connection takes one between our check and the node's bind.
fn free_ports() -> [u16; 2] {
    let mut ports = [0u16; 2];
    let mut found = 0;
    while found < 2 {
        let bytes = uuid::Uuid::new_v4().into_bytes();
        let port = 20_000 + u16::from_be_bytes([bytes[0], bytes[1]]) % 10_000;
        // 25672 is the machine's node's distribution port.
        if port == 25_672 || ports[..found].contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports[found] = port;
            found += 1;
        }
    }
    ports
}

fn random_hex(len: usize) -> String {
    let mut hex = String::new();
    while hex.len() < len {
        hex.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    hex.truncate(len);
    hex
}

/// Alive and not a zombie (a killed VM whose parent has not reaped it yet counts as gone).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
