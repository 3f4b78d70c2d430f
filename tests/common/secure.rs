//! Secured Kafka for tests: certificates made with the `openssl` CLI, a TLS terminator
//! (socat) in front of tansu (whose CLI cannot switch TLS on), and client settings for
//! the test's own readers and senders.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;

/// In `<dir>/certs`: a private CA, a broker certificate for `localhost`/127.0.0.1, a client certificate
/// (its key encrypted with [`Certs::KEY_PASSWORD`]), an expired broker certificate, and
/// a second CA that signed none of them.
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub const KEY_PASSWORD: &'static str = "client-key-secret";

    pub fn make(dir: &Path) -> Certs {
        let dir = dir.join("certs");
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl must be installed (scripts/test installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "30",
                "-subj",
                &format!("/CN=labgate test {ca}"),
            ]);
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        // `-days -1`: valid until a day before it was made, i.e. expired.
        for (out, days) in [("server.pem", "30"), ("server-expired.pem", "-1")] {
            run(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                out,
                "-days",
                days,
                "-extfile",
                "server.ext",
            ]);
        }
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=labgate-agent",
            "-passout",
            &format!("pass:{}", Self::KEY_PASSWORD),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "30",
            "-extfile",
            "client.ext",
        ]);
        std::fs::write(
            dir.join("client-key-password"),
            format!("{}\n", Self::KEY_PASSWORD),
        )
        .unwrap();
        // Readable by brokers that drop privileges (mosquitto): these are test keys.
        for e in std::fs::read_dir(&dir).unwrap() {
            use std::os::unix::fs::PermissionsExt;
            let p = e.unwrap().path();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        Certs { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A free port kept bound until its user takes it, so that tests running in parallel
/// cannot be handed the same one meanwhile (the broker is told to advertise it before
/// the TLS terminator listens on it).
pub struct PortHold {
    listener: Option<std::net::TcpListener>,
    pub port: u16,
}

pub fn hold_port() -> PortHold {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = listener.local_addr().expect("local addr").port();
    PortHold {
        listener: Some(listener),
        port,
    }
}

/// socat terminating TLS on `port` and forwarding to a broker.
pub struct TlsFront {
    child: Option<Child>,
    pub port: u16,
}

impl TlsFront {
    /// On the held port. `client_certs`: require a client certificate signed by the CA
    /// (mutual TLS).
    pub fn start(
        mut hold: PortHold,
        certs: &Certs,
        server_cert: &str,
        broker_port: u16,
        client_certs: bool,
    ) -> TlsFront {
        drop(hold.listener.take());
        TlsFront::on(hold.port, certs, server_cert, broker_port, client_certs)
    }

    /// On a port the test already had (a renewed certificate on the same address).
    pub fn on(
        port: u16,
        certs: &Certs,
        server_cert: &str,
        broker_port: u16,
        client_certs: bool,
    ) -> TlsFront {
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},cafile={},verify={}",
            certs.path(server_cert),
            certs.path("server.key"),
            certs.path("ca.pem"),
            u8::from(client_certs)
        );
        let mut child = Command::new("socat")
            .args([listen.as_str(), &format!("TCP:127.0.0.1:{broker_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat must be installed (scripts/test installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "socat did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        // A socat that could not bind exits at once: then what answered was not ours.
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "socat could not listen on {port} (port taken?)"
        );
        TlsFront {
            child: Some(child),
            port,
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How a test's own clients (and the agent's config) reach a secured broker.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// librdkafka properties for the test's clients.
    pub props: Vec<(String, String)>,
    /// The same, as lines of the agent's `[kafka]` section.
    pub toml: String,
}

impl Security {
    pub fn client(&self, brokers: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        for (k, v) in &self.props {
            c.set(k, v);
        }
        c
    }

    /// TLS with the test CA; with `mtls` the agent's client certificate too (its key
    /// password from a file).
    pub fn tls(certs: &Certs, mtls: bool, sasl: Option<(&str, &str, &str)>) -> Security {
        let mut s = Security::default();
        let protocol = if sasl.is_some() { "SASL_SSL" } else { "SSL" };
        s.props
            .push(("security.protocol".into(), protocol.to_lowercase()));
        s.props
            .push(("ssl.ca.location".into(), certs.path("ca.pem")));
        s.toml = format!(
            "security_protocol = \"{protocol}\"\nssl_ca_file = \"{}\"\n",
            certs.path("ca.pem")
        );
        if mtls {
            s.props
                .push(("ssl.certificate.location".into(), certs.path("client.pem")));
            s.props
                .push(("ssl.key.location".into(), certs.path("client.key")));
            s.props
                .push(("ssl.key.password".into(), Certs::KEY_PASSWORD.into()));
            s.toml.push_str(&format!(
                "ssl_cert_file = \"{}\"\nssl_key_file = \"{}\"\nssl_key_password_file = \"{}\"\n",
                certs.path("client.pem"),
                certs.path("client.key"),
                certs.path("client-key-password"),
            ));
        }
        if let Some((mechanism, user, password)) = sasl {
            s.add_sasl(mechanism, user, password);
        }
        s
    }

    /// SASL without TLS.
    pub fn sasl_plaintext(mechanism: &str, user: &str, password: &str) -> Security {
        let mut s = Security::default();
        s.props
            .push(("security.protocol".into(), "sasl_plaintext".into()));
        s.toml = "security_protocol = \"sasl_plaintext\"\n".into();
        s.add_sasl(mechanism, user, password);
        s
    }

    fn add_sasl(&mut self, mechanism: &str, user: &str, password: &str) {
        self.props.push(("sasl.mechanism".into(), mechanism.into()));
        self.props.push(("sasl.username".into(), user.into()));
        self.props.push(("sasl.password".into(), password.into()));
        self.toml.push_str(&format!(
            "sasl_mechanism = \"{mechanism}\"\nsasl_username = \"{user}\"\nsasl_password = \"{password}\"\n"
        ));
    }
}
