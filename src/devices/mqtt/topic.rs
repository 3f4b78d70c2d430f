//! Topic patterns: MQTT filters whose wildcards may carry a name (`lab/+room/+id/temp`),
//! so a mapping can build sensor ids from topic segments.

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
    /// topics starting with `$` at the first level). Borrowed from the pattern and the
    /// topic: matching a message allocates nothing for up to [`INLINE_VARS`] names.
    pub fn matches<'a>(&'a self, topic: &'a str) -> Option<Vars<'a>> {
        if topic.starts_with('$') && !matches!(self.segs.first(), Some(Seg::Lit(_))) {
            return None;
        }
        let mut out = Vars::default();
        let mut levels = topic.split('/');
        // Where the next level starts; one past the end once every level is taken.
        let mut at = 0;
        for seg in &self.segs {
            match seg {
                Seg::Lit(l) => {
                    let level = levels.next()?;
                    if level != l {
                        return None;
                    }
                    at += level.len() + 1;
                }
                Seg::One(name) => {
                    let level = levels.next()?;
                    if let Some(n) = name {
                        out.push(n, level);
                    }
                    at += level.len() + 1;
                }
                Seg::Rest(name) => {
                    // The levels left, as they stand in the topic ("" when none are).
                    if let Some(n) = name {
                        out.push(n, topic.get(at..).unwrap_or(""));
                    }
                    return Some(out);
                }
            }
        }
        levels.next().is_none().then_some(out)
    }
}

/// Named wildcards held without allocating.
pub const INLINE_VARS: usize = 4;

/// The named wildcards of a matched topic, in the pattern's order.
#[derive(Debug, Default)]
pub struct Vars<'a> {
    inline: [(&'a str, &'a str); INLINE_VARS],
    len: usize,
    more: Vec<(&'a str, &'a str)>,
}

impl<'a> Vars<'a> {
    fn push(&mut self, name: &'a str, value: &'a str) {
        match self.inline.get_mut(self.len) {
            Some(slot) => {
                *slot = (name, value);
                self.len += 1;
            }
            None => self.more.push((name, value)),
        }
    }

    fn pairs(&self) -> impl Iterator<Item = &(&'a str, &'a str)> {
        self.inline[..self.len].iter().chain(&self.more)
    }

    /// The value of the wildcard `name` (its last, if the pattern names two alike).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.pairs()
            .filter(|(n, _)| *n == name)
            .last()
            .map(|(_, v)| *v)
    }

    /// The value of the wildcard whose name sorts first: the default sensor id when a
    /// mapping gives no template.
    pub fn first_by_name(&self) -> Option<&'a str> {
        let first = self.pairs().map(|(n, _)| *n).min()?;
        self.get(first)
    }
}

/// Fills `{name}` placeholders from `vars`; unknown names are an error.
pub fn fill(template: &str, vars: &Vars<'_>) -> Result<String, String> {
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
    use std::collections::BTreeMap;

    #[test]
    fn named_wildcards_capture_segments() {
        let p = Pattern::parse("lab/+room/+id/temperature").unwrap();
        assert_eq!(p.filter(), "lab/+/+/temperature");
        let m = p.matches("lab/b12/t-001/temperature").unwrap();
        assert_eq!(m.get("room"), Some("b12"));
        assert_eq!(m.get("id"), Some("t-001"));
        assert_eq!(m.first_by_name(), Some("t-001"), "`id` sorts before `room`");
        assert!(p.matches("lab/b12/t-001/humidity").is_none());
        assert!(p.matches("lab/b12/temperature").is_none());
        assert!(p.matches("lab/b12/x/temperature/extra").is_none());
        let r = Pattern::parse("zigbee2mqtt/#name").unwrap();
        assert_eq!(r.filter(), "zigbee2mqtt/#");
        assert_eq!(
            r.matches("zigbee2mqtt/room/th1").unwrap().get("name"),
            Some("room/th1")
        );
        assert_eq!(r.matches("zigbee2mqtt").unwrap().get("name"), Some(""));
        assert!(Pattern::parse("+/x").unwrap().matches("$SYS/x").is_none());
    }

    #[test]
    fn bad_patterns_and_templates_are_refused() {
        assert!(Pattern::parse("a/#/b").is_err());
        assert!(Pattern::parse("a/b+").is_err());
        assert!(Pattern::parse("a/+bad-name").is_err());
        assert!(Pattern::parse("").is_err());
        let p = Pattern::parse("lab/+id").unwrap();
        let vars = p.matches("lab/t1").unwrap();
        assert_eq!(fill("room-{id}", &vars).unwrap(), "room-t1");
        assert!(fill("{nope}", &vars).is_err());
        assert!(fill("{id", &vars).is_err());
        assert_eq!(placeholders("{a}-{b}"), ["a", "b"]);
    }

    /// The matcher as it was first written (levels collected, names copied into a
    /// map), kept to check the borrowing one against.
    fn matches_by_map(p: &Pattern, topic: &str) -> Option<BTreeMap<String, String>> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = BTreeMap::new();
        if topic.starts_with('$') && !matches!(p.segs.first(), Some(Seg::Lit(_))) {
            return None;
        }
        for (i, seg) in p.segs.iter().enumerate() {
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
        (levels.len() == p.segs.len()).then_some(out)
    }

    proptest::proptest! {
        #[test]
        fn matching_borrows_what_the_map_based_matcher_copied(
            segs in proptest::collection::vec(
                proptest::prop_oneof!["[ab$]{0,2}", "\\+[xyz]?", "#[xyz]?"], 1..7),
            topic in "[ab$/]{0,10}",
        ) {
            // Patterns with `#` anywhere but last are refused by `parse`.
            let text = segs.join("/");
            if let Ok(p) = Pattern::parse(&text) {
                let ours = p.matches(&topic);
                let theirs = matches_by_map(&p, &topic);
                proptest::prop_assert_eq!(ours.is_some(), theirs.is_some(), "{} on {:?}", text, topic);
                if let (Some(ours), Some(theirs)) = (ours, theirs) {
                    for (name, value) in &theirs {
                        proptest::prop_assert_eq!(ours.get(name), Some(value.as_str()));
                    }
                    proptest::prop_assert_eq!(ours.first_by_name(), theirs.values().next().map(String::as_str));
                    proptest::prop_assert_eq!(ours.pairs().count() >= theirs.len(), true);
                }
            }
        }
    }
}
