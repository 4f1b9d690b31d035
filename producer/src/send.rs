//! `send`: validate every row of a campaign, then publish one job per valid row.
//!
//! The file is read twice. The first pass renders and validates every row (on every core)
//! and lists each problem as `line N: ...`; unless `--skip-invalid` is given, one problem
//! means nothing is published. The second pass renders again and publishes, so memory does
//! not grow with the number of rows; it skips the lines the first pass rejected and does
//! not validate again (the file is checked to be unchanged in between). Before the first job, the campaign's watch queue is declared (so
//! `watch` misses no event); after the last confirm, a `campaign-summary` message tells
//! `watch` how many jobs to expect.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use lapin::BasicProperties;
use sluice_shared::events::{now_rfc3339, CampaignSummary, SUMMARY_KIND};
use sluice_shared::shutdown::Shutdown;
use sluice_shared::{Job, Settings, Topology};

use crate::campaign::{
    generate_campaign_id, CampaignReader, CampaignSpec, Check, HeaderError, Templates,
};
use crate::cli::SendArgs;
use crate::exit::{Interrupted, InvalidInput, Status, UsageError};
use crate::log::Since;
use crate::progress::Progress;
use crate::publish::{job_properties, Outgoing, PublishSpan, Publisher, Setup, PERSISTENT};
use crate::relays::choose_relay;
use crate::rows::{Limits, RawRecord};
use crate::validate::{validate_rows, Validation, ValidationError};
use crate::watch;

/// Messages published and not yet confirmed, at most.
pub const CONFIRM_WINDOW: usize = 1000;
/// Body bytes published and not yet confirmed, at most (a job renders at most
/// [`crate::campaign::MAX_RENDERED_BYTES`]): with the validation pass's bound, what keeps
/// `send` within its documented memory on a file of large rows.
pub const CONFIRM_WINDOW_BYTES: usize = 32 << 20;
/// How long a stop signal waits for the confirms of what was published before it.
const CONFIRM_GRACE: Duration = Duration::from_secs(30);
/// Read buffer of the recipients file.
const READ_BUFFER: usize = 256 * 1024;

/// Counts of one `send`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SendReport {
    pub published: u64,
    pub skipped: u64,
    pub campaign: String,
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
    let validation = tokio::task::block_in_place(|| validate(&args.recipients, &spec, &templates))?;
    let invalid = validation.invalid_lines.len() as u64;
    if invalid > 0 && !args.skip_invalid {
        return Err(InvalidInput(format!(
            "{invalid} invalid row(s) in {}; nothing was published (fix them, or pass \
             --skip-invalid to publish the {} valid rows)",
            args.recipients.display(),
            validation.valid
        ))
        .into());
    }
    anyhow::ensure!(
        fingerprint(&args.recipients)? == before,
        "{} changed while it was being validated; nothing was published",
        args.recipients.display()
    );

    // Pass 2: publish. From here a stop signal ends publishing cleanly (before, it ends the
    // process: nothing is published yet).
    let shutdown = Shutdown::on_signals();
    let topology = Topology::from_settings(settings);
    let setup = Setup {
        relays: vec![relay.clone()],
        retry_steps: settings.retry.delays.len(),
    };
    let started_at = now_rfc3339();
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
    let published = publish_rows(
        &mut publisher,
        &topology,
        (&relay, args.priority),
        &args.recipients,
        open_rows(&args.recipients, &spec, &templates)?,
        &validation,
        &shutdown,
    )
    .await?;
    let summary = CampaignSummary {
        campaign: campaign.clone(),
        published,
        relay: relay.clone(),
        started_at,
    };
    publish_summary(&mut publisher, &topology, &summary).await?;
    publisher.close().await;

    let report = SendReport {
        published,
        skipped: invalid,
        campaign: campaign.clone(),
    };
    if invalid > 0 {
        eprintln!("skipped {invalid} invalid row(s)");
    }
    if args.wait {
        if !args.json {
            println!("campaign {campaign}");
            println!("published {published} jobs");
        }
        let followed = watch::follow(
            settings,
            &campaign,
            Since::Started(&summary.started_at),
            None,
        )
        .await?;
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
        println!("published {published} jobs");
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

/// Pass 1: render and check every row, listing each problem on stderr.
fn validate(
    path: &Path,
    spec: &Arc<CampaignSpec>,
    templates: &Arc<Templates>,
) -> anyhow::Result<Validation> {
    let rows = open_rows(path, spec, templates)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let progress = std::cell::RefCell::new(Progress::new("validated", None));
    let validation = validate_rows(
        rows,
        threads,
        |problem| progress.borrow().println(&problem.to_string()),
        |rows| progress.borrow_mut().set(rows),
    );
    progress.borrow().finish();
    match validation {
        Ok(validation) => Ok(validation),
        Err(ValidationError::Read(e)) => {
            Err(e).with_context(|| format!("cannot read the recipients file {}", path.display()))
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot validate {}; nothing was published",
            path.display()
        ))),
    }
}

/// Pass 2: publish every valid row; returns how many jobs the broker confirmed.
async fn publish_rows(
    publisher: &mut Publisher,
    topology: &Topology,
    (relay, priority): (&str, sluice_shared::Priority),
    path: &Path,
    mut rows: CampaignReader<BufReader<File>>,
    validation: &Validation,
    shutdown: &Shutdown,
) -> anyhow::Result<u64> {
    let campaign = rows.campaign().clone();
    let mut record = RawRecord::default();
    // Sorted: the first pass reports in file order.
    let mut skip = validation.invalid_lines.iter().peekable();
    let exchange: lapin::types::ShortString = topology.jobs_exchange().into();
    let routing_key: lapin::types::ShortString = priority.routing_key(relay).into();
    let mut progress = Progress::new("published", Some(validation.valid));
    while rows
        .next_record(&mut record)
        .with_context(|| format!("cannot read the recipients file {}", path.display()))?
    {
        if shutdown.is_triggered() {
            progress.finish();
            return Err(interrupted(publisher, validation.valid).await.into());
        }
        // Listed by pass 1, and skipping was asked for (or there would be no pass 2).
        while skip.next_if(|&&line| line < record.line()).is_some() {}
        if skip.next_if(|&&line| line == record.line()).is_some() {
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
        published.with_context(|| format!("while publishing the jobs of {}", path.display()))?;
        progress.set(publisher.confirmed());
    }
    publisher
        .flush()
        .await
        .with_context(|| format!("while publishing the jobs of {}", path.display()))?;
    progress.set(publisher.confirmed());
    progress.finish();
    Ok(publisher.confirmed())
}

/// After a stop signal: wait (at most [`CONFIRM_GRACE`]) for the confirms of what was
/// published, and say how far publishing got. Every job counted is confirmed, so it is in
/// the queue; without confirms within the grace, up to the window more may be.
async fn interrupted(publisher: &mut Publisher, valid: u64) -> Interrupted {
    let unconfirmed = match tokio::time::timeout(CONFIRM_GRACE, publisher.flush()).await {
        Ok(Ok(())) => String::new(),
        Ok(Err(e)) => format!(" ({e}: the unconfirmed jobs may or may not be in the queue)"),
        Err(_) => format!(
            " (no confirm within {CONFIRM_GRACE:?}: up to {CONFIRM_WINDOW} more jobs may be \
             in the queue)"
        ),
    };
    Interrupted(format!(
        "interrupted by a stop signal: published {} of {valid} jobs, each confirmed by the \
         broker{unconfirmed}; the rest of the file was not published and no campaign \
         summary was sent",
        publisher.confirmed()
    ))
}

/// Write the campaign's summary into the event log, where `watch` and `status` learn how
/// many jobs make the campaign complete.
async fn publish_summary(
    publisher: &mut Publisher,
    topology: &Topology,
    summary: &CampaignSummary,
) -> anyhow::Result<()> {
    let properties = BasicProperties::default()
        .with_type(SUMMARY_KIND.into())
        .with_delivery_mode(PERSISTENT)
        .with_headers(summary.to_headers());
    publisher
        .publish(Outgoing {
            tag: 0,
            id: format!("the summary of campaign {}", summary.campaign),
            exchange: "".into(),
            routing_key: topology.events_log().into(),
            properties,
            body: Vec::new(),
        })
        .await
        .context("cannot publish the campaign summary")?;
    publisher
        .flush()
        .await
        .context("cannot publish the campaign summary")?;
    Ok(())
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
