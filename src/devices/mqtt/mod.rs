//! `mqtt`: sensors on an MQTT broker (rumqttc), and hardware controlled through it.
//!
//! One device is one broker connection: QoS 1 subscriptions on a persistent session
//! (`clean_session = false`, a stable client id) with manual acks. A message is acked
//! only once the records made from it are durable in the buffer, and acks go out in the
//! order the messages came in; so a crash, a kill or a broker restart makes the broker
//! deliver again whatever was not yet durable (at least once). Subscriptions are made
//! again on every connect.
//!
//! Commands for the device are published to the topic and payload configured for each
//! command (Zigbee2MQTT `…/set`, Homie `…/set`, a Sparkplug DCMD), QoS 1; the result is
//! `completed` when the broker acknowledges the publish.

pub mod mapping;
pub mod sparkplug;
pub mod topic;
pub mod types;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing as Out, Packet, QoS, Transport};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{Backoff, CommandKind, Control, DeviceCtx, DeviceError};
use crate::ingest::{IngestError, Tally};
use crate::record::{object, Body, Draft};
use mapping::{Mapper, Subscription};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// An `mqtt` device: one broker connection and its subscriptions.
pub struct Config {
    /// The device id records and commands carry.
    pub id: String,
    /// `mqtt://host:1883` or `mqtts://host:8883` (TLS).
    pub broker: String,
    /// Defaults to `labgate-<agent_id>-<device id>`; must be stable (the broker keeps
    /// the session and the unacknowledged messages under it) and unique on the broker.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    /// Broker user name, if the broker wants one.
    pub username: Option<String>,
    /// Prefer `password_file` (e.g. a systemd credential) or `password_env`. Never
    /// printed (`***`).
    #[serde(default)]
    pub password: Option<crate::secret::Secret>,
    #[serde(default)]
    /// A file holding the password (a systemd credential, say).
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// TLS: CA certificate (PEM) to trust instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// TLS client authentication: certificate and PKCS#8 key (PEM).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    /// TLS client key (PKCS#8 PEM), with `client_cert`.
    pub client_key: Option<PathBuf>,
    #[serde(default = "d_keep_alive", with = "crate::time::serde_duration")]
    /// MQTT keep-alive; a silent broker is noticed after about 1.5 × this.
    pub keep_alive: Duration,
    /// Largest message accepted (Zigbee2MQTT's `bridge/devices` can be large).
    #[serde(default = "d_max_packet")]
    pub max_packet_bytes: usize,
    #[serde(default)]
    /// Where the sensors are, copied into each reading.
    pub location: Option<String>,
    /// Malformed payloads are reported by one `mqtt_malformed` event per this interval.
    #[serde(default = "d_report", with = "crate::time::serde_duration")]
    pub malformed_report_every: Duration,
    /// What to subscribe to and how to read it.
    pub subscriptions: Vec<Subscription>,
    /// Commands this device carries out, by name (stop, pause, resume, start, …).
    #[serde(default)]
    pub commands: BTreeMap<String, CommandAction>,
}

fn d_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn d_max_packet() -> usize {
    4 << 20
}
fn d_report() -> Duration {
    Duration::from_secs(10)
}

/// What a command publishes: a payload as it is, or one Sparkplug metric write.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandAction {
    /// The topic published to.
    pub topic: String,
    #[serde(default)]
    /// The payload published, as written.
    pub payload: Option<String>,
    /// Sparkplug B: the metric a DCMD / NCMD writes, with `value`.
    #[serde(default)]
    pub sparkplug_metric: Option<String>,
    #[serde(default)]
    /// The value written to `sparkplug_metric`.
    pub value: Option<toml::Value>,
}

impl Config {
    /// Checks the broker URL, TLS files, password sources, subscriptions and commands.
    pub fn validate(&self) -> Result<(), (String, String)> {
        broker_addr(&self.broker).map_err(|m| ("broker".to_string(), m))?;
        if let Some(c) = &self.client_id {
            if c.is_empty() || c.len() > 128 {
                return Err(("client_id".into(), "must be 1-128 characters".into()));
            }
        }
        if self.password_sources().count() > 0 && self.username.is_none() {
            return Err(("username".into(), "is required with a password".into()));
        }
        self.password()?;
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err((
                "client_cert".into(),
                "client_cert and client_key go together".into(),
            ));
        }
        let tls = self.broker.starts_with("mqtts://");
        for (k, set) in [
            ("ca_file", self.ca_file.is_some()),
            ("client_cert", self.client_cert.is_some()),
        ] {
            if set && !tls {
                return Err((k.into(), "needs an mqtts:// broker".into()));
            }
        }
        if self.keep_alive < Duration::from_secs(5) || self.keep_alive > Duration::from_secs(3600) {
            return Err(("keep_alive".into(), "must be between 5s and 1h".into()));
        }
        if self.max_packet_bytes < 1024 || self.max_packet_bytes > 256 << 20 {
            return Err((
                "max_packet_bytes".into(),
                "must be between 1024 and 268435456".into(),
            ));
        }
        if self.malformed_report_every < Duration::from_secs(1) {
            return Err((
                "malformed_report_every".into(),
                "must be at least 1s".into(),
            ));
        }
        if self.subscriptions.is_empty() {
            return Err((
                "subscriptions".into(),
                "at least one subscription is required".into(),
            ));
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            s.validate()
                .map_err(|(k, m)| (format!("subscriptions[{i}].{k}"), m))?;
        }
        for (name, a) in &self.commands {
            let key = |k: &str| format!("commands.{name}{k}");
            if CommandKind::parse(name).is_none() {
                return Err((
                    key(""),
                    format!("unknown command; one of {}", CommandKind::NAMES),
                ));
            }
            if a.topic.is_empty() || a.topic.contains(['+', '#']) {
                return Err((key(".topic"), "must be a topic without wildcards".into()));
            }
            match (&a.payload, &a.sparkplug_metric, &a.value) {
                (Some(_), None, None) => {}
                (None, Some(_), Some(v)) => {
                    sparkplug::command_payload("x", v, SystemTime::now())
                        .map_err(|m| (key(".value"), m))?;
                }
                _ => {
                    return Err((
                        key(""),
                        "set payload, or sparkplug_metric with value".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    fn password_sources(&self) -> crate::secret::Sources<'_> {
        crate::secret::Sources {
            key: "password",
            inline: self.password.as_ref(),
            file: self.password_file.as_deref(),
            env: self.password_env.as_deref(),
        }
    }

    /// The password from whichever source is configured.
    pub fn password(&self) -> Result<Option<crate::secret::Secret>, (String, String)> {
        self.password_sources().read()
    }

    /// True when this device has an action configured for the command.
    pub fn accepts(&self, cmd: CommandKind) -> bool {
        self.commands.contains_key(cmd.as_str())
    }
}

/// (tls, host, port) of a broker URL.
pub(crate) fn broker_addr(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err("must start with mqtt:// or mqtts://".into());
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err("must be mqtt[s]://host[:port]".into());
    }
    Ok((tls, host.trim_matches(['[', ']']).to_string(), port))
}

/// Why the connection could not even be set up (bad TLS files): the supervisor retries.
fn options(cfg: &Config, client_id: &str) -> Result<MqttOptions, String> {
    let (tls, host, port) = broker_addr(&cfg.broker)?;
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(cfg.keep_alive)
        .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
        // Our own publishes are rare (commands, rebirth requests).
        .set_inflight(32);
    if let Some(user) = &cfg.username {
        let pw = cfg.password().map_err(|(k, m)| format!("{k}: {m}"))?;
        o.set_credentials(
            user.clone(),
            pw.map(|p| p.expose().to_string()).unwrap_or_default(),
        );
    }
    if tls {
        let mut b = native_tls::TlsConnector::builder();
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            let cert = native_tls::Certificate::from_pem(&pem)
                .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            b.add_root_certificate(cert);
        }
        if let (Some(c), Some(k)) = (&cfg.client_cert, &cfg.client_key) {
            let cert = std::fs::read(c).map_err(|e| format!("client_cert {}: {e}", c.display()))?;
            let key = std::fs::read(k).map_err(|e| format!("client_key {}: {e}", k.display()))?;
            let id = native_tls::Identity::from_pkcs8(&cert, &key)
                .map_err(|e| format!("client_cert/client_key: {e}"))?;
            b.identity(id);
        }
        let connector = b.build().map_err(|e| format!("TLS setup: {e}"))?;
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::NativeConnector(connector),
        ));
    }
    Ok(o)
}

/// A message waiting for its records to be durable before it is acked.
struct PendingAck {
    /// Its records' ticket in the session's [`Tally`]; a message without records has
    /// the ticket of the message before it, so it is acked in turn.
    ticket: u64,
    /// Whether it made records (a malformed message made none).
    records: bool,
    /// What the ack needs. Only this is kept, not the message: a broker may send a whole
    /// stored session before the first ack goes out (mosquitto does), so the queue can
    /// hold every message of a long outage.
    pkid: u16,
    qos: QoS,
}

/// The driver's side of acking: the queue to the acker, the durability tally its
/// records are counted in, and the last ticket issued.
struct Acks {
    tx: mpsc::UnboundedSender<PendingAck>,
    tally: Arc<Tally>,
    last: u64,
}

/// A command publish waiting for the broker's PUBACK.
struct PendingCommand {
    reply: oneshot::Sender<Result<String, String>>,
    topic: String,
}

/// Rate-limited reporting of malformed payloads.
struct Malformed {
    every: Duration,
    since_report: u64,
    last_report: Option<Instant>,
    last: Option<(String, String)>,
    logged_this_interval: u32,
}

/// Malformed payloads logged one by one per interval; the rest are summed up.
const MALFORMED_LOG_LINES: u32 = 5;

/// Driver entry point: connect, subscribe, map and acknowledge each message once durable, reconnect until shutdown.
pub async fn run(cfg: &Config, ctx: &mut DeviceCtx) -> Result<(), DeviceError> {
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("labgate-{}-{}", ctx.agent_id, ctx.id));
    let options = options(cfg, &client_id).map_err(DeviceError::Config)?;
    let mut mapper = Mapper::new(&cfg.subscriptions).map_err(DeviceError::Config)?;
    let filters = mapper.filters();
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    ctx.metrics.mqtt(&ctx.id, |_| {});
    ctx.set_state(crate::metrics::DeviceState::Connecting);

    // Acks in arrival order, each once its records are durable. Unbounded on purpose:
    // the driver must never wait on the acker (the acker waits on the client, which
    // only moves while the driver polls). The broker's in-flight window should bound how
    // many unacked messages exist, but mosquitto was seen sending far past it to a
    // session that acked slowly; an entry is 16 bytes, and with acks written in bursts
    // (vendor/rumqttc) they stayed under 30,000 in a drain of a million.
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<PendingAck>();
    let (refused_tx, mut refused_rx) = mpsc::channel::<()>(1);
    let mut acks = Acks {
        tx: ack_tx,
        tally: Arc::new(Tally::default()),
        last: 0,
    };
    let acker = tokio::spawn(ack_in_order(
        client.clone(),
        ack_rx,
        acks.tally.clone(),
        refused_tx,
        ctx.metrics.clone(),
        ctx.id.clone(),
    ));

    let mut connected = false;
    let mut backoff = Backoff::default();
    let mut queued: VecDeque<PendingCommand> = VecDeque::new();
    let mut by_pkid: HashMap<u16, PendingCommand> = HashMap::new();
    let mut malformed = Malformed {
        every: cfg.malformed_report_every,
        since_report: 0,
        last_report: None,
        last: None,
        logged_this_interval: 0,
    };
    let mut report_tick = tokio::time::interval(cfg.malformed_report_every);
    let result = loop {
        tokio::select! {
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected = true;
                    backoff.reset();
                    ctx.metrics.mqtt(&ctx.id, |m| m.connects += 1);
                    ctx.set_state(crate::metrics::DeviceState::Running);
                    tracing::info!(device = %ctx.id, broker = %cfg.broker, client_id, session_present = ack.session_present, "MQTT connected");
                    // Always subscribe again: the broker may have lost the session.
                    let subs = filters.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    if let Err(e) = client.subscribe_many(subs).await {
                        tracing::error!(device = %ctx.id, error = %e, "MQTT subscribe failed");
                    }
                    let mut data = object([
                        ("broker", cfg.broker.clone().into()),
                        ("client_id", client_id.clone().into()),
                        ("session_present", ack.session_present.into()),
                    ]);
                    data.insert("subscriptions".into(), filters.clone().into());
                    if let Err(e) = ctx.device_event("device_connected", data).await {
                        break Err(e);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    // The publishes decoded by the same read are taken here, not with a
                    // turn of this select each; they are counted once for the lot.
                    let (mut n, mut dups) = (0u64, 0u64);
                    let mut next = Some(p);
                    let mut failed = None;
                    while let Some(p) = next.take() {
                        n += 1;
                        dups += u64::from(p.dup);
                        if let Err(e) = on_publish(cfg, ctx, &mut mapper, &client, &mut acks, &mut malformed, p).await {
                            failed = Some(e);
                            break;
                        }
                        next = eventloop.next_buffered_publish();
                    }
                    ctx.metrics.mqtt(&ctx.id, |m| {
                        m.messages += n;
                        m.redelivered += dups;
                    });
                    if let Some(e) = failed {
                        break Err(e);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    let refused = s.return_codes.iter().filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)).count();
                    if refused > 0 {
                        tracing::error!(device = %ctx.id, refused, "the broker refused subscriptions (check its ACL)");
                    }
                }
                Ok(Event::Outgoing(Out::Publish(pkid))) if pkid != 0 => {
                    // A resend after a reconnect keeps its pkid and is already mapped.
                    if let std::collections::hash_map::Entry::Vacant(slot) = by_pkid.entry(pkid) {
                        if let Some(p) = queued.pop_front() {
                            slot.insert(p);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    if let Some(p) = by_pkid.remove(&a.pkid) {
                        let _ = p.reply.send(Ok(format!("published to {} (broker acknowledged)", p.topic)));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let reason = e.to_string();
                    if connected {
                        connected = false;
                        if let Err(e) = ctx.disconnected(reason.clone()).await {
                            break Err(e);
                        }
                    } else {
                        tracing::warn!(device = %ctx.id, broker = %cfg.broker, error = %reason, "MQTT connect failed");
                    }
                    if !ctx.wait_unreachable(backoff.step(), &format!("MQTT broker: {reason}")).await {
                        break Ok(());
                    }
                    ctx.set_state(crate::metrics::DeviceState::Connecting);
                }
            },
            c = ctx.control.recv() => match c {
                Some(c) => command(cfg, &client, connected, c, &mut queued).await,
                None => break Ok(()),
            },
            Some(()) = refused_rx.recv() => {
                // The buffer refused a record (reject_new while full): its message stays
                // unacked. Reconnect after a pause so the broker delivers it again.
                tracing::warn!(device = %ctx.id, "buffer refused MQTT records; reconnecting for redelivery");
                if !ctx.wait_unreachable(Duration::from_secs(5), "buffer full").await {
                    break Ok(());
                }
                let _ = client.disconnect().await;
            }
            _ = report_tick.tick() => report_malformed(ctx, &mut malformed).await,
            () = ctx.shutdown.cancelled() => break Ok(()),
        }
    };
    // Let the acks of what is already durable go out, then leave cleanly; anything not
    // acked is delivered again on the next connect.
    drop(acks);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut acker = acker;
    loop {
        tokio::select! {
            _ = &mut acker => break,
            ev = eventloop.poll() => if ev.is_err() { break },
            () = tokio::time::sleep_until(deadline) => { acker.abort(); break; }
        }
    }
    if connected {
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(ev) = eventloop.poll().await {
                if matches!(ev, Event::Outgoing(Out::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    report_malformed(ctx, &mut malformed).await;
    for p in queued.into_iter().chain(by_pkid.into_values()) {
        let _ = p.reply.send(Err(
            "agent stopping before the broker acknowledged the publish".into(),
        ));
    }
    result
}

/// The record of one mapped reading (its own time, or the receive time).
pub(crate) fn reading_draft(
    device: &str,
    location: Option<&String>,
    r: mapping::Reading,
    now: SystemTime,
) -> Draft {
    Draft {
        event_id: None,
        run: None,
        device_id: device.to_string(),
        time: Some(r.time.unwrap_or(now)),
        body: Body::SensorReading {
            sensor_id: r.sensor_id,
            sensor_type: r.sensor_type,
            value: r.value,
            unit: r.unit,
            location: location.cloned(),
            metadata: r.metadata,
        },
    }
}

async fn on_publish(
    cfg: &Config,
    ctx: &mut DeviceCtx,
    mapper: &mut Mapper,
    client: &AsyncClient,
    acks: &mut Acks,
    malformed: &mut Malformed,
    p: rumqttc::Publish,
) -> Result<(), DeviceError> {
    let now = SystemTime::now();
    let mut records = false;
    match mapper.map(&p.topic, &p.payload, now) {
        Ok(mapped) => {
            if !mapped.readings.is_empty() {
                acks.last += 1;
                records = true;
            }
            for r in mapped.readings {
                let draft = reading_draft(&ctx.id, cfg.location.as_ref(), r, now);
                ctx.ingest
                    .send_ticketed(draft, &acks.tally, acks.last)
                    .await?;
            }
            for n in mapped.notes {
                let mut data = n.data;
                data.insert("topic".into(), p.topic.clone().into());
                tracing::info!(device = %ctx.id, event = n.event, ?data, "sparkplug");
                ctx.device_event(n.event, data).await?;
            }
            for o in mapped.publish {
                let _ = client.try_publish(o.topic, QoS::AtMostOnce, false, o.payload);
            }
        }
        Err(reason) => {
            ctx.metrics.count_malformed(&ctx.id);
            malformed.since_report += 1;
            if malformed.logged_this_interval < MALFORMED_LOG_LINES {
                malformed.logged_this_interval += 1;
                tracing::warn!(device = %ctx.id, topic = %p.topic, %reason, bytes = p.payload.len(), "malformed MQTT payload");
            }
            malformed.last = Some((p.topic.clone(), reason));
        }
    }
    let pending = PendingAck {
        ticket: acks.last,
        records,
        pkid: p.pkid,
        qos: p.qos,
    };
    if p.qos != QoS::AtMostOnce && acks.tx.send(pending).is_err() {
        return Err(DeviceError::Ingest(IngestError::Closed));
    }
    Ok(())
}

/// The messages waiting for their acks, in arrival order, and the refusals not yet
/// matched to one. Pure bookkeeping; [`ack_in_order`] does the acking.
#[derive(Default)]
struct AckQueue {
    pending: VecDeque<PendingAck>,
    refusals: Vec<u64>,
    /// The ticket of the last message taken off the queue. A refusal is forgotten only
    /// once its message has been taken: ingest may settle a ticket before the driver has
    /// queued that message's ack.
    done_upto: u64,
}

/// What to do with a message whose ticket the tally has passed.
#[derive(Debug, PartialEq)]
enum AckDecision {
    Ack(u16, QoS),
    /// Its record was refused: not acked, so the broker delivers it again.
    Refused(u16),
}

impl AckQueue {
    /// The next message the tally at `durable` settles, if any.
    fn next(&mut self, durable: u64) -> Option<AckDecision> {
        if self.pending.front()?.ticket > durable {
            return None;
        }
        let p = self.pending.pop_front()?;
        self.done_upto = p.ticket;
        Some(if p.records && self.refusals.contains(&p.ticket) {
            AckDecision::Refused(p.pkid)
        } else {
            AckDecision::Ack(p.pkid, p.qos)
        })
    }

    /// Forgets the refusals whose messages have been taken.
    fn prune(&mut self) {
        let done = self.done_upto;
        self.refusals.retain(|&t| t > done);
    }
}

/// Acks messages in the order they arrived, each once its records are durable: after
/// each flush, every message its tally has passed, in one burst. A message whose record
/// was refused is not acked (the broker delivers it again after a reconnect).
async fn ack_in_order(
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<PendingAck>,
    tally: Arc<Tally>,
    refused: mpsc::Sender<()>,
    metrics: Arc<crate::metrics::Metrics>,
    device: String,
) {
    let mut q = AckQueue::default();
    let mut open = true;
    loop {
        let durable = tally.durable();
        q.refusals.extend(tally.take_refused());
        let mut acked = 0;
        while let Some(d) = q.next(durable) {
            match d {
                AckDecision::Refused(pkid) => {
                    tracing::warn!(
                        device,
                        pkid,
                        "MQTT message not acked: its record was not stored"
                    );
                    let _ = refused.try_send(());
                }
                AckDecision::Ack(pkid, qos) => {
                    // An ack is its packet id and QoS; an empty topic and payload
                    // allocate nothing.
                    let mut ack = rumqttc::Publish::new(String::new(), qos, Vec::new());
                    ack.pkid = pkid;
                    if client.ack(&ack).await.is_err() {
                        return;
                    }
                    acked += 1;
                    // Counted as they go: a burst after a long flush can be thousands.
                    if acked == 256 {
                        metrics.mqtt(&device, |m| m.acked += acked);
                        acked = 0;
                    }
                }
            }
        }
        q.prune();
        if acked > 0 {
            metrics.mqtt(&device, |m| m.acked += acked);
        }
        if !open && q.pending.is_empty() {
            return;
        }
        tokio::select! {
            m = rx.recv(), if open => match m {
                Some(p) => {
                    q.pending.push_back(p);
                    while let Ok(p) = rx.try_recv() {
                        q.pending.push_back(p);
                    }
                }
                None => open = false,
            },
            () = tally.changed(), if !q.pending.is_empty() => {}
        }
    }
}

async fn command(
    cfg: &Config,
    client: &AsyncClient,
    connected: bool,
    c: Control,
    queued: &mut VecDeque<PendingCommand>,
) {
    let name = c.command.as_str();
    let Some(action) = cfg.commands.get(name) else {
        let _ = c
            .reply
            .send(Err(format!("no MQTT command configured for {name}")));
        return;
    };
    if !c.params.is_empty() {
        let _ = c
            .reply
            .send(Err(format!("{name} takes no parameters here")));
        return;
    }
    if !connected {
        let _ = c.reply.send(Err("MQTT broker not connected".into()));
        return;
    }
    let payload = match (&action.payload, &action.sparkplug_metric, &action.value) {
        (Some(p), _, _) => p.clone().into_bytes(),
        (None, Some(m), Some(v)) => match sparkplug::command_payload(m, v, SystemTime::now()) {
            Ok(p) => p,
            Err(e) => {
                let _ = c.reply.send(Err(e));
                return;
            }
        },
        _ => {
            let _ = c.reply.send(Err(format!("command {name} has no payload")));
            return;
        }
    };
    match client
        .publish(action.topic.clone(), QoS::AtLeastOnce, false, payload)
        .await
    {
        Ok(()) => queued.push_back(PendingCommand {
            reply: c.reply,
            topic: action.topic.clone(),
        }),
        Err(e) => {
            let _ = c.reply.send(Err(format!("cannot publish: {e}")));
        }
    }
}

async fn report_malformed(ctx: &DeviceCtx, m: &mut Malformed) {
    if m.since_report == 0 || m.last_report.is_some_and(|t| t.elapsed() < m.every) {
        return;
    }
    let (topic, reason) = m.last.take().unwrap_or_default();
    if m.logged_this_interval >= MALFORMED_LOG_LINES {
        tracing::warn!(device = %ctx.id, count = m.since_report, "malformed MQTT payloads (only the first few are logged each interval)");
    }
    let data = object([
        ("count", m.since_report.into()),
        ("last_topic", topic.into()),
        ("last_reason", reason.into()),
    ]);
    m.since_report = 0;
    m.logged_this_interval = 0;
    m.last_report = Some(Instant::now());
    if let Err(e) = ctx.device_event("mqtt_malformed", data).await {
        tracing::error!(device = %ctx.id, error = %e, "mqtt_malformed event not buffered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(ticket: u64, records: bool, pkid: u16) -> PendingAck {
        PendingAck {
            ticket,
            records,
            pkid,
            qos: QoS::AtLeastOnce,
        }
    }

    #[test]
    fn acks_go_in_order_and_a_refusal_settled_before_its_message_is_queued_still_holds() {
        let mut q = AckQueue::default();
        // Ingest flushed ticket 1 (refused) before the driver queued message 1's ack.
        q.refusals.push(1);
        assert_eq!(q.next(1), None);
        q.prune();
        q.pending.extend([
            waiting(1, true, 11),
            waiting(1, false, 12), // malformed: no records, the ticket before it
            waiting(2, true, 13),
            waiting(3, true, 14),
        ]);
        assert_eq!(q.next(2), Some(AckDecision::Refused(11)));
        assert_eq!(q.next(2), Some(AckDecision::Ack(12, QoS::AtLeastOnce)));
        assert_eq!(q.next(2), Some(AckDecision::Ack(13, QoS::AtLeastOnce)));
        assert_eq!(q.next(2), None, "ticket 3 is not durable yet");
        q.prune();
        assert!(q.refusals.is_empty());
        assert_eq!(q.next(3), Some(AckDecision::Ack(14, QoS::AtLeastOnce)));
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            broker_addr("mqtt://127.0.0.1:1884").unwrap(),
            (false, "127.0.0.1".into(), 1884)
        );
        assert_eq!(
            broker_addr("mqtts://broker.lab").unwrap(),
            (true, "broker.lab".into(), 8883)
        );
        assert!(broker_addr("tcp://x:1").is_err());
        assert!(broker_addr("mqtt://x:99999").is_err());
        assert!(broker_addr("mqtt://").is_err());
    }
}
