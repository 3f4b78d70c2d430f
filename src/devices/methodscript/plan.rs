//! What the driver knows of a script it sends: its measurement loops in order, what each
//! package variable of a loop is (from the loop's output arguments, `timer_get` and the
//! `pck_add` list), what the loop applies (so a point the device sent without its
//! potential still carries `e`, flagged as applied), and which loop is running (from the
//! `L`/`+` and `M`/`*` markers the device writes, followed through the script).
//!
//! One limit: inside `if`/`else` branches the device's output does not say which branch
//! ran; the first measurement loop in file order is taken.

use std::collections::HashMap;

use super::script::{element, is_meas_loop, option, technique, value_of, Script};
use super::Package;
use crate::record::Point;

/// What a package variable is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Time, s.
    T,
    /// Potential, V.
    E,
    /// Current, A.
    I,
    /// Frequency, Hz.
    F,
    /// Z′, Ohm.
    ZRe,
    /// Z″, Ohm.
    ZIm,
    /// SWV forward current.
    IFwd,
    /// SWV reverse current.
    IRev,
    /// ACV AC current.
    IAc,
    /// Something else the script packs (read by its type code).
    Other,
}

/// What a loop applies, to fill what the device did not report.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Nothing known.
    Nothing,
    /// A potential staircase (`begin + k·step`, towards `end`).
    Sweep {
        /// First value.
        begin: f64,
        /// Signed step.
        step: f64,
        /// Potential (false: current, LSP).
        potential: bool,
    },
    /// A CV's potentials, in order over all scans.
    Cycle(Vec<f64>),
    /// A constant potential and/or current.
    Hold {
        /// Applied potential.
        e: Option<f64>,
        /// Applied current.
        i: Option<f64>,
    },
}

/// One measurement loop of the script.
#[derive(Debug, Clone, PartialEq)]
pub struct Loop {
    /// Statement index of the loop and of its `endloop`.
    pub head: usize,
    /// Statement index of its `endloop`.
    pub end: usize,
    /// Line of the loop in the script as sent, from 1.
    pub line: usize,
    /// The command (`meas_loop_swv`).
    pub cmd: String,
    /// `SWV`, `CA` …
    pub technique: String,
    /// Roles of the package's variables, in `pck_add` order.
    pub roles: Vec<Role>,
    /// Index in `roles` from which one variable per multiplexer channel follows.
    pub per_channel: Option<usize>,
    /// First multiplexer channel (MUX loops).
    pub first_channel: u16,
    /// What the loop applies.
    pub applied: Applied,
}

/// The loops of a script and where the device is in it.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Measurement loops in file order.
    pub loops: Vec<Loop>,
    /// Generic loops: (head, end).
    generic: Vec<(usize, usize)>,
    pos: usize,
    frames: Vec<(usize, usize)>,
}

fn output_roles(cmd: &str) -> &'static [Role] {
    use Role::*;
    match cmd {
        "meas_loop_ocp" => &[E],
        "meas_loop_swv" => &[E, I, IFwd, IRev],
        "meas_loop_eis" | "meas_loop_geis" => &[F, ZRe, ZIm],
        "meas_loop_acv" => &[E, I, Other, IAc, ZRe, ZIm],
        c if is_meas_loop(c) => &[E, I],
        _ => &[],
    }
}

impl Plan {
    /// The plan of a script as sent to the device (after placeholders are filled).
    pub fn new(script: &Script) -> Plan {
        let blocks = script.blocks();
        let mut loops = Vec::new();
        let mut generic = Vec::new();
        for (head, end) in blocks {
            let s = &script.stmts[head];
            let cmd = s.cmd.text.as_str();
            if !is_meas_loop(cmd) {
                generic.push((head, end));
                continue;
            }
            let outs = output_roles(cmd);
            let mut names: HashMap<&str, Role> = HashMap::new();
            for (a, r) in s.args.iter().zip(outs) {
                names.insert(a.text.as_str(), *r);
            }
            // Inside the loop: timer_get gives time; pck_add gives the order.
            let mut roles = Vec::new();
            let mut per_channel = None;
            let mut depth = 0usize;
            for st in &script.stmts[head + 1..end] {
                match st.cmd.text.as_str() {
                    "timer_get" => {
                        if let Some(a) = st.args.first() {
                            names.insert(a.text.as_str(), Role::T);
                        }
                    }
                    "loop" => depth += 1,
                    "endloop" => depth = depth.saturating_sub(1),
                    "pck_add" => {
                        let Some(a) = st.args.first() else { continue };
                        let name = element(&a.text).map_or(a.text.as_str(), |(n, _)| n);
                        if depth > 0 && per_channel.is_none() {
                            per_channel = Some(roles.len());
                        }
                        roles.push(names.get(name).copied().unwrap_or(Role::Other));
                    }
                    _ => {}
                }
            }
            let known = script.constants_at(head);
            let vals: Vec<Option<f64>> = s
                .args
                .iter()
                .skip(outs.len())
                .filter(|a| option(&a.text).is_none())
                .map(|a| value_of(&a.text, &known))
                .collect();
            let nscans = s
                .args
                .iter()
                .find_map(|a| option(&a.text).filter(|(n, _)| *n == "nscans"))
                .and_then(|(_, v)| v.first().and_then(|x| value_of(x, &known)))
                .unwrap_or(1.0);
            let v = |i: usize| vals.get(i).copied().flatten();
            let sweep = |potential: bool| match (v(0), v(1), v(2)) {
                (Some(b), Some(e), Some(st)) if st > 0.0 => Applied::Sweep {
                    begin: b,
                    step: if e >= b { st } else { -st },
                    potential,
                },
                _ => Applied::Nothing,
            };
            let technique = technique(cmd).unwrap_or_default();
            let applied = match cmd {
                "meas_loop_lsv" | "meas_loop_dpv" | "meas_loop_npv" | "meas_loop_swv"
                | "meas_loop_acv" => sweep(true),
                "meas_loop_lsp" => sweep(false),
                "meas_loop_cv" => match (v(0), v(1), v(2), v(3)) {
                    (Some(b), Some(v1), Some(v2), Some(st)) => cycle(b, v1, v2, st, nscans),
                    _ => Applied::Nothing,
                },
                "meas_loop_ca" | "meas_loop_pad" | "meas_loop_ca_alt_mux" => {
                    Applied::Hold { e: v(0), i: None }
                }
                "meas_loop_eis" => Applied::Hold { e: v(4), i: None },
                "meas_loop_cp" => Applied::Hold { e: None, i: v(0) },
                "meas_loop_geis" => Applied::Hold { e: None, i: v(4) },
                // Open circuit: no current flows.
                "meas_loop_ocp" => Applied::Hold {
                    e: None,
                    i: Some(0.0),
                },
                _ => Applied::Nothing,
            };
            let first_channel = if cmd == "meas_loop_ca_alt_mux" {
                v(3).filter(|c| *c >= 0.0 && *c < 65_536.0).unwrap_or(1.0) as u16
            } else {
                1
            };
            loops.push(Loop {
                head,
                end,
                line: s.line,
                cmd: cmd.to_string(),
                technique,
                roles,
                per_channel,
                first_channel,
                applied,
            });
        }
        Plan {
            loops,
            generic,
            pos: 0,
            frames: Vec::new(),
        }
    }

    /// The device started a generic loop (`L`).
    pub fn loop_started(&mut self) {
        if let Some(l) = self.next(&self.generic) {
            self.frames.push(l);
            self.pos = l.0 + 1;
        }
    }

    /// The device left a generic loop (`+`).
    pub fn loop_ended(&mut self) {
        if let Some((_, end)) = self.frames.pop() {
            self.pos = end + 1;
        }
    }

    /// The device started a measurement loop (`M…`): which one it is. Generic loops
    /// inside it (a `pck_add` loop over MUX channels) are looked for inside it.
    pub fn meas_started(&mut self) -> Option<usize> {
        let spans: Vec<(usize, usize)> = self.loops.iter().map(|l| (l.head, l.end)).collect();
        let found = self.next(&spans)?;
        self.frames.push(found);
        self.pos = found.0 + 1;
        spans.iter().position(|s| *s == found)
    }

    /// The measurement loop ended (`*`).
    pub fn meas_ended(&mut self) {
        // Generic loops left open inside it (an abort) close with it.
        while let Some(f) = self.frames.pop() {
            self.pos = f.1 + 1;
            if self.loops.iter().any(|l| (l.head, l.end) == f) {
                break;
            }
        }
    }

    /// The first block at or after the cursor inside the open generic loop; past its
    /// end, the loop's next iteration starts again at its top.
    fn next(&self, spans: &[(usize, usize)]) -> Option<(usize, usize)> {
        let (lo, hi) = self
            .frames
            .last()
            .map_or((0, usize::MAX), |f| (f.0 + 1, f.1));
        let within = |from: usize| spans.iter().find(|(h, _)| *h >= from && *h < hi).copied();
        within(self.pos.max(lo)).or_else(|| within(lo))
    }
}

fn cycle(b: f64, v1: f64, v2: f64, step: f64, nscans: f64) -> Applied {
    if step.is_nan() || step <= 0.0 || !(1.0..=10_000.0).contains(&nscans) {
        return Applied::Nothing;
    }
    let mut one = Vec::new();
    for (from, to) in [(b, v1), (v1, v2), (v2, b)] {
        let n = ((to - from).abs() / step).round();
        if n.is_nan() || n >= 1_000_000.0 {
            return Applied::Nothing;
        }
        let dir = if to >= from { 1.0 } else { -1.0 };
        for j in 0..n as usize {
            one.push(from + dir * step * j as f64);
        }
    }
    let mut all = Vec::with_capacity(one.len() * nscans as usize);
    for _ in 0..nscans as usize {
        all.extend_from_slice(&one);
    }
    Applied::Cycle(all)
}

/// A package's points under a loop: usually one, one per channel for a MUX loop. `k` is
/// the index of the first point in the loop (for the applied setting), `t` the fallback
/// time. Returns the points and which fields came from the applied setting. A package
/// value no field names is kept in the point's `more`, never dropped.
pub fn points(
    lp: Option<&Loop>,
    package: &Package,
    k: u64,
    fallback_t: f64,
) -> (Vec<Point>, Vec<&'static str>) {
    let n = package.vars.len();
    let layout = lp.filter(|lp| {
        !lp.roles.is_empty()
            && (lp.roles.len() == n
                || lp
                    .per_channel
                    .is_some_and(|p| n > p && lp.roles.len() == p + 1))
    });
    let fixed = layout.map_or(n, |lp| lp.per_channel.unwrap_or(n).min(n));
    let mut p = Point::tei(fallback_t, f64::NAN, f64::NAN);
    p.status = package
        .vars
        .iter()
        .filter_map(|v| v.status)
        .fold(0, |acc, s| acc | s);
    let mut time_set = false;
    for (j, var) in package.vars.iter().enumerate().take(fixed) {
        let role = match layout {
            Some(lp) => lp.roles[j],
            None => Role::Other,
        };
        place(&mut p, role, var.kind.code(), var.value, &mut time_set);
    }
    let mut points = Vec::new();
    match layout.and_then(|lp| lp.per_channel.map(|_| lp.first_channel)) {
        Some(first) => {
            for (j, var) in package.vars.iter().enumerate().skip(fixed) {
                let mut q = p.clone();
                q.i = var.value.unwrap_or(f64::NAN);
                q.channel =
                    Some(first.saturating_add(u16::try_from(j - fixed).unwrap_or(u16::MAX)));
                points.push(q);
            }
        }
        None => points.push(p),
    }
    let mut applied = Vec::new();
    for p in &mut points {
        // An ACV's current is its AC current.
        if p.i.is_nan() {
            if let Some(i) = p.i_ac {
                p.i = i;
            }
        }
        if let (Some(re), Some(im)) = (p.z_re, p.z_im) {
            p.z_mod.get_or_insert((re * re + im * im).sqrt());
            p.phase.get_or_insert(im.atan2(re).to_degrees());
        }
        let (e, i) = match lp.map(|l| &l.applied) {
            None | Some(Applied::Nothing) => (None, None),
            Some(Applied::Sweep {
                begin,
                step,
                potential,
            }) => {
                let v = begin + step * k as f64;
                if *potential {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                }
            }
            Some(Applied::Cycle(v)) => (v.get(k as usize).copied(), None),
            Some(Applied::Hold { e, i }) => (*e, *i),
        };
        if p.e.is_nan() {
            if let Some(e) = e {
                p.e = e;
                if !applied.contains(&"e") {
                    applied.push("e");
                }
            }
        }
        if p.i.is_nan() {
            if let Some(i) = i {
                p.i = i;
                if !applied.contains(&"i") {
                    applied.push("i");
                }
            }
        }
    }
    (points, applied)
}

/// Puts a package value where its role (or, for `Other`, its type code) says; a value
/// whose place is taken already, or that no field names, goes to `more`.
fn place(p: &mut Point, role: Role, code: &str, v: Option<f64>, time_set: &mut bool) {
    let role = match role {
        Role::Other => match code {
            "eb" => Role::T,
            "da" | "ab" => Role::E,
            "ba" => Role::I,
            "dc" => Role::F,
            "cc" => Role::ZRe,
            "cd" => Role::ZIm,
            _ => Role::Other,
        },
        r => r,
    };
    // Each returns whether the place was taken already.
    let fill = |slot: &mut Option<f64>| {
        slot.is_some() || {
            *slot = v;
            false
        }
    };
    let fill_nan = |slot: &mut f64| {
        !slot.is_nan() || {
            *slot = v.unwrap_or(f64::NAN);
            false
        }
    };
    let taken = match role {
        // The agent's time is only a fallback: a packed time replaces it, once.
        Role::T => match v {
            Some(t) if !*time_set => {
                p.t = t;
                *time_set = true;
                false
            }
            _ => true,
        },
        Role::E => fill_nan(&mut p.e),
        Role::I => fill_nan(&mut p.i),
        Role::F => fill(&mut p.f),
        Role::ZRe => fill(&mut p.z_re),
        Role::ZIm => fill(&mut p.z_im),
        Role::IFwd => fill(&mut p.i_fwd),
        Role::IRev => fill(&mut p.i_rev),
        Role::IAc => fill(&mut p.i_ac),
        Role::Other => match code {
            "cb" => fill(&mut p.z_mod),
            "ca" => fill(&mut p.phase),
            "ea" if p.channel.is_none() && v.is_some_and(|c| (0.0..65_536.0).contains(&c)) => {
                p.channel = v.map(|c| c as u16);
                false
            }
            _ => true,
        },
    };
    if taken {
        p.more.push(crate::record::Extra {
            kind: code.to_string(),
            value: v,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Plan {
        Plan::new(&Script::parse_sent(text))
    }

    #[test]
    fn loops_in_sequence_and_in_a_generic_loop_are_followed_by_the_markers() {
        let mut p = plan("var c\nvar p\nvar f\nvar r\nvar z\nvar i\nstore_var i 0i ja\nmeas_loop_eis f r z 10m 1k 10 3i 0\nendloop\nloop i < 2i\n meas_loop_ca p c 100m 100m 1\n endloop\n meas_loop_cv p c 0 1 0 10m 1\n endloop\n add_var i 1i\nendloop\nmeas_loop_lsv p c 0 1 10m 1\nendloop\n");
        let names: Vec<&str> = p.loops.iter().map(|l| l.technique.as_str()).collect();
        assert_eq!(names, ["EIS", "CA", "CV", "LSV"]);
        let mut seen = Vec::new();
        let meas = |p: &mut Plan| {
            let m = p.meas_started();
            p.meas_ended();
            m
        };
        seen.push(meas(&mut p));
        p.loop_started();
        for _ in 0..2 {
            seen.push(meas(&mut p));
            seen.push(meas(&mut p));
        }
        p.loop_ended();
        seen.push(meas(&mut p));
        assert_eq!(seen, [Some(0), Some(1), Some(2), Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn roles_come_from_the_loop_and_applied_values_fill_what_was_not_sent() {
        // A CA that packs time and current only: e is the applied 300 mV, flagged.
        let p = plan("var c\nvar p\nvar t\nvar e\nstore_var e 300m ja\ntimer_start\nmeas_loop_ca p c e 100m 1\n timer_get t\n pck_start\n pck_add t\n pck_add c\n pck_end\nendloop\n");
        let lp = &p.loops[0];
        assert_eq!(lp.roles, [Role::T, Role::I]);
        let pkg = Package::parse("eb8000064m;ba8000005u").unwrap();
        let (pts, applied) = points(Some(lp), &pkg, 0, 9.0);
        assert_eq!(applied, ["e"]);
        assert_eq!((pts[0].t, pts[0].e, pts[0].i), (0.1, 0.3, 5e-6));
        // SWV: forward and reverse currents by position, not by type code.
        let p = plan("var p\nvar c\nvar f\nvar r\nmeas_loop_swv p c f r -500m 500m 10m 25m 10\n pck_start\n pck_add p\n pck_add f\n pck_add r\n pck_end\nendloop\n");
        let pkg = Package::parse("da7F0BDC0u;ba8000003u;ba8000001u").unwrap();
        let (pts, applied) = points(Some(&p.loops[0]), &pkg, 0, 0.0);
        assert!(applied.is_empty());
        assert_eq!((pts[0].i_fwd, pts[0].i_rev), (Some(3e-6), Some(1e-6)));
        assert!(pts[0].i.is_nan());
    }

    #[test]
    fn values_no_field_names_are_kept_not_dropped() {
        // A package sent outside any measurement loop: potential, current, and a max and
        // min current the script computed (all `ba`).
        let pkg = Package::parse("da8000064m;ba8000005u;ba8000009u;ba8000001u;ja8000003i").unwrap();
        let (pts, applied) = points(None, &pkg, 0, 2.0);
        assert!(applied.is_empty());
        assert_eq!((pts[0].t, pts[0].e, pts[0].i), (2.0, 0.1, 5e-6));
        let more: Vec<(&str, Option<f64>)> = pts[0]
            .more
            .iter()
            .map(|x| (x.kind.as_str(), x.value))
            .collect();
        assert_eq!(
            more,
            [("ba", Some(9e-6)), ("ba", Some(1e-6)), ("ja", Some(3.0))]
        );
    }

    #[test]
    fn a_mux_package_is_one_point_per_channel() {
        let p = plan("mux_config 3i 0x0020\nvar n\nmux_get_channel_count n\nvar p\narray cs n\nvar i\nstore_var i 0i ja\nmeas_loop_ca_alt_mux p cs 100m 200m 10 2i 4i\n pck_start\n pck_add p\n loop i < n\n  pck_add cs[i]\n  add_var i 1i\n endloop\n pck_end\n store_var i 0i ja\nendloop\n");
        let mut p = p;
        assert_eq!(p.meas_started(), Some(0));
        for _ in 0..3 {
            p.loop_started();
            p.loop_ended();
        }
        p.meas_ended();
        assert_eq!(
            p.meas_started(),
            Some(0),
            "the same loop again, not a stray one"
        );
        let lp = &p.loops[0];
        assert_eq!(lp.per_channel, Some(1));
        let pkg = Package::parse("da8000064m;ba8000001u;ba8000002u;ba8000003u").unwrap();
        let (pts, _) = points(Some(lp), &pkg, 0, 1.0);
        let got: Vec<(Option<u16>, f64)> = pts.iter().map(|p| (p.channel, p.i)).collect();
        assert_eq!(got, [(Some(2), 1e-6), (Some(3), 2e-6), (Some(4), 3e-6)]);
        assert!(pts.iter().all(|p| p.e == 0.1));
    }
}
