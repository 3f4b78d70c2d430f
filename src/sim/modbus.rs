//! A Modbus RTU slave on a pty, or a Modbus TCP server on a port (tokio-modbus' servers),
//! serving the register map of
//! `devices/profiles/modbus-th-sensor.toml`: slave 1, input registers 0 (temperature,
//! i16 tenths) and 1 (humidity, u16 tenths), holding registers 10–11 (pressure, f32
//! word-swapped). Unmapped addresses answer IllegalDataAddress, other slaves stay silent,
//! and a ServerDeviceBusy exception can be injected.

use std::future;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_modbus::server::Service;

/// Values served.
pub const TEMPERATURE_TENTHS: i16 = 235;
/// Humidity register, tenths of a percent.
pub const HUMIDITY_TENTHS: u16 = 455;
/// Pressure register pair, hPa as an f32.
pub const PRESSURE_HPA: f32 = 1013.25;

struct Slave {
    requests: Arc<AtomicU32>,
    busy_every: u32,
}

impl Service for Slave {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Self::Response, Self::Exception>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        if req.slave != 1 {
            return future::ready(Ok(None)); // not us: a real bus stays silent
        }
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if self.busy_every > 0 && n % self.busy_every == 0 {
            return future::ready(Err(ExceptionCode::ServerDeviceBusy));
        }
        let p = PRESSURE_HPA.to_bits();
        let holding = |addr: u16| match addr {
            10 => Some((p & 0xFFFF) as u16), // word-swapped: low word first
            11 => Some((p >> 16) as u16),
            _ => None,
        };
        let input = |addr: u16| match addr {
            0 => Some(TEMPERATURE_TENTHS as u16),
            1 => Some(HUMIDITY_TENTHS),
            _ => None,
        };
        let read = |f: &dyn Fn(u16) -> Option<u16>, addr: u16, cnt: u16| -> Option<Vec<u16>> {
            (0..cnt).map(|i| addr.checked_add(i).and_then(f)).collect()
        };
        let res = match req.request {
            Request::ReadInputRegisters(a, c) => {
                read(&input, a, c).map(Response::ReadInputRegisters)
            }
            Request::ReadHoldingRegisters(a, c) => {
                read(&holding, a, c).map(Response::ReadHoldingRegisters)
            }
            _ => return future::ready(Err(ExceptionCode::IllegalFunction)),
        };
        future::ready(res.map(Some).ok_or(ExceptionCode::IllegalDataAddress))
    }
}

/// A running simulator; dropping it closes the pty.
pub struct ModbusSim {
    handle: super::Handle,
    requests: Arc<AtomicU32>,
}

impl ModbusSim {
    /// `busy_every`: answer every Nth request with ServerDeviceBusy (0 = never).
    pub fn start(busy_every: u32, link: Option<&Path>) -> std::io::Result<ModbusSim> {
        let (master, path) = super::open_pty(link)?;
        let holder = super::hold_slave(&path)?;
        let requests = Arc::new(AtomicU32::new(0));
        let service = Slave {
            requests: requests.clone(),
            busy_every,
        };
        let handle = serve_on_thread("modbus-sim", path, link, move |ready, stopped| async move {
            // The async serial stream must be made inside the runtime.
            let stream = match tokio_serial::SerialStream::try_from(master) {
                Ok(s) => s,
                Err(e) => return ready(Err(std::io::Error::other(e))),
            };
            ready(Ok(()));
            let server = tokio_modbus::server::rtu::Server::new(stream);
            let stop = async move {
                let _ = stopped.await;
            };
            if let Err(e) = server.serve_until(service, stop).await {
                eprintln!("modbus simulator stopped: {e}");
            }
            drop(holder);
        })?;
        Ok(ModbusSim { handle, requests })
    }

    /// The pty a driver opens.
    pub fn path(&self) -> &Path {
        self.handle.path()
    }

    /// Requests addressed to slave 1 so far.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Closes the pty, as unplugging the adapter would.
    pub fn unplug(self) {
        drop(self.handle);
    }

    /// A Modbus TCP server on `addr` (`127.0.0.1:0` for a free port) with the same
    /// register map; unit id 1 answers. Dropping it closes the listener and every
    /// connection (the device switched off). [`ModbusSim::path`] is its address.
    pub fn listen(busy_every: u32, addr: &str) -> std::io::Result<ModbusSim> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let requests = Arc::new(AtomicU32::new(0));
        let counter = requests.clone();
        let path = std::path::PathBuf::from(local.to_string());
        let handle = serve_on_thread(
            "modbus-tcp-sim",
            path,
            None,
            move |ready, stopped| async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return ready(Err(e)),
                };
                ready(Ok(()));
                let server = tokio_modbus::server::tcp::Server::new(listener);
                let on_connected = |stream, socket_addr| {
                    let requests = counter.clone();
                    async move {
                        tokio_modbus::server::tcp::accept_tcp_connection(
                            stream,
                            socket_addr,
                            |_| {
                                Ok(Some(Slave {
                                    requests: requests.clone(),
                                    busy_every,
                                }))
                            },
                        )
                    }
                };
                let stop = async move {
                    let _ = stopped.await;
                };
                if let Err(e) = server.serve_until(&on_connected, |_| {}, stop).await {
                    eprintln!("modbus TCP simulator stopped: {e}");
                }
            },
        )?;
        Ok(ModbusSim { handle, requests })
    }
}

/// Tells [`serve_on_thread`] the server is set up (or why it is not).
type Ready = Box<dyn FnOnce(std::io::Result<()>) + Send>;

/// Runs `serve` on a thread of its own with a current-thread runtime (tokio-modbus'
/// servers are async). `serve` calls its first argument once set up (or failed), which
/// this waits for, and ends when its second one (the stop signal) fires; the returned
/// handle stops it when dropped.
fn serve_on_thread<F, Fut>(
    name: &str,
    path: std::path::PathBuf,
    link: Option<&Path>,
    serve: F,
) -> std::io::Result<super::Handle>
where
    F: FnOnce(Ready, tokio::sync::oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let ready: Ready = Box::new(move |r| {
                let _ = ready_tx.send(r);
            });
            rt.block_on(serve(ready, stopped));
        })?;
    ready_rx
        .recv()
        .map_err(|_| std::io::Error::other("modbus simulator thread ended during set-up"))??;
    Ok(super::Handle::new(path, link, thread, move || {
        let _ = stop.send(());
    }))
}
