//! Line-instrument simulators on a pty or a TCP port (a SCPI raw socket): an MT-SICS
//! balance, Keithley 2400 and 2000 SCPI meters, and a CSV line sensor that streams. They
//! answer what the shipped profiles in `devices/profiles/` send, with plausible values,
//! and can inject error replies and garbage lines; on TCP they can also drop the
//! connection or fall silent with the socket open (a half-open link).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serialport::SerialPort;

use crate::devices::simulated::Rng;

/// Which instrument to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Mettler Toledo balance (MT-SICS).
    MtSics,
    /// Keithley 2400 SourceMeter (SCPI).
    Keithley2400,
    /// Keithley 2000 DMM (SCPI).
    Keithley2000,
    /// Arduino-style CSV sensor that streams lines.
    CsvSensor,
}

#[derive(Debug, Clone)]
/// How the line-instrument simulator behaves, including the faults it can inject.
pub struct Options {
    /// Which instrument it imitates.
    pub kind: Kind,
    /// Answer every Nth poll with an error reply (0 = never).
    pub error_every: u32,
    /// Leave every Nth poll unanswered (0 = never).
    pub silent_every: u32,
    /// Emit a garbage line after every N answers or streamed lines (0 = never).
    pub garbage_every: u32,
    /// Streaming period of the CSV sensor.
    pub stream_interval: Duration,
    /// Seed of the measured values' noise.
    pub seed: u64,
}

impl Options {
    /// Well-behaved defaults for `kind`.
    pub fn new(kind: Kind) -> Options {
        Options {
            kind,
            error_every: 0,
            silent_every: 0,
            garbage_every: 0,
            stream_interval: Duration::from_millis(100),
            seed: 11,
        }
    }
}

/// What the instrument's link is: a pty or an accepted TCP connection.
trait Wire: Read + Write + Send {}
impl<T: Read + Write + Send> Wire for T {}

/// Faults a TCP simulator can be told to show while it runs.
#[derive(Debug, Default)]
struct NetFaults {
    /// Close the current connection (the instrument rebooted, a switch dropped it).
    drop_now: AtomicBool,
    /// Read but never answer, keeping the connection open (a half-open link).
    silent: AtomicBool,
    /// Connections accepted so far.
    accepted: std::sync::atomic::AtomicU64,
}

/// A running simulator; dropping it closes the pty or the listening socket.
pub struct LineSim {
    handle: super::Handle,
    received: Arc<Mutex<Vec<String>>>,
    faults: Arc<NetFaults>,
    addr: Option<SocketAddr>,
}

impl LineSim {
    /// Starts the simulator on a new pty; `link` names a symlink to it.
    pub fn start(opts: Options, link: Option<&Path>) -> std::io::Result<LineSim> {
        let (mut master, path) = super::open_pty(link)?;
        master
            .set_timeout(Duration::from_millis(10))
            .map_err(std::io::Error::other)?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let faults = Arc::new(NetFaults::default());
        let mut dev = Instrument::new(opts, received.clone(), faults.clone());
        let handle = super::Handle::spawn("line-sim", path, link, move |stop| {
            dev.port = Some(Box::new(master));
            dev.serve(&stop, false);
        })?;
        Ok(LineSim {
            handle,
            received,
            faults,
            addr: None,
        })
    }

    /// Starts the simulator listening on TCP `addr` (`127.0.0.1:0` for a free port),
    /// one connection at a time, as instruments' raw sockets are.
    pub fn listen(opts: Options, addr: &str) -> std::io::Result<LineSim> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let faults = Arc::new(NetFaults::default());
        let mut dev = Instrument::new(opts, received.clone(), faults.clone());
        // What a config names as `address`.
        let path = PathBuf::from(local.to_string());
        let handle = super::Handle::spawn("line-sim-tcp", path, None, move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        dev.faults.accepted.fetch_add(1, Ordering::Relaxed);
                        dev.faults.drop_now.store(false, Ordering::Relaxed);
                        let ok = stream.set_nonblocking(false).is_ok()
                            && stream
                                .set_read_timeout(Some(Duration::from_millis(10)))
                                .is_ok();
                        if ok {
                            dev.port = Some(Box::new(stream));
                            dev.serve(&stop, true);
                        }
                        dev.port = None;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })?;
        Ok(LineSim {
            handle,
            received,
            faults,
            addr: Some(local),
        })
    }

    /// The TCP address it listens on (TCP simulators only).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// TCP: closes the current connection; the next one is accepted as usual.
    pub fn drop_connection(&self) {
        self.faults.drop_now.store(true, Ordering::Relaxed);
    }

    /// TCP: stops (or resumes) answering while keeping the connection open.
    pub fn set_silent(&self, silent: bool) {
        self.faults.silent.store(silent, Ordering::Relaxed);
    }

    /// TCP: connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.faults.accepted.load(Ordering::Relaxed)
    }

    /// The pty a driver opens.
    pub fn path(&self) -> &Path {
        self.handle.path()
    }

    /// Command lines received, in order.
    pub fn received(&self) -> Vec<String> {
        self.received.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Closes the pty, as pulling the cable would.
    pub fn unplug(self) {
        drop(self.handle);
    }
}

/// What a measurement poll gets.
enum Fate {
    Answer,
    Error,
    Silence,
}

struct Instrument {
    opts: Options,
    port: Option<Box<dyn Wire>>,
    faults: Arc<NetFaults>,
    received: Arc<Mutex<Vec<String>>>,
    rng: Rng,
    /// Lines written (answers or streamed lines), for garbage injection.
    answers: u32,
    /// Measurement polls seen, for error injection.
    polls: u32,
    /// Keithley 2400 output state.
    output_on: bool,
}

impl Instrument {
    fn new(opts: Options, received: Arc<Mutex<Vec<String>>>, faults: Arc<NetFaults>) -> Self {
        Instrument {
            rng: Rng::new(opts.seed),
            opts,
            port: None,
            faults,
            received,
            answers: 0,
            polls: 0,
            output_on: false,
        }
    }

    fn send(&mut self, line: &str) {
        if self.faults.silent.load(Ordering::Relaxed) {
            return;
        }
        let Some(port) = self.port.as_mut() else {
            return;
        };
        let _ = port.write_all(format!("{line}\r\n").as_bytes());
        self.answers += 1;
        if self.opts.garbage_every > 0 && self.answers % self.opts.garbage_every == 0 {
            let _ = port.write_all(b"#\x7f@!garbage\r\n");
        }
    }

    /// Serves the current link until `stop`; a network link (`eof_ends`) also ends when
    /// the client closes it or a fault drops it.
    fn serve(&mut self, stop: &AtomicBool, eof_ends: bool) {
        let mut inbuf = Vec::new();
        let mut buf = [0u8; 512];
        let mut next_stream = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if eof_ends && self.faults.drop_now.swap(false, Ordering::Relaxed) {
                return;
            }
            if self.opts.kind == Kind::CsvSensor && Instant::now() >= next_stream {
                next_stream += self.opts.stream_interval;
                let t = 235.0 + 5.0 * self.rng.symmetric();
                let line = format!(
                    "{:.0},{:.1},{:.1}",
                    t,
                    45.0 + self.rng.symmetric(),
                    1013.0 + self.rng.symmetric()
                );
                self.send(&line);
            }
            let Some(port) = self.port.as_mut() else {
                return;
            };
            match port.read(&mut buf) {
                Ok(0) if eof_ends => return,
                Ok(n) if n > 0 => {
                    inbuf.extend_from_slice(&buf[..n]);
                    while let Some(pos) = inbuf.iter().position(|b| *b == b'\n' || *b == b'\r') {
                        let raw: Vec<u8> = inbuf.drain(..=pos).collect();
                        let line = String::from_utf8_lossy(&raw[..raw.len() - 1])
                            .trim()
                            .to_string();
                        if !line.is_empty() {
                            if let Ok(mut r) = self.received.lock() {
                                r.push(line.clone());
                            }
                            self.answer(&line);
                        }
                    }
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) => {}
                Err(_) if eof_ends => return,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// What this measurement poll gets: silence, an error reply, or the measurement.
    fn poll_fate(&mut self) -> Fate {
        self.polls += 1;
        let every = |n: u32| n > 0 && self.polls % n == 0;
        if every(self.opts.silent_every) {
            Fate::Silence
        } else if every(self.opts.error_every) {
            Fate::Error
        } else {
            Fate::Answer
        }
    }

    fn answer(&mut self, line: &str) {
        match self.opts.kind {
            Kind::MtSics => match line {
                "@" => self.send("I4 A \"SIM0001\""),
                "SI" | "S" => match self.poll_fate() {
                    Fate::Silence => {}
                    Fate::Error => self.send("S I"),
                    Fate::Answer => {
                        let dynamic = line == "SI" && self.polls % 3 == 1;
                        let w = 100.0 + if dynamic { 0.02 * self.rng.symmetric() } else { 0.0 };
                        self.send(&format!("S {}      {w:.2} g", if dynamic { 'D' } else { 'S' }));
                    }
                },
                "Z" | "ZI" => self.send("Z A"),
                "T" => self.send("T S      100.00 g"),
                _ => self.send("ES"),
            },
            Kind::Keithley2400 => match line {
                "*IDN?" => self.send("KEITHLEY INSTRUMENTS INC.,MODEL 2400,4000001,C30 Mar 17 2006 09:29:29/A02 /K/J"),
                ":OUTP ON" => self.output_on = true,
                ":OUTP OFF" => self.output_on = false,
                ":READ?" => match self.poll_fate() {
                    Fate::Silence => {}
                    Fate::Error => self.send("-113,\"Undefined header\""),
                    Fate::Answer if !self.output_on => {
                        self.send("+9.910000E+37,+9.910000E+37,+9.910000E+37,+0.000000E+00,+0.000000E+00");
                    }
                    Fate::Answer => {
                        let i = 1.0e-6 * (1.0 + 0.01 * self.rng.symmetric());
                        self.send(&format!("+1.000000E+00,{i:+.6E},+9.910000E+37,+2.515590E+03,+2.150800E+04"));
                    }
                },
                _ => {} // set commands (*RST, :SOUR…, :SENS…, :ABOR) do not answer
            },
            Kind::Keithley2000 => match line {
                "*IDN?" => self.send("KEITHLEY INSTRUMENTS INC.,MODEL 2000,1234567,A19 /A02"),
                ":READ?" | ":FETC?" => match self.poll_fate() {
                    Fate::Silence => {}
                    Fate::Error => self.send("-113,\"Undefined header\""),
                    Fate::Answer => {
                        let v = 1.12 + 0.001 * self.rng.symmetric();
                        let n = self.polls;
                        self.send(&format!("{v:+.8E}VDC,+{:.3}SECS,+{n:05}RDNG#", n as f64 * 0.5));
                    }
                },
                _ => {}
            },
            Kind::CsvSensor => {} // streams; ignores input
        }
    }
}
