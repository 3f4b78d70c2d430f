//! The EmStat simulator's MethodSCRIPT interpreter: variables and arithmetic, arrays,
//! `loop`/`endloop`, `if`/`elseif`/`else`/`endif`, `breakloop`, `wait`, `set_int` /
//! `await_int`, timers, `pck_*`, `send_string`, the multiplexer, and every measurement
//! loop of [`super::techniques`]. It runs on a simulated clock: [`Vm::advance`] does what
//! is due up to a time and says when it next has something to do.
//!
//! Output is what a device writes: `M…`/`*` around a measurement loop, `C…`/`-` around
//! each scan of a CV with `nscans`, `L`/`+` around a generic loop, `P…` packages, `T…`
//! texts, `!XXXX: Line L, Col C` errors. Lines and columns count the script as received
//! (line 1 is the first line after `e`).

use std::collections::{HashMap, HashSet};

use super::techniques::{self, Samples};
use crate::devices::methodscript::encode_value;
use crate::devices::methodscript::script::{self, element, is_meas_loop, literal, option, Script};

/// A run-time error: (device error code, line, column).
type Fault = (u16, usize, usize);

#[derive(Debug, Clone, Copy, PartialEq)]
struct Val {
    v: f64,
    kind: [u8; 2],
}

impl Val {
    fn new(v: f64, kind: &[u8; 2]) -> Val {
        Val { v, kind: *kind }
    }
}

/// A measurement loop that is running.
struct Meas {
    head: usize,
    end: usize,
    samples: Samples,
    pending: Option<techniques::Sample>,
    t0: f64,
    scan: Option<usize>,
    multi_scan: bool,
}

/// What [`Vm::advance`] left the script at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Status {
    /// Waiting for the simulated clock to reach this time.
    Until(f64),
    /// Over budget for this call; call again.
    Busy,
    /// The script has ended (the empty line is written).
    Ended,
}

/// The interpreter of one script.
pub struct Vm {
    script: Script,
    /// For `loop`/meas loops: their `endloop`; for `endloop`: its head; for `if`/
    /// `elseif`/`else`: the next branch; for `breakloop`: the loop it leaves.
    jump: HashMap<usize, usize>,
    endif: HashMap<usize, usize>,
    on_finished: Option<usize>,
    pc: usize,
    clock: f64,
    vars: HashMap<String, Val>,
    arrays: HashMap<String, Vec<Val>>,
    pck: Option<Vec<String>>,
    meas: Option<Meas>,
    active: HashSet<usize>,
    timer0: f64,
    interval: Option<(f64, f64)>,
    mux_count: u32,
    channel: u32,
    e_set: f64,
    seed: u64,
    finishing: bool,
    ended: bool,
    /// How many points the measurement loops produced.
    pub points: u64,
}

impl Vm {
    /// Loads a script as received. `Err` is the line a device answers a script it refuses
    /// with (`!XXXX: Line L, Col C`).
    pub fn load(text: &str, seed: u64) -> Result<Vm, String> {
        let script = Script::parse_sent(text);
        if let Some(p) = script.check().into_iter().next() {
            return Err(format!("!{:04X}: Line {}, Col {}", p.code, p.line, p.col));
        }
        let mut jump = HashMap::new();
        let mut endif = HashMap::new();
        for (head, end) in script.blocks() {
            jump.insert(head, end);
            jump.insert(end, head);
        }
        let mut ifs: Vec<Vec<usize>> = Vec::new();
        let mut loops: Vec<usize> = Vec::new();
        let mut on_finished = None;
        for (i, s) in script.stmts.iter().enumerate() {
            match s.cmd.text.as_str() {
                "if" => ifs.push(vec![i]),
                "elseif" | "else" => {
                    if let Some(chain) = ifs.last_mut() {
                        if let Some(prev) = chain.last() {
                            jump.insert(*prev, i);
                        }
                        chain.push(i);
                    }
                }
                "endif" => {
                    if let Some(chain) = ifs.pop() {
                        if let Some(prev) = chain.last() {
                            jump.insert(*prev, i);
                        }
                        for b in chain {
                            endif.insert(b, i);
                        }
                    }
                }
                "loop" => loops.push(i),
                c if is_meas_loop(c) => loops.push(i),
                "endloop" => {
                    loops.pop();
                }
                "breakloop" => {
                    if let Some(l) = loops.last() {
                        jump.insert(i, *l);
                    }
                }
                "on_finished:" => on_finished = Some(i),
                _ => {}
            }
        }
        Ok(Vm {
            script,
            jump,
            endif,
            on_finished,
            pc: 0,
            clock: 0.0,
            vars: HashMap::new(),
            arrays: HashMap::new(),
            pck: None,
            meas: None,
            active: HashSet::new(),
            timer0: 0.0,
            interval: None,
            mux_count: 0,
            channel: 1,
            e_set: 0.0,
            seed,
            finishing: false,
            ended: false,
            points: 0,
        })
    }

    /// The simulated time, s.
    pub fn clock(&self) -> f64 {
        self.clock
    }

    /// Abort (`Z`): the running measurement loop closes, the `on_finished:` block runs,
    /// the script ends.
    pub fn abort(&mut self, out: &mut Vec<String>) {
        if self.ended {
            return;
        }
        self.close_meas(out);
        self.active.clear();
        self.pck = None;
        match self.on_finished.filter(|_| !self.finishing) {
            Some(f) => {
                self.finishing = true;
                self.pc = f + 1;
            }
            None => self.pc = self.script.stmts.len(),
        }
    }

    /// Abort the measurement loop only (`Y`): the script goes on after its `endloop`.
    pub fn abort_loop(&mut self, out: &mut Vec<String>) -> bool {
        let Some(end) = self.meas.as_ref().map(|m| m.end) else {
            return false;
        };
        self.close_meas(out);
        self.pc = end + 1;
        true
    }

    fn close_meas(&mut self, out: &mut Vec<String>) {
        if let Some(m) = self.meas.take() {
            if m.scan.is_some() {
                out.push("-".into());
            }
            out.push("*".into());
        }
    }

    /// Runs what is due at simulated time `now` (at most `budget` statements).
    pub fn advance(&mut self, now: f64, budget: usize, out: &mut Vec<String>) -> Status {
        for _ in 0..budget {
            if self.ended {
                return Status::Ended;
            }
            if self.clock > now {
                return Status::Until(self.clock);
            }
            if self.pc >= self.script.stmts.len() {
                self.ended = true;
                out.push(String::new());
                return Status::Ended;
            }
            if let Err((code, line, col)) = self.step(now, out) {
                out.push(format!("!{code:04X}: Line {line}, Col {col}"));
                self.close_meas(out);
                match self.on_finished.filter(|_| !self.finishing) {
                    Some(f) => {
                        self.finishing = true;
                        self.pc = f + 1;
                    }
                    None => self.pc = self.script.stmts.len(),
                }
            }
        }
        Status::Busy
    }

    /// The position `index` in array `name`, checked against its length: an unknown
    /// array is refused at `name_col`, a position outside it at `index_col`.
    fn slot(
        &self,
        name: &str,
        index: f64,
        line: usize,
        (name_col, index_col): (usize, usize),
    ) -> Result<usize, Fault> {
        let a = self
            .arrays
            .get(name)
            .ok_or((script::code::UNDECLARED, line, name_col))?;
        if index >= 0.0 && (index as usize) < a.len() {
            Ok(index as usize)
        } else {
            Err((script::code::BAD_ARGUMENT, line, index_col))
        }
    }

    /// The declared array a token names; an unknown one is refused at the token.
    fn array(&self, t: &script::Token, line: usize) -> Result<&Vec<Val>, Fault> {
        self.arrays
            .get(&t.text)
            .ok_or((script::code::UNDECLARED, line, t.col))
    }

    /// `a[i]` (i a variable or a number) → the array and the checked position.
    fn element_slot<'t>(
        &self,
        t: &'t script::Token,
        line: usize,
    ) -> Result<Option<(&'t str, usize)>, Fault> {
        let Some((name, idx)) = element(&t.text) else {
            return Ok(None);
        };
        let i = self
            .vars
            .get(idx)
            .map(|v| v.v)
            .or_else(|| literal(idx))
            .ok_or((script::code::UNDECLARED, line, t.col))?;
        Ok(Some((name, self.slot(name, i, line, (t.col, t.col))?)))
    }

    fn value(&self, t: &script::Token, line: usize) -> Result<Val, Fault> {
        if let Some(v) = literal(&t.text) {
            return Ok(Val::new(v, b"aa"));
        }
        if let Some((name, i)) = self.element_slot(t, line)? {
            return Ok(self.arrays[name][i]);
        }
        self.vars
            .get(&t.text)
            .copied()
            .ok_or((script::code::UNDECLARED, line, t.col))
    }

    fn set(&mut self, t: &script::Token, v: Val, line: usize) -> Result<(), Fault> {
        match self.element_slot(t, line)? {
            Some((name, i)) => {
                if let Some(a) = self.arrays.get_mut(name) {
                    a[i] = v;
                }
            }
            None => {
                self.vars.insert(t.text.clone(), v);
            }
        }
        Ok(())
    }

    /// `f"Peak: {h[0i]} A at {p}"`: each `{…}` replaced by the value it names.
    fn interpolate(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(a) = rest.find('{') {
            out.push_str(&rest[..a]);
            let Some(b) = rest[a..].find('}') else {
                out.push_str(&rest[a..]);
                return out;
            };
            let name = &rest[a + 1..a + b];
            let tok = script::Token {
                text: name.to_string(),
                col: 0,
            };
            match self.value(&tok, 0) {
                Ok(v) => out.push_str(&format!("{}", v.v)),
                Err(_) => out.push_str(&rest[a..=a + b]),
            }
            rest = &rest[a + b + 1..];
        }
        out.push_str(rest);
        out
    }

    fn condition(&self, s: &script::Stmt) -> Result<bool, Fault> {
        let a = self.value(&s.args[0], s.line)?.v;
        let b = self.value(&s.args[2], s.line)?.v;
        Ok(match s.args[1].text.as_str() {
            "==" => a == b,
            "!=" => a != b,
            ">=" => a >= b,
            "<=" => a <= b,
            ">" => a > b,
            _ => a < b,
        })
    }

    fn step(&mut self, now: f64, out: &mut Vec<String>) -> Result<(), Fault> {
        let pc = self.pc;
        let s = self.script.stmts[pc].clone();
        let c = s.cmd.text.as_str();
        let line = s.line;
        // A command the check does not count arguments of may have too few.
        let arg = |i: usize| {
            s.args
                .get(i)
                .ok_or((script::code::BAD_ARGUMENT, line, s.cmd.col))
        };
        self.pc += 1;
        match c {
            "var" => {
                self.vars.insert(arg(0)?.text.clone(), Val::new(0.0, b"aa"));
            }
            "array" => {
                let n = self.value(arg(1)?, line)?.v;
                if !(0.0..=100_000.0).contains(&n) {
                    return Err((script::code::BAD_ARGUMENT, line, arg(1)?.col));
                }
                self.arrays
                    .insert(arg(0)?.text.clone(), vec![Val::new(0.0, b"aa"); n as usize]);
            }
            "store_var" => {
                let v = self.value(arg(1)?, line)?.v;
                let kind = arg(2)?.text.as_bytes();
                self.set(arg(0)?, Val::new(v, &[kind[0], kind[1]]), line)?;
            }
            "copy_var" => {
                let v = self.value(arg(0)?, line)?;
                self.set(arg(1)?, v, line)?;
            }
            "add_var" | "sub_var" | "mul_var" | "div_var" | "mod_var" | "pow_var" => {
                let a = self.value(arg(0)?, line)?;
                let b = self.value(arg(1)?, line)?.v;
                let v = match c {
                    "add_var" => a.v + b,
                    "sub_var" => a.v - b,
                    "mul_var" => a.v * b,
                    "pow_var" => a.v.powf(b),
                    _ if b == 0.0 => return Err((0x0028, line, arg(1)?.col)),
                    "div_var" => a.v / b,
                    _ => a.v % b,
                };
                if !v.is_finite() {
                    return Err((0x0010, line, s.cmd.col));
                }
                self.set(arg(0)?, Val { v, kind: a.kind }, line)?;
            }
            "wait" => {
                let t = self.value(arg(0)?, line)?.v;
                if !(t >= 0.0 && t.is_finite()) {
                    return Err((script::code::BAD_ARGUMENT, line, arg(0)?.col));
                }
                self.clock += t;
            }
            "set_int" => {
                let t = self.value(arg(0)?, line)?.v;
                if !(t > 0.0 && t.is_finite()) {
                    return Err((script::code::BAD_ARGUMENT, line, arg(0)?.col));
                }
                self.interval = Some((self.clock, t));
            }
            "await_int" => {
                if let Some((start, t)) = self.interval {
                    let n = ((self.clock - start) / t).floor() + 1.0;
                    self.clock = start + n * t;
                }
            }
            "timer_start" => self.timer0 = self.clock,
            "timer_get" => {
                let t = self.clock - self.timer0;
                self.set(arg(0)?, Val::new(t, b"eb"), line)?;
            }
            "mux_config" => {
                let kind = self.value(arg(0)?, line)?.v as i64;
                self.mux_count = if kind == 2 { 16 } else { 8 };
            }
            "mux_get_channel_count" => {
                let n = f64::from(self.mux_count);
                self.set(arg(0)?, Val::new(n, b"ja"), line)?;
            }
            "mux_set_channel" => {
                let ch = self.value(arg(0)?, line)?.v;
                if !(ch >= 1.0 && ch <= f64::from(self.mux_count.max(1))) {
                    return Err((script::code::BAD_ARGUMENT, line, arg(0)?.col));
                }
                self.channel = ch as u32;
            }
            "array_set" => {
                let i = self.value(arg(1)?, line)?.v;
                let v = self.value(arg(2)?, line)?;
                let name = &arg(0)?.text;
                let i = self.slot(name, i, line, (arg(0)?.col, arg(1)?.col))?;
                if let Some(a) = self.arrays.get_mut(name) {
                    a[i] = v;
                }
            }
            "array_get" => {
                let i = self.value(arg(1)?, line)?.v;
                let name = &arg(0)?.text;
                let i = self.slot(name, i, line, (arg(0)?.col, arg(1)?.col))?;
                let v = self.arrays[name.as_str()][i];
                self.set(arg(2)?, v, line)?;
            }
            "pck_start" => self.pck = Some(Vec::new()),
            "pck_add" => {
                let v = self.value(arg(0)?, line)?;
                let kind = std::str::from_utf8(&v.kind).unwrap_or("aa");
                let value = encode_value(v.v).unwrap_or_else(|| "     nan".into());
                let meta = if kind == "ba" {
                    let range = if v.v.abs() < 2e-6 { 1 } else { 8 };
                    format!(",10,2{range:02X}")
                } else {
                    String::new()
                };
                if let Some(p) = &mut self.pck {
                    p.push(format!("{kind}{value}{meta}"));
                }
            }
            "pck_end" => {
                if let Some(p) = self.pck.take() {
                    if !p.is_empty() {
                        out.push(format!("P{}", p.join(";")));
                    }
                }
            }
            "send_string" => {
                let raw = &arg(0)?.text;
                let text = match raw.strip_prefix('f') {
                    Some(f) => self.interpolate(f.trim_matches('"')),
                    None => raw.trim_matches('"').to_string(),
                };
                out.push(format!("T{text}"));
            }
            "set_e" => {
                self.e_set = self.value(arg(0)?, line)?.v;
            }
            "int_to_float" => {}
            "float_to_int" | "float_to_int_round" => {
                let a = self.value(arg(0)?, line)?;
                let v = if c == "float_to_int" {
                    a.v.trunc()
                } else {
                    a.v.round()
                };
                self.set(arg(0)?, Val { v, kind: a.kind }, line)?;
            }
            "log_var" => {
                let a = self.value(arg(0)?, line)?;
                if a.v <= 0.0 {
                    return Err((0x0010, line, arg(0)?.col));
                }
                self.set(
                    arg(0)?,
                    Val {
                        v: a.v.ln(),
                        kind: a.kind,
                    },
                    line,
                )?;
            }
            "alter_vartype" => {
                let a = self.value(arg(0)?, line)?;
                let k = arg(1)?.text.as_bytes();
                if k.len() != 2 {
                    return Err((script::code::BAD_ARGUMENT, line, arg(1)?.col));
                }
                self.set(arg(0)?, Val::new(a.v, &[k[0], k[1]]), line)?;
            }
            "mean" => {
                let a = self.array(arg(0)?, line)?;
                let m = a.iter().map(|v| v.v).sum::<f64>() / a.len().max(1) as f64;
                let kind = a.first().map_or(*b"aa", |v| v.kind);
                self.set(arg(1)?, Val { v: m, kind }, line)?;
            }
            "linear_fit" => {
                let (xs, ys) = (self.array(arg(0)?, line)?, self.array(arg(1)?, line)?);
                let n = xs.len().min(ys.len()) as f64;
                let (sx, sy) = (
                    xs.iter().map(|v| v.v).sum::<f64>(),
                    ys.iter().map(|v| v.v).sum::<f64>(),
                );
                let sxx: f64 = xs.iter().map(|v| v.v * v.v).sum();
                let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| x.v * y.v).sum();
                let d = n * sxx - sx * sx;
                if d == 0.0 || n < 2.0 {
                    return Err((0x0028, line, s.cmd.col));
                }
                let slope = (n * sxy - sx * sy) / d;
                let intercept = (sy - slope * sx) / n;
                self.set(arg(2)?, Val::new(slope, b"aa"), line)?;
                self.set(arg(3)?, Val::new(intercept, b"aa"), line)?;
            }
            "meas" => {
                // One measurement of a quantity: `meas <time> <var> <type>`.
                let t = self.value(arg(0)?, line)?.v;
                if !(t >= 0.0 && t.is_finite()) {
                    return Err((script::code::BAD_ARGUMENT, line, arg(0)?.col));
                }
                self.clock += t;
                let k = arg(2)?.text.as_bytes();
                let kind = [
                    k.first().copied().unwrap_or(b'a'),
                    k.get(1).copied().unwrap_or(b'a'),
                ];
                let v = match &kind {
                    b"ab" | b"da" => techniques::E0,
                    _ => 0.0,
                };
                self.set(arg(1)?, Val::new(v, &kind), line)?;
            }
            "loop" => {
                if self.active.insert(pc) {
                    out.push("L".into());
                }
                if !self.condition(&s)? {
                    self.active.remove(&pc);
                    out.push("+".into());
                    self.pc = self.jump.get(&pc).map_or(self.pc, |e| e + 1);
                }
            }
            "endloop" => {
                if let Some(head) = self.jump.get(&pc) {
                    self.pc = *head;
                }
            }
            "breakloop" => {
                if let Some(head) = self.jump.get(&pc).copied() {
                    let end = self.jump.get(&head).copied().unwrap_or(pc);
                    if self.meas.as_ref().is_some_and(|m| m.head == head) {
                        self.close_meas(out);
                    } else if self.active.remove(&head) {
                        out.push("+".into());
                    }
                    self.pc = end + 1;
                }
            }
            "if" => self.branch(pc, &s)?,
            "elseif" | "else" => {
                // Reached from the branch above: that branch ran, leave the chain.
                self.pc = self.endif.get(&pc).map_or(self.pc, |e| e + 1);
            }
            "on_finished:" => self.finishing = true,
            _ if is_meas_loop(c) => return self.meas_step(pc, &s, now, out),
            _ => {} // settings (ranges, bandwidth, cell, GPIO …) change nothing simulated
        }
        Ok(())
    }

    /// An `if` or `elseif` whose condition decides: into the branch, or on to the next.
    fn branch(&mut self, mut at: usize, s: &script::Stmt) -> Result<(), Fault> {
        let mut stmt = s.clone();
        loop {
            if self.condition(&stmt)? {
                self.pc = at + 1;
                return Ok(());
            }
            let Some(next) = self.jump.get(&at).copied() else {
                return Ok(());
            };
            let n = self.script.stmts[next].clone();
            match n.cmd.text.as_str() {
                "elseif" => {
                    at = next;
                    stmt = n;
                }
                _ => {
                    // `else` or `endif`: continue after it.
                    self.pc = next + 1;
                    return Ok(());
                }
            }
        }
    }

    fn meas_step(
        &mut self,
        pc: usize,
        s: &script::Stmt,
        now: f64,
        out: &mut Vec<String>,
    ) -> Result<(), Fault> {
        let line = s.line;
        let cmd = s.cmd.text.as_str();
        let mux = cmd == "meas_loop_ca_alt_mux";
        let n_out = match cmd {
            "meas_loop_ocp" => 1,
            "meas_loop_swv" => 4,
            "meas_loop_eis" | "meas_loop_geis" => 3,
            "meas_loop_acv" => 6,
            _ => 2,
        };
        if self.meas.as_ref().map(|m| m.head) != Some(pc) {
            // The variants whose arguments are not public (`_cp_alt_mux`, `_ocp_alt_mux`,
            // `_eis_dual`) are not simulated: the device answers `!001B`.
            let technique = match cmd {
                _ if mux => "CA_MUX".to_string(),
                "meas_loop_cp_alt_mux" | "meas_loop_ocp_alt_mux" | "meas_loop_eis_dual" => {
                    String::new()
                }
                _ => script::technique(cmd).unwrap_or_default(),
            };
            let mut args = Vec::new();
            let mut nscans = 1u32;
            for a in s.args.iter().skip(n_out) {
                if let Some((name, inner)) = option(&a.text) {
                    if name == "nscans" {
                        let tok = script::Token {
                            text: inner.first().copied().unwrap_or("").to_string(),
                            col: a.col,
                        };
                        nscans = self.value(&tok, line)?.v.clamp(1.0, 10_000.0) as u32;
                    }
                    continue;
                }
                args.push(self.value(a, line)?.v);
            }
            let channels = if mux {
                let (a, b) = (
                    args.get(3).copied().unwrap_or(1.0),
                    args.get(4).copied().unwrap_or(1.0),
                );
                if !(a >= 1.0 && b >= a && b <= 16.0) {
                    return Err((script::code::BAD_ARGUMENT, line, s.cmd.col));
                }
                (a as u32, b as u32)
            } else {
                (self.channel, self.channel)
            };
            self.seed = self
                .seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let samples =
                techniques::samples(&technique, &args, nscans, self.channel, channels, self.seed)
                    .map_err(|r| {
                    let col = if r.arg == 0 {
                        s.cmd.col
                    } else {
                        s.args.get(n_out + r.arg - 1).map_or(s.cmd.col, |a| a.col)
                    };
                    (r.code, line, col)
                })?;
            let multi_scan = nscans > 1;
            let end = self.jump.get(&pc).copied().unwrap_or(pc);
            let code = match technique.as_str() {
                "LSV" => 0x0000,
                "CV" => 0x0005,
                "CA" | "CA_MUX" => 0x0007,
                "OCP" => 0x000B,
                "EIS" => 0x000D,
                _ => 0x0020 + n_out as u16,
            };
            out.push(format!("M{code:04X}"));
            self.meas = Some(Meas {
                head: pc,
                end,
                samples,
                pending: None,
                t0: self.clock,
                scan: None,
                multi_scan,
            });
        }
        let Some(m) = self.meas.as_mut() else {
            return Ok(());
        };
        // The next sample waits in `pending` until it is due.
        if m.pending.is_none() {
            m.pending = m.samples.next();
        }
        let Some(sample) = m.pending.clone() else {
            let end = m.end;
            self.close_meas(out);
            self.pc = end + 1;
            return Ok(());
        };
        let due = m.t0 + sample.dt;
        if due > now {
            self.pc = pc;
            self.clock = self.clock.max(due);
            return Ok(());
        }
        if m.multi_scan && m.scan != Some(sample.scan) {
            if m.scan.is_some() {
                out.push("-".into());
            }
            out.push(format!("C{:04X}", sample.scan));
            m.scan = Some(sample.scan);
        }
        m.pending = None;
        self.clock = self.clock.max(due);
        self.points += 1;
        let kinds: &[&[u8; 2]] = match cmd {
            "meas_loop_ocp" => &[b"ab"],
            "meas_loop_cp" | "meas_loop_lsp" => &[b"ab", b"ba"],
            "meas_loop_swv" => &[b"da", b"ba", b"ba", b"ba"],
            "meas_loop_eis" | "meas_loop_geis" => &[b"dc", b"cc", b"cd"],
            "meas_loop_acv" => &[b"da", b"ba", b"dd", b"ba", b"cc", b"cd"],
            _ => &[b"da", b"ba"],
        };
        if mux {
            let e = sample.outs.first().copied().unwrap_or(0.0);
            self.set(&s.args[0], Val::new(e, b"da"), line)?;
            let name = s.args[1].text.clone();
            let a = self.arrays.get_mut(&name).ok_or((
                script::code::UNDECLARED,
                line,
                s.args[1].col,
            ))?;
            for (j, v) in sample.outs.iter().skip(1).enumerate() {
                if let Some(slot) = a.get_mut(j) {
                    *slot = Val::new(*v, b"ba");
                }
            }
        } else {
            for (j, kind) in kinds.iter().enumerate() {
                let v = sample.outs.get(j).copied().unwrap_or(f64::NAN);
                if let Some(a) = s.args.get(j) {
                    self.set(a, Val::new(v, kind), line)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> Vec<String> {
        let mut vm = Vm::load(text, 1).unwrap();
        let mut out = Vec::new();
        for _ in 0..10_000 {
            if vm.advance(f64::INFINITY, 1000, &mut out) == Status::Ended {
                return out;
            }
        }
        panic!("did not end: {out:?}")
    }

    #[test]
    fn loops_conditions_and_arithmetic_run_as_written() {
        let out = run("var i\nvar n\nstore_var i 0i ja\nstore_var n 0i ja\nloop i < 5i\n  if i == 2i\n    add_var n 10i\n  elseif i >= 3i\n    add_var n 100i\n  else\n    add_var n 1i\n  endif\n  add_var i 1i\nendloop\npck_start\npck_add n\npck_end\n");
        // n = 1 + 1 + 10 + 100 + 100
        assert_eq!(
            out,
            [
                "L",
                "+",
                &format!("Pja{}", encode_value(212.0).unwrap()),
                ""
            ]
        );
        let out = run("var i\nstore_var i 0i ja\nloop i < 100i\n  add_var i 1i\n  if i >= 3i\n    breakloop\n  endif\nendloop\npck_start\npck_add i\npck_end\n");
        assert_eq!(out[2], format!("Pja{}", encode_value(3.0).unwrap()));
    }

    #[test]
    fn vendor_helpers_compute_what_their_names_say() {
        let out = run("array a 4i\nvar i\nvar m\nvar s\nvar b\nstore_var i 0i ja\nloop i < 4i\n  copy_var i a[i]\n  add_var i 1i\nendloop\nmean a m\nalter_vartype m ba\nstore_var s 10 ja\nlog_var s\nstore_var b 27m ja\nmul_var b 100\nfloat_to_int b\nsend_string f\"mean {m}, a[3] {a[3i]}, b {b}\"\npck_start\npck_add m\npck_end\n");
        assert_eq!(out[2], "Tmean 1.5, a[3] 3, b 2");
        assert!(
            out[3].starts_with("Pba"),
            "alter_vartype changes the type: {}",
            out[3]
        );
        let mut vm = Vm::load("var x\nvar y\nvar k\nvar d\narray xs 3i\narray ys 3i\nstore_var xs[0i] 1 ja\nstore_var xs[1i] 2 ja\nstore_var xs[2i] 3 ja\nstore_var ys[0i] 3 ja\nstore_var ys[1i] 5 ja\nstore_var ys[2i] 7 ja\nlinear_fit xs ys k d\npck_start\npck_add k\npck_add d\npck_end\n", 1).unwrap();
        let mut out = Vec::new();
        while vm.advance(f64::INFINITY, 1000, &mut out) != Status::Ended {}
        let p = crate::devices::methodscript::Package::parse(&out[0][1..]).unwrap();
        assert_eq!((p.vars[0].value, p.vars[1].value), (Some(2.0), Some(1.0)));
    }

    #[test]
    fn two_loops_run_in_sequence_each_with_its_own_packages() {
        let out = run("var c\nvar p\nvar f\nvar r\nvar z\nmeas_loop_lsv p c 0 100m 10m 100m\n pck_start\n pck_add p\n pck_add c\n pck_end\nendloop\nmeas_loop_eis f r z 10m 1k 10 3i 0\n pck_start\n pck_add f\n pck_add r\n pck_add z\n pck_end\nendloop\n");
        let m: Vec<&String> = out
            .iter()
            .filter(|l| l.starts_with('M') || *l == "*")
            .collect();
        assert_eq!(m, ["M0000", "*", "M000D", "*"]);
        let eis: Vec<&String> = out.iter().filter(|l| l.starts_with("Pdc")).collect();
        assert_eq!(eis.len(), 3);
        assert!(out.iter().filter(|l| l.starts_with("Pda")).count() >= 10);
    }

    #[test]
    fn a_loop_without_pck_still_takes_its_time_and_waits_count() {
        let mut vm = Vm::load(
            "var c\nvar p\nmeas_loop_ca p c 0 100m 2\nendloop\nwait 3\n",
            1,
        )
        .unwrap();
        let mut out = Vec::new();
        while vm.advance(f64::INFINITY, 1000, &mut out) != Status::Ended {}
        assert!((vm.clock() - 5.0).abs() < 0.11, "clock {}", vm.clock());
        assert_eq!(out, ["M0007", "*", ""]);
    }

    #[test]
    fn every_example_script_passes_the_check_and_runs_to_its_end() {
        use crate::devices::methodscript::method::Method;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/methods/examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = Method::load(&dir, path.to_str().unwrap()).unwrap_or_else(|e| panic!("{e}"));
            let (script, _) = m.render(&serde_json::Map::new()).unwrap();
            let out = run(&script);
            let loops = out.iter().filter(|l| l.starts_with('M')).count();
            let ends = out.iter().filter(|l| *l == "*").count();
            let data = out.iter().filter(|l| l.starts_with('P')).count();
            assert!(
                loops >= 1 && loops == ends && data >= 5,
                "{}: {loops} loops, {data} packages",
                path.display()
            );
            assert!(
                !out.iter().any(|l| l.contains('!')),
                "{}: {out:?}",
                path.display()
            );
            n += 1;
        }
        assert!(n >= 15, "{n} example scripts");
    }

    #[test]
    fn a_loop_the_simulator_does_not_model_is_refused_as_unsupported() {
        let out = run("var f\nvar r\nvar z\nmeas_loop_eis_dual f r z 10m 1k 10 3i 0\nendloop\n");
        assert_eq!(out, ["!001B: Line 4, Col 1", ""]);
    }

    #[test]
    fn commands_with_too_few_arguments_are_errors_not_panics() {
        for cmd in [
            "mean",
            "linear_fit a",
            "alter_vartype",
            "meas 1",
            "log_var",
            "float_to_int",
        ] {
            let out = run(&format!("array a 2i\n{cmd}\n"));
            assert!(out[0].starts_with("!0007: Line 2"), "{cmd}: {out:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_scripts_never_panic_the_interpreter(s in "((var|array|loop|if|endif|endloop|pck_start|pck_add|pck_end|meas_loop_ca|meas_loop_eis|store_var|add_var|div_var|mean|wait|breakloop|on_finished:)( [a-z0-9<>=\\[\\]()]{1,5}){0,6}\n){0,14}") {
            if let Ok(mut vm) = Vm::load(&s, 1) {
                let mut out = Vec::new();
                for _ in 0..200 {
                    if vm.advance(f64::INFINITY, 500, &mut out) == Status::Ended {
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn errors_name_the_line_and_column_as_received() {
        assert_eq!(
            Vm::load("var c\n  set_ee 1\n", 1).err().as_deref(),
            Some("!4001: Line 2, Col 3")
        );
        let out = run("var a\nstore_var a 1 ja\ndiv_var a 0\non_finished:\nsend_string \"off\"\n");
        assert_eq!(out, ["!0028: Line 3, Col 11", "Toff", ""]);
    }
}
