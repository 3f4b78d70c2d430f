//! Topic patterns: MQTT filters whose wildcards may carry a name (`lab/+room/+id/temp`),
//! so a mapping can build sensor ids from topic segments.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Lit(String),
    /// `+` or `+name`: one level.
    One(Option<String>),
    /// `#` or `#name`: the rest (last segment only).
    Rest(Option<String>),
}

/// A parsed pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    segs: Vec<Seg>,
}

impl Pattern {
    /// Parses a pattern; `+name` and `#name` name the level for templates.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        let parts: Vec<&str> = s.split('/').collect();
        let mut segs = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let name = |rest: &str| -> Result<Option<String>, String> {
                if rest.is_empty() {
                    Ok(None)
                } else if rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    Ok(Some(rest.to_string()))
                } else {
                    Err(format!(
                        "wildcard name {rest:?} must be letters, digits or '_'"
                    ))
                }
            };
            if let Some(rest) = p.strip_prefix('+') {
                segs.push(Seg::One(name(rest)?));
            } else if let Some(rest) = p.strip_prefix('#') {
                if i + 1 != parts.len() {
                    return Err("'#' must be the last level".into());
                }
                segs.push(Seg::Rest(name(rest)?));
            } else if p.contains(['+', '#']) {
                return Err(format!("level {p:?}: a wildcard must fill its whole level"));
            } else {
                segs.push(Seg::Lit((*p).to_string()));
            }
        }
        Ok(Pattern { segs })
    }

    /// The plain MQTT filter to subscribe to.
    pub fn filter(&self) -> String {
        self.segs
            .iter()
            .map(|s| match s {
                Seg::Lit(l) => l.as_str(),
                Seg::One(_) => "+",
                Seg::Rest(_) => "#",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Names of the wildcards, in order.
    pub fn names(&self) -> Vec<&str> {
        self.segs
            .iter()
            .filter_map(|s| match s {
                Seg::One(Some(n)) | Seg::Rest(Some(n)) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The named segments of `topic` if it matches (MQTT rules: wildcards do not match
    /// topics starting with `$` at the first level).
    pub fn matches(&self, topic: &str) -> Option<BTreeMap<String, String>> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = BTreeMap::new();
        if topic.starts_with('$') && !matches!(self.segs.first(), Some(Seg::Lit(_))) {
            return None;
        }
        for (i, seg) in self.segs.iter().enumerate() {
            match seg {
                Seg::Lit(l) => {
                    if levels.get(i) != Some(&l.as_str()) {
                        return None;
                    }
                }
                Seg::One(name) => {
                    let v = levels.get(i)?;
                    if let Some(n) = name {
                        out.insert(n.clone(), (*v).to_string());
                    }
                }
                Seg::Rest(name) => {
                    if let Some(n) = name {
                        out.insert(n.clone(), levels.get(i..)?.join("/"));
                    }
                    return Some(out);
                }
            }
        }
        (levels.len() == self.segs.len()).then_some(out)
    }
}

/// Fills `{name}` placeholders from `vars`; unknown names are an error.
pub fn fill(template: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {template:?}"))?;
        let name = &after[..close];
        let v = vars
            .get(name)
            .ok_or_else(|| format!("{{{name}}} is not a wildcard name of the topic"))?;
        out.push_str(v);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `{name}`s a template uses.
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                out.push(&after[..close]);
                rest = &after[close + 1..];
            }
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_wildcards_capture_segments() {
        let p = Pattern::parse("lab/+room/+id/temperature").unwrap();
        assert_eq!(p.filter(), "lab/+/+/temperature");
        let m = p.matches("lab/b12/t-001/temperature").unwrap();
        assert_eq!(m["room"], "b12");
        assert_eq!(m["id"], "t-001");
        assert!(p.matches("lab/b12/t-001/humidity").is_none());
        assert!(p.matches("lab/b12/temperature").is_none());
        assert!(p.matches("lab/b12/x/temperature/extra").is_none());
        let r = Pattern::parse("zigbee2mqtt/#name").unwrap();
        assert_eq!(r.filter(), "zigbee2mqtt/#");
        assert_eq!(
            r.matches("zigbee2mqtt/room/th1").unwrap()["name"],
            "room/th1"
        );
        assert!(Pattern::parse("+/x").unwrap().matches("$SYS/x").is_none());
    }

    #[test]
    fn bad_patterns_and_templates_are_refused() {
        assert!(Pattern::parse("a/#/b").is_err());
        assert!(Pattern::parse("a/b+").is_err());
        assert!(Pattern::parse("a/+bad-name").is_err());
        assert!(Pattern::parse("").is_err());
        let vars = BTreeMap::from([("id".to_string(), "t1".to_string())]);
        assert_eq!(fill("room-{id}", &vars).unwrap(), "room-t1");
        assert!(fill("{nope}", &vars).is_err());
        assert!(fill("{id", &vars).is_err());
        assert_eq!(placeholders("{a}-{b}"), ["a", "b"]);
    }
}
