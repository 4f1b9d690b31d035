//! `send`: validate every row of a campaign, then publish one job per valid row.
//!
//! The file is read twice. The first pass renders and validates every row (on every core)
//! and lists each problem as `line N: ...`; unless `--skip-invalid` is given, one problem
//! means nothing is published. The second pass renders again and publishes, so memory does
//! not grow with the number of rows; it skips the lines the first pass rejected and does
//! not validate again (the file is checked to be unchanged in between). The first pass also
//! finds duplicate addresses ([`crate::duplicates`]). Between the passes, a campaign id the
//! event log already has a summary of is refused ([`crate::summaries`]). After the last
//! confirm, a `campaign-summary` message tells `watch` how many jobs to expect.
//!
//! A stop signal or the broker's loss ends publishing early; the checkpoint
//! ([`crate::checkpoint`]) says through which line every row is in the queue, and
//! `--start-line` continues from there.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use sluice_shared::events::{now_rfc3339, CampaignSummary};
use sluice_shared::{Job, Settings, Topology};

use crate::campaign::{
    generate_campaign_id, Campaign, CampaignReader, CampaignSpec, Check, HeaderError, RowError,
    Templates,
};
use crate::checkpoint::{self, Checkpoint, Stop, Stopped};
use crate::cli::SendArgs;
use crate::duplicates::{merge_lines, Duplicates};
use crate::exit::{InvalidInput, Status, UsageError};
use crate::log::Since;
use crate::progress::Progress;
use crate::publish::{job_properties, Outgoing, PublishSpan, Publisher, Setup};
use crate::relays::choose_relay;
use crate::rows::{Limits, RawRecord};
use crate::validate::{validate_rows, Observer, Validation, ValidationError};
use crate::{summaries, watch};

/// Messages published and not yet confirmed, at most.
pub const CONFIRM_WINDOW: usize = 1000;
/// Body bytes published and not yet confirmed, at most (a job renders at most
/// [`crate::campaign::MAX_RENDERED_BYTES`]): with the validation pass's bound, what keeps
/// `send` within its documented memory on a file of large rows.
pub const CONFIRM_WINDOW_BYTES: usize = 32 << 20;
/// Read buffer of the recipients file.
const READ_BUFFER: usize = 256 * 1024;

/// Counts of one `send`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SendReport {
    /// Jobs this run published, each confirmed.
    pub published: u64,
    /// Invalid rows skipped (`--skip-invalid`).
    pub skipped: u64,
    /// Rows whose address an earlier row has (skipped with `--dedupe`, sent without).
    pub duplicates: u64,
    pub campaign: String,
    /// What ended publishing early: `SIGINT`, `SIGTERM` or `broker lost`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    /// After an interruption: every row up to this line is in the queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed_through_line: Option<u64>,
}

/// Run `send`.
pub async fn run(settings: &Settings, args: SendArgs) -> anyhow::Result<Status> {
    let relay = choose_relay(settings, args.relay.as_deref())?;
    let campaign = args.campaign.clone().unwrap_or_else(|| {
        let random = (uuid::Uuid::new_v4().as_u128() & 0xffff) as u16;
        generate_campaign_id(time::OffsetDateTime::now_utc(), random)
    });
    check_addresses(&args.from, args.return_path.as_deref())?;
    let spec = Arc::new(CampaignSpec {
        campaign: campaign.clone(),
        from: args.from.clone(),
        return_path: args.return_path.clone(),
        subject: args.subject.clone(),
        text: read_template(&args.text, "--text")?,
        html: args
            .html
            .as_deref()
            .map(|p| read_template(p, "--html"))
            .transpose()?,
        headers: args.headers.clone(),
        not_before: args.not_before.clone(),
        not_after: args.not_after.clone(),
    });
    let templates = Arc::new(
        Templates::new(&spec).map_err(|e| InvalidInput(format!("{e}; nothing was published")))?,
    );

    // Pass 1: every row, nothing published.
    let before = fingerprint(&args.recipients)?;
    // CPU-bound, on threads of its own: the runtime's thread only waits.
    let (validation, duplicate_lines) =
        tokio::task::block_in_place(|| validate(&args.recipients, &spec, &templates))?;
    let invalid = validation.invalid_lines.len() as u64;
    let duplicates = duplicate_lines.len() as u64;
    if invalid > 0 && !args.skip_invalid {
        return Err(InvalidInput(format!(
            "{invalid} invalid row(s) in {}; nothing was published (fix them, or pass \
             --skip-invalid to publish the {} valid rows)",
            args.recipients.display(),
            validation.valid
        ))
        .into());
    }
    if duplicates > 0 {
        eprintln!(
            "{duplicates} row(s) repeat an earlier row's address: {}",
            if args.dedupe {
                "skipped (--dedupe)"
            } else {
                "sent anyway (pass --dedupe to send each address once)"
            }
        );
    }
    anyhow::ensure!(
        fingerprint(&args.recipients)? == before,
        "{} changed while it was being validated; nothing was published",
        args.recipients.display()
    );
    let earlier = summaries::earlier_sends(settings, &campaign)
        .await
        .context("cannot read the event log to check for an earlier send of the campaign")?;
    summaries::check(&campaign, &earlier, args.force, args.start_line)?;

    // Pass 2: publish. From here a stop signal ends publishing cleanly (before, it ends the
    // process: nothing is published yet).
    let stop = Stop::on_signals();
    let skip = if args.dedupe {
        merge_lines(&validation.invalid_lines, &duplicate_lines)
    } else {
        validation.invalid_lines.clone()
    };
    let topology = Topology::from_settings(settings);
    let setup = Setup {
        relays: vec![relay.clone()],
        retry_steps: settings.retry.delays.len(),
    };
    // A continued campaign keeps the start of its first run: `--wait` reads from there.
    let started_at = match (&earlier.first_started_at, args.start_line) {
        (Some(first), Some(_)) => first.clone(),
        _ => now_rfc3339(),
    };
    let mut publisher = Publisher::connect(
        &settings.amqp,
        topology.clone(),
        setup,
        CONFIRM_WINDOW,
        false,
    )
    .await
    .context("cannot start publishing")?
    .with_window_bytes(CONFIRM_WINDOW_BYTES);
    let mut checkpoint = Checkpoint::default();
    let rows = Rows {
        path: &args.recipients,
        reader: open_rows(&args.recipients, &spec, &templates)?,
        skip: &skip,
        start_line: args.start_line.unwrap_or(2),
        valid: validation.valid,
    };
    let ended = publish_rows(
        &mut publisher,
        &topology,
        (&relay, args.priority),
        rows,
        &mut checkpoint,
        &stop,
    )
    .await?;
    let mut report = SendReport {
        published: publisher.confirmed(),
        skipped: invalid,
        duplicates,
        campaign: campaign.clone(),
        interrupted: None,
        confirmed_through_line: None,
    };
    let mut summary = CampaignSummary {
        campaign: campaign.clone(),
        // With --start-line: the rows before it too, which the interrupted run published.
        published: ended.before_start + publisher.confirmed(),
        relay: relay.clone(),
        started_at,
        start_line: args.start_line,
        confirmed_through_line: None,
    };
    if let Some(stopped) = ended.stopped {
        let stopped = checkpoint::wind_down(
            stopped,
            &mut publisher,
            &topology,
            &mut checkpoint,
            (&mut summary, ended.before_start),
        )
        .await;
        report.published = stopped.published();
        report.interrupted = Some(stopped.what().to_string());
        report.confirmed_through_line = Some(checkpoint.through_line());
        if args.json {
            println!(
                "{}",
                serde_json::to_string(&report).expect("report serializes")
            );
        }
        return Err(stopped.into_error(&checkpoint, validation.valid));
    }
    summaries::write(&mut publisher, &topology, &summary).await?;
    publisher.close().await;

    if invalid > 0 {
        eprintln!("skipped {invalid} invalid row(s)");
    }
    if args.wait {
        if !args.json {
            println!("campaign {campaign}");
            println!("published {} jobs", report.published);
        }
        // A campaign continued after the broker's loss has no earlier summary to say when
        // it started: its first run's events are read from the log's beginning.
        let since = match (args.start_line, &earlier.first_started_at) {
            (Some(_), None) => Since::Beginning,
            _ => Since::Started(&summary.started_at),
        };
        let followed = watch::follow(settings, &campaign, since, None).await?;
        let counts = followed.counts();
        if args.json {
            let mut object = serde_json::to_value(&report).expect("report serializes");
            let watched = serde_json::to_value(counts).expect("counts serialize");
            if let (Some(object), Some(watched)) = (object.as_object_mut(), watched.as_object()) {
                for (key, value) in watched {
                    object.entry(key.clone()).or_insert(value.clone());
                }
            }
            println!("{object}");
        } else {
            println!("{counts}");
        }
        return Ok(followed.status());
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serializes")
        );
    } else {
        println!("campaign {campaign}");
        println!("published {} jobs", report.published);
    }
    Ok(Status::Success)
}

/// `--from` and `--return-path` are the same for every row: check them once, up front.
fn check_addresses(from: &str, return_path: Option<&str>) -> Result<(), UsageError> {
    let probe = Job {
        id: "probe".into(),
        campaign: None,
        from: from.to_string(),
        return_path: return_path.map(str::to_string),
        to: "probe@example.com".into(),
        subject: String::new(),
        text: Some(String::new()),
        html: None,
        headers: Default::default(),
        priority: None,
        not_before: None,
        not_after: None,
    };
    probe
        .from_mailbox()
        .map_err(|e| UsageError(format!("--from: {e}")))?;
    probe
        .envelope_sender()
        .map_err(|e| UsageError(format!("--return-path: {e}")))?;
    Ok(())
}

fn read_template(path: &Path, flag: &str) -> anyhow::Result<String> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read {flag} file {}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| {
        InvalidInput(format!(
            "{flag} file {} is not valid UTF-8 (wrong encoding? save it as UTF-8)",
            path.display()
        ))
        .into()
    })
}

fn open_rows(
    path: &Path,
    spec: &Arc<CampaignSpec>,
    templates: &Arc<Templates>,
) -> anyhow::Result<CampaignReader<BufReader<File>>> {
    let file = File::open(path)
        .with_context(|| format!("cannot open the recipients file {}", path.display()))?;
    let input = BufReader::with_capacity(READ_BUFFER, file);
    match CampaignReader::new(input, spec.clone(), templates.clone(), Limits::default()) {
        Ok(reader) => Ok(reader),
        Err(HeaderError::Invalid(problem)) => {
            eprintln!("{problem}");
            Err(InvalidInput(format!(
                "the header row of {} is not usable; nothing was published",
                path.display()
            ))
            .into())
        }
        Err(HeaderError::Io(e)) => {
            Err(e).with_context(|| format!("cannot read the recipients file {}", path.display()))
        }
    }
}

/// Size and modification time: the second pass relies on the file being the one the first
/// pass validated.
fn fingerprint(path: &Path) -> anyhow::Result<(u64, Option<SystemTime>)> {
    let metadata = std::fs::metadata(path)
        .with_context(|| format!("cannot read the recipients file {}", path.display()))?;
    anyhow::ensure!(
        metadata.is_file(),
        "the recipients file {} is not a regular file (it is read twice)",
        path.display()
    );
    Ok((metadata.len(), metadata.modified().ok()))
}

/// Pass 1: render and check every row, listing each problem and each duplicate address on
/// stderr; returns the verdict and the lines of the duplicates.
fn validate(
    path: &Path,
    spec: &Arc<CampaignSpec>,
    templates: &Arc<Templates>,
) -> anyhow::Result<(Validation, Vec<u64>)> {
    let rows = open_rows(path, spec, templates)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut observer = FirstPass {
        campaign: rows.campaign().clone(),
        progress: Progress::new("validated", None),
        duplicates: Duplicates::default(),
    };
    let validation = validate_rows(rows, threads, &mut observer);
    observer.progress.finish();
    match validation {
        Ok(validation) => Ok((validation, observer.duplicates.into_lines())),
        Err(ValidationError::Read(e)) => {
            Err(e).with_context(|| format!("cannot read the recipients file {}", path.display()))
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot validate {}; nothing was published",
            path.display()
        ))),
    }
}

/// What pass 1 reports as it goes.
struct FirstPass {
    campaign: Arc<Campaign>,
    progress: Progress,
    duplicates: Duplicates,
}

impl Observer for FirstPass {
    fn problem(&mut self, problem: &RowError) {
        self.progress.println(&problem.to_string());
    }

    fn valid(&mut self, record: &RawRecord) {
        if let Some(address) = self.campaign.recipient(record) {
            if let Some(duplicate) = self.duplicates.check(record.line(), address) {
                self.progress.println(&duplicate.to_string());
            }
        }
    }

    fn progress(&mut self, rows: u64) {
        self.progress.set(rows);
    }
}

/// The rows pass 2 publishes.
struct Rows<'a> {
    path: &'a Path,
    reader: CampaignReader<BufReader<File>>,
    /// Lines not to publish, sorted: invalid rows, and duplicates under `--dedupe`.
    skip: &'a [u64],
    /// Rows starting before this line were published by an earlier run (`--start-line`).
    start_line: u64,
    /// Valid rows in the file.
    valid: u64,
}

/// How pass 2 ended.
struct Ended {
    /// Rows before the start line that the earlier run published (valid, not skipped).
    before_start: u64,
    /// Set when publishing stopped before the end of the file.
    stopped: Option<Stopped>,
}

/// Pass 2: publish every valid row from the start line on, in file order, noting each in
/// `checkpoint`. A stop signal or a publisher that gives up ends it early ([`Ended`]);
/// anything else wrong is an error.
async fn publish_rows(
    publisher: &mut Publisher,
    topology: &Topology,
    (relay, priority): (&str, sluice_shared::Priority),
    rows: Rows<'_>,
    checkpoint: &mut Checkpoint,
    stop: &Stop,
) -> anyhow::Result<Ended> {
    let Rows {
        path,
        reader: mut rows,
        skip,
        start_line,
        valid,
    } = rows;
    let campaign = rows.campaign().clone();
    let mut record = RawRecord::default();
    let mut skip = skip.iter().peekable();
    let exchange: lapin::types::ShortString = topology.jobs_exchange().into();
    let routing_key: lapin::types::ShortString = priority.routing_key(relay).into();
    let mut progress = Progress::new("published", Some(valid));
    let mut before_start = 0;
    let stopped = loop {
        if !rows
            .next_record(&mut record)
            .with_context(|| format!("cannot read the recipients file {}", path.display()))?
        {
            break None;
        }
        if let Some(signal) = stop.received() {
            break Some(Stopped::Signal(signal));
        }
        let line = record.line();
        // Listed by pass 1, and skipping was asked for (or there would be no pass 2).
        while skip.next_if(|&&skipped| skipped < line).is_some() {}
        if skip.next_if(|&&skipped| skipped == line).is_some() {
            checkpoint.skipped(line);
            continue;
        }
        if line < start_line {
            before_start += 1;
            checkpoint.skipped(line);
            continue;
        }
        let mut job = match campaign.job(&record, Check::RenderOnly) {
            Ok(job) => job,
            Err(problem) => anyhow::bail!(
                "{} changed while it was being published ({problem}); {} jobs were published",
                path.display(),
                publisher.confirmed()
            ),
        };
        // The body names its class only when it is not the default one.
        job.priority = (priority != sluice_shared::Priority::Normal).then_some(priority);
        let mut body = publisher.buffer();
        serde_json::to_writer(&mut body, &job).expect("a job always serializes");
        let (properties, span) = PublishSpan::start(
            job_properties(&job.id, job.campaign_or_default()),
            exchange.as_str(),
            routing_key.as_str(),
            &job.id,
            job.campaign_or_default(),
        );
        let published = publisher
            .publish(Outgoing {
                tag: 0,
                id: job.id,
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                properties,
                body,
            })
            .await;
        span.end(published.as_ref().err());
        checkpoint.confirmed(publisher.confirmed());
        if let Err(error) = published {
            break Some(Stopped::Publishing(error));
        }
        checkpoint.published(line);
        progress.set(before_start + publisher.confirmed());
    };
    let stopped = match stopped {
        Some(stopped) => Some(stopped),
        None => publisher.flush().await.err().map(Stopped::Publishing),
    };
    checkpoint.confirmed(publisher.confirmed());
    progress.set(before_start + publisher.confirmed());
    progress.finish();
    Ok(Ended {
        before_start,
        stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(relays: &[&str]) -> Settings {
        let mut settings = Settings::default();
        for relay in relays {
            settings
                .relays
                .insert(relay.to_string(), Default::default());
        }
        settings
    }

    /// Configured relays, `--relay`, and the relay chosen or a piece of the error.
    type Case = (
        &'static [&'static str],
        Option<&'static str>,
        Result<&'static str, &'static str>,
    );

    #[test]
    fn relay_choice() {
        let cases: [Case; 7] = [
            (&[], None, Ok("primary")),
            (&[], Some("backup"), Ok("backup")),
            (&["mx"], None, Ok("mx")),
            (&["mx"], Some("mx"), Ok("mx")),
            (&["mx"], Some("other"), Err("no such relay")),
            (&["a", "b"], None, Err("choose one with --relay")),
            (&["a", "b"], Some("b"), Ok("b")),
        ];
        for (relays, asked, want) in cases {
            let got = choose_relay(&settings(relays), asked);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(got), Err(want)) => assert!(got.0.contains(want), "{}", got.0),
                (got, want) => panic!("{relays:?} {asked:?}: {got:?} vs {want:?}"),
            }
        }
    }

    #[test]
    fn sender_addresses_are_checked_once() {
        assert!(check_addresses("News <news@example.com>", None).is_ok());
        assert!(check_addresses("news@example.com", Some("bounces@example.com")).is_ok());
        assert!(check_addresses("not an address", None).is_err());
        assert!(check_addresses("news@example.com", Some("nope")).is_err());
    }
}
