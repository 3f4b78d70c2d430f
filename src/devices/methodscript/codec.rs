//! Serial bytes → lines. MethodSCRIPT ends every line with `\n` (an empty line is
//! meaningful: it ends a script). Stray XON/XOFF bytes (0x11/0x13, software flow control
//! on some firmware) are dropped; a `\r` before the `\n` is tolerated. A line longer than
//! [`MAX_LINE`] or not ASCII is reported as an error item (the stream goes on) so the
//! driver can count it and keep reading.

use tokio_util::bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Longest line accepted. Device lines are short (a `P` line with ten variables is
/// under 200 characters); anything longer is garbage on the wire.
pub const MAX_LINE: usize = 4096;

const XON: u8 = 0x11;
const XOFF: u8 = 0x13;

/// A line that is not usable, reported in place of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line longer than {MAX_LINE} bytes discarded")]
    /// Longer than any MethodSCRIPT line; dropped up to its newline.
    TooLong,
    #[error("line is not ASCII: {0:?}")]
    /// Contains bytes outside printable ASCII (line noise, wrong baud rate).
    NotAscii(String),
}

#[derive(Debug, Default)]
/// Splits a byte stream into lines: bounded length, XON/XOFF removed, noise reported.
pub struct LineCodec {
    /// Inside an over-long line: drop bytes until the next `\n`.
    discarding: bool,
    /// Bytes already searched for `\n`.
    searched: usize,
}

impl Decoder for LineCodec {
    type Item = Result<String, LineError>;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        let Some(pos) = buf[self.searched..].iter().position(|b| *b == b'\n') else {
            if buf.len() > MAX_LINE {
                self.discarding = true;
                buf.clear();
                self.searched = 0;
            } else {
                self.searched = buf.len();
            }
            return Ok(None);
        };
        let end = self.searched + pos;
        self.searched = 0;
        let line = buf.split_to(end);
        buf.advance(1);
        if self.discarding {
            self.discarding = false;
            return Ok(Some(Err(LineError::TooLong)));
        }
        let mut bytes: Vec<u8> = line
            .iter()
            .copied()
            .filter(|b| *b != XON && *b != XOFF)
            .collect();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        if bytes.len() > MAX_LINE {
            return Ok(Some(Err(LineError::TooLong)));
        }
        Ok(Some(match String::from_utf8(bytes) {
            Ok(s) if s.is_ascii() => Ok(s),
            Ok(s) => Err(LineError::NotAscii(s)),
            Err(e) => Err(LineError::NotAscii(
                String::from_utf8_lossy(e.as_bytes()).into_owned(),
            )),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]]) -> Vec<Result<String, LineError>> {
        let mut c = LineCodec::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(item) = c.decode(&mut buf).unwrap() {
                out.push(item);
            }
        }
        out
    }

    #[test]
    fn splits_on_newline_keeping_the_empty_end_of_script_line() {
        let out = lines(&[b"e\nM0000\nPda7F85F3Fu;ba48D5", b"03Dp,10,288\n*\n\n"]);
        let want = ["e", "M0000", "Pda7F85F3Fu;ba48D503Dp,10,288", "*", ""];
        assert_eq!(out, want.map(|s| Ok(s.to_string())));
    }

    #[test]
    fn drops_xon_xoff_and_a_trailing_cr() {
        let out = lines(&[b"\x11Z!00\x1306\r\n"]);
        assert_eq!(out, [Ok("Z!0006".to_string())]);
    }

    #[test]
    fn an_overlong_line_is_one_error_and_the_stream_goes_on() {
        let long = vec![b'x'; MAX_LINE * 3];
        let out = lines(&[&long, b"\nv01.09.00\n"]);
        assert_eq!(out, [Err(LineError::TooLong), Ok("v01.09.00".to_string())]);
    }

    #[test]
    fn non_ascii_is_an_error_item() {
        let out = lines(&[b"T\xff\xfe\nT ok\n"]);
        assert!(matches!(out[0], Err(LineError::NotAscii(_))));
        assert_eq!(out[1], Ok("T ok".to_string()));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_in_arbitrary_chunks_never_panic(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            cut in 1usize..64,
        ) {
            let chunks: Vec<&[u8]> = data.chunks(cut).collect();
            for item in lines(&chunks).into_iter().flatten() {
                let _ = super::super::Line::parse(&item);
            }
        }
    }
}
