//! Test harness: a real tansu broker on a free port, the real `labgate` binary, and a
//! reader for topics. Nothing here is a mock: a missing broker binary fails the test.
#![allow(dead_code)]

pub mod faultfs;

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

/// Finds the tansu binary: `$TANSU_BIN`, then `PATH`, then `~/.cargo/bin`.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("tansu");
            if p.is_file() {
                return p;
            }
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = Path::new(&home).join(".cargo/bin/tansu");
    assert!(
        p.is_file(),
        "tansu not found (TANSU_BIN, PATH, ~/.cargo/bin): run scripts/test, which installs it"
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A tansu broker (memory storage) owned by one test.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Broker {
        let log = std::env::temp_dir().join(format!("tansu-{port}.log"));
        let out = std::fs::File::create(&log).expect("tansu log");
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--storage-engine",
                "memory://tansu/",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("cannot start tansu");
        let b = Broker {
            child: Some(child),
            port,
            log,
        };
        b.wait_listening();
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "tansu did not listen on {} (log: {})",
            self.port,
            self.log.display()
        );
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("broker running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn stall(&self) {
        self.signal("-STOP");
    }

    pub fn unstall(&self) {
        self.signal("-CONT");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn create_topics(&self, topics: &[&str]) {
        create_topics(&self.addr(), topics);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.stop();
    }
}

pub fn create_topics(addr: &str, topics: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()
        .expect("admin");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let res = rt
        .block_on(admin.create_topics(&new, &AdminOptions::new()))
        .expect("create topics");
    for r in res {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => panic!("create topic {t}: {e}"),
        }
    }
}

/// Topic names unique to one test.
#[derive(Clone, Debug)]
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn new() -> Topics {
        Topics {
            prefix: format!("t{}", uuid::Uuid::new_v4().simple()),
        }
    }
    pub fn events(&self) -> String {
        format!("{}_events", self.prefix)
    }
    pub fn data(&self) -> String {
        format!("{}_data", self.prefix)
    }
    pub fn sensors(&self) -> String {
        format!("{}_sensors", self.prefix)
    }
    pub fn alerts(&self) -> String {
        format!("{}_alerts", self.prefix)
    }
    pub fn commands(&self) -> String {
        format!("{}_commands", self.prefix)
    }
    pub fn results(&self) -> String {
        format!("{}_results", self.prefix)
    }
    pub fn aggregates(&self) -> String {
        format!("{}_aggregates", self.prefix)
    }
    pub fn outputs(&self) -> Vec<String> {
        vec![
            self.events(),
            self.data(),
            self.sensors(),
            self.alerts(),
            self.results(),
            self.aggregates(),
        ]
    }
    pub fn toml(&self) -> String {
        format!(
            "[kafka.topics]\nevents = \"{}\"\ndata = \"{}\"\nsensors = \"{}\"\nalerts = \"{}\"\ncommands = \"{}\"\ncommand_results = \"{}\"\naggregates = \"{}\"\n",
            self.events(),
            self.data(),
            self.sensors(),
            self.alerts(),
            self.commands(),
            self.results(),
            self.aggregates()
        )
    }
}

/// An agent config for a test: brokers, topics, a data dir, a free HTTP port, and the
/// given extra sections (buffer, devices). Unsigned commands are allowed unless the
/// extra sections bring a `[commands]` section of their own.
pub fn agent_config(
    dir: &Path,
    agent_id: &str,
    brokers: &str,
    topics: &Topics,
    http: u16,
    extra: &str,
) -> String {
    let commands = if extra.contains("[commands]") {
        ""
    } else {
        "[commands]\nallow_unsigned = true\n"
    };
    format!(
        r#"[agent]
agent_id = "{agent_id}"
data_dir = "{}"
shutdown_grace = "5s"

[kafka]
bootstrap_servers = "{brokers}"
create_topics = true
commands_offset_reset = "latest"
{}
[http]
listen = "127.0.0.1:{http}"

[log]
level = "info,labgate=debug"

{commands}
{extra}
"#,
        dir.join("data").display(),
        topics.toml()
    )
}

/// The real `labgate` binary running a config.
pub struct Agent {
    child: Option<Child>,
    pub http: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, config: &str) -> Agent {
        let path = dir.join("labgate.toml");
        std::fs::write(&path, config).expect("write config");
        let cfg: toml::Value = toml::from_str(config).expect("config is TOML");
        let http: SocketAddr = cfg["http"]["listen"].as_str().unwrap().parse().unwrap();
        let mut a = Agent {
            child: None,
            http,
            config: path,
            log: dir.join("agent.log"),
        };
        a.spawn();
        a
    }

    /// (Re)starts the process on the same config and data dir.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        // What systemd's RuntimeDirectory= gives the service: a directory that outlives
        // a restart, on another filesystem than the data dir.
        let run = self.log.with_file_name("run");
        std::fs::create_dir_all(&run).expect("runtime dir");
        let child = Command::new(env!("CARGO_BIN_EXE_labgate"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUNTIME_DIRECTORY", &run)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start labgate");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.try_get("/status").is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent did not answer /status; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.http, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        use std::io::Write;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, out.split_once("\r\n\r\n")?.1.to_string()))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path)
            .unwrap_or_else(|| panic!("GET {path} failed; log:\n{}", self.log_text()))
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.get("/status").1).expect("status JSON")
    }

    /// One sample of a Prometheus metric (with labels as written, e.g. `{reason="x"}`).
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").1;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
    }

    /// Polls `cond` on /status until it holds.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if cond(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; status: {s}\nlog:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the agent to exit on its own; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let c = self.child.take()?;
        self.reap(c, within, "exit")
    }

    /// SIGTERM and wait for exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        self.reap(c, Duration::from_secs(30), "exit after SIGTERM")
    }

    /// Waits for `c` to end; kills it and fails the test after `within`.
    fn reap(&self, mut c: Child, within: Duration, what: &str) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "agent did not {what} within {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A message read back from Kafka.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub key: String,
    pub offset: i64,
    pub headers: HashMap<String, String>,
    pub json: Value,
}

/// Reads topics from the beginning, accumulating messages.
pub struct Reader {
    consumer: BaseConsumer,
    pub msgs: Vec<Msg>,
}

impl Reader {
    /// Waits until the topics exist, then assigns them from the beginning.
    pub fn new(brokers: &str, topics: &[String]) -> Reader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "labgate-tests")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for t in topics {
            loop {
                let md = consumer.fetch_metadata(Some(t), Duration::from_secs(5));
                let parts: Vec<i32> = md
                    .ok()
                    .map(|m| {
                        m.topics()
                            .iter()
                            .filter(|mt| mt.error().is_none())
                            .flat_map(|mt| mt.partitions().iter().map(|p| p.id()))
                            .collect()
                    })
                    .unwrap_or_default();
                if !parts.is_empty() {
                    for p in parts {
                        tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
                    }
                    break;
                }
                assert!(Instant::now() < deadline, "topic {t} never appeared");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        consumer.assign(&tpl).expect("assign");
        Reader {
            consumer,
            msgs: Vec::new(),
        }
    }

    /// Reads until `done(&msgs)` or the timeout; panics with a description on timeout.
    pub fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Msg]) -> bool,
    ) -> &[Msg] {
        let deadline = Instant::now() + timeout;
        while !done(&self.msgs) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; have {} messages",
                self.msgs.len()
            );
            // Take everything already there before checking again: `done` may look
            // at every message, and checking per message would be quadratic.
            if self.poll(Duration::from_millis(100)) {
                let batch_end = Instant::now() + Duration::from_millis(200);
                while Instant::now() < batch_end && self.poll(Duration::ZERO) {}
            }
        }
        &self.msgs
    }

    /// Reads whatever arrives within `d`.
    pub fn drain_for(&mut self, d: Duration) -> &[Msg] {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            let _ = self.poll(Duration::from_millis(100));
        }
        &self.msgs
    }

    /// Takes one message if one arrives within `d`; says whether one did.
    fn poll(&mut self, d: Duration) -> bool {
        match self.consumer.poll(d) {
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or(b"")).into_owned(),
                        );
                    }
                }
                let json = serde_json::from_slice(m.payload().unwrap_or(b""))
                    .unwrap_or_else(|e| panic!("message on {} is not JSON: {e}", m.topic()));
                self.msgs.push(Msg {
                    topic: m.topic().to_string(),
                    key: String::from_utf8_lossy(m.key().unwrap_or(b"")).into_owned(),
                    offset: m.offset(),
                    headers,
                    json,
                });
                true
            }
            Some(Err(e)) => panic!("consume error: {e}"),
            None => false,
        }
    }
}

/// A producer kept open across sends (no connection set-up inside timed paths).
pub struct Sender {
    producer: BaseProducer,
}

impl Sender {
    pub fn new(brokers: &str) -> Sender {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "0")
            .create()
            .expect("producer");
        Sender { producer }
    }

    /// Produces one message and waits for its acknowledgement.
    pub fn send(&self, topic: &str, key: &str, payload: &str) {
        self.producer
            .send(BaseRecord::to(topic).key(key).payload(payload))
            .map_err(|(e, _)| e)
            .expect("send");
        self.producer.flush(Duration::from_secs(10)).expect("flush");
    }
}

/// Produces one message and waits for its acknowledgement.
pub fn produce(brokers: &str, topic: &str, key: &str, payload: &str) {
    Sender::new(brokers).send(topic, key, payload);
}

/// Per device: the seqs seen, and for each seq the event_ids (duplicates must agree).
pub fn seqs_by_device(
    msgs: &[Msg],
) -> HashMap<String, std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>> {
    let mut out: HashMap<
        String,
        std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>,
    > = HashMap::new();
    for m in msgs {
        let dev = m.json["device_id"].as_str().expect("device_id").to_string();
        let seq = m.json["seq"].as_u64().expect("seq");
        let id = m.json["event_id"].as_str().expect("event_id").to_string();
        out.entry(dev)
            .or_default()
            .entry(seq)
            .or_default()
            .insert(id);
    }
    out
}

/// Asserts that every device's seqs are exactly 0..=max, and each seq has one event_id.
pub fn assert_gap_free(msgs: &[Msg]) {
    for (dev, seqs) in seqs_by_device(msgs) {
        let max = *seqs.keys().next_back().unwrap();
        assert_eq!(
            seqs.len() as u64,
            max + 1,
            "device {dev}: seqs have gaps (max {max}, have {})",
            seqs.len()
        );
        for (seq, ids) in &seqs {
            assert_eq!(
                ids.len(),
                1,
                "device {dev}: seq {seq} carries different event_ids {ids:?}"
            );
        }
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A simulated potentiostat running one long chronoamperometry (10 min at twice real
/// time, 5 points per message): data flows steadily while commands are tried on it.
pub fn slow_potentiostat(id: &str) -> String {
    format!(
        r#"[[devices]]
kind = "simulated_potentiostat"
id = "{id}"
points_per_message = 5
max_interval = "100ms"
speed = 2.0
runs = 1

  [[devices.steps]]
  technique = "ca"
  e_dc = 0.5
  t_interval = 0.05
  t_run = 600.0
"#
    )
}

/// Sensor-set device snippet for configs.
pub fn sensors_device(id: &str, interval: &str, rounds: Option<u64>) -> String {
    let rounds = rounds
        .map(|r| format!("rounds = {r}\n"))
        .unwrap_or_default();
    format!(
        r#"[[devices]]
kind = "simulated_sensors"
id = "{id}"
interval = "{interval}"
{rounds}
  [[devices.sensors]]
  sensor_id = "temp-{id}"
  sensor_type = "temperature"
  unit = "°C"
  base = 22.0
  variance = 0.5

  [[devices.sensors]]
  sensor_id = "co2-{id}"
  sensor_type = "co2"
  unit = "ppm"
  base = 600.0
  variance = 50.0
"#
    )
}

/// Validates a message against `schemas/<type>.json`; panics naming every violation.
pub fn assert_matches_schema(m: &Msg) {
    use std::sync::OnceLock;
    static SCHEMAS: OnceLock<HashMap<String, jsonschema::Validator>> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let mut out = HashMap::new();
        for e in std::fs::read_dir(&dir).expect("schemas dir") {
            let p = e.unwrap().path();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            out.insert(name, jsonschema::validator_for(&v).expect("valid schema"));
        }
        out
    });
    let ty = m.json["type"].as_str().expect("message has a type");
    let v = schemas
        .get(ty)
        .unwrap_or_else(|| panic!("no schema for type {ty}"));
    let errors: Vec<String> = v
        .iter_errors(&m.json)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{ty} message violates its schema: {errors:?}\n{}",
        m.json
    );
}

/// Checks headers and keys as the README's "Messages" section describes them.
pub fn assert_envelope(m: &Msg, agent_id: &str) {
    assert_eq!(
        m.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        m.headers.get("schema-version").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        m.headers.get("agent-id").map(String::as_str),
        Some(agent_id)
    );
    assert_eq!(
        m.headers.get("device-id"),
        m.json["device_id"].as_str().map(str::to_string).as_ref()
    );
    assert_eq!(m.json["agent_id"], agent_id);
    let expected_key = match m.json["type"].as_str().unwrap() {
        "experiment_event" | "echem_data" => m.json["experiment_id"].as_str().unwrap().to_string(),
        "sensor_reading" => format!(
            "{}:{}",
            m.json["sensor_type"].as_str().unwrap(),
            m.json["sensor_id"].as_str().unwrap()
        ),
        "command_result" => m.json["command_id"].as_str().unwrap().to_string(),
        "alert" => m.json["sensor_id"].as_str().unwrap().to_string(),
        "agent_event" => agent_id.to_string(),
        t => panic!("unexpected type {t}"),
    };
    assert_eq!(m.key, expected_key, "key of {}", m.json);
}

/// The seq ranges in 0..=last that are missing, for readable failures.
pub fn missing_ranges(
    seqs: &std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>,
    last: u64,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start = None;
    for s in 0..=last {
        match (seqs.contains_key(&s), start) {
            (false, None) => start = Some(s),
            (true, Some(a)) => {
                out.push((a, s - 1));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(a) = start {
        out.push((a, last));
    }
    out
}

/// Sends a probe that is refused before it reaches any device (unknown device, or
/// unsigned where keys are required) until one is answered: proof that the agent reads
/// the command topic and that its results reach the reader.
pub fn wait_until_commands_answered(
    sender: &Sender,
    reader: &mut Reader,
    commands_topic: &str,
    agent: &str,
) {
    for n in 0.. {
        assert!(n < 30, "agent {agent} never answered a command");
        let id = format!("probe-{n}");
        let probe = serde_json::json!({"command": "stop", "command_id": id, "target": {"agent": agent, "device": "no-such-device"}});
        sender.send(commands_topic, agent, &probe.to_string());
        reader.drain_for(Duration::from_millis(500));
        if reader.msgs.iter().any(|m| {
            m.json["command_id"]
                .as_str()
                .is_some_and(|c| c.starts_with("probe-"))
        }) {
            return;
        }
    }
}

/// Finds mosquitto: `$MOSQUITTO_BIN`, `/usr/sbin/mosquitto`, then `PATH`.
pub fn mosquitto_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MOSQUITTO_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates = vec![PathBuf::from("/usr/sbin/mosquitto")];
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|d| d.join("mosquitto")));
    }
    candidates.into_iter().find(|p| p.is_file()).expect(
        "mosquitto not found (MOSQUITTO_BIN, /usr/sbin, PATH): run scripts/test, which installs it",
    )
}

/// A real mosquitto broker on a free port, with persistence (so a restart keeps
/// sessions and queued QoS 1 messages, as a production broker should).
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with(|_| String::new())
    }

    /// With more configuration (e.g. a TLS listener) ahead of the default listener, given
    /// the broker's state dir.
    pub fn start_with(extra: impl FnOnce(&Path) -> String) -> Mosquitto {
        let dir = tempdir();
        let port = free_port();
        let conf = format!(
            "{}listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 1\nmax_queued_messages 1000000\nmax_inflight_messages 1000\nlog_dest file {}/mosquitto.log\n",
            extra(dir.path()),
            dir.path().display(),
            dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("mosquitto.conf");
        // mosquitto started as root drops to the `mosquitto` user: let it write its
        // persistence file and log here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod mosquitto dir");
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .spawn()
            .expect("cannot start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mosquitto did not listen on {}", self.port);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGTERM (mosquitto saves its state), then start again on the same port.
    pub fn restart(&mut self, down_for: Duration) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        std::thread::sleep(down_for);
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// (topic, payload) of every message a test client received.
pub type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// An MQTT client for tests (rumqttc, its own thread): publishes QoS 1 on a persistent
/// session and records what arrives on its subscriptions.
pub struct MqttClient {
    pub client: rumqttc::Client,
    pub received: Received,
    pub acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl MqttClient {
    pub fn connect(url: &str, client_id: &str) -> MqttClient {
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_inflight(200);
        let (client, mut conn) = rumqttc::Client::new(o, 10_000);
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (r, a) = (received.clone(), acked.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || loop {
            match conn.recv() {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                    r.lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => {
                    a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                Err(_) => return,
            }
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("test MQTT client did not connect");
        MqttClient {
            client,
            received,
            acked,
        }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
            .expect("publish");
    }

    pub fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .expect("subscribe");
    }

    pub fn wait_acked(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acked.load(std::sync::atomic::Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "broker acked {} of {n} publishes",
                self.acked.load(std::sync::atomic::Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An MQTT device with one plain-number subscription (`topic` with a `+id` level).
pub fn mqtt_number_device(
    url: &str,
    id: &str,
    client_id: &str,
    topic: &str,
    sensor_type: &str,
) -> String {
    format!(
        r#"[[devices]]
kind = "mqtt"
id = "{id}"
broker = "{url}"
client_id = "{client_id}"

  [[devices.subscriptions]]
  format = "number"
  topic = "{topic}"
  sensor_type = "{sensor_type}"
"#
    )
}

/// The values of `counter` readings that reached Kafka.
pub fn counter_values(msgs: &[Msg]) -> std::collections::BTreeSet<u64> {
    msgs.iter()
        .filter(|m| m.json["type"] == "sensor_reading" && m.json["sensor_type"] == "counter")
        .filter_map(|m| m.json["value"].as_f64())
        .map(|v| v as u64)
        .collect()
}

/// Benchmarks: `LABGATE_BENCH_SCALE` (1.0 = the documented sizes).
pub fn scale() -> f64 {
    std::env::var("LABGATE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`); 0 if unreadable.
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
