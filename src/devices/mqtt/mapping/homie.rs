//! Homie 5: values typed by the retained `$description`.

use super::*;

impl Sub {
    /// Homie 5: `<base>/<device>/$description` (JSON) and `<base>/<device>/<node>/<property>`.
    pub(super) fn homie(
        &mut self,
        vars: &Vars<'_>,
        payload: &[u8],
        out: &mut Mapped,
    ) -> Result<(), String> {
        let rest = vars.get("rest").unwrap_or("");
        let levels: Vec<&str> = rest.split('/').collect();
        match levels.as_slice() {
            [device, "$description"] => {
                out.ignored = true;
                if payload.is_empty() {
                    self.homie.remove(*device);
                    return Ok(());
                }
                let v = json(payload)?;
                let nodes = v
                    .get("nodes")
                    .and_then(Value::as_object)
                    .ok_or("$description has no \"nodes\" object")?;
                let mut table = HashMap::new();
                for (node, n) in nodes {
                    let mut props = HashMap::new();
                    if let Some(ps) = n.get("properties").and_then(Value::as_object) {
                        for (p, d) in ps {
                            let dt = d
                                .get("datatype")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string();
                            let unit = d
                                .get("unit")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string();
                            props.insert(p.clone(), (dt, unit));
                        }
                    }
                    table.insert(node.clone(), props);
                }
                self.homie.insert((*device).to_string(), table);
                Ok(())
            }
            [device, node, property]
                if ![device, node, property].iter().any(|l| l.starts_with('$')) =>
            {
                let known = self
                    .homie
                    .get(*device)
                    .and_then(|d| d.get(*node))
                    .and_then(|n| n.get(*property));
                let text =
                    std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_string())?;
                let value = match known.map(|(dt, _)| dt.as_str()) {
                    Some("integer" | "float") | None => match parse_number(text.trim()) {
                        Ok(v) => v,
                        // Without a description, a non-number is some other datatype.
                        Err(_) if known.is_none() => {
                            out.ignored = true;
                            return Ok(());
                        }
                        Err(e) => return Err(e),
                    },
                    Some("boolean") => match text {
                        "true" => 1.0,
                        "false" => 0.0,
                        other => return Err(format!("boolean property with payload {other:?}")),
                    },
                    // string, enum, color, datetime, duration, json: not measurements.
                    Some(_) => {
                        out.ignored = true;
                        return Ok(());
                    }
                };
                if self.cfg.ignore.iter().any(|i| i == property) {
                    out.ignored = true;
                    return Ok(());
                }
                out.readings.push(Reading {
                    sensor_id: format!("{device}/{node}"),
                    sensor_type: (*property).to_string(),
                    value,
                    unit: known.map(|(_, u)| u.clone()).unwrap_or_default(),
                    time: None,
                    metadata: BTreeMap::new(),
                });
                Ok(())
            }
            _ => {
                out.ignored = true;
                Ok(())
            }
        }
    }
}
