//! The ingest API: lab software hands records to the agent, and `app` devices receive
//! their commands, over HTTP on the agent's listener.
//!
//! - `POST /v1/events`, `/v1/data`, `/v1/readings`: one message (JSON), a JSON array,
//!   or NDJSON (`Content-Type: application/x-ndjson`, one message a line), in the
//!   shapes of [`super::shapes`]. `202` only once every record is durable in the buffer;
//!   `400` names the field; `401` without a known bearer token; `413` over
//!   `api.max_body_bytes`; `503` with `Retry-After` when the buffer refuses (the body
//!   lists which were refused).
//! - `GET /v1/devices/<id>/commands`: the app device's commands as Server-Sent Events.
//! - `POST /v1/commands/<command_id>/result`: `{"status": "completed"|"failed",
//!   "message": "…"}`.
//!
//! Each client has its own token (a secret read from a file, the environment or the
//! config) and writes as one device: its `device`, by default its name. It may read the
//! command stream of that device only. The API is off unless `[[api.clients]]` are
//! configured; it shares `http.listen`, which is loopback by default.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::shapes::{self, Kind};
use super::{json_reply as reply, token, HttpState};
use crate::devices::app::{AppHub, ToDriver};
use crate::ingest::{Ingest, IngestError};
use crate::secret::Secret;

/// The `[api]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Who may use the API; none = the API is off.
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    /// A request body larger than this is refused with 413.
    #[serde(default = "d_max_body")]
    pub max_body_bytes: usize,
}

fn d_max_body() -> usize {
    1 << 20
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            clients: Vec::new(),
            max_body_bytes: d_max_body(),
        }
    }
}

/// One `[[api.clients]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client's name (logs, audit).
    pub name: String,
    /// The device its records carry and whose commands it may read (default: `name`).
    #[serde(default)]
    pub device: Option<String>,
    /// The bearer token inline; prefer `token_file` or `token_env`. Never printed.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file holding the token (its trailing newline is not part of it).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
}

impl ClientConfig {
    /// The device the client writes as.
    pub fn device(&self) -> &str {
        self.device.as_deref().unwrap_or(&self.name)
    }

    fn token(&self) -> Result<Secret, (String, String)> {
        token::read(
            self.token.as_ref(),
            self.token_file.as_deref(),
            self.token_env.as_deref(),
        )
    }
}

impl ApiConfig {
    /// Whether the API is on.
    pub fn enabled(&self) -> bool {
        !self.clients.is_empty()
    }

    /// Checks names, devices and tokens; `devices` are the configured devices (id,
    /// kind). Keys are relative to `[api]`.
    pub fn validate(&self, devices: &[(String, &'static str)]) -> Result<(), (String, String)> {
        if self.max_body_bytes < 1024 || self.max_body_bytes > 64 << 20 {
            return Err((
                "max_body_bytes".into(),
                "must be between 1024 and 67108864".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut tokens = HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            let k = |f: &str| format!("clients[{i}].{f}");
            if !crate::record::valid_id(&c.name) {
                return Err((
                    k("name"),
                    "must be 1-64 characters of letters, digits, '-', '_', '.'".into(),
                ));
            }
            if !names.insert(c.name.clone()) {
                return Err((k("name"), format!("{:?} is used by another client", c.name)));
            }
            if !crate::record::valid_id(c.device()) || c.device() == crate::record::AGENT_DEVICE {
                return Err((
                    k("device"),
                    "must be a device id (letters, digits, '-', '_', '.'), not \"agent\"".into(),
                ));
            }
            if let Some((_, kind)) = devices.iter().find(|(id, _)| id == c.device()) {
                if *kind != "app" {
                    return Err((
                        k("device"),
                        format!("{:?} is a {kind} device; an API client writes as an app device or as a device id no instrument uses", c.device()),
                    ));
                }
            }
            let t = c.token().map_err(|(f, m)| (k(&f), m))?;
            if !tokens.insert(token::digest(t.expose())) {
                return Err((k("token"), "is the same as another client's token".into()));
            }
        }
        Ok(())
    }
}

/// A client as the running API knows it.
struct Client {
    name: String,
    device: String,
    token: token::Digest,
}

/// Counters of the API, on `/metrics`.
#[derive(Default)]
pub struct ApiCounters {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    bad_request: AtomicU64,
    unauthorized: AtomicU64,
    too_large: AtomicU64,
    unavailable: AtomicU64,
    results: AtomicU64,
}

/// Event ids remembered (those clients brought, once durable), to answer a retry as a
/// duplicate instead of buffering the record twice.
pub const REMEMBERED_EVENT_IDS: usize = 10_000;

/// The running API.
pub struct Api {
    clients: Vec<Client>,
    max_body: usize,
    /// Taken at shutdown, so that ingest can finish: requests are then answered 503.
    ingest: RwLock<Option<Ingest>>,
    apps: Arc<AppHub>,
    seen: Mutex<(HashSet<uuid::Uuid>, VecDeque<uuid::Uuid>)>,
    counters: ApiCounters,
}

/// A request body is read within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Records are durable within this, or the request is answered 503.
pub const DURABLE_TIMEOUT: Duration = Duration::from_secs(30);

impl Api {
    /// The API for a checked config (tokens are read again; a token file that vanished
    /// since `check` is an error).
    pub fn new(
        cfg: &ApiConfig,
        ingest: Ingest,
        apps: Arc<AppHub>,
    ) -> Result<Api, (String, String)> {
        let mut clients = Vec::new();
        for (i, c) in cfg.clients.iter().enumerate() {
            let t = c
                .token()
                .map_err(|(f, m)| (format!("api.clients[{i}].{f}"), m))?;
            clients.push(Client {
                name: c.name.clone(),
                device: c.device().to_string(),
                token: token::digest(t.expose()),
            });
        }
        Ok(Api {
            clients,
            max_body: cfg.max_body_bytes,
            ingest: RwLock::new(Some(ingest)),
            apps,
            seen: Mutex::new((HashSet::new(), VecDeque::new())),
            counters: ApiCounters::default(),
        })
    }

    /// Stops taking records (shutdown): the agent's ingest can then end.
    pub fn close(&self) {
        self.ingest
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn ingest(&self) -> Option<Ingest> {
        self.ingest
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn client(&self, headers: &HeaderMap) -> Option<&Client> {
        token::find(headers, &self.clients, |c| &c.token)
    }

    fn seen(&self, id: &uuid::Uuid) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .contains(id)
    }

    fn remember(&self, ids: impl IntoIterator<Item = uuid::Uuid>) {
        let mut g = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let (set, order) = &mut *g;
        for id in ids {
            if set.insert(id) {
                order.push_back(id);
            }
            while order.len() > REMEMBERED_EVENT_IDS {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
    }

    /// The API's lines for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let c = &self.counters;
        let _ = writeln!(out, "# HELP labgate_api_records_total Records lab software posted, by outcome.\n# TYPE labgate_api_records_total counter");
        let _ = writeln!(
            out,
            "labgate_api_records_total{{outcome=\"accepted\"}} {}",
            c.accepted.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "labgate_api_records_total{{outcome=\"duplicate\"}} {}",
            c.duplicates.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP labgate_api_requests_refused_total API requests refused, by reason.\n# TYPE labgate_api_requests_refused_total counter");
        for (reason, v) in [
            ("bad_request", &c.bad_request),
            ("unauthorized", &c.unauthorized),
            ("too_large", &c.too_large),
            ("unavailable", &c.unavailable),
        ] {
            let _ = writeln!(
                out,
                "labgate_api_requests_refused_total{{reason=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP labgate_api_command_results_total Command results applications posted.\n# TYPE labgate_api_command_results_total counter");
        let _ = writeln!(
            out,
            "labgate_api_command_results_total {}",
            c.results.load(Relaxed)
        );
    }
}

fn unauthorized(api: &Api) -> Response {
    api.counters.unauthorized.fetch_add(1, Relaxed);
    let mut r = reply(
        StatusCode::UNAUTHORIZED,
        json!({"error": "unauthorized", "reason": "a known bearer token is required (Authorization: Bearer <token>)"}),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"labgate\""),
    );
    r
}

fn unavailable(api: &Api, body: Value) -> Response {
    api.counters.unavailable.fetch_add(1, Relaxed);
    let mut r = reply(StatusCode::SERVICE_UNAVAILABLE, body);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

fn invalid(api: &Api, field: &str, reason: &str, index: Option<usize>) -> Response {
    api.counters.bad_request.fetch_add(1, Relaxed);
    let mut b = json!({"error": "invalid", "field": field, "reason": reason});
    if let Some(i) = index {
        b["index"] = i.into();
    }
    reply(StatusCode::BAD_REQUEST, b)
}

fn off() -> Response {
    reply(
        StatusCode::NOT_FOUND,
        json!({"error": "not_found", "reason": "the ingest API is off: no [[api.clients]] are configured"}),
    )
}

/// Reads a body up to the limit, within [`BODY_TIMEOUT`].
async fn read_body(api: &Api, body: Body) -> Result<bytes::Bytes, Response> {
    let limited = http_body_util::Limited::new(body, api.max_body);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => {
            api.counters.bad_request.fetch_add(1, Relaxed);
            Err(reply(
                StatusCode::REQUEST_TIMEOUT,
                json!({"error": "timeout", "reason": format!("the body did not arrive within {}s", BODY_TIMEOUT.as_secs())}),
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            api.counters.too_large.fetch_add(1, Relaxed);
            Err(reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "too_large", "reason": format!("bodies are at most {} bytes (api.max_body_bytes)", api.max_body), "limit": api.max_body}),
            ))
        }
        Ok(Err(e)) => {
            api.counters.bad_request.fetch_add(1, Relaxed);
            Err(reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid", "field": "body", "reason": format!("cannot read the body: {e}")}),
            ))
        }
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// The messages of a body: one object, an array, or NDJSON lines.
fn messages(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<Value>, (String, String, Option<usize>)> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match ctype.as_str() {
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/x-jsonlines" => {
            let text = std::str::from_utf8(body)
                .map_err(|_| ("body".to_string(), "is not UTF-8".to_string(), None))?;
            let mut out = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v = serde_json::from_str(line).map_err(|e| {
                    (
                        "body".to_string(),
                        format!("line {}: not JSON: {e}", n + 1),
                        Some(out.len()),
                    )
                })?;
                out.push(v);
            }
            Ok(out)
        }
        "application/json" | "text/json" | "" => {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| ("body".to_string(), format!("not JSON: {e}"), None))?;
            Ok(match v {
                Value::Array(list) => list,
                other => vec![other],
            })
        }
        other => Err((
            "Content-Type".to_string(),
            format!("{other} is not taken; send application/json or application/x-ndjson"),
            None,
        )),
    }
}

/// Records a request may carry at most.
pub const MAX_BATCH: usize = 10_000;

/// `POST /v1/events|data|readings`.
pub async fn ingest(state: Arc<HttpState>, kind: Kind, headers: HeaderMap, body: Body) -> Response {
    let Some(api) = state.api.as_ref() else {
        return off();
    };
    let Some(client) = api.client(&headers) else {
        return unauthorized(api);
    };
    let bytes = match read_body(api, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let values = match messages(&headers, &bytes) {
        Ok(v) => v,
        Err((field, reason, index)) => {
            if field == "Content-Type" {
                api.counters.bad_request.fetch_add(1, Relaxed);
                return reply(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    json!({"error": "unsupported_media_type", "reason": reason}),
                );
            }
            return invalid(api, &field, &reason, index);
        }
    };
    if values.is_empty() {
        return invalid(api, "body", "no records", None);
    }
    if values.len() > MAX_BATCH {
        return invalid(
            api,
            "body",
            &format!("at most {MAX_BATCH} records a request"),
            None,
        );
    }
    let batch = values.len() > 1;
    let mut parsed = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        match shapes::parse(kind, v, &client.device) {
            Ok(m) => parsed.push(m),
            Err(e) => return invalid(api, &e.field, &e.reason, batch.then_some(i)),
        }
    }
    let Some(ingest) = api.ingest() else {
        return unavailable(
            api,
            json!({"error": "shutting_down", "reason": "the agent is stopping"}),
        );
    };
    let mut receipts = Vec::with_capacity(parsed.len());
    let mut event_ids = Vec::with_capacity(parsed.len());
    let mut duplicates = 0u64;
    let mut brought = Vec::new();
    for (i, mut m) in parsed.into_iter().enumerate() {
        let id = match m.draft.event_id {
            Some(id) if api.seen(&id) => {
                duplicates += 1;
                event_ids.push(id.to_string());
                continue;
            }
            Some(id) => {
                brought.push((i, id));
                id
            }
            None => uuid::Uuid::new_v4(),
        };
        m.draft.event_id = Some(id);
        event_ids.push(id.to_string());
        if let Some(exp) = &m.experiment_id {
            match &m.meta {
                Some(meta) => api.apps.describe_run(&client.device, exp, meta.clone()),
                None => m.draft.run = api.apps.run(&client.device, exp),
            }
            if m.event.as_deref().and_then(crate::runs::ending).is_some() {
                api.apps.end_run(&client.device, exp);
            }
        }
        match ingest.send_tracked(m.draft).await {
            Ok(r) => receipts.push((i, r)),
            Err(_) => {
                return unavailable(
                    api,
                    json!({"error": "shutting_down", "reason": "the agent is stopping"}),
                );
            }
        }
    }
    drop(ingest);
    let mut refused = Vec::new();
    let mut failed = None;
    for (i, r) in receipts {
        match tokio::time::timeout(DURABLE_TIMEOUT, r).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(IngestError::Rejected))) => refused.push(i),
            Ok(Ok(Err(e))) => failed = Some(e.to_string()),
            Ok(Err(_)) => failed = Some("the agent stopped before the record was durable".into()),
            Err(_) => failed = Some(format!("not durable within {}s", DURABLE_TIMEOUT.as_secs())),
        }
    }
    let refused_set: HashSet<usize> = refused.iter().copied().collect();
    api.remember(
        brought
            .into_iter()
            .filter(|(i, _)| !refused_set.contains(i))
            .map(|(_, id)| id),
    );
    let accepted = event_ids.len() as u64 - duplicates - refused.len() as u64;
    if let Some(reason) = failed {
        tracing::warn!(client = %client.name, %reason, "ingest API: records not confirmed durable");
        return unavailable(api, json!({"error": "not_durable", "reason": reason}));
    }
    api.counters.accepted.fetch_add(accepted, Relaxed);
    api.counters.duplicates.fetch_add(duplicates, Relaxed);
    if !refused.is_empty() {
        return unavailable(
            api,
            json!({"error": "buffer_full", "reason": "the buffer is full (buffer.overflow = reject_new) or the disk is low; send the refused records again later",
                   "accepted": accepted, "refused": refused}),
        );
    }
    reply(
        StatusCode::ACCEPTED,
        json!({"accepted": accepted, "duplicates": duplicates, "event_ids": event_ids}),
    )
}

/// `GET /v1/devices/<id>/commands`: the app device's commands as Server-Sent Events.
pub async fn command_stream(
    State(state): State<Arc<HttpState>>,
    Path(device): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(api) = state.api.as_ref() else {
        return off();
    };
    let Some(client) = api.client(&headers) else {
        return unauthorized(api);
    };
    if client.device != device {
        api.counters.unauthorized.fetch_add(1, Relaxed);
        return reply(
            StatusCode::FORBIDDEN,
            json!({"error": "forbidden", "reason": format!("this token reads the commands of {:?} only", client.device)}),
        );
    }
    let Some(driver) = api.apps.driver(&device) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "reason": format!("no app device {device:?} is running (add [[devices]] kind = \"app\", id = {device:?})")}),
        );
    };
    let Some(slot) = state.stream_slot() else {
        return super::streams_busy();
    };
    let (tx, rx) = mpsc::channel(32);
    if driver.send(ToDriver::Attach(tx)).await.is_err() {
        return unavailable(
            api,
            json!({"error": "unavailable", "reason": "the device is restarting"}),
        );
    }
    tracing::info!(client = %client.name, %device, "command stream opened");
    let stream = futures_util::stream::unfold((rx, slot), |(mut rx, slot)| async move {
        let m = rx.recv().await?;
        let id = m
            .get("command_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let ev = Event::default().event("command").id(id).data(m.to_string());
        Some((Ok::<_, Infallible>(ev), (rx, slot)))
    });
    let hello = futures_util::stream::once(async {
        Ok::<_, Infallible>(
            Event::default()
                .event("ready")
                .retry(Duration::from_secs(2))
                .data("{}"),
        )
    });
    use futures_util::StreamExt;
    Sse::new(hello.chain(stream))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultBody {
    status: String,
    #[serde(default, alias = "text", alias = "detail")]
    message: Option<String>,
}

/// `POST /v1/commands/<command_id>/result`.
pub async fn command_result(
    State(state): State<Arc<HttpState>>,
    Path(command_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(api) = state.api.as_ref() else {
        return off();
    };
    let Some(client) = api.client(&headers) else {
        return unauthorized(api);
    };
    let bytes = match read_body(api, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let r: ResultBody = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return invalid(
                api,
                "body",
                &format!(
                    "expected {{\"status\": \"completed\"|\"failed\", \"message\": \"…\"}}: {e}"
                ),
                None,
            )
        }
    };
    let text = r.message.unwrap_or_default();
    if text.len() > 1000 {
        return invalid(api, "message", "at most 1000 bytes", None);
    }
    let outcome = match r.status.as_str() {
        "completed" => Ok(if text.is_empty() {
            "completed by the application".into()
        } else {
            text
        }),
        "failed" => Err(if text.is_empty() {
            "failed in the application".into()
        } else {
            text
        }),
        _ => return invalid(api, "status", "must be \"completed\" or \"failed\"", None),
    };
    let Some(driver) = api.apps.driver(&client.device) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "reason": format!("no app device {:?} is running", client.device)}),
        );
    };
    let (done, found) = oneshot::channel();
    let ok = driver
        .send(ToDriver::Answer {
            command_id: command_id.clone(),
            outcome,
            done,
        })
        .await
        .is_ok()
        && found.await.unwrap_or(false);
    if !ok {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "reason": format!("no command {command_id:?} is waiting for a result from {:?} (unknown, already answered, or past its deadline and reported as timeout)", client.device)}),
        );
    }
    api.counters.results.fetch_add(1, Relaxed);
    tracing::info!(client = %client.name, %command_id, status = %r.status, "command result from the application");
    reply(
        StatusCode::OK,
        json!({"command_id": command_id, "status": r.status}),
    )
}

/// `GET /v1/whoami`: the client a token belongs to and the device it writes as.
pub async fn whoami(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let Some(api) = state.api.as_ref() else {
        return off();
    };
    let Some(client) = api.client(&headers) else {
        return unauthorized(api);
    };
    reply(
        StatusCode::OK,
        json!({
            "client": client.name,
            "device": client.device,
            "agent_id": state.agent_id,
            "app_device": api.apps.driver(&client.device).is_some(),
        }),
    )
}
