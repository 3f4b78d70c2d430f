//! Measurement methods: `.mscr` bodies with declared, unit-checked parameters
//! (`devices/methods/README.md` describes the format).

use std::collections::BTreeMap;
use std::path::Path;

use super::script::Script;
use super::SI_PREFIXES;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
/// Why a method file cannot be used.
pub enum MethodError {
    #[error("method {0}: cannot read: {1}")]
    /// The file cannot be read (method, reason).
    Read(String, String),
    #[error("method {method}: line {line}, col {col}: {message}")]
    /// A line of the method is wrong.
    Syntax {
        /// The method's name.
        method: String,
        /// The line in the method file, from 1.
        line: usize,
        /// The column, from 1.
        col: usize,
        /// What is wrong.
        message: String,
    },
    #[error("method {method}: parameter {param}: {message}")]
    /// A parameter value is missing or out of range.
    Param {
        /// The method's name.
        method: String,
        /// The parameter.
        param: String,
        /// What is wrong with its value.
        message: String,
    },
}

/// A declared parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// The placeholder name, `{name}` in the script.
    pub name: String,
    /// SI unit, `-` for none.
    pub unit: String,
    /// Used when neither the config nor the `start` command gives a value.
    pub default: f64,
    /// Smallest accepted value.
    pub min: f64,
    /// Largest accepted value.
    pub max: f64,
    /// The value must be a whole number (scan counts).
    pub integer: bool,
}

#[derive(Debug, Clone, PartialEq)]
/// A MethodSCRIPT file with its declared technique and parameters.
pub struct Method {
    /// The file's name without extension.
    pub name: String,
    /// What the records of a run say they measured (`CV`, `CA` …).
    pub technique: String,
    /// Declared parameters, in file order.
    pub params: Vec<ParamSpec>,
    /// Script lines as written (full-line comments left out), with placeholders.
    body: Vec<String>,
    /// The line in the method file of each line of `body`, from 1.
    lines: Vec<usize>,
}

/// Parses `12`, `-200m`, `1.5e-3`, `100mV/s` (with `unit` = `V/s`). The unit, when given,
/// must be the declared one.
pub fn parse_quantity(text: &str, unit: &str) -> Result<f64, String> {
    let t = text.trim();
    let end = t
        .char_indices()
        .find(|(i, c)| {
            !(c.is_ascii_digit()
                || *c == '.'
                || ((*c == '-' || *c == '+') && (*i == 0 || t[..*i].ends_with(['e', 'E'])))
                || ((*c == 'e' || *c == 'E')
                    && t[i + 1..]
                        .starts_with(|n: char| n.is_ascii_digit() || n == '-' || n == '+')))
        })
        .map_or(t.len(), |(i, _)| i);
    let number: f64 = t[..end]
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    let rest = t[end..].trim();
    if rest.is_empty() || (unit != "-" && rest == unit) {
        return Ok(number);
    }
    let mut chars = rest.chars();
    let prefix = chars.next().unwrap_or(' ');
    let after = chars.as_str();
    let factor = SI_PREFIXES
        .iter()
        .find(|(c, _)| *c == prefix && *c != ' ')
        .map(|(_, f)| *f);
    match factor {
        Some(f) if after.is_empty() || (unit != "-" && after == unit) => Ok(number * f),
        _ => Err(format!(
            "{text:?}: expected a number with an SI prefix and unit {unit}"
        )),
    }
}

/// Writes a value as MethodSCRIPT literal: an integer with the largest SI prefix that
/// represents it exactly (`-0.2` → `-200m`, `0.0001` → `100u`, `2` → `2`).
pub fn literal(v: f64) -> Option<String> {
    if !v.is_finite() {
        return None;
    }
    if v == 0.0 {
        return Some("0".into());
    }
    for (prefix, f) in SI_PREFIXES.iter().rev() {
        let n = v / f;
        let r = n.round();
        if r != 0.0 && (n - r).abs() <= 1e-9 * r.abs().max(1.0) && r.abs() < 1e9 {
            let p = if *prefix == ' ' {
                String::new()
            } else {
                prefix.to_string()
            };
            return Some(format!("{}{p}", r as i64));
        }
    }
    None
}

impl Method {
    /// Loads `<dir>/<name>.mscr`, or `name` itself when it is a path to a file.
    pub fn load(dir: &Path, name: &str) -> Result<Method, MethodError> {
        let direct = Path::new(name);
        let path = if direct.extension().is_some_and(|e| e == "mscr") {
            direct.to_path_buf()
        } else {
            dir.join(format!("{name}.mscr"))
        };
        // Bytes, not UTF-8 text: a file saved by a Windows tool may carry Latin-1 in its
        // comments; the check refuses non-ASCII outside comments.
        let bytes = std::fs::read(&path)
            .map_err(|e| MethodError::Read(path.display().to_string(), e.to_string()))?;
        let text = String::from_utf8_lossy(&bytes);
        let stem = path
            .file_stem()
            .map_or_else(|| name.to_string(), |s| s.to_string_lossy().into_owned());
        Method::parse(&stem, &text)
    }

    /// Parses a method file's text and checks it as a device would: every problem is
    /// reported at its line and column in this text.
    pub fn parse(name: &str, text: &str) -> Result<Method, MethodError> {
        // A byte-order mark (Windows editors write one) is not part of the first line.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let syntax = |line: usize, col: usize, message: String| MethodError::Syntax {
            method: name.to_string(),
            line,
            col,
            message,
        };
        let mut technique = None;
        let mut params: Vec<ParamSpec> = Vec::new();
        let mut body = Vec::new();
        let mut lines = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim_end_matches('\r');
            let trimmed = line.trim();
            if let Some(c) = trimmed.strip_prefix('#') {
                let c = c.trim();
                if let Some(t) = c.strip_prefix("technique:") {
                    technique = Some((n, t.trim().to_string()));
                } else if let Some(p) = c.strip_prefix("param ") {
                    params.push(parse_param(p).map_err(|m| syntax(n, 1, m))?);
                }
                continue;
            }
            if trimmed.is_empty() {
                continue;
            }
            // Scripts as PalmSens' tools and examples write them begin with the `e`
            // command that runs them; the session sends that itself.
            if body.is_empty() && trimmed == "e" {
                continue;
            }
            // Sent without its trailing comment: the device gets ASCII commands only.
            body.push(super::script::without_comment(line).trim_end().to_string());
            lines.push(n);
        }
        let script = Script::parse(text);
        let problems = script.check();
        if let Some(p) = problems.first() {
            // Every problem, so one `labgate check` shows all there is to fix.
            let mut message = p.message.clone();
            for q in problems.iter().skip(1).take(9) {
                message.push_str(&format!("; line {}, col {}: {}", q.line, q.col, q.message));
            }
            if problems.len() > 10 {
                message.push_str(&format!("; and {} more", problems.len() - 10));
            }
            return Err(syntax(p.line, p.col, message));
        }
        // The measurement loops as written: (line, command, technique).
        let loops: Vec<(usize, String, String)> = script
            .stmts
            .iter()
            .filter_map(|s| {
                super::script::technique(&s.cmd.text).map(|t| (s.line, s.cmd.text.clone(), t))
            })
            .collect();
        // The technique is the first measurement loop's; a `# technique:` line may name
        // it, and must then agree with a loop of the script.
        let technique = match (technique, loops.first()) {
            (None, Some((_, _, t))) => t.clone(),
            (None, None) => {
                return Err(syntax(
                    1,
                    1,
                    "no measurement loop (meas_loop_…) and no `# technique:` line: cannot tell what the script measures".into(),
                ))
            }
            (Some((_, t)), None) => t,
            (Some((n, t)), Some(_)) => {
                if !loops.iter().any(|(_, _, lt)| lt.eq_ignore_ascii_case(&t)) {
                    let (ln, cmd, lt) = &loops[0];
                    return Err(syntax(
                        n,
                        1,
                        format!("`# technique: {t}`, but the measurement loop on line {ln} is {cmd} ({lt})"),
                    ));
                }
                t
            }
        };
        let m = Method {
            name: name.to_string(),
            technique,
            params,
            body,
            lines,
        };
        // Every placeholder declared, every declaration used.
        for (line, n) in m.body.iter().zip(&m.lines) {
            for ph in placeholders(line) {
                if !m.params.iter().any(|p| p.name == ph) {
                    return Err(syntax(
                        *n,
                        line.find("{{").map_or(1, |c| c + 1),
                        format!("placeholder {{{{{ph}}}}} is not declared"),
                    ));
                }
            }
        }
        for p in &m.params {
            let token = format!("{{{{{}}}}}", p.name);
            if !m.body.iter().any(|l| l.contains(&token)) {
                return Err(MethodError::Param {
                    method: m.name.clone(),
                    param: p.name.clone(),
                    message: "declared but not used".into(),
                });
            }
        }
        Ok(m)
    }

    /// The line in the method file of line `sent` (from 1) of the script sent to the
    /// device (the lines after its `e`).
    pub fn user_line(&self, sent: usize) -> Option<usize> {
        self.lines.get(sent.checked_sub(1)?).copied()
    }

    /// Fills the placeholders. `values` override defaults; each is a number in the
    /// parameter's unit or a string such as `"100m"` / `"100mV/s"`. Returns the script
    /// and the effective values.
    pub fn render(
        &self,
        values: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(String, BTreeMap<String, f64>), MethodError> {
        let err = |param: &str, message: String| MethodError::Param {
            method: self.name.clone(),
            param: param.to_string(),
            message,
        };
        for k in values.keys() {
            if !self.params.iter().any(|p| &p.name == k) {
                let known: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
                return Err(err(k, format!("unknown (known: {})", known.join(", "))));
            }
        }
        let mut effective = BTreeMap::new();
        for p in &self.params {
            let v = match values.get(&p.name) {
                None => p.default,
                Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                Some(serde_json::Value::String(s)) => {
                    parse_quantity(s, &p.unit).map_err(|m| err(&p.name, m))?
                }
                Some(other) => return Err(err(&p.name, format!("{other} is not a number"))),
            };
            if !(v >= p.min && v <= p.max) {
                return Err(err(
                    &p.name,
                    format!("{v} is outside {}..={} {}", p.min, p.max, p.unit),
                ));
            }
            if p.integer && v.fract() != 0.0 {
                return Err(err(&p.name, format!("{v} is not an integer")));
            }
            effective.insert(p.name.clone(), v);
        }
        let mut script = String::new();
        for line in &self.body {
            let mut l = line.clone();
            for (name, v) in &effective {
                let token = format!("{{{{{name}}}}}");
                if l.contains(&token) {
                    let lit = literal(*v)
                        .ok_or_else(|| err(name, format!("{v} cannot be written as a literal")))?;
                    l = l.replace(&token, &lit);
                }
            }
            script.push_str(&l);
            script.push('\n');
        }
        Ok((script, effective))
    }
}

fn placeholders(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(a) = rest.find("{{") {
        let Some(b) = rest[a..].find("}}") else { break };
        out.push(rest[a + 2..a + b].trim());
        rest = &rest[a + b + 2..];
    }
    out
}

/// `NAME UNIT default=V min=V max=V [integer]`
fn parse_param(text: &str) -> Result<ParamSpec, String> {
    let mut words = text.split_whitespace();
    let name = words.next().ok_or("param needs a name")?.to_string();
    let unit = words
        .next()
        .ok_or("param needs a unit (`-` for none)")?
        .to_string();
    let mut spec = ParamSpec {
        name,
        unit,
        default: f64::NAN,
        min: f64::NEG_INFINITY,
        max: f64::INFINITY,
        integer: false,
    };
    for w in words {
        if w == "integer" {
            spec.integer = true;
            continue;
        }
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| format!("unexpected {w:?}"))?;
        let v = parse_quantity(v, &spec.unit)?;
        match k {
            "default" => spec.default = v,
            "min" => spec.min = v,
            "max" => spec.max = v,
            _ => return Err(format!("unknown attribute {k:?}")),
        }
    }
    if spec.default.is_nan() {
        return Err(format!("param {} needs default=", spec.name));
    }
    if !(spec.default >= spec.min && spec.default <= spec.max) {
        return Err(format!("param {}: default outside min..max", spec.name));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shipped(name: &str) -> Method {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/methods");
        Method::load(&dir, name).unwrap()
    }

    #[test]
    fn a_script_as_palmsens_writes_it_needs_no_header_and_keeps_one_e() {
        let text = "e\n# a CV as an example script writes it\nvar c\nvar p\nset_pgstat_mode 3\ncell_on\nmeas_loop_cv p c -200m 600m -200m 10m 100m\n  pck_start\n  pck_add p\n  pck_add c\n  pck_end\nendloop\non_finished:\ncell_off\n";
        let m = Method::parse("example", text).unwrap();
        assert_eq!(m.technique, "CV");
        let (script, _) = m.render(&serde_json::Map::new()).unwrap();
        assert!(
            script.starts_with("var c\n"),
            "the session sends the e: {script}"
        );
        assert_eq!(script.matches("\ne\n").count(), 0);
        // A header that names another technique than the loop is refused, at its line.
        let wrong = text.replacen("e\n", "e\n# technique: DPV\n", 1);
        match Method::parse("example", &wrong) {
            Err(MethodError::Syntax { line, message, .. }) => {
                assert_eq!(line, 2);
                assert!(
                    message.contains("meas_loop_cv") && message.contains("line 8"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Method::parse("x", "var c\ncell_on\n").is_err(),
            "nothing measured"
        );
    }

    #[test]
    fn quantities_parse_with_prefixes_and_units() {
        assert_eq!(parse_quantity("12", "V").unwrap(), 12.0);
        assert!((parse_quantity("-200m", "V").unwrap() + 0.2).abs() < 1e-12);
        assert!((parse_quantity("100mV/s", "V/s").unwrap() - 0.1).abs() < 1e-12);
        assert!((parse_quantity("1.5e-3", "s").unwrap() - 0.0015).abs() < 1e-15);
        assert_eq!(parse_quantity("2V", "V").unwrap(), 2.0);
        assert!(parse_quantity("100mA", "V").is_err(), "wrong unit");
        assert!(parse_quantity("fast", "V").is_err());
        assert!(parse_quantity("5x", "V").is_err());
    }

    #[test]
    fn literals_are_integers_with_the_largest_exact_prefix() {
        assert_eq!(literal(-0.2).unwrap(), "-200m");
        assert_eq!(literal(0.0001).unwrap(), "100u");
        assert_eq!(literal(0.005).unwrap(), "5m");
        assert_eq!(literal(2.0).unwrap(), "2");
        assert_eq!(literal(0.0).unwrap(), "0");
        assert_eq!(literal(1500.0).unwrap(), "1500");
        assert_eq!(literal(0.1234).unwrap(), "123400u");
        for v in [-0.2, 0.0001, 0.1234, 3.3e-9, 7.0] {
            assert!(
                (parse_quantity(&literal(v).unwrap(), "-").unwrap() - v).abs() <= v.abs() * 1e-12
            );
        }
    }

    #[test]
    fn shipped_methods_load_and_render_with_defaults() {
        for (name, tech) in [("cv", "CV"), ("ca", "CA"), ("lsv", "LSV")] {
            let m = shipped(name);
            assert_eq!(m.technique, tech);
            let (script, _) = m.render(&serde_json::Map::new()).unwrap();
            assert!(!script.contains("{{") && !script.contains('#'), "{script}");
            assert!(
                script.contains("on_finished:"),
                "every script turns the cell off"
            );
        }
        let (script, eff) = shipped("cv").render(&serde_json::Map::new()).unwrap();
        assert!(
            script.contains("meas_loop_cv p c -200m 600m -200m 5m 100m nscans(1)"),
            "{script}"
        );
        assert_eq!(eff["scan_rate"], 0.1);
    }

    #[test]
    fn parameters_are_validated_and_named_in_errors() {
        let m = shipped("cv");
        let p = |v: serde_json::Value| v.as_object().unwrap().clone();
        let (script, _) = m
            .render(&p(json!({"scan_rate": "50mV/s", "n_scans": 3})))
            .unwrap();
        assert!(script.contains("5m 50m nscans(3)"), "{script}");
        let e = m
            .render(&p(json!({"scan_rate": "50mA"})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("scan_rate") && e.contains("V/s"), "{e}");
        let e = m
            .render(&p(json!({"scan_rate": 50})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside"), "{e}");
        let e = m
            .render(&p(json!({"n_scans": 1.5})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an integer"), "{e}");
        let e = m.render(&p(json!({"speed": 1}))).unwrap_err().to_string();
        assert!(e.contains("speed") && e.contains("unknown"), "{e}");
    }

    #[test]
    fn undeclared_or_unused_placeholders_are_errors() {
        let e = Method::parse("x", "# technique: CV\nset_e {{e}}\n").unwrap_err();
        assert!(e.to_string().contains("not declared"), "{e}");
        let e =
            Method::parse("x", "# technique: CV\n# param e V default=0\ncell_on\n").unwrap_err();
        assert!(e.to_string().contains("not used"), "{e}");
        let e = Method::parse("x", "cell_on\n").unwrap_err();
        assert!(e.to_string().contains("technique"), "{e}");
    }
}
