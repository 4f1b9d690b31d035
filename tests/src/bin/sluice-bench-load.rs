//! `sluice-bench-load`: the parts of `deploy/bench.sh` that a shell does badly.
//!
//! - `queue`: put N jobs of about B bytes on a relay's jobs queue, as the producer would
//!   (same topology, same job JSON and properties), with pipelined publisher confirms, so
//!   the drain starts from a full queue.
//!   `--batch K` hands K publishes to lapin at once; with the same jobs as the producer's,
//!   it measures what the broker takes (the producer's ceiling).
//! - `consume`: the lean reference consumer of `deploy/bench.sh`'s colocated ceiling: one
//!   channel, a prefetch window, manual acks with `multiple` every K messages; it takes N
//!   messages from a queue no one else consumes and prints when the first and the N-th
//!   arrived. What RabbitMQ hands out to it is what the workers' drain is measured against.
//! - `wait`: poll the workers' `/metrics` until their `sluice_jobs_delivered_total` adds up
//!   to N, and print when that was seen (the last acceptance, to within one poll).
//! - `cleanup`: delete every queue and exchange of a benchmark namespace.
//!
//! Every loop is bounded in count and time; only loopback addresses are meant as targets.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Confirmation, Connection, ConnectionProperties};
use sluice_shared::{Job, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USAGE: &str = "\
usage:
  sluice-bench-load queue   --url URL --namespace NS --relay NAME --campaign ID --count N
                            [--body-bytes 2048] [--window 2000] [--batch 1] [--retry-steps 5]
  sluice-bench-load consume --url URL --queue NAME --count N
                            [--prefetch 1000] [--ack-every 100] [--timeout-secs 120]
  sluice-bench-load wait    --metrics HOST:PORT[,HOST:PORT...] --count N
                            [--timeout-secs 120] [--interval-ms 50]
  sluice-bench-load cleanup --url URL --namespace NS --relay NAME [--campaign ID]...
                            [--retry-steps 5]
Times are printed as Unix nanoseconds (key=value lines on stdout).";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("queue") => queue(&Args::parse(&args[1..])).await,
        Some("consume") => consume(&Args::parse(&args[1..])).await,
        Some("wait") => wait(&Args::parse(&args[1..])).await,
        Some("cleanup") => cleanup(&Args::parse(&args[1..])).await,
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("sluice-bench-load: {e:#}");
        std::process::exit(1);
    }
}

/// `--key value` pairs; a key may repeat.
struct Args(Vec<(String, String)>);

impl Args {
    fn parse(raw: &[String]) -> Self {
        let mut pairs = Vec::new();
        let mut it = raw.iter();
        while let Some(key) = it.next() {
            let Some(key) = key.strip_prefix("--") else {
                eprintln!("unexpected argument {key:?}\n{USAGE}");
                std::process::exit(2);
            };
            let Some(value) = it.next() else {
                eprintln!("--{key} needs a value\n{USAGE}");
                std::process::exit(2);
            };
            pairs.push((key.to_string(), value.clone()));
        }
        Self(pairs)
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn get(&self, key: &str) -> anyhow::Result<&str> {
        self.all(key)
            .last()
            .copied()
            .with_context(|| format!("--{key} is required\n{USAGE}"))
    }

    fn num<T: std::str::FromStr>(&self, key: &str, default: Option<T>) -> anyhow::Result<T> {
        match (self.all(key).last(), default) {
            (Some(text), _) => text
                .parse()
                .map_err(|_| anyhow::anyhow!("--{key} {text:?} is not a number")),
            (None, Some(default)) => Ok(default),
            (None, None) => bail!("--{key} is required\n{USAGE}"),
        }
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

/// A plain-text body of about `bytes` bytes, in 7-bit lines of 70 characters (so the
/// worker sends it as is, with no quoted-printable or base64 step).
fn body_text(bytes: usize, seq: u64) -> String {
    const LINE: &str = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusm";
    let mut text = format!("Hello user {seq},\n\n");
    while text.len() + LINE.len() < bytes {
        text.push_str(LINE);
        text.push('\n');
    }
    text
}

async fn queue(args: &Args) -> anyhow::Result<()> {
    let url = args.get("url")?;
    let topology = Topology::new(args.get("namespace")?);
    let relay = args.get("relay")?;
    let campaign = args.get("campaign")?;
    let count: u64 = args.num("count", None)?;
    let body_bytes: usize = args.num("body-bytes", Some(2048))?;
    let window: usize = args.num("window", Some(2000))?;
    let retry_steps: usize = args.num("retry-steps", Some(5))?;
    let batch: usize = args.num::<usize>("batch", Some(1))?.max(1);

    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    topology.declare(&channel, &[relay], retry_steps).await?;

    let exchange = topology.jobs_exchange();
    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(window + batch);
    let mut confirmed = 0u64;
    let text = body_text(body_bytes, 0);
    let mut seq = 0u64;
    while seq < count {
        // One batch of jobs handed to lapin together: its I/O thread writes them in one
        // go, instead of one socket write (and one thread hand-off) per job.
        let mut bodies = Vec::with_capacity(batch);
        while bodies.len() < batch && seq < count {
            seq += 1;
            let id = format!("{campaign}-{seq}");
            let job = Job {
                id: id.clone(),
                campaign: Some(campaign.to_string()),
                from: "Bench <bench@example.com>".into(),
                return_path: None,
                to: format!("user{seq}@example.org"),
                subject: format!("Benchmark message {seq}"),
                text: Some(text.clone()),
                html: None,
                headers: Default::default(),
                priority: None,
                not_before: None,
                not_after: None,
            };
            bodies.push((id, job.to_bytes()));
        }
        while in_flight.len() + bodies.len() > window.max(bodies.len()) {
            settle(in_flight.pop_front().expect("window is not empty")).await?;
            confirmed += 1;
        }
        let sends = bodies.iter().map(|(id, body)| {
            let properties = sluice_producer::publish::job_properties(id, campaign);
            channel.basic_publish(
                exchange.as_str().into(),
                relay.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
        });
        for confirm in futures_util::future::join_all(sends).await {
            in_flight.push_back(confirm?);
        }
    }
    while let Some(confirm) = in_flight.pop_front() {
        settle(confirm).await?;
        confirmed += 1;
    }
    let elapsed = started.elapsed();
    let _ = connection.close(200, "queued".into()).await;
    println!("queued={confirmed}");
    println!("jobs_queue={}", topology.jobs_queue(relay));
    println!("seconds={:.3}", elapsed.as_secs_f64());
    Ok(())
}

async fn settle(confirm: lapin::PublisherConfirm) -> anyhow::Result<()> {
    match confirm.await? {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("a job was returned as unroutable"),
        Confirmation::Nack(_) => bail!("the broker refused a job (nack)"),
    }
}

async fn consume(args: &Args) -> anyhow::Result<()> {
    let url = args.get("url")?;
    let queue = args.get("queue")?;
    let count: u64 = args.num("count", None)?;
    let prefetch: u16 = args.num("prefetch", Some(1000))?;
    let ack_every: u64 = args.num::<u64>("ack-every", Some(100))?.max(1);
    let timeout = Duration::from_secs(args.num("timeout-secs", Some(120))?);
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let connect_and_take = async {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ")?;
        let channel = connection.create_channel().await?;
        // The figure is one consumer's: a queue someone else also consumes (a worker left
        // running) would split its messages, and one holding fewer than N would never end.
        let found = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("queue {queue} does not exist"))?;
        if found.consumer_count() > 0 {
            bail!(
                "queue {queue} already has {} consumer(s); the reference consumer must be alone",
                found.consumer_count()
            );
        }
        if u64::from(found.message_count()) < count {
            bail!(
                "queue {queue} holds {} messages, fewer than the {count} to take",
                found.message_count()
            );
        }
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "sluice-bench-consume".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut first_ns = None;
        let mut taken = 0u64;
        let last_ns = loop {
            let delivery = consumer
                .next()
                .await
                .context("the consumer was cancelled")?
                .context("receiving a message")?;
            let received_ns = now_ns();
            first_ns.get_or_insert(received_ns);
            taken += 1;
            // One ack settles every delivery up to this one; the N-th is acked too, so
            // nothing taken is left unacknowledged when the connection closes.
            if taken.is_multiple_of(ack_every) || taken == count {
                delivery
                    .acker
                    .ack(BasicAckOptions { multiple: true })
                    .await
                    .context("acknowledging")?;
            }
            if taken == count {
                break received_ns;
            }
        };
        // Prefetched messages beyond N go back to the queue when the connection closes.
        let _ = connection.close(200, "consumed".into()).await;
        Ok::<_, anyhow::Error>((first_ns.unwrap_or(last_ns), last_ns, taken))
    };
    let (first_ns, last_ns, taken) = tokio::time::timeout(timeout, connect_and_take)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "fewer than {count} messages taken from {queue} within {} s",
                timeout.as_secs()
            )
        })??;
    println!("first_ns={first_ns}");
    println!("last_ns={last_ns}");
    println!("count={taken}");
    Ok(())
}

/// The sum of `sluice_jobs_delivered_total` over every relay in one `/metrics` text.
fn delivered_in(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("sluice_jobs_delivered_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// GET `/metrics` over HTTP/1.0 (no client library needed for a loopback scrape).
async fn scrape(addr: &str) -> anyhow::Result<u64> {
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::with_capacity(16 * 1024);
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .with_context(|| format!("{addr}/metrics did not answer within 2 s"))??;
    Ok(delivered_in(&String::from_utf8_lossy(&response)))
}

async fn wait(args: &Args) -> anyhow::Result<()> {
    let addrs: Vec<String> = args
        .get("metrics")?
        .split(',')
        .map(str::to_string)
        .collect();
    let count: u64 = args.num("count", None)?;
    let timeout = Duration::from_secs(args.num("timeout-secs", Some(120))?);
    let interval = Duration::from_millis(args.num("interval-ms", Some(50))?);
    let started = Instant::now();
    let mut first_seen: Option<u128> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = 0;
    while started.elapsed() < timeout {
        ticker.tick().await;
        let polled = futures_util::future::join_all(addrs.iter().map(|a| scrape(a))).await;
        let seen_at = now_ns();
        // A worker whose endpoint is not up yet counts as zero delivered.
        let total: u64 = polled.iter().map(|r| *r.as_ref().unwrap_or(&0)).sum();
        if total > 0 && first_seen.is_none() {
            first_seen = Some(seen_at);
        }
        last = total;
        if total >= count {
            println!("delivered={total}");
            println!("first_delivered_ns={}", first_seen.unwrap_or(seen_at));
            println!("last_accepted_ns={seen_at}");
            return Ok(());
        }
    }
    println!("delivered={last}");
    bail!(
        "only {last} of {count} jobs delivered after {} s",
        timeout.as_secs()
    )
}

async fn cleanup(args: &Args) -> anyhow::Result<()> {
    let url = args.get("url")?;
    let topology = Topology::new(args.get("namespace")?);
    let retry_steps: usize = args.num("retry-steps", Some(5))?;
    let mut queues = vec![topology.events_log(), topology.control(), topology.heads()];
    for relay in args.all("relay") {
        queues.push(topology.dead_queue(relay));
        for class in sluice_shared::Priority::ALL {
            queues.push(topology.class_queue(relay, class));
            for step in 1..=retry_steps {
                queues.push(topology.class_retry_queue(relay, class, step));
            }
        }
    }
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let mut deleted = 0;
    for queue in queues {
        // A failed delete (no such queue) closes the channel: one channel per attempt.
        let channel = connection.create_channel().await?;
        if channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .is_ok()
        {
            deleted += 1;
            let _ = channel.close(200, "deleted".into()).await;
        }
    }
    for exchange in [
        topology.jobs_exchange(),
        topology.dead_exchange(),
        topology.events_exchange(),
    ] {
        let channel = connection.create_channel().await?;
        if channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .is_ok()
        {
            let _ = channel.close(200, "deleted".into()).await;
        }
    }
    let _ = connection.close(200, "cleaned up".into()).await;
    println!("deleted_queues={deleted}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_counts_add_up_over_relays() {
        let text = "# HELP sluice_jobs_delivered_total x\n\
                    sluice_jobs_delivered_total{relay=\"a\"} 12\n\
                    sluice_jobs_delivered_total{relay=\"b\"} 30\n\
                    sluice_jobs_received_total{relay=\"a\"} 99\n";
        assert_eq!(delivered_in(text), 42);
    }

    #[test]
    fn bodies_are_about_the_size_asked_for() {
        let text = body_text(2048, 7);
        assert!(text.len() <= 2048 && text.len() > 1900, "{}", text.len());
        assert!(text.lines().all(|l| l.len() <= 76));
    }
}
