//! The MethodSCRIPT session: which state the instrument is in and what each line and
//! command means in that state. Pure (no I/O): the driver feeds it lines and sends the
//! bytes it returns (protocol state apart from I/O, ARCHITECTURE.md).
//!
//! Commands (docs/protocols.md §1.2, §1.6): pause → `h`, resume → `H`, stop → the abort-and-sync
//! sequence `\n` + `Z`, then drain to the empty line so the script's `on_finished:` block
//! turns the cell off. The replies to `h`/`H` are not documented: a line echoing the
//! command letter is taken as success and `<letter>!XXXX` as failure.

use super::{error_text, Line, Package};

/// Where the instrument is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No script running.
    Idle,
    /// A script was sent; output is arriving.
    Running,
    /// Halted by `h`; `H` resumes.
    Halted,
    /// `Z` sent; draining output until the empty line.
    Aborting,
}

/// What a line meant, for the driver to turn into records.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// The device acknowledged the script (`e`).
    ScriptStarted,
    /// A measurement loop began (`M` with its type code).
    MeasLoopStarted(u16),
    /// The measurement loop ended (`*`).
    MeasLoopEnded,
    /// A generic loop began (`L`).
    LoopStarted,
    /// A generic loop ended (`+`).
    LoopEnded,
    /// A scan began (`C…`), with its number in this loop.
    ScanStarted(u16),
    /// The scan ended (`-`).
    ScanEnded,
    /// One data package, with the scan it belongs to (0 when there are no scans).
    Data {
        /// The scan the data belongs to.
        scan: u32,
        /// The decoded variables.
        package: Package,
    },
    /// Text the script sent with `send_string`.
    Text(String),
    /// The script ended: normally, after an abort, and/or after a device error.
    ScriptEnded {
        /// The script was aborted (`Z`).
        aborted: bool,
        /// A device error happened during the script.
        failed: bool,
    },
    /// A device error during a script (it fails the experiment).
    DeviceError {
        /// The error code.
        code: u16,
        /// Its documented meaning.
        text: String,
        /// Where in the script, as the device said it.
        context: Option<String>,
    },
    /// The device answered a command we sent.
    CommandDone(Command),
    /// The device refused a command we sent.
    CommandFailed {
        /// The command refused.
        command: Command,
        /// The error code.
        code: u16,
        /// Its documented meaning.
        text: String,
    },
    /// A line that means nothing in this state (counted by the driver).
    Unexpected(String),
}

/// The commands the session sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Halt the script at the next loop iteration (`h`).
    Halt,
    /// Resume a halted script (`H`).
    Resume,
    /// Abort the script (`Z`).
    Abort,
}

impl Command {
    fn letter(self) -> char {
        match self {
            Command::Halt => 'h',
            Command::Resume => 'H',
            Command::Abort => 'Z',
        }
    }
}

/// Why a command cannot be sent now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("no script is running")]
    /// Halt, resume and abort need a running script.
    NotRunning,
    #[error("the script is not halted")]
    /// Resume needs a halted script.
    NotHalted,
    #[error("a script is already running")]
    /// A script cannot start while one runs.
    Busy,
    #[error("a {0:?} command is still waiting for its reply")]
    /// One command at a time: the reply to this one has not come.
    Pending(Command),
}

#[derive(Debug)]
/// The MethodSCRIPT conversation as a pure state machine: lines in, outputs and commands out.
pub struct Session {
    state: State,
    /// Command sent, reply not yet seen.
    pending: Option<Command>,
    /// Scans started in the current measurement loop.
    scans: u32,
    /// A device error was seen during this script.
    failed: bool,
}

impl Default for Session {
    fn default() -> Self {
        Session {
            state: State::Idle,
            pending: None,
            scans: 0,
            failed: false,
        }
    }
}

/// Formats a device error code as its documented text, or the code itself.
fn describe(code: u16) -> String {
    error_text(code).map_or_else(|| format!("device error {code:04X}"), str::to_string)
}

impl Session {
    /// Where the conversation is now.
    pub fn state(&self) -> State {
        self.state
    }

    /// Bytes that start `script` (its lines, no `\r`, ending with the empty line).
    pub fn start(&mut self, script: &str) -> Result<Vec<u8>, SessionError> {
        if self.state != State::Idle {
            return Err(SessionError::Busy);
        }
        self.state = State::Running;
        self.scans = 0;
        self.failed = false;
        let mut out = b"e\n".to_vec();
        for line in script.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue; // an empty line would end the script early
            }
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
        Ok(out)
    }

    /// Bytes for a command, or why it cannot be sent now.
    pub fn command(&mut self, cmd: Command) -> Result<&'static [u8], SessionError> {
        if let Some(p) = self.pending {
            if cmd != Command::Abort {
                return Err(SessionError::Pending(p));
            }
        }
        let bytes: &'static [u8] = match (cmd, self.state) {
            (Command::Halt, State::Running) => b"h\n",
            (Command::Halt, _) => return Err(SessionError::NotRunning),
            (Command::Resume, State::Halted) => b"H\n",
            (Command::Resume, _) => return Err(SessionError::NotHalted),
            // Abort is always allowed: it is also how to resync an unknown device.
            (Command::Abort, _) => b"\nZ\n",
        };
        self.pending = Some(cmd);
        if cmd == Command::Abort && self.state != State::Idle {
            self.state = State::Aborting;
        }
        Ok(bytes)
    }

    /// The link went away: whatever ran is over (the driver reports it failed).
    pub fn link_lost(&mut self) {
        *self = Session::default();
    }

    /// Interprets one line of device output.
    pub fn on_line(&mut self, line: &Line) -> Vec<Output> {
        // A reply to a pending command comes first, whatever the state.
        if let Some(cmd) = self.pending {
            if let Some(out) = self.reply_to(cmd, line) {
                return out;
            }
        }
        match line {
            Line::ScriptStart if self.state != State::Idle => vec![Output::ScriptStarted],
            // Some firmware prints the echo and the first line together ("eM0000").
            Line::Reply(s) if s.starts_with('e') && s.len() > 1 && self.state != State::Idle => {
                let mut out = vec![Output::ScriptStarted];
                match Line::parse(&s[1..]) {
                    Ok(rest) => out.extend(self.on_line(&rest)),
                    Err(_) => out.push(Output::Unexpected(s.clone())),
                }
                out
            }
            Line::MeasLoopStart(id) => {
                self.scans = 0;
                vec![Output::MeasLoopStarted(*id)]
            }
            Line::MeasLoopEnd => vec![Output::MeasLoopEnded],
            Line::ScanStart(id) => {
                self.scans += 1;
                vec![Output::ScanStarted(*id)]
            }
            Line::ScanEnd => vec![Output::ScanEnded],
            Line::LoopStart => vec![Output::LoopStarted],
            Line::LoopEnd => vec![Output::LoopEnded],
            Line::Data(p) => vec![Output::Data {
                scan: self.scans.saturating_sub(1),
                package: p.clone(),
            }],
            Line::Text(t) => vec![Output::Text(t.clone())],
            Line::Error { code, context, .. } if self.state != State::Idle => {
                self.failed = true;
                vec![Output::DeviceError {
                    code: *code,
                    text: describe(*code),
                    context: context.clone(),
                }]
            }
            Line::EndOfScript if self.state != State::Idle => {
                let aborted = self.state == State::Aborting;
                self.state = State::Idle;
                self.pending = None;
                vec![Output::ScriptEnded {
                    aborted,
                    failed: self.failed,
                }]
            }
            other => vec![Output::Unexpected(format!("{other:?}"))],
        }
    }

    /// The reply to a command: `<letter>` alone, or `<letter>!XXXX`.
    fn reply_to(&mut self, cmd: Command, line: &Line) -> Option<Vec<Output>> {
        let letter = cmd.letter().to_string();
        match line {
            Line::Reply(s) if *s == letter => {
                self.pending = None;
                match cmd {
                    Command::Halt => self.state = State::Halted,
                    Command::Resume => self.state = State::Running,
                    // Keep draining until the empty line.
                    Command::Abort => {}
                }
                Some(vec![Output::CommandDone(cmd)])
            }
            Line::Error { prefix, code, .. } if *prefix == letter => {
                self.pending = None;
                if cmd == Command::Abort && *code == 0x0006 {
                    // Nothing was running: the device is idle and in sync.
                    self.state = State::Idle;
                    return Some(vec![Output::CommandDone(cmd)]);
                }
                if cmd == Command::Abort {
                    self.state = State::Idle;
                }
                Some(vec![Output::CommandFailed {
                    command: cmd,
                    code: *code,
                    text: describe(*code),
                }])
            }
            // The flush line sent before `Z` may be answered by an empty line of its
            // own while idle; it is not the end of a script then.
            Line::EndOfScript if cmd == Command::Abort && self.state == State::Idle => {
                Some(Vec::new())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(s: &mut Session, lines: &[&str]) -> Vec<Output> {
        lines
            .iter()
            .flat_map(|l| s.on_line(&Line::parse(l).unwrap()))
            .collect()
    }

    const CV: &str = "var c\nvar p\n\nmeas_loop_cv p c 0m 500m -500m 10m 100m nscans(2)\r\n  pck_start\n  pck_add p\n  pck_add c\n  pck_end\nendloop\non_finished:\n  cell_off\n";

    #[test]
    fn start_sends_the_script_with_lf_only_and_no_inner_empty_lines() {
        let mut s = Session::default();
        let bytes = String::from_utf8(s.start(CV).unwrap()).unwrap();
        assert!(bytes.starts_with("e\nvar c\nvar p\nmeas_loop_cv"));
        assert!(bytes.ends_with("cell_off\n\n"));
        assert!(!bytes.contains('\r'));
        assert_eq!(
            bytes.matches("\n\n").count(),
            1,
            "only the final empty line"
        );
        assert_eq!(s.start(CV), Err(SessionError::Busy));
    }

    #[test]
    fn a_cv_run_yields_scans_points_and_a_normal_end() {
        let mut s = Session::default();
        s.start(CV).unwrap();
        let out = feed(
            &mut s,
            &[
                "e",
                "M0005",
                "C0000",
                "Pda7F85F3Fu;ba48D503Dp,10,288",
                "-",
                "C0000",
                "Pda806EC24u;baAE16C6Dp,10,288",
                "-",
                "*",
                "",
            ],
        );
        assert_eq!(out[0], Output::ScriptStarted);
        let scans: Vec<u32> = out
            .iter()
            .filter_map(|o| match o {
                Output::Data { scan, .. } => Some(*scan),
                _ => None,
            })
            .collect();
        assert_eq!(scans, [0, 1]);
        assert_eq!(
            out.last(),
            Some(&Output::ScriptEnded {
                aborted: false,
                failed: false
            })
        );
        assert_eq!(s.state(), State::Idle);
    }

    #[test]
    fn combined_echo_and_loop_line_is_understood() {
        let mut s = Session::default();
        s.start(CV).unwrap();
        let out = feed(&mut s, &["eM0000"]);
        assert_eq!(out, [Output::ScriptStarted, Output::MeasLoopStarted(0)]);
    }

    #[test]
    fn halt_and_resume_follow_the_device_replies() {
        let mut s = Session::default();
        s.start(CV).unwrap();
        feed(&mut s, &["e", "M0000"]);
        assert_eq!(s.command(Command::Halt).unwrap(), b"h\n");
        assert_eq!(
            s.command(Command::Resume),
            Err(SessionError::Pending(Command::Halt))
        );
        // Data already on the wire still arrives before the reply.
        let out = feed(&mut s, &["Pda7F85F3Fu;ba48D503Dp,10,288", "h"]);
        assert!(matches!(out[0], Output::Data { .. }));
        assert_eq!(out[1], Output::CommandDone(Command::Halt));
        assert_eq!(s.state(), State::Halted);
        assert_eq!(s.command(Command::Halt), Err(SessionError::NotRunning));
        assert_eq!(s.command(Command::Resume).unwrap(), b"H\n");
        assert_eq!(feed(&mut s, &["H"]), [Output::CommandDone(Command::Resume)]);
        assert_eq!(s.state(), State::Running);
    }

    #[test]
    fn a_refused_halt_reports_the_device_error() {
        let mut s = Session::default();
        s.start(CV).unwrap();
        s.command(Command::Halt).unwrap();
        let out = feed(&mut s, &["h!0006"]);
        assert_eq!(
            out,
            [Output::CommandFailed {
                command: Command::Halt,
                code: 6,
                text: "Communication mode invalid".into()
            }]
        );
        assert_eq!(s.state(), State::Running);
    }

    #[test]
    fn abort_drains_to_the_empty_line_so_on_finished_runs() {
        let mut s = Session::default();
        s.start(CV).unwrap();
        feed(&mut s, &["e", "M0000", "Pda7F85F3Fu;ba48D503Dp,10,288"]);
        assert_eq!(s.command(Command::Abort).unwrap(), b"\nZ\n");
        assert_eq!(s.state(), State::Aborting);
        let out = feed(&mut s, &["Pda7F9234Bu;ba4E2C324p,10,288", "Z", "*", ""]);
        assert!(matches!(out[0], Output::Data { .. }), "late data is kept");
        assert_eq!(out[1], Output::CommandDone(Command::Abort));
        assert_eq!(
            out.last(),
            Some(&Output::ScriptEnded {
                aborted: true,
                failed: false
            })
        );
        assert_eq!(s.state(), State::Idle);
    }

    #[test]
    fn abort_while_idle_is_answered_with_0006_and_leaves_the_device_in_sync() {
        let mut s = Session::default();
        s.command(Command::Abort).unwrap();
        let out = feed(&mut s, &["", "Z!0006"]);
        assert_eq!(out, [Output::CommandDone(Command::Abort)]);
        assert_eq!(s.state(), State::Idle);
    }

    #[test]
    fn a_device_error_fails_the_script_with_its_documented_text() {
        let mut s = Session::default();
        s.start(CV).unwrap();
        let out = feed(&mut s, &["e", "!4001: Line 1, Col 16", ""]);
        assert_eq!(
            out[1],
            Output::DeviceError {
                code: 0x4001,
                text: "The script command is unknown".into(),
                context: Some("Line 1, Col 16".into())
            }
        );
        assert_eq!(
            out[2],
            Output::ScriptEnded {
                aborted: false,
                failed: true
            }
        );
    }

    #[test]
    fn unplug_resets_the_session() {
        let mut s = Session::default();
        s.start(CV).unwrap();
        s.link_lost();
        assert_eq!(s.state(), State::Idle);
        assert!(s.start(CV).is_ok());
    }

    #[test]
    fn lines_out_of_place_are_unexpected_not_panics() {
        let mut s = Session::default();
        let out = feed(&mut s, &["", "*", "tespico", "h"]);
        assert!(out
            .iter()
            .all(|o| matches!(o, Output::Unexpected(_) | Output::MeasLoopEnded)));
    }
}
