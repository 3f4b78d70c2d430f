//! The `folder` device: an instrument that writes result files into a directory (HPLC,
//! plate readers, potentiostat software, data loggers).
//!
//! The directory is watched with inotify, and rescanned every `scan_interval` in case an
//! event was missed (or inotify is not available). Files whose name matches `pattern`
//! are read by a file profile ([`format::FileProfile`]):
//! - `readings`: each complete row (ending in a newline) becomes readings as soon as it
//!   is written, so a growing log is followed; the last row without a newline is read
//!   once the file is finished;
//! - `echem`: once the file is finished, its rows become `echem_data` between an
//!   `experiment_started` and an `experiment_completed`.
//!
//! A file is finished when its size has not changed for `settle`, or at once when it was
//! renamed into place (written elsewhere, then moved in: inotify's `IN_MOVED_TO`).
//!
//! How far each file has been read is a position stored in the buffer's own store, in
//! the same atomic batch as the records read up to it (`Ingest::send_with_cursor`): after
//! a restart, a crash or a power cut the device resumes exactly there, neither sending a
//! row again nor skipping one. A file replaced under the same name (another inode) or cut
//! shorter is read again from its start. Files that do not parse are moved to
//! `rejected_dir` (or left, with `on_error = "leave"`), counted and reported by a
//! `file_rejected` event; imported files are left alone unless `after_import = "move"`.
//! The device never writes into a file.

/// File profiles and row parsing.
pub mod format;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::devices::{CommandKind, DeviceCtx, DeviceError};
use crate::ingest::Receipt;
use crate::record::{object, Body, Draft, Point};
use format::{FileProfile, Kind};

/// Bytes read from a file at a time.
const READ_CHUNK: usize = 256 * 1024;
/// A row longer than this is not a row (a binary file, a missing newline).
const MAX_ROW: usize = 64 * 1024;

/// What happens to a file that does not parse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Move it to `rejected_dir`.
    #[default]
    Move,
    /// Leave it where it is (it is not read again unless its size changes).
    Leave,
}

/// What happens to a file once all of it is durable in the buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterImport {
    /// Leave it (the original files are never modified).
    #[default]
    Leave,
    /// Move it to `imported_dir`.
    Move,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A `folder` device: a directory an instrument writes result files into.
pub struct Config {
    /// The device id records and commands carry.
    pub id: String,
    /// The directory to watch.
    pub path: PathBuf,
    /// File names to read (`*` and `?`), e.g. `*.csv`.
    #[serde(default = "d_pattern")]
    pub pattern: String,
    /// A file profile name in `profiles_dir` (`folder-csv-readings`) or a path to one.
    pub profile: String,
    #[serde(default = "d_profiles_dir")]
    /// Where profile names are looked up.
    pub profiles_dir: PathBuf,
    /// A file whose size has not changed for this long is finished.
    #[serde(default = "d_settle", with = "crate::time::serde_duration")]
    pub settle: Duration,
    /// Rescan the directory this often besides inotify's events.
    #[serde(default = "d_scan", with = "crate::time::serde_duration")]
    pub scan_interval: Duration,
    /// What to do with a file that does not parse.
    #[serde(default)]
    pub on_error: OnError,
    /// Where rejected files go (default `<path>/rejected`).
    #[serde(default)]
    pub rejected_dir: Option<PathBuf>,
    /// What to do with a file once imported.
    #[serde(default)]
    pub after_import: AfterImport,
    /// Where imported files go with `after_import = "move"` (default `<path>/imported`).
    #[serde(default)]
    pub imported_dir: Option<PathBuf>,
    /// `echem` files: points per `echem_data` message.
    #[serde(default = "d_points")]
    pub points_per_message: usize,
    #[serde(default)]
    /// Where the instrument stands, copied into each reading.
    pub location: Option<String>,
}

fn d_pattern() -> String {
    "*".into()
}
fn d_profiles_dir() -> PathBuf {
    PathBuf::from("devices/profiles")
}
fn d_settle() -> Duration {
    Duration::from_secs(2)
}
fn d_scan() -> Duration {
    Duration::from_secs(1)
}
fn d_points() -> usize {
    100
}

impl Config {
    fn load_profile(&self) -> Result<FileProfile, String> {
        let path = crate::devices::profile_path(&self.profile, &self.profiles_dir);
        FileProfile::load(&path)
    }

    fn rejected_dir(&self) -> PathBuf {
        self.rejected_dir
            .clone()
            .unwrap_or_else(|| self.path.join("rejected"))
    }

    fn imported_dir(&self) -> PathBuf {
        self.imported_dir
            .clone()
            .unwrap_or_else(|| self.path.join("imported"))
    }

    /// Checks values and that the profile loads; keys are relative to the device.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.path.as_os_str().is_empty() {
            return Err(("path".into(), "must name a directory".into()));
        }
        if self.pattern.is_empty() || self.pattern.contains('/') {
            return Err(("pattern".into(), "must be a file name pattern".into()));
        }
        if self.settle.is_zero() || self.scan_interval.is_zero() {
            return Err((
                "settle".into(),
                "settle and scan_interval must be greater than zero".into(),
            ));
        }
        if self.points_per_message == 0 || self.points_per_message > 10_000 {
            return Err(("points_per_message".into(), "must be 1..=10000".into()));
        }
        self.load_profile()
            .map(|_| ())
            .map_err(|e| ("profile".to_string(), e))
    }
}

/// How far a file has been read, as stored with the records read up to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    /// The file's inode: another file under the same name starts again at 0.
    ino: u64,
    /// Bytes consumed (complete rows, and the header).
    pos: u64,
    /// Data rows consumed.
    rows: u64,
    /// All of it is durable (or it was rejected).
    done: bool,
    /// Its size when it was rejected and left: a changed file is tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rejected_size: Option<u64>,
    /// `readings`: readings of the row at `pos` already sent (a row becomes several
    /// records, which may land in different batches).
    #[serde(default, skip_serializing_if = "is_zero")]
    part: usize,
    /// `echem`: the run's id once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    experiment_id: Option<String>,
}

/// What the watcher knows of a file between scans.
#[derive(Debug, Clone)]
struct Seen {
    ino: u64,
    size: u64,
    since: Instant,
    renamed: bool,
}

struct Folder<'a> {
    cfg: &'a Config,
    ctx: &'a mut DeviceCtx,
    profile: FileProfile,
    positions: HashMap<String, Position>,
    seen: HashMap<String, Seen>,
    running: bool,
    /// Files whose rows the buffer refused: their next send resyncs
    /// (`Ingest::send_with_cursor`).
    resync: HashSet<String>,
    /// The directory could be listed at the last scan.
    connected: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn key(device: &str, name: &str) -> Vec<u8> {
    format!("f/{device}/{name}").into_bytes()
}

/// Why processing a file stopped early.
enum Stop {
    /// The file cannot be read as the profile says: reject it.
    Reject(String),
    /// The buffer refused records (full under `reject_new`, or low on disk): try again later
    /// from the last durable position.
    Refused,
    /// A device error (ingest gone: shutdown).
    Device(DeviceError),
}

impl From<DeviceError> for Stop {
    fn from(e: DeviceError) -> Self {
        Stop::Device(e)
    }
}

impl Folder<'_> {
    fn key(&self, name: &str) -> Vec<u8> {
        key(&self.ctx.id, name)
    }

    fn load_positions(&mut self) -> Result<(), DeviceError> {
        let prefix = format!("f/{}/", self.ctx.id);
        let stored = self
            .ctx
            .store
            .cursors(prefix.as_bytes())
            .map_err(|e| DeviceError::Config(format!("cannot read file positions: {e}")))?;
        for (k, v) in stored {
            let Some(name) = k.strip_prefix(prefix.as_bytes()) else {
                continue;
            };
            let name = String::from_utf8_lossy(name).into_owned();
            match serde_json::from_slice::<Position>(&v) {
                Ok(p) => {
                    self.positions.insert(name, p);
                }
                Err(e) => {
                    tracing::warn!(device = %self.ctx.id, file = %name, error = %e, "stored file position unreadable; the file is read again")
                }
            }
        }
        Ok(())
    }

    /// Sends a record with the file's new position (or the position alone).
    async fn send(
        &mut self,
        name: &str,
        draft: Option<Draft>,
        p: &Position,
    ) -> Result<Receipt, DeviceError> {
        let value = Some(serde_json::to_vec(p).unwrap_or_default());
        let resync = self.resync.remove(name);
        Ok(self
            .ctx
            .ingest
            .send_with_cursor(draft, self.key(name), value, resync)
            .await?)
    }

    /// Waits for receipts; false when the buffer refused any of them.
    async fn durable(receipts: Vec<Receipt>) -> Result<bool, DeviceError> {
        let mut ok = true;
        for r in receipts {
            match r.await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => ok = false,
                Err(_) => return Err(DeviceError::Ingest(crate::ingest::IngestError::Closed)),
            }
        }
        Ok(ok)
    }

    /// One pass over the directory.
    async fn scan(&mut self) -> Result<(), DeviceError> {
        let entries = match std::fs::read_dir(&self.cfg.path) {
            Ok(e) => e,
            Err(e) => {
                if std::mem::take(&mut self.connected) {
                    self.ctx
                        .disconnected(format!("{}: {e}", self.cfg.path.display()))
                        .await?;
                }
                return Ok(());
            }
        };
        if !self.connected {
            self.connected = true;
            self.announce().await?;
        }
        let mut files: Vec<(SystemTime, String, std::fs::Metadata)> = Vec::new();
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !format::glob(&self.cfg.pattern, &name) {
                continue;
            }
            files.push((
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                name,
                meta,
            ));
        }
        // Oldest first: results arrive in the order the instrument wrote them.
        files.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let present: HashSet<String> = files.iter().map(|f| f.1.clone()).collect();
        for (_, name, meta) in files {
            if !self.running || self.ctx.shutdown.is_cancelled() {
                break;
            }
            self.file(&name, &meta).await?;
        }
        // Forget files that are gone, in the store too.
        let gone: Vec<String> = self
            .positions
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.positions.remove(&name);
            self.seen.remove(&name);
            // Its receipt is not awaited: a position left behind is pruned next time.
            drop(
                self.ctx
                    .ingest
                    .send_with_cursor(None, self.key(&name), None, true)
                    .await?,
            );
        }
        self.seen.retain(|n, _| present.contains(n));
        Ok(())
    }

    async fn announce(&mut self) -> Result<(), DeviceError> {
        self.ctx.set_state(if self.running {
            crate::metrics::DeviceState::Running
        } else {
            crate::metrics::DeviceState::Idle
        });
        self.ctx
            .device_event(
                "device_connected",
                object([
                    ("port", self.cfg.path.display().to_string().into()),
                    ("profile", self.profile.name.clone().into()),
                ]),
            )
            .await
    }

    /// Looks at one file: new, growing, finished, done.
    async fn file(&mut self, name: &str, meta: &std::fs::Metadata) -> Result<(), DeviceError> {
        let (ino, size) = (meta.ino(), meta.len());
        let now = Instant::now();
        let seen = self.seen.entry(name.to_string()).or_insert(Seen {
            ino,
            size,
            since: now,
            renamed: false,
        });
        if seen.ino != ino || seen.size != size {
            // A rename seen before the first look has no inode yet (0).
            let renamed = seen.renamed && (seen.ino == ino || seen.ino == 0);
            *seen = Seen {
                ino,
                size,
                since: now,
                renamed,
            };
        }
        let finished = seen.renamed || now.duration_since(seen.since) >= self.cfg.settle;
        let mut p = self.positions.get(name).cloned().unwrap_or_default();
        if p.ino != ino || (p.pos > size && !p.done) {
            if p.ino == ino {
                tracing::warn!(device = %self.ctx.id, file = name, "file shorter than what was read: read again from its start");
            }
            p = Position {
                ino,
                ..Position::default()
            };
        }
        if p.done {
            if let Some(s) = p.rejected_size {
                if s != size && finished {
                    // A rejected file left in place was changed: try it again.
                    p = Position {
                        ino,
                        ..Position::default()
                    };
                } else {
                    return Ok(());
                }
            } else {
                if self.cfg.after_import == AfterImport::Move {
                    self.move_file(name, &self.cfg.imported_dir()).await?;
                }
                return Ok(());
            }
        }
        let path = self.cfg.path.join(name);
        let result = match self.profile.kind {
            Kind::Readings => self.read_rows(name, &path, &mut p, size, finished).await,
            Kind::Echem if finished => self.read_echem(name, &path, &mut p).await,
            Kind::Echem => return Ok(()),
        };
        match result {
            Ok(()) => {
                let all_read = p.pos >= size;
                if finished && all_read && !p.done {
                    p.done = true;
                    let r = self.send(name, None, &p).await?;
                    if !Self::durable(vec![r]).await? {
                        return Ok(());
                    }
                    self.ctx
                        .device_event(
                            "file_imported",
                            object([("file", name.into()), ("rows", p.rows.into())]),
                        )
                        .await?;
                    tracing::info!(device = %self.ctx.id, file = name, rows = p.rows, "file imported");
                    self.positions.insert(name.to_string(), p);
                    if self.cfg.after_import == AfterImport::Move {
                        self.move_file(name, &self.cfg.imported_dir()).await?;
                    }
                } else {
                    self.positions.insert(name.to_string(), p);
                }
            }
            Err(Stop::Refused) => {
                tracing::warn!(device = %self.ctx.id, file = name, "buffer refused rows; reading again from the last stored position");
                // Back to the last durable position; the next scan tries again.
                self.resync.insert(name.to_string());
                self.positions.remove(name);
                if let Ok(Some(v)) = self.ctx.store.cursor(&self.key(name)) {
                    if let Ok(p) = serde_json::from_slice::<Position>(&v) {
                        self.positions.insert(name.to_string(), p);
                    }
                }
            }
            Err(Stop::Reject(reason)) => self.reject(name, ino, size, &reason).await?,
            Err(Stop::Device(e)) => return Err(e),
        }
        Ok(())
    }

    /// Reads the complete rows after `p.pos` (and, once finished, a last row without a
    /// newline), sending each row's readings with the position after it.
    async fn read_rows(
        &mut self,
        name: &str,
        path: &Path,
        p: &mut Position,
        size: u64,
        finished: bool,
    ) -> Result<(), Stop> {
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(_) => return Ok(()), // gone meanwhile
        };
        let mut head = Vec::new();
        f.by_ref()
            .take(MAX_ROW as u64 * (self.profile.skip_lines as u64 + 4))
            .read_to_end(&mut head)
            .map_err(|e| Stop::Reject(e.to_string()))?;
        let header = match self.header(&head)? {
            Some((h, after)) => {
                p.pos = p.pos.max(after);
                h
            }
            None if finished && size > 0 => {
                return Err(Stop::Reject("no header line".into()));
            }
            None => return Ok(()),
        };
        f.seek(SeekFrom::Start(p.pos))
            .map_err(|e| Stop::Reject(e.to_string()))?;
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut chunk = vec![0u8; READ_CHUNK];
        let mut receipts = Vec::new();
        loop {
            let n = f
                .read(&mut chunk)
                .map_err(|e| Stop::Reject(e.to_string()))?;
            let eof = n == 0;
            buf.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
                let line_end = start + nl + 1;
                self.row(name, &header, &buf[start..line_end], p, &mut receipts)
                    .await?;
                start = line_end;
            }
            buf.drain(..start);
            if eof {
                // The last row has no newline: it is whole only once the file is finished.
                if finished && !buf.is_empty() {
                    let rest = std::mem::take(&mut buf);
                    self.row(name, &header, &rest, p, &mut receipts).await?;
                }
                break;
            }
            if buf.len() > MAX_ROW {
                return Err(Stop::Reject(format!("a row longer than {MAX_ROW} bytes")));
            }
            if receipts.len() >= 4096 && !Self::durable(std::mem::take(&mut receipts)).await? {
                return Err(Stop::Refused);
            }
        }
        if !Self::durable(receipts).await? {
            return Err(Stop::Refused);
        }
        Ok(())
    }

    /// Skips the preamble and reads the header from the start of a file; returns it with
    /// the offset after it. None while the header is not written.
    fn header(&self, head: &[u8]) -> Result<Option<(format::Header, u64)>, Stop> {
        let mut offset = 0usize;
        let mut skipped = 0;
        loop {
            let Some(nl) = head[offset..].iter().position(|b| *b == b'\n') else {
                return Ok(None);
            };
            let line = String::from_utf8_lossy(&head[offset..offset + nl]).into_owned();
            offset += nl + 1;
            if skipped < self.profile.skip_lines {
                skipped += 1;
                continue;
            }
            if !self.profile.is_data(&line) {
                continue;
            }
            let h = self.profile.header(&line).map_err(Stop::Reject)?;
            return Ok(Some((h, offset as u64)));
        }
    }

    async fn row(
        &mut self,
        name: &str,
        header: &format::Header,
        raw: &[u8],
        p: &mut Position,
        receipts: &mut Vec<Receipt>,
    ) -> Result<(), Stop> {
        let (pos_before, rows_before) = (p.pos, p.rows);
        let already = std::mem::take(&mut p.part);
        let line = String::from_utf8_lossy(raw);
        // The position after this row, for its last record (or the row alone).
        let after = |p: &mut Position| {
            p.pos = pos_before + raw.len() as u64;
            p.rows = rows_before + 1;
            p.part = 0;
        };
        if !self.profile.is_data(&line) {
            after(p);
            return Ok(());
        }
        let now = SystemTime::now();
        match self.profile.readings(header, &self.ctx.id, &line) {
            Ok(readings) if readings.len() > already => {
                let last = readings.len() - 1;
                for (i, r) in readings.into_iter().enumerate().skip(already) {
                    let draft = Draft {
                        event_id: None,
                        run: None,
                        device_id: self.ctx.id.clone(),
                        time: Some(r.time.unwrap_or(now)),
                        body: Body::SensorReading {
                            sensor_id: r.sensor_id,
                            sensor_type: r.sensor_type,
                            value: r.value,
                            unit: r.unit,
                            location: self.cfg.location.clone(),
                            metadata: BTreeMap::from([
                                ("file".to_string(), name.into()),
                                ("row".to_string(), (rows_before + 1).into()),
                            ]),
                        },
                    };
                    if i == last {
                        after(p);
                    } else {
                        // Still inside this row: resume after its first i + 1 records.
                        p.pos = pos_before;
                        p.rows = rows_before;
                        p.part = i + 1;
                    }
                    receipts.push(self.send(name, Some(draft), p).await?);
                }
            }
            Ok(_) => {
                after(p);
                receipts.push(self.send(name, None, p).await?);
            }
            Err(e) => {
                after(p);
                self.ctx.metrics.count_bad_line(&self.ctx.id);
                tracing::debug!(device = %self.ctx.id, file = name, row = p.rows, error = %e, "row skipped");
                receipts.push(self.send(name, None, p).await?);
            }
        }
        Ok(())
    }

    /// A finished measurement file: all rows are checked first (a file with one bad row
    /// is rejected whole, nothing sent); then the run is sent, resumably.
    async fn read_echem(&mut self, name: &str, path: &Path, p: &mut Position) -> Result<(), Stop> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(_) => return Ok(()),
        };
        let (header, after) = self
            .header(&text)?
            .ok_or_else(|| Stop::Reject("no header line".into()))?;
        let Some(cols) = self.profile.echem.clone() else {
            return Err(Stop::Reject("not an echem profile".into()));
        };
        let body = usize::try_from(after)
            .ok()
            .and_then(|a| text.get(a..))
            .unwrap_or_default();
        let mut points: Vec<Point> = Vec::new();
        for (n, line) in String::from_utf8_lossy(body).lines().enumerate() {
            if !self.profile.is_data(line) {
                continue;
            }
            let pt = self
                .profile
                .point(&header, line)
                .map_err(|e| Stop::Reject(format!("data row {}: {e}", n + 1)))?;
            points.push(pt);
        }
        if points.is_empty() {
            return Err(Stop::Reject("no data rows".into()));
        }
        let experiment_id = p.experiment_id.clone().unwrap_or_else(|| {
            let stem = Path::new(name)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            format::sanitize_id(&format!("{}-{stem}", self.ctx.id))
        });
        let mut receipts = Vec::new();
        if p.experiment_id.is_none() {
            p.experiment_id = Some(experiment_id.clone());
            let started = Draft::new(
                self.ctx.id.clone(),
                Body::ExperimentEvent {
                    event: "experiment_started".into(),
                    experiment_id: experiment_id.clone(),
                    data: object([
                        ("technique", cols.technique.clone().into()),
                        ("file", name.into()),
                        ("points", points.len().into()),
                        ("source", "folder".into()),
                    ]),
                },
            );
            receipts.push(self.send(name, Some(started), p).await?);
        }
        let from = usize::try_from(p.rows)
            .unwrap_or(usize::MAX)
            .min(points.len());
        for chunk in points[from..].chunks(self.cfg.points_per_message) {
            p.rows += chunk.len() as u64;
            let data = Draft::new(
                self.ctx.id.clone(),
                Body::EchemData {
                    technique: cols.technique.clone(),
                    experiment_id: experiment_id.clone(),
                    step_index: 0,
                    scan: None,
                    applied: Vec::new(),
                    points: chunk.to_vec(),
                },
            );
            receipts.push(self.send(name, Some(data), p).await?);
        }
        p.pos = text.len() as u64;
        let completed = Draft::new(
            self.ctx.id.clone(),
            Body::ExperimentEvent {
                event: "experiment_completed".into(),
                experiment_id,
                data: object([("file", name.into()), ("points", points.len().into())]),
            },
        );
        receipts.push(self.send(name, Some(completed), p).await?);
        if !Self::durable(receipts).await? {
            return Err(Stop::Refused);
        }
        Ok(())
    }

    async fn reject(
        &mut self,
        name: &str,
        ino: u64,
        size: u64,
        reason: &str,
    ) -> Result<(), DeviceError> {
        self.ctx.metrics.count_malformed(&self.ctx.id);
        tracing::warn!(device = %self.ctx.id, file = name, reason, "file rejected");
        let p = Position {
            ino,
            pos: size,
            done: true,
            rejected_size: Some(size),
            ..Position::default()
        };
        let r = self.send(name, None, &p).await?;
        if !Self::durable(vec![r]).await? {
            return Ok(());
        }
        self.positions.insert(name.to_string(), p);
        let moved_to = match self.cfg.on_error {
            OnError::Move => self.move_file(name, &self.cfg.rejected_dir()).await?,
            OnError::Leave => None,
        };
        let mut data = object([("file", name.into()), ("reason", reason.into())]);
        if let Some(m) = moved_to {
            data.insert("moved_to".into(), m.display().to_string().into());
        }
        self.ctx.device_event("file_rejected", data).await
    }

    /// Moves a file (whose position is durable) into `dir`; its position is forgotten
    /// at the next scan. Returns where it went.
    async fn move_file(&mut self, name: &str, dir: &Path) -> Result<Option<PathBuf>, DeviceError> {
        let to = dir.join(name);
        let moved = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::rename(self.cfg.path.join(name), &to));
        match moved {
            Ok(()) => Ok(Some(to)),
            Err(e) => {
                tracing::warn!(device = %self.ctx.id, file = name, to = %to.display(), error = %e, "cannot move the file");
                Ok(None)
            }
        }
    }
}

/// A watch on the directory, if inotify works here; events only wake the scan.
fn watch(dir: &Path) -> Option<inotify::EventStream<Vec<u8>>> {
    use inotify::{Inotify, WatchMask};
    let ino = Inotify::init().ok()?;
    ino.watches()
        .add(
            dir,
            WatchMask::CREATE
                | WatchMask::MODIFY
                | WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::DELETE,
        )
        .ok()?;
    ino.into_event_stream(vec![0u8; 4096]).ok()
}

/// Driver entry point.
pub async fn run(cfg: &Config, ctx: &mut DeviceCtx) -> Result<(), DeviceError> {
    use futures_util::StreamExt;
    let profile = cfg.load_profile().map_err(DeviceError::Config)?;
    let mut folder = Folder {
        cfg,
        ctx,
        profile,
        positions: HashMap::new(),
        seen: HashMap::new(),
        running: true,
        resync: HashSet::new(),
        connected: false,
    };
    folder.load_positions()?;
    folder
        .ctx
        .set_state(crate::metrics::DeviceState::Disconnected);
    let mut events = watch(&cfg.path);
    if events.is_none() {
        tracing::warn!(device = %folder.ctx.id, path = %cfg.path.display(), "no inotify watch on the directory; rescanning every {:?}", cfg.scan_interval);
    }
    let mut tick = tokio::time::interval(cfg.scan_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if folder.running {
            folder.scan().await?;
        }
        if events.is_none() {
            events = watch(&cfg.path);
        }
        tokio::select! {
            _ = tick.tick() => {}
            ev = async { match events.as_mut() { Some(s) => s.next().await, None => std::future::pending().await } } => match ev {
                Some(Ok(e)) => {
                    if e.mask.contains(inotify::EventMask::MOVED_TO) {
                        if let Some(n) = e.name.as_ref().and_then(|n| n.to_str()) {
                            // Renamed into place: finished now.
                            if let Some(s) = folder.seen.get_mut(n) {
                                s.renamed = true;
                            } else {
                                folder.seen.insert(n.to_string(), Seen { ino: 0, size: u64::MAX, since: Instant::now(), renamed: true });
                            }
                        }
                    }
                }
                Some(Err(_)) | None => events = None,
            },
            c = folder.ctx.control.recv() => {
                let Some(c) = c else { return Ok(()) };
                let reply = if !c.params.is_empty() {
                    Err(format!("{} takes no parameters", c.command.as_str()))
                } else if c.command.is_action() {
                    Err(format!("a folder has no {}", c.command.as_str()))
                } else {
                    folder.running = matches!(c.command, CommandKind::Start | CommandKind::Resume);
                    folder.ctx.set_state(match c.command {
                        CommandKind::Pause => crate::metrics::DeviceState::Paused,
                        CommandKind::Stop => crate::metrics::DeviceState::Idle,
                        _ => crate::metrics::DeviceState::Running,
                    });
                    Ok(if folder.running { "reading files".to_string() } else { "not reading files".to_string() })
                };
                let _ = c.reply.send(reply);
            }
            () = folder.ctx.shutdown.cancelled() => return Ok(()),
        }
    }
}
