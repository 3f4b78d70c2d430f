//! Reading topics back and producing to them, with the rdkafka crate's own librdkafka.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

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
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        Reader::with(c, topics)
    }

    /// As [`Reader::new`], with a client config of the caller's (security settings).
    pub fn with(mut client: ClientConfig, topics: &[String]) -> Reader {
        let consumer: BaseConsumer = client
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
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        Sender::with(c)
    }

    /// As [`Sender::new`], with a client config of the caller's (security settings).
    pub fn with(mut client: ClientConfig) -> Sender {
        let producer = client.set("linger.ms", "0").create().expect("producer");
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
        // A reader of the command topic sees the probes themselves: only an answer on
        // another topic counts.
        if reader.msgs.iter().any(|m| {
            m.topic != commands_topic
                && m.json["command_id"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("probe-"))
        }) {
            return;
        }
    }
}

/// How many topics the broker at `brokers` lists when asked for all of them.
pub fn topic_count(brokers: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("metadata client");
    consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata for all topics")
        .topics()
        .len()
}
