//! PalmSens MethodSCRIPT: the wire layer, as `docs/protocols.md` §1 documents it.
//!
//! Layers (mini-redis style): serial bytes → lines ([`LineCodec`], drops XON/XOFF) →
//! classified lines ([`Line::parse`]) → decoded data packages ([`Package`]) → what they
//! mean in the current state ([`session::Session`]). All pure; the driver that does the
//! I/O comes with the serial-instrument work. [`encode_value`] is the inverse used by the simulator.

mod codec;
pub mod driver;
pub mod method;
mod package;
pub mod plan;
pub mod script;
pub mod session;

pub use codec::{LineCodec, LineError, MAX_LINE};
pub use package::{
    encode_value, encode_value_with, error_text, status_flags, Package, PackageError, Var, VarType,
    SI_PREFIXES,
};

/// One line of device output, classified by its first character (§1.3).
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// The empty line that ends a script's output.
    EndOfScript,
    /// `e`: the device acknowledges an execute command.
    ScriptStart,
    /// `Mxxxx`: a measurement loop starts (the 4 hex digits are kept, meaning undocumented).
    MeasLoopStart(u16),
    /// `*`: a measurement loop ends.
    MeasLoopEnd,
    /// `Cxxxx`: a scan starts (CV with `nscans` > 1).
    ScanStart(u16),
    /// `-`: a scan ends.
    ScanEnd,
    /// `L`: a generic loop starts.
    LoopStart,
    /// `+`: a generic loop ends.
    LoopEnd,
    /// `P…`: a data package.
    Data(Package),
    /// `T…`: text from `send_string`.
    Text(String),
    /// `…!XXXX[: context]`: an error, with what preceded the `!` (usually the echoed
    /// command letter) and the context after the colon (e.g. `Line 1, Col 16`).
    Error {
        /// What preceded the `!` (usually the echoed command letter).
        prefix: String,
        /// The error code, hex in the line.
        code: u16,
        /// What followed the colon (`Line 1, Col 16`).
        context: Option<String>,
    },
    /// Anything else: command replies such as `Z`, `h`, `tespico…`, `v01.09.00`.
    Reply(String),
}

/// Why a line could not be classified.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed {what} line {line:?}")]
    /// A line that starts like a known kind but does not parse.
    Malformed {
        /// The kind of line it looked like.
        what: &'static str,
        /// The line as received.
        line: String,
    },
    #[error("bad data package {line:?}: {source}")]
    /// A `P` line whose package does not decode.
    Package {
        /// The line as received.
        line: String,
        /// Why its package does not decode.
        source: PackageError,
    },
}

impl Line {
    /// Classifies one line (without its `\n`). Never panics, whatever the input.
    pub fn parse(line: &str) -> Result<Line, ParseError> {
        if let Some((prefix, code, context)) = find_error(line) {
            return Ok(Line::Error {
                prefix: prefix.to_string(),
                code,
                context: context.map(str::to_string),
            });
        }
        let malformed = |what| ParseError::Malformed {
            what,
            line: line.to_string(),
        };
        let Some(first) = line.chars().next() else {
            return Ok(Line::EndOfScript);
        };
        let rest = &line[first.len_utf8()..];
        Ok(match first {
            'e' if rest.is_empty() => Line::ScriptStart,
            'M' => Line::MeasLoopStart(hex4(rest).ok_or_else(|| malformed("measurement loop"))?),
            'C' => Line::ScanStart(hex4(rest).ok_or_else(|| malformed("scan"))?),
            '*' if rest.is_empty() => Line::MeasLoopEnd,
            '-' if rest.is_empty() => Line::ScanEnd,
            'L' if rest.is_empty() => Line::LoopStart,
            '+' if rest.is_empty() => Line::LoopEnd,
            'P' => Line::Data(Package::parse(rest).map_err(|source| ParseError::Package {
                line: line.to_string(),
                source,
            })?),
            'T' => Line::Text(rest.to_string()),
            _ => Line::Reply(line.to_string()),
        })
    }
}

/// Exactly four hex digits.
fn hex4(s: &str) -> Option<u16> {
    (s.len() == 4 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u16::from_str_radix(s, 16).ok())
        .flatten()
}

/// PalmSens' `.*!([0-9A-Fa-f]{4})(:.*|\n)`: a `!`, four hex digits, then the end of the
/// line or a colon and context.
fn find_error(line: &str) -> Option<(&str, u16, Option<&str>)> {
    let mut from = 0;
    while let Some(pos) = line[from..].find('!') {
        let at = from + pos;
        let after = &line[at + 1..];
        if let Some(code) = after.get(..4).and_then(hex4) {
            let tail = &after[4..];
            if tail.is_empty() {
                return Some((&line[..at], code, None));
            }
            if let Some(ctx) = tail.strip_prefix(':') {
                return Some((&line[..at], code, Some(ctx.trim())));
            }
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_lines_are_classified() {
        assert_eq!(Line::parse("").unwrap(), Line::EndOfScript);
        assert_eq!(Line::parse("e").unwrap(), Line::ScriptStart);
        assert_eq!(Line::parse("M0000").unwrap(), Line::MeasLoopStart(0));
        assert_eq!(Line::parse("M0005").unwrap(), Line::MeasLoopStart(5));
        assert_eq!(Line::parse("C000B").unwrap(), Line::ScanStart(11));
        assert_eq!(Line::parse("*").unwrap(), Line::MeasLoopEnd);
        assert_eq!(Line::parse("-").unwrap(), Line::ScanEnd);
        assert_eq!(Line::parse("L").unwrap(), Line::LoopStart);
        assert_eq!(Line::parse("+").unwrap(), Line::LoopEnd);
        assert_eq!(
            Line::parse("THello world!").unwrap(),
            Line::Text("Hello world!".into())
        );
    }

    #[test]
    fn loop_markers_need_exactly_four_hex_digits() {
        assert!(Line::parse("M000").is_err());
        assert!(Line::parse("M00000").is_err());
        assert!(Line::parse("MZZZZ").is_err());
    }

    #[test]
    fn errors_carry_code_prefix_and_context() {
        assert_eq!(
            Line::parse("Z!0006").unwrap(),
            Line::Error {
                prefix: "Z".into(),
                code: 6,
                context: None
            }
        );
        assert_eq!(
            Line::parse("!4001: Line 1, Col 16").unwrap(),
            Line::Error {
                prefix: String::new(),
                code: 0x4001,
                context: Some("Line 1, Col 16".into())
            }
        );
        assert_eq!(error_text(0x0006), Some("Communication mode invalid"));
        assert_eq!(error_text(0x4001), Some("The script command is unknown"));
        // A `!` not followed by a code is just text.
        assert_eq!(
            Line::parse("THello world!").unwrap(),
            Line::Text("Hello world!".into())
        );
    }

    #[test]
    fn identification_replies_are_replies() {
        // Exchange D: each reply is one line.
        assert_eq!(
            Line::parse("tes4_lr1500#Mar 12 2026 14:28:01").unwrap(),
            Line::Reply("tes4_lr1500#Mar 12 2026 14:28:01".into())
        );
        assert_eq!(
            Line::parse("iES4LR20B0008").unwrap(),
            Line::Reply("iES4LR20B0008".into())
        );
        assert_eq!(
            Line::parse("v01.09.00").unwrap(),
            Line::Reply("v01.09.00".into())
        );
        assert_eq!(Line::parse("Z").unwrap(), Line::Reply("Z".into()));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics_the_line_parser(s in "\\PC{0,80}") {
            let _ = Line::parse(&s);
        }

        #[test]
        fn arbitrary_package_like_text_never_panics(s in "P[a-z0-9A-F ;,.nu-]{0,60}") {
            let _ = Line::parse(&s);
        }
    }
}
