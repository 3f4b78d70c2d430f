//! `labgate simulate mqtt-sensors`: a set of environmental sensors (temperature, humidity,
//! pressure, CO2, light; base ± variance) publishing to an MQTT broker in any of the
//! payload conventions the agent reads, and answering that convention's commands
//! (Zigbee2MQTT / Homie `…/set`, Sparkplug NCMD rebirth and DCMD), which it prints.

use std::time::{Duration, SystemTime};

use prost::Message;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

use crate::devices::mqtt::sparkplug::{datatype, Metric, MetricValue, Payload};
use crate::devices::simulated::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
/// The payload convention the simulated sensors publish in.
pub enum Preset {
    /// `lab/<node>/<type>`: a plain number.
    Number,
    /// `sensors/<node>/<type>`: `{"value":…,"unit":…,"ts":<ms>}`.
    Json,
    /// `tele/<node>/SENSOR`.
    Tasmota,
    /// `zigbee2mqtt/<node>` plus a retained `zigbee2mqtt/bridge/devices`.
    Zigbee2mqtt,
    /// `homie/5/<node>/env/<type>` plus a retained `$description`.
    Homie,
    /// `spBv1.0/Lab1/{NBIRTH,DBIRTH,DDATA}/<node>[/env]`, aliases, seq, bdSeq.
    Sparkplug,
}

/// What the MQTT sensor simulator publishes, where and how often.
pub struct Options {
    /// `mqtt://host:port`.
    pub broker: String,
    /// The payload convention.
    pub preset: Preset,
    /// Name of the node / device in topics.
    pub node: String,
    /// Time between rounds of readings.
    pub interval: Duration,
    /// Rounds to publish, then exit (None = until killed).
    pub rounds: Option<u64>,
}

/// The sensor set: (type, unit, base, variance, Tasmota sensor, Tasmota key).
const SENSORS: [(&str, &str, f64, f64, &str, &str); 5] = [
    ("temperature", "°C", 22.0, 0.5, "BME280", "Temperature"),
    ("humidity", "%", 45.0, 5.0, "BME280", "Humidity"),
    ("pressure", "hPa", 1013.0, 3.0, "BME280", "Pressure"),
    ("co2", "ppm", 450.0, 50.0, "SCD30", "CO2"),
    ("illuminance", "lx", 300.0, 50.0, "BH1750", "Illuminance"),
];

#[derive(Debug, thiserror::Error)]
/// Why the MQTT simulator stopped.
pub enum SimError {
    #[error("broker URL: {0}")]
    /// The broker URL does not parse.
    Url(String),
    #[error("MQTT: {0}")]
    /// The MQTT client failed.
    Client(#[from] rumqttc::ClientError),
}

const GROUP: &str = "Lab1";

/// Publishes the preset's messages until `rounds` are done or the process is killed.
pub async fn run(o: Options) -> Result<(), SimError> {
    let (host, port) = parse(&o.broker).map_err(SimError::Url)?;
    let mut opts = MqttOptions::new(format!("labgate-sim-{}", o.node), host, port);
    opts.set_keep_alive(Duration::from_secs(15))
        .set_max_packet_size(1 << 20, 1 << 20);
    let node_topic = format!("spBv1.0/{GROUP}/NDEATH/{}", o.node);
    let bd_seq: u64 = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() % 256)
        .unwrap_or(0);
    if o.preset == Preset::Sparkplug {
        let death = Payload {
            timestamp: Some(ms()),
            metrics: vec![Metric::new(
                "bdSeq",
                None,
                MetricValue::Long(bd_seq),
                datatype::UINT64,
            )],
            ..Default::default()
        };
        opts.set_last_will(LastWill::new(
            node_topic,
            death.encode_to_vec(),
            QoS::AtLeastOnce,
            false,
        ));
    }
    let (client, mut events) = AsyncClient::new(opts, 256);
    let qos = if o.preset == Preset::Sparkplug {
        QoS::AtMostOnce // Sparkplug: NBIRTH / NDATA are QoS 0
    } else {
        QoS::AtLeastOnce
    };
    let mut rng = Rng::from_time();
    let mut seq: u64 = 0;
    let mut round: u64 = 0;
    let mut tick = tokio::time::interval(o.interval.max(Duration::from_millis(1)));
    let mut published_birth = false;
    let mut need_birth = false;
    let mut connected = false;
    loop {
        tokio::select! {
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    eprintln!("simulator connected to {} ({:?})", o.broker, o.preset);
                    subscribe_commands(&client, &o).await?;
                    setup(&client, &o).await?;
                    need_birth = o.preset == Preset::Sparkplug;
                    connected = true;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let shown = match std::str::from_utf8(&p.payload) {
                        Ok(s) => s.to_string(),
                        Err(_) => match Payload::decode(p.payload.as_ref()) {
                            Ok(d) => format!("{:?}", d.metrics.iter().map(|m| (m.name.clone(), m.value.clone())).collect::<Vec<_>>()),
                            Err(_) => format!("{} bytes", p.payload.len()),
                        },
                    };
                    crate::out!("command on {}: {shown}", p.topic);
                    if p.topic.contains("/NCMD/") {
                        need_birth = true;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("simulator: MQTT {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            _ = tick.tick() => {
                if o.rounds.is_some_and(|n| round >= n) {
                    break;
                }
                // Metadata (retained descriptions, births) goes out first, on connect.
                if !connected {
                    continue;
                }
                if o.preset == Preset::Sparkplug {
                    if need_birth {
                        births(&client, &o, bd_seq, &mut rng).await?;
                        need_birth = false;
                        published_birth = true;
                        seq = 2; // NBIRTH was 0, DBIRTH 1

                    }
                    if !published_birth {
                        continue;
                    }
                }
                publish_round(&client, &o, qos, &mut rng, &mut seq).await?;
                round += 1;
            }
        }
    }
    // The publishes queued before the DISCONNECT reach the broker before it.
    client.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(ev) = events.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}

/// The agent's own broker-URL parser; the simulator speaks plain MQTT only.
fn parse(url: &str) -> Result<(String, u16), String> {
    match crate::devices::mqtt::broker_addr(url)? {
        (false, host, port) => Ok((host, port)),
        (true, ..) => Err("the simulator speaks plain mqtt:// only".into()),
    }
}

fn ms() -> u64 {
    crate::record::unix_ms(SystemTime::now())
}

async fn subscribe_commands(c: &AsyncClient, o: &Options) -> Result<(), SimError> {
    let n = &o.node;
    match o.preset {
        Preset::Zigbee2mqtt => {
            c.subscribe(format!("zigbee2mqtt/{n}/set"), QoS::AtLeastOnce)
                .await?
        }
        Preset::Homie => {
            c.subscribe(format!("homie/5/{n}/+/+/set"), QoS::AtLeastOnce)
                .await?
        }
        Preset::Sparkplug => {
            c.subscribe(format!("spBv1.0/{GROUP}/NCMD/{n}"), QoS::AtLeastOnce)
                .await?;
            c.subscribe(format!("spBv1.0/{GROUP}/DCMD/{n}/+"), QoS::AtLeastOnce)
                .await?;
        }
        Preset::Number | Preset::Json | Preset::Tasmota => {
            c.subscribe(format!("lab/{n}/cmd"), QoS::AtLeastOnce)
                .await?
        }
    }
    Ok(())
}

/// Retained metadata of the conventions that have it.
async fn setup(c: &AsyncClient, o: &Options) -> Result<(), SimError> {
    let n = &o.node;
    match o.preset {
        Preset::Zigbee2mqtt => {
            let exposes: Vec<serde_json::Value> = SENSORS
                .iter()
                .map(|(t, u, ..)| serde_json::json!({"type": "numeric", "property": t, "unit": u, "access": 1}))
                .collect();
            let devices = serde_json::json!([
                {"friendly_name": "Coordinator", "ieee_address": "0x00", "type": "Coordinator"},
                {"friendly_name": n, "ieee_address": "0x00158d0001a2b3c4", "type": "EndDevice",
                 "definition": {"model": "SIM-ENV", "vendor": "labgate", "exposes": exposes}}
            ]);
            c.publish(
                "zigbee2mqtt/bridge/devices",
                QoS::AtLeastOnce,
                true,
                devices.to_string(),
            )
            .await?;
            c.publish(
                "zigbee2mqtt/bridge/state",
                QoS::AtLeastOnce,
                true,
                r#"{"state":"online"}"#,
            )
            .await?;
        }
        Preset::Homie => {
            let props: serde_json::Map<String, serde_json::Value> = SENSORS
                .iter()
                .map(|(t, u, ..)| {
                    (
                        (*t).to_string(),
                        serde_json::json!({"datatype": "float", "unit": u}),
                    )
                })
                .collect();
            let desc = serde_json::json!({"homie": "5.0", "version": 1, "name": n,
                "nodes": {"env": {"name": "Environment", "properties": props}}});
            c.publish(
                format!("homie/5/{n}/$description"),
                QoS::AtLeastOnce,
                true,
                desc.to_string(),
            )
            .await?;
            c.publish(
                format!("homie/5/{n}/$state"),
                QoS::AtLeastOnce,
                true,
                "ready",
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

async fn births(c: &AsyncClient, o: &Options, bd_seq: u64, rng: &mut Rng) -> Result<(), SimError> {
    let nbirth = Payload {
        timestamp: Some(ms()),
        seq: Some(0),
        metrics: vec![
            Metric::new("bdSeq", None, MetricValue::Long(bd_seq), datatype::UINT64),
            Metric::new(
                "Node Control/Rebirth",
                None,
                MetricValue::Boolean(false),
                datatype::BOOLEAN,
            ),
        ],
        ..Default::default()
    };
    c.publish(
        format!("spBv1.0/{GROUP}/NBIRTH/{}", o.node),
        QoS::AtMostOnce,
        false,
        nbirth.encode_to_vec(),
    )
    .await?;
    let metrics = SENSORS
        .iter()
        .enumerate()
        .map(|(i, (t, u, base, var, ..))| {
            Metric::new(
                t,
                Some(i as u64 + 1),
                MetricValue::Double(base + var * rng.symmetric()),
                datatype::DOUBLE,
            )
            .with_property("engUnit", u)
        })
        .collect();
    let dbirth = Payload {
        timestamp: Some(ms()),
        seq: Some(1),
        metrics,
        ..Default::default()
    };
    c.publish(
        format!("spBv1.0/{GROUP}/DBIRTH/{}/env", o.node),
        QoS::AtMostOnce,
        false,
        dbirth.encode_to_vec(),
    )
    .await?;
    Ok(())
}

async fn publish_round(
    c: &AsyncClient,
    o: &Options,
    qos: QoS,
    rng: &mut Rng,
    seq: &mut u64,
) -> Result<(), SimError> {
    let n = &o.node;
    let values: Vec<f64> = SENSORS
        .iter()
        .map(|(_, _, base, var, ..)| base + var * rng.symmetric())
        .collect();
    let round = |v: f64| (v * 100.0).round() / 100.0;
    match o.preset {
        Preset::Number => {
            for ((t, ..), v) in SENSORS.iter().zip(&values) {
                c.publish(format!("lab/{n}/{t}"), qos, false, round(*v).to_string())
                    .await?;
            }
        }
        Preset::Json => {
            for ((t, u, ..), v) in SENSORS.iter().zip(&values) {
                let body = serde_json::json!({"value": round(*v), "unit": u, "ts": ms()});
                c.publish(format!("sensors/{n}/{t}"), qos, false, body.to_string())
                    .await?;
            }
        }
        Preset::Tasmota => {
            let mut doc = serde_json::Map::new();
            doc.insert(
                "Time".into(),
                humantime::format_rfc3339_seconds(SystemTime::now())
                    .to_string()
                    .trim_end_matches('Z')
                    .into(),
            );
            for ((_, _, _, _, sensor, key), v) in SENSORS.iter().zip(&values) {
                let e = doc
                    .entry(sensor.to_string())
                    .or_insert_with(|| serde_json::json!({}));
                e[key] = round(*v).into();
            }
            doc.insert("TempUnit".into(), "C".into());
            doc.insert("PressureUnit".into(), "hPa".into());
            c.publish(
                format!("tele/{n}/SENSOR"),
                qos,
                false,
                serde_json::Value::Object(doc).to_string(),
            )
            .await?;
        }
        Preset::Zigbee2mqtt => {
            let mut doc = serde_json::Map::new();
            for ((t, ..), v) in SENSORS.iter().zip(&values) {
                doc.insert((*t).to_string(), round(*v).into());
            }
            doc.insert("linkquality".into(), 120.into());
            c.publish(
                format!("zigbee2mqtt/{n}"),
                qos,
                false,
                serde_json::Value::Object(doc).to_string(),
            )
            .await?;
        }
        Preset::Homie => {
            for ((t, ..), v) in SENSORS.iter().zip(&values) {
                c.publish(
                    format!("homie/5/{n}/env/{t}"),
                    qos,
                    false,
                    round(*v).to_string(),
                )
                .await?;
            }
        }
        Preset::Sparkplug => {
            let metrics = values
                .iter()
                .enumerate()
                .map(|(i, v)| Metric {
                    alias: Some(i as u64 + 1),
                    timestamp: Some(ms()),
                    datatype: Some(datatype::DOUBLE),
                    value: Some(MetricValue::Double(*v)),
                    ..Default::default()
                })
                .collect();
            let p = Payload {
                timestamp: Some(ms()),
                seq: Some(*seq % 256),
                metrics,
                ..Default::default()
            };
            *seq = (*seq + 1) % 256;
            c.publish(
                format!("spBv1.0/{GROUP}/DDATA/{n}/env"),
                qos,
                false,
                p.encode_to_vec(),
            )
            .await?;
        }
    }
    Ok(())
}
