//! Gives the kernel back the memory glibc keeps after the agent freed it.
//!
//! glibc keeps what a thread frees inside that thread's arena and returns pages to the
//! kernel only from an arena's top. Under full load (sensors at full speed, a broker
//! that stalls or a backlog that drains) the agent's threads allocate and free tens of
//! megabytes a second, and the free chunks left between live ones stayed resident:
//! measured, `malloc_trim(0)` took an agent stalled in the middle of a full-speed flow
//! from 75 to 45 MB. A small thread watches the resident size and trims when it has
//! grown by [`SLACK_KIB`] since the last trim, so memory that is only being reused
//! costs nothing, and memory that was freed goes back within [`CHECK_EVERY`].
//!
//! Before any thread starts, [`limit_arenas`] caps glibc's arenas at [`ARENAS`]: by
//! default glibc opens up to eight per core as the agent's threads (runtime workers,
//! sled's, librdkafka's, the blocking pool) contend, and each keeps its own partly used
//! pages that no trim returns.
//!
//! Once the agent has started, [`page_out_file_pages`] asks the kernel to take back the
//! pages of code and read-only data that only starting ran.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// glibc arenas the agent lets its threads share, glibc's main arena included. Measured
/// against glibc's default (eight per core) with sensors at full speed on two cores:
/// four took about 3 MB less at full load and kept the end-to-end rate; two (one for
/// every thread besides `main`) and one took less memory still but cost that rate
/// 15–45 % (BENCHMARKS.md, "Allocator arenas").
pub const ARENAS: u16 = 4;

/// Blocks at least this large get their own mapping, given back when freed. glibc
/// starts at 128 KiB and raises it to the size of the largest such block freed, after
/// which the large buffers that sled and librdkafka take and free many times a second
/// (256–512 KiB) come from the arenas and leave holes there. Fixed here (with
/// [`TRIM_THRESHOLD`]) it took 3–5 MB off the agent's peak with sensors at full speed
/// and the broker stalling (BENCHMARKS.md, "Allocator thresholds").
pub const MMAP_THRESHOLD: u32 = 512 * 1024;

/// Free memory at an arena's top past this goes back to the kernel at once. glibc
/// raises it to twice the mmap threshold as that rises; fixing one fixes both, so it
/// is set too, at the growth [`SLACK_KIB`] lets the trimmer wait for.
pub const TRIM_THRESHOLD: u32 = 1024 * 1024;

/// How often the resident size is read (`/proc/self/status`, a few microseconds).
/// Under full load the heap refills what a trim gave back within tens of
/// milliseconds, so the peak is the floor plus what grows in one interval: with the
/// broker stalled until 10M records were buffered, the peak was about 1 MB lower on
/// average at 25 ms than at 100 ms over eight alternating pairs of runs (BENCHMARKS.md,
/// "The trim interval"), for about three times as many trims (half a second of one
/// core in 24 s of full load). An idle agent does not grow, so it reads and never
/// trims.
pub const CHECK_EVERY: Duration = Duration::from_millis(25);

/// Growth of the resident size since the last trim that starts the next one.
pub const SLACK_KIB: u64 = 1024;

/// What the trims did, for `/metrics`.
#[derive(Debug)]
pub struct TrimStats {
    count: AtomicU64,
    nanos: AtomicU64,
    released_kib: AtomicU64,
}

/// A copy of [`TrimStats`] at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrimSnapshot {
    /// Trims made.
    pub count: u64,
    /// Time spent in them.
    pub nanos: u64,
    /// Resident KiB they gave back.
    pub released_kib: u64,
}

impl TrimStats {
    const fn new() -> Self {
        TrimStats {
            count: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
            released_kib: AtomicU64::new(0),
        }
    }

    /// The counts now.
    pub fn snapshot(&self) -> TrimSnapshot {
        TrimSnapshot {
            count: self.count.load(Relaxed),
            nanos: self.nanos.load(Relaxed),
            released_kib: self.released_kib.load(Relaxed),
        }
    }

    fn add(&self, took: Duration, before_kib: u64, after_kib: u64) {
        self.count.fetch_add(1, Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Relaxed);
        self.released_kib
            .fetch_add(before_kib.saturating_sub(after_kib), Relaxed);
    }
}

/// The process's trims (one trimmer per process).
pub static TRIMS: TrimStats = TrimStats::new();

/// Decides when to trim from the resident sizes it is shown.
#[derive(Debug)]
pub struct Trimmer {
    /// The lowest resident size since the last trim (KiB); `None` before the first read.
    floor: Option<u64>,
    slack: u64,
}

impl Trimmer {
    /// A trimmer that trims once the resident size is `slack_kib` above its floor.
    pub fn new(slack_kib: u64) -> Self {
        Trimmer {
            floor: None,
            slack: slack_kib,
        }
    }

    /// Shown the resident size now: whether to trim.
    pub fn grown(&mut self, rss_kib: u64) -> bool {
        match self.floor {
            Some(f) if rss_kib > f.saturating_add(self.slack) => true,
            Some(f) if rss_kib >= f => false,
            _ => {
                self.floor = Some(rss_kib);
                false
            }
        }
    }

    /// Shown the resident size right after a trim: the new floor.
    pub fn trimmed(&mut self, rss_kib: u64) {
        self.floor = Some(rss_kib);
    }
}

/// `VmRSS` of this process in KiB; `None` where `/proc` cannot say.
pub fn rss_kib() -> Option<u64> {
    status_kib("VmRSS:")
}

/// A KiB figure of `/proc/self/status` (`field` with its colon); `None` where `/proc`
/// cannot say.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// How long after the agent is ready [`page_out_file_pages`] runs, once: by then the
/// buffer is recovered, the Kafka clients connected and the devices started, so what
/// the agent runs from then on is the code of its steady work. `LABGATE_PAGE_OUT_AFTER_MS`
/// sets it (`0` turns it off), for comparing memory figures with and without it.
pub const PAGE_OUT_AFTER: Duration = Duration::from_secs(10);

/// When to page out the start-up code ([`PAGE_OUT_AFTER`] or the environment's
/// `LABGATE_PAGE_OUT_AFTER_MS`); `None`: not at all.
pub fn page_out_after() -> Option<Duration> {
    let after = env_interval("LABGATE_PAGE_OUT_AFTER_MS", PAGE_OUT_AFTER);
    (!after.is_zero()).then_some(after)
}

/// What [`page_out_file_pages`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct PagedOut {
    /// Read-only file mappings the kernel was asked to reclaim.
    pub mappings: usize,
    /// Their size (most of it never resident).
    pub bytes: u64,
    /// Mappings the kernel refused (gone in between, or locked).
    pub refused: usize,
    /// Of the mappings, those of data (not code) that are now read page by page.
    pub page_by_page: usize,
    /// `VmRSS` before, in KiB.
    pub rss_before_kib: Option<u64>,
    /// `VmRSS` after, in KiB.
    pub rss_after_kib: Option<u64>,
}

/// Asks the kernel to reclaim now the resident pages of the agent's read-only file
/// mappings: its binary's code and read-only data, and the shared libraries'.
///
/// Starting maps in several megabytes of code the agent then never runs again (the
/// config parser, the buffer's recovery, TLS and librdkafka's set-up, the command line),
/// and those pages stay in its resident size until memory runs short. Measured on the
/// demo config, an idle agent's RSS went from about 16–17 to 11–12 MB, with the code it
/// runs when idle placed first by `link/hot-text.ld` (BENCHMARKS.md, "Code the idle
/// agent keeps resident"). The kernel drops only clean pages that no other
/// process maps, so the C library and anything shared stays; code the agent runs again
/// is read back on its next access, a few major faults.
///
/// The read-only data mappings are read page by page from then on (`MADV_RANDOM`):
/// otherwise each page of constants, tables or unwind data that the idle agent touches
/// brings back up to 64 KiB of its neighbours, about half a megabyte in all (idle
/// 10.5–10.9 MB against 11.2–11.3 MB, BENCHMARKS.md). Code keeps the kernel's
/// read-around.
///
/// An error when `/proc/self/maps` cannot be read or the kernel has no `MADV_PAGEOUT`
/// (before Linux 5.4).
pub fn page_out_file_pages() -> std::io::Result<PagedOut> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut done = PagedOut {
        rss_before_kib: rss_kib(),
        ..PagedOut::default()
    };
    for m in read_only_file_mappings(&maps) {
        let (start, len) = (m.start, m.len);
        match page_out::page_out(start, len) {
            Ok(()) => {
                done.mappings += 1;
                done.bytes = done.bytes.saturating_add(len as u64);
                // Read-only data is laid out in no order of use: a page of it faulted in
                // again would bring its neighbours back with it. Code keeps the kernel's
                // read-around, since `link/hot-text.ld` lays it out by use and a cold
                // path then runs without waiting for each page.
                if !m.code && page_out::read_page_by_page(start, len).is_ok() {
                    done.page_by_page += 1;
                }
            }
            // EINVAL from the first mapping: a kernel without MADV_PAGEOUT.
            Err(e) if done.mappings == 0 && e.kind() == std::io::ErrorKind::InvalidInput => {
                return Err(e)
            }
            Err(_) => done.refused += 1,
        }
    }
    done.rss_after_kib = rss_kib();
    Ok(done)
}

/// A file mapped without write access.
#[derive(Debug, PartialEq, Eq)]
struct ReadOnlyMapping {
    start: usize,
    len: usize,
    /// Mapped executable: code, not data.
    code: bool,
}

/// The mappings of a `/proc/<pid>/maps` text that are files mapped without write
/// access.
fn read_only_file_mappings(maps: &str) -> Vec<ReadOnlyMapping> {
    maps.lines()
        .filter_map(|line| {
            // start-end perms offset dev inode path
            let mut f = line.split_ascii_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let path = f.nth(3)?;
            if !perms.starts_with("r-") || !path.starts_with('/') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let a = usize::from_str_radix(a, 16).ok()?;
            let b = usize::from_str_radix(b, 16).ok()?;
            let len = b.checked_sub(a).filter(|&n| n > 0)?;
            Some(ReadOnlyMapping {
                start: a,
                len,
                code: perms.as_bytes().get(2) == Some(&b'x'),
            })
        })
        .collect()
}

/// The environment's `var`, whole milliseconds (zero: off), or `default` when it is
/// unset or not a number (said in a warning).
fn env_interval(var: &str, default: Duration) -> Duration {
    match std::env::var(var) {
        Err(_) => default,
        Ok(v) => interval(&v).unwrap_or_else(|| {
            tracing::warn!(value = %v, "{var} is not a number of milliseconds; using {default:?}");
            default
        }),
    }
}

/// `LABGATE_MEMORY_TRIM_MS` or `LABGATE_PAGE_OUT_AFTER_MS` as an interval (zero: off);
/// `None` when it is not a whole number of milliseconds.
fn interval(ms: &str) -> Option<Duration> {
    ms.trim().parse().ok().map(Duration::from_millis)
}

/// Whether the environment already tells glibc how many arenas to open
/// (`MALLOC_ARENA_MAX`, or `glibc.malloc.arena_max` in `GLIBC_TUNABLES`): the agent then
/// leaves that setting alone.
fn arenas_set_by(var: impl Fn(&str) -> Option<String>) -> bool {
    set_by(&var, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max")
}

/// Whether the environment sets either threshold ([`MMAP_THRESHOLD`],
/// [`TRIM_THRESHOLD`]); the agent then leaves both alone.
fn thresholds_set_by(var: impl Fn(&str) -> Option<String>) -> bool {
    set_by(
        &var,
        "MALLOC_MMAP_THRESHOLD_",
        "glibc.malloc.mmap_threshold",
    ) || set_by(
        &var,
        "MALLOC_TRIM_THRESHOLD_",
        "glibc.malloc.trim_threshold",
    )
}

/// Whether glibc's variable `env` or its tunable `tunable` is set.
fn set_by(var: &impl Fn(&str) -> Option<String>, env: &str, tunable: &str) -> bool {
    var(env).is_some() || var("GLIBC_TUNABLES").is_some_and(|t| t.contains(tunable))
}

/// Caps glibc's arenas at [`ARENAS`] unless the environment sets its own limit. Call it
/// before any thread starts: a thread that has an arena keeps it. Returns the limit set.
pub fn limit_arenas() -> Option<u16> {
    if arenas_set_by(|k| std::env::var(k).ok()) {
        return None;
    }
    glibc_malloc::limit_arenas(ARENAS).then_some(ARENAS)
}

/// Fixes glibc's mmap and trim thresholds at [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`]
/// unless the environment sets either. Returns whether it did.
pub fn fix_thresholds() -> bool {
    !thresholds_set_by(|k| std::env::var(k).ok())
        && glibc_malloc::fix_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)
}

/// Starts the thread that trims. Without `/proc` (or off glibc) it does nothing.
/// `LABGATE_MEMORY_TRIM_MS` sets how often it looks (`0` turns it off), for comparing
/// memory figures with and without it.
pub fn spawn_trimmer() -> std::io::Result<()> {
    if rss_kib().is_none() || !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return Ok(());
    }
    let every = env_interval("LABGATE_MEMORY_TRIM_MS", CHECK_EVERY);
    if every.is_zero() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("labgate-trim".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut t = Trimmer::new(SLACK_KIB);
            loop {
                std::thread::sleep(every);
                let Some(rss) = rss_kib() else { continue };
                if t.grown(rss) {
                    let start = Instant::now();
                    glibc_malloc::release_free_memory();
                    let took = start.elapsed();
                    let after = rss_kib().unwrap_or(rss);
                    TRIMS.add(took, rss, after);
                    t.trimmed(after);
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_growth_by_the_slack_and_follows_the_floor_down() {
        let mut t = Trimmer::new(100);
        assert!(!t.grown(1000), "the first reading sets the floor");
        assert!(!t.grown(1100), "within the slack");
        assert!(t.grown(1101));
        t.trimmed(1050);
        assert!(!t.grown(1150));
        assert!(!t.grown(900), "a lower reading lowers the floor");
        assert!(t.grown(1001));
    }

    #[test]
    fn the_interval_is_whole_milliseconds_and_zero_turns_it_off() {
        assert_eq!(interval("250"), Some(Duration::from_millis(250)));
        assert_eq!(interval(" 0 "), Some(Duration::ZERO));
        for bad in ["", "-1", "0.5", "100ms", "99999999999999999999"] {
            assert_eq!(interval(bad), None, "{bad:?}");
        }
    }

    /// An environment of `pairs`.
    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_string())
        }
    }

    #[test]
    fn an_arena_limit_from_the_environment_wins() {
        assert!(!arenas_set_by(env(&[])));
        assert!(arenas_set_by(env(&[("MALLOC_ARENA_MAX", "4")])));
        assert!(arenas_set_by(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=1"
        )])));
        assert!(!arenas_set_by(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.tcache_count=0"
        )])));
    }

    #[test]
    fn the_environment_can_set_the_thresholds_itself() {
        assert!(!thresholds_set_by(env(&[])));
        assert!(thresholds_set_by(env(&[(
            "MALLOC_MMAP_THRESHOLD_",
            "65536"
        )])));
        assert!(thresholds_set_by(env(&[("MALLOC_TRIM_THRESHOLD_", "0")])));
        assert!(thresholds_set_by(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=1"
        )])));
        assert!(!thresholds_set_by(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.arena_max=2"
        )])));
    }

    #[test]
    fn glibc_takes_the_thresholds() {
        assert_eq!(
            glibc_malloc::fix_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
        // A value that does not fit glibc's int is refused before it gets there.
        assert!(!glibc_malloc::fix_thresholds(u32::MAX, TRIM_THRESHOLD));
    }

    #[test]
    fn glibc_takes_the_arena_limit() {
        // This test process has its arenas already; a cap does not move them.
        assert_eq!(
            glibc_malloc::limit_arenas(ARENAS),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
        assert!(!glibc_malloc::limit_arenas(0), "zero is not a limit");
    }

    #[test]
    fn finds_the_read_only_file_mappings() {
        let maps = "\
55d0a0000000-55d0a0100000 r--p 00000000 fe:00 123 /usr/bin/labgate
55d0a0100000-55d0a0a00000 r-xp 00100000 fe:00 123 /usr/bin/labgate
55d0a0a00000-55d0a0a10000 r--p 00a00000 fe:00 123 /usr/bin/labgate
55d0a0a10000-55d0a0a11000 rw-p 00a10000 fe:00 123 /usr/bin/labgate
55d0a0a11000-55d0a0a20000 rw-p 00000000 00:00 0
7f0000000000-7f0000001000 r--s 00000000 fe:00 9 /var/lib/x (deleted)
7f0000002000-7f0000003000 ---p 00000000 fe:00 9 /usr/lib/libc.so.6
7f0000004000-7f0000005000 r-xp 00000000 00:00 0 [vdso]
7f0000006000-7f0000006000 r--p 00000000 fe:00 9 /empty
zzzz-7f0000009000 r--p 00000000 fe:00 9 /bad
7f0000009000 r--p 00000000 fe:00 9 /bad
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            read_only_file_mappings(maps),
            [
                (0x55d0_a000_0000, 0x10_0000, false),
                (0x55d0_a010_0000, 0x90_0000, true),
                (0x55d0_a0a0_0000, 0x1_0000, false),
                (0x7f00_0000_0000, 0x1000, false),
            ]
            .map(|(start, len, code)| ReadOnlyMapping { start, len, code })
        );
    }

    #[test]
    fn pages_out_this_process_code_which_then_still_runs() {
        let file_kib = || status_kib("RssFile:").unwrap();
        let before = file_kib();
        let done = page_out_file_pages().expect("MADV_PAGEOUT (Linux 5.4 or later)");
        let after = file_kib();
        assert!(done.mappings >= 2, "{done:?}");
        assert!(done.bytes > 0);
        // The test binary's code, mapped by this process alone, left; what runs next
        // (this test, the others beside it) is read back in as it runs.
        assert!(after < before, "RssFile {before} → {after} KiB");
        assert_eq!(interval("25"), Some(Duration::from_millis(25)));
        // The kernel now reads this binary's read-only data page by page ("rr" in its
        // flags), and its code as before.
        assert!(done.page_by_page >= 1, "{done:?}");
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut flags = Vec::new();
        let mut perms = None;
        for line in smaps.lines() {
            if line.ends_with(exe.to_str().unwrap()) {
                perms = line.split_ascii_whitespace().nth(1).map(str::to_owned);
            } else if let Some(f) = line.strip_prefix("VmFlags:") {
                if let Some(p) = perms.take() {
                    flags.push((p, f.split_ascii_whitespace().any(|f| f == "rr")));
                }
            } else if line.contains(" /") || line.contains(" [") {
                perms = None;
            }
        }
        assert!(flags.contains(&("r--p".to_owned(), true)), "{flags:?}");
        assert!(flags.contains(&("r-xp".to_owned(), false)), "{flags:?}");
    }

    #[test]
    fn the_kernel_refuses_an_unmapped_or_unaligned_range_and_keeps_what_it_pages_out() {
        // The first page is never mapped in a Linux process.
        assert!(page_out::page_out(0, 4096).is_err());
        let page = 4096;
        let v: Vec<u8> = (0..64 * page).map(|i| (i % 251) as u8).collect();
        let base = v.as_ptr() as usize;
        assert_eq!(
            page_out::page_out(base | 1, page).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::InvalidInput)
        );
        // Anonymous memory: with no swap the kernel keeps it; with swap it writes it out
        // and reads it back. Either way the contents stay.
        let start = base.div_ceil(page) * page;
        let end = (base + v.len()) / page * page;
        page_out::page_out(start, end - start).expect("MADV_PAGEOUT (Linux 5.4 or later)");
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }

    #[test]
    fn reads_this_process_rss() {
        let rss = rss_kib().unwrap();
        assert!(rss > 100, "{rss} KiB");
    }

    #[test]
    fn a_trim_gives_back_freed_memory() {
        // Many small blocks, one in 64 kept: the free chunks between the kept ones sit
        // below live memory, where glibc does not return them by itself.
        let mut keep = Vec::new();
        let mut blocks: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 1000]).collect();
        for (i, b) in blocks.drain(..).enumerate() {
            if i % 64 == 0 {
                keep.push(b);
            }
        }
        let before = rss_kib().unwrap();
        assert!(
            glibc_malloc::release_free_memory(),
            "glibc gave nothing back"
        );
        let after = rss_kib().unwrap();
        assert!(after < before, "{before} -> {after} KiB");
        assert_eq!(keep.len(), 625);
    }
}
