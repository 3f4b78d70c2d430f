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
