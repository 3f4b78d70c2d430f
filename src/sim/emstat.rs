//! An EmStat Pico simulator on a pty pair: it answers `t i v e l r h H Z Y` as
//! docs/protocols.md §1 documents, runs `meas_loop_cv` / `meas_loop_ca` / `meas_loop_lsv` from
//! a script with currents from the simulated cell, and writes `P` lines with the exact
//! encoding. For tests and for users without hardware.
//!
//! Undocumented behaviour is configurable: the reply to `h`/`H` ([`HaltReply`]). Faults
//! can be injected: garbage lines, XON/XOFF bytes, and unplugging (closing the pty).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serialport::{SerialPort, TTYPort};

use crate::devices::methodscript::encode_value;
use crate::devices::methodscript::method::parse_quantity;
use crate::devices::simulated::cell::{Generator, Step};

/// How the simulated device answers `h` and `H` (undocumented on real devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HaltReply {
    /// Echo the command letter (`h` / `H`) and act.
    #[default]
    Echo,
    /// Refuse with `h!0006` / `H!0006`.
    Refuse,
    /// Act but say nothing.
    Silent,
}

#[derive(Debug, Clone)]
/// How the EmStat simulator behaves, including the faults it can inject.
pub struct Options {
    /// How it answers a halt (`h`), as firmware versions differ.
    pub halt_reply: HaltReply,
    /// 1.0 = real time, 0 = as fast as possible.
    pub speed: f64,
    /// Emit a garbage line after every N data lines (0 = never).
    pub garbage_every: u32,
    /// Sprinkle XON/XOFF bytes into the output.
    pub xon_xoff: bool,
    /// Seed of the measurement noise.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            halt_reply: HaltReply::Echo,
            speed: 1.0,
            garbage_every: 0,
            xon_xoff: false,
            seed: 7,
        }
    }
}

/// A running simulator. Dropping it (or [`Emstat::unplug`]) closes the pty.
pub struct Emstat {
    handle: super::Handle,
    received: Arc<Mutex<Vec<(String, SystemTime)>>>,
    data_lines: Arc<Mutex<Vec<String>>>,
}

impl Emstat {
    /// Creates a pty pair and serves the protocol on its master side. With `link`, a
    /// symlink to the device path is (re)created there, so a driver configured with the
    /// link finds a "replugged" simulator again.
    pub fn start(opts: Options, link: Option<&Path>) -> std::io::Result<Emstat> {
        let (mut master, path) = super::open_pty(link)?;
        master
            .set_timeout(Duration::from_millis(5))
            .map_err(std::io::Error::other)?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let data_lines = Arc::new(Mutex::new(Vec::new()));
        let mut dev = Device {
            opts,
            port: master,
            received: received.clone(),
            data_lines: data_lines.clone(),
            inbuf: Vec::new(),
            collecting: None,
            loaded: None,
            run: None,
            halted: false,
            lines_out: 0,
        };
        let handle = super::Handle::spawn("emstat-sim", path, link, move |stop| dev.serve(&stop))?;
        Ok(Emstat {
            handle,
            received,
            data_lines,
        })
    }

    /// The device path (`/dev/pts/N`).
    pub fn path(&self) -> &Path {
        self.handle.path()
    }

    /// Command lines the simulator received (a script counts as its `e` or `l` line).
    pub fn received(&self) -> Vec<String> {
        self.received_at().into_iter().map(|(c, _)| c).collect()
    }

    /// The same, with the time each command line was complete on the wire.
    pub fn received_at(&self) -> Vec<(String, SystemTime)> {
        self.received.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Every `P` line written, exactly as sent.
    pub fn data_lines(&self) -> Vec<String> {
        self.data_lines
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Closes the pty, as pulling the USB cable would.
    pub fn unplug(self) {
        drop(self.handle);
    }
}

/// What a parsed script will do.
struct Plan {
    /// Loop marker id and the step to run (None: a script without a measurement loop).
    step: Option<(u16, Step)>,
    /// Order of `pck_add` variables mapped to their role: 't', 'e' or 'i'.
    pack: Vec<char>,
    /// `send_string` texts, sent before the loop.
    texts: Vec<String>,
    /// An error to report instead of running: (code, line).
    error: Option<(u16, usize)>,
}

struct Run {
    gen: Option<Generator>,
    loop_id: u16,
    pack: Vec<char>,
    scan: Option<usize>,
    /// Lines still to write before points (echo, texts, loop marker …).
    queue: Vec<String>,
    /// Wall-clock start, shifted forward by pauses.
    started: Instant,
    /// Seconds between points (step / scan rate, or the CA interval).
    interval: f64,
    paused_at: Option<Instant>,
    finishing: bool,
}

struct Device {
    opts: Options,
    port: TTYPort,
    received: Arc<Mutex<Vec<(String, SystemTime)>>>,
    data_lines: Arc<Mutex<Vec<String>>>,
    inbuf: Vec<u8>,
    /// Script lines being received after `e` (true) or `l` (false).
    collecting: Option<(bool, Vec<String>)>,
    loaded: Option<Vec<String>>,
    run: Option<Run>,
    halted: bool,
    lines_out: u64,
}

const KNOWN: &[&str] = &[
    "var",
    "store_var",
    "set_pgstat_chan",
    "set_pgstat_mode",
    "set_max_bandwidth",
    "set_range",
    "set_range_minmax",
    "set_autoranging",
    "set_e",
    "set_i",
    "cell_on",
    "cell_off",
    "timer_start",
    "timer_get",
    "meas_loop_cv",
    "meas_loop_ca",
    "meas_loop_lsv",
    "pck_start",
    "pck_add",
    "pck_end",
    "endloop",
    "on_finished:",
    "send_string",
    "wait",
    "loop",
    "breakloop",
    "if",
    "else",
    "endif",
    "add_var",
    "copy_var",
    "set_gpio_cfg",
    "set_gpio",
];

impl Device {
    fn write(&mut self, s: &str) {
        let mut bytes = s.as_bytes().to_vec();
        if self.opts.xon_xoff && self.lines_out % 7 == 3 && bytes.len() > 4 {
            bytes.insert(2, 0x13);
            bytes.insert(0, 0x11);
        }
        self.lines_out += 1;
        // A driver that is not listening is like a cable nobody reads: drop output.
        let _ = self.port.write_all(&bytes);
    }

    fn serve(&mut self, stop: &AtomicBool) {
        if self.opts.xon_xoff {
            let _ = self.port.write_all(&[0x11]);
        }
        let mut buf = [0u8; 1024];
        while !stop.load(Ordering::Relaxed) {
            // While a run is due to produce, only look at input that is already there.
            let ready = self
                .run
                .as_ref()
                .is_some_and(|r| !self.halted && self.due(r));
            if !ready || self.port.bytes_to_read().unwrap_or(0) > 0 {
                match self.port.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        self.inbuf.extend_from_slice(&buf[..n]);
                        while let Some(pos) = self.inbuf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = self.inbuf.drain(..=pos).collect();
                            let line =
                                String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                            self.on_line(line);
                        }
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            self.produce();
        }
    }

    fn log(&self, s: &str) {
        if let Ok(mut v) = self.received.lock() {
            v.push((s.to_string(), SystemTime::now()));
        }
    }

    fn on_line(&mut self, line: String) {
        if let Some((run, lines)) = &mut self.collecting {
            if line.is_empty() {
                let (run, lines) = (*run, std::mem::take(lines));
                self.collecting = None;
                if run {
                    self.start(&lines, "e");
                } else {
                    self.loaded = Some(lines);
                    self.write("l\n");
                }
            } else {
                lines.push(line);
            }
            return;
        }
        if line.is_empty() {
            return; // the flush line before `Z`
        }
        self.log(&line);
        let running = self.run.is_some();
        match line.as_str() {
            "t" => self.write("tespico1503#Nov 21 2026 12:00:00\nR*\n"),
            "i" => self.write("iESPICOSIM0001\n"),
            "v" => self.write("v01.09.00\n"),
            "e" => self.collecting = Some((true, Vec::new())),
            "l" => self.collecting = Some((false, Vec::new())),
            "r" => match self.loaded.clone() {
                Some(lines) if !running => self.start(&lines, "r"),
                Some(_) => self.write("r!0006\n"),
                None => self.write("r!000C\n"),
            },
            "h" | "H" => {
                let halt = line == "h";
                let valid = running && (halt != self.halted);
                match (valid, self.opts.halt_reply) {
                    (false, _) | (true, HaltReply::Refuse) => self.write(&format!("{line}!0006\n")),
                    (true, mode) => {
                        if mode == HaltReply::Echo {
                            self.write(&format!("{line}\n"));
                        }
                        self.set_halted(halt);
                    }
                }
            }
            "Z" => {
                if running {
                    self.write("Z\n");
                    self.finish_loop();
                } else {
                    self.write("Z!0006\n");
                }
            }
            "Y" => {
                if running {
                    self.write("Y\n");
                    self.finish_loop();
                } else {
                    self.write("Y!0006\n");
                }
            }
            other => {
                let c = other.chars().next().unwrap_or('?');
                self.write(&format!("{c}!0003\n"));
            }
        }
    }

    fn set_halted(&mut self, halt: bool) {
        self.halted = halt;
        if let Some(r) = &mut self.run {
            if halt {
                r.paused_at = Some(Instant::now());
            } else if let Some(p) = r.paused_at.take() {
                r.started += p.elapsed();
            }
        }
    }

    /// Ends the measurement loop now (abort): close it, run on_finished, end the script.
    fn finish_loop(&mut self) {
        self.halted = false;
        if let Some(r) = &mut self.run {
            r.gen = None;
            if r.scan.take().is_some() {
                r.queue.push("-".into());
            }
            r.queue.push("*".into());
            r.finishing = true;
        }
    }

    fn start(&mut self, lines: &[String], echo: &str) {
        let plan = plan(lines);
        let mut queue = vec![echo.to_string()];
        if let Some((code, line)) = plan.error {
            queue.push(format!("!{code:04X}: Line {line}, Col 1"));
            queue.push(String::new());
            for l in queue {
                self.write(&format!("{l}\n"));
            }
            return;
        }
        queue.extend(plan.texts.iter().map(|t| format!("T{t}")));
        let (gen, loop_id, interval) = match plan.step {
            Some((id, step)) => {
                queue.push(format!("M{id:04X}"));
                let interval = match step {
                    Step::Cv {
                        e_step, scan_rate, ..
                    }
                    | Step::Lsv {
                        e_step, scan_rate, ..
                    } => e_step / scan_rate,
                    Step::Ca { t_interval, .. } => t_interval,
                };
                (
                    Some(Generator::new(&step, 0.2, 0.01, self.opts.seed)),
                    id,
                    interval,
                )
            }
            None => (None, 0, 0.0),
        };
        self.halted = false;
        self.run = Some(Run {
            gen,
            loop_id,
            pack: plan.pack,
            scan: None,
            queue,
            started: Instant::now(),
            interval,
            paused_at: None,
            finishing: false,
        });
    }

    fn due(&self, r: &Run) -> bool {
        if !r.queue.is_empty() || r.gen.is_none() || self.opts.speed <= 0.0 {
            return true;
        }
        let Some(g) = &r.gen else { return true };
        let k = g.position();
        // The time of the next point, from the plan of the step.
        let t_next = k as f64 * r.interval;
        r.started.elapsed().as_secs_f64() * self.opts.speed >= t_next
    }

    /// Writes what is due now: queued lines, or the next point.
    fn produce(&mut self) {
        if self.halted {
            return;
        }
        let Some(r) = &self.run else { return };
        if !self.due(r) {
            return;
        }
        let Some(r) = &mut self.run else { return };
        if !r.queue.is_empty() {
            let lines: Vec<String> = r.queue.drain(..).collect();
            for l in lines {
                self.write(&format!("{l}\n"));
            }
            return;
        }
        let Some(g) = r.gen.as_mut() else {
            // Loop done (or none): on_finished runs, the script ends.
            self.run = None;
            self.write("\n");
            return;
        };
        let k = g.position();
        let Some(p) = g.next_point() else {
            r.gen = None;
            let mut tail = Vec::new();
            if r.scan.take().is_some() {
                tail.push("-".to_string());
            }
            tail.push("*".to_string());
            r.queue.extend(tail);
            return;
        };
        let scan = g.scan_of(k);
        let multi_scan = r.loop_id == 5 && g.scan_of(g.len().saturating_sub(1)) > 0;
        let mut pre = Vec::new();
        if multi_scan && r.scan != Some(scan) {
            if r.scan.is_some() {
                pre.push("-".to_string());
            }
            pre.push(format!("C{:04X}", 0));
            r.scan = Some(scan);
        }
        let mut vars = Vec::new();
        for role in &r.pack {
            let field = match role {
                't' => format!(
                    "eb{}",
                    encode_value(p.t).unwrap_or_else(|| "     nan".into())
                ),
                'e' => format!(
                    "da{}",
                    encode_value(p.e).unwrap_or_else(|| "     nan".into())
                ),
                _ => {
                    let range = if p.i.abs() < 2e-6 { 1 } else { 8 };
                    format!(
                        "ba{},10,2{range:02X}",
                        encode_value(p.i).unwrap_or_else(|| "     nan".into())
                    )
                }
            };
            vars.push(field);
        }
        let line = format!("P{}", vars.join(";"));
        for l in pre {
            self.write(&format!("{l}\n"));
        }
        self.write(&format!("{line}\n"));
        if let Ok(mut d) = self.data_lines.lock() {
            d.push(line);
        }
        let n = self.data_lines.lock().map(|d| d.len()).unwrap_or(0) as u32;
        if self.opts.garbage_every > 0 && n % self.opts.garbage_every == 0 {
            self.write("P#garbage\u{7f}!!\n");
        }
    }
}

/// Reads a script: variables, the measurement loop, what each packet carries.
fn plan(lines: &[String]) -> Plan {
    let mut vars: HashMap<String, f64> = HashMap::new();
    let mut out = Plan {
        step: None,
        pack: Vec::new(),
        texts: Vec::new(),
        error: None,
    };
    let (mut e_var, mut t_var) = (String::new(), String::new());
    let mut pack_names = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = words.first() else { continue };
        if line.len() > 128 {
            out.error = Some((0x0008, n + 1));
            return out;
        }
        if first.starts_with('#') {
            continue;
        }
        if !KNOWN.contains(first) {
            out.error = Some((0x4001, n + 1));
            return out;
        }
        let num = |w: &str| -> Option<f64> {
            vars.get(w)
                .copied()
                .or_else(|| parse_quantity(w.trim_end_matches('i'), "-").ok())
        };
        match *first {
            "store_var" if words.len() >= 3 => {
                if let Some(v) = num(words[2]) {
                    vars.insert(words[1].to_string(), v);
                }
            }
            "send_string" => {
                out.texts.push(
                    line.trim_start()["send_string".len()..]
                        .trim()
                        .trim_matches('"')
                        .to_string(),
                );
            }
            "timer_get" if words.len() >= 2 => t_var = words[1].to_string(),
            "pck_add" if words.len() >= 2 => pack_names.push(words[1].to_string()),
            "meas_loop_cv" | "meas_loop_lsv" | "meas_loop_ca" => {
                let args: Vec<Option<f64>> = words[3..]
                    .iter()
                    .filter(|w| !w.starts_with("nscans"))
                    .map(|w| num(w))
                    .collect();
                let nscans = words
                    .iter()
                    .find_map(|w| w.strip_prefix("nscans(").and_then(|r| r.strip_suffix(')')))
                    .and_then(num)
                    .unwrap_or(1.0) as u32;
                if words.len() < 3 || args.iter().any(Option::is_none) {
                    out.error = Some((0x0007, n + 1));
                    return out;
                }
                e_var = words[1].to_string();
                let a: Vec<f64> = args.into_iter().flatten().collect();
                let step = match (*first, a.as_slice()) {
                    ("meas_loop_cv", [b, v1, v2, s, r, ..]) => (
                        5,
                        Step::Cv {
                            e_begin: *b,
                            e_vertex1: *v1,
                            e_vertex2: *v2,
                            e_step: *s,
                            scan_rate: *r,
                            n_scans: nscans.max(1),
                        },
                    ),
                    ("meas_loop_lsv", [b, e, s, r, ..]) => (
                        0,
                        Step::Lsv {
                            e_begin: *b,
                            e_end: *e,
                            e_step: *s,
                            scan_rate: *r,
                        },
                    ),
                    ("meas_loop_ca", [e, ti, tr, ..]) => (
                        7,
                        Step::Ca {
                            e_dc: *e,
                            t_interval: *ti,
                            t_run: *tr,
                        },
                    ),
                    _ => {
                        out.error = Some((0x0007, n + 1));
                        return out;
                    }
                };
                out.step = Some(step);
            }
            _ => {}
        }
    }
    // The loop's current variable, and any variable this simulator does not model, is
    // sent as a current.
    out.pack = pack_names
        .iter()
        .map(|n| match n {
            n if *n == t_var => 't',
            n if *n == e_var => 'e',
            _ => 'i',
        })
        .collect();
    out
}
