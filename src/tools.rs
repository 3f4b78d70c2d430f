//! Operator tools behind the CLI: `tail` prints topics, `command send` produces a command
//! and follows its results, `buffer stats` shows what is waiting.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::buffer::Buffer;
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
/// Why a command-line tool failed; `main` maps each to an exit code.
pub enum ToolError {
    #[error("config error: {0}")]
    /// The config file is not usable (exit 64).
    Config(#[from] crate::config::ConfigError),
    #[error("kafka: {0}")]
    /// Talking to Kafka failed.
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("kafka setup: {0}")]
    /// A Kafka client could not be built.
    Setup(#[from] crate::kafka::KafkaSetupError),
    #[error("buffer: {0}")]
    /// The buffer could not be opened or read.
    Buffer(#[from] crate::buffer::BufferError),
    #[error("{0}")]
    /// The arguments do not make sense together.
    Usage(String),
    #[error("key: {0}")]
    /// A signing key could not be read or written.
    Key(#[from] crate::commands::sign::KeyError),
}

impl ToolError {
    /// Mistakes in what the user typed or pointed at (exit 64), as opposed to a broker
    /// or a file system that fails.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ToolError::Usage(_) | ToolError::Key(_) | ToolError::Config(_)
        )
    }
}

/// Where to find the brokers: a config file, or a broker list.
#[derive(clap::Args, Debug, Clone)]
pub struct Brokers {
    /// Agent config to take brokers, security and topic names from.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Bootstrap servers (when no config is given).
    #[arg(long)]
    pub brokers: Option<String>,
}

impl Brokers {
    fn resolve(&self) -> Result<(ClientConfig, Option<Config>), ToolError> {
        match (&self.config, &self.brokers) {
            (Some(path), _) => {
                let cfg = Config::load(path)?;
                let mut c = crate::kafka::base_config(&cfg.kafka)?;
                for (k, v) in &cfg.kafka.properties {
                    c.set(k, v);
                }
                if let Some(b) = &self.brokers {
                    c.set("bootstrap.servers", b);
                }
                Ok((c, Some(cfg)))
            }
            (None, Some(b)) => {
                let mut c = ClientConfig::new();
                c.set("bootstrap.servers", b);
                Ok((c, None))
            }
            (None, None) => Err(ToolError::Usage("give --config or --brokers".into())),
        }
    }
}

#[derive(clap::Args, Debug)]
/// Arguments of `labgate tail`.
pub struct TailArgs {
    #[command(flatten)]
    /// Which brokers, from a config or `--brokers`.
    pub brokers: Brokers,
    /// Topics to print (default: every output topic of the config).
    #[arg(long = "topic", short)]
    pub topics: Vec<String>,
    /// Start at the beginning of each topic instead of its end.
    #[arg(long)]
    pub from_beginning: bool,
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this long without a message.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
}

/// Assigns every partition of `topics` at the beginning or at the current end.
fn assign_all(
    consumer: &BaseConsumer,
    topics: &[String],
    from_beginning: bool,
) -> Result<(), ToolError> {
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
        for mt in md.topics() {
            if let Some(e) = mt.error() {
                return Err(ToolError::Usage(format!("topic {t}: {e:?}")));
            }
            for p in mt.partitions() {
                let offset = if from_beginning {
                    Offset::Beginning
                } else {
                    let (_, high) =
                        consumer.fetch_watermarks(t, p.id(), Duration::from_secs(10))?;
                    Offset::Offset(high)
                };
                tpl.add_partition_offset(t, p.id(), offset)?;
            }
        }
    }
    consumer.assign(&tpl)?;
    Ok(())
}

/// Short-lived tool clients: librdkafka drops the bootstrap connection once it knows the
/// broker's id and connects again, after `reconnect.backoff.ms` (100 ms, jittered). For a
/// tool that sends one command that wait was half its run time; it still backs off
/// exponentially (up to the default 10 s) when a broker is really down.
fn quick_connect(c: &mut ClientConfig) {
    if c.get("reconnect.backoff.ms").is_none() {
        c.set("reconnect.backoff.ms", "1");
    }
}

fn plain_consumer(mut c: ClientConfig) -> Result<BaseConsumer, ToolError> {
    // A short fetch wait: brokers such as tansu hold an empty fetch for the whole
    // wait even when data arrives, which would delay every result by up to 500 ms.
    c.set("group.id", "labgate-tools")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "10");
    quick_connect(&mut c);
    Ok(c.create()?)
}

#[derive(clap::Args, Debug)]
/// Arguments of `labgate fleet`.
pub struct FleetArgs {
    #[command(flatten)]
    /// Which brokers, from a config or `--brokers`.
    pub brokers: Brokers,
    /// The status topic (default: the config's `topics.status`, else `agent_status`).
    #[arg(long)]
    pub topic: Option<String>,
    /// Print each agent's latest status message as JSON (with `age_seconds` and `state`
    /// added) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What [`out!`](crate::out) writes through. The CLI's output often goes to a pipe that
/// closes early (`labgate tail … | head`): the process then ends quietly with 141, as a
/// tool that SIGPIPE ended, instead of panicking in `println!`. Any other failure to
/// write stdout (a full disk under a redirect) is said on stderr, exit 74.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("labgate: cannot write to stdout: {e}");
        std::process::exit(74);
    }
}

/// What an agent's latest status message says about it now.
pub fn fleet_state(status: &Value, age: Duration) -> &'static str {
    let interval = status["status_interval_ms"].as_u64().unwrap_or(30_000);
    if status["status"] == "death" {
        "stopped"
    } else if age.as_millis() > u128::from(interval) * 3 {
        "silent"
    } else {
        "alive"
    }
}

/// Reads the status topic from its start to its current end and prints one line per
/// agent: its state (`alive`, `silent`: no heartbeat for three intervals, `stopped`: it
/// said goodbye), the age of its last message, and what that message said.
pub async fn fleet(args: FleetArgs) -> Result<u8, ToolError> {
    let (client, cfg) = args.brokers.resolve()?;
    let topic = args.topic.clone().unwrap_or_else(|| {
        cfg.as_ref()
            .map_or_else(|| "agent_status".into(), |c| c.kafka.topics.status.clone())
    });
    let latest =
        tokio::task::spawn_blocking(move || -> Result<BTreeMap<String, Value>, ToolError> {
            let consumer = plain_consumer(client)?;
            let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let mut tpl = TopicPartitionList::new();
            let mut ends = BTreeMap::new();
            for mt in md.topics() {
                if let Some(e) = mt.error() {
                    return Err(ToolError::Usage(format!("topic {topic}: {e:?}")));
                }
                for p in mt.partitions() {
                    let (low, high) =
                        consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                    if high > low {
                        ends.insert(p.id(), high);
                        tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
                    }
                }
            }
            let mut latest: BTreeMap<String, Value> = BTreeMap::new();
            if ends.is_empty() {
                return Ok(latest);
            }
            consumer.assign(&tpl)?;
            let deadline = Instant::now() + Duration::from_secs(30);
            // A broker's watermark can trail its last message: once the ends read at the
            // start are reached, they are read once more and any newer part read too.
            let mut next: BTreeMap<i32, i64> = BTreeMap::new();
            let mut second_look = false;
            while Instant::now() < deadline {
                if ends.is_empty() {
                    if second_look {
                        break;
                    }
                    second_look = true;
                    for (&part, &seen) in &next {
                        let (_, high) =
                            consumer.fetch_watermarks(&topic, part, Duration::from_secs(10))?;
                        if high > seen {
                            ends.insert(part, high);
                        }
                    }
                    continue;
                }
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        next.insert(m.partition(), m.offset() + 1);
                        if m.offset() + 1 >= ends.get(&m.partition()).copied().unwrap_or(0) {
                            ends.remove(&m.partition());
                        }
                        let Some(v) = m
                            .payload()
                            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
                        else {
                            continue;
                        };
                        if v["type"] != "agent_status" {
                            continue;
                        }
                        let Some(agent) = v["agent_id"].as_str().map(str::to_string) else {
                            continue;
                        };
                        latest.insert(agent, v);
                    }
                    Some(Err(e)) => eprintln!("labgate: {e}"),
                    None => {}
                }
            }
            Ok(latest)
        })
        .await
        .map_err(|e| ToolError::Usage(e.to_string()))??;
    let now = SystemTime::now();
    if !args.json && !latest.is_empty() {
        crate::out!(
            "{:<24} {:<8} {:>8}  {:<16} {:<8} {:>7} {:>10} {:>12} {:>8}",
            "AGENT",
            "STATE",
            "AGE",
            "HOST",
            "VERSION",
            "DEVICES",
            "BUFFERED",
            "DELIVERED",
            "DROPPED"
        );
    }
    if latest.is_empty() && !args.json {
        crate::out!("no agent has published a status yet");
    }
    for (agent, mut v) in latest {
        let age = v["timestamp"]
            .as_str()
            .and_then(crate::time::parse_rfc3339)
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        let state = fleet_state(&v, age);
        if args.json {
            v["age_seconds"] = age.as_secs_f64().into();
            v["state"] = state.into();
            crate::out!("{v}");
            continue;
        }
        let devices = v["devices"].as_array().map_or(0, Vec::len);
        crate::out!(
            "{:<24} {:<8} {:>7}s  {:<16} {:<8} {:>7} {:>10} {:>12} {:>8}",
            agent,
            state,
            age.as_secs(),
            v["host"].as_str().unwrap_or("-"),
            v["version"].as_str().unwrap_or("-"),
            devices,
            v["buffer"]["records"].as_u64().unwrap_or(0),
            v["records_delivered"].as_u64().unwrap_or(0),
            v["records_dropped"].as_u64().unwrap_or(0),
        );
    }
    Ok(0)
}

/// Prints messages as `topic key payload` lines.
pub async fn tail(args: TailArgs) -> Result<(), ToolError> {
    let (client, cfg) = args.brokers.resolve()?;
    let topics = if args.topics.is_empty() {
        let Some(cfg) = &cfg else {
            return Err(ToolError::Usage(
                "give --topic (or --config to tail its topics)".into(),
            ));
        };
        let t = &cfg.kafka.topics;
        vec![
            t.events.clone(),
            t.agent_events.clone(),
            t.data.clone(),
            t.sensors.clone(),
            t.alerts.clone(),
            t.command_results.clone(),
            t.aggregates.clone(),
        ]
    } else {
        args.topics.clone()
    };
    let (from_beginning, count, idle) = (args.from_beginning, args.count, args.idle_timeout);
    print_topics(client, topics, from_beginning, count, idle, |m| {
        let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
        let payload = m.payload().map(String::from_utf8_lossy).unwrap_or_default();
        crate::out!("{} {} {}", m.topic(), key, payload);
    })
    .await
}

/// Reads `topics` (from their start or their current end) and hands each message to
/// `print`, until `count` messages or `idle` without one.
async fn print_topics(
    client: ClientConfig,
    topics: Vec<String>,
    from_beginning: bool,
    count: Option<u64>,
    idle: Option<Duration>,
    print: impl Fn(&rdkafka::message::BorrowedMessage<'_>) + Send + 'static,
) -> Result<(), ToolError> {
    tokio::task::spawn_blocking(move || -> Result<(), ToolError> {
        let consumer = plain_consumer(client)?;
        assign_all(&consumer, &topics, from_beginning)?;
        let mut seen = 0u64;
        let mut last = Instant::now();
        loop {
            if count.is_some_and(|n| seen >= n) || idle.is_some_and(|t| last.elapsed() >= t) {
                return Ok(());
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    seen += 1;
                    last = Instant::now();
                    print(&m);
                }
                Some(Err(e)) => eprintln!("labgate: {e}"),
                None => {}
            }
        }
    })
    .await
    .map_err(|e| ToolError::Usage(e.to_string()))?
}

#[derive(clap::Args, Debug)]
/// Arguments of `labgate command send`.
pub struct SendArgs {
    #[command(flatten)]
    /// Which brokers, from a config or `--brokers`.
    pub brokers: Brokers,
    /// The agent that should act (default: every agent).
    #[arg(long)]
    pub agent: Option<String>,
    /// The device that should act (default: every device of the agent).
    #[arg(long)]
    pub device: Option<String>,
    /// Command topic (default: from the config, else echem_commands).
    #[arg(long)]
    pub topic: Option<String>,
    /// Result topic (default: from the config, else echem_command_results).
    #[arg(long)]
    pub results_topic: Option<String>,
    /// A parameter, `key=value` (repeatable; the value is JSON if it parses, else text).
    #[arg(long = "param")]
    pub params: Vec<String>,
    /// Sign with this Ed25519 private key (PKCS#8 PEM, as `labgate keygen` writes).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The operator name the agents know the key by (default: the key file's name
    /// without extension).
    #[arg(long)]
    pub issuer: Option<String>,
    /// How long the command stays valid.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// How long the device may take to carry it out (default: the agent's
    /// commands.timeout).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub device_timeout: Option<Duration>,
    /// Follow the results topic and exit with a status code: 0 completed, 10 failed,
    /// 11 rejected, 12 no final result in time, 13 duplicate, 14 timeout.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// start, pause, resume or stop.
    pub command: String,
}

/// Exit codes of `command send --wait`.
pub const EXIT_FAILED: u8 = 10;
/// The agent refused the command (`rejected`).
pub const EXIT_REJECTED: u8 = 11;
/// No result arrived before `--wait` ran out.
pub const EXIT_NO_RESULT: u8 = 12;
/// The agent had seen the command id before (`duplicate`).
pub const EXIT_DUPLICATE: u8 = 13;
/// The device did not answer in time (`timeout`).
pub const EXIT_TIMEOUT: u8 = 14;

/// Produces one command; with `--wait`, prints its results and returns the exit code.
pub async fn send(args: SendArgs) -> Result<u8, ToolError> {
    let (client, cfg) = args.brokers.resolve()?;
    let topics = cfg
        .as_ref()
        .map(|c| c.kafka.topics.clone())
        .unwrap_or_default();
    let topic = args.topic.clone().unwrap_or(topics.commands);
    let results = args.results_topic.clone().unwrap_or(topics.command_results);
    let mut params = serde_json::Map::new();
    for p in &args.params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| ToolError::Usage(format!("--param {p}: expected key=value")))?;
        let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        params.insert(k.to_string(), v);
    }
    let command_id = uuid::Uuid::new_v4().to_string();
    let signer = match &args.key {
        Some(path) => {
            let key = crate::commands::sign::load_private(path)?;
            let issuer = match &args.issuer {
                Some(i) => i.clone(),
                None => path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .ok_or_else(|| ToolError::Usage("give --issuer".into()))?,
            };
            Some((key, issuer))
        }
        None if args.issuer.is_some() => {
            return Err(ToolError::Usage("--issuer needs --key".into()))
        }
        None => None,
    };
    let t0 = Instant::now();
    // The producer connects in the background while the result reader is positioned.
    let mut pc = client.clone();
    pc.set("enable.idempotence", "false")
        .set("acks", "all")
        .set("linger.ms", "0");
    quick_connect(&mut pc);
    let producer: FutureProducer = pc.create()?;
    // Position the result reader before producing, so no result can be missed.
    let reader = if args.wait {
        let consumer = plain_consumer(client.clone())?;
        let r = results.clone();
        Some(
            tokio::task::spawn_blocking(move || {
                assign_all(&consumer, &[r], false).map(|()| consumer)
            })
            .await
            .map_err(|e| ToolError::Usage(e.to_string()))??,
        )
    } else {
        None
    };
    tracing::debug!(elapsed = ?t0.elapsed(), "result reader positioned");
    // Stamped and signed at the last moment, so the whole ttl is left for the agent.
    let mut msg = json!({
        "type": "command",
        "command": args.command,
        "command_id": command_id,
        "issued_at": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "ttl": humantime::format_duration(args.ttl).to_string(),
        "params": params,
    });
    if let Some(t) = args.device_timeout {
        msg["timeout"] = humantime::format_duration(t).to_string().into();
    }
    if args.agent.is_some() || args.device.is_some() {
        let mut target = serde_json::Map::new();
        if let Some(a) = &args.agent {
            target.insert("agent".into(), a.clone().into());
        }
        if let Some(d) = &args.device {
            target.insert("device".into(), d.clone().into());
        }
        msg["target"] = Value::Object(target);
    }
    if let (Some((key, issuer)), Value::Object(env)) = (&signer, &mut msg) {
        env.insert("issuer".into(), issuer.clone().into());
        crate::commands::sign::sign(env, key);
    }
    let payload = msg.to_string();
    // Key: the agent, so one agent's commands stay in order on one partition.
    let key = args.agent.clone().unwrap_or_default();
    producer
        .send(
            FutureRecord::to(&topic).key(&key).payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    tracing::debug!(elapsed = ?t0.elapsed(), "command acknowledged by the broker");
    eprintln!("sent {} {command_id}", args.command);
    let Some(consumer) = reader else { return Ok(0) };
    let timeout = args.timeout;
    let code = tokio::task::spawn_blocking(move || {
        let code = follow(&consumer, &command_id, timeout);
        tracing::debug!(elapsed = ?t0.elapsed(), "final result read");
        // The process ends right after this: the command is acknowledged and the reader
        // commits nothing, so librdkafka's orderly close (about 150 ms) buys nothing.
        std::mem::forget(consumer);
        code
    })
    .await
    .map_err(|e| ToolError::Usage(e.to_string()))?;
    std::mem::forget(producer);
    code
}

/// Prints results of `command_id` until every accepting device reached a final status.
fn follow(consumer: &BaseConsumer, command_id: &str, timeout: Duration) -> Result<u8, ToolError> {
    let deadline = Instant::now() + timeout;
    let mut open: BTreeMap<String, ()> = BTreeMap::new();
    let mut worst = 0u8;
    while Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let Ok(v) = serde_json::from_slice::<Value>(m.payload().unwrap_or(b"")) else {
            continue;
        };
        if v["command_id"] != command_id {
            continue;
        }
        crate::out!("{v}");
        let dev = v["target_device"].as_str().unwrap_or("").to_string();
        match v["status"].as_str().unwrap_or("") {
            "accepted" => {
                open.insert(dev, ());
            }
            s => {
                open.remove(&dev);
                worst = worst.max(match s {
                    "completed" => 0,
                    "rejected" => EXIT_REJECTED,
                    "duplicate" => EXIT_DUPLICATE,
                    "timeout" => EXIT_TIMEOUT,
                    _ => EXIT_FAILED,
                });
                if open.is_empty() {
                    return Ok(worst);
                }
            }
        }
    }
    eprintln!("no final result within {timeout:?}");
    Ok(EXIT_NO_RESULT)
}

#[derive(clap::Args, Debug)]
/// Arguments of `labgate command tail`.
pub struct ResultsTailArgs {
    #[command(flatten)]
    /// Which brokers, from a config or `--brokers`.
    pub brokers: Brokers,
    /// Result topic (default: from the config, else echem_command_results).
    #[arg(long)]
    pub results_topic: Option<String>,
    /// Start at the beginning of the topic instead of its end.
    #[arg(long)]
    pub from_beginning: bool,
    /// Print each result as its JSON message.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many results.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this long without a result.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
}

/// `labgate command tail`: one line per command result as it arrives.
pub async fn results_tail(args: ResultsTailArgs) -> Result<(), ToolError> {
    let (client, cfg) = args.brokers.resolve()?;
    let topic = args.results_topic.clone().unwrap_or_else(|| {
        cfg.map(|c| c.kafka.topics.command_results)
            .unwrap_or_else(|| crate::config::Topics::default().command_results)
    });
    let json = args.json;
    print_topics(
        client,
        vec![topic],
        args.from_beginning,
        args.count,
        args.idle_timeout,
        move |m| {
            let payload = m.payload().unwrap_or(b"");
            match serde_json::from_slice::<Value>(payload) {
                Ok(v) if !json => crate::out!("{}", result_line(&v)),
                _ => crate::out!("{}", String::from_utf8_lossy(payload)),
            }
        },
    )
    .await
}

/// `time  agent/device  command  status  command_id  issuer  reason`.
fn result_line(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let ms = match (v["received_at_us"].as_u64(), v["status_at_us"].as_u64()) {
        (Some(a), Some(b)) => format!("{:.1}ms", b.saturating_sub(a) as f64 / 1000.0),
        _ => "-".into(),
    };
    format!(
        "{}  {}/{}  {:<7} {:<9} {}  issuer={}  +{}  {}",
        s("timestamp"),
        s("agent_id"),
        v["target_device"].as_str().unwrap_or("*"),
        s("command"),
        s("status"),
        s("command_id"),
        s("issuer"),
        ms,
        v["reason"].as_str().unwrap_or(""),
    )
}

#[derive(clap::Args, Debug)]
/// Arguments of `labgate keygen`.
pub struct KeygenArgs {
    /// Where to write: `<OUT>.key` (private, mode 0600) and `<OUT>.pub`.
    #[arg(long)]
    pub out: PathBuf,
    /// The operator name to print in the config snippet (default: OUT's file name).
    #[arg(long)]
    pub name: Option<String>,
}

/// `labgate keygen`: writes a key pair and prints the agent config snippet for it.
pub fn keygen(args: KeygenArgs) -> Result<(), ToolError> {
    use crate::commands::sign;
    let key = sign::generate()?;
    let (private, public) = sign::write_pair(&args.out, &key)?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.out
            .file_stem()
            .map_or_else(|| "operator".into(), |s| s.to_string_lossy().into_owned())
    });
    eprintln!(
        "wrote {} (private, mode 0600) and {}",
        private.display(),
        public.display()
    );
    crate::out!("# add to the agent's config:");
    crate::out!("[[commands.operators]]");
    crate::out!("name = {:?}", name);
    crate::out!(
        "public_key = {:?}",
        sign::public_base64(&key.verifying_key())
    );
    crate::out!("commands = [\"pause\", \"resume\", \"stop\"]");
    Ok(())
}

/// `labgate buffer stats`: asks the running agent, else reads the data dir.
pub async fn buffer_stats(cfg: &Config, as_json: bool) -> Result<(), ToolError> {
    let from_agent = match cfg.http.addr() {
        Some(addr) => match crate::http::get(addr, "/status").await {
            Ok((200, body)) => serde_json::from_str::<Value>(&body)
                .ok()
                .map(|v| v["buffer"].clone()),
            _ => None,
        },
        None => None,
    };
    let (source, stats) = match from_agent {
        Some(v) => ("running agent", v),
        None => {
            let buffer = Buffer::open(&crate::app::buffer_dir(cfg), &cfg.buffer).map_err(|e| {
                ToolError::Usage(format!(
                    "agent not answering on http.listen and the buffer cannot be opened (is the agent running without http?): {e}"
                ))
            })?;
            (
                "data dir",
                serde_json::to_value(buffer.stats()).unwrap_or(Value::Null),
            )
        }
    };
    if as_json {
        crate::out!("{stats}");
        return Ok(());
    }
    crate::out!("source:        {source}");
    crate::out!("records:       {}", stats["records"]);
    crate::out!("bytes:         {}", stats["bytes"]);
    crate::out!("disk bytes:    {}", stats["disk_bytes"]);
    crate::out!("cap (encoded): {}", stats["cap_bytes"]);
    crate::out!(
        "oldest age:    {:.1} s",
        stats["oldest_age_seconds"].as_f64().unwrap_or(0.0)
    );
    crate::out!("dead letters:  {}", stats["dead_letters"]);
    crate::out!("unreported drops: {}", stats["unreported_drops"]);
    if let Some(per) = stats["per_device"].as_object() {
        for (dev, n) in per {
            crate::out!("  {dev}: {n}");
        }
    }
    Ok(())
}

/// `labgate ports`: every serial port with what USB says about it.
pub fn ports() -> Result<(), ToolError> {
    let ports = serialport::available_ports()
        .map_err(|e| ToolError::Usage(format!("cannot list serial ports: {e}")))?;
    if ports.is_empty() {
        crate::out!("no serial ports found");
    }
    for p in ports {
        match p.port_type {
            serialport::SerialPortType::UsbPort(u) => crate::out!(
                "{}  usb {:04x}:{:04x}  serial {}  {} {}",
                p.port_name,
                u.vid,
                u.pid,
                u.serial_number.as_deref().unwrap_or("-"),
                u.manufacturer.as_deref().unwrap_or(""),
                u.product.as_deref().unwrap_or("")
            ),
            other => crate::out!("{}  {other:?}", p.port_name),
        }
    }
    Ok(())
}

/// What `labgate buffer dead-letters` does.
pub enum DeadLetterAction {
    /// Print one line per dead letter.
    List,
    /// Write them as NDJSON to a file (or stdout).
    Export(Option<PathBuf>),
    /// Put these (all when empty) back in the outbound queue.
    Requeue(Vec<u64>),
}

/// Opens the stopped agent's buffer; a running agent holds sled's lock, which is said
/// plainly.
fn open_stopped_buffer(cfg: &Config) -> Result<Buffer, ToolError> {
    Buffer::open(&crate::app::buffer_dir(cfg), &cfg.buffer).map_err(|e| {
        let text = e.to_string();
        if text.contains("lock") || text.contains("WouldBlock") || text.contains("Resource temporarily unavailable") {
            ToolError::Usage(format!(
                "the buffer in {} is in use by a running agent: stop it first (systemctl stop labgate)",
                crate::app::buffer_dir(cfg).display()
            ))
        } else {
            ToolError::Buffer(e)
        }
    })
}

/// `labgate buffer dead-letters list | export | requeue`.
pub fn dead_letters(cfg: &Config, action: DeadLetterAction) -> Result<(), ToolError> {
    let buffer = open_stopped_buffer(cfg)?;
    let letters = buffer.dead_letters_with_ids()?;
    let at = |ms: u64| {
        crate::time::from_unix_ms(ms)
            .and_then(crate::time::format_rfc3339_millis)
            .unwrap_or_default()
    };
    match action {
        DeadLetterAction::List => {
            if letters.is_empty() {
                crate::out!("no dead letters");
            }
            for (id, d) in &letters {
                crate::out!(
                    "{id}\t{}\t{}\tseq {}\t{:?}\t{}",
                    at(d.at_ms),
                    d.record.device_id,
                    d.record.seq,
                    d.record.topic,
                    d.reason
                );
            }
        }
        DeadLetterAction::Export(out) => {
            let mut text = String::new();
            for (id, d) in &letters {
                let message =
                    serde_json::from_slice::<Value>(&d.record.payload).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&d.record.payload).into_owned())
                    });
                let line = json!({
                    "id": id,
                    "dead_lettered_at": at(d.at_ms),
                    "reason": d.reason,
                    "device_id": d.record.device_id,
                    "seq": d.record.seq,
                    "topic": d.record.topic,
                    "key": d.record.key,
                    "message": message,
                });
                text.push_str(&line.to_string());
                text.push('\n');
            }
            match out {
                Some(path) => std::fs::write(&path, text)
                    .map_err(|e| ToolError::Usage(format!("--out {}: {e}", path.display())))?,
                None => crate::out_raw!("{text}"),
            }
        }
        DeadLetterAction::Requeue(ids) => {
            if let Some(missing) = ids.iter().find(|i| !letters.iter().any(|(id, _)| id == *i)) {
                return Err(ToolError::Usage(format!(
                    "no dead letter with id {missing}"
                )));
            }
            let n = buffer.requeue_dead_letters(&ids)?;
            crate::out!("requeued {n} dead letters; the agent sends them at its next start");
        }
    }
    Ok(())
}
