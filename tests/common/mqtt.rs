//! A real mosquitto on a free port, owned by one test, and an MQTT client for tests.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{free_port, tempdir};

/// Finds mosquitto: `$MOSQUITTO_BIN`, `/usr/sbin/mosquitto`, then `PATH`.
pub fn mosquitto_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MOSQUITTO_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates = vec![PathBuf::from("/usr/sbin/mosquitto")];
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|d| d.join("mosquitto")));
    }
    candidates.into_iter().find(|p| p.is_file()).expect(
        "mosquitto not found (MOSQUITTO_BIN, /usr/sbin, PATH): run scripts/test, which installs it",
    )
}

/// A real mosquitto broker on a free port, with persistence (so a restart keeps
/// sessions and queued QoS 1 messages, as a production broker should).
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Mosquitto {
    /// The broker's process id (for its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn start() -> Mosquitto {
        Mosquitto::start_with(|_| String::new())
    }

    /// With more configuration (e.g. a TLS listener) ahead of the default listener, given
    /// the broker's state dir.
    pub fn start_with(extra: impl FnOnce(&Path) -> String) -> Mosquitto {
        let dir = tempdir();
        let port = free_port();
        let conf = format!(
            "{}listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 1\nmax_queued_messages 1000000\nmax_inflight_messages 1000\nlog_dest file {}/mosquitto.log\n",
            extra(dir.path()),
            dir.path().display(),
            dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("mosquitto.conf");
        // mosquitto started as root drops to the `mosquitto` user: let it write its
        // persistence file and log here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod mosquitto dir");
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .spawn()
            .expect("cannot start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mosquitto did not listen on {}", self.port);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGTERM (mosquitto saves its state), then start again on the same port.
    pub fn restart(&mut self, down_for: Duration) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        std::thread::sleep(down_for);
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// (topic, payload) of every message a test client received.
pub type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// An MQTT client for tests (rumqttc, its own thread): publishes QoS 1 on a persistent
/// session and records what arrives on its subscriptions.
pub struct MqttClient {
    pub client: rumqttc::Client,
    pub received: Received,
    pub acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl MqttClient {
    pub fn connect(url: &str, client_id: &str) -> MqttClient {
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_inflight(200);
        let (client, mut conn) = rumqttc::Client::new(o, 10_000);
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (r, a) = (received.clone(), acked.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || loop {
            match conn.recv() {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                    r.lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => {
                    a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                Err(_) => return,
            }
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("test MQTT client did not connect");
        MqttClient {
            client,
            received,
            acked,
        }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
            .expect("publish");
    }

    pub fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .expect("subscribe");
    }

    pub fn wait_acked(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acked.load(std::sync::atomic::Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "broker acked {} of {n} publishes",
                self.acked.load(std::sync::atomic::Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Queues `n` QoS 1 messages on `bench/s<i % 10>/v` (payloads `<i % 1000>.5`), from a
/// client named `client_id`, and waits until the broker has acked them all.
pub fn publish_backlog(url: &str, n: u64, client_id: &str) {
    let p = MqttClient::connect(url, client_id);
    let before = p.acked.load(std::sync::atomic::Ordering::Relaxed);
    for i in 0..n {
        p.publish(
            &format!("bench/s{}/v", i % 10),
            format!("{}.5", i % 1000),
            false,
        );
    }
    p.wait_acked(before + n, Duration::from_secs(900));
}
