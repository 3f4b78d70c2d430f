//! The status page: `/` (one HTML document with its script and styles inside, built into
//! the binary: no CDN, works on an isolated lab network), `/live` (its Server-Sent
//! Events: a snapshot, then what happens), and `POST /v1/local/commands` (pause, resume,
//! stop from an operator at the instrument).
//!
//! Local control needs an operator token (`[[http.operators]]`; a token file must not be
//! readable by everyone). A local command goes through the command handler like one
//! from Kafka — device allow-list, replay store, the device's inbox, `accepted` then the
//! final result, audit — with issuer `local:<name>`, and works while Kafka is away.
//! Without operators the page is read-only.

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::{json_reply as reply, token, HttpState};
use crate::commands::Handler;
use crate::devices::CommandKind;
use crate::secret::Secret;

/// The page, as built into the binary.
pub const PAGE: &str = include_str!("page.html");

/// One `[[http.operators]]` entry: who may press the page's buttons.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// The operator's name; commands carry `local:<name>` as their issuer.
    pub name: String,
    /// The token inline; prefer `token_file` or `token_env`. Never printed.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file holding the token; it must not be readable by everyone (0640 with the
    /// lab's group, or 0600).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// What the operator may do (default: pause, resume, stop).
    #[serde(default = "d_commands")]
    pub commands: Vec<CommandKind>,
}

fn d_commands() -> Vec<CommandKind> {
    vec![CommandKind::Pause, CommandKind::Resume, CommandKind::Stop]
}

impl OperatorConfig {
    fn read_token(&self) -> Result<Secret, (String, String)> {
        if let Some(f) = &self.token_file {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(f)
                .map_err(|e| ("token_file".to_string(), format!("{}: {e}", f.display())))?
                .permissions()
                .mode();
            if mode & 0o004 != 0 {
                return Err((
                    "token_file".into(),
                    format!(
                        "{} is readable by everyone (mode {:o}); make it readable only by the service user and the lab group (chmod 0640)",
                        f.display(),
                        mode & 0o777
                    ),
                ));
            }
        }
        token::read(
            self.token.as_ref(),
            self.token_file.as_deref(),
            self.token_env.as_deref(),
        )
    }
}

/// Checks `[[http.operators]]`; keys are relative to `[http]`.
pub fn validate(ops: &[OperatorConfig]) -> Result<(), (String, String)> {
    let mut names = HashSet::new();
    for (i, o) in ops.iter().enumerate() {
        let k = |f: &str| format!("operators[{i}].{f}");
        if !crate::record::valid_id(&o.name) {
            return Err((
                k("name"),
                "must be 1-64 characters of letters, digits, '-', '_', '.'".into(),
            ));
        }
        if !names.insert(&o.name) {
            return Err((k("name"), format!("{:?} is used twice", o.name)));
        }
        if o.commands.is_empty() || o.commands.iter().any(|c| c.is_action()) {
            return Err((k("commands"), "a list of start, pause, resume, stop".into()));
        }
        o.read_token().map_err(|(f, m)| (k(&f), m))?;
    }
    Ok(())
}

struct Operator {
    name: String,
    token: token::Digest,
    commands: Vec<CommandKind>,
}

/// Local control as the running page has it.
pub struct Local {
    operators: Vec<Operator>,
    /// Taken at shutdown (it holds an ingest handle, which must go for ingest to end).
    handler: RwLock<Option<Arc<Handler>>>,
}

impl Local {
    /// Local control for checked operators, through `handler`.
    pub fn new(ops: &[OperatorConfig], handler: Arc<Handler>) -> Result<Local, (String, String)> {
        let mut operators = Vec::new();
        for (i, o) in ops.iter().enumerate() {
            let t = o
                .read_token()
                .map_err(|(f, m)| (format!("http.operators[{i}].{f}"), m))?;
            operators.push(Operator {
                name: o.name.clone(),
                token: token::digest(t.expose()),
                commands: o.commands.clone(),
            });
        }
        Ok(Local {
            operators,
            handler: RwLock::new(Some(handler)),
        })
    }

    /// Stops taking commands (shutdown).
    pub fn close(&self) {
        self.handler
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn operator(&self, headers: &HeaderMap) -> Option<&Operator> {
        token::find(headers, &self.operators, |o| &o.token)
    }
}

/// `GET /`: the page.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /live`: a snapshot, then the live feed (status every two seconds among it).
pub async fn live(State(st): State<Arc<HttpState>>) -> Response {
    let Some(slot) = st.stream_slot() else {
        return super::streams_busy();
    };
    // Subscribed before the snapshot is taken, so nothing falls between the two.
    let rx = st.live.subscribe();
    let first =
        futures_util::stream::once(std::future::ready(Ok::<_, Infallible>(snapshot_event(&st))));
    // The slot goes with the stream: released when the page goes away.
    let feed = futures_util::stream::unfold((rx, st, slot), |(mut rx, st, slot)| async move {
        let ev = match rx.recv().await {
            Ok(msg) => Event::default().data(&*msg),
            // Fell behind (a page that stopped reading): start it again from a snapshot.
            Err(RecvError::Lagged(_)) => snapshot_event(&st),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(ev), (rx, st, slot)))
    });
    use futures_util::StreamExt;
    Sse::new(first.chain(feed))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn snapshot_event(st: &HttpState) -> Event {
    let mut snap = st.live.snapshot();
    snap["status"] = st.status();
    snap["control"] = st
        .local
        .as_ref()
        .is_some_and(|l| !l.operators.is_empty())
        .into();
    Event::default().data(snap.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalCommand {
    device: String,
    command: String,
}

/// `POST /v1/local/commands`: `{"device": "pstat-1", "command": "stop"}` with an
/// operator's token. `202 {"command_id"}` once the command is accepted or refused; its
/// results follow on the feed and the results topic like any command's.
pub async fn local_command(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(local) = st.local.as_ref().filter(|l| !l.operators.is_empty()) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "reason": "local control is off: no [[http.operators]] are configured"}),
        );
    };
    let Some(op) = local.operator(&headers) else {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "unauthorized", "reason": "an operator token is required"}),
        );
    };
    let c: LocalCommand = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid", "field": "body", "reason": format!("expected {{\"device\": \"…\", \"command\": \"stop\"}}: {e}")}),
            )
        }
    };
    let Some(kind) = CommandKind::parse(&c.command).filter(|k| !k.is_action()) else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid", "field": "command", "reason": "must be start, pause, resume or stop"}),
        );
    };
    let handler = local
        .handler
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let Some(handler) = handler else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "shutting_down", "reason": "the agent is stopping"}),
        );
    };
    tracing::info!(target: "labgate::audit", operator = %op.name, device = %c.device, command = %c.command, "local command from the status page");
    let id = handler
        .handle_local(&op.name, &op.commands, &c.device, kind)
        .await;
    reply(StatusCode::ACCEPTED, json!({"command_id": id}))
}
