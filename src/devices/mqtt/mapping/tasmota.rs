//! Tasmota: `tele/<topic>/SENSOR` JSON, one sensor per object-valued key.

use super::*;

impl Sub {
    /// `tele/<topic>/SENSOR`: every object-valued top-level key is a sensor, each numeric
    /// leaf a quantity. Units: `TempUnit`, `PressureUnit`, else Tasmota's fixed ones.
    /// `Time` is device-local without a zone, so it goes to metadata and the receive
    /// time is used.
    pub(super) fn tasmota(
        &self,
        vars: &Vars<'_>,
        payload: &[u8],
        out: &mut Mapped,
    ) -> Result<(), String> {
        let v = json(payload)?;
        let obj = v.as_object().ok_or("SENSOR payload is not a JSON object")?;
        let device = vars
            .get("topic")
            .or_else(|| vars.first_by_name())
            .unwrap_or("tasmota")
            .to_string();
        let unit_of = |k: &str| -> Option<String> {
            obj.get(k).and_then(Value::as_str).map(|u| match u {
                "C" => "°C".to_string(),
                "F" => "°F".to_string(),
                other => other.to_string(),
            })
        };
        let temp = unit_of("TempUnit").unwrap_or_else(|| "°C".into());
        let pressure = unit_of("PressureUnit").unwrap_or_else(|| "hPa".into());
        for (sensor, fields) in obj {
            let Some(fields) = fields.as_object() else {
                continue;
            };
            for (q, val) in fields {
                let Some(value) = val.as_f64().filter(|x| crate::record::usable_value(*x)) else {
                    continue;
                };
                let quantity = q.to_ascii_lowercase();
                if self.cfg.ignore.iter().any(|i| i.eq_ignore_ascii_case(q)) {
                    continue;
                }
                let unit = match quantity.as_str() {
                    "temperature" | "dewpoint" => temp.clone(),
                    "pressure" | "seapressure" => pressure.clone(),
                    "humidity" => "%".into(),
                    "co2" | "eco2" => "ppm".into(),
                    "tvoc" => "ppb".into(),
                    "illuminance" => "lx".into(),
                    "voltage" => "V".into(),
                    "current" => "A".into(),
                    "power" => "W".into(),
                    "total" | "today" | "yesterday" => "kWh".into(),
                    "distance" => "cm".into(),
                    _ => String::new(),
                };
                let mut metadata = BTreeMap::new();
                if let Some(t) = obj.get("Time").and_then(Value::as_str) {
                    metadata.insert("device_time".to_string(), t.into());
                }
                if let Some(id) = fields.get("Id") {
                    metadata.insert("id".to_string(), id.clone());
                }
                out.readings.push(Reading {
                    sensor_id: format!("{device}/{sensor}"),
                    sensor_type: quantity,
                    value,
                    unit,
                    time: None,
                    metadata,
                });
            }
        }
        Ok(())
    }
}
