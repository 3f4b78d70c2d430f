//! A real tansu broker on a free port, owned by one test, and topic helpers.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;

/// Finds the tansu binary: `$TANSU_BIN`, then `PATH`, then `~/.cargo/bin`.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("tansu");
            if p.is_file() {
                return p;
            }
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = Path::new(&home).join(".cargo/bin/tansu");
    assert!(
        p.is_file(),
        "tansu not found (TANSU_BIN, PATH, ~/.cargo/bin): run scripts/test, which installs it"
    );
    p
}

/// A loopback port no other test of this process has been given.
pub fn free_port() -> u16 {
    // Tests run as threads of one process: the kernel may offer a port it just offered
    // another test that has not bound it yet, and two agents then race for one HTTP
    // port. Each port is handed out once per process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// How [`Broker::start_with`] starts tansu.
#[derive(Debug, Clone, Default)]
pub struct TansuOptions {
    /// Listen here (0: a free port).
    pub port: u16,
    /// Advertise this port instead (a TLS terminator in front of the broker).
    pub advertised: Option<u16>,
    /// Keep data and users in `tansu.db` in this directory (tansu needs the `libsql`
    /// feature); memory storage when unset.
    pub sqlite_dir: Option<PathBuf>,
    /// Require SASL (SCRAM) authentication.
    pub authentication: bool,
    /// Validate produced messages against `DIR/<topic>.json` (`--schema-registry`).
    pub schema_dir: Option<PathBuf>,
}

/// A tansu broker (memory storage) owned by one test.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Broker {
        Broker::start_with(&TansuOptions {
            port,
            ..TansuOptions::default()
        })
    }

    /// A broker as `o` says: its port, the port it advertises (a TLS terminator's),
    /// SQLite storage in a directory (users persist across restarts), authentication.
    pub fn start_with(o: &TansuOptions) -> Broker {
        let port = if o.port == 0 { free_port() } else { o.port };
        let log = std::env::temp_dir().join(format!("tansu-{port}.log"));
        let out = std::fs::File::create(&log).expect("tansu log");
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{}", o.advertised.unwrap_or(port));
        let mut cmd = Command::new(tansu_bin());
        cmd.arg("broker");
        match &o.sqlite_dir {
            // tansu reads a relative sqlite path against its working directory
            // (an absolute `sqlite:///…` is misread).
            Some(dir) => {
                cmd.current_dir(dir)
                    .args(["--storage-engine", "sqlite://tansu.db"]);
            }
            None => {
                cmd.args(["--storage-engine", "memory://tansu/"]);
            }
        }
        cmd.args([
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
        ]);
        if o.authentication {
            cmd.arg("--authentication");
        }
        if let Some(dir) = &o.schema_dir {
            // tansu reads the path of a `file://` URL against its working directory too.
            assert!(o.sqlite_dir.is_none(), "one working directory for tansu");
            cmd.current_dir(dir).args(["--schema-registry", "file://."]);
        }
        let child = cmd
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("cannot start tansu");
        let b = Broker {
            child: Some(child),
            port,
            log,
        };
        b.wait_listening();
        b
    }

    /// Creates a SCRAM user (`tansu user create`; the broker must not require
    /// authentication yet).
    pub fn create_user(&self, name: &str, password: &str, mechanism: &str) {
        let out = Command::new(tansu_bin())
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--mechanism",
                mechanism,
                name,
                password,
            ])
            .output()
            .expect("tansu user create");
        assert!(
            out.status.success(),
            "tansu user create {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "tansu did not listen on {} (log: {})",
            self.port,
            self.log.display()
        );
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    fn signal(&self, sig: &str) {
        signal_process(self.pid(), sig);
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn stall(&self) {
        self.signal("-STOP");
    }

    pub fn unstall(&self) {
        self.signal("-CONT");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn create_topics(&self, topics: &[&str]) {
        create_topics(&self.addr(), topics);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.stop();
    }
}

/// Sends `sig` (`-STOP`, `-CONT` …) to process `pid`; fails the caller if it cannot.
pub fn signal_process(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

pub fn create_topics(addr: &str, topics: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()
        .expect("admin");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let res = rt
        .block_on(admin.create_topics(&new, &AdminOptions::new()))
        .expect("create topics");
    for r in res {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => panic!("create topic {t}: {e}"),
        }
    }
}

/// Topic names unique to one test.
#[derive(Clone, Debug)]
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn new() -> Topics {
        Topics {
            prefix: format!("t{}", uuid::Uuid::new_v4().simple()),
        }
    }
    pub fn events(&self) -> String {
        format!("{}_events", self.prefix)
    }
    pub fn data(&self) -> String {
        format!("{}_data", self.prefix)
    }
    pub fn agent_events(&self) -> String {
        format!("{}_agent_events", self.prefix)
    }
    pub fn status(&self) -> String {
        format!("{}_status", self.prefix)
    }
    pub fn sensors(&self) -> String {
        format!("{}_sensors", self.prefix)
    }
    pub fn alerts(&self) -> String {
        format!("{}_alerts", self.prefix)
    }
    pub fn commands(&self) -> String {
        format!("{}_commands", self.prefix)
    }
    pub fn results(&self) -> String {
        format!("{}_results", self.prefix)
    }
    pub fn aggregates(&self) -> String {
        format!("{}_aggregates", self.prefix)
    }
    pub fn outputs(&self) -> Vec<String> {
        vec![
            self.events(),
            self.agent_events(),
            self.data(),
            self.sensors(),
            self.alerts(),
            self.results(),
            self.aggregates(),
        ]
    }
    pub fn toml(&self) -> String {
        format!(
            "[kafka.topics]\nevents = \"{}\"\nagent_events = \"{}\"\nstatus = \"{}\"\ndata = \"{}\"\nsensors = \"{}\"\nalerts = \"{}\"\ncommands = \"{}\"\ncommand_results = \"{}\"\naggregates = \"{}\"\n",
            self.events(),
            self.agent_events(),
            self.status(),
            self.data(),
            self.sensors(),
            self.alerts(),
            self.commands(),
            self.results(),
            self.aggregates()
        )
    }
}
