//! MethodSCRIPT source as a device reads it: statements with their line and column in
//! the user's file, the block structure, and a check of what a device would refuse.
//!
//! Shared by `labgate check` (through [`super::method::Method`]), by the driver (which
//! measurement loop produced a data package, and what it applied) and by the EmStat
//! simulator, which interprets the same statements.
//!
//! The command list is the registry of MethodSCRIPT 1.9 commands. Argument kinds are
//! checked for the commands whose signatures PalmSens' published example scripts show;
//! the others are known commands whose arguments are not counted, so a valid script is
//! never refused for a command this table does not describe in full.

use std::collections::HashMap;

use super::SI_PREFIXES;

/// Device error codes used for problems found in a script (docs/protocols.md §1.5).
pub mod code {
    /// Unexpected argument value (also: wrong number of arguments).
    pub const BAD_ARGUMENT: u16 = 0x0007;
    /// The script command is unknown.
    pub const UNKNOWN_COMMAND: u16 = 0x4001;
    /// Unexpected character (a literal that does not parse, a stray block end).
    pub const UNEXPECTED: u16 = 0x4004;
    /// Measurement loops cannot be nested.
    pub const NESTED_MEAS_LOOP: u16 = 0x400B;
    /// The script ended inside a block.
    pub const ENDED_UNEXPECTEDLY: u16 = 0x4018;
    /// The variable already exists.
    pub const VAR_EXISTS: u16 = 0x4026;
    /// Invalid variable name.
    pub const BAD_NAME: u16 = 0x402B;
    /// An argument variable that was not declared.
    pub const UNDECLARED: u16 = 0x420B;
}

/// One word of a statement, with its column (from 1) in the user's file.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// The word as written.
    pub text: String,
    /// Its column, from 1.
    pub col: usize,
}

/// One command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Stmt {
    /// Line in the user's file, from 1.
    pub line: usize,
    /// The command and its column.
    pub cmd: Token,
    /// Its arguments (a condition's operands and operator are arguments too).
    pub args: Vec<Token>,
}

/// Something a device would refuse, at its place in the user's file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub col: usize,
    /// The device error code it corresponds to.
    pub code: u16,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}, col {}: {} (device error {:04X})",
            self.line, self.col, self.message, self.code
        )
    }
}

/// A script: its statements in order. The leading `e` that PalmSens' tools write (the
/// command that runs the script) is not a statement; the session sends it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Script {
    /// The statements, in file order.
    pub stmts: Vec<Stmt>,
}

/// What an argument must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A variable the command writes (declared before; an array element counts).
    Out,
    /// A value: a literal or a declared variable.
    Val,
    /// A variable type code (`ba`, `da`, `ja` …).
    Type,
    /// A string (`"…"` or `f"…"`).
    Str,
    /// A declared array.
    Array,
    /// A new name (declarations).
    New,
}

/// What the check knows of a command's arguments. Any command may end in `name(…)`
/// options (`nscans(3)`, `cell_on ocp(p)`, `… eis_opt(100u 1)`).
enum Sig {
    /// The fixed arguments, by kind.
    Known(&'static [Kind]),
    /// A registry command whose arguments are not counted.
    Unchecked,
}

use Kind::{Array as A, New as N, Out as O, Str as S, Type as T, Val as V};

const fn sig(kinds: &'static [Kind]) -> Sig {
    Sig::Known(kinds)
}

/// Every command of the MethodSCRIPT 1.9 registry; block and condition commands are
/// handled by the structure check.
const REGISTRY: &[&str] = &[
    "var",
    "array",
    "store_var",
    "copy_var",
    "add_var",
    "sub_var",
    "mul_var",
    "div_var",
    "set_e",
    "set_int",
    "await_int",
    "wait",
    "loop",
    "endloop",
    "breakloop",
    "if",
    "else",
    "elseif",
    "endif",
    "get_time",
    "meas",
    "meas_loop_lsv",
    "meas_loop_cv",
    "meas_loop_dpv",
    "meas_loop_swv",
    "meas_loop_npv",
    "meas_loop_ca",
    "meas_loop_pad",
    "meas_loop_ocp",
    "meas_loop_eis",
    "set_autoranging",
    "pck_start",
    "pck_add",
    "pck_end",
    "set_max_bandwidth",
    "set_cr",
    "cell_on",
    "cell_off",
    "set_pgstat_mode",
    "send_string",
    "set_pgstat_chan",
    "set_gpio_cfg",
    "set_gpio_pullup",
    "set_gpio",
    "get_gpio",
    "set_pot_range",
    "set_poly_we_mode",
    "file_open",
    "file_close",
    "set_script_output",
    "array_get",
    "array_set",
    "i2c_config",
    "i2c_read_byte",
    "i2c_write_byte",
    "i2c_read",
    "i2c_write",
    "i2c_write_read",
    "hibernate",
    "abort",
    "timer_start",
    "timer_get",
    "set_range",
    "set_range_minmax",
    "meas_loop_cp",
    "set_i",
    "meas_loop_lsp",
    "meas_loop_geis",
    "int_to_float",
    "float_to_int",
    "bit_and_var",
    "bit_or_var",
    "bit_xor_var",
    "bit_lsl_var",
    "bit_lsr_var",
    "bit_inv_var",
    "set_channel_sync",
    "set_acquisition_frac",
    "mux_config",
    "mux_get_channel_count",
    "mux_set_channel",
    "set_gpio_msk",
    "get_gpio_msk",
    "set_e_aux",
    "set_ir_comp",
    "meas_fast_cv",
    "set_acquisition_frac_autoadjust",
    "alter_vartype",
    "meas_loop_acv",
    "meas_ms_eis",
    "meas_fast_ca",
    "mod_var",
    "notify_led",
    "set_scan_dir",
    "meas_loop_ca_alt_mux",
    "meas_loop_cp_alt_mux",
    "meas_loop_ocp_alt_mux",
    "smooth",
    "peak_detect",
    "set_bipot_mode",
    "set_bipot_potential",
    "meas_loop_eis_dual",
    "rtc_get",
    "beep",
    "battery_perc",
    "get_progress",
    "pow_var",
    "subarray",
    "log_var",
    "linear_fit",
    "mean",
    "trim_enable",
    "meas_scp",
    "display_text",
    "display_btns",
    "display_clear",
    "display_progress",
    "display_icon",
    "display_draw",
    "display_inp_num",
    "display_scroll_add",
    "display_scroll_get",
    "display_keyboard",
    "qr_scan",
    "str",
    "store_str",
    "load_saved_start",
    "load_saved_end",
    "load_saved_var",
    "load_saved_str",
    "save_var",
    "save_str",
    "float_to_int_round",
    "drop_detect_loop",
    "display_filebrowse",
];

fn signature(cmd: &str) -> Option<Sig> {
    let s = match cmd {
        "var" => sig(&[N]),
        "array" => sig(&[N, V]),
        "store_var" => sig(&[O, V, T]),
        "copy_var" => sig(&[V, O]),
        "add_var" | "sub_var" | "mul_var" | "div_var" | "mod_var" | "pow_var" => sig(&[O, V]),
        "set_e" | "set_i" | "wait" | "set_int" | "set_pgstat_chan" | "set_pgstat_mode"
        | "set_max_bandwidth" | "set_gpio" | "mux_set_channel" | "set_script_output" => sig(&[V]),
        "await_int" | "cell_on" | "cell_off" | "timer_start" | "pck_start" | "pck_end" => sig(&[]),
        "timer_get" | "get_gpio" | "mux_get_channel_count" => sig(&[O]),
        "pck_add" => sig(&[V]),
        "set_range" => sig(&[T, V]),
        "set_autoranging" | "set_range_minmax" => sig(&[T, V, V]),
        "set_gpio_cfg" | "mux_config" => sig(&[V, V]),
        "send_string" => sig(&[S]),
        "file_open" => sig(&[S, V]),
        "array_set" => sig(&[A, V, V]),
        "array_get" => sig(&[A, V, O]),
        "meas_loop_lsv" | "meas_loop_lsp" => sig(&[O, O, V, V, V, V]),
        "meas_loop_cv" => sig(&[O, O, V, V, V, V, V]),
        "meas_loop_dpv" => sig(&[O, O, V, V, V, V, V, V]),
        "meas_loop_swv" => sig(&[O, O, O, O, V, V, V, V, V]),
        "meas_loop_npv" => sig(&[O, O, V, V, V, V, V]),
        "meas_loop_ca" | "meas_loop_cp" => sig(&[O, O, V, V, V]),
        "meas_loop_pad" => sig(&[O, O, V, V, V, V, V, V]),
        "meas_loop_ocp" => sig(&[O, V, V]),
        "meas_loop_eis" | "meas_loop_geis" => sig(&[O, O, O, V, V, V, V, V]),
        "meas_loop_acv" => sig(&[O, O, O, O, O, O, V, V, V, V, V, V]),
        "meas_loop_ca_alt_mux" => sig(&[O, A, V, V, V, V, V]),
        c if REGISTRY.contains(&c) => Sig::Unchecked,
        _ => return None,
    };
    Some(s)
}

/// Is this command a measurement loop (closed by `endloop`)?
pub fn is_meas_loop(cmd: &str) -> bool {
    cmd.starts_with("meas_loop_")
}

/// The technique a measurement command measures: `meas_loop_cv` → `CV`,
/// `meas_loop_ca_alt_mux` → `CA`, `meas_loop_geis` → `GEIS`, `meas_fast_ca` → `FCA`.
pub fn technique(cmd: &str) -> Option<String> {
    if let Some(rest) = cmd.strip_prefix("meas_loop_") {
        let name = rest.split('_').next().filter(|n| !n.is_empty())?;
        return Some(name.to_ascii_uppercase());
    }
    match cmd {
        "meas_fast_ca" => Some("FCA".into()),
        "meas_fast_cv" => Some("FCV".into()),
        _ => None,
    }
}

/// A number as MethodSCRIPT writes it: `-500m`, `11i`, `1M`, `0x0020`, `2`, `1.5u`.
pub fn literal(text: &str) -> Option<f64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return i64::from_str_radix(hex, 16).ok().map(|v| v as f64);
    }
    if let Some(bin) = text.strip_prefix("0b") {
        return i64::from_str_radix(bin, 2).ok().map(|v| v as f64);
    }
    let (num, factor) = match text.char_indices().last() {
        Some((i, 'i')) => (&text[..i], 1.0),
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let f = SI_PREFIXES
                .iter()
                .find(|(p, _)| *p == c && *p != ' ')
                .map(|(_, f)| *f)?;
            (&text[..i], f)
        }
        _ => (text, 1.0),
    };
    if num.is_empty()
        || !num
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'+')
        || num.bytes().skip(1).any(|b| b == b'-' || b == b'+')
    {
        return None;
    }
    let v: f64 = num.parse().ok()?;
    // 1e-6 is not exact in f64: divide by the exact power of ten for small prefixes.
    Some(if factor < 1.0 {
        v / (1.0 / factor).round()
    } else {
        v * factor
    })
}

/// `name[index]` → (name, index).
pub fn element(text: &str) -> Option<(&str, &str)> {
    let (name, rest) = text.split_once('[')?;
    let index = rest.strip_suffix(']')?;
    Some((name, index))
}

/// `nscans(3)` → (`nscans`, [`3`]).
pub fn option(text: &str) -> Option<(&str, Vec<&str>)> {
    let (name, rest) = text.split_once('(')?;
    let inner = rest.strip_suffix(')')?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return None;
    }
    Some((
        name,
        inner
            .split([',', ' ', '\t'])
            .filter(|s| !s.is_empty())
            .collect(),
    ))
}

fn is_name(text: &str) -> bool {
    let mut b = text.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn is_placeholder(text: &str) -> bool {
    text.starts_with("{{") && text.ends_with("}}")
}

const OPERATORS: [&str; 6] = ["==", "!=", ">=", "<=", ">", "<"];

/// Splits a line into words, with columns; a `#` outside a string starts a comment.
fn words(line: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut start = 0;
    let mut in_str = false;
    // Inside `name(…)` options whitespace does not split (`eis_opt(100u 1)`).
    let mut depth = 0usize;
    for (col, c) in line.chars().enumerate() {
        if in_str {
            cur.push(c);
            if c == '"' {
                in_str = false;
            }
            continue;
        }
        if c == '#' {
            break;
        }
        if c.is_whitespace() && depth > 0 {
            cur.push(c);
            continue;
        }
        if c.is_whitespace() {
            if !cur.is_empty() {
                out.push(Token {
                    text: std::mem::take(&mut cur),
                    col: start + 1,
                });
            }
            continue;
        }
        if cur.is_empty() {
            start = col;
        }
        match c {
            '"' => in_str = true,
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(Token {
            text: cur,
            col: start + 1,
        });
    }
    out
}

/// The line up to a `#` that is not inside a string.
pub fn without_comment(line: &str) -> &str {
    let mut in_str = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Splits `i<n` into `i`, `<`, `n` (conditions may be written without spaces).
fn split_condition(args: Vec<Token>) -> Vec<Token> {
    let mut out = Vec::new();
    for t in args {
        let mut rest = t.text.as_str();
        let mut col = t.col;
        while !rest.is_empty() {
            let found = rest.char_indices().find_map(|(i, _)| {
                OPERATORS
                    .iter()
                    .find(|o| rest[i..].starts_with(**o))
                    .map(|o| (i, *o))
            });
            match found {
                Some((0, op)) => {
                    out.push(Token {
                        text: op.into(),
                        col,
                    });
                    rest = &rest[op.len()..];
                    col += op.len();
                }
                Some((i, _)) => {
                    out.push(Token {
                        text: rest[..i].into(),
                        col,
                    });
                    rest = &rest[i..];
                    col += i;
                }
                None => {
                    out.push(Token {
                        text: rest.into(),
                        col,
                    });
                    rest = "";
                }
            }
        }
    }
    out
}

impl Script {
    /// Reads a script's text. Comments, blank lines and a leading `e` line are not
    /// statements; every statement keeps its line and columns in `text`.
    pub fn parse(text: &str) -> Script {
        Script::read(text, true)
    }

    /// Reads a script as a device receives it (after `e`): every line is a statement.
    pub fn parse_sent(text: &str) -> Script {
        Script::read(text, false)
    }

    fn read(text: &str, skip_e: bool) -> Script {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut stmts = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let mut w = words(raw.trim_end_matches('\r'));
            if w.is_empty() {
                continue;
            }
            let cmd = w.remove(0);
            if skip_e && stmts.is_empty() && cmd.text == "e" && w.is_empty() {
                continue;
            }
            let args = if matches!(cmd.text.as_str(), "loop" | "if" | "elseif") {
                split_condition(w)
            } else {
                w
            };
            stmts.push(Stmt {
                line: i + 1,
                cmd,
                args,
            });
        }
        Script { stmts }
    }

    /// What a device would refuse, in file order (empty: the script is good). Line
    /// length is not limited: PalmSens' own examples have script lines longer than the
    /// 128 characters of a host command.
    pub fn check(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut c = Checker::default();
        for s in &self.stmts {
            c.stmt(s);
        }
        for (kind, line, col) in c.blocks.drain(..).rev() {
            c.problems.push(Problem {
                line,
                col,
                code: code::ENDED_UNEXPECTEDLY,
                message: format!("{kind} is never closed"),
            });
        }
        problems.extend(c.problems);
        problems.sort_by_key(|p| (p.line, p.col));
        problems
    }

    /// Every `loop`/`meas_loop_*` with the index of its `endloop` (well-formed scripts).
    pub fn blocks(&self) -> Vec<(usize, usize)> {
        let mut open = Vec::new();
        let mut out = Vec::new();
        for (i, s) in self.stmts.iter().enumerate() {
            let c = s.cmd.text.as_str();
            if c == "loop" || is_meas_loop(c) {
                open.push(i);
            } else if c == "endloop" {
                if let Some(o) = open.pop() {
                    out.push((o, i));
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// Values known before statement `at` runs, from straight-line `store_var` and
    /// `copy_var` (a variable assigned inside a loop or condition becomes unknown).
    pub fn constants_at(&self, at: usize) -> HashMap<String, f64> {
        let mut known: HashMap<String, f64> = HashMap::new();
        let mut depth = 0usize;
        for s in self.stmts.iter().take(at) {
            let c = s.cmd.text.as_str();
            let arg = |i: usize| s.args.get(i).map(|t| t.text.as_str());
            match c {
                "loop" | "if" => depth += 1,
                _ if is_meas_loop(c) => depth += 1,
                "endloop" | "endif" => depth = depth.saturating_sub(1),
                _ => {}
            }
            let target = match c {
                "store_var" => arg(0),
                "copy_var" => arg(1),
                "add_var"
                | "sub_var"
                | "mul_var"
                | "div_var"
                | "mod_var"
                | "pow_var"
                | "timer_get"
                | "array_get"
                | "mux_get_channel_count"
                | "get_gpio" => arg(if c == "array_get" { 2 } else { 0 }),
                _ => None,
            };
            let Some(target) = target else { continue };
            let value = match c {
                "store_var" => arg(1).and_then(|v| value_of(v, &known)),
                "copy_var" => arg(0).and_then(|v| value_of(v, &known)),
                _ => None,
            };
            match value {
                Some(v) if depth == 0 => {
                    known.insert(target.to_string(), v);
                }
                _ => {
                    known.remove(target);
                }
            }
        }
        known
    }
}

/// A literal, or a known variable's value.
pub fn value_of(text: &str, known: &HashMap<String, f64>) -> Option<f64> {
    literal(text).or_else(|| known.get(text).copied())
}

#[derive(Default)]
struct Checker {
    vars: HashMap<String, bool>, // name → is array
    /// Open blocks: (what, line, col).
    blocks: Vec<(&'static str, usize, usize)>,
    /// `else` seen in the innermost open `if`.
    else_seen: Vec<bool>,
    in_pck: Option<(usize, usize)>,
    on_finished: Option<usize>,
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, at: &Token, line: usize, code: u16, message: String) {
        self.problems.push(Problem {
            line,
            col: at.col,
            code,
            message,
        });
    }

    /// `name` must be a declared array.
    fn array(&mut self, t: &Token, name: &str, line: usize) {
        match self.vars.get(name) {
            Some(true) => {}
            Some(false) => self.problem(
                t,
                line,
                code::BAD_ARGUMENT,
                format!("{name} is not an array"),
            ),
            None => self.problem(
                t,
                line,
                code::UNDECLARED,
                format!("array {name} is not declared (`array {name} <size>`)"),
            ),
        }
    }

    fn value(&mut self, t: &Token, line: usize) {
        let text = t.text.as_str();
        if is_placeholder(text) || literal(text).is_some() {
            return;
        }
        if let Some((name, index)) = element(text) {
            self.array(t, name, line);
            let idx = Token {
                text: index.to_string(),
                col: t.col + name.len() + 1,
            };
            self.value(&idx, line);
            return;
        }
        if is_name(text) {
            if !self.vars.contains_key(text) {
                self.problem(
                    t,
                    line,
                    code::UNDECLARED,
                    format!("variable {text} is used before it is declared (`var {text}`)"),
                );
            }
            return;
        }
        if text.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+' || c == '.') {
            self.problem(
                t,
                line,
                code::UNEXPECTED,
                format!("{text:?} is not a number (digits with an SI prefix: 100m, 2u, 5i)"),
            );
        } else {
            self.problem(t, line, code::UNEXPECTED, format!("unexpected {text:?}"));
        }
    }

    fn arg(&mut self, kind: Kind, t: &Token, line: usize) {
        let text = t.text.as_str();
        match kind {
            Kind::Val => self.value(t, line),
            Kind::Out => {
                if literal(text).is_some() {
                    self.problem(
                        t,
                        line,
                        code::BAD_ARGUMENT,
                        format!("{text} is a number where a variable is written"),
                    );
                } else {
                    self.value(t, line);
                }
            }
            Kind::Type => {
                let b = text.as_bytes();
                if !(is_placeholder(text) || b.len() == 2 && b.iter().all(u8::is_ascii_lowercase)) {
                    self.problem(
                        t,
                        line,
                        code::BAD_ARGUMENT,
                        format!("{text:?} is not a variable type (two letters: ba, da, ja …)"),
                    );
                }
            }
            Kind::Str => {
                let s = text.strip_prefix('f').unwrap_or(text);
                if !(s.len() >= 2 && s.starts_with('"') && s.ends_with('"')) {
                    self.problem(
                        t,
                        line,
                        code::UNEXPECTED,
                        format!("{text} is not a string in double quotes"),
                    );
                }
            }
            Kind::Array => self.array(t, text, line),
            Kind::New => {
                if !is_name(text) {
                    self.problem(
                        t,
                        line,
                        code::BAD_NAME,
                        format!("{text:?} is not a valid variable name"),
                    );
                } else if self.vars.contains_key(text) {
                    self.problem(
                        t,
                        line,
                        code::VAR_EXISTS,
                        format!("variable {text} already exists"),
                    );
                }
            }
        }
    }

    fn condition(&mut self, s: &Stmt) {
        let ok = s.args.len() == 3 && OPERATORS.contains(&s.args[1].text.as_str());
        if !ok {
            self.problem(
                &s.cmd,
                s.line,
                code::BAD_ARGUMENT,
                format!(
                    "{} needs a condition `a <op> b` with op one of == != >= <= > <",
                    s.cmd.text
                ),
            );
            return;
        }
        self.value(&s.args[0], s.line);
        self.value(&s.args[2], s.line);
    }

    fn close(&mut self, s: &Stmt, want: &[&str]) -> Option<&'static str> {
        match self.blocks.last() {
            Some((kind, _, _)) if want.contains(kind) => self.blocks.pop().map(|b| b.0),
            other => {
                let open = other
                    .map(|(k, l, _)| format!(" (the open block is the {k} on line {l})"))
                    .unwrap_or_default();
                self.problem(
                    &s.cmd,
                    s.line,
                    code::UNEXPECTED,
                    format!(
                        "{} without a matching {}{open}",
                        s.cmd.text,
                        want.join(" or ")
                    ),
                );
                None
            }
        }
    }

    fn stmt(&mut self, s: &Stmt) {
        // A device reads ASCII only; a non-ASCII character outside a comment is refused.
        for t in std::iter::once(&s.cmd).chain(&s.args) {
            if let Some((i, ch)) = t.text.char_indices().find(|(_, c)| !c.is_ascii()) {
                let at = Token {
                    text: String::new(),
                    col: t.col + t.text[..i].chars().count(),
                };
                self.problem(
                    &at,
                    s.line,
                    code::UNEXPECTED,
                    format!("unexpected character {ch:?} (a device reads ASCII only)"),
                );
                return;
            }
        }
        let c = s.cmd.text.as_str();
        match c {
            "loop" => {
                self.condition(s);
                self.blocks.push(("loop", s.line, s.cmd.col));
                return;
            }
            "if" => {
                self.condition(s);
                self.blocks.push(("if", s.line, s.cmd.col));
                self.else_seen.push(false);
                return;
            }
            "elseif" | "else" => {
                if self.blocks.last().map(|b| b.0) != Some("if") {
                    self.problem(
                        &s.cmd,
                        s.line,
                        code::UNEXPECTED,
                        format!("{c} outside an if block"),
                    );
                } else if self.else_seen.last() == Some(&true) {
                    self.problem(&s.cmd, s.line, code::UNEXPECTED, format!("{c} after else"));
                } else if c == "else" {
                    if let Some(e) = self.else_seen.last_mut() {
                        *e = true;
                    }
                }
                if c == "elseif" {
                    self.condition(s);
                } else if let Some(a) = s.args.first() {
                    self.problem(
                        a,
                        s.line,
                        code::BAD_ARGUMENT,
                        "else takes no arguments".into(),
                    );
                }
                return;
            }
            "endif" => {
                if self.close(s, &["if"]).is_some() {
                    self.else_seen.pop();
                }
                return;
            }
            "endloop" => {
                if let Some((at, _)) = self.in_pck.filter(|_| {
                    self.blocks
                        .last()
                        .is_some_and(|b| b.0 == "measurement loop")
                }) {
                    self.problem(
                        &s.cmd,
                        s.line,
                        code::ENDED_UNEXPECTEDLY,
                        format!("endloop inside the pck_start block of line {at}"),
                    );
                }
                self.close(s, &["loop", "measurement loop"]);
                return;
            }
            "breakloop" => {
                if !self
                    .blocks
                    .iter()
                    .any(|b| b.0 == "loop" || b.0 == "measurement loop")
                {
                    self.problem(
                        &s.cmd,
                        s.line,
                        code::UNEXPECTED,
                        "breakloop outside a loop".into(),
                    );
                }
                return;
            }
            "on_finished:" => {
                if let Some(first) = self.on_finished {
                    self.problem(
                        &s.cmd,
                        s.line,
                        code::UNEXPECTED,
                        format!("a second on_finished: (the first is on line {first})"),
                    );
                } else if let Some((k, l, _)) = self.blocks.last() {
                    let msg = format!("on_finished: inside the {k} of line {l}");
                    self.problem(&s.cmd, s.line, code::UNEXPECTED, msg);
                }
                self.on_finished = Some(s.line);
                return;
            }
            _ => {}
        }
        let Some(sig) = signature(c) else {
            self.problem(
                &s.cmd,
                s.line,
                code::UNKNOWN_COMMAND,
                format!("unknown command {c:?}"),
            );
            return;
        };
        match c {
            "pck_start" => {
                if let Some((l, _)) = self.in_pck {
                    self.problem(
                        &s.cmd,
                        s.line,
                        code::UNEXPECTED,
                        format!("pck_start inside the pck_start of line {l}"),
                    );
                }
                self.in_pck = Some((s.line, s.cmd.col));
            }
            // The guard closes the open package (take) whichever way it goes.
            "pck_end" if self.in_pck.take().is_none() => {
                self.problem(
                    &s.cmd,
                    s.line,
                    code::UNEXPECTED,
                    "pck_end without pck_start".into(),
                );
            }
            "pck_add" if self.in_pck.is_none() => {
                self.problem(
                    &s.cmd,
                    s.line,
                    code::UNEXPECTED,
                    "pck_add outside pck_start … pck_end".into(),
                );
            }
            _ => {}
        }
        if let Sig::Known(kinds) = sig {
            let fixed = kinds.len();
            let given = s
                .args
                .iter()
                .take_while(|a| option(&a.text).is_none())
                .count();
            if given != fixed {
                let at = s.args.get(fixed).unwrap_or(&s.cmd);
                self.problem(
                    at,
                    s.line,
                    code::BAD_ARGUMENT,
                    format!(
                        "{c} takes {fixed} argument{}, not {given}",
                        if fixed == 1 { "" } else { "s" }
                    ),
                );
            }
            for (k, a) in kinds.iter().zip(&s.args) {
                self.arg(*k, a, s.line);
            }
            for a in s.args.iter().skip(given) {
                match option(&a.text) {
                    Some((_, inner)) => {
                        for v in inner {
                            // Where the value stands inside the option (ASCII: bytes are columns).
                            let col = a.col + (v.as_ptr() as usize - a.text.as_ptr() as usize);
                            self.value(
                                &Token {
                                    text: (*v).to_string(),
                                    col,
                                },
                                s.line,
                            );
                        }
                    }
                    None => self.problem(
                        a,
                        s.line,
                        code::BAD_ARGUMENT,
                        format!("unexpected argument {:?}", a.text),
                    ),
                }
            }
            if let (Some(Kind::New), Some(name)) = (kinds.first(), s.args.first()) {
                if is_name(&name.text) {
                    self.vars.insert(name.text.clone(), c == "array");
                }
            }
        }
        if is_meas_loop(c) {
            if let Some((_, l, _)) = self.blocks.iter().find(|b| b.0 == "measurement loop") {
                let l = *l;
                self.problem(
                    &s.cmd,
                    s.line,
                    code::NESTED_MEAS_LOOP,
                    format!("measurement loops cannot be nested (one is open since line {l})"),
                );
            }
            self.blocks.push(("measurement loop", s.line, s.cmd.col));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        Script::parse(text).check()
    }

    const CV: &str = "e\n# a CV\nvar c\nvar p\nset_pgstat_mode 3\nset_e -200m # start\ncell_on\nmeas_loop_cv p c -200m 600m -200m 10m 100m nscans(2)\n  pck_start\n    pck_add p\n    pck_add c\n  pck_end\nendloop\non_finished:\n  cell_off\n";

    #[test]
    fn a_good_script_has_no_problems_and_keeps_its_positions() {
        assert_eq!(problems(CV), vec![]);
        let s = Script::parse(CV);
        assert_eq!(
            s.stmts[0].cmd.text, "var",
            "the leading e is not a statement"
        );
        assert_eq!(s.stmts[0].line, 3);
        let set_e = &s.stmts[3];
        assert_eq!(set_e.args.len(), 1, "the comment is not an argument");
        let pck_add = &s.stmts[7];
        assert_eq!(
            (pck_add.line, pck_add.cmd.col, pck_add.args[0].col),
            (10, 5, 13)
        );
        assert_eq!(s.blocks(), vec![(5, 10)]);
    }

    #[test]
    fn broken_scripts_are_reported_at_the_users_line_and_column() {
        let cases: &[(&str, (usize, usize, u16))] = &[
            ("var c\nvar p\nmeas_loop_cvv p c 0 1 0 1m 1\nendloop\n", (3, 1, code::UNKNOWN_COMMAND)),
            ("var c\nmeas_loop_ca p c 0 100m 1\nendloop\n", (2, 14, code::UNDECLARED)),
            ("var c\nvar p\nmeas_loop_cv p c 0 1 0 1m\nendloop\n", (3, 1, code::BAD_ARGUMENT)),
            ("var c\nvar p\nmeas_loop_ca p c 0 100m 1 7\nendloop\n", (3, 27, code::BAD_ARGUMENT)),
            ("var c\nvar p\nmeas_loop_ca p c 0 100m 1\n", (3, 1, code::ENDED_UNEXPECTEDLY)),
            ("var i\nstore_var i 0i ja\nloop i < 3i\nendif\n", (4, 1, code::UNEXPECTED)),
            ("var c\nvar c\n", (2, 5, code::VAR_EXISTS)),
            (
                "var c\nvar p\nmeas_loop_cv p c 0 1 0 10m 1 nscans(q)\nendloop\n",
                (3, 37, code::UNDECLARED),
            ),
            ("var c\nstore_var c 5q ja\n", (2, 13, code::UNEXPECTED)),
            ("var c\nvar p\nmeas_loop_ca p c 0 1 2\n meas_loop_ca p c 0 1 2\n endloop\nendloop\n", (4, 2, code::NESTED_MEAS_LOOP)),
            ("pck_add c\n", (1, 1, code::UNEXPECTED)),
            ("var c\nif c >\nendif\n", (2, 1, code::BAD_ARGUMENT)),
            ("var c\nstore_var c 1 bah\n", (2, 15, code::BAD_ARGUMENT)),
        ];
        for (text, (line, col, code)) in cases {
            let p = problems(text);
            assert!(
                p.iter()
                    .any(|q| (q.line, q.col, q.code) == (*line, *col, *code)),
                "{text:?}: expected line {line}, col {col}, code {code:04X} in {p:?}"
            );
        }
    }

    #[test]
    fn vendor_constructs_are_accepted() {
        let text = "e\nmux_config 3i 0x0020\nvar channels\nmux_get_channel_count channels\nvar potential\narray currents channels\nvar i\nstore_var i 0i ja\nmeas_loop_ca_alt_mux potential currents 100m 200m 10 1i 8i\n  pck_start\n    pck_add potential\n    loop i<channels\n      pck_add currents[i]\n      add_var i 1i\n    endloop\n  pck_end\n  store_var i 0i ja\nendloop\nif i >= 2\n  send_string \"two # or more\"\nelseif i == 1\n  set_gpio 0x1\nelse\n  file_open f\"/m/seq-&i.dmeas\" 2\nendif\non_finished:\ncell_off\n";
        assert_eq!(problems(text), vec![]);
        let s = Script::parse(text);
        let cond = s.stmts.iter().find(|s| s.cmd.text == "loop").unwrap();
        assert_eq!(
            cond.args
                .iter()
                .map(|t| t.text.as_str())
                .collect::<Vec<_>>(),
            ["i", "<", "channels"]
        );
        assert_eq!(cond.args[2].col, 12);
        let eis = Script::parse("var f\nvar r\nvar z\ncell_on ocp(f)\nmeas_loop_eis f r z 10m 1k 1k 1 0 eis_opt(100u 1)\nendloop\n");
        assert_eq!(eis.stmts[4].args.last().unwrap().text, "eis_opt(100u 1)");
        assert_eq!(eis.check()[..], []);
        let send = s
            .stmts
            .iter()
            .find(|s| s.cmd.text == "send_string")
            .unwrap();
        assert_eq!(
            send.args[0].text, "\"two # or more\"",
            "a # inside a string is text"
        );
    }

    #[test]
    fn windows_files_bom_and_non_ascii_are_handled() {
        let text = "\u{feff}e\r\nvar c\r\nvar p # Spannung in µV\r\nmeas_loop_ca p c 0 100m 1\r\nendloop\r\n";
        assert_eq!(problems(text), vec![]);
        assert_eq!(
            Script::parse(text).stmts[0].cmd.text,
            "var",
            "the BOM is not part of the e line"
        );
        let p = problems("var c\nstore_var c 5µ ja\n");
        assert_eq!(
            (p[0].line, p[0].col, p[0].code),
            (2, 14, code::UNEXPECTED),
            "{p:?}"
        );
        assert_eq!(without_comment("set_e p # start"), "set_e p ");
        assert_eq!(
            without_comment("send_string \"a # b\" # c"),
            "send_string \"a # b\" "
        );
    }

    #[test]
    fn literals_and_constants() {
        assert_eq!(literal("-500m"), Some(-0.5));
        assert_eq!(literal("11i"), Some(11.0));
        assert_eq!(literal("100k"), Some(100_000.0));
        assert_eq!(literal("1M"), Some(1e6));
        assert_eq!(literal("0x0020"), Some(32.0));
        assert_eq!(literal("-200000u"), Some(-0.2));
        assert_eq!(literal("2"), Some(2.0));
        for bad in ["m", "5q", "--1", "1-2", "", "abc"] {
            assert_eq!(literal(bad), None, "{bad}");
        }
        let text = "var a\nvar b\nstore_var a 100m ja\ncopy_var a b\nloop a < 1\n store_var b 2 ja\nendloop\nstore_var a 300m ja\nset_e a\n";
        let s = Script::parse(text);
        let k = s.constants_at(s.stmts.len() - 1);
        assert_eq!(k.get("a"), Some(&0.3));
        assert_eq!(k.get("b"), None, "assigned in a loop: unknown");
        assert_eq!(technique("meas_loop_geis").as_deref(), Some("GEIS"));
        assert_eq!(technique("meas_loop_ocp_alt_mux").as_deref(), Some("OCP"));
        assert_eq!(technique("meas_fast_ca").as_deref(), Some("FCA"));
        assert_eq!(technique("set_e"), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics_the_parser_or_the_check(s in "\\PC{0,200}") {
            let script = Script::parse(&s);
            let _ = script.check();
            let _ = script.constants_at(script.stmts.len());
            let _ = script.blocks();
        }

        #[test]
        fn script_like_text_never_panics(s in "((var|loop|if|endif|endloop|pck_add|meas_loop_cv|store_var|else|on_finished:)( [a-z0-9<>=\\[\\]()]{1,6}){0,4}\n){0,12}") {
            let script = Script::parse(&s);
            let _ = script.check();
        }
    }
}
