//! `--metrics-listen ADDR`: the pool's counters in the Prometheus text exposition format
//! (version 0.0.4) at `GET /metrics`, and `GET /healthz` answering `ok`.
//!
//! The HTTP side is a deliberately small HTTP/1.1 responder: one request per connection
//! (`Connection: close`), a request head of at most [`MAX_HEAD`] bytes read within
//! [`READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections served at once. Anything it does
//! not understand gets a 4xx answer; nothing a client sends can stop it.
//!
//! Counters come from [`crate::volume::Stats`] (atomics updated on the data path); gauges of
//! volumes, mappings and groups are read from the engine at scrape time.

use super::workers::Workers;
use crate::engine::{GroupState, MapState};
use crate::volume::{BUCKETS, CopyKind, HistogramSnapshot, IoOp, Pool};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8192;
/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 32;

/// The exposition content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    pool: Arc<Pool>,
    workers: Arc<Workers>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            a = listener.accept() => a.map(|(s, peer)| (s, peer, permit)),
        };
        match accepted {
            Ok((stream, peer, permit)) => {
                let (pool, workers) = (pool.clone(), workers.clone());
                conns.spawn(async move {
                    if let Err(e) = connection(stream, &pool, &workers).await {
                        tracing::debug!(%peer, error = %e, "metrics connection failed");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Scrapes are short; one cut off by shutdown is simply retried by the scraper elsewhere.
    conns.shutdown().await;
    tracing::debug!("metrics endpoint stopped");
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Healthz,
    /// An error answer: status code and reason phrase.
    Error(u16, &'static str),
}

/// Routes a complete request head (everything before the blank line).
fn route(head: &[u8]) -> Route {
    let Ok(head) = std::str::from_utf8(head) else {
        return Route::Error(400, "Bad Request");
    };
    let line = head.split("\r\n").next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Error(400, "Bad Request");
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || method.is_empty() || target.is_empty() {
        return Route::Error(400, "Bad Request");
    }
    if method != "GET" {
        return Route::Error(405, "Method Not Allowed");
    }
    match target.split('?').next() {
        Some("/metrics") => Route::Metrics,
        Some("/healthz") => Route::Healthz,
        _ => Route::Error(404, "Not Found"),
    }
}

/// Reads the request head (without its blank line), or says why it is not acceptable.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Result<Vec<u8>, Route>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(Ok(buf));
        }
        if buf.len() > MAX_HEAD {
            return Ok(Err(Route::Error(431, "Request Header Fields Too Large")));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn connection(
    mut stream: TcpStream,
    pool: &Arc<Pool>,
    workers: &Arc<Workers>,
) -> std::io::Result<()> {
    let route = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Ok(head))) => route(&head),
        Ok(Ok(Err(too_big))) => too_big,
        Ok(Err(e)) => return Err(e),
        Err(_) => Route::Error(408, "Request Timeout"),
    };
    let (status, reason, content_type, body) = match route {
        Route::Metrics => {
            let (pool, workers) = (pool.clone(), workers.clone());
            // The engine lock is short-held, but never block the runtime on it.
            let body = tokio::task::spawn_blocking(move || render(&pool, workers.active()))
                .await
                .map_err(std::io::Error::other)?;
            (200, "OK", CONTENT_TYPE, body)
        }
        Route::Healthz => (200, "OK", "text/plain; charset=utf-8", "ok\n".into()),
        Route::Error(code, reason) => (
            code,
            reason,
            "text/plain; charset=utf-8",
            format!("{code} {reason}\n"),
        ),
    };
    let allow = if status == 405 { "Allow: GET\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await?;
    // Read what the client still sends (a body, a pipelined request) for a moment, so that
    // closing does not reset the connection before the client has read the answer.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut total = 0;
        while total < 1 << 20 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    Ok(())
}

/// Builds the exposition text.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (le, count) in BUCKETS.iter().zip(&h.cumulative) {
            let le = le.to_string();
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, count);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&bucket, &l, h.count);
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count);
    }
}

/// The pool's metrics in the text exposition format; `workers` is the number of running copy
/// workers.
pub fn render(pool: &Pool, workers: usize) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let (volumes, maps, groups) = {
        let e = pool.engine();
        let mut maps = [0u64; MapState::ALL.len()];
        for m in e.mappings() {
            maps[MapState::ALL
                .iter()
                .position(|s| *s == m.state)
                .unwrap_or(0)] += 1;
        }
        // Slot 0 is `empty`, then the mapping states.
        let mut groups = [0u64; MapState::ALL.len() + 1];
        for g in e.groups() {
            let i = match e.group_state(g.id) {
                Some(GroupState::Map(s)) => {
                    1 + MapState::ALL.iter().position(|x| *x == s).unwrap_or(0)
                }
                _ => 0,
            };
            groups[i] += 1;
        }
        (e.volumes().count(), maps, groups)
    };
    let s = &pool.stats;
    let mut out = Exposition(String::with_capacity(16 << 10));

    out.family("flashcopy_volumes", "gauge", "Volumes in the pool.");
    out.sample("flashcopy_volumes", &[], volumes);
    out.family(
        "flashcopy_mappings",
        "gauge",
        "FlashCopy mappings by state.",
    );
    for (st, n) in MapState::ALL.iter().zip(maps) {
        out.sample("flashcopy_mappings", &[("state", st.as_str())], n);
    }
    out.family(
        "flashcopy_groups",
        "gauge",
        "Consistency groups by state (empty: no members).",
    );
    out.sample("flashcopy_groups", &[("state", "empty")], groups[0]);
    for (st, n) in MapState::ALL.iter().zip(&groups[1..]) {
        out.sample("flashcopy_groups", &[("state", st.as_str())], n);
    }

    out.family(
        "flashcopy_io_requests_total",
        "counter",
        "Host I/O requests served over NBD, by operation (failed ones included).",
    );
    for op in IoOp::ALL {
        let v = s.io.op(op).requests.load(Relaxed);
        out.sample("flashcopy_io_requests_total", &[("op", op.as_str())], v);
    }
    out.family(
        "flashcopy_io_bytes_total",
        "counter",
        "Bytes of successful host I/O requests by operation (the range for trim and write_zeroes).",
    );
    for op in IoOp::ALL {
        let v = s.io.op(op).bytes.load(Relaxed);
        out.sample("flashcopy_io_bytes_total", &[("op", op.as_str())], v);
    }
    out.family(
        "flashcopy_io_errors_total",
        "counter",
        "Host I/O requests answered with an error, by operation.",
    );
    for op in IoOp::ALL {
        let v = s.io.op(op).errors.load(Relaxed);
        out.sample("flashcopy_io_errors_total", &[("op", op.as_str())], v);
    }
    out.family(
        "flashcopy_io_duration_seconds",
        "histogram",
        "Time to serve a host I/O request, by operation.",
    );
    for op in IoOp::ALL {
        let h = s.io.op(op).latency.snapshot();
        out.histogram("flashcopy_io_duration_seconds", &[("op", op.as_str())], &h);
    }

    out.family(
        "flashcopy_copied_grains_total",
        "counter",
        "Grains copied, by reason: copy_on_write before a host write, background copy, cleaning.",
    );
    for k in CopyKind::ALL {
        out.sample(
            "flashcopy_copied_grains_total",
            &[("reason", k.as_str())],
            s.copied(k),
        );
    }
    out.family(
        "flashcopy_copy_errors_total",
        "counter",
        "Grain copies that failed on a store, by reason; each stopped its mapping.",
    );
    for k in CopyKind::ALL {
        out.sample(
            "flashcopy_copy_errors_total",
            &[("reason", k.as_str())],
            s.copy_errors(k),
        );
    }

    out.family(
        "flashcopy_start_pause_seconds",
        "histogram",
        "How long host I/O was held to take a point in time, by start kind (mapping or group).",
    );
    out.histogram(
        "flashcopy_start_pause_seconds",
        &[("kind", "mapping")],
        &s.start_pause_mapping.snapshot(),
    );
    out.histogram(
        "flashcopy_start_pause_seconds",
        &[("kind", "group")],
        &s.start_pause_group.snapshot(),
    );

    out.family(
        "flashcopy_journal_commits_total",
        "counter",
        "Metadata journal commit rounds (one sync each).",
    );
    out.sample("flashcopy_journal_commits_total", &[], pool.commit_rounds());
    out.family(
        "flashcopy_copy_workers",
        "gauge",
        "Mappings with a running background copy or cleaning worker.",
    );
    out.sample("flashcopy_copy_workers", &[], workers);
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(r("GET /metrics HTTP/1.1\r\nHost: x"), Route::Metrics);
        assert_eq!(r("GET /metrics?x=1 HTTP/1.0"), Route::Metrics);
        assert_eq!(r("GET /healthz HTTP/1.1"), Route::Healthz);
        assert_eq!(r("GET / HTTP/1.1"), Route::Error(404, "Not Found"));
        assert_eq!(r("GET /metricsx HTTP/1.1"), Route::Error(404, "Not Found"));
        assert_eq!(
            r("POST /metrics HTTP/1.1"),
            Route::Error(405, "Method Not Allowed")
        );
        for bad in [
            "",
            "GET",
            "GET /metrics",
            "GET /metrics HTTP/2",
            "GET  /metrics HTTP/1.1",
            "GET /metrics HTTP/1.1 extra",
            "\u{0}\u{1}",
        ] {
            assert_eq!(r(bad), Route::Error(400, "Bad Request"), "{bad:?}");
        }
        assert_eq!(route(&[0xff, 0xfe]), Route::Error(400, "Bad Request"));
    }
}
