//! aiosmtpd, a real SMTP server with STARTTLS, implicit TLS and AUTH, spawned per test
//! (`tests/smtp/aiosmtpd_server.py`), recording what it was sent and how.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

use crate::tls::TestPki;

/// How the server talks on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// STARTTLS offered and required before MAIL; AUTH only once encrypted.
    Starttls,
    /// TLS from the first byte (as on port 465).
    Tls,
    /// No TLS; AUTH (if a user is set) offered in clear, to catch a client that uses it.
    Plain,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Starttls => "starttls",
            Mode::Tls => "tls",
            Mode::Plain => "plain",
        }
    }
}

/// One message the server accepted, with how the session that sent it looked.
#[derive(Debug, Clone, Deserialize)]
pub struct ReceivedMessage {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub data: String,
    /// The session was encrypted (STARTTLS or implicit TLS) when DATA was sent.
    pub tls: bool,
    /// The user the session authenticated as, if it did.
    pub auth_user: Option<String>,
}

/// A running aiosmtpd on 127.0.0.1; killed when dropped.
pub struct Aiosmtpd {
    pub port: u16,
    pub dump_dir: PathBuf,
    child: Child,
}

impl Aiosmtpd {
    /// Start a server in `mode` on a free loopback port. `pki` gives its certificate (needed
    /// for `Starttls` and `Tls`); `auth` = (user, password) makes AUTH required.
    pub async fn start(mode: Mode, pki: Option<&TestPki>, auth: Option<(&str, &str)>) -> Self {
        let dump_dir =
            std::env::temp_dir().join(format!("sluice-aiosmtpd-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dump_dir).expect("dump dir");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("smtp/aiosmtpd_server.py");
        let mut command = Command::new(python());
        command
            .arg(&script)
            .args(["--port", "0", "--mode", mode.arg(), "--dump-dir"])
            .arg(&dump_dir);
        if let Some(pki) = pki {
            command
                .arg("--cert")
                .arg(&pki.server_cert)
                .arg("--key")
                .arg(&pki.server_key);
        }
        if let Some((user, password)) = auth {
            command.args(["--user", user, "--password", password]);
        }
        let stderr = std::fs::File::create(dump_dir.join("server.stderr")).expect("stderr file");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start aiosmtpd (Debian package python3-aiosmtpd)");
        let stdout = child.stdout.take().expect("piped stdout");
        let ready = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).ok()?;
            line.trim().strip_prefix("ready ")?.parse::<u16>().ok()
        });
        let port = match tokio::time::timeout(Duration::from_secs(20), ready).await {
            Ok(Ok(Some(port))) => port,
            _ => {
                let _ = child.kill();
                let log =
                    std::fs::read_to_string(dump_dir.join("server.stderr")).unwrap_or_default();
                panic!("aiosmtpd did not start ({}):\n{log}", mode.arg());
            }
        };
        Self {
            port,
            dump_dir,
            child,
        }
    }

    /// Every message accepted so far.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.dump_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("msg-") && name.ends_with(".json") {
                    let text = std::fs::read_to_string(entry.path()).expect("read message");
                    out.push(serde_json::from_str(&text).expect("message JSON"));
                }
            }
        }
        out
    }

    /// The commands received so far, one `"<connection> <COMMAND> tls=<0|1>"` per line, and
    /// `"<connection> AUTH-RESULT <mechanism> ok|fail tls=<0|1>"` per AUTH attempt.
    pub fn commands(&self) -> Vec<String> {
        std::fs::read_to_string(self.dump_dir.join("commands.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dump_dir);
    }
}

/// The system Python, where the Debian package installs aiosmtpd.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}
