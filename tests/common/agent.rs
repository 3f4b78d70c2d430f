//! The real `labgate` binary running a test's config, and that config.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Topics;

/// An agent config for a test: brokers, topics, a data dir, a free HTTP port, and the
/// given extra sections (buffer, devices). Unsigned commands are allowed unless the
/// extra sections bring a `[commands]` section of their own.
pub fn agent_config(
    dir: &Path,
    agent_id: &str,
    brokers: &str,
    topics: &Topics,
    http: u16,
    extra: &str,
) -> String {
    agent_config_kafka(dir, agent_id, brokers, topics, http, "", extra)
}

/// As [`agent_config`], with `kafka_extra` lines in the `[kafka]` section (security,
/// intervals).
pub fn agent_config_kafka(
    dir: &Path,
    agent_id: &str,
    brokers: &str,
    topics: &Topics,
    http: u16,
    kafka_extra: &str,
    extra: &str,
) -> String {
    let commands = if extra.contains("[commands]") {
        ""
    } else {
        "[commands]\nallow_unsigned = true\n"
    };
    format!(
        r#"[agent]
agent_id = "{agent_id}"
data_dir = "{}"
shutdown_grace = "5s"

[kafka]
bootstrap_servers = "{brokers}"
create_topics = true
commands_offset_reset = "latest"
{kafka_extra}
{}
[http]
listen = "127.0.0.1:{http}"

[log]
level = "info,labgate=debug"

{commands}
{extra}
"#,
        dir.join("data").display(),
        topics.toml()
    )
}

/// `LABGATE_AGENT_ENV="K=V K2=V2"`: variables for the agent process only, not for the
/// test or the brokers it starts. How BENCHMARKS.md's memory breakdown was taken:
/// `LD_PRELOAD=…/libheaptrack_preload.so DUMP_HEAPTRACK_OUTPUT=/tmp/agent.raw`.
fn profiler_env() -> Vec<(String, String)> {
    std::env::var("LABGATE_AGENT_ENV")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `labgate` binary the tests and benches run: `LABGATE_BIN` when it is set, else
/// this build's. scripts/bench sets it to the `cargo build --release` binary, the one
/// that ships: `cargo bench` builds under the `bench` profile, whose symbol hashes differ
/// from the release profile's, and `link/hot-text.ld` names the release build's.
pub fn labgate_bin() -> PathBuf {
    std::env::var_os("LABGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_labgate")))
}

/// The real `labgate` binary running a config.
pub struct Agent {
    child: Option<Child>,
    /// The binary: this build's `labgate` unless [`Agent::start_bin`] named another.
    bin: PathBuf,
    /// Environment variables the process gets beside the test's own.
    pub env: Vec<(String, String)>,
    pub http: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path, config: &str) -> Agent {
        Agent::start_with_env(dir, config, &[])
    }

    /// As [`Agent::start`], with these environment variables set for the process.
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Agent {
        Agent::start_bin(&labgate_bin(), dir, config, env)
    }

    /// As [`Agent::start_with_env`], running another build of `labgate` (the benches
    /// measure the `dist` profile's beside this one).
    pub fn start_bin(bin: &Path, dir: &Path, config: &str, env: &[(&str, &str)]) -> Agent {
        let path = dir.join("labgate.toml");
        std::fs::write(&path, config).expect("write config");
        let cfg: toml::Value = toml::from_str(config).expect("config is TOML");
        let http: SocketAddr = cfg["http"]["listen"].as_str().unwrap().parse().unwrap();
        let mut a = Agent {
            child: None,
            bin: bin.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            http,
            config: path,
            log: dir.join("agent.log"),
        };
        a.spawn();
        a
    }

    /// (Re)starts the process on the same config and data dir, and waits until it
    /// answers `/status`.
    pub fn spawn(&mut self) {
        self.launch();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.try_get("/status").is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent did not answer /status; log:\n{}", self.log_text());
    }

    /// (Re)starts the process on the same config and data dir, without waiting for it.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        // What systemd's RuntimeDirectory= gives the service: a directory that outlives
        // a restart, on another filesystem than the data dir.
        let run = self.log.with_file_name("run");
        std::fs::create_dir_all(&run).expect("runtime dir");
        let child = Command::new(&self.bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUNTIME_DIRECTORY", &run)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(profiler_env())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_get(&self, path: &str) -> Option<(u16, String)> {
        self.fetch(path).ok()
    }

    /// One GET; on failure, what failed and after how long.
    fn fetch(&self, path: &str) -> Result<(u16, String), String> {
        let t0 = Instant::now();
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!("{what}: {e} (after {} ms)", t0.elapsed().as_millis())
        };
        let mut s = TcpStream::connect_timeout(&self.http, Duration::from_secs(1))
            .map_err(|e| fail("connect", &e))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| fail("set timeout", &e))?;
        use std::io::Write;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| fail("write", &e))?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| fail("read", &e))?;
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| fail("no status line", &format!("{out:?}")))?;
        let body = out
            .split_once("\r\n\r\n")
            .ok_or_else(|| fail("no header end", &format!("{out:?}")))?
            .1;
        Ok((code, body.to_string()))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.fetch(path)
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}; log:\n{}", self.log_text()))
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.get("/status").1).expect("status JSON")
    }

    /// One sample of a Prometheus metric (with labels as written, e.g. `{reason="x"}`).
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").1;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
    }

    /// Polls `cond` on /status until it holds.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if cond(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; status: {s}\nlog:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the agent to exit on its own; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let c = self.child.take()?;
        self.reap(c, within, "exit")
    }

    /// SIGTERM and wait for exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        self.reap(c, Duration::from_secs(30), "exit after SIGTERM")
    }

    /// Waits for `c` to end; kills it and fails the test after `within`.
    fn reap(&self, mut c: Child, within: Duration, what: &str) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "agent did not {what} within {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}
