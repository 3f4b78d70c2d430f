//! The control-plane lease: a device with `lease` set goes to its safe state when the
//! command topic has been unreachable for that long, since nobody could stop it then.
//!
//! Reachability is the last time a command arrived or a probe (the command topic's
//! watermarks, which needs its partition leader) answered. Tripping sends the safe-state
//! command through the device's inbox like any other (a stop overtakes queued work) and
//! says so in a `lease_expired` event; `lease_restored` follows when the topic is back.
//! The device stays in its safe state: resuming is an operator's decision.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::policy::CommandsConfig;
use super::{CommandContext, Contact, Handler};
use crate::devices::Control;
use crate::record::object;

pub(super) async fn watch(
    policy: CommandsConfig,
    topic: String,
    consumer: Arc<StreamConsumer<CommandContext>>,
    contact: Arc<Contact>,
    handler: Arc<Handler>,
    stop: CancellationToken,
) {
    let leased: Vec<_> = policy
        .devices
        .iter()
        .filter_map(|(id, p)| p.lease.map(|l| (id.clone(), l, p.safe_state)))
        .collect();
    let Some(shortest) = leased.iter().map(|l| l.1).min() else {
        return;
    };
    let period = (shortest / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let probe_timeout = (shortest / 2).clamp(Duration::from_millis(500), Duration::from_secs(5));
    tracing::info!(devices = leased.len(), ?period, "control-plane lease armed");
    let mut tripped = BTreeSet::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = stop.cancelled() => return,
        }
        if contact.silent_for() >= period {
            let (c, t) = (consumer.clone(), topic.clone());
            let probe = tokio::task::spawn_blocking(move || {
                c.fetch_watermarks(&t, 0, probe_timeout).is_ok()
            });
            let ok = tokio::select! {
                r = probe => r.unwrap_or(false),
                () = stop.cancelled() => return,
            };
            if ok {
                contact.touch();
            }
        }
        let silent = contact.silent_for();
        for (id, lease, safe) in &leased {
            if silent > *lease && !tripped.contains(id) {
                tripped.insert(id.clone());
                trip(&handler, id, *lease, silent, *safe, policy.timeout).await;
            } else if silent <= *lease && tripped.remove(id) {
                tracing::info!(device = %id, "command topic reachable again; lease restored");
                handler
                    .ingest
                    .event("lease_restored", object([("device_id", id.clone().into())]))
                    .await;
            }
        }
    }
}

async fn trip(
    handler: &Handler,
    id: &str,
    lease: Duration,
    silent: Duration,
    safe: super::policy::SafeState,
    timeout: Duration,
) {
    let command = safe.command();
    let outbox = handler.router.read(|r| r.outboxes.get(id).cloned());
    let (reply, rx) = oneshot::channel();
    let control = Control {
        command,
        params: Default::default(),
        command_id: format!("lease-{id}-{}", uuid::Uuid::new_v4()),
        issuer: None,
        reply,
    };
    let outcome = match outbox.map(|o| o.send(control)) {
        None | Some(Err(_)) => Err("device is not running or not taking commands".to_string()),
        Some(Ok(())) => match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("device task ended before answering".into()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        },
    };
    tracing::warn!(
        device = %id,
        lease = ?lease,
        silent = ?silent,
        safe_state = command.as_str(),
        outcome = ?outcome,
        "command topic unreachable beyond the lease: device sent to its safe state"
    );
    let (ok, detail) = match outcome {
        Ok(d) => (true, d),
        Err(e) => (false, e),
    };
    handler
        .ingest
        .event(
            "lease_expired",
            object([
                ("device_id", id.into()),
                ("safe_state", command.as_str().into()),
                ("lease_seconds", lease.as_secs_f64().into()),
                ("unreachable_seconds", silent.as_secs_f64().into()),
                ("ok", ok.into()),
                ("outcome", detail.into()),
            ]),
        )
        .await;
}
