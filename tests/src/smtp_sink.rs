//! Postfix's `smtp-sink`, a real SMTP server this project did not write, spawned per test.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a dumped message's file must stay unchanged to count as complete.
const SETTLED: Duration = Duration::from_millis(50);

/// A running `smtp-sink` on 127.0.0.1 that writes every message it accepts to a file.
pub struct SmtpSink {
    pub port: u16,
    pub dump_dir: PathBuf,
    child: Child,
}

impl SmtpSink {
    /// Start `smtp-sink` on a free loopback port, dumping messages to a fresh directory.
    pub async fn start() -> Self {
        let dump_dir =
            std::env::temp_dir().join(format!("sluice-sink-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dump_dir).expect("dump dir");
        let port = free_port();
        let child = Command::new(smtp_sink_path())
            // -u: run as this user; -d: one file per message; backlog 256.
            .args(["-u", "root", "-d"])
            .arg(format!("{}/%M.", dump_dir.display()))
            .arg(format!("127.0.0.1:{port}"))
            .arg("256")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start smtp-sink (Debian package postfix)");
        let sink = Self {
            port,
            dump_dir,
            child,
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return sink;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("smtp-sink did not start on port {port}");
    }

    /// Every message received so far, as raw text.
    pub fn messages(&self) -> Vec<String> {
        self.complete_files()
            .into_iter()
            .filter_map(|path| std::fs::read(path).ok())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .collect()
    }

    /// How many messages were received so far.
    pub fn count(&self) -> usize {
        self.complete_files().len()
    }

    /// smtp-sink creates a message's file at DATA and writes the content as it arrives, so
    /// a file counts once it is non-empty and has not changed for [`SETTLED`].
    fn complete_files(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dump_dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| {
                entry.metadata().is_ok_and(|m| {
                    m.len() > 0
                        && m.modified()
                            .ok()
                            .and_then(|t| t.elapsed().ok())
                            .is_some_and(|age| age >= SETTLED)
                })
            })
            .map(|entry| entry.path())
            .collect()
    }

    /// Received messages by recipient (the `X-Rcpt-Args`/`To:` header smtp-sink records).
    pub fn by_header(&self, header: &str) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for message in self.messages() {
            if let Some(value) = header_value(&message, header) {
                out.entry(value).or_default().push(message);
            }
        }
        out
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dump_dir);
    }
}

/// The value of the first header `name` in a raw message.
pub fn header_value(message: &str, name: &str) -> Option<String> {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    message
        .lines()
        .take_while(|l| !l.is_empty())
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(|l| l[prefix.len()..].trim().to_string())
}

fn smtp_sink_path() -> &'static str {
    if std::path::Path::new("/usr/sbin/smtp-sink").exists() {
        "/usr/sbin/smtp-sink"
    } else {
        "smtp-sink"
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}
