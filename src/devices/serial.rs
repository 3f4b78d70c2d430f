//! Serial ports shared by the drivers: where the port is (path or USB identity), how to
//! open it (frame), and a reader thread that turns bytes into lines (serialport is
//! blocking; the driver tasks are async).

use std::io::{Read, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serialport::{SerialPortType, TTYPort};
use tokio::sync::mpsc;
use tokio_util::bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::devices::methodscript::{LineCodec, LineError};
use crate::devices::{Backoff, DeviceCtx};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A USB serial adapter's identity, to find its port whatever the kernel named it.
pub struct UsbId {
    /// Vendor id, hex (`0403`).
    pub vid: String,
    /// Product id, hex (`6015`).
    pub pid: String,
    #[serde(default)]
    /// The adapter's serial number, when two identical adapters are attached.
    pub serial: Option<String>,
}

impl UsbId {
    /// Checks that vid and pid are hex.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if hex16(&self.vid).is_none() {
            return Err((
                "usb.vid".into(),
                "must be a hex vendor id such as 0403".into(),
            ));
        }
        if hex16(&self.pid).is_none() {
            return Err((
                "usb.pid".into(),
                "must be a hex product id such as 6015".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// The parity bit of a serial frame.
pub enum Parity {
    #[default]
    /// No parity bit.
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// Flow control of a serial port.
pub enum Flow {
    #[default]
    /// No flow control.
    None,
    /// XON/XOFF in the data stream.
    Software,
    /// RTS/CTS lines.
    Hardware,
}
/// The serial frame a port is opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Bits per second.
    pub baud: u32,
    /// 5 to 8.
    pub data_bits: u8,
    /// Parity bit.
    pub parity: Parity,
    /// 1 or 2.
    pub stop_bits: u8,
    /// Flow control.
    pub flow_control: Flow,
}

impl Frame {
    /// Checks the frame's numbers; the key is relative to the device.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.baud == 0 {
            return Err(("baud".into(), "must be positive".into()));
        }
        if !(5..=8).contains(&self.data_bits) {
            return Err(("data_bits".into(), "must be 5, 6, 7 or 8".into()));
        }
        if !(1..=2).contains(&self.stop_bits) {
            return Err(("stop_bits".into(), "must be 1 or 2".into()));
        }
        Ok(())
    }
}

fn hex16(s: &str) -> Option<u16> {
    u16::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// The port to open now: the path, or the USB port that matches (so a replugged
/// instrument is found under its new name).
pub fn resolve(port: Option<&str>, usb: Option<&UsbId>) -> Result<String, String> {
    if let Some(p) = port {
        return Ok(p.to_string());
    }
    let Some(u) = usb else {
        return Err("no port configured".into());
    };
    let (vid, pid) = (hex16(&u.vid).unwrap_or(0), hex16(&u.pid).unwrap_or(0));
    let ports = serialport::available_ports().map_err(|e| e.to_string())?;
    ports
        .into_iter()
        .find(|p| match &p.port_type {
            SerialPortType::UsbPort(i) => {
                i.vid == vid
                    && i.pid == pid
                    && u.serial
                        .as_ref()
                        .is_none_or(|s| i.serial_number.as_ref() == Some(s))
            }
            _ => false,
        })
        .map(|p| p.port_name)
        .ok_or_else(|| format!("no USB serial port {}:{} is present", u.vid, u.pid))
}

/// What the reader thread hands over.
pub enum Incoming {
    /// A line, or why a line was unusable.
    Line(Result<String, LineError>),
    /// The port is gone (unplugged, closed); the reason.
    Lost(String),
}

/// Reads the port (a serial port, or a TCP stream with a read timeout) on a thread (both
/// are blocking) and hands lines over.
pub fn spawn_reader<R: Read + Send + 'static>(mut port: R, tx: mpsc::Sender<Incoming>) {
    let spawned = std::thread::Builder::new()
        .name("line-reader".into())
        .spawn(move || {
            let mut codec = LineCodec::default();
            let mut buf = BytesMut::with_capacity(4096);
            let mut chunk = [0u8; 4096];
            loop {
                match port.read(&mut chunk) {
                    Ok(0) => {
                        let _ = tx.blocking_send(Incoming::Lost("end of file".into()));
                        return;
                    }
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        loop {
                            match codec.decode(&mut buf) {
                                Ok(Some(item)) => {
                                    if tx.blocking_send(Incoming::Line(item)).is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    let _ = tx.blocking_send(Incoming::Lost(e.to_string()));
                                    return;
                                }
                            }
                        }
                    }
                    // A serial port's timeout is TimedOut, a socket's SO_RCVTIMEO WouldBlock.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                        ) =>
                    {
                        if tx.is_closed() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Incoming::Lost(e.to_string()));
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the serial reader thread");
    }
}

/// Opens a port with a frame. DTR/RTS are never touched: on a pty they fail (ENOTTY).
pub fn open(path: &str, frame: &Frame) -> Result<TTYPort, String> {
    use serialport::{DataBits, FlowControl, Parity as P, StopBits};
    let data_bits = match frame.data_bits {
        5 => DataBits::Five,
        6 => DataBits::Six,
        7 => DataBits::Seven,
        _ => DataBits::Eight,
    };
    let parity = match frame.parity {
        Parity::None => P::None,
        Parity::Even => P::Even,
        Parity::Odd => P::Odd,
    };
    let stop_bits = if frame.stop_bits == 2 {
        StopBits::Two
    } else {
        StopBits::One
    };
    let flow = match frame.flow_control {
        Flow::None => FlowControl::None,
        Flow::Software => FlowControl::Software,
        Flow::Hardware => FlowControl::Hardware,
    };
    let port = serialport::new(path, frame.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(flow)
        .timeout(Duration::from_millis(100))
        .open_native()
        .map_err(|e| format!("{path}: {e}"))?;
    // DTR/RTS cannot be set on a pty (ENOTTY); that is not a reason to fail.
    Ok(port)
}

/// Checks that a device names exactly one of `port` and `usb`, and a valid `usb`.
pub fn check_port_choice(port: Option<&str>, usb: Option<&UsbId>) -> Result<(), (String, String)> {
    match (port, usb) {
        (Some(_), None) => Ok(()),
        (None, Some(u)) => u.validate(),
        _ => Err(("port".into(), "give exactly one of port or usb".into())),
    }
}

/// An open link to a line instrument (serial port or TCP socket): where it is, the write
/// half, and lines from the reader thread.
pub struct Link {
    /// The port's path or the socket's address, for events.
    pub path: String,
    /// The write half.
    pub writer: Box<dyn Write + Send>,
    /// Lines from the reader thread.
    pub lines: mpsc::Receiver<Incoming>,
}

/// Opens the instrument's port, retrying with `backoff` (and answering commands with the
/// reason meanwhile) until it opens; None when the agent shuts down first. Every serial
/// driver reconnects through here; `open` is how that driver opens a resolved path.
pub async fn reconnect<T>(
    ctx: &mut DeviceCtx,
    port: Option<&str>,
    usb: Option<&UsbId>,
    backoff: &mut Backoff,
    mut open: impl FnMut(&str) -> Result<T, String>,
) -> Option<(String, T)> {
    ctx.retry_open(backoff, || {
        std::future::ready(resolve(port, usb).and_then(|path| open(&path).map(|t| (path, t))))
    })
    .await
}

/// [`reconnect`] for the line-oriented drivers: the port opened with `frame`, its read
/// half on a reader thread.
pub async fn connect(
    ctx: &mut DeviceCtx,
    port: Option<&str>,
    usb: Option<&UsbId>,
    frame: &Frame,
    backoff: &mut Backoff,
) -> Option<Link> {
    let (path, (writer, reader)) = reconnect(ctx, port, usb, backoff, |path| {
        let writer = open(path, frame)?;
        let reader = writer
            .try_clone_native()
            .map_err(|e| format!("{path}: cannot clone the port handle: {e}"))?;
        Ok((writer, reader))
    })
    .await?;
    let (tx, lines) = mpsc::channel(1024);
    spawn_reader(reader, tx);
    Some(Link {
        path,
        writer: Box::new(writer),
        lines,
    })
}
