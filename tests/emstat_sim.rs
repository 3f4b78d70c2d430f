//! The EmStat simulator over a real pty, checked with the library's own MethodSCRIPT
//! codec and session: what a driver will see.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use labgate::devices::methodscript::method::Method;
use labgate::devices::methodscript::session::{Command, Output, Session};
use labgate::devices::methodscript::{Line, LineCodec};
use labgate::sim::emstat::{Emstat, HaltReply, Options};
use serialport::SerialPort;
use tokio_util::bytes::BytesMut;
use tokio_util::codec::Decoder;

struct Client {
    port: Box<dyn SerialPort>,
    codec: LineCodec,
    buf: BytesMut,
    bad: usize,
}

impl Client {
    fn open(path: &Path) -> Client {
        let port = serialport::new(path.to_string_lossy(), 230_400)
            .timeout(Duration::from_millis(50))
            .open()
            .expect("open pty");
        Client {
            port,
            codec: LineCodec::default(),
            buf: BytesMut::new(),
            bad: 0,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.port.write_all(bytes).unwrap();
    }

    /// Next line, or None after `timeout` without one.
    fn line(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(item) = self.codec.decode(&mut self.buf).unwrap() {
                match item {
                    Ok(l) => return Some(l),
                    Err(_) => self.bad += 1,
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            let mut b = [0u8; 512];
            match self.port.read(&mut b) {
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Feeds lines to the session until `done` says stop; returns every output.
    fn run_until(&mut self, s: &mut Session, done: impl Fn(&Output) -> bool) -> Vec<Output> {
        let mut out = Vec::new();
        loop {
            let l = self
                .line(Duration::from_secs(10))
                .expect("device went quiet");
            let parsed = match Line::parse(&l) {
                Ok(p) => p,
                Err(_) => {
                    self.bad += 1;
                    continue;
                }
            };
            for o in s.on_line(&parsed) {
                let stop = done(&o);
                out.push(o);
                if stop {
                    return out;
                }
            }
        }
    }
}

fn method(name: &str, params: serde_json::Value) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/methods");
    let m = Method::load(&dir, name).unwrap();
    m.render(params.as_object().unwrap()).unwrap().0
}

fn fast() -> Options {
    Options {
        speed: 0.0,
        ..Options::default()
    }
}

#[test]
fn identification_replies_as_documented() {
    let sim = Emstat::start(fast(), None).unwrap();
    let mut c = Client::open(sim.path());
    c.send(b"t\n");
    assert_eq!(
        c.line(Duration::from_secs(2)).unwrap(),
        "tespico1503#Nov 21 2026 12:00:00"
    );
    assert_eq!(c.line(Duration::from_secs(2)).unwrap(), "R*");
    c.send(b"i\nv\n");
    assert_eq!(c.line(Duration::from_secs(2)).unwrap(), "iESPICOSIM0001");
    assert_eq!(c.line(Duration::from_secs(2)).unwrap(), "v01.09.00");
    c.send(b"\nZ\n");
    assert_eq!(c.line(Duration::from_secs(2)).unwrap(), "Z!0006");
    c.send(b"x\n");
    assert_eq!(c.line(Duration::from_secs(2)).unwrap(), "x!0003");
}

#[test]
fn a_cv_script_runs_with_scans_and_exactly_encoded_points() {
    let sim = Emstat::start(fast(), None).unwrap();
    let mut c = Client::open(sim.path());
    let mut s = Session::default();
    let script = method("cv", serde_json::json!({"n_scans": 2, "e_step": "10m"}));
    c.send(&s.start(&script).unwrap());
    let out = c.run_until(&mut s, |o| matches!(o, Output::ScriptEnded { .. }));
    assert_eq!(out[0], Output::ScriptStarted);
    assert_eq!(out[1], Output::MeasLoopStarted(5));
    let points: Vec<(u32, f64, f64, f64)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Data { scan, package } => Some((
                *scan,
                package.get("eb")?.value?,
                package.get("da")?.value?,
                package.get("ba")?.value?,
            )),
            _ => None,
        })
        .collect();
    // 2 scans of -0.2 → 0.6 → -0.2 at 10 mV: 160 points each, plus the final point.
    assert_eq!(points.len(), 321);
    assert_eq!(points.len(), sim.data_lines().len());
    assert_eq!(points.iter().filter(|p| p.0 == 0).count(), 160);
    assert_eq!(
        points.iter().filter(|p| p.0 == 1).count(),
        161,
        "the closing point ends scan 2"
    );
    assert!((points[0].2 + 0.2).abs() < 1e-6 && (points[80].2 - 0.6).abs() < 1e-6);
    assert!(
        (points[1].1 - 0.1).abs() < 1e-6,
        "time per point = 10 mV / 100 mV/s"
    );
    let peak = points[..160].iter().map(|p| p.3).fold(f64::MIN, f64::max);
    assert!(peak > 1e-5 && peak < 4e-5, "anodic peak current {peak}");
    assert_eq!(
        out.last(),
        Some(&Output::ScriptEnded {
            aborted: false,
            failed: false
        })
    );
    assert_eq!(c.bad, 0);
}

#[test]
fn halt_resume_and_abort_follow_the_protocol() {
    let sim = Emstat::start(
        Options {
            speed: 20.0,
            ..Options::default()
        },
        None,
    )
    .unwrap();
    let mut c = Client::open(sim.path());
    let mut s = Session::default();
    c.send(
        &s.start(&method("ca", serde_json::json!({"t_run": 100})))
            .unwrap(),
    );
    c.run_until(&mut s, |o| matches!(o, Output::Data { .. }));
    c.send(s.command(Command::Halt).unwrap());
    c.run_until(&mut s, |o| *o == Output::CommandDone(Command::Halt));
    // Halted: no data for a while.
    let before = sim.data_lines().len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sim.data_lines().len(), before);
    c.send(s.command(Command::Resume).unwrap());
    c.run_until(&mut s, |o| *o == Output::CommandDone(Command::Resume));
    c.run_until(&mut s, |o| matches!(o, Output::Data { .. }));
    c.send(s.command(Command::Abort).unwrap());
    let out = c.run_until(&mut s, |o| matches!(o, Output::ScriptEnded { .. }));
    assert!(out.contains(&Output::CommandDone(Command::Abort)));
    assert!(
        out.contains(&Output::MeasLoopEnded),
        "the loop closes after Z"
    );
    assert_eq!(
        out.last(),
        Some(&Output::ScriptEnded {
            aborted: true,
            failed: false
        })
    );
    assert_eq!(sim.received(), ["e", "h", "H", "Z"]);
}

#[test]
fn a_refusing_device_answers_h_with_0006() {
    let sim = Emstat::start(
        Options {
            speed: 20.0,
            halt_reply: HaltReply::Refuse,
            ..Options::default()
        },
        None,
    )
    .unwrap();
    let mut c = Client::open(sim.path());
    let mut s = Session::default();
    c.send(&s.start(&method("ca", serde_json::json!({}))).unwrap());
    c.run_until(&mut s, |o| matches!(o, Output::Data { .. }));
    c.send(s.command(Command::Halt).unwrap());
    let out = c.run_until(&mut s, |o| matches!(o, Output::CommandFailed { .. }));
    assert!(matches!(
        out.last(),
        Some(Output::CommandFailed { code: 6, .. })
    ));
}

#[test]
fn an_unknown_script_command_is_reported_with_its_line() {
    let sim = Emstat::start(fast(), None).unwrap();
    let mut c = Client::open(sim.path());
    let mut s = Session::default();
    c.send(&s.start("var c\ninvalid_command\n").unwrap());
    let out = c.run_until(&mut s, |o| matches!(o, Output::ScriptEnded { .. }));
    assert!(out.contains(&Output::DeviceError {
        code: 0x4001,
        text: "The script command is unknown".into(),
        context: Some("Line 2, Col 1".into())
    }));
    assert_eq!(
        out.last(),
        Some(&Output::ScriptEnded {
            aborted: false,
            failed: true
        })
    );
}

#[test]
fn xon_xoff_bytes_are_dropped_and_garbage_lines_are_countable() {
    let sim = Emstat::start(
        Options {
            speed: 0.0,
            xon_xoff: true,
            garbage_every: 10,
            ..Options::default()
        },
        None,
    )
    .unwrap();
    let mut c = Client::open(sim.path());
    let mut s = Session::default();
    c.send(
        &s.start(&method("lsv", serde_json::json!({"e_step": "10m"})))
            .unwrap(),
    );
    let out = c.run_until(&mut s, |o| matches!(o, Output::ScriptEnded { .. }));
    let points = out
        .iter()
        .filter(|o| matches!(o, Output::Data { .. }))
        .count();
    assert_eq!(points, 81);
    assert_eq!(c.bad, 8, "one garbage line after every 10 data lines");
}

#[test]
fn unplugging_closes_the_port() {
    let sim = Emstat::start(fast(), None).unwrap();
    let mut c = Client::open(sim.path());
    sim.unplug();
    let mut b = [0u8; 16];
    let deadline = Instant::now() + Duration::from_secs(2);
    let gone = loop {
        match c.port.read(&mut b) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                if Instant::now() > deadline {
                    break false;
                }
            }
            Err(_) => break true,
        }
    };
    assert!(
        gone,
        "reads end in EOF or an error once the device is unplugged"
    );
}

#[test]
fn load_run_and_abort_measurement_loop_follow_the_registry() {
    let sim = Emstat::start(
        Options {
            speed: 20.0,
            ..Options::default()
        },
        None,
    )
    .unwrap();
    let mut c = Client::open(sim.path());
    // r without a loaded script: 000C "No script has been loaded".
    c.send(b"r\n");
    assert_eq!(c.line(Duration::from_secs(2)).unwrap(), "r!000C");
    // l loads without running; r runs it.
    let script = method("ca", serde_json::json!({"t_run": 100}));
    c.send(format!("l\n{script}\n").as_bytes());
    assert_eq!(c.line(Duration::from_secs(2)).unwrap(), "l");
    assert!(sim.data_lines().is_empty(), "loading does not run");
    c.send(b"r\n");
    assert_eq!(c.line(Duration::from_secs(2)).unwrap(), "r");
    assert_eq!(c.line(Duration::from_secs(2)).unwrap(), "M0007");
    assert!(c.line(Duration::from_secs(2)).unwrap().starts_with('P'));
    // Y ends the measurement loop; the script then ends.
    c.send(b"Y\n");
    let mut rest = Vec::new();
    while let Some(l) = c.line(Duration::from_secs(2)) {
        let end = l.is_empty();
        rest.push(l);
        if end {
            break;
        }
    }
    let y = rest.iter().position(|l| l == "Y").expect("Y echoed");
    assert_eq!(&rest[y + 1..], ["*", ""], "{rest:?}");
    c.send(b"Y\n");
    assert_eq!(
        c.line(Duration::from_secs(2)).unwrap(),
        "Y!0006",
        "nothing to abort when idle"
    );
}
