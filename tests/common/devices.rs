//! Device config blocks the tests share.

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

/// The demo config (`config/demo.toml`) pointed at this test's broker, mosquitto, EmStat
/// link, data dir and HTTP port. Run it with [`DEMO_ENV`].
pub fn demo_config(
    brokers: &str,
    mqtt_url: &str,
    emstat_link: &std::path::Path,
    data_dir: &std::path::Path,
    http: u16,
) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml"),
    )
    .expect("config/demo.toml")
    .replace("127.0.0.1:9092", brokers)
    .replace(
        "/tmp/labgate-demo-emstat",
        &emstat_link.display().to_string(),
    )
    .replace("\"/tmp/labgate-demo\"", &format!("{data_dir:?}"))
    .replace("127.0.0.1:9464", &format!("127.0.0.1:{http}"))
    .replace("mqtt://127.0.0.1:1883", mqtt_url)
}

/// The secrets the demo config reads from the environment: the lab application's API
/// token and the status page's operator token.
pub const DEMO_ENV: [(&str, &str); 2] = [
    ("LABGATE_DEMO_TOKEN", "demo-token-0123456789abcdef"),
    ("LABGATE_DEMO_OPERATOR_TOKEN", "operator-token-0123456789"),
];

/// `labgate simulate mqtt-sensors --preset zigbee2mqtt` publishing every 500 ms, as the
/// demo's MQTT device expects.
pub fn zigbee2mqtt_sensors(mqtt_url: &str) -> super::KillOnDrop {
    super::KillOnDrop(
        std::process::Command::new(super::labgate_bin())
            .args([
                "simulate",
                "mqtt-sensors",
                "--broker",
                mqtt_url,
                "--preset",
                "zigbee2mqtt",
                "--interval",
                "500ms",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("labgate simulate mqtt-sensors"),
    )
}
