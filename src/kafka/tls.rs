//! Why a TLS handshake failed, in OpenSSL's own words.
//!
//! librdkafka reports a broker certificate it cannot verify as "certificate verify
//! failed: broker certificate could not be verified", whatever the reason: an untrusted
//! CA, an expired certificate, a name that does not match. To tell the user which, the
//! agent makes one handshake of its own to the first bootstrap server with the same CA
//! file and hostname rule, and reads OpenSSL's verify result ("certificate has expired",
//! "self-signed certificate in certificate chain" …). At most one such probe runs at a
//! time and its answer is kept for [`PROBE_EVERY`].

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::KafkaConfig;
use crate::metrics::Metrics;

/// How long a probe's answer is used before the next failure probes again.
pub const PROBE_EVERY: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether librdkafka's text says the broker's certificate failed verification.
pub fn is_verify_failure(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("certificate verify failed") || t.contains("could not be verified")
}

/// Shared by the clients' error callbacks.
pub struct TlsProbe {
    config: KafkaConfig,
    running: AtomicBool,
    last: Mutex<Option<(Instant, String)>>,
}

impl TlsProbe {
    /// A probe for the brokers and TLS settings of `config`.
    pub fn new(config: &KafkaConfig) -> Arc<TlsProbe> {
        Arc::new(TlsProbe {
            config: config.clone(),
            running: AtomicBool::new(false),
            last: Mutex::new(None),
        })
    }

    /// OpenSSL's verify result from the last probe, if recent. Starts a probe (on a
    /// thread of its own: this runs in librdkafka's callbacks) when there is none;
    /// when it finishes it reports its refined cause through `on_done`.
    pub fn explain(
        self: &Arc<Self>,
        metrics: &Arc<Metrics>,
        client: &'static str,
        error: rdkafka::error::KafkaError,
        reason: String,
    ) -> Option<String> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some((at, text)) = &last {
            if at.elapsed() < PROBE_EVERY {
                return Some(text.clone());
            }
        }
        if !self.running.swap(true, Relaxed) {
            let me = self.clone();
            let metrics = metrics.clone();
            let spawned = std::thread::Builder::new()
                .name("labgate-tls-probe".into())
                .spawn(move || {
                    let text = probe(&me.config).unwrap_or_default();
                    *me.last.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), text.clone()));
                    me.running.store(false, Relaxed);
                    if !text.is_empty() {
                        if let Some(cause) = super::refusal_cause(
                            &error,
                            &format!("{reason}; agent's own handshake: {text}"),
                        ) {
                            metrics.note_refusal(&cause, client);
                        }
                    }
                });
            if spawned.is_err() {
                self.running.store(false, Relaxed);
            }
        }
        last.map(|(_, t)| t)
    }
}

/// One TLS handshake with the first bootstrap server under `k`'s CA and hostname rule;
/// returns OpenSSL's error text, or `None` when the handshake succeeds or cannot be
/// tried (no server reachable).
pub fn probe(k: &KafkaConfig) -> Option<String> {
    let server = k.bootstrap_servers.split(',').next()?.trim();
    let (host, _) = server.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut b = native_tls::TlsConnector::builder();
    if let Some(ca) = &k.ssl_ca_file {
        let pem = std::fs::read(ca).ok()?;
        let cert = native_tls::Certificate::from_pem(&pem).ok()?;
        b.add_root_certificate(cert).disable_built_in_roots(true);
    }
    b.danger_accept_invalid_hostnames(!k.ssl_verify_hostname);
    let connector = b.build().ok()?;
    // `localhost` may resolve to ::1 first while the broker listens on 127.0.0.1.
    let tcp = server
        .to_socket_addrs()
        .ok()?
        .find_map(|addr| TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok())?;
    tcp.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    tcp.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
    match connector.connect(host, tcp) {
        Ok(_) => None,
        Err(native_tls::HandshakeError::Failure(e)) => Some(e.to_string()),
        Err(native_tls::HandshakeError::WouldBlock(_)) => None,
    }
}
