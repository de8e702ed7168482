//! The writer: lines in order, none lost within the buffer, a blocked output drops and
//! counts rather than waits, reopen, and a replaced writer finishing first.

use super::*;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

fn config(buffer_lines: usize, target: AccessLogTarget) -> AccessLogConfig {
    AccessLogConfig {
        target,
        format: AccessLogFormat::Json,
        include_query: false,
        buffer_lines,
    }
}

fn record(n: usize) -> Record {
    let mut r = Record::new(
        SystemTime::now(),
        "127.0.0.1:1".parse().unwrap(),
        http::Method::GET,
        &format!("/{n}"),
    );
    r.status = 200;
    r
}

/// An output that accepts nothing: every write waits forever, as a full pipe or a hung
/// disk does.
struct Stuck;

impl AsyncWrite for Stuck {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Pending
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

/// Lines of `path`, parsed; waits up to 5 s for `n` of them.
async fn lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<_> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= n || tokio::time::Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_blocked_output_drops_and_counts_lines_without_waiting() {
    let log = AccessLog::new();
    log.configure_output(config(4, AccessLogTarget::Stdout), Box::new(Stuck))
        .unwrap();
    // The writer cannot run while this test holds the thread: the buffer takes four
    // lines, the other six are dropped at once.
    for n in 0..10 {
        log.log(record(n));
    }
    assert_eq!(log.dropped(), 6);
    // The writer takes what it can and then waits on its output; the buffer fills again
    // and every further line is dropped, and never waits.
    tokio::task::yield_now().await;
    let before = log.dropped();
    let started = std::time::Instant::now();
    for n in 0..1000 {
        log.log(record(n));
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(log.dropped() >= before + 1000 - 4, "{}", log.dropped());
}

#[tokio::test]
async fn lines_are_written_in_order_and_none_lost_within_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = AccessLog::new();
    log.configure(Some(&config(2000, AccessLogTarget::File(path.clone()))))
        .unwrap();
    for n in 0..2000 {
        log.log(record(n));
    }
    log.close(Duration::from_secs(5)).await;
    let lines = lines(&path, 2000).await;
    assert_eq!(lines.len(), 2000);
    for (n, line) in lines.iter().enumerate() {
        assert_eq!(line["path"], format!("/{n}"));
    }
    assert_eq!(log.dropped(), 0);
    assert_eq!(log.include_query(), None, "closed: off");
}

#[tokio::test]
async fn reopen_writes_on_to_a_new_file_at_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let log = AccessLog::new();
    log.configure(Some(&config(16, AccessLogTarget::File(path.clone()))))
        .unwrap();
    log.log(record(1));
    assert_eq!(lines(&path, 1).await.len(), 1);
    std::fs::rename(&path, &rotated).unwrap();
    // Until the reopen, lines go on to the renamed file.
    log.log(record(2));
    assert_eq!(lines(&rotated, 2).await.len(), 2);
    log.reopen();
    log.log(record(3));
    let new = lines(&path, 1).await;
    assert_eq!(new.len(), 1);
    assert_eq!(new[0]["path"], "/3");
    assert_eq!(lines(&rotated, 2).await.len(), 2);
}

#[tokio::test]
async fn a_file_that_cannot_be_opened_is_an_error_and_the_log_stays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = AccessLog::new();
    let good = config(16, AccessLogTarget::File(path.clone()));
    log.configure(Some(&good)).unwrap();
    let missing = dir.path().join("no/such/dir/access.log");
    let error = log
        .configure(Some(&config(16, AccessLogTarget::File(missing.clone()))))
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&format!("cannot open the access log {}", missing.display())),
        "{error}"
    );
    log.log(record(7));
    assert_eq!(lines(&path, 1).await[0]["path"], "/7");
}

#[tokio::test]
async fn a_new_format_takes_over_after_the_old_writer_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = AccessLog::new();
    log.configure(Some(&config(4096, AccessLogTarget::File(path.clone()))))
        .unwrap();
    for n in 0..500 {
        log.log(record(n));
    }
    let mut common = config(4096, AccessLogTarget::File(path.clone()));
    common.format = AccessLogFormat::Common;
    log.configure(Some(&common)).unwrap();
    log.log(record(500));
    log.close(Duration::from_secs(5)).await;
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 501);
    assert!(lines[..500].iter().all(|l| l.starts_with('{')));
    assert!(lines[500].starts_with("127.0.0.1 - - ["), "{}", lines[500]);
}
