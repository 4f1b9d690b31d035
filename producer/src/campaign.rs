//! A campaign: recipients CSV rows + templates → one validated [`Job`] per row, streaming.
//!
//! Every column of the CSV is a template variable. The subject, the text body and the extra
//! headers are rendered verbatim; only the HTML body escapes what it inserts. A variable a
//! row does not provide is an error for that row (minijinja's strict undefined behaviour).
//! Nothing here talks to the broker: `send` reads the file twice through [`CampaignReader`],
//! once to validate every row and once to publish.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::BufRead;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, Value};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use sluice_shared::job::{check_header, InvalidJob};
use sluice_shared::Job;

use crate::rows::{Limits, Oversized, RawRecord, RecordReader};

/// The column every recipients file must have.
pub const EMAIL_COLUMN: &str = "email";

/// What the command line says about a campaign, templates still unrendered.
#[derive(Debug, Clone)]
pub struct CampaignSpec {
    /// Campaign id; job ids are `<campaign>-<line>`.
    pub campaign: String,
    /// The From header.
    pub from: String,
    /// Envelope sender (bounce address), when it is not the From address.
    pub return_path: Option<String>,
    /// Subject template.
    pub subject: String,
    /// Plain-text body template.
    pub text: String,
    /// HTML body template.
    pub html: Option<String>,
    /// Extra headers: name and value template.
    pub headers: Vec<(String, String)>,
    /// Every job's `not_before` (RFC 3339), if any.
    pub not_before: Option<String>,
    /// Every job's `not_after` (RFC 3339), if any.
    pub not_after: Option<String>,
}

/// One row that cannot become a job, with the line of the file it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// Line of the file (the header is line 1).
    pub line: u64,
    /// What is wrong, for a person.
    pub problem: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

impl std::error::Error for RowError {}

/// A template that does not parse; nothing can be rendered.
#[derive(Debug, thiserror::Error)]
#[error("{what} template: {source}")]
pub struct TemplateError {
    what: String,
    source: minijinja::Error,
}

/// Work one template may do for one row, in minijinja fuel: one per instruction, one per
/// 64 bytes produced (so [`MAX_RENDERED_BYTES`] costs about 164 000). A campaign's templates
/// take tens to a few thousand; a loop that does not end, or one string of 100 MB, runs out
/// here instead of holding a validation thread for ever.
pub const TEMPLATE_FUEL: u64 = 1_000_000;

/// Bytes one row may render, all its templates together (the subject, the bodies and the
/// headers): the worker's default `max_message_bytes`. Rendering stops at the first byte
/// over it, so a template that would render 100 MB never holds more than this.
pub const MAX_RENDERED_BYTES: usize = 10 * 1024 * 1024;

const SUBJECT: &str = "subject";
const TEXT: &str = "text";
const HTML: &str = "html";

/// The campaign's templates, parsed once and rendered for every row.
pub struct Templates {
    env: Environment<'static>,
    /// Header name and the name of its template in `env`.
    headers: Vec<(String, String)>,
    has_html: bool,
}

impl Templates {
    /// Parse every template of `spec`.
    pub fn new(spec: &CampaignSpec) -> Result<Templates, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_debug(false);
        env.set_fuel(Some(TEMPLATE_FUEL));
        // Only the HTML body escapes; subject, text and headers go out as written.
        env.set_auto_escape_callback(|name| {
            if name == HTML {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        // A body file's final newline is part of the body.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .keep_trailing_newline(true)
                .build()
                .expect("default syntax with keep_trailing_newline"),
        );
        let mut add = |name: String, what: String, source: &str| {
            env.add_template_owned(name, source.to_string())
                .map_err(|source| TemplateError { what, source })
        };
        add(SUBJECT.into(), "subject".into(), &spec.subject)?;
        add(TEXT.into(), "text".into(), &spec.text)?;
        if let Some(html) = &spec.html {
            add(HTML.into(), "html".into(), html)?;
        }
        let mut headers = Vec::new();
        for (name, value) in &spec.headers {
            let template = format!("header {name}");
            add(template.clone(), format!("header {name:?}"), value)?;
            headers.push((name.clone(), template));
        }
        Ok(Templates {
            env,
            headers,
            has_html: spec.html.is_some(),
        })
    }

    /// Every template name with the variables it uses that are not columns.
    fn unknown_variables(&self, columns: &Columns) -> HashMap<String, Vec<String>> {
        let mut out = HashMap::new();
        for (name, _) in self.env.templates() {
            let template = self.env.get_template(name).expect("template just listed");
            let unknown: BTreeSet<String> = template
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| {
                    !columns.index.contains_key(v) && self.env.globals().all(|(g, _)| g != v)
                })
                .collect();
            if !unknown.is_empty() {
                out.insert(name.to_string(), unknown.into_iter().collect());
            }
        }
        out
    }

    /// Render template `name`, taking its output out of `room` (the bytes the row may still
    /// render); stops as soon as the output would not fit.
    fn render(&self, name: &str, vars: &Value, room: &mut usize) -> Result<String, RenderError> {
        let mut out = Capped {
            out: Vec::new(),
            room: *room,
            over: false,
        };
        let rendered = self
            .env
            .get_template(name)
            .expect("templates are added in new()")
            .render_captured_to(vars.clone(), &mut out);
        if out.over {
            return Err(RenderError::TooLarge);
        }
        rendered.map_err(RenderError::Template)?;
        *room = out.room;
        String::from_utf8(out.out).map_err(|_| RenderError::TooLarge)
    }
}

/// Why a template did not render for a row.
enum RenderError {
    Template(minijinja::Error),
    /// The row's output went over [`MAX_RENDERED_BYTES`].
    TooLarge,
}

/// A writer that takes at most `room` bytes, and fails (setting `over`) at the first write
/// that does not fit.
struct Capped {
    out: Vec<u8>,
    room: usize,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.room {
            self.over = true;
            return Err(std::io::Error::other("over the size limit"));
        }
        self.room -= buf.len();
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The header row: column names and where `email` is.
#[derive(Debug)]
pub struct Columns {
    names: Vec<String>,
    index: HashMap<String, usize>,
    email: usize,
}

impl Columns {
    /// Read the header record (line 1).
    fn from_header(record: &RawRecord) -> Result<Columns, RowError> {
        let line = record.line();
        let err = |problem: String| RowError { line, problem };
        if let Some(oversized) = record.oversized() {
            return Err(err(oversized_problem(oversized, &[])));
        }
        let mut names = Vec::with_capacity(record.len());
        let mut index = HashMap::new();
        for i in 0..record.len() {
            let name = std::str::from_utf8(record.field(i)).map_err(|_| {
                err(format!(
                    "column name {} is not valid UTF-8 (wrong encoding? save the file as UTF-8)",
                    i + 1
                ))
            })?;
            if index.insert(name.to_string(), i).is_some() {
                return Err(err(format!("column {name:?} appears twice in the header")));
            }
            names.push(name.to_string());
        }
        let Some(&email) = index.get(EMAIL_COLUMN) else {
            let hint = names
                .iter()
                .find(|n| n.trim().eq_ignore_ascii_case(EMAIL_COLUMN))
                .map(|n| format!(" (found {n:?}; the name must be exactly {EMAIL_COLUMN:?})"))
                .unwrap_or_default();
            return Err(err(format!(
                "missing column {EMAIL_COLUMN:?}: the header row must name an {EMAIL_COLUMN:?} column{hint}"
            )));
        };
        Ok(Columns {
            names,
            index,
            email,
        })
    }

    /// The column names, in file order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// One row's fields as template variables (a minijinja map looked up by column name).
#[derive(Debug)]
struct RowVars {
    columns: Arc<Columns>,
    text: String,
    ends: Vec<usize>,
}

impl RowVars {
    fn field(&self, index: usize) -> &str {
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        &self.text[start..self.ends[index]]
    }
}

impl Object for RowVars {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        let index = *self.columns.index.get(key)?;
        Some(Value::from(self.field(index)))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.columns
                .names
                .iter()
                .map(|n| Value::from(n.as_str()))
                .collect(),
        )
    }
}

/// Whether [`Campaign::job`] runs [`Job::validate`] on the rendered job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Everything: the first pass over the file.
    Full,
    /// Only what rendering itself checks (fields, variables, header line breaks): for the
    /// second pass over a file that is known unchanged since a [`Check::Full`] pass, whose
    /// invalid rows are skipped by line number.
    RenderOnly,
}

/// Turns one record of a recipients file into a job: the columns, the templates, the spec.
/// Shared by the threads of the validation pass.
pub struct Campaign {
    columns: Arc<Columns>,
    templates: Arc<Templates>,
    spec: Arc<CampaignSpec>,
    unknown_variables: HashMap<String, Vec<String>>,
    max_field_bytes: usize,
    max_record_bytes: usize,
}

impl Campaign {
    /// The header's columns.
    pub fn columns(&self) -> &Columns {
        &self.columns
    }

    /// The recipient a record names: its `email` field, as text (`None` when the record
    /// lacks the field or it is not UTF-8, which makes the row invalid anyway).
    pub fn recipient<'r>(&self, record: &'r RawRecord) -> Option<&'r str> {
        if self.columns.email >= record.len() {
            return None;
        }
        std::str::from_utf8(record.field(self.columns.email)).ok()
    }

    /// The job of one record, or why there is none.
    pub fn job(&self, record: &RawRecord, check: Check) -> Result<Job, RowError> {
        let line = record.line();
        self.try_job(record, check)
            .map_err(|problem| RowError { line, problem })
    }

    fn try_job(&self, record: &RawRecord, check: Check) -> Result<Job, String> {
        if let Some(oversized) = record.oversized() {
            let mut problem = oversized_problem(oversized, &self.columns.names);
            match oversized {
                Oversized::Field { .. } => {
                    problem.push_str(&format!(" (the limit is {} bytes)", self.max_field_bytes))
                }
                Oversized::Record => {
                    problem.push_str(&format!(" (the limit is {} bytes)", self.max_record_bytes))
                }
                Oversized::TooManyFields => {}
            }
            return Err(problem);
        }
        if record.len() != self.columns.names.len() {
            return Err(format!(
                "wrong number of fields: {} instead of {} (ragged row)",
                record.len(),
                self.columns.names.len()
            ));
        }
        let (bytes, ends) = record.parts();
        // Field by field: a character whose bytes straddle a comma makes the row valid
        // UTF-8 as a whole while neither field is, and a field must be text on its own.
        let mut start = 0;
        for (field, &end) in ends.iter().enumerate() {
            if std::str::from_utf8(&bytes[start..end]).is_err() {
                return Err(format!(
                    "column {:?} is not valid UTF-8 (wrong encoding? save the file as UTF-8)",
                    self.columns.names[field]
                ));
            }
            start = end;
        }
        let text = std::str::from_utf8(bytes).expect("every field is valid UTF-8");
        let vars = RowVars {
            columns: self.columns.clone(),
            text: text.to_string(),
            ends: ends.to_vec(),
        };
        let to = vars.field(self.columns.email).trim().to_string();
        let vars = Value::from_object(vars);

        let mut room = MAX_RENDERED_BYTES;
        let room = &mut room;
        let subject = self.render(SUBJECT, &vars, room)?;
        let text = self.render(TEXT, &vars, room)?;
        let html = if self.templates.has_html {
            Some(self.render(HTML, &vars, room)?)
        } else {
            None
        };
        let mut headers = BTreeMap::new();
        for (name, template) in &self.templates.headers {
            let value = self.render(template, &vars, room)?;
            check_header(name, &value).map_err(|e| e.to_string())?;
            headers.insert(name.clone(), value);
        }
        let spec = &self.spec;
        let job = Job {
            id: format!("{}-{}", spec.campaign, record.line()),
            campaign: Some(spec.campaign.clone()),
            from: spec.from.clone(),
            return_path: spec.return_path.clone(),
            to,
            subject,
            text: Some(text),
            html,
            headers,
            priority: None,
            not_before: spec.not_before.clone(),
            not_after: spec.not_after.clone(),
        };
        if check == Check::Full {
            job.validate().map_err(|e| match e {
                InvalidJob::Field {
                    field: "to",
                    problem,
                } => format!("column {EMAIL_COLUMN:?}: {problem}"),
                other => other.to_string(),
            })?;
        }
        Ok(job)
    }

    fn render(&self, template: &str, vars: &Value, room: &mut usize) -> Result<String, String> {
        self.templates.render(template, vars, room).map_err(|e| {
            let what = template
                .strip_prefix("header ")
                .map_or_else(|| template.to_string(), |name| format!("header {name:?}"));
            let e = match e {
                RenderError::TooLarge => {
                    return format!(
                        "{what}: the row renders more than {MAX_RENDERED_BYTES} bytes \
                         (subject, bodies and headers together)"
                    )
                }
                RenderError::Template(e) => e,
            };
            match (e.kind(), self.unknown_variables.get(template)) {
                (minijinja::ErrorKind::UndefinedError, Some(unknown)) => format!(
                    "{what}: undefined variable {} (the file has no such column)",
                    unknown.join(", ")
                ),
                (minijinja::ErrorKind::OutOfFuel, _) => format!(
                    "{what}: the template does more work than one row may (more than \
                     {TEMPLATE_FUEL} fuel: a loop that does not end, or data far too large?)"
                ),
                _ => format!("{what}: {e}"),
            }
        })
    }
}

/// Streams a recipients file: the header row first, then one record (or job) at a time.
pub struct CampaignReader<R> {
    records: RecordReader<R>,
    record: RawRecord,
    campaign: Arc<Campaign>,
}

impl<R: BufRead> CampaignReader<R> {
    /// Read the header row. An unusable header (no `email` column, an empty file...) is a
    /// [`RowError`] on line 1; an I/O failure is an `io::Error`.
    pub fn new(
        input: R,
        spec: Arc<CampaignSpec>,
        templates: Arc<Templates>,
        limits: Limits,
    ) -> Result<Self, HeaderError> {
        let mut records = RecordReader::new(input, limits);
        let mut record = RawRecord::default();
        if !records.read(&mut record)? {
            return Err(HeaderError::Invalid(RowError {
                line: 1,
                problem: format!(
                    "the file is empty: expected a header row naming an {EMAIL_COLUMN:?} column"
                ),
            }));
        }
        let columns = Columns::from_header(&record)?;
        let unknown_variables = templates.unknown_variables(&columns);
        let campaign = Campaign {
            columns: Arc::new(columns),
            templates,
            spec,
            unknown_variables,
            max_field_bytes: limits.max_field_bytes,
            max_record_bytes: limits.max_record_bytes,
        };
        Ok(Self {
            records,
            record,
            campaign: Arc::new(campaign),
        })
    }

    /// What turns records into jobs.
    pub fn campaign(&self) -> &Arc<Campaign> {
        &self.campaign
    }

    /// The next raw record; `Ok(false)` at the end of the file.
    pub fn next_record(&mut self, record: &mut RawRecord) -> std::io::Result<bool> {
        self.records.read(record)
    }

    /// The next row as a fully validated job or as the reason it is not one; `None` at the
    /// end of the file.
    pub fn next_row(&mut self) -> std::io::Result<Option<Result<Job, RowError>>> {
        if !self.records.read(&mut self.record)? {
            return Ok(None);
        }
        Ok(Some(self.campaign.job(&self.record, Check::Full)))
    }
}

/// Why the header row cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The header row itself is wrong: this is the user's file.
    #[error(transparent)]
    Invalid(#[from] RowError),
    /// The file could not be read.
    #[error("cannot read the recipients file")]
    Io(#[from] std::io::Error),
}

fn oversized_problem(oversized: Oversized, names: &[String]) -> String {
    match oversized {
        Oversized::Field { index } => match names.get(index) {
            Some(name) => format!("field too large: column {name:?}"),
            None => format!("field too large: field {}", index + 1),
        },
        Oversized::TooManyFields => "too many fields (ragged row)".to_string(),
        Oversized::Record => "record too large: its fields together".to_string(),
    }
}

/// Campaign ids end up in job ids, routing keys and queue names.
pub fn check_campaign_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 100 {
        return Err("a campaign id is 1 to 100 characters".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return Err("a campaign id uses only ASCII letters, digits, '-' and '_'".into());
    }
    Ok(())
}

/// A fresh campaign id: `c`, the UTC time, 4 random hex digits (`c20261128T112233Z3f9a`).
pub fn generate_campaign_id(now: time::OffsetDateTime, random: u16) -> String {
    let now = now.to_offset(time::UtcOffset::UTC);
    format!(
        "c{:04}{:02}{:02}T{:02}{:02}{:02}Z{random:04x}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CampaignSpec {
        CampaignSpec {
            campaign: "spring".into(),
            from: "News <news@example.com>".into(),
            return_path: None,
            subject: "Hello {{ name }}".into(),
            text: "Dear {{ name }},\n".into(),
            html: Some("<p>Dear {{ name }}</p>".into()),
            headers: vec![("X-Tag".into(), "{{ tag }}".into())],
            not_before: None,
            not_after: None,
        }
    }

    /// Every row of `csv` as a job or an error line.
    fn rows(spec: CampaignSpec, csv: &[u8]) -> Vec<Result<Job, String>> {
        let templates = Arc::new(Templates::new(&spec).unwrap());
        let mut reader = CampaignReader::new(csv, Arc::new(spec), templates, Limits::default())
            .unwrap_or_else(|e| panic!("header: {e}"));
        let mut out = Vec::new();
        while let Some(row) = reader.next_row().unwrap() {
            out.push(row.map_err(|e| e.to_string()));
        }
        out
    }

    #[test]
    fn renders_each_row_verbatim_except_html() {
        let csv = "email,name,tag\nann@example.org,\"O'Brien, Zoë <&>\",a\nbob@example.org,Bob,b\n";
        let jobs: Vec<Job> = rows(spec(), csv.as_bytes())
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(jobs.len(), 2);
        let ann = &jobs[0];
        assert_eq!(ann.id, "spring-2");
        assert_eq!(ann.campaign.as_deref(), Some("spring"));
        assert_eq!(ann.to, "ann@example.org");
        assert_eq!(ann.subject, "Hello O'Brien, Zoë <&>");
        assert_eq!(ann.text.as_deref(), Some("Dear O'Brien, Zoë <&>,\n"));
        assert_eq!(
            ann.html.as_deref(),
            Some("<p>Dear O&#x27;Brien, Zoë &lt;&amp;&gt;</p>")
        );
        assert_eq!(ann.headers["X-Tag"], "a");
        assert_eq!(ann.return_path, None);
        assert_eq!(jobs[1].id, "spring-3");
        assert_eq!(jobs[1].subject, "Hello Bob");
    }

    #[test]
    fn every_kind_of_bad_row_is_reported_on_its_own_line() {
        let mut spec = spec();
        spec.text = "{% if vip == 'yes' %}code {{ vip_code }}{% endif %}Hi {{ name }}".into();
        let mut csv = b"email,name,tag,vip\n".to_vec();
        csv.extend_from_slice(b"ann@example.org,Ann,a,no\n"); // 2 ok
        csv.extend_from_slice(b"not-an-address,Bob,b,no\n"); // 3 bad address
        csv.extend_from_slice(b"cy@example.org,Cy,c,yes\n"); // 4 lacks vip_code
        csv.extend_from_slice(b"dee@example.org,Dee,\"x\r\nBcc: evil@example.com\",no\n"); // 5-6 CR/LF in header
        csv.extend_from_slice(b"eve@example.org,Eve\n"); // 7 ragged
        csv.extend_from_slice(b"fay@example.org,F\xe9e,f,no\n"); // 8 Latin-1
        csv.extend_from_slice(b"gus@example.org,Gus,g,\"no,\nreally\"\n"); // 9-10 ok
        csv.extend_from_slice(b"hal@example.org,Hal,h,no\n"); // 11 ok
        csv.extend_from_slice(b"ida@example.org,Zo\xc3,\xab,no\n"); // 12: "ë" (C3 AB) split by a comma
        let got = rows(spec, &csv);
        let summary: Vec<String> = got
            .iter()
            .map(|r| match r {
                Ok(job) => format!("ok {}", job.id),
                Err(e) => e.clone(),
            })
            .collect();
        let expect_prefixes = [
            "ok spring-2",
            "line 3: column \"email\": \"not-an-address\" is not a valid address",
            "line 4: text: undefined variable vip_code (the file has no such column)",
            "line 5: header \"X-Tag\": value contains CR or LF",
            "line 7: wrong number of fields: 2 instead of 4 (ragged row)",
            "line 8: column \"name\" is not valid UTF-8",
            "ok spring-9",
            "ok spring-11",
            "line 12: column \"name\" is not valid UTF-8",
        ];
        assert_eq!(summary.len(), expect_prefixes.len(), "{summary:#?}");
        for (got, want) in summary.iter().zip(expect_prefixes) {
            assert!(got.starts_with(want), "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn header_problems_are_line_1() {
        let cases: [(&[u8], &str); 4] = [
            (
                b"name,tag\nann@example.org,a\n",
                "line 1: missing column \"email\"",
            ),
            (b"Email,name\n", "line 1: missing column \"email\""),
            (
                b"email,name,name\n",
                "line 1: column \"name\" appears twice",
            ),
            (b"", "line 1: the file is empty"),
        ];
        for (csv, want) in cases {
            let spec = spec();
            let templates = Arc::new(Templates::new(&spec).unwrap());
            match CampaignReader::new(csv, Arc::new(spec), templates, Limits::default()) {
                Err(HeaderError::Invalid(e)) => {
                    assert!(e.to_string().starts_with(want), "{e} vs {want}")
                }
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("{want}: accepted"),
            }
        }
    }

    #[test]
    fn return_path_and_oversized_fields() {
        let mut spec = spec();
        spec.return_path = Some("bounces@example.com".into());
        let big = "z".repeat(2 << 20);
        let csv = format!("email,name,tag\nann@example.org,{big},a\nbob@example.org,Bob,b\n");
        let got = rows(spec, csv.as_bytes());
        assert!(
            got[0]
                .as_ref()
                .unwrap_err()
                .starts_with("line 2: field too large: column \"name\""),
            "{:?}",
            got[0].as_ref().map(|j| &j.id)
        );
        let bob = got[1].as_ref().unwrap();
        assert_eq!(bob.return_path.as_deref(), Some("bounces@example.com"));
        assert_eq!(bob.id, "spring-3");
    }

    #[test]
    fn a_template_that_never_ends_or_renders_too_much_fails_its_row() {
        let cases = [
            (
                "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                "line 2: text: the template does more work than one row may",
            ),
            (
                "{{ name * 100000000 }}",
                "line 2: text: the template does more work than one row may",
            ),
            (
                "{% for i in range(100000) %}{{ name * 1000 }}{% endfor %}",
                "line 2: text: the row renders more than",
            ),
            (
                "{{ name * 20000000 }}",
                "line 2: text: the row renders more than",
            ),
        ];
        for (text, want) in cases {
            let mut spec = spec();
            spec.text = text.into();
            let started = std::time::Instant::now();
            let got = rows(
                spec,
                b"email,name,tag\nann@example.org,A,a\nbob@example.org,B,b\n",
            );
            assert_eq!(got.len(), 2, "{text}");
            for (row, line) in got.iter().zip(2..) {
                let e = row
                    .as_ref()
                    .err()
                    .unwrap_or_else(|| panic!("{text}: rendered"));
                let want = want.replace("line 2", &format!("line {line}"));
                assert!(e.starts_with(&want), "{text}: {e}");
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "{text}"
            );
        }
        // The size limit counts the row, not each template.
        let mut spec = spec();
        let half = MAX_RENDERED_BYTES / 2 + 1;
        spec.subject = "s".into();
        spec.text = format!("{{{{ name * {half} }}}}");
        spec.html = Some(format!("{{{{ name * {half} }}}}"));
        let got = rows(spec, b"email,name,tag\nann@example.org,A,a\n");
        let e = got[0].as_ref().expect_err("too large together");
        assert!(
            e.starts_with("line 2: html: the row renders more than"),
            "{e}"
        );
    }

    #[test]
    fn template_syntax_errors_name_the_template() {
        let mut spec = spec();
        spec.headers = vec![("List-Id".into(), "{{ broken".into())];
        let err = Templates::new(&spec).err().expect("syntax error");
        assert!(
            err.to_string().starts_with("header \"List-Id\" template:"),
            "{err}"
        );
    }

    #[test]
    fn campaign_ids() {
        let at = time::macros::datetime!(2026-11-28 11:22:33 UTC);
        assert_eq!(generate_campaign_id(at, 0x3f9a), "c20261128T112233Z3f9a");
        assert_eq!(generate_campaign_id(at, 7), "c20261128T112233Z0007");
        assert!(check_campaign_id(&generate_campaign_id(at, 1)).is_ok());
        for bad in ["", "has space", "dot.ted", "ümlaut", &"x".repeat(101)] {
            assert!(check_campaign_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_campaign_id("spring-2026_b").is_ok());
    }
}
