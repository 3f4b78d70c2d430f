//! The agent's HTTP listener: `/health`, `/metrics` (Prometheus text), `/status` (JSON),
//! and, when configured, the ingest API and app devices' command streams ([`api`]).
//!
//! axum routes and hyper serves. The accept loop is ours: at most [`MAX_CONNECTIONS`]
//! connections at once (more wait in the listen backlog), and a request head must
//! arrive within [`IO_TIMEOUT`], so idle or slow clients cannot exhaust the agent.
//! Event streams (the page's `/live`, app devices' command streams) hold their
//! connection for as long as they are open, so at most [`MAX_STREAMS`] are open at once:
//! the rest of the connections stay for `/health`, `/metrics` and the ingest API.

pub mod api;
pub mod page;
pub mod shapes;
pub mod token;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::buffer::Buffer;
use crate::metrics::Metrics;
use crate::record::unix_ms;

/// Buffer fill above this makes `/health` 503.
pub const BUFFER_UNHEALTHY_FILL: f64 = 0.9;

/// What the HTTP endpoints read: counters, the buffer, and when to call Kafka unhealthy.
pub struct HttpState {
    /// Shown on `/status`.
    pub agent_id: String,
    /// Counters and device states.
    pub metrics: Arc<Metrics>,
    /// Records, bytes and oldest age for `/status` and `/health`.
    pub buffer: Arc<Buffer>,
    /// Kafka down this long makes /health unhealthy.
    pub kafka_unhealthy_after: Duration,
    /// Whether the command consumer's loop is expected to beat.
    pub commands_enabled: bool,
    /// The ingest API, when `[[api.clients]]` are configured.
    pub api: Option<api::Api>,
    /// What the status page shows.
    pub live: Arc<crate::live::Live>,
    /// The page's buttons, when operators are configured.
    pub local: Option<page::Local>,
    /// Event streams open now, at most [`MAX_STREAMS`].
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Event streams refused because [`MAX_STREAMS`] were open.
    pub streams_refused: std::sync::atomic::AtomicU64,
}

impl HttpState {
    /// The buffer's figures without touching its disk ([`Buffer::stats_for_async`]).
    pub fn buffer_stats(&self) -> crate::buffer::Stats {
        Buffer::stats_for_async(&self.buffer)
    }

    /// A slot for an event stream, held for as long as the stream is open; `None` (and
    /// counted) when [`MAX_STREAMS`] are open: answer [`streams_busy`] instead.
    pub fn stream_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slot = self.streams.clone().try_acquire_owned().ok();
        if slot.is_none() {
            self.streams_refused.fetch_add(1, Relaxed);
        }
        slot
    }

    /// Reasons the agent is not healthy; empty when it is.
    pub fn health_reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        let m = &self.metrics;
        if !m.kafka_connected.load(Relaxed) {
            let last = m.kafka_last_connected_ms.load(Relaxed);
            let down_for = if last == 0 {
                m.started.map_or(Duration::ZERO, |s| s.elapsed())
            } else {
                Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(last))
            };
            if down_for > self.kafka_unhealthy_after {
                out.push(format!("kafka unreachable for {}s", down_for.as_secs()));
            }
        }
        // A stalled broker keeps its TCP connections open, so "connected" can stay true
        // for a minute: records waiting with no acknowledgement is the surer sign.
        let stats = self.buffer_stats();
        let since_ack = Duration::from_millis(
            unix_ms(SystemTime::now()).saturating_sub(m.last_delivery_ms.load(Relaxed)),
        );
        let limit = self.kafka_unhealthy_after;
        if out.is_empty()
            && stats.records > 0
            && stats.oldest_age_seconds > limit.as_secs_f64()
            && since_ack > limit
        {
            out.push(format!(
                "kafka unreachable: nothing acknowledged for {}s, {} records waiting",
                since_ack.as_secs().min(stats.oldest_age_seconds as u64),
                stats.records
            ));
        }
        if let Some(e) = m.auth_error() {
            out.push(format!("kafka refuses this agent: {e}"));
        }
        if stats.low_disk {
            out.push(format!(
                "disk nearly full: {} bytes free on the data dir's filesystem, below the floor of {} (buffer.min_free_bytes)",
                stats.disk_free_bytes, stats.disk_floor_bytes
            ));
        }
        let fill = self.buffer.fill_ratio();
        if fill > BUFFER_UNHEALTHY_FILL {
            out.push(format!("buffer {:.0}% full", fill * 100.0));
        }
        for (id, d) in m.device_snapshot() {
            if d.state.unhealthy() {
                out.push(format!("device {id} {}", d.state.as_str()));
            }
        }
        for stuck in m.beats.stale(self.commands_enabled) {
            out.push(format!("{stuck} loop not making progress"));
        }
        out
    }

    /// The `/status` document: agent, devices, buffer, Kafka, commands.
    pub fn status(&self) -> serde_json::Value {
        let m = &self.metrics;
        json!({
            "agent_id": self.agent_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": m.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
            "health": self.health_reasons(),
            "kafka": {
                "connected": m.kafka_connected.load(Relaxed),
                "last_connected_ms": m.kafka_last_connected_ms.load(Relaxed),
                "records_delivered": m.records_delivered.load(Relaxed),
                "delivery_errors": m.delivery_errors.load(Relaxed),
            },
            "buffer": self.buffer_stats(),
            "records_buffered": m.records_ingested.load(Relaxed),
            "records_dropped": m.dropped_total(),
            "devices": m.device_snapshot(),
            "commands": {
                "assigned": m.commands_assigned.load(Relaxed),
                "accepted": m.commands_accepted.load(Relaxed),
                "completed": m.commands_completed.load(Relaxed),
                "failed": m.commands_failed.load(Relaxed),
                "rejected": m.commands_rejected.load(Relaxed),
                "duplicate": m.commands_duplicate.load(Relaxed),
                "timeout": m.commands_timeout.load(Relaxed),
                "ignored": m.commands_ignored.load(Relaxed),
            },
        })
    }
}

/// A JSON answer with this status.
pub(crate) fn json_reply(code: StatusCode, body: serde_json::Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn health(State(st): State<Arc<HttpState>>) -> Response {
    let reasons = st.health_reasons();
    let code = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body =
        json!({"status": if reasons.is_empty() {"ok"} else {"unhealthy"}, "reasons": reasons});
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    let mut text = st.metrics.render(&st.buffer_stats());
    if let Some(api) = &st.api {
        api.render_metrics(&mut text);
    }
    {
        use std::fmt::Write;
        let _ = writeln!(
            text,
            "# HELP labgate_http_streams_open Event streams open (the page's /live, app command streams).\n# TYPE labgate_http_streams_open gauge\nlabgate_http_streams_open {}",
            MAX_STREAMS.saturating_sub(st.streams.available_permits())
        );
        let _ = writeln!(
            text,
            "# HELP labgate_http_streams_refused_total Event streams refused because {MAX_STREAMS} were open.\n# TYPE labgate_http_streams_refused_total counter\nlabgate_http_streams_refused_total {}",
            st.streams_refused.load(Relaxed)
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn status(State(st): State<Arc<HttpState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.status().to_string(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../../schemas/openapi.json"),
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"error": "not_found"}).to_string(),
    )
        .into_response()
}

fn ingest_route(kind: shapes::Kind) -> axum::routing::MethodRouter<Arc<HttpState>> {
    post(
        move |State(st): State<Arc<HttpState>>, headers: HeaderMap, body: Body| async move {
            api::ingest(st, kind, headers, body).await
        },
    )
}

/// Every route of the listener.
pub fn router(state: Arc<HttpState>) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::get(page::page))
        .route("/live", axum::routing::get(page::live))
        .route("/v1/local/commands", post(page::local_command))
        .route("/health", axum::routing::get(health))
        .route("/metrics", axum::routing::get(metrics))
        .route("/status", axum::routing::get(status))
        .route("/v1/openapi.json", axum::routing::get(openapi))
        .route("/v1/whoami", axum::routing::get(api::whoami))
        .route("/v1/events", ingest_route(shapes::Kind::Event))
        .route("/v1/data", ingest_route(shapes::Kind::Data))
        .route("/v1/readings", ingest_route(shapes::Kind::Reading))
        .route(
            "/v1/devices/{id}/commands",
            axum::routing::get(api::command_stream),
        )
        .route(
            "/v1/commands/{command_id}/result",
            post(api::command_result),
        )
        .fallback(not_found)
        .with_state(state)
}

/// Connections served at once; more wait in the listen backlog, so a flood of idle
/// clients cannot exhaust the agent.
pub const MAX_CONNECTIONS: usize = 64;
/// The answer to an event stream beyond [`MAX_STREAMS`]: 503, try again in 5 s.
pub fn streams_busy() -> Response {
    let body = json!({"error": "busy", "reason": format!("{MAX_STREAMS} event streams are open already; try again later")});
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::RETRY_AFTER, "5"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// Event streams open at once; half the connections, so that a room full of status
/// pages (or a client that leaks them) cannot take the rest.
pub const MAX_STREAMS: usize = MAX_CONNECTIONS / 2;
/// A request's head must arrive within this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until shutdown.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>, shutdown: CancellationToken) {
    let app = router(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(IO_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "http connection ended with an error");
                },
                () = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

/// A minimal GET for the CLI (`labgate buffer stats` asks the running agent).
pub async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timeout"))??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The `[http]` section.
pub struct HttpConfig {
    /// Address of /health, /metrics and /status; empty string disables the server.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// /health reports Kafka unreachable once it has been for this long.
    #[serde(
        default = "default_unhealthy_after",
        with = "crate::time::serde_duration"
    )]
    pub kafka_unhealthy_after: Duration,
    /// Who may pause, resume and stop devices from the status page.
    #[serde(default)]
    pub operators: Vec<page::OperatorConfig>,
}

fn default_unhealthy_after() -> Duration {
    Duration::from_secs(30)
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            kafka_unhealthy_after: default_unhealthy_after(),
            operators: Vec::new(),
        }
    }
}

impl HttpConfig {
    /// The parsed listen address, or None when disabled. Validated by `Config::validate`.
    pub fn addr(&self) -> Option<SocketAddr> {
        if self.listen.is_empty() {
            None
        } else {
            self.listen.parse().ok()
        }
    }
}

impl HttpConfig {
    /// Checks the listen address; the key is relative to `[http]`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            return Err((
                "listen".into(),
                "must be an address such as 127.0.0.1:9464, or empty to disable".into(),
            ));
        }
        page::validate(&self.operators)
    }
}
