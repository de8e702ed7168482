//! The access log: one line per request, written off the data path.
//!
//! The worker threads hand each finished request's [`Record`] to a bounded buffer and
//! never wait: when the buffer is full the line is dropped and counted in
//! `loadgate_access_log_dropped_total`. One writer task, on the runtime that started the
//! proxy, formats the records and writes them through a buffered file (or stdout),
//! flushing whenever the buffer runs empty. [`AccessLog::reopen`] (SIGUSR1) opens the
//! path again, for logrotate; [`AccessLog::configure`] (start, reload) replaces the
//! writer when the `[access_log]` table changes.
//!
//! Not here: what a line says and how it is escaped (`format.rs`), and filling a record
//! in (the handler's stages).

pub mod format;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

pub use format::Record;

use crate::config::{AccessLogConfig, AccessLogFormat, AccessLogTarget};
use crate::metrics::{self as m, Count};

/// Bytes the writer gathers before writing them out, when lines come faster than it
/// empties the buffer.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// How long a new writer waits for the one it replaces to finish its lines, so the two
/// never interleave in one file; a writer stuck on its output is not waited for longer.
const HANDOVER_WAIT: Duration = Duration::from_secs(1);

/// Where a writer's lines go.
pub type Output = Box<dyn AsyncWrite + Send + Unpin>;

/// The proxy's access log: off, or one writer and the buffer that feeds it.
pub struct AccessLog {
    sink: ArcSwapOption<Sink>,
    dropped: Arc<Count>,
}

/// One writer and what feeds it.
struct Sink {
    config: AccessLogConfig,
    lines: mpsc::Sender<Record>,
    reopen: Arc<Notify>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog::new()
    }
}

impl AccessLog {
    /// An access log that is off until [`configure`](AccessLog::configure)d.
    pub fn new() -> AccessLog {
        AccessLog {
            sink: ArcSwapOption::empty(),
            dropped: Arc::new(Count::new(metrics::counter!(m::ACCESS_LOG_DROPPED_TOTAL))),
        }
    }

    /// Whether the query string goes in the log, or `None` when the log is off and a
    /// request need not make a record at all.
    pub fn include_query(&self) -> Option<bool> {
        self.sink
            .load()
            .as_ref()
            .map(|sink| sink.config.include_query)
    }

    /// Hands a finished request's record to the writer, without waiting: a full buffer
    /// (or a log turned off meanwhile) drops it, counted.
    pub fn log(&self, record: Record) {
        let sink = self.sink.load();
        let sent = match sink.as_ref() {
            Some(sink) => sink.lines.try_send(record).is_ok(),
            None => false,
        };
        if !sent {
            self.dropped.increment();
        }
    }

    /// Lines dropped so far by this access log: a full buffer, or a failed write.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Puts `config` in force: nothing changes when it is the one in force; otherwise the
    /// new output is opened first (an error leaves the running log as it was), a new
    /// writer takes over, and the old one finishes the lines it was given. Must be called
    /// within a tokio runtime, which runs the writer.
    pub fn configure(&self, config: Option<&AccessLogConfig>) -> std::io::Result<()> {
        let current = self.sink.load();
        if current.as_ref().map(|sink| &sink.config) == config {
            return Ok(());
        }
        let next = match config {
            Some(config) => {
                let output = open(&config.target)?;
                Some(Arc::new(self.start(config.clone(), output)?))
            }
            None => None,
        };
        // The old writer ends once the requests holding its sender are done with it.
        self.sink.store(next);
        match config {
            Some(config) => tracing::info!(target = %describe(&config.target),
                format = ?config.format, "access log on"),
            None if current.is_some() => tracing::info!("access log off"),
            None => {}
        }
        Ok(())
    }

    /// Puts `config` in force with its lines written to `output` rather than to its
    /// target: for a test's own sink. Must be called within a tokio runtime.
    pub fn configure_output(&self, config: AccessLogConfig, output: Output) -> std::io::Result<()> {
        let sink = self.start(config, output)?;
        self.sink.store(Some(Arc::new(sink)));
        Ok(())
    }

    /// Starts a writer of `config`'s lines to `output`. It begins writing once the writer
    /// in force (if any) has finished, so the two never interleave in one file.
    fn start(&self, config: AccessLogConfig, output: Output) -> std::io::Result<Sink> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| std::io::Error::other("the access log needs a tokio runtime"))?;
        let (lines, received) = mpsc::channel(config.buffer_lines.max(1));
        let reopen = Arc::new(Notify::new());
        let previous = self
            .sink
            .load()
            .as_ref()
            .and_then(|sink| sink.writer.lock().unwrap_or_else(|e| e.into_inner()).take());
        let writer = Writer {
            format: config.format,
            path: match &config.target {
                AccessLogTarget::File(path) => Some(path.clone()),
                AccessLogTarget::Stdout => None,
            },
            output: BufWriter::with_capacity(WRITE_BUFFER_BYTES, output),
            dropped: self.dropped.clone(),
            failing: false,
        };
        let task = runtime.spawn(writer.run(received, reopen.clone(), previous));
        Ok(Sink {
            config,
            lines,
            reopen,
            writer: Mutex::new(Some(task)),
        })
    }

    /// Opens the file again at its path (after logrotate moved it away). A path that
    /// cannot be opened is logged, and lines go on to the file already open.
    pub fn reopen(&self) {
        if let Some(sink) = self.sink.load().as_ref() {
            sink.reopen.notify_one();
        }
    }

    /// Turns the log off and waits up to `within` for the writer to write and flush the
    /// lines it holds (on shutdown, after the last request).
    pub async fn close(&self, within: Duration) {
        let Some(sink) = self.sink.swap(None) else {
            return;
        };
        let writer = sink.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        // The writer ends once every sender is gone: this one, and any a request holds.
        drop(sink);
        if let Some(writer) = writer {
            if tokio::time::timeout(within, writer).await.is_err() {
                tracing::warn!(?within, "the access log writer did not finish in time");
            }
        }
    }
}

fn describe(target: &AccessLogTarget) -> String {
    match target {
        AccessLogTarget::Stdout => "stdout".to_string(),
        AccessLogTarget::File(path) => path.display().to_string(),
    }
}

/// Opens an access log output: stdout, or `path` for appending (created if absent).
fn open(target: &AccessLogTarget) -> std::io::Result<Output> {
    match target {
        AccessLogTarget::Stdout => Ok(Box::new(tokio::io::stdout())),
        AccessLogTarget::File(path) => Ok(Box::new(open_file(path)?)),
    }
}

fn open_file(path: &Path) -> std::io::Result<tokio::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open the access log {}: {e}", path.display()),
            )
        })?;
    Ok(tokio::fs::File::from_std(file))
}

/// The task that formats records and writes them out.
struct Writer {
    format: AccessLogFormat,
    /// The file to reopen on SIGUSR1; `None` for stdout.
    path: Option<PathBuf>,
    output: BufWriter<Output>,
    dropped: Arc<Count>,
    /// Writes are failing: logged once when it starts, once when it ends.
    failing: bool,
}

impl Writer {
    async fn run(
        mut self,
        mut received: mpsc::Receiver<Record>,
        reopen: Arc<Notify>,
        previous: Option<JoinHandle<()>>,
    ) {
        if let Some(previous) = previous {
            let _ = tokio::time::timeout(HANDOVER_WAIT, previous).await;
        }
        let mut line = Vec::with_capacity(1024);
        loop {
            tokio::select! {
                biased;
                () = reopen.notified() => self.reopen().await,
                record = received.recv() => {
                    let Some(record) = record else { break };
                    // Everything already waiting goes out in one flush.
                    let mut pending = 1;
                    line.clear();
                    format::write_line(&mut line, &record, self.format);
                    while let Ok(record) = received.try_recv() {
                        format::write_line(&mut line, &record, self.format);
                        pending += 1;
                        if line.len() >= WRITE_BUFFER_BYTES {
                            self.write(&line, pending).await;
                            line.clear();
                            pending = 0;
                        }
                    }
                    self.write(&line, pending).await;
                    self.flush().await;
                }
            }
        }
        self.flush().await;
    }

    /// Writes `lines` (`count` of them); on failure they are counted as dropped.
    async fn write(&mut self, lines: &[u8], count: u64) {
        if lines.is_empty() {
            return;
        }
        let written = self.output.write_all(lines).await;
        self.outcome(written, count);
    }

    async fn flush(&mut self) {
        let flushed = self.output.flush().await;
        self.outcome(flushed, 0);
    }

    fn outcome(&mut self, result: std::io::Result<()>, lines: u64) {
        match result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("access log writes succeed again");
            }
            Ok(()) => {}
            Err(error) => {
                for _ in 0..lines {
                    self.dropped.increment();
                }
                if !self.failing {
                    self.failing = true;
                    tracing::error!(%error, "access log write failed; lines are dropped until it succeeds");
                }
            }
        }
    }

    /// Flushes what the old file has, then opens the path again.
    async fn reopen(&mut self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        self.flush().await;
        match open_file(&path) {
            Ok(file) => {
                self.output = BufWriter::with_capacity(WRITE_BUFFER_BYTES, Box::new(file));
                tracing::info!(path = %path.display(), "access log reopened");
            }
            Err(error) => {
                tracing::error!(%error, "access log not reopened; writing on to the file open before")
            }
        }
    }
}

#[cfg(test)]
mod tests;
