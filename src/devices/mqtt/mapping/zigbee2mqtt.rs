//! Zigbee2MQTT: flat JSON state, units joined from the retained `bridge/devices`.

use super::*;

impl Sub {
    /// `<base>/<friendly name>`: flat JSON; units from the retained `<base>/bridge/devices`.
    pub(super) fn zigbee2mqtt(
        &mut self,
        vars: &Vars<'_>,
        payload: &[u8],
        out: &mut Mapped,
    ) -> Result<(), String> {
        let rest = vars.get("rest").unwrap_or("");
        if rest == "bridge/devices" {
            out.ignored = true;
            let v = json(payload)?;
            let list = v.as_array().ok_or("bridge/devices is not a JSON array")?;
            self.z2m_units.clear();
            for d in list {
                let Some(name) = d.get("friendly_name").and_then(Value::as_str) else {
                    continue;
                };
                let mut units = HashMap::new();
                if let Some(exposes) = d.pointer("/definition/exposes").and_then(Value::as_array) {
                    collect_units(exposes, &mut units, 0);
                }
                self.z2m_units.insert(name.to_string(), units);
            }
            return Ok(());
        }
        if rest.is_empty()
            || rest.starts_with("bridge/")
            || rest == "bridge"
            || ["/set", "/get", "/availability"]
                .iter()
                .any(|s| rest.ends_with(s))
            || rest.contains("/set/")
        {
            out.ignored = true;
            return Ok(());
        }
        let v = json(payload)?;
        let obj = v.as_object().ok_or("state payload is not a JSON object")?;
        let units = self.z2m_units.get(rest);
        let time = obj.get("last_seen").and_then(parse_time);
        for (k, val) in obj {
            if k == "last_seen" || self.cfg.ignore.contains(k) {
                continue;
            }
            let Some(value) = val.as_f64().filter(|x| crate::record::usable_value(*x)) else {
                continue;
            };
            out.readings.push(Reading {
                sensor_id: rest.to_string(),
                sensor_type: k.clone(),
                value,
                unit: units.and_then(|u| u.get(k)).cloned().unwrap_or_default(),
                time,
                metadata: BTreeMap::new(),
            });
        }
        Ok(())
    }
}

/// `exposes` entries with a unit, including the `features` of composite ones.
fn collect_units(list: &[Value], units: &mut HashMap<String, String>, depth: u32) {
    if depth > 8 {
        return;
    }
    for e in list {
        if let (Some(p), Some(u)) = (
            e.get("property").and_then(Value::as_str),
            e.get("unit").and_then(Value::as_str),
        ) {
            units.insert(p.to_string(), u.to_string());
        }
        if let Some(f) = e.get("features").and_then(Value::as_array) {
            collect_units(f, units, depth + 1);
        }
    }
}
