//! The first pass of `send`: every row rendered and checked, on every core, before anything
//! is published.
//!
//! One thread reads records in batches; worker threads render and validate them; the
//! calling thread reports problems in file order. Batches are recycled, so memory stays
//! bounded whatever the file's size.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::campaign::{CampaignReader, Check, RowError};
use crate::rows::RawRecord;

/// Records handed to a worker at a time, at most.
const BATCH: usize = 512;
/// Bytes of records (their buffers' capacity) after which a batch is handed over even when
/// it holds fewer than [`BATCH`] records. A batch then holds at most this plus one record
/// ([`crate::rows::MAX_RECORD_BYTES`]) plus its small recycled records (512 × 1.5 KiB),
/// about 4 MiB; with at most `4 × threads + 2` batches alive (threads ≤ 4), the pass holds
/// at most about 72 MiB of the file whatever its rows.
const BATCH_BYTES: usize = 1 << 20;

/// What the first pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Validation {
    /// Rows that make valid jobs.
    pub valid: u64,
    /// Lines of the rows that do not, in file order.
    pub invalid_lines: Vec<u64>,
}

struct Checked {
    seq: u64,
    batch: Vec<RawRecord>,
    len: usize,
    problems: Vec<RowError>,
}

/// What a checking thread hands back: a checked batch, or the news that it cannot go on.
enum Done {
    Checked(Checked),
    Failed(String),
}

/// Why the first pass stopped before the end of the file.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// The recipients file could not be read.
    #[error("cannot read the recipients file")]
    Read(#[from] std::io::Error),
    /// A checking thread failed (a bug): the pass stops instead of waiting for it.
    #[error("a validation thread failed: {0}")]
    ThreadFailed(String),
}

/// What the first pass tells its caller, in file order.
pub trait Observer {
    /// An invalid row.
    fn problem(&mut self, problem: &RowError);
    /// A valid row (for instance to find duplicate addresses).
    fn valid(&mut self, _record: &RawRecord) {}
    /// How many rows were checked so far.
    fn progress(&mut self, _rows: u64) {}
}

/// Render and validate every remaining row of `reader` on `threads` worker threads; the
/// observer sees each row's verdict in file order.
pub fn validate_rows<R: BufRead + Send>(
    reader: CampaignReader<R>,
    threads: usize,
    observer: &mut dyn Observer,
) -> Result<Validation, ValidationError> {
    let campaign = reader.campaign().clone();
    check_rows(
        reader,
        threads,
        &|record: &RawRecord| campaign.job(record, Check::Full).err(),
        observer,
    )
}

/// [`validate_rows`] with the check of one record given: the pipeline itself.
///
/// A checking thread that panics hands back [`Done::Failed`]; the pass then stops the
/// reader and returns [`ValidationError::ThreadFailed`], so a bug in one row's check is an
/// error of the whole pass, never a wait for a batch that will not come.
fn check_rows<R: BufRead + Send>(
    mut reader: CampaignReader<R>,
    threads: usize,
    check: &(dyn Fn(&RawRecord) -> Option<RowError> + Sync),
    observer: &mut dyn Observer,
) -> Result<Validation, ValidationError> {
    let threads = threads.max(1);
    // In the work queue, in the workers, being filled, waiting to be reported in order.
    let max_batches = 4 * threads + 2;
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (work_tx, work_rx) = mpsc::sync_channel::<(u64, Vec<RawRecord>, usize)>(2 * threads);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (checked_tx, checked_rx) = mpsc::channel::<Done>();
        let (free_tx, free_rx) = mpsc::channel::<Vec<RawRecord>>();
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let checked_tx = checked_tx.clone();
            scope.spawn(move || loop {
                let next = match work_rx.lock() {
                    Ok(work_rx) => work_rx.recv(),
                    Err(_) => return,
                };
                let Ok((seq, batch, len)) = next else { return };
                let checked = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    batch[..len].iter().filter_map(check).collect::<Vec<_>>()
                }));
                let done = match checked {
                    Ok(problems) => Done::Checked(Checked {
                        seq,
                        batch,
                        len,
                        problems,
                    }),
                    Err(panic) => Done::Failed(panic_message(&*panic)),
                };
                let failed = matches!(done, Done::Failed(_));
                if checked_tx.send(done).is_err() || failed {
                    return;
                }
            });
        }
        // Only the checking threads hold the work queue: when they are all gone, the reader's
        // next send fails instead of blocking.
        drop(work_rx);
        drop(checked_tx);
        let stop = &stop;
        let reading = scope.spawn(move || -> std::io::Result<u64> {
            let mut allocated = 0;
            let mut sent = 0;
            for seq in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut batch = match free_rx.try_recv() {
                    Ok(batch) => batch,
                    Err(_) if allocated < max_batches => {
                        allocated += 1;
                        Vec::with_capacity(BATCH)
                    }
                    Err(_) => match free_rx.recv() {
                        Ok(batch) => batch,
                        Err(_) => break,
                    },
                };
                // What a large row grew is not kept for the next rows in this place.
                batch.iter_mut().for_each(RawRecord::shrink);
                let mut len = 0;
                let mut bytes = 0;
                let mut more = true;
                while len < BATCH && bytes < BATCH_BYTES {
                    if len == batch.len() {
                        batch.push(RawRecord::default());
                    }
                    if !reader.next_record(&mut batch[len])? {
                        more = false;
                        break;
                    }
                    bytes += batch[len].capacity_bytes();
                    len += 1;
                }
                if len > 0 {
                    if work_tx.send((seq, batch, len)).is_err() {
                        break;
                    }
                    sent += 1;
                }
                if !more {
                    break;
                }
            }
            Ok(sent)
        });

        let mut validation = Validation::default();
        let mut waiting = BTreeMap::new();
        let mut next = 0;
        let mut checked_rows = 0u64;
        let mut failure = None;
        for done in &checked_rx {
            let checked = match done {
                Done::Checked(checked) => checked,
                Done::Failed(why) => {
                    failure = Some(why);
                    break;
                }
            };
            waiting.insert(checked.seq, checked);
            while let Some(checked) = waiting.remove(&next) {
                next += 1;
                // Both in file order: a row is valid unless the next problem is its own.
                let mut problems = checked.problems.iter().peekable();
                for record in &checked.batch[..checked.len] {
                    match problems.next_if(|problem| problem.line == record.line()) {
                        Some(problem) => {
                            observer.problem(problem);
                            validation.invalid_lines.push(problem.line);
                        }
                        None => observer.valid(record),
                    }
                }
                validation.valid += (checked.len - checked.problems.len()) as u64;
                checked_rows += checked.len as u64;
                observer.progress(checked_rows);
                let _ = free_tx.send(checked.batch);
            }
        }
        // Unblock the reader wherever it waits: for a free batch, or for room in the queue
        // (the checking threads leave once they cannot hand back what they checked).
        stop.store(true, Ordering::Relaxed);
        drop(free_tx);
        drop(checked_rx);
        let sent = match reading.join() {
            Ok(sent) => sent?,
            Err(panic) => {
                return Err(ValidationError::ThreadFailed(panic_message(&*panic)));
            }
        };
        if let Some(why) = failure {
            return Err(ValidationError::ThreadFailed(why));
        }
        if next != sent {
            return Err(ValidationError::ThreadFailed(format!(
                "{} of {sent} batches of rows came back checked",
                next
            )));
        }
        Ok(validation)
    })
}

/// The message a panic carries, when it carries one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::{CampaignSpec, Templates};
    use crate::rows::Limits;

    fn reader(csv: Vec<u8>) -> CampaignReader<std::io::Cursor<Vec<u8>>> {
        let spec = CampaignSpec {
            campaign: "c1".into(),
            from: "news@example.com".into(),
            return_path: None,
            subject: "Hi {{ name }}".into(),
            text: "Hello {{ name }}".into(),
            html: None,
            headers: vec![],
            not_before: None,
            not_after: None,
        };
        let templates = Arc::new(Templates::new(&spec).unwrap());
        CampaignReader::new(
            std::io::Cursor::new(csv),
            Arc::new(spec),
            templates,
            Limits::default(),
        )
        .unwrap()
    }

    /// Everything the pass reported.
    #[derive(Default)]
    struct Seen {
        problems: Vec<u64>,
        valid: Vec<u64>,
        progress: u64,
    }

    impl Observer for Seen {
        fn problem(&mut self, problem: &RowError) {
            self.problems.push(problem.line);
        }
        fn valid(&mut self, record: &RawRecord) {
            self.valid.push(record.line());
        }
        fn progress(&mut self, rows: u64) {
            self.progress = rows;
        }
    }

    #[test]
    fn reports_every_problem_in_file_order_whatever_the_threads() {
        let mut csv = b"email,name\n".to_vec();
        let mut bad = Vec::new();
        for i in 0..5000u64 {
            let line = i + 2;
            if i % 7 == 3 {
                csv.extend_from_slice(format!("broken-{i},N{i}\n").as_bytes());
                bad.push(line);
            } else if i % 11 == 5 {
                csv.extend_from_slice(format!("r{i}@example.org\n").as_bytes());
                bad.push(line);
            } else {
                csv.extend_from_slice(format!("r{i}@example.org,N{i}\n").as_bytes());
            }
        }
        let good: Vec<u64> = (2..5002).filter(|line| !bad.contains(line)).collect();
        for threads in [1, 2, 4] {
            let mut seen = Seen::default();
            let validation = validate_rows(reader(csv.clone()), threads, &mut seen).unwrap();
            assert_eq!(seen.problems, bad, "{threads} threads");
            assert_eq!(seen.valid, good, "{threads} threads");
            assert_eq!(validation.invalid_lines, bad);
            assert_eq!(validation.valid, 5000 - bad.len() as u64);
            assert_eq!(seen.progress, 5000);
        }
    }

    #[test]
    fn a_check_that_panics_ends_the_pass_with_an_error_whatever_the_threads() {
        let mut csv = b"email,name\n".to_vec();
        for i in 0..5000u64 {
            csv.extend_from_slice(format!("r{i}@example.org,N{i}\n").as_bytes());
        }
        for (threads, bad_line) in [(1, 3), (1, 4000), (2, 3), (4, 4000)] {
            let check = move |record: &RawRecord| -> Option<RowError> {
                assert_ne!(record.line(), bad_line, "a bug in the check");
                None
            };
            let (done_tx, done_rx) = mpsc::channel();
            let csv = csv.clone();
            std::thread::spawn(move || {
                let result = check_rows(reader(csv), threads, &check, &mut Seen::default());
                let _ = done_tx.send(result);
            });
            let result = done_rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("{threads} threads, line {bad_line}: the pass hung"));
            match result {
                Err(ValidationError::ThreadFailed(why)) => {
                    assert!(why.contains("a bug in the check"), "{why}")
                }
                other => panic!("{threads} threads, line {bad_line}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_empty_body_is_valid_and_empty() {
        let validation =
            validate_rows(reader(b"email,name\n".to_vec()), 2, &mut Seen::default()).unwrap();
        assert_eq!(validation, Validation::default());
    }
}
