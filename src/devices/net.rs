//! Instruments on the lab network: a TCP connection with the same line handling as a
//! serial port (SCPI raw sockets, port 5025 by convention).
//!
//! A refused or unreachable address is retried with backoff. A connection that dies
//! without a word (a switched-off instrument, a pulled cable: the socket stays open on
//! this side) is found by TCP keepalive ([`KEEPALIVE_IDLE`], then [`KEEPALIVE_INTERVAL`]
//! probes) and, for polled instruments, by unanswered polls (the line driver gives up
//! after [`crate::devices::line::driver::SILENT_POLLS_LOST`] in a row).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use tokio::sync::mpsc;

use super::serial::{spawn_reader, Link};
use super::{Backoff, DeviceCtx};

/// The SCPI raw-socket port, used when an address gives none.
pub const SCPI_PORT: u16 = 5025;
/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between keepalive probes (three unanswered probes end the connection).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// `host:port`, or `host` with [`SCPI_PORT`]; `[v6]:port` for IPv6.
pub fn with_port(address: &str, default_port: u16) -> String {
    let a = address.trim();
    let has_port = match a.rsplit_once(':') {
        Some((host, port)) => {
            (!host.contains(':') || host.ends_with(']')) && port.parse::<u16>().is_ok()
        }
        None => false,
    };
    if has_port {
        a.to_string()
    } else {
        format!("{a}:{default_port}")
    }
}

/// Checks an `address` value; the error is for the `address` key.
pub fn check_address(address: &str) -> Result<(), (String, String)> {
    let a = address.trim();
    let (host, port) = match a.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => (h, Some(p.strip_prefix(':').unwrap_or("x"))),
            None => ("", None),
        },
        None => match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        },
    };
    let bad_host = host.is_empty()
        || host.contains(char::is_whitespace)
        || (!a.starts_with('[') && host.contains(':'));
    let bad_port = port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0));
    if bad_host || bad_port {
        return Err((
            "address".into(),
            format!("{address:?} is not host or host:port (port 1-65535)"),
        ));
    }
    Ok(())
}

fn connect_blocking(address: &str) -> Result<(TcpStream, SocketAddr), String> {
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| format!("{address}: cannot resolve: {e}"))?
        .collect();
    let mut last = format!("{address}: no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok((s, addr)),
            Err(e) => last = format!("{address} ({addr}): {e}"),
        }
    }
    Err(last)
}

/// Connects, with keepalive, no Nagle delay and a short read timeout (so the reader
/// thread notices when the driver has gone).
pub fn open(address: &str) -> Result<(TcpStream, TcpStream), String> {
    let (stream, _) = connect_blocking(address)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(3);
    let sock = socket2::SockRef::from(&stream);
    sock.set_tcp_keepalive(&keepalive)
        .map_err(|e| format!("{address}: keepalive: {e}"))?;
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_millis(100))))
        .and_then(|()| stream.set_write_timeout(Some(CONNECT_TIMEOUT)))
        .map_err(|e| format!("{address}: {e}"))?;
    let reader = stream
        .try_clone()
        .map_err(|e| format!("{address}: cannot clone the socket: {e}"))?;
    Ok((stream, reader))
}

/// Connects to `address` (default port `default_port`), retrying with `backoff` until it
/// answers; the read half on a reader thread. None when the agent shuts down first.
pub async fn connect(
    ctx: &mut DeviceCtx,
    address: &str,
    default_port: u16,
    backoff: &mut Backoff,
) -> Option<Link> {
    let address = with_port(address, default_port);
    let (writer, reader) = ctx
        .retry_open(backoff, || {
            let a = address.clone();
            async move {
                tokio::task::spawn_blocking(move || open(&a))
                    .await
                    .map_err(|e| format!("connect task: {e}"))?
            }
        })
        .await?;
    let (tx, lines) = mpsc::channel(1024);
    spawn_reader(reader, tx);
    Some(Link {
        path: format!("tcp://{address}"),
        writer: Box::new(writer),
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_the_scpi_port_when_they_name_none() {
        assert_eq!(with_port("10.0.0.7", SCPI_PORT), "10.0.0.7:5025");
        assert_eq!(with_port("dmm.lab:5555", SCPI_PORT), "dmm.lab:5555");
        assert_eq!(with_port("[fe80::1]:5025", SCPI_PORT), "[fe80::1]:5025");
        assert_eq!(with_port("[fe80::1]", 502), "[fe80::1]:502");
        assert!(check_address("dmm.lab").is_ok());
        for bad in ["", ":5025", "host:0", "host:99999", "a b:1"] {
            assert!(check_address(bad).is_err(), "{bad:?}");
        }
    }
}
