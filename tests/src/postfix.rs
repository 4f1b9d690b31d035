//! A private Postfix on a loopback port, started per test from Debian's `postfix` package
//! with a configuration directory of its own (never the machine's instance): it relays for
//! `example.org` to the `discard` transport, and its anvil limits apply to loopback clients
//! (`smtpd_client_event_limit_exceptions` empty). What it accepted and what it refused is
//! read from its own `maillog_file`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::smtp_sink::free_port;

/// The services a relay that discards what it accepts needs (no chroot: the queue
/// directory is the test's).
const MASTER_CF: &str = "\
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
";

/// A running private Postfix; stopped (and its directory removed) on drop.
pub struct PrivatePostfix {
    pub port: u16,
    dir: PathBuf,
}

impl PrivatePostfix {
    /// Start one with these extra `main.cf` settings (e.g. `smtpd_client_connection_count_limit
    /// = 2`); waits until it listens.
    pub async fn start(settings: &[(&str, &str)]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sluice-postfix-{}", uuid::Uuid::new_v4().simple()));
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir_all(dir.join(sub)).expect("postfix directories");
        }
        let status = Command::new("chown")
            .arg("postfix")
            .arg(dir.join("data"))
            .status()
            .expect("chown");
        assert!(status.success(), "chown postfix {}/data", dir.display());
        let port = free_port();
        let d = dir.display();
        let mut main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = sluice-test.localdomain
mydestination =
relay_domains = example.org
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
default_transport = discard
relay_transport = discard
local_transport = discard
virtual_transport = discard
alias_maps =
alias_database =
smtpd_client_event_limit_exceptions =
maillog_file_prefixes = {tmp}
maillog_file = {d}/maillog
",
            tmp = std::env::temp_dir().display()
        );
        for (key, value) in settings {
            main_cf.push_str(&format!("{key} = {value}\n"));
        }
        std::fs::write(dir.join("etc/main.cf"), main_cf).expect("main.cf");
        std::fs::write(
            dir.join("etc/master.cf"),
            format!("127.0.0.1:{port} inet n - n - - smtpd\n{MASTER_CF}"),
        )
        .expect("master.cf");
        let status = Command::new("postfix")
            .arg("-c")
            .arg(dir.join("etc"))
            .arg("start")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run postfix (Debian package postfix)");
        let postfix = Self { port, dir };
        assert!(
            status.success(),
            "the private postfix did not start: {}",
            postfix.log()
        );
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return postfix;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the private postfix does not listen on {port}: {}",
            postfix.log()
        );
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// Recipients whose message it accepted and discarded.
    pub fn arrived(&self) -> HashSet<String> {
        self.log()
            .lines()
            .filter(|line| line.contains("postfix/discard[") && line.contains("status=sent"))
            .filter_map(|line| {
                let to = line.split("to=<").nth(1)?;
                Some(to.split('>').next()?.to_string())
            })
            .collect()
    }

    /// The second of each log line containing `what` (see [`seconds_in_log`]).
    pub fn seconds_of(&self, what: &str) -> Vec<u64> {
        seconds_in_log(&self.log(), what)
    }

    /// When (by second) it accepted a message (`cleanup` logs its message-id).
    pub fn accepted_seconds(&self) -> Vec<u64> {
        self.seconds_of("message-id=")
    }

    /// When anvil's message rate limit refused a MAIL FROM.
    pub fn rate_refusals(&self) -> Vec<u64> {
        self.seconds_of("Message delivery request rate limit exceeded")
    }

    /// When anvil's connection count limit refused a session.
    pub fn session_refusals(&self) -> Vec<u64> {
        self.seconds_of("Connection concurrency limit exceeded")
    }
}

/// The second of each line of a Postfix log (`Dec  6 23:59:41 host postfix/...`) containing
/// `what`, counted from the midnight before the log's first line: a run that passes midnight
/// goes on counting (`00:00:01` after `23:59:59` is 86,401), so seconds compare and subtract
/// in the order they happened.
pub fn seconds_in_log(log: &str, what: &str) -> Vec<u64> {
    const DAY: u64 = 86_400;
    let mut day: u64 = 0;
    let mut last: Option<u64> = None;
    let mut seconds = Vec::new();
    for line in log.lines() {
        let Some(time) = line.split_whitespace().nth(2).and_then(time_of_day) else {
            continue;
        };
        let mut line_day = day;
        match last {
            // Half a day back: the clock passed midnight.
            Some(previous) if time + DAY / 2 < previous => {
                day += 1;
                line_day = day;
                last = Some(time);
            }
            // Half a day ahead: a line of the day before, logged a little late.
            Some(previous) if time > previous + DAY / 2 => line_day = day.saturating_sub(1),
            _ => last = Some(time),
        }
        if line.contains(what) {
            seconds.push(line_day * DAY + time);
        }
    }
    seconds
}

/// `HH:MM:SS` in seconds.
fn time_of_day(text: &str) -> Option<u64> {
    let mut parts = text.split(':').map(|part| part.parse::<u64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    (parts.next().is_none() && h < 24 && m < 60 && s < 61).then_some(h * 3600 + m * 60 + s)
}

impl Drop for PrivatePostfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.dir.join("etc"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_go_on_counting_past_midnight() {
        let log = "\
Dec  6 23:59:58 sluice-test postfix/cleanup[1]: 1: message-id=<a>
Dec  6 23:59:59 sluice-test postfix/cleanup[1]: 2: message-id=<b>
Dec  7 00:00:00 sluice-test postfix/smtpd[2]: NOQUEUE: reject: too much mail
Dec  6 23:59:59 sluice-test postfix/cleanup[1]: 3: message-id=<c>
Dec  7 00:00:01 sluice-test postfix/cleanup[1]: 4: message-id=<d>
";
        assert_eq!(
            seconds_in_log(log, "message-id="),
            [86_398, 86_399, 86_399, 86_401]
        );
        assert_eq!(seconds_in_log(log, "too much mail"), [86_400]);
    }
}
