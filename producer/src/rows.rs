//! Reading the recipients CSV one record at a time, in bounded memory, with line numbers.
//!
//! Built on `csv_core` (the parser inside the `csv` crate) rather than `csv::Reader`,
//! because `csv::Reader` grows a record without limit: one unterminated quote in a
//! million-row file would pull the rest of the file into a single field. Here a field over
//! [`Limits::max_field_bytes`] is reported (and skipped over without being kept), and the
//! line a record starts on is exact even when quoted fields span several lines.

use std::io::{self, BufRead};

/// How large a record may be before it is reported instead of read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest field, in bytes.
    pub max_field_bytes: usize,
    /// Most fields in one record.
    pub max_fields: usize,
    /// Most bytes in one record, all fields together: what one row may hold in memory
    /// whatever its shape (64 fields of 1 MiB each are each within `max_field_bytes`).
    pub max_record_bytes: usize,
}

/// [`Limits::max_field_bytes`] by default: 1 MiB.
pub const MAX_FIELD_BYTES: usize = 1 << 20;
/// [`Limits::max_record_bytes`] by default: 2 MiB.
pub const MAX_RECORD_BYTES: usize = 2 << 20;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_field_bytes: MAX_FIELD_BYTES,
            max_fields: 10_000,
            max_record_bytes: MAX_RECORD_BYTES,
        }
    }
}

/// Why a record was read but not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversized {
    /// Field number `index` (0-based) is longer than the limit.
    Field { index: usize },
    /// The record has more fields than the limit.
    TooManyFields,
    /// The record's fields together are longer than the limit.
    Record,
}

/// One CSV record as raw bytes; reused from record to record.
#[derive(Debug, Default)]
pub struct RawRecord {
    line: u64,
    data: Vec<u8>,
    ends: Vec<usize>,
    len: usize,
    oversized: Option<Oversized>,
}

impl RawRecord {
    /// The line of the file the record starts on (the header is line 1).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a record without fields (never returned by [`RecordReader::read`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Set when the record broke a [`Limits`]; its fields are then not available.
    pub fn oversized(&self) -> Option<Oversized> {
        self.oversized
    }

    /// The bytes of field `index`.
    pub fn field(&self, index: usize) -> &[u8] {
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        &self.data[start..self.ends[index]]
    }

    /// Give back the memory of a record that was larger than most, before the buffer is
    /// reused: recycled records keep their capacity, and a batch of them must not keep
    /// every large row it once held.
    pub fn shrink(&mut self) {
        if self.data.len() > 1024 {
            self.data = vec![0; 256];
        }
        if self.ends.len() > 64 {
            self.ends = vec![0; 16];
        }
    }

    /// Bytes the record holds on to.
    pub fn capacity_bytes(&self) -> usize {
        self.data.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
    }

    /// All fields' bytes back to back, and where each field ends.
    pub fn parts(&self) -> (&[u8], &[usize]) {
        let end = self.ends[..self.len].last().copied().unwrap_or(0);
        (&self.data[..end], &self.ends[..self.len])
    }
}

/// Streams records out of a CSV file (comma separated, `"` quoted, LF or CRLF lines).
pub struct RecordReader<R> {
    input: R,
    core: csv_core::Reader,
    limits: Limits,
    /// Where the fields of an oversized record go once it is known to be oversized.
    discard: Vec<u8>,
    discard_ends: Vec<usize>,
    done: bool,
}

impl<R: BufRead> RecordReader<R> {
    /// A reader over `input` (wrap a file in a `BufReader`).
    pub fn new(input: R, limits: Limits) -> Self {
        Self {
            input,
            core: csv_core::Reader::new(),
            limits,
            discard: vec![0; 64 * 1024],
            discard_ends: vec![0; 1024],
            done: false,
        }
    }

    /// Read the next record into `record`; `Ok(false)` at the end of the file.
    ///
    /// Blank lines between records are skipped, as `csv` does.
    pub fn read(&mut self, record: &mut RawRecord) -> io::Result<bool> {
        use csv_core::ReadRecordResult::*;

        record.len = 0;
        record.oversized = None;
        if self.done {
            return Ok(false);
        }
        self.skip_blank_lines()?;
        record.line = self.core.line();
        // Small to start with: the validation pass keeps a few thousand records around; a
        // record's buffers grow (doubling) to its longest row and are then reused.
        if record.data.is_empty() {
            record.data.resize(256, 0);
        }
        if record.ends.is_empty() {
            record.ends.resize(16, 0);
        }
        let (mut out_len, mut ends_len) = (0, 0);
        loop {
            let input = self.input.fill_buf()?;
            let (result, n_in, n_out, n_ends) = if record.oversized.is_none() {
                self.core.read_record(
                    input,
                    &mut record.data[out_len..],
                    &mut record.ends[ends_len..],
                )
            } else {
                // Keep parsing (to find where the record ends, and count lines) but throw the
                // bytes away.
                self.core
                    .read_record(input, &mut self.discard, &mut self.discard_ends)
            };
            self.input.consume(n_in);
            if record.oversized.is_none() {
                out_len += n_out;
                ends_len += n_ends;
            }
            match result {
                InputEmpty => {}
                OutputFull if record.oversized.is_none() => {
                    let field_start = if ends_len == 0 {
                        0
                    } else {
                        record.ends[ends_len - 1]
                    };
                    if out_len - field_start > self.limits.max_field_bytes {
                        record.oversized = Some(Oversized::Field { index: ends_len });
                    } else if out_len > self.limits.max_record_bytes {
                        record.oversized = Some(Oversized::Record);
                    } else {
                        // One byte past the limit is enough to know a record is over it.
                        let grown = (record.data.len() * 2).min(self.limits.max_record_bytes + 1);
                        record.data.resize(grown, 0);
                    }
                }
                OutputEndsFull if record.oversized.is_none() => {
                    if ends_len >= self.limits.max_fields {
                        record.oversized = Some(Oversized::TooManyFields);
                    } else {
                        let grown = record.ends.len() * 2;
                        record.ends.resize(grown, 0);
                    }
                }
                OutputFull | OutputEndsFull => {}
                Record => {
                    if record.oversized.is_none() {
                        record.len = ends_len;
                        record.oversized = self.check_fields(record);
                    } else {
                        // The fields are gone; keep `len` 0 so nobody reads them.
                        record.len = 0;
                    }
                    return Ok(true);
                }
                End => {
                    self.done = true;
                    return Ok(false);
                }
            }
        }
    }

    /// Consume the line breaks before a record ourselves, so that the line counter points at
    /// the record's first line when it starts.
    fn skip_blank_lines(&mut self) -> io::Result<()> {
        loop {
            let input = self.input.fill_buf()?;
            if input.is_empty() {
                return Ok(());
            }
            let blank = input
                .iter()
                .take_while(|&&b| b == b'\n' || b == b'\r')
                .count();
            let newlines = input[..blank].iter().filter(|&&b| b == b'\n').count() as u64;
            self.core.set_line(self.core.line() + newlines);
            let all = blank == input.len();
            self.input.consume(blank);
            if !all {
                return Ok(());
            }
        }
    }

    /// A field may slip past the limit when it fits in a buffer grown for earlier fields.
    fn check_fields(&self, record: &RawRecord) -> Option<Oversized> {
        if record.len > self.limits.max_fields {
            return Some(Oversized::TooManyFields);
        }
        if record.ends[..record.len].last().copied().unwrap_or(0) > self.limits.max_record_bytes {
            return Some(Oversized::Record);
        }
        let mut start = 0;
        for (index, &end) in record.ends[..record.len].iter().enumerate() {
            if end - start > self.limits.max_field_bytes {
                return Some(Oversized::Field { index });
            }
            start = end;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the tests see it: its line, and its fields or why it was not kept.
    type Seen = (u64, Result<Vec<String>, Oversized>);

    /// Every record of `text`.
    fn read_all(text: &[u8], limits: Limits) -> Vec<Seen> {
        let mut reader = RecordReader::new(text, limits);
        let mut record = RawRecord::default();
        let mut out = Vec::new();
        while reader.read(&mut record).unwrap() {
            let fields = match record.oversized() {
                Some(o) => Err(o),
                None => Ok((0..record.len())
                    .map(|i| String::from_utf8_lossy(record.field(i)).into_owned())
                    .collect()),
            };
            out.push((record.line(), fields));
        }
        out
    }

    fn ok(line: u64, fields: &[&str]) -> Seen {
        (line, Ok(fields.iter().map(|f| f.to_string()).collect()))
    }

    #[test]
    fn records_carry_the_line_they_start_on() {
        let cases: Vec<(&str, &[u8], Vec<Seen>)> = vec![
            (
                "plain LF",
                b"email,name\na@x.org,Ann\nb@x.org,Bob\n",
                vec![
                    ok(1, &["email", "name"]),
                    ok(2, &["a@x.org", "Ann"]),
                    ok(3, &["b@x.org", "Bob"]),
                ],
            ),
            (
                "CRLF and no final newline",
                b"email,name\r\na@x.org,Ann\r\nb@x.org,Bob",
                vec![
                    ok(1, &["email", "name"]),
                    ok(2, &["a@x.org", "Ann"]),
                    ok(3, &["b@x.org", "Bob"]),
                ],
            ),
            (
                "quoted field over three lines",
                b"email,note\na@x.org,\"one\ntwo\nthree\"\nb@x.org,x\n",
                vec![
                    ok(1, &["email", "note"]),
                    ok(2, &["a@x.org", "one\ntwo\nthree"]),
                    ok(5, &["b@x.org", "x"]),
                ],
            ),
            (
                "quoted CRLF inside a field",
                b"email,note\r\na@x.org,\"one\r\ntwo\"\r\nb@x.org,x\r\n",
                vec![
                    ok(1, &["email", "note"]),
                    ok(2, &["a@x.org", "one\r\ntwo"]),
                    ok(4, &["b@x.org", "x"]),
                ],
            ),
            (
                "blank lines are skipped but counted",
                b"email\n\na@x.org\n\r\n\nb@x.org\n\n",
                vec![ok(1, &["email"]), ok(3, &["a@x.org"]), ok(6, &["b@x.org"])],
            ),
            (
                "escaped quotes and commas",
                b"email,name\na@x.org,\"O'Brien, \"\"Zo\xc3\xab\"\"\"\n",
                vec![
                    ok(1, &["email", "name"]),
                    ok(2, &["a@x.org", "O'Brien, \"Zoë\""]),
                ],
            ),
            (
                "ragged rows are returned as they are",
                b"email,name\na@x.org\nb@x.org,Bob,extra\n",
                vec![
                    ok(1, &["email", "name"]),
                    ok(2, &["a@x.org"]),
                    ok(3, &["b@x.org", "Bob", "extra"]),
                ],
            ),
            (
                "a byte order mark is not part of the first column",
                b"\xef\xbb\xbfemail\na@x.org\n",
                vec![ok(1, &["email"]), ok(2, &["a@x.org"])],
            ),
            ("empty file", b"", vec![]),
        ];
        for (name, text, expected) in cases {
            assert_eq!(read_all(text, Limits::default()), expected, "{name}");
        }
    }

    #[test]
    fn oversized_fields_are_reported_and_reading_goes_on() {
        let limits = Limits {
            max_field_bytes: 10,
            max_fields: 4,
            max_record_bytes: 1000,
        };
        let big = "x".repeat(100_000);
        let text = format!(
            "email,note\na@x.org,\"{big}\n{big}\"\nb@x.org,short\nc@x.org,0123456789A\n1,2,3,4,5\nd@x.org,ok\n"
        );
        assert_eq!(
            read_all(text.as_bytes(), limits),
            vec![
                ok(1, &["email", "note"]),
                (2, Err(Oversized::Field { index: 1 })),
                ok(4, &["b@x.org", "short"]),
                (5, Err(Oversized::Field { index: 1 })),
                (6, Err(Oversized::TooManyFields)),
                ok(7, &["d@x.org", "ok"]),
            ]
        );
    }

    #[test]
    fn a_record_of_many_fields_each_within_the_limit_is_refused_as_a_whole() {
        let limits = Limits {
            max_field_bytes: 1000,
            max_fields: 100,
            max_record_bytes: 5000,
        };
        let field = "x".repeat(1000);
        let many = vec![field.as_str(); 64].join(",");
        let text = format!(
            "email\n{many}\na@x.org\n{}\n",
            [field.as_str(); 5].join(",")
        );
        let mut reader = RecordReader::new(text.as_bytes(), limits);
        let mut record = RawRecord::default();
        let mut seen = Vec::new();
        while reader.read(&mut record).unwrap() {
            seen.push((record.line(), record.oversized()));
            assert!(
                record.data.len() <= 5001,
                "buffer grew to {}",
                record.data.len()
            );
        }
        assert_eq!(
            seen,
            [
                (1, None),
                (2, Some(Oversized::Record)),
                (3, None),
                (4, None)
            ]
        );
    }

    #[test]
    fn an_unterminated_quote_does_not_fill_memory() {
        let limits = Limits {
            max_field_bytes: 1000,
            max_fields: 10,
            max_record_bytes: 10_000,
        };
        let mut text = b"email\n\"a@x.org\n".to_vec();
        text.extend(std::iter::repeat_n(b'y', 5_000_000));
        let mut reader = RecordReader::new(text.as_slice(), limits);
        let mut record = RawRecord::default();
        assert!(reader.read(&mut record).unwrap());
        assert!(reader.read(&mut record).unwrap());
        assert_eq!(record.oversized(), Some(Oversized::Field { index: 0 }));
        assert!(
            record.data.len() < 10_000,
            "buffer grew to {}",
            record.data.len()
        );
        assert!(!reader.read(&mut record).unwrap());
    }
}
