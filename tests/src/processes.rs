//! The real binaries, spawned as a user would run them, and a config file per test.
//!
//! [`Binary`] is the one way a test runs `sluice-worker` or `sluice-producer`: to completion
//! ([`Binary::run`]), or in the background ([`WorkerProcess`], or [`Binary::command`] for a
//! test that signals or pipes the process itself).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Path of a workspace binary (`sluice-worker`, `sluice-producer`), built by
/// `cargo build --workspace --bins` before the tests run (the test command does it).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let mut dir = exe.parent().and_then(Path::parent).expect("target dir");
    // `SLUICE_TEST_BINARIES=release` runs the tests against the release build (overflow
    // checks off, as users run it) while the tests themselves stay debug builds.
    let profile = std::env::var("SLUICE_TEST_BINARIES").ok();
    let other;
    if let Some(profile) = profile.as_deref().filter(|p| !p.is_empty()) {
        other = dir.parent().expect("target dir").join(profile);
        dir = &other;
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (with --release for \
         SLUICE_TEST_BINARIES=release) first (the README's test command does)",
        path.display()
    );
    path
}

/// A workspace binary about to run, as a user would start it: no standard input, no
/// `SLUICE_CONFIG` inherited from the test's environment, arguments and variables added in
/// the order given.
pub struct Binary {
    command: Command,
}

impl Binary {
    /// `name` (`sluice-worker`, `sluice-producer`), from [`bin`].
    pub fn new(name: &str) -> Self {
        let mut command = Command::new(bin(name));
        command.env_remove("SLUICE_CONFIG").stdin(Stdio::null());
        Self { command }
    }

    /// `RUST_LOG` from `SLUICE_TEST_LOG`, `warn` when unset: a test's output stays readable
    /// unless someone asks for more.
    pub fn quiet(self) -> Self {
        let level = std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "warn".into());
        self.env("RUST_LOG", level)
    }

    /// `--config <path>`, at this point of the command line.
    pub fn config(self, path: &Path) -> Self {
        self.arg("--config").arg(path)
    }

    /// One argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    /// Several arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    /// One environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// Several environment variables.
    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.command.envs(vars);
        self
    }

    /// Remove a variable the test's environment would pass on.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.command.env_remove(key);
        self
    }

    /// Pass on no variable of the test's environment, only those given after this.
    pub fn env_clear(mut self) -> Self {
        self.command.env_clear();
        self
    }

    /// The command, for a test that pipes, signals or waits on the process itself.
    pub fn command(self) -> Command {
        self.command
    }

    /// Run to completion; both outputs captured.
    pub fn output(mut self) -> Output {
        self.command.output().expect("run a sluice binary")
    }

    /// Run to completion, as a [`Run`].
    pub fn run(self) -> Run {
        Run::from(self.output())
    }

    /// Start it with its stderr going to `stderr`.
    fn spawn(mut self, stderr: Stdio) -> Child {
        self.command
            .stderr(stderr)
            .spawn()
            .expect("start a sluice binary")
    }
}

/// A finished run of a binary.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics with both outputs unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// The last line of stdout.
    pub fn last_line(&self) -> &str {
        self.stdout.lines().last().unwrap_or("")
    }

    /// stdout's last line as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.last_line())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}\n{}", self.last_line(), self.stderr))
    }

    /// The `line N` numbers stderr reports.
    pub fn reported_lines(&self) -> Vec<u64> {
        self.stderr
            .lines()
            .filter_map(|l| l.strip_prefix("line "))
            .filter_map(|rest| rest.split(':').next()?.parse().ok())
            .collect()
    }

    /// The stderr line that reports `line`.
    pub fn problem_on(&self, line: u64) -> &str {
        let prefix = format!("line {line}: ");
        self.stderr
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no problem reported on line {line}:\n{}", self.stderr))
    }
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
        Self::launch(config, args, &[], false)
    }

    /// Like [`WorkerProcess::start`], with extra environment variables (`OTEL_*`...).
    pub fn start_with_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(config, args, env, false)
    }

    /// Like [`WorkerProcess::start`], with its stderr (at `warn` level) kept in a file that
    /// [`WorkerProcess::logs`] reads, so a test can assert on what the worker said.
    pub fn start_logged(config: &Path, args: &[&str]) -> Self {
        Self::launch(config, args, &[], true)
    }

    /// Start a worker with `--config <path>`, `args` and `env`; `logged` keeps its stderr
    /// (at `warn` level unless `env` says otherwise) for [`WorkerProcess::logs`].
    pub fn launch(config: &Path, args: &[&str], env: &[(&str, &str)], logged: bool) -> Self {
        let binary = Binary::new("sluice-worker")
            .quiet()
            .config(config)
            .args(args);
        if !logged {
            let child = binary.envs(env.iter().copied()).spawn(Stdio::inherit());
            return Self { child, log: None };
        }
        let log = std::env::temp_dir().join(format!(
            "sluice-worker-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).expect("worker log file");
        let child = binary
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .spawn(file.into());
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

    /// Its exit status once it exits on its own, `None` while it still runs after `within`.
    pub async fn exit_within(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("worker status") {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
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

/// Run `sluice-producer` with `args` then `--config <path>` to completion.
pub fn run_producer(config: &Path, args: &[&str]) -> Output {
    run_producer_with_env(config, args, &[])
}

/// Like [`run_producer`], with extra environment variables (`OTEL_*`...).
pub fn run_producer_with_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Binary::new("sluice-producer")
        .quiet()
        .envs(env.iter().copied())
        .args(args)
        .config(config)
        .output()
}
