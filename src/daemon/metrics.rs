//! The metrics endpoint (`--metrics ADDR` on `mount` and `serve`):
//! Prometheus text at `/metrics`, for a monitor to scrape.
//!
//! The numbers are read at each scrape from the same typed reports `hbrfs
//! status` shows (`ReplStats::report` on the primary, the `ReplicaStore`'s
//! counters on the secondary) by `prometheus-client` collectors, so the
//! endpoint and `status` never disagree and nothing is counted twice. The
//! cut-stall histogram is the tracker's own.
//!
//! The HTTP side is a few lines on the tokio runtime the daemon already
//! runs: one `GET` per connection, a bounded request head and a deadline,
//! `Connection: close`. A scrape endpoint needs no more, and this keeps a
//! web framework out of the daemon.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::datastore::Datastore;
use crate::error::{Error, ErrorCounts, IoContext, Result};
use crate::replica::ReplicaStore;
use crate::replicate::{ReplStats, ReplicationReport};
use crate::state::now_ns;

/// The longest request head read before answering 400: a scrape sends a
/// few hundred bytes.
const MAX_HEAD: usize = 8192;
/// How long a client may take to send its request and take the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The primary's metrics: the replicator's report (when it replicates)
/// and the tracker's cut stalls.
#[derive(Debug)]
pub(super) struct PrimaryMetrics {
    /// The datastore whose cuts are timed.
    pub(super) ds: Arc<Datastore>,
    /// The replicator's counters, none without `--replicate-to`.
    pub(super) stats: Option<Arc<ReplStats>>,
}

/// The secondary's metrics: its store's counters and applied point.
#[derive(Debug)]
pub(super) struct SecondaryMetrics {
    /// The replica folder being served.
    pub(super) store: Arc<ReplicaStore>,
}

impl Collector for PrimaryMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let stalls = self.ds.tracker.cut_stall_histogram();
        stalls.encode(e.encode_descriptor(
            "hbrfs_cut_stall_seconds",
            "How long each cut held the write gate (writes wait at most this).",
            None,
            MetricType::Histogram,
        )?)?;
        let Some(stats) = &self.stats else {
            return Ok(());
        };
        let r = stats.report();
        counters(&mut e, &primary_counters(&r))?;
        gauges(&mut e, &primary_gauges(&r))?;
        target(&mut e, &r)?;
        errors(&mut e, &r.errors)
    }
}

/// Encodes `hbrfs_target_info{target, kind} 1` (which secondary or
/// repository points go to) and, with an object store, the requests made
/// to it (`hbrfs_object_requests_total{op}`, `hbrfs_object_bytes_total{op}`).
fn target(e: &mut DescriptorEncoder, r: &ReplicationReport) -> fmt::Result {
    let kind = if r.target.starts_with("s3://") {
        "object"
    } else {
        "secondary"
    };
    let help = "Where points go (value 1): a secondary or an object store.";
    let mut m = e.encode_descriptor("hbrfs_target_info", help, None, MetricType::Gauge)?;
    ConstGauge::new(1.0)
        .encode(m.encode_family(&[("target", r.target.as_str()), ("kind", kind)])?)?;
    if kind != "object" {
        return Ok(());
    }
    let q = &r.object_requests;
    let help = "Requests to the object store, by operation.";
    let mut m = e.encode_descriptor("hbrfs_object_requests", help, None, MetricType::Counter)?;
    for (op, n) in [
        ("put", q.puts),
        ("get", q.gets),
        ("list", q.lists),
        ("delete", q.deletes),
    ] {
        ConstCounter::new(n).encode(m.encode_family(&[("op", op)])?)?;
    }
    let help = "Bytes sent to (put) and read from (get) the object store.";
    let mut m = e.encode_descriptor("hbrfs_object_bytes", help, None, MetricType::Counter)?;
    for (op, n) in [("put", q.put_bytes), ("get", q.get_bytes)] {
        ConstCounter::new(n).encode(m.encode_family(&[("op", op)])?)?;
    }
    Ok(())
}

/// The primary's counters, from its replication report.
fn primary_counters(r: &ReplicationReport) -> [Sample<u64>; 13] {
    [
        ("hbrfs_points_cut", "Points cut.", r.points_cut),
        (
            "hbrfs_points_shipped",
            "Points shipped and applied at the secondary.",
            r.epochs_shipped,
        ),
        (
            "hbrfs_retries",
            "Points shipped again after their stream broke.",
            r.retries,
        ),
        (
            "hbrfs_blocks_offered",
            "Block hashes offered.",
            r.blocks_offered,
        ),
        (
            "hbrfs_blocks_sent",
            "Blocks the secondary wanted and got.",
            r.blocks_sent,
        ),
        (
            "hbrfs_blocks_have",
            "Non-zero blocks the secondary held already.",
            r.blocks_have,
        ),
        (
            "hbrfs_blocks_zero",
            "Offered blocks that were all zeros.",
            r.blocks_zero,
        ),
        (
            "hbrfs_bytes_offered",
            "Bytes of the blocks offered.",
            r.bytes_offered,
        ),
        (
            "hbrfs_bytes_sent",
            "Uncompressed bytes of the blocks sent.",
            r.raw_bytes_sent,
        ),
        (
            "hbrfs_bytes_have",
            "Bytes the secondary held already (dedup).",
            r.bytes_have,
        ),
        (
            "hbrfs_bytes_zero",
            "Bytes of the zero blocks offered.",
            r.bytes_zero,
        ),
        (
            "hbrfs_bytes_compressed",
            "Compressed bytes of the blocks sent.",
            r.compressed_bytes_sent,
        ),
        (
            "hbrfs_wire_bytes",
            "Bytes put on the replication stream.",
            r.wire_bytes,
        ),
    ]
}

/// The primary's gauges, from its replication report (one without a
/// value yet is left out).
fn primary_gauges(r: &ReplicationReport) -> [Sample<Option<f64>>; 6] {
    [
        (
            "hbrfs_connected",
            "1 while a stream to the secondary is up.",
            Some(f64::from(u8::from(r.connected))),
        ),
        (
            "hbrfs_last_applied_epoch",
            "The newest epoch the secondary applied.",
            Some(r.last_applied_epoch as f64),
        ),
        (
            "hbrfs_replica_age_seconds",
            "How far the replica lags the primary.",
            r.replica_age_ms.map(|ms| ms as f64 / 1e3),
        ),
        (
            "hbrfs_seconds_since_progress",
            "Seconds since the secondary last answered or took a message.",
            r.seconds_since_progress,
        ),
        (
            "hbrfs_compression_ratio",
            "Raw / compressed bytes of the blocks sent.",
            Some(r.compression_ratio),
        ),
        (
            "hbrfs_dedup_ratio",
            "Share of non-zero offered blocks that were not sent.",
            Some(r.dedup_ratio),
        ),
    ]
}

impl Collector for SecondaryMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let stats = &self.store.stats;
        let c = stats.counts();
        let points = stats.points_applied.load(Ordering::Relaxed);
        counters(
            &mut e,
            &[
                ("hbrfs_points_applied", "Points applied whole.", points),
                (
                    "hbrfs_bytes_received",
                    "Compressed bytes of the blocks received.",
                    c.bytes_received,
                ),
                (
                    "hbrfs_blocks_received",
                    "Blocks the primary had to send.",
                    c.blocks_sent,
                ),
                (
                    "hbrfs_blocks_have",
                    "Offered blocks filled from content held already.",
                    c.blocks_have,
                ),
                (
                    "hbrfs_blocks_resumed",
                    "Blocks kept from broken streams, not sent again.",
                    c.blocks_resumed,
                ),
            ],
        )?;
        let applied = self.store.applied();
        let since = |ns: u64| (ns != 0).then(|| now_ns().saturating_sub(ns) as f64 / 1e9);
        let progress = stats.last_progress_ns.load(Ordering::Relaxed);
        let pending = f64::from(u8::from(self.store.apply_pending()));
        gauges(
            &mut e,
            &[
                (
                    "hbrfs_last_applied_epoch",
                    "The newest epoch applied.",
                    Some(applied.epoch.0 as f64),
                ),
                (
                    "hbrfs_seconds_since_apply",
                    "Seconds since the last point was applied.",
                    since(applied.at_ns),
                ),
                (
                    "hbrfs_seconds_since_progress",
                    "Seconds since a primary last said hello or sent a message.",
                    since(progress),
                ),
                (
                    "hbrfs_apply_pending",
                    "1 while a failed apply waits to be retried.",
                    Some(pending),
                ),
            ],
        )?;
        errors(&mut e, &stats.errors.report())
    }
}

/// A metric's name, its help and its value.
type Sample<T> = (&'static str, &'static str, T);

/// Encodes counters (the text format adds `_total` to each name).
fn counters(e: &mut DescriptorEncoder, samples: &[Sample<u64>]) -> fmt::Result {
    for &(name, help, v) in samples {
        ConstCounter::new(v).encode(e.encode_descriptor(
            name,
            help,
            None,
            MetricType::Counter,
        )?)?;
    }
    Ok(())
}

/// Encodes gauges; one without a value yet (`None`) is left out.
fn gauges(e: &mut DescriptorEncoder, samples: &[Sample<Option<f64>>]) -> fmt::Result {
    for &(name, help, v) in samples {
        if let Some(v) = v {
            ConstGauge::new(v).encode(e.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
    }
    Ok(())
}

/// Encodes `hbrfs_errors_total{kind}`, one series per error kind.
fn errors(e: &mut DescriptorEncoder, counts: &ErrorCounts) -> fmt::Result {
    let help = "Failures by kind (io, state, remote, refused, usage).";
    let mut m = e.encode_descriptor("hbrfs_errors", help, None, MetricType::Counter)?;
    for (kind, n) in counts.by_kind() {
        ConstCounter::new(n).encode(m.encode_family(&[("kind", kind.name())])?)?;
    }
    Ok(())
}

/// Serves `collector` as Prometheus text at `http://ADDR/metrics` on the
/// runtime `rt` until it shuts down; returns the address bound (so that
/// port 0 picks a free one, logged for the operator).
pub(super) fn serve(
    addr: SocketAddr,
    collector: impl Collector,
    rt: &tokio::runtime::Handle,
) -> Result<SocketAddr> {
    let listener = rt
        .block_on(TcpListener::bind(addr))
        .map_err(|e| Error::Usage(format!("--metrics: listening on {addr}: {e}")))?;
    let bound = listener.local_addr().at("metrics listener")?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let registry = Arc::new(registry);
    rt.spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let registry = registry.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(conn, &registry).await {
                            log::debug!("metrics request: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors, most likely: wait, never spin.
                    log::warn!("metrics endpoint: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    log::info!("metrics at http://{bound}/metrics");
    Ok(bound)
}

/// Answers one request on `conn`: the metrics for `GET /metrics`, 404 for
/// another path, 400 for anything else.
async fn answer(mut conn: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "request took too long");
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut conn))
        .await
        .map_err(|_| timed_out())??;
    let (status, body) = match request_path(&head) {
        Some("/metrics") => {
            let mut body = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut body, registry)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            ("200 OK", body)
        }
        Some(_) => ("404 Not Found", "only /metrics is served here\n".into()),
        None => ("400 Bad Request", "expected GET /metrics\n".into()),
    };
    let content_type = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(REQUEST_TIMEOUT, conn.write_all(reply.as_bytes()))
        .await
        .map_err(|_| timed_out())??;
    conn.shutdown().await
}

/// Reads a request head (up to the blank line), at most [`MAX_HEAD`] bytes.
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() <= MAX_HEAD {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(head)
}

/// The path of a `GET` request head, without its query; `None` for
/// anything else.
fn request_path(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\r').next()?;
    let mut words = std::str::from_utf8(line).ok()?.split(' ');
    let (method, target) = (words.next()?, words.next()?);
    words.next()?.starts_with("HTTP/1.").then_some(())?;
    (method == "GET").then(|| target.split('?').next().unwrap_or(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_get_names_a_path() {
        assert_eq!(
            request_path(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some("/metrics")
        );
        assert_eq!(request_path(b"GET / HTTP/1.0\r\n\r\n"), Some("/"));
        assert_eq!(request_path(b"POST /metrics HTTP/1.1\r\n\r\n"), None);
        assert_eq!(request_path(b"\x16\x03\x01"), None);
        assert_eq!(request_path(b""), None);
    }
}
