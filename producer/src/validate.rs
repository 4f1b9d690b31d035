//! The first pass of `send`: every row rendered and checked, on every core, before anything
//! is published.
//!
//! One thread reads records in batches; worker threads render and validate them; the
//! calling thread reports problems in file order. Batches are recycled, so memory stays
//! bounded whatever the file's size.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::campaign::{CampaignReader, Check, RowError};
use crate::rows::RawRecord;

/// Records handed to a worker at a time.
const BATCH: usize = 512;

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

/// Render and validate every remaining row of `reader` on `threads` worker threads.
/// `on_problem` sees each invalid row in file order; `on_progress` the rows checked so far.
pub fn validate_rows<R: BufRead + Send>(
    mut reader: CampaignReader<R>,
    threads: usize,
    mut on_problem: impl FnMut(&RowError),
    mut on_progress: impl FnMut(u64),
) -> std::io::Result<Validation> {
    let threads = threads.max(1);
    let campaign = reader.campaign().clone();
    // In the work queue, in the workers, being filled, waiting to be reported in order.
    let max_batches = 4 * threads + 2;
    std::thread::scope(|scope| {
        let (work_tx, work_rx) = mpsc::sync_channel::<(u64, Vec<RawRecord>, usize)>(2 * threads);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (checked_tx, checked_rx) = mpsc::channel::<Checked>();
        let (free_tx, free_rx) = mpsc::channel::<Vec<RawRecord>>();
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let checked_tx = checked_tx.clone();
            let campaign = campaign.clone();
            scope.spawn(move || loop {
                let next = work_rx.lock().expect("work queue lock").recv();
                let Ok((seq, batch, len)) = next else { return };
                let problems = batch[..len]
                    .iter()
                    .filter_map(|record| campaign.job(record, Check::Full).err())
                    .collect();
                if checked_tx
                    .send(Checked {
                        seq,
                        batch,
                        len,
                        problems,
                    })
                    .is_err()
                {
                    return;
                }
            });
        }
        drop(checked_tx);
        let reading = scope.spawn(move || -> std::io::Result<()> {
            let mut allocated = 0;
            for seq in 0.. {
                let mut batch = match free_rx.try_recv() {
                    Ok(batch) => batch,
                    Err(_) if allocated < max_batches => {
                        allocated += 1;
                        Vec::with_capacity(BATCH)
                    }
                    Err(_) => match free_rx.recv() {
                        Ok(batch) => batch,
                        Err(_) => return Ok(()),
                    },
                };
                let mut len = 0;
                let mut more = true;
                while len < BATCH {
                    if len == batch.len() {
                        batch.push(RawRecord::default());
                    }
                    if !reader.next_record(&mut batch[len])? {
                        more = false;
                        break;
                    }
                    len += 1;
                }
                if len > 0 && work_tx.send((seq, batch, len)).is_err() {
                    return Ok(());
                }
                if !more {
                    break;
                }
            }
            Ok(())
        });

        let mut validation = Validation::default();
        let mut waiting = BTreeMap::new();
        let mut next = 0;
        let mut checked_rows = 0u64;
        for checked in checked_rx {
            waiting.insert(checked.seq, checked);
            while let Some(checked) = waiting.remove(&next) {
                next += 1;
                for problem in &checked.problems {
                    on_problem(problem);
                    validation.invalid_lines.push(problem.line);
                }
                validation.valid += (checked.len - checked.problems.len()) as u64;
                checked_rows += checked.len as u64;
                on_progress(checked_rows);
                let _ = free_tx.send(checked.batch);
            }
        }
        reading.join().expect("the reading thread does not panic")?;
        Ok(validation)
    })
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
        for threads in [1, 2, 4] {
            let mut reported = Vec::new();
            let mut last_progress = 0;
            let validation = validate_rows(
                reader(csv.clone()),
                threads,
                |problem| reported.push(problem.line),
                |rows| last_progress = rows,
            )
            .unwrap();
            assert_eq!(reported, bad, "{threads} threads");
            assert_eq!(validation.invalid_lines, bad);
            assert_eq!(validation.valid, 5000 - bad.len() as u64);
            assert_eq!(last_progress, 5000);
        }
    }

    #[test]
    fn an_empty_body_is_valid_and_empty() {
        let validation =
            validate_rows(reader(b"email,name\n".to_vec()), 2, |_| {}, |_| {}).unwrap();
        assert_eq!(validation, Validation::default());
    }
}
