//! The real binaries, spawned as a user would run them, and a config file per test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Path of a workspace binary (`sluice-worker`, `sluice-producer`), built by
/// `cargo build --workspace --bins` before the tests run (the test command does it).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        path.display()
    );
    path
}

/// A TOML config written to a temporary directory, as a user would write it.
pub struct ConfigFile {
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl ConfigFile {
    /// Write `toml` (the whole file) to a fresh directory.
    pub fn new(toml: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sluice-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("sluice.toml");
        std::fs::write(&path, toml).expect("write config");
        Self { dir, path }
    }

    /// A file next to the config (CSV, templates...).
    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, content).expect("write file");
        path
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The usual test config: one namespace, relays given as `(name, port, extra TOML lines)`.
pub fn config_toml(namespace: &str, relays: &[(&str, u16, &str)], retry_delays: &[&str]) -> String {
    config_toml_at(crate::broker::AMQP_URL, namespace, relays, retry_delays)
}

/// [`config_toml`] for a broker at `url` (a private node, a cluster, a proxy).
pub fn config_toml_at(
    url: &str,
    namespace: &str,
    relays: &[(&str, u16, &str)],
    retry_delays: &[&str],
) -> String {
    let mut toml = format!(
        "[amqp]\nurl = \"{url}\"\nnamespace = \"{namespace}\"\n\n[retry]\ndelays = [{}]\n",
        retry_delays
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (name, port, extra) in relays {
        toml.push_str(&format!(
            "\n[relays.{name}]\nhost = \"127.0.0.1\"\nport = {port}\n{extra}\n"
        ));
    }
    toml
}

/// A running `sluice-worker`; killed (SIGKILL) when dropped unless stopped first.
pub struct WorkerProcess {
    pub child: Child,
    /// Where its stderr goes, when the test reads its logs ([`WorkerProcess::start_logged`]).
    log: Option<PathBuf>,
}

impl WorkerProcess {
    /// Start a worker with `--config <path>` plus `args`; its logs go to the test's stderr.
    pub fn start(config: &Path, args: &[&str]) -> Self {
        Self::start_with_env(config, args, &[])
    }

    /// Like [`WorkerProcess::start`], with extra environment variables (`OTEL_*`...).
    pub fn start_with_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let child = Command::new(bin("sluice-worker"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .expect("start sluice-worker");
        Self { child, log: None }
    }

    /// Like [`WorkerProcess::start`], with its stderr (at `warn` level) kept in a file that
    /// [`WorkerProcess::logs`] reads, so a test can assert on what the worker said.
    pub fn start_logged(config: &Path, args: &[&str]) -> Self {
        Self::start_logged_with_env(config, args, &[])
    }

    /// Like [`WorkerProcess::start_logged`], with extra environment variables (which may
    /// set `RUST_LOG` and `SLUICE_LOG_FORMAT`).
    pub fn start_logged_with_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "sluice-worker-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).expect("worker log file");
        let child = Command::new(bin("sluice-worker"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start sluice-worker");
        Self {
            child,
            log: Some(log),
        }
    }

    /// What a worker started with [`WorkerProcess::start_logged`] has logged so far.
    pub fn logs(&self) -> String {
        let path = self.log.as_ref().expect("started with start_logged");
        std::fs::read_to_string(path).expect("read worker log")
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        self.child.wait().expect("wait for worker")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
        if let Some(log) = &self.log {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// Run `sluice-producer` with `--config <path>` and `args` to completion.
pub fn run_producer(config: &Path, args: &[&str]) -> Output {
    run_producer_with_env(config, args, &[])
}

/// Like [`run_producer`], with extra environment variables (`OTEL_*`...).
pub fn run_producer_with_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin("sluice-producer"))
        .envs(env.iter().copied())
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .expect("run sluice-producer")
}
