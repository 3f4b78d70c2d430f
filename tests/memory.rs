//! The agent's glibc arena limit (`memory::limit_arenas`), seen from outside: an agent
//! with sensors at full speed, its threads contending for the allocator, keeps to three
//! arenas besides glibc's main one, and `MALLOC_ARENA_MAX` in its environment replaces
//! that limit.

mod common;

use std::time::Duration;

use common::*;

/// glibc's thread arenas in a process: each is a heap of its own, an anonymous mapping
/// reserved at a 64 MiB boundary (its unused part is a `---p` mapping beside it).
fn thread_arenas(pid: u32) -> usize {
    arena_mappings(pid).len()
}

/// The mappings [`thread_arenas`] counts, as `/proc/<pid>/maps` lines (what a failure
/// shows: a heap is recognised by its alignment, so one that is not an arena's would
/// be seen here).
fn arena_mappings(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    maps.lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let Some((a, b)) = f.first().and_then(|r| r.split_once('-')) else {
                return false;
            };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
                return false;
            };
            // No path: anonymous.
            f.len() == 5 && f[1] == "rw-p" && a % (64 << 20) == 0 && b - a <= 64 << 20
        })
        .map(str::to_string)
        .collect()
}

fn busy_agent(env: &[(&str, &str)]) -> (Agent, tempfile::TempDir) {
    let dir = tempdir();
    let topics = Topics::new();
    // No broker: the records stay in the buffer, which is all this needs.
    let cfg = agent_config(
        dir.path(),
        "agent-arenas",
        "127.0.0.1:1",
        &topics,
        free_port(),
        &sensors_device("env-1", "0s", None),
    );
    let agent = Agent::start_with_env(dir.path(), &cfg, env);
    agent.wait_status(
        "records buffered at full speed",
        Duration::from_secs(30),
        |s| s["buffer"]["records"].as_u64().unwrap_or(0) > 50_000,
    );
    (agent, dir)
}

#[test]
fn threads_share_four_arenas_unless_the_environment_says_otherwise() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let (mut agent, _dir) = busy_agent(&[]);
    let heaps = arena_mappings(agent.pid());
    let n = heaps.len();
    assert!(n <= 3, "{n} thread arenas besides the main one: {heaps:#?}");
    agent.terminate();

    let (mut agent, _dir) = busy_agent(&[("MALLOC_ARENA_MAX", "1")]);
    assert_eq!(thread_arenas(agent.pid()), 0, "the environment's limit");
    agent.terminate();
}
