//! An EmStat Pico simulator on a pty pair: it answers `t i v e l r h H Z Y` as
//! docs/protocols.md §1 documents and interprets the scripts it is sent ([`super::interp`]):
//! every measurement loop with data from the simulated cell, `P` lines with the exact
//! encoding, errors at their line and column. For tests and for users without hardware.
//!
//! Undocumented behaviour is configurable: the reply to `h`/`H` ([`HaltReply`]). Faults
//! can be injected: garbage lines, XON/XOFF bytes, and unplugging (closing the pty).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serialport::{SerialPort, TTYPort};

use super::interp::{Status, Vm};

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

struct Run {
    vm: Vm,
    /// Output waiting to be written.
    queue: Vec<String>,
    /// Wall-clock start, shifted forward by pauses.
    started: Instant,
    paused_at: Option<Instant>,
    /// Simulated time of the script's next action.
    next: f64,
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
                    self.halted = false;
                    if let Some(r) = &mut self.run {
                        r.vm.abort(&mut r.queue);
                    }
                } else {
                    self.write("Z!0006\n");
                }
            }
            "Y" => {
                let aborted = self
                    .run
                    .as_mut()
                    .is_some_and(|r| r.vm.abort_loop(&mut r.queue));
                if aborted {
                    self.write("Y\n");
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

    fn start(&mut self, lines: &[String], echo: &str) {
        let mut text = lines.join("\n");
        text.push('\n');
        self.write(&format!("{echo}\n"));
        match Vm::load(&text, self.opts.seed) {
            Err(error) => self.write(&format!("{error}\n\n")),
            Ok(vm) => {
                self.halted = false;
                self.run = Some(Run {
                    vm,
                    queue: Vec::new(),
                    started: Instant::now(),
                    paused_at: None,
                    next: 0.0,
                });
            }
        }
    }

    /// Simulated seconds since the script started (infinite when running as fast as
    /// possible).
    fn now(&self, r: &Run) -> f64 {
        if self.opts.speed <= 0.0 {
            return f64::INFINITY;
        }
        let wall = r.paused_at.unwrap_or_else(Instant::now);
        wall.saturating_duration_since(r.started).as_secs_f64() * self.opts.speed
    }

    fn due(&self, r: &Run) -> bool {
        !r.queue.is_empty() || self.now(r) >= r.next
    }

    /// Runs the script up to now and writes what it produced.
    fn produce(&mut self) {
        if self.halted {
            return;
        }
        let Some(r) = &self.run else { return };
        if !self.due(r) {
            return;
        }
        let now = self.now(r);
        let Some(r) = &mut self.run else { return };
        let status = r.vm.advance(now, 200, &mut r.queue);
        match status {
            Status::Until(t) => r.next = t,
            Status::Busy | Status::Ended => r.next = 0.0,
        }
        let lines: Vec<String> = r.queue.drain(..).collect();
        if status == Status::Ended {
            self.run = None;
        }
        for l in lines {
            self.write(&format!("{l}\n"));
            if l.starts_with('P') {
                let n = match self.data_lines.lock() {
                    Ok(mut d) => {
                        d.push(l);
                        d.len() as u32
                    }
                    Err(_) => 0,
                };
                if self.opts.garbage_every > 0 && n % self.opts.garbage_every == 0 {
                    self.write("P#garbage\u{7f}!!\n");
                }
            }
        }
    }
}
