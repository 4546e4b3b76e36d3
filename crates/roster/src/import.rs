//! `roster import`: identifies, events and aliases from NDJSON, CSV or a JSON array, written in
//! batches through the engine (a data directory or `--store`) or posted to a running server's
//! native endpoints. Every refused line goes to a rejects file; lines without a `message_id` get
//! one derived from their line number and content, so re-running an interrupted import applies
//! nothing twice (within the dedup window).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use roster_core::{ErrorCode, FieldError};
use roster_engine::{AliasInput, Engine, EngineConfig, IdentifyInput, Principal, TrackInput};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::progress::{Progress, per_second};
use crate::{LimitArgs, TargetArgs};

/// Longest input line (or CSV row, or array element) read; longer ones are refused unread, so a
/// file without newlines cannot exhaust memory.
const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Most of a refused line kept in the rejects file.
const MAX_REJECTED_INPUT_BYTES: usize = 2048;
/// Most bytes of items posted in one request: under the server's default body limit (5 MiB).
const MAX_REMOTE_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Tries of one batch against a server that is unreachable, overloaded or failing.
const MAX_REMOTE_ATTEMPTS: u32 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    /// One native message per line.
    Ndjson,
    /// A header row, then one identify per row.
    Csv,
    /// One JSON array of native messages.
    Json,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file to import; `-` reads standard input (which needs `--format`).
    #[arg(default_value = "-")]
    input: String,
    /// The input's format; by default from the file's extension (`.ndjson`/`.jsonl`, `.csv`, `.json`).
    #[arg(long, value_enum)]
    format: Option<ImportFormat>,
    /// CSV: what a column holds, `COLUMN=FIELD` with FIELD one of `user_id`, `anonymous_id`,
    /// `timestamp`, `message_id`, `traits.NAME`, or empty to skip the column. Repeatable; columns
    /// not mapped are taken by name (those four, every other one a trait).
    #[arg(long = "map", value_name = "COLUMN=FIELD")]
    column_mappings: Vec<String>,
    /// Where refused lines are written (default: `<input>.rejects.ndjson`, or
    /// `import.rejects.ndjson` when reading standard input).
    #[arg(long)]
    rejects: Option<PathBuf>,
    /// Most items per batch (one engine call or one request).
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// A message id seen within this many hours is applied once (without `--url`; the server
    /// uses its own setting).
    #[arg(long, env = "ROSTER_DEDUP_WINDOW_HOURS", default_value_t = 24)]
    dedup_window_hours: u64,
}

/// Why one line was refused, as the rejects file shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct Refusal {
    code: String,
    path: String,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, path: impl Into<String>, message: impl Into<String>) -> Self {
        Refusal { code: code.as_str().to_owned(), path: path.into(), message: message.into() }
    }
}

impl From<FieldError> for Refusal {
    fn from(error: FieldError) -> Self {
        Refusal { code: error.code.as_str().to_owned(), path: error.path, message: error.message }
    }
}

/// One line, CSV row or array element, as read.
struct SourceRecord {
    /// 1-based line of the input where the record starts.
    line: u64,
    /// Bytes of input consumed up to the end of this record (for progress).
    bytes_read: u64,
    body: RecordBody,
}

enum RecordBody {
    /// A JSON message (an NDJSON line or an array element), as written.
    Json(String),
    /// A CSV row turned into an identify; `content` is what its derived message id hashes.
    Identify { object: Map<String, Value>, content: Vec<u8>, text: String },
    /// Refused while reading: bad encoding, too long, a row of the wrong width.
    Refused { refusal: Refusal, text: String },
}

impl RecordBody {
    /// The input as the rejects file quotes it.
    fn text(&self) -> &str {
        match self {
            RecordBody::Json(text) => text,
            RecordBody::Identify { text, .. } | RecordBody::Refused { text, .. } => text,
        }
    }
}

trait RecordSource {
    /// The next record; `None` at the end. Errors are fatal (the input cannot be read on).
    fn next_record(&mut self) -> anyhow::Result<Option<SourceRecord>>;
}

pub async fn import(args: ImportArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let reading_stdin = args.input == "-";
    let format = match (args.format, reading_stdin) {
        (Some(format), _) => format,
        (None, true) => anyhow::bail!("reading standard input needs --format ndjson|csv|json"),
        (None, false) => format_from_extension(Path::new(&args.input))?,
    };
    anyhow::ensure!(args.column_mappings.is_empty() || format == ImportFormat::Csv, "--map applies to CSV input only");
    let (reader, total_bytes): (Box<dyn Read + Send>, Option<u64>) = if reading_stdin {
        (Box::new(std::io::stdin()), None)
    } else {
        let file = File::open(&args.input).with_context(|| format!("cannot open {}", args.input))?;
        let length = file.metadata().ok().map(|metadata| metadata.len());
        (Box::new(file), length)
    };
    let source: Box<dyn RecordSource + Send> = match format {
        ImportFormat::Ndjson => Box::new(NdjsonSource::new(reader)),
        ImportFormat::Csv => Box::new(CsvSource::new(reader, &args.column_mappings)?),
        ImportFormat::Json => Box::new(JsonArraySource::new(reader)?),
    };
    let destination = Destination::open(&args).await?;
    let rejects_path = args.rejects.clone().unwrap_or_else(|| {
        if reading_stdin {
            PathBuf::from("import.rejects.ndjson")
        } else {
            PathBuf::from(format!("{}.rejects.ndjson", args.input))
        }
    });
    let rejects = File::create(&rejects_path)
        .with_context(|| format!("cannot create the rejects file {}", rejects_path.display()))?;
    let mut run = ImportRun::new(destination, args.batch_size, BufWriter::new(rejects));
    let mut progress = Progress::new("import", "lines", total_bytes);
    let mut records = read_and_prepare_in_background(source);
    let mut bytes_read = 0;
    while let Some(record) = records.recv().await {
        let record = record?;
        bytes_read = record.bytes_read;
        let flushed = run.add(record).await?;
        if flushed || run.counts.read.is_multiple_of(1024) {
            progress.update(run.counts.read, Some(bytes_read), &run.counts.details());
        }
    }
    run.flush().await?;
    run.rejects.flush().context("cannot write the rejects file")?;
    progress.update(run.counts.read, Some(bytes_read), &run.counts.details());
    let elapsed = progress.elapsed();
    let counts = &run.counts;
    progress.finish(&format!(
        "{} lines read: {} applied, {} refused{}, {} duplicates (applied before) in {:.1}s ({:.0} lines/s)",
        counts.read,
        counts.applied,
        counts.refused,
        if counts.refused > 0 { format!(" (see {})", rejects_path.display()) } else { String::new() },
        counts.duplicates,
        elapsed.as_secs_f64(),
        per_second(counts.read, elapsed),
    ));
    Ok(())
}

/// Records read ahead of the batches being applied.
const RECORDS_READ_AHEAD: usize = 4096;

/// A record parsed and ready to batch.
struct PreparedRecord {
    line: u64,
    bytes_read: u64,
    /// The input as the rejects file would quote it.
    text: String,
    items: Result<Vec<PreparedItem>, Refusal>,
}

/// Reads and parses records on a thread of their own, so that parsing the next lines overlaps
/// the store (or the server) applying the current batch. Order is kept: one reader, one channel.
fn read_and_prepare_in_background(
    mut source: Box<dyn RecordSource + Send>,
) -> tokio::sync::mpsc::Receiver<anyhow::Result<PreparedRecord>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(RECORDS_READ_AHEAD);
    std::thread::spawn(move || {
        loop {
            let prepared = match source.next_record() {
                Ok(None) => return,
                Ok(Some(record)) => Ok(PreparedRecord {
                    line: record.line,
                    bytes_read: record.bytes_read,
                    text: excerpt(record.body.text()),
                    items: prepare(record.line, &record.body),
                }),
                Err(error) => Err(error),
            };
            let failed = prepared.is_err();
            // A closed channel means the import stopped on a fatal error: nothing more to read.
            if sender.blocking_send(prepared).is_err() || failed {
                return;
            }
        }
    });
    receiver
}

fn format_from_extension(path: &Path) -> anyhow::Result<ImportFormat> {
    let extension = path.extension().and_then(|extension| extension.to_str()).map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("ndjson" | "jsonl") => Ok(ImportFormat::Ndjson),
        Some("csv") => Ok(ImportFormat::Csv),
        Some("json") => Ok(ImportFormat::Json),
        _ => anyhow::bail!("cannot tell the format of {} from its name; pass --format ndjson|csv|json", path.display()),
    }
}

/// Lines read so far by outcome.
#[derive(Debug, Default)]
struct Counts {
    read: u64,
    applied: u64,
    refused: u64,
    duplicates: u64,
}

impl Counts {
    fn details(&self) -> String {
        format!("{} applied, {} refused, {} duplicates", self.applied, self.refused, self.duplicates)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

struct NdjsonSource {
    reader: BufReader<Box<dyn Read + Send>>,
    line: u64,
    bytes_read: u64,
    buffer: Vec<u8>,
}

impl NdjsonSource {
    fn new(reader: Box<dyn Read + Send>) -> Self {
        NdjsonSource {
            reader: BufReader::with_capacity(256 * 1024, reader),
            line: 0,
            bytes_read: 0,
            buffer: Vec::new(),
        }
    }
}

impl RecordSource for NdjsonSource {
    fn next_record(&mut self) -> anyhow::Result<Option<SourceRecord>> {
        loop {
            self.buffer.clear();
            let (consumed, overflowed) = read_bounded_line(&mut self.reader, &mut self.buffer, MAX_LINE_BYTES + 2)
                .context("cannot read the input")?;
            if consumed == 0 {
                return Ok(None);
            }
            self.line += 1;
            self.bytes_read += consumed;
            while self.buffer.last().is_some_and(|byte| *byte == b'\n' || *byte == b'\r') {
                self.buffer.pop();
            }
            if self.line == 1 && self.buffer.starts_with(b"\xEF\xBB\xBF") {
                self.buffer.drain(..3);
            }
            let (line, bytes_read) = (self.line, self.bytes_read);
            if overflowed || self.buffer.len() > MAX_LINE_BYTES {
                let refusal = Refusal::new(
                    ErrorCode::PayloadTooLarge,
                    "",
                    format!("the line is longer than {MAX_LINE_BYTES} bytes"),
                );
                let text = String::from_utf8_lossy(&self.buffer).into_owned();
                return Ok(Some(SourceRecord { line, bytes_read, body: RecordBody::Refused { refusal, text } }));
            }
            if self.buffer.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let body = match String::from_utf8(std::mem::take(&mut self.buffer)) {
                Ok(text) => RecordBody::Json(text),
                Err(error) => {
                    let refusal = Refusal::new(
                        ErrorCode::MalformedJson,
                        "",
                        format!("the line is not valid UTF-8 (at byte {})", error.utf8_error().valid_up_to() + 1),
                    );
                    RecordBody::Refused { refusal, text: String::from_utf8_lossy(error.as_bytes()).into_owned() }
                }
            };
            return Ok(Some(SourceRecord { line, bytes_read, body }));
        }
    }
}

/// Reads up to and including the next newline, keeping at most `max_kept` bytes of it in
/// `buffer` (the rest is read and dropped). Answers the bytes consumed and whether any were dropped.
fn read_bounded_line(reader: &mut impl BufRead, buffer: &mut Vec<u8>, max_kept: usize) -> std::io::Result<(u64, bool)> {
    let mut consumed = 0u64;
    let mut overflowed = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if available.is_empty() {
            return Ok((consumed, overflowed));
        }
        let (chunk_length, line_ends) = match available.iter().position(|byte| *byte == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (available.len(), false),
        };
        let room = max_kept.saturating_sub(buffer.len());
        if chunk_length > room {
            buffer.extend_from_slice(&available[..room]);
            overflowed = true;
        } else {
            buffer.extend_from_slice(&available[..chunk_length]);
        }
        reader.consume(chunk_length);
        consumed += chunk_length as u64;
        if line_ends {
            return Ok((consumed, overflowed));
        }
    }
}

/// What one CSV column holds.
#[derive(Debug, Clone, PartialEq)]
enum ColumnTarget {
    UserId,
    AnonymousId,
    Timestamp,
    MessageId,
    Trait(String),
    Skip,
}

impl ColumnTarget {
    fn parse_field(field: &str) -> anyhow::Result<Self> {
        Ok(match field {
            "" | "-" => ColumnTarget::Skip,
            "user_id" | "distinct_id" => ColumnTarget::UserId,
            "anonymous_id" => ColumnTarget::AnonymousId,
            "timestamp" => ColumnTarget::Timestamp,
            "message_id" => ColumnTarget::MessageId,
            other => match other.strip_prefix("traits.") {
                Some(name) if !name.is_empty() => ColumnTarget::Trait(name.to_owned()),
                _ => anyhow::bail!(
                    "--map field `{other}` is not one of user_id, anonymous_id, timestamp, message_id, traits.NAME, or empty"
                ),
            },
        })
    }

    fn for_header(name: &str) -> Self {
        match name {
            "user_id" => ColumnTarget::UserId,
            "anonymous_id" => ColumnTarget::AnonymousId,
            "timestamp" => ColumnTarget::Timestamp,
            "message_id" => ColumnTarget::MessageId,
            other => ColumnTarget::Trait(other.to_owned()),
        }
    }
}

/// Each column's target: `--map` first, then the column's name.
fn column_targets(headers: &[String], mappings: &[String]) -> anyhow::Result<Vec<ColumnTarget>> {
    let mut mapped: BTreeMap<&str, ColumnTarget> = BTreeMap::new();
    for mapping in mappings {
        let Some((column, field)) = mapping.split_once('=') else {
            anyhow::bail!("--map takes COLUMN=FIELD, not `{mapping}`");
        };
        anyhow::ensure!(
            headers.iter().any(|header| header == column),
            "--map names the column `{column}`, which the header row does not have"
        );
        mapped.insert(column, ColumnTarget::parse_field(field)?);
    }
    headers
        .iter()
        .enumerate()
        .map(|(index, header)| match mapped.get(header.as_str()) {
            Some(target) => Ok(target.clone()),
            None if header.is_empty() => {
                anyhow::bail!("column {} of the header row has no name; name it or --map it", index + 1)
            }
            None => Ok(ColumnTarget::for_header(header)),
        })
        .collect()
}

struct CsvSource {
    reader: csv::Reader<Box<dyn Read + Send>>,
    headers: Vec<String>,
    columns: Vec<ColumnTarget>,
    record: csv::ByteRecord,
}

impl CsvSource {
    fn new(reader: Box<dyn Read + Send>, mappings: &[String]) -> anyhow::Result<Self> {
        let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(reader);
        let header_record = reader.byte_headers().context("cannot read the CSV header row")?.clone();
        let mut headers = Vec::with_capacity(header_record.len());
        for (index, header) in header_record.iter().enumerate() {
            let header = std::str::from_utf8(header)
                .with_context(|| format!("column {} of the CSV header row is not valid UTF-8", index + 1))?;
            // A byte-order mark written by spreadsheet programs is not part of the first name.
            let header = if index == 0 { header.trim_start_matches('\u{feff}') } else { header };
            headers.push(header.trim().to_owned());
        }
        anyhow::ensure!(!headers.is_empty(), "the CSV input has no header row");
        let columns = column_targets(&headers, mappings)?;
        Ok(CsvSource { reader, headers, columns, record: csv::ByteRecord::new() })
    }

    /// The row as CSV text, for the rejects file.
    fn row_text(&self) -> String {
        let mut writer = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
        let _ = writer.write_byte_record(&self.record);
        let bytes = writer.into_inner().unwrap_or_default();
        String::from_utf8_lossy(&bytes).trim_end_matches('\n').to_owned()
    }

    fn row_identify(&self) -> Result<Map<String, Value>, Refusal> {
        let mut identify = Map::new();
        let mut traits = Map::new();
        for (index, cell) in self.record.iter().enumerate() {
            if cell.is_empty() {
                continue;
            }
            let column = &self.headers[index];
            let text = std::str::from_utf8(cell).map_err(|error| {
                Refusal::new(
                    ErrorCode::MalformedJson,
                    column.clone(),
                    format!("the cell is not valid UTF-8 (at byte {})", error.valid_up_to() + 1),
                )
            })?;
            let field = match &self.columns[index] {
                ColumnTarget::Skip => continue,
                ColumnTarget::UserId => "user_id",
                ColumnTarget::AnonymousId => "anonymous_id",
                ColumnTarget::Timestamp => "timestamp",
                ColumnTarget::MessageId => "message_id",
                ColumnTarget::Trait(name) => {
                    traits.insert(name.clone(), typed_cell(text));
                    continue;
                }
            };
            identify.insert(field.to_owned(), Value::String(text.to_owned()));
        }
        if !traits.is_empty() {
            identify.insert("traits".to_owned(), Value::Object(traits));
        }
        Ok(identify)
    }
}

impl RecordSource for CsvSource {
    fn next_record(&mut self) -> anyhow::Result<Option<SourceRecord>> {
        let outcome = self.reader.read_byte_record(&mut self.record);
        let bytes_read = self.reader.position().byte();
        let line = self.record.position().map_or(self.reader.position().line(), csv::Position::line);
        let refused = |refusal: Refusal, text: String| {
            Ok(Some(SourceRecord { line, bytes_read, body: RecordBody::Refused { refusal, text } }))
        };
        match outcome {
            Ok(false) => return Ok(None),
            Ok(true) => {}
            Err(error) => {
                return match error.kind() {
                    csv::ErrorKind::Io(_) => Err(anyhow::Error::new(error).context("cannot read the input")),
                    csv::ErrorKind::UnequalLengths { expected_len, len, .. } => refused(
                        Refusal::new(
                            ErrorCode::InvalidType,
                            "",
                            format!("the row has {len} fields; the header row has {expected_len}"),
                        ),
                        self.row_text(),
                    ),
                    _ => refused(Refusal::new(ErrorCode::MalformedJson, "", error.to_string()), self.row_text()),
                };
            }
        }
        let text = self.row_text();
        if self.record.as_slice().len() > MAX_LINE_BYTES {
            return refused(
                Refusal::new(ErrorCode::PayloadTooLarge, "", format!("the row is longer than {MAX_LINE_BYTES} bytes")),
                text,
            );
        }
        let body = match self.row_identify() {
            Ok(object) => {
                let mut content = Vec::with_capacity(self.record.as_slice().len() + self.record.len());
                for cell in &self.record {
                    content.extend_from_slice(cell);
                    content.push(0x1f);
                }
                RecordBody::Identify { object, content, text }
            }
            Err(refusal) => RecordBody::Refused { refusal, text },
        };
        Ok(Some(SourceRecord { line, bytes_read, body }))
    }
}

/// A CSV cell's value: `true`/`false` are booleans, a JSON number written as JSON writes it is a
/// number (so `007`, `+1`, `1e3` and 20-digit ids stay strings), a JSON object or array is that
/// value (what `roster export --format csv` writes for nested traits), anything else a string.
fn typed_cell(text: &str) -> Value {
    match text {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        _ => {}
    }
    let first = text.as_bytes().first().copied().unwrap_or_default();
    if (first == b'-' || first.is_ascii_digit())
        && let Ok(Value::Number(number)) = serde_json::from_str::<Value>(text)
        && number.to_string() == text
    {
        return Value::Number(number);
    }
    if (first == b'{' || first == b'[')
        && let Ok(value @ (Value::Object(_) | Value::Array(_))) = serde_json::from_str::<Value>(text)
    {
        return value;
    }
    Value::String(text.to_owned())
}

/// A JSON array read whole (use NDJSON for files larger than memory), element by element.
struct JsonArraySource {
    text: String,
    /// Byte ranges of the elements in `text`.
    elements: std::vec::IntoIter<(usize, usize)>,
    /// Line of `scanned_to`.
    line: u64,
    scanned_to: usize,
}

impl JsonArraySource {
    fn new(mut reader: Box<dyn Read + Send>) -> anyhow::Result<Self> {
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).context("cannot read the input")?;
        let text = String::from_utf8(bytes).context("the JSON input is not valid UTF-8")?;
        let base = text.as_ptr() as usize;
        let elements: Vec<&serde_json::value::RawValue> =
            serde_json::from_str(text.trim_start_matches('\u{feff}')).context("the input is not a JSON array")?;
        let ranges: Vec<(usize, usize)> =
            elements.iter().map(|element| (element.get().as_ptr() as usize - base, element.get().len())).collect();
        Ok(JsonArraySource { elements: ranges.into_iter(), text, line: 1, scanned_to: 0 })
    }
}

impl RecordSource for JsonArraySource {
    fn next_record(&mut self) -> anyhow::Result<Option<SourceRecord>> {
        let Some((start, length)) = self.elements.next() else { return Ok(None) };
        self.line += self.text.as_bytes()[self.scanned_to..start].iter().filter(|byte| **byte == b'\n').count() as u64;
        self.scanned_to = start;
        let element = &self.text[start..start + length];
        let body = if length > MAX_LINE_BYTES {
            let refusal = Refusal::new(
                ErrorCode::PayloadTooLarge,
                "",
                format!("the element is longer than {MAX_LINE_BYTES} bytes"),
            );
            RecordBody::Refused { refusal, text: excerpt(element) }
        } else {
            RecordBody::Json(element.to_owned())
        };
        Ok(Some(SourceRecord { line: self.line, bytes_read: (start + length) as u64, body }))
    }
}

// ---------------------------------------------------------------------------------------------
// Preparing: one record becomes one or more native items

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Identify,
    Track,
    Alias,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Identify => "/identify",
            Kind::Track => "/track",
            Kind::Alias => "/alias",
        }
    }
}

enum ParsedInput {
    Identify(IdentifyInput),
    Track(TrackInput),
    Alias(AliasInput),
}

struct PreparedItem {
    kind: Kind,
    /// The item as posted to a server.
    json: String,
    /// The item as handed to the engine.
    input: ParsedInput,
}

/// The items of one record, each already parsed as the native endpoints parse it.
fn prepare(line: u64, body: &RecordBody) -> Result<Vec<PreparedItem>, Refusal> {
    match body {
        RecordBody::Refused { refusal, .. } => Err(refusal.clone()),
        RecordBody::Identify { object, content, .. } => {
            let mut object = object.clone();
            add_derived_message_id(&mut object, line, content, None);
            Ok(vec![finish_item(Kind::Identify, object)?])
        }
        RecordBody::Json(text) => {
            let value: Value = serde_json::from_str(text).map_err(|error| {
                let message = error.to_string();
                Refusal::new(ErrorCode::MalformedJson, "", format!("not valid JSON: {message}"))
            })?;
            let Value::Object(mut object) = value else {
                return Err(Refusal::new(ErrorCode::InvalidType, "", "each line must be a JSON object"));
            };
            let kind = match object.remove("type") {
                Some(Value::String(kind)) => match kind.as_str() {
                    "identify" => MessageType::Identify,
                    "track" => MessageType::Track,
                    "alias" => MessageType::Alias,
                    "profile" => MessageType::Profile,
                    other => {
                        return Err(Refusal::new(
                            ErrorCode::InvalidType,
                            "type",
                            format!("`{other}` is not a message type; use identify, track, alias or profile"),
                        ));
                    }
                },
                Some(Value::Null) | None => MessageType::from_fields(&object),
                Some(_) => return Err(Refusal::new(ErrorCode::InvalidType, "type", "`type` must be a string")),
            };
            let kind = match kind {
                MessageType::Identify => Kind::Identify,
                MessageType::Track => Kind::Track,
                MessageType::Alias => Kind::Alias,
                MessageType::Profile => {
                    return profile_identifies(&object)?
                        .into_iter()
                        .enumerate()
                        .map(|(part, mut identify)| {
                            add_derived_message_id(&mut identify, line, text.as_bytes(), Some(part));
                            finish_item(Kind::Identify, identify)
                        })
                        .collect();
                }
            };
            add_derived_message_id(&mut object, line, text.as_bytes(), None);
            Ok(vec![finish_item(kind, object)?])
        }
    }
}

enum MessageType {
    Identify,
    Track,
    Alias,
    /// A profile as `roster export` writes it (and `GET /v1/profiles` answers).
    Profile,
}

impl MessageType {
    /// The type of a message that does not say: `event` → track, `previous_id` → alias, a
    /// profile's fields → profile, anything else identify.
    fn from_fields(object: &Map<String, Value>) -> Self {
        if object.contains_key("event") {
            MessageType::Track
        } else if object.contains_key("previous_id") {
            MessageType::Alias
        } else if object.contains_key("anonymous_ids") || object.contains_key("profile_id") {
            MessageType::Profile
        } else {
            MessageType::Identify
        }
    }
}

fn finish_item(kind: Kind, object: Map<String, Value>) -> Result<PreparedItem, Refusal> {
    let json = Value::Object(object).to_string();
    let input = match kind {
        Kind::Identify => ParsedInput::Identify(roster_server::parse_identify_item(&json)?),
        Kind::Track => ParsedInput::Track(roster_server::parse_track_item(&json)?),
        Kind::Alias => ParsedInput::Alias(roster_server::parse_alias_item(&json)?),
    };
    Ok(PreparedItem { kind, json, input })
}

/// Gives an item without a message id one that the same line of the same file always gets:
/// `import:<line>:<first 128 bits of the SHA-256 of the line, hex>` (`:<n>` for the n-th item of
/// a profile line). Re-running an import then sends the same ids, and the engine applies each
/// once within its dedup window.
fn add_derived_message_id(object: &mut Map<String, Value>, line: u64, content: &[u8], part: Option<usize>) {
    if object.get("message_id").is_some_and(|id| !id.is_null()) {
        return;
    }
    let digest = Sha256::digest(content);
    let mut id = format!("import:{line}:");
    for byte in &digest[..16] {
        id.push_str(&format!("{byte:02x}"));
    }
    if let Some(part) = part {
        id.push_str(&format!(":{part}"));
    }
    object.insert("message_id".to_owned(), Value::String(id));
}

/// The identifies that rebuild an exported profile: its traits grouped by the time each was
/// written (so every trait keeps its timestamp), the first carrying the first anonymous id, then
/// one per further anonymous id linking it to the user id.
fn profile_identifies(profile: &Map<String, Value>) -> Result<Vec<Map<String, Value>>, Refusal> {
    let user_id = match profile.get("user_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(user_id)) => Some(user_id.clone()),
        Some(_) => return Err(Refusal::new(ErrorCode::InvalidType, "user_id", "`user_id` must be a string")),
    };
    let anonymous_ids: Vec<String> = match profile.get("anonymous_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .enumerate()
            .map(|(index, id)| {
                id.as_str().map(str::to_owned).ok_or_else(|| {
                    Refusal::new(ErrorCode::InvalidType, format!("anonymous_ids[{index}]"), "must be a string")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(Refusal::new(ErrorCode::InvalidType, "anonymous_ids", "`anonymous_ids` must be an array"));
        }
    };
    let empty = Map::new();
    let traits = match profile.get("traits") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(traits)) => traits,
        Some(_) => return Err(Refusal::new(ErrorCode::InvalidType, "traits", "`traits` must be an object")),
    };
    let timestamps = match profile.get("trait_timestamps") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(timestamps)) => timestamps,
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidType,
                "trait_timestamps",
                "`trait_timestamps` must be an object",
            ));
        }
    };
    if user_id.is_none() && anonymous_ids.is_empty() {
        return Err(Refusal::new(ErrorCode::MissingIdentifier, "", "a profile needs `user_id` or `anonymous_ids`"));
    }
    if user_id.is_none() && anonymous_ids.len() > 1 {
        return Err(Refusal::new(
            ErrorCode::MissingIdentifier,
            "user_id",
            "a profile without `user_id` can bring one anonymous id; nothing would link the others",
        ));
    }
    // Untimed traits (none in an export) last, written at import time.
    let mut groups: BTreeMap<(bool, String), Map<String, Value>> = BTreeMap::new();
    for (key, value) in traits {
        let written_at = timestamps.get(key).and_then(Value::as_str);
        groups
            .entry((written_at.is_none(), written_at.unwrap_or_default().to_owned()))
            .or_default()
            .insert(key.clone(), value.clone());
    }
    if groups.is_empty() {
        groups.insert((true, String::new()), Map::new());
    }
    let mut identifies = Vec::with_capacity(groups.len() + anonymous_ids.len());
    for (index, ((untimed, written_at), traits)) in groups.into_iter().enumerate() {
        let mut identify = Map::new();
        if let Some(user_id) = &user_id {
            identify.insert("user_id".to_owned(), json!(user_id));
        }
        if (index == 0 || user_id.is_none())
            && let Some(first) = anonymous_ids.first()
        {
            identify.insert("anonymous_id".to_owned(), json!(first));
        }
        if !traits.is_empty() {
            identify.insert("traits".to_owned(), Value::Object(traits));
        }
        if !untimed {
            identify.insert("timestamp".to_owned(), json!(written_at));
        }
        identifies.push(identify);
    }
    for anonymous_id in anonymous_ids.iter().skip(1) {
        identifies.push(Map::from_iter([
            ("user_id".to_owned(), json!(user_id)),
            ("anonymous_id".to_owned(), json!(anonymous_id)),
        ]));
    }
    Ok(identifies)
}

// ---------------------------------------------------------------------------------------------
// Applying

/// Whether an item was a duplicate (applied before), or why it was refused.
type ItemResult = Result<bool, Refusal>;

enum Destination {
    /// Through the engine, on the data directory or `--store`.
    Local { engine: Arc<Engine>, principal: Principal },
    /// A running server's native endpoints.
    Remote { client: reqwest::Client, base_url: String, key: String },
}

impl Destination {
    async fn open(args: &ImportArgs) -> anyhow::Result<Self> {
        if let Some(url) = &args.target.url {
            let key = args.target.remote_key("client or server key")?;
            let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
            let base_url = url.trim_end_matches('/').to_owned();
            // Fail early, before anything is read, when the server cannot be reached.
            client
                .get(format!("{base_url}/healthz"))
                .send()
                .await
                .with_context(|| format!("cannot reach {base_url}"))?;
            return Ok(Destination::Remote { client, base_url, key });
        }
        let config = EngineConfig {
            limits: args.limits.limits(),
            dedup_window: Duration::from_secs(args.dedup_window_hours * 3600),
            ..EngineConfig::default()
        };
        let (engine, principal) = args.target.open_locally(config).await?;
        Ok(Destination::Local { engine, principal })
    }

    /// Applies one batch of items of one kind; one result per item, in order. Errors are fatal.
    async fn apply(&self, kind: Kind, items: Vec<PreparedItem>) -> anyhow::Result<Vec<ItemResult>> {
        match self {
            Destination::Local { engine, principal } => apply_locally(engine, principal, kind, items).await,
            Destination::Remote { client, base_url, key } => {
                let bodies: Vec<String> = items.into_iter().map(|item| item.json).collect();
                post_batch(client, base_url, key, kind, &bodies).await
            }
        }
    }
}

async fn apply_locally(
    engine: &Engine,
    principal: &Principal,
    kind: Kind,
    items: Vec<PreparedItem>,
) -> anyhow::Result<Vec<ItemResult>> {
    let engine_failed = |error: roster_engine::EngineError| anyhow::anyhow!("the store refused a batch: {error}");
    let mixed = || Refusal::new(ErrorCode::Internal, "", "an item of another type was batched with these");
    let results: Vec<ItemResult> = match kind {
        Kind::Identify => {
            let inputs = items
                .into_iter()
                .map(|item| match item.input {
                    ParsedInput::Identify(input) => Ok(input),
                    _ => Err(FieldError::new(ErrorCode::Internal, "", mixed().message)),
                })
                .collect();
            let outcomes = engine.identify(principal, inputs).await.map_err(engine_failed)?;
            outcomes
                .into_iter()
                .map(|outcome| outcome.map(|applied| applied.duplicate).map_err(Refusal::from))
                .collect()
        }
        Kind::Alias => {
            let inputs = items
                .into_iter()
                .map(|item| match item.input {
                    ParsedInput::Alias(input) => Ok(input),
                    _ => Err(FieldError::new(ErrorCode::Internal, "", mixed().message)),
                })
                .collect();
            let outcomes = engine.alias(principal, inputs).await.map_err(engine_failed)?;
            outcomes
                .into_iter()
                .map(|outcome| outcome.map(|applied| applied.duplicate).map_err(Refusal::from))
                .collect()
        }
        Kind::Track => {
            let inputs = items
                .into_iter()
                .map(|item| match item.input {
                    ParsedInput::Track(input) => Ok(input),
                    _ => Err(FieldError::new(ErrorCode::Internal, "", mixed().message)),
                })
                .collect();
            let outcomes = engine.track(principal, inputs).await.map_err(engine_failed)?;
            outcomes
                .into_iter()
                .map(|outcome| outcome.map(|applied| applied.duplicate).map_err(Refusal::from))
                .collect()
        }
    };
    Ok(results)
}

/// Posts items as one native batch and reads each item's result. The server lists every accepted
/// item but only the first 50 refused ones, so unlisted refusals are posted again (refused items
/// changed nothing) until each has its error.
async fn post_batch(
    client: &reqwest::Client,
    base_url: &str,
    key: &str,
    kind: Kind,
    bodies: &[String],
) -> anyhow::Result<Vec<ItemResult>> {
    let mut results: Vec<Option<ItemResult>> = vec![None; bodies.len()];
    let mut unresolved: Vec<usize> = (0..bodies.len()).collect();
    while !unresolved.is_empty() {
        let body =
            format!("[{}]", unresolved.iter().map(|index| bodies[*index].as_str()).collect::<Vec<_>>().join(","));
        let answer = post_with_retries(client, base_url, key, kind, body).await?;
        let Some(listed) = answer["results"].as_array() else {
            anyhow::bail!(
                "the server refused a whole batch: {} ({})",
                answer["message"].as_str().unwrap_or("no reason given"),
                answer["code"].as_str().unwrap_or("")
            );
        };
        let mut resolved_now = 0;
        for entry in listed {
            let Some(position) = entry["index"].as_u64().and_then(|index| usize::try_from(index).ok()) else {
                continue;
            };
            let Some(original) = unresolved.get(position).copied() else { continue };
            let result = if entry["status"] == "accepted" {
                Ok(entry["duplicate"].as_bool().unwrap_or(false))
            } else {
                Err(remote_refusal(&entry["error"], position))
            };
            if results[original].replace(result).is_none() {
                resolved_now += 1;
            }
        }
        unresolved.retain(|index| results[*index].is_none());
        if resolved_now == 0 {
            for index in unresolved.drain(..) {
                results[index] =
                    Some(Err(Refusal::new(ErrorCode::Internal, "", "the server gave no result for this item")));
            }
        }
    }
    Ok(results.into_iter().map(|result| result.unwrap_or(Ok(false))).collect())
}

/// An item's error from a batch answer, its path relative to the item (without `[index]`).
fn remote_refusal(error: &Value, position: usize) -> Refusal {
    let path = error["path"].as_str().unwrap_or_default();
    let prefix = format!("[{position}]");
    let path = path.strip_prefix(&prefix).map_or(path, |rest| rest.trim_start_matches('.'));
    Refusal {
        code: error["code"].as_str().unwrap_or("rejected").to_owned(),
        path: path.to_owned(),
        message: error["message"].as_str().unwrap_or("refused by the server").to_owned(),
    }
}

/// One POST, retried with backoff while the server is unreachable, overloaded or failing (safe:
/// every item carries a message id). Answers the batch answer of a 200 or 400.
async fn post_with_retries(
    client: &reqwest::Client,
    base_url: &str,
    key: &str,
    kind: Kind,
    body: String,
) -> anyhow::Result<Value> {
    let url = format!("{base_url}{}", kind.endpoint());
    let mut attempt = 0;
    loop {
        attempt += 1;
        let backoff = Duration::from_millis(250 * 2u64.pow(attempt.min(6)));
        let sent = client
            .post(&url)
            .header("X-API-Key", key)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) if attempt < MAX_REMOTE_ATTEMPTS => {
                tracing::warn!(%error, attempt, "posting a batch failed; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
            Err(error) => return Err(anyhow::Error::new(error).context(format!("cannot reach {base_url}"))),
        };
        let status = response.status();
        let retryable = status.as_u16() == 429 || status.is_server_error();
        if retryable && attempt < MAX_REMOTE_ATTEMPTS {
            tracing::warn!(%status, attempt, "the server could not take a batch; retrying");
            tokio::time::sleep(backoff).await;
            continue;
        }
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() || status.as_u16() == 400 {
            return Ok(answer);
        }
        let hint = match answer["code"].as_str() {
            Some("too_many_items") => " (lower --batch-size to the server's --max-batch-items)",
            Some("payload_too_large") => " (lower --batch-size)",
            Some("invalid_api_key" | "missing_api_key" | "forbidden") => {
                " (--key takes the environment's client or server key)"
            }
            _ => "",
        };
        anyhow::bail!(
            "{url} answered {status}: {} ({}){hint}",
            answer["message"].as_str().unwrap_or("no reason given"),
            answer["code"].as_str().unwrap_or("")
        );
    }
}

/// One line of the rejects file.
#[derive(serde::Serialize)]
struct RejectedLine<'a> {
    line: u64,
    error: &'a Refusal,
    /// The line as read, cut to `MAX_REJECTED_INPUT_BYTES`.
    input: &'a str,
}

/// A record waiting for its items' results.
struct PendingRecord {
    line: u64,
    text: String,
    items_left: usize,
    items_total: usize,
    duplicate_items: usize,
    refusal: Option<Refusal>,
}

struct PendingBatch {
    kind: Kind,
    items: Vec<PreparedItem>,
    /// For each item, the id of its record.
    record_ids: Vec<u64>,
    bytes: usize,
}

/// The state of one import: the batch being filled, the records waiting for results (in input
/// order, so the rejects file and the counts follow the input), and the counts.
struct ImportRun {
    destination: Destination,
    batch_size: usize,
    rejects: BufWriter<File>,
    pending: VecDeque<PendingRecord>,
    /// Id of `pending[0]`; records are numbered in input order.
    first_pending_id: u64,
    batch: Option<PendingBatch>,
    counts: Counts,
}

impl ImportRun {
    fn new(destination: Destination, batch_size: usize, rejects: BufWriter<File>) -> Self {
        ImportRun {
            destination,
            batch_size,
            rejects,
            pending: VecDeque::new(),
            first_pending_id: 0,
            batch: None,
            counts: Counts::default(),
        }
    }

    /// Takes one record; answers whether a batch was applied.
    async fn add(&mut self, record: PreparedRecord) -> anyhow::Result<bool> {
        self.counts.read += 1;
        let record_id = self.first_pending_id + self.pending.len() as u64;
        let mut pending = PendingRecord {
            line: record.line,
            text: record.text,
            items_left: 0,
            items_total: 0,
            duplicate_items: 0,
            refusal: None,
        };
        let items = match record.items {
            Ok(items) => items,
            Err(refusal) => {
                pending.refusal = Some(refusal);
                self.pending.push_back(pending);
                self.settle()?;
                return Ok(false);
            }
        };
        pending.items_left = items.len();
        pending.items_total = items.len();
        self.pending.push_back(pending);
        let mut flushed = false;
        for item in items {
            let fits = self.batch.as_ref().is_none_or(|batch| {
                batch.kind == item.kind
                    && batch.items.len() < self.batch_size
                    && batch.bytes + item.json.len() <= MAX_REMOTE_BATCH_BYTES
            });
            if !fits {
                self.flush().await?;
                flushed = true;
            }
            let batch = self.batch.get_or_insert_with(|| PendingBatch {
                kind: item.kind,
                items: Vec::new(),
                record_ids: Vec::new(),
                bytes: 0,
            });
            batch.bytes += item.json.len() + 1;
            batch.items.push(item);
            batch.record_ids.push(record_id);
        }
        if self.batch.as_ref().is_some_and(|batch| batch.items.len() >= self.batch_size) {
            self.flush().await?;
            flushed = true;
        }
        Ok(flushed)
    }

    /// Applies the batch being filled, if any.
    async fn flush(&mut self) -> anyhow::Result<()> {
        let Some(batch) = self.batch.take() else { return Ok(()) };
        let results = self.destination.apply(batch.kind, batch.items).await?;
        anyhow::ensure!(
            results.len() == batch.record_ids.len(),
            "a batch answered {} results for {} items",
            results.len(),
            batch.record_ids.len()
        );
        for (record_id, result) in batch.record_ids.into_iter().zip(results) {
            let Some(record) = self.pending.get_mut((record_id - self.first_pending_id) as usize) else { continue };
            record.items_left -= 1;
            match result {
                Ok(true) => record.duplicate_items += 1,
                Ok(false) => {}
                Err(refusal) => {
                    record.refusal.get_or_insert(refusal);
                }
            }
        }
        self.settle()
    }

    /// Counts (and writes out the refusals of) the records at the front whose items all have results.
    fn settle(&mut self) -> anyhow::Result<()> {
        while self.pending.front().is_some_and(|record| record.items_left == 0) {
            let Some(record) = self.pending.pop_front() else { break };
            self.first_pending_id += 1;
            match record.refusal {
                Some(refusal) => {
                    self.counts.refused += 1;
                    let rejected = RejectedLine { line: record.line, error: &refusal, input: &record.text };
                    let rejected = serde_json::to_string(&rejected).context("cannot write the rejects file")?;
                    writeln!(self.rejects, "{rejected}").context("cannot write the rejects file")?;
                }
                None if record.items_total > 0 && record.duplicate_items == record.items_total => {
                    self.counts.duplicates += 1;
                }
                None => self.counts.applied += 1,
            }
        }
        Ok(())
    }
}

/// At most `MAX_REJECTED_INPUT_BYTES` of `text`, cut on a character boundary and marked with `…`.
fn excerpt(text: &str) -> String {
    if text.len() <= MAX_REJECTED_INPUT_BYTES {
        return text.to_owned();
    }
    format!("{}…", roster_core::limits::prefix_within(text, MAX_REJECTED_INPUT_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_typed_only_when_nothing_is_lost() {
        assert_eq!(typed_cell("42"), json!(42));
        assert_eq!(typed_cell("-1.5"), json!(-1.5));
        assert_eq!(typed_cell("true"), json!(true));
        assert_eq!(typed_cell("007"), json!("007"));
        assert_eq!(typed_cell("+44 20"), json!("+44 20"));
        assert_eq!(typed_cell("1e3"), json!("1e3"));
        assert_eq!(typed_cell("12345678901234567890123"), json!("12345678901234567890123"));
        assert_eq!(typed_cell("[1,2]"), json!([1, 2]));
        assert_eq!(typed_cell("[draft] notes"), json!("[draft] notes"));
        assert_eq!(typed_cell("True"), json!("True"));
    }

    #[test]
    fn long_lines_are_cut_without_reading_them_into_memory() {
        let input = format!("{}\nnext\n", "x".repeat(100));
        let mut reader = std::io::Cursor::new(input.into_bytes());
        let mut buffer = Vec::new();
        let (consumed, overflowed) = read_bounded_line(&mut reader, &mut buffer, 10).unwrap();
        assert_eq!((consumed, overflowed, buffer.len()), (101, true, 10));
        buffer.clear();
        assert_eq!(read_bounded_line(&mut reader, &mut buffer, 10).unwrap(), (5, false));
        assert_eq!(buffer, b"next\n");
    }

    #[test]
    fn a_profile_becomes_identifies_that_keep_each_trait_timestamp() {
        let profile = json!({
            "user_id": "u1", "anonymous_ids": ["a1", "a2"],
            "traits": {"plan": "pro", "age": 30},
            "trait_timestamps": {"plan": "2026-01-02T00:00:00.000Z", "age": "2026-01-01T00:00:00.000Z"}
        });
        let identifies = profile_identifies(profile.as_object().unwrap()).unwrap();
        assert_eq!(
            Value::Array(identifies.into_iter().map(Value::Object).collect()),
            json!([
                {"user_id": "u1", "anonymous_id": "a1", "traits": {"age": 30}, "timestamp": "2026-01-01T00:00:00.000Z"},
                {"user_id": "u1", "traits": {"plan": "pro"}, "timestamp": "2026-01-02T00:00:00.000Z"},
                {"user_id": "u1", "anonymous_id": "a2"}
            ])
        );
    }
}
