//! `modbus_rtu` and `modbus_tcp`: Modbus sensors and PLCs on a serial bus or on the
//! network (tokio-modbus), read by the same register-map profiles
//! (`devices/profiles/modbus-*.toml`). One request at a time; Modbus exceptions and
//! timeouts are retried, then counted and reported; three polls in a row with no register
//! answering mean the bus or the connection is gone, and it is opened again with backoff.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::Slave;

use crate::devices::serial::{Flow, Frame, Parity, UsbId};
use crate::devices::{CommandKind, DeviceCtx, DeviceError};
use crate::record::{object, Body, Draft};

/// How a value is stored in registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// Unsigned 16-bit, one register.
    U16,
    /// Signed 16-bit, one register.
    I16,
    /// Unsigned 32-bit, two registers.
    U32,
    /// Signed 32-bit, two registers.
    I32,
    /// IEEE 754 single, two registers.
    F32,
    /// Unsigned 64-bit, four registers.
    U64,
    /// Signed 64-bit, four registers.
    I64,
    /// IEEE 754 double, four registers.
    F64,
}

impl DataType {
    /// How many 16-bit registers a value of this type spans.
    pub fn registers(self) -> u16 {
        match self {
            DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }
}

/// Order of the bytes of a multi-register value, as letters of the big-endian value
/// `ABCD`: `abcd` (high word first), `cdab` (word-swapped), `badc` (byte-swapped),
/// `dcba` (both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    #[default]
    /// High word first, big-endian bytes (the Modbus convention).
    Abcd,
    /// Low word first.
    Cdab,
    /// Bytes swapped within each word.
    Badc,
    /// Fully little-endian.
    Dcba,
}

/// Register values (as read, big-endian each) → the value's big-endian bytes.
fn value_bytes(regs: &[u16], order: WordOrder) -> Vec<u8> {
    let mut words: Vec<u16> = regs.to_vec();
    if matches!(order, WordOrder::Cdab | WordOrder::Dcba) {
        words.reverse();
    }
    if matches!(order, WordOrder::Badc | WordOrder::Dcba) {
        for w in &mut words {
            *w = w.swap_bytes();
        }
    }
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// Decodes registers into a number. `None` if the count does not fit the type.
pub fn decode(regs: &[u16], ty: DataType, order: WordOrder) -> Option<f64> {
    if regs.len() != usize::from(ty.registers()) {
        return None;
    }
    let b = value_bytes(regs, order);
    Some(match ty {
        DataType::U16 => f64::from(u16::from_be_bytes([b[0], b[1]])),
        DataType::I16 => f64::from(i16::from_be_bytes([b[0], b[1]])),
        DataType::U32 => f64::from(u32::from_be_bytes(b[..4].try_into().ok()?)),
        DataType::I32 => f64::from(i32::from_be_bytes(b[..4].try_into().ok()?)),
        DataType::F32 => f64::from(f32::from_be_bytes(b[..4].try_into().ok()?)),
        DataType::U64 => u64::from_be_bytes(b[..8].try_into().ok()?) as f64,
        DataType::I64 => i64::from_be_bytes(b[..8].try_into().ok()?) as f64,
        DataType::F64 => f64::from_be_bytes(b[..8].try_into().ok()?),
    })
}

/// One register (group) to read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Becomes `<device>.<name>` as the reading's `sensor_id`.
    pub name: String,
    /// Slave (unit) id, 1–247.
    pub slave: u8,
    /// 3 = holding registers, 4 = input registers.
    pub function: u8,
    /// 0-based wire address (vendor maps written 40001/30001 are 1-based: subtract).
    pub address: u16,
    #[serde(rename = "type")]
    /// How the registers are read as a number.
    pub data_type: DataType,
    #[serde(default)]
    /// Byte order across registers.
    pub word_order: WordOrder,
    /// value = raw × scale + offset
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    /// Added after scaling.
    pub offset: f64,
    /// The reading's unit.
    pub unit: String,
    /// The reading's `sensor_type`.
    pub sensor_type: String,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The RTU frame of the bus.
pub struct SerialCfg {
    #[serde(default = "d_baud")]
    /// Bits per second (default 9600).
    pub baud: u32,
    #[serde(default = "d_bits")]
    /// Data bits (default 8).
    pub data_bits: u8,
    /// Configure explicitly: the Modbus default of even parity is not universal.
    pub parity: Parity,
    #[serde(default = "d_stop")]
    /// Stop bits (default 1).
    pub stop_bits: u8,
}

fn d_baud() -> u32 {
    9600
}
fn d_bits() -> u8 {
    8
}
fn d_stop() -> u8 {
    1
}

/// A register-map profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The profile's name, reported in `device_connected`.
    pub name: String,
    #[serde(default)]
    /// Free text for people.
    pub description: String,
    /// The bus frame.
    pub serial: SerialCfg,
    /// What to read each poll.
    pub registers: Vec<Register>,
}

impl Profile {
    /// Loads and checks a profile file.
    pub fn load(path: &std::path::Path) -> Result<Profile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let p: Profile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        p.validate()?;
        Ok(p)
    }

    /// Checks slave ids, function codes, address ranges and scaling.
    pub fn validate(&self) -> Result<(), String> {
        if self.registers.is_empty() {
            return Err("registers: at least one register is required".into());
        }
        for (i, r) in self.registers.iter().enumerate() {
            if !(1..=247).contains(&r.slave) {
                return Err(format!("registers[{i}].slave: must be 1..=247"));
            }
            if !matches!(r.function, 3 | 4) {
                return Err(format!(
                    "registers[{i}].function: must be 3 (holding) or 4 (input)"
                ));
            }
            if r.address.checked_add(r.data_type.registers()).is_none() {
                return Err(format!("registers[{i}].address: the value runs past 65535"));
            }
            if !r.scale.is_finite() || !r.offset.is_finite() {
                return Err(format!(
                    "registers[{i}].scale: scale and offset must be finite"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A `modbus_rtu` device: one serial bus, polled by a register map.
pub struct Config {
    /// The device id records and commands carry.
    pub id: String,
    #[serde(default)]
    /// The serial port path; or give `usb`.
    pub port: Option<String>,
    #[serde(default)]
    /// The USB identity of the bus adapter.
    pub usb: Option<UsbId>,
    /// A profile name in `profiles_dir` or a path to a `.toml` profile.
    pub profile: String,
    #[serde(default = "d_profiles_dir")]
    /// Where profile names are looked up.
    pub profiles_dir: PathBuf,
    #[serde(default = "d_interval", with = "crate::time::serde_duration")]
    /// How often the register map is read.
    pub interval: Duration,
    /// Per request.
    #[serde(default = "d_timeout", with = "crate::time::serde_duration")]
    pub timeout: Duration,
    /// Further attempts after a failed request.
    #[serde(default = "d_retries")]
    pub retries: u32,
    #[serde(default)]
    /// Where the sensors are, copied into each reading.
    pub location: Option<String>,
}

fn d_profiles_dir() -> PathBuf {
    PathBuf::from("devices/profiles")
}
fn d_interval() -> Duration {
    Duration::from_secs(1)
}
fn d_timeout() -> Duration {
    Duration::from_millis(500)
}
fn d_retries() -> u32 {
    2
}

impl Config {
    fn load_profile(&self) -> Result<Profile, String> {
        let path = crate::devices::profile_path(&self.profile, &self.profiles_dir);
        Profile::load(&path)
    }

    /// Checks the port choice and that the profile loads and fits the bus.
    pub fn validate(&self) -> Result<(), (String, String)> {
        crate::devices::serial::check_port_choice(self.port.as_deref(), self.usb.as_ref())?;
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err((
                "interval".into(),
                "interval and timeout must be greater than zero".into(),
            ));
        }
        let p = self
            .load_profile()
            .map_err(|e| ("profile".to_string(), e))?;
        frame(&p).validate()
    }
}

fn frame(p: &Profile) -> Frame {
    Frame {
        baud: p.serial.baud,
        data_bits: p.serial.data_bits,
        parity: p.serial.parity,
        stop_bits: p.serial.stop_bits,
        flow_control: Flow::None,
    }
}

fn open(path: &str, f: &Frame) -> Result<tokio_serial::SerialStream, String> {
    use tokio_serial::{DataBits, Parity as P, StopBits};
    let builder = tokio_serial::new(path, f.baud)
        .data_bits(match f.data_bits {
            5 => DataBits::Five,
            6 => DataBits::Six,
            7 => DataBits::Seven,
            _ => DataBits::Eight,
        })
        .parity(match f.parity {
            Parity::None => P::None,
            Parity::Even => P::Even,
            Parity::Odd => P::Odd,
        })
        .stop_bits(if f.stop_bits == 2 {
            StopBits::Two
        } else {
            StopBits::One
        });
    tokio_serial::SerialStream::open(&builder).map_err(|e| format!("{path}: {e}"))
}

/// Why one register could not be read.
enum ReadError {
    /// The slave answered with a Modbus exception.
    Exception(String),
    /// No (valid) answer in time, or a transport error.
    Transport(String),
}

async fn read_once(
    ctx: &mut Context,
    r: &Register,
    slave: u8,
    timeout: Duration,
) -> Result<Vec<u16>, ReadError> {
    ctx.set_slave(Slave(slave));
    let n = r.data_type.registers();
    let fut = async {
        if r.function == 3 {
            ctx.read_holding_registers(r.address, n).await
        } else {
            ctx.read_input_registers(r.address, n).await
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(ReadError::Transport(format!(
            "no answer within {timeout:?}"
        ))),
        Ok(Err(e)) => Err(ReadError::Transport(e.to_string())),
        Ok(Ok(Err(exception))) => Err(ReadError::Exception(format!("{exception:?}"))),
        Ok(Ok(Ok(regs))) => Ok(regs),
    }
}

/// What every Modbus device polls with.
struct Poll<'a> {
    profile: &'a Profile,
    interval: Duration,
    timeout: Duration,
    retries: u32,
    location: Option<&'a String>,
    /// Modbus TCP: the unit id to address instead of each register's `slave`.
    unit_id: Option<u8>,
}

/// Why polling one connection ended.
enum BusEnd {
    Lost(String),
    Shutdown,
}

/// Polls the register map every interval on an open bus until it is lost or the agent
/// stops; pause/resume/start/stop control polling.
async fn poll_bus(
    p: &Poll<'_>,
    ctx: &mut DeviceCtx,
    bus: &mut Context,
    running: &mut bool,
) -> Result<BusEnd, DeviceError> {
    let mut tick = tokio::time::interval(p.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut consecutive_failures = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick(), if *running => {
                let mut all_failed = true;
                for r in &p.profile.registers {
                    let slave = p.unit_id.unwrap_or(r.slave);
                    let mut last = None;
                    let mut regs = None;
                    for _ in 0..=p.retries {
                        match read_once(bus, r, slave, p.timeout).await {
                            Ok(v) => { regs = Some(v); break; }
                            Err(e) => last = Some(e),
                        }
                    }
                    match (regs, last) {
                        (Some(v), _) => {
                            all_failed = false;
                            let Some(raw) = decode(&v, r.data_type, r.word_order) else { continue };
                            let value = raw * r.scale + r.offset;
                            if !crate::record::usable_value(value) {
                                // An f32 register holding NaN or infinity (a sensor fault).
                                ctx.metrics.count_malformed(&ctx.id);
                                tracing::warn!(device = %ctx.id, register = r.address, value, "register value not usable (NaN, infinite or beyond ±1e100)");
                                continue;
                            }
                            ctx.emit(Draft::new(
                                ctx.id.clone(),
                                Body::SensorReading {
                                    sensor_id: format!("{}.{}", ctx.id, r.name),
                                    sensor_type: r.sensor_type.clone(),
                                    value,
                                    unit: r.unit.clone(),
                                    location: p.location.cloned(),
                                    metadata: [("slave".to_string(), slave.into()), ("register".to_string(), r.address.into())].into_iter().collect(),
                                },
                            ))
                            .await?;
                        }
                        (None, Some(ReadError::Exception(x))) => {
                            all_failed = false; // the slave is there, it refused
                            ctx.metrics.count_error_reply(&ctx.id);
                            tracing::warn!(device = %ctx.id, register = %r.name, exception = %x, "modbus exception");
                        }
                        (None, Some(ReadError::Transport(e))) => {
                            ctx.metrics.count_timeout(&ctx.id);
                            tracing::warn!(device = %ctx.id, register = %r.name, error = %e, "modbus request failed");
                        }
                        (None, None) => {}
                    }
                }
                consecutive_failures = if all_failed { consecutive_failures + 1 } else { 0 };
                if consecutive_failures >= 3 {
                    // The bus or the connection is gone (unplugged adapter, a half-open
                    // or closed socket): open it again.
                    return Ok(BusEnd::Lost("no register answered three polls in a row".into()));
                }
            }
            c = ctx.control.recv() => {
                let Some(c) = c else { return Ok(BusEnd::Shutdown) };
                let reply = if !c.params.is_empty() {
                    Err(format!("{} takes no parameters", c.command.as_str()))
                } else if c.command.is_action() {
                    Err(format!("a Modbus sensor has no {}", c.command.as_str()))
                } else {
                    *running = matches!(c.command, CommandKind::Start | CommandKind::Resume);
                    ctx.set_state(match c.command {
                        CommandKind::Pause => crate::metrics::DeviceState::Paused,
                        CommandKind::Stop => crate::metrics::DeviceState::Idle,
                        _ => crate::metrics::DeviceState::Running,
                    });
                    Ok(if *running { "polling".to_string() } else { "polling stopped".to_string() })
                };
                let _ = c.reply.send(reply);
            }
            () = ctx.shutdown.cancelled() => return Ok(BusEnd::Shutdown),
        }
    }
}

/// Announces a connected bus: state and `device_connected`.
async fn connected(
    ctx: &mut DeviceCtx,
    running: bool,
    at: String,
    profile: &str,
) -> Result<(), DeviceError> {
    ctx.set_state(if running {
        crate::metrics::DeviceState::Running
    } else {
        crate::metrics::DeviceState::Idle
    });
    ctx.device_event(
        "device_connected",
        object([("port", at.into()), ("profile", profile.into())]),
    )
    .await
}

/// `modbus_rtu` entry point: open the serial bus, poll, reopen when it is lost.
pub async fn run(cfg: &Config, ctx: &mut DeviceCtx) -> Result<(), DeviceError> {
    let profile = cfg.load_profile().map_err(DeviceError::Config)?;
    let frame = frame(&profile);
    let poll = Poll {
        profile: &profile,
        interval: cfg.interval,
        timeout: cfg.timeout,
        retries: cfg.retries,
        location: cfg.location.as_ref(),
        unit_id: None,
    };
    let mut backoff = crate::devices::Backoff::default();
    let mut running = true;
    loop {
        let Some((path, stream)) = crate::devices::serial::reconnect(
            ctx,
            cfg.port.as_deref(),
            cfg.usb.as_ref(),
            &mut backoff,
            |p| open(p, &frame),
        )
        .await
        else {
            return Ok(());
        };
        let mut bus = tokio_modbus::client::rtu::attach_slave(stream, Slave(1));
        connected(ctx, running, path, &profile.name).await?;
        match poll_bus(&poll, ctx, &mut bus, &mut running).await? {
            BusEnd::Shutdown => return Ok(()),
            BusEnd::Lost(reason) => ctx.disconnected(reason).await?,
        }
    }
}

/// The Modbus TCP port, used when an address gives none.
pub const MODBUS_TCP_PORT: u16 = 502;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A `modbus_tcp` device: a Modbus TCP sensor, PLC or RTU gateway, polled by a register map.
pub struct TcpConfig {
    /// The device id records and commands carry.
    pub id: String,
    /// `host:port` (port 502 when only a host is given).
    pub address: String,
    /// Address every register with this unit id instead of the profile's `slave`
    /// (devices that answer one unit id only, often 1 or 255). Unset: the profile's, as
    /// behind an RTU gateway.
    #[serde(default)]
    pub unit_id: Option<u8>,
    /// A profile name in `profiles_dir` or a path to a `.toml` profile (the serial
    /// settings in it are not used).
    pub profile: String,
    #[serde(default = "d_profiles_dir")]
    /// Where profile names are looked up.
    pub profiles_dir: PathBuf,
    #[serde(default = "d_interval", with = "crate::time::serde_duration")]
    /// How often the register map is read.
    pub interval: Duration,
    /// Per request.
    #[serde(default = "d_timeout", with = "crate::time::serde_duration")]
    pub timeout: Duration,
    /// Further attempts after a failed request.
    #[serde(default = "d_retries")]
    pub retries: u32,
    #[serde(default)]
    /// Where the sensors are, copied into each reading.
    pub location: Option<String>,
}

impl TcpConfig {
    fn load_profile(&self) -> Result<Profile, String> {
        let path = crate::devices::profile_path(&self.profile, &self.profiles_dir);
        Profile::load(&path)
    }

    /// Checks the address, the timings and that the profile loads.
    pub fn validate(&self) -> Result<(), (String, String)> {
        crate::devices::net::check_address(&self.address)?;
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err((
                "interval".into(),
                "interval and timeout must be greater than zero".into(),
            ));
        }
        self.load_profile()
            .map(|_| ())
            .map_err(|e| ("profile".to_string(), e))
    }
}

/// `modbus_tcp` entry point: connect (keepalive on), poll, reconnect with backoff when
/// the connection is refused, dropped or half-open.
pub async fn run_tcp(cfg: &TcpConfig, ctx: &mut DeviceCtx) -> Result<(), DeviceError> {
    let profile = cfg.load_profile().map_err(DeviceError::Config)?;
    let poll = Poll {
        profile: &profile,
        interval: cfg.interval,
        timeout: cfg.timeout,
        retries: cfg.retries,
        location: cfg.location.as_ref(),
        unit_id: cfg.unit_id,
    };
    let address = crate::devices::net::with_port(&cfg.address, MODBUS_TCP_PORT);
    let mut backoff = crate::devices::Backoff::default();
    let mut running = true;
    loop {
        let stream = ctx
            .retry_open(&mut backoff, || {
                let a = address.clone();
                async move {
                    let (s, _) = tokio::task::spawn_blocking(move || crate::devices::net::open(&a))
                        .await
                        .map_err(|e| format!("connect task: {e}"))??;
                    s.set_nonblocking(true).map_err(|e| e.to_string())?;
                    tokio::net::TcpStream::from_std(s).map_err(|e| e.to_string())
                }
            })
            .await;
        let Some(stream) = stream else {
            return Ok(());
        };
        let mut bus = tokio_modbus::client::tcp::attach_slave(stream, Slave(1));
        connected(ctx, running, format!("tcp://{address}"), &profile.name).await?;
        match poll_bus(&poll, ctx, &mut bus, &mut running).await? {
            BusEnd::Shutdown => return Ok(()),
            BusEnd::Lost(reason) => {
                ctx.disconnected(reason.clone()).await?;
                if !ctx.wait_unreachable(backoff.step(), &reason).await {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_in_every_word_order() {
        // docs/protocols.md §5: 23.5 as f32 is 0x41BC_0000.
        assert_eq!(
            decode(&[0x41BC, 0x0000], DataType::F32, WordOrder::Abcd),
            Some(23.5)
        );
        assert_eq!(
            decode(&[0x0000, 0x41BC], DataType::F32, WordOrder::Cdab),
            Some(23.5)
        );
        assert_eq!(
            decode(&[0xBC41, 0x0000], DataType::F32, WordOrder::Badc),
            Some(23.5)
        );
        assert_eq!(
            decode(&[0x0000, 0xBC41], DataType::F32, WordOrder::Dcba),
            Some(23.5)
        );
    }

    #[test]
    fn sixteen_bit_values_and_scale() {
        assert_eq!(
            decode(&[0x00EB], DataType::I16, WordOrder::Abcd).map(|v| v * 0.1),
            Some(23.5)
        );
        assert_eq!(
            decode(&[0xFF38], DataType::I16, WordOrder::Abcd),
            Some(-200.0)
        );
        assert_eq!(
            decode(&[0xFF38], DataType::U16, WordOrder::Abcd),
            Some(65336.0)
        );
        assert_eq!(
            decode(&[0x0001, 0x0000], DataType::U32, WordOrder::Abcd),
            Some(65536.0)
        );
        assert_eq!(
            decode(&[0x0001, 0x0000], DataType::U32, WordOrder::Cdab),
            Some(1.0)
        );
        assert_eq!(
            decode(&[0xFFFF, 0xFFFF], DataType::I32, WordOrder::Abcd),
            Some(-1.0)
        );
        let one = 1.0f64.to_be_bytes();
        let regs: Vec<u16> = one
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(decode(&regs, DataType::F64, WordOrder::Abcd), Some(1.0));
        assert_eq!(
            decode(&[1, 2, 3], DataType::F32, WordOrder::Abcd),
            None,
            "wrong count"
        );
    }

    #[test]
    fn shipped_profile_is_valid_and_bad_ones_name_the_key() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("devices/profiles/modbus-th-sensor.toml");
        let p = Profile::load(&path).unwrap();
        assert_eq!(p.registers.len(), 3);
        let mut bad = p.clone();
        bad.registers[1].function = 6;
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("registers[1].function"));
        let mut bad = p;
        bad.registers[0].slave = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("registers[0].slave"));
    }
}
