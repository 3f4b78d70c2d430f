//! The `folder` device against real files, the real agent and a real tansu: files
//! appearing, growing while written, arriving half-written, renamed into place, broken;
//! and a kill -9 in the middle of a large file, after which every row is in Kafka exactly
//! once.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::*;

fn profiles() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("devices/profiles")
        .display()
        .to_string()
}

fn folder_device(id: &str, dir: &Path, profile: &str, extra: &str) -> String {
    format!(
        "[[devices]]\nkind = \"folder\"\nid = \"{id}\"\npath = \"{}\"\npattern = \"*.csv\"\nprofile = \"{profile}\"\nprofiles_dir = \"{}\"\nscan_interval = \"200ms\"\n{extra}\n",
        dir.display(),
        profiles()
    )
}

fn readings<'a>(m: &'a [Msg], file: &str) -> Vec<&'a Msg> {
    m.iter()
        .filter(|x| x.json["type"] == "sensor_reading" && x.json["metadata"]["file"] == file)
        .collect()
}

fn ts(i: u64) -> String {
    format!("2026-12-01T10:{:02}:{:02}.000Z", (i / 60) % 60, i % 60)
}

struct Rig {
    _broker: Broker,
    topics: Topics,
    agent: Agent,
    reader: Reader,
    _dir: tempfile::TempDir,
}

fn rig(watched: &Path, device: &str) -> Rig {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let cfg = agent_config(
        dir.path(),
        "agent-files",
        &broker.addr(),
        &topics,
        free_port(),
        device,
    );
    let agent = Agent::start(dir.path(), &cfg);
    let _ = watched;
    let reader = Reader::new(
        &broker.addr(),
        &[
            topics.sensors(),
            topics.events(),
            topics.data(),
            topics.agent_events(),
        ],
    );
    Rig {
        _broker: broker,
        topics,
        agent,
        reader,
        _dir: dir,
    }
}

#[test]
fn rows_of_new_and_growing_files_arrive_once_and_a_half_written_row_waits() {
    let watched = tempdir();
    let w = watched.path();
    let mut r = rig(
        w,
        &folder_device("logger-1", w, "folder-csv-readings", "settle = \"2s\""),
    );
    // A complete file appears.
    let complete = format!(
        "time,temperature_C,humidity_pct\n{}",
        (0..5)
            .map(|i| format!("{},2{i}.5,4{i}.0\n", ts(i)))
            .collect::<String>()
    );
    std::fs::write(w.join("a.csv"), &complete).unwrap();
    r.reader
        .until("the complete file", Duration::from_secs(30), |m| {
            readings(m, "a.csv").len() == 10
        });
    let a = readings(&r.reader.msgs, "a.csv");
    assert_eq!(a[0].json["sensor_id"], "logger-1.temperature_C");
    assert_eq!(a[0].json["value"], 20.5);
    assert_eq!(a[0].json["unit"], "°C");
    assert_eq!(a[0].json["timestamp"], ts(0));
    assert_eq!(a[0].json["metadata"]["row"], 1);
    assert_eq!(a[9].json["metadata"]["row"], 5);

    // A file being written: rows arrive as they are completed; a row cut in the middle
    // is not read until its newline comes.
    let mut f = std::fs::File::create(w.join("b.csv")).unwrap();
    write!(f, "time,temperature_C,humidity_pct\n{},30.0,50.0\n", ts(10)).unwrap();
    f.flush().unwrap();
    r.reader.until(
        "the first row of the growing file",
        Duration::from_secs(30),
        |m| readings(m, "b.csv").len() == 2,
    );
    write!(f, "{},31.0,51.0\n{},3", ts(11), ts(12)).unwrap();
    f.flush().unwrap();
    r.reader
        .until("the second row", Duration::from_secs(30), |m| {
            readings(m, "b.csv").len() == 4
        });
    r.reader.drain_for(Duration::from_millis(800));
    assert_eq!(
        readings(&r.reader.msgs, "b.csv").len(),
        4,
        "the half row waits"
    );
    writeln!(f, "2.5,52.0").unwrap();
    f.flush().unwrap();
    drop(f);
    r.reader
        .until("the completed row", Duration::from_secs(30), |m| {
            readings(m, "b.csv").len() == 6
        });
    let b = readings(&r.reader.msgs, "b.csv");
    assert_eq!(
        b[4].json["value"], 32.5,
        "the row read whole: {}",
        b[4].json
    );
    // Finished files are reported imported, and the files are untouched.
    r.reader
        .until("both files imported", Duration::from_secs(30), |m| {
            m.iter()
                .filter(|x| x.json["event"] == "file_imported")
                .count()
                == 2
        });
    assert_eq!(std::fs::read_to_string(w.join("a.csv")).unwrap(), complete);
    // Nothing twice, nothing missing.
    r.reader.drain_for(Duration::from_secs(1));
    assert_eq!(readings(&r.reader.msgs, "a.csv").len(), 10);
    assert_eq!(readings(&r.reader.msgs, "b.csv").len(), 6);
    for m in &r.reader.msgs {
        assert_matches_schema(m);
        assert_envelope(m, "agent-files");
    }
    assert_gap_free(&r.reader.msgs);
    let _ = &r.topics;
}

#[test]
fn a_measurement_renamed_into_place_is_one_run_and_a_broken_one_is_moved_aside() {
    let watched = tempdir();
    let w = watched.path();
    // A long settle: only the rename can make the file finished this soon.
    let mut r = rig(
        w,
        &folder_device(
            "pstat-files",
            w,
            "folder-echem-csv",
            "settle = \"60s\"\npoints_per_message = 40",
        ),
    );
    let rows: String = (0..100)
        .map(|i| format!("{:.1},0.5,{}\n", f64::from(i) * 0.1, 100.0 - f64::from(i)))
        .collect();
    let tmp = w.join("ca-001.csv.part");
    std::fs::write(
        &tmp,
        format!(
            "# exported by the instrument software\nTime (s),Potential (V),Current (uA)\n{rows}"
        ),
    )
    .unwrap();
    std::fs::rename(&tmp, w.join("ca-001.csv")).unwrap();
    r.reader
        .until("the run and its receipt", Duration::from_secs(20), |m| {
            m.iter().any(|x| x.json["event"] == "experiment_completed")
                && m.iter().any(|x| x.json["event"] == "run_delivered")
        });
    r.reader.drain_for(Duration::from_millis(500));
    let mut run: Vec<&Msg> = r
        .reader
        .msgs
        .iter()
        .filter(|x| x.json["experiment_id"] == "pstat-files-ca-001")
        .collect();
    // Events and data are on two topics: their order is the device's seq.
    run.sort_by_key(|x| x.json["seq"].as_u64());
    let kinds: Vec<String> = run
        .iter()
        .map(|x| {
            x.json["event"]
                .as_str()
                .map_or_else(|| "data".to_string(), str::to_string)
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "experiment_started",
            "data",
            "data",
            "data",
            "experiment_completed",
            "run_delivered"
        ]
    );
    let receipt = &run[run.len() - 1].json["data"];
    assert_eq!(
        (receipt["ended"].as_str(), receipt["points"].as_u64()),
        (Some("completed"), Some(100))
    );
    let points: Vec<&serde_json::Value> = run
        .iter()
        .filter(|x| x.json["type"] == "echem_data")
        .flat_map(|x| x.json["points"].as_array().unwrap().iter())
        .collect();
    assert_eq!(points.len(), 100);
    assert_eq!(run[1].json["technique"], "CA");
    assert!((points[0]["i"].as_f64().unwrap() - 100e-6).abs() < 1e-15);
    assert_eq!(points[99]["t"], 9.9);

    // A file with a row that is not a number: rejected whole, moved aside, reported.
    std::fs::write(
        w.join("ca-002.csv.part"),
        "Time (s),Potential (V),Current (uA)\n0.0,0.5,1.0\n0.1,0.5,overload\n",
    )
    .unwrap();
    std::fs::rename(w.join("ca-002.csv.part"), w.join("ca-002.csv")).unwrap();
    r.reader
        .until("the rejection", Duration::from_secs(20), |m| {
            m.iter().any(|x| x.json["event"] == "file_rejected")
        });
    let rej = r
        .reader
        .msgs
        .iter()
        .find(|x| x.json["event"] == "file_rejected")
        .unwrap()
        .json
        .clone();
    assert_eq!(rej["data"]["file"], "ca-002.csv");
    assert!(
        rej["data"]["reason"].as_str().unwrap().contains("overload"),
        "{rej}"
    );
    assert!(w.join("rejected/ca-002.csv").is_file());
    assert!(!w.join("ca-002.csv").exists());
    assert!(
        !r.reader
            .msgs
            .iter()
            .any(|x| x.json["experiment_id"] == "pstat-files-ca-002"),
        "nothing of a rejected file is sent"
    );
    assert!(
        r.agent
            .metric("labgate_device_malformed_total{device=\"pstat-files\"}")
            >= 1.0
    );
    for m in &r.reader.msgs {
        assert_matches_schema(m);
    }
}

#[test]
fn a_kill_9_in_the_middle_of_a_large_file_loses_and_repeats_no_row() {
    const ROWS: u64 = 100_000;
    let watched = tempdir();
    let w = watched.path();
    let mut text = String::from("time,temperature_C,humidity_pct\n");
    for i in 0..ROWS {
        text.push_str(&format!("{},{}.25,{}.5\n", ts(i), i % 1000, i % 100));
    }
    std::fs::write(w.join("big.csv"), &text).unwrap();
    let mut r = rig(
        w,
        &folder_device("logger-big", w, "folder-csv-readings", "settle = \"500ms\""),
    );
    // Kill it while the file is being read.
    r.agent
        .wait_status("part of the file buffered", Duration::from_secs(60), |s| {
            s["records_buffered"].as_u64().unwrap_or(0) > 20_000
        });
    let before = r.agent.status()["records_buffered"].as_u64().unwrap();
    r.agent.kill9();
    assert!(
        before < 2 * ROWS,
        "killed before the end ({before} records)"
    );
    r.agent.spawn();
    r.reader.until("every row", Duration::from_secs(180), |m| {
        readings(m, "big.csv").len() as u64 >= 2 * ROWS
            && m.iter().any(|x| x.json["event"] == "file_imported")
    });
    r.reader.drain_for(Duration::from_secs(2));
    let got = readings(&r.reader.msgs, "big.csv");
    // Each row's readings were made once: one event_id each. Kafka may hold a record
    // twice (acknowledged by the broker, not yet let go by the buffer when the process
    // died: it is sent again as it was, same event_id and seq), never a row read twice.
    let mut seen: BTreeMap<(u64, String), HashSet<String>> = BTreeMap::new();
    for m in &got {
        let row = m.json["metadata"]["row"].as_u64().unwrap();
        let sensor = m.json["sensor_id"].as_str().unwrap().to_string();
        let id = m.json["event_id"].as_str().unwrap().to_string();
        seen.entry((row, sensor)).or_default().insert(id);
    }
    let twice: Vec<_> = seen
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .take(5)
        .collect();
    assert!(
        twice.is_empty(),
        "rows read twice (different records): {twice:?}"
    );
    assert_eq!(seen.len() as u64, 2 * ROWS, "every row's two readings");
    eprintln!(
        "kill -9 after {before} records: {} rows, {} records, {} copies in Kafka",
        ROWS,
        seen.len(),
        got.len()
    );
    let rows: HashSet<u64> = seen.keys().map(|(r, _)| *r).collect();
    assert_eq!(rows.len() as u64, ROWS);
    assert_eq!(*rows.iter().max().unwrap(), ROWS);
    assert_gap_free(&got.into_iter().cloned().collect::<Vec<_>>());
    let _ = &r.topics;
}

#[test]
fn a_missing_directory_is_disconnected_until_it_appears() {
    let base = tempdir();
    let w = base.path().join("exports");
    let mut r = rig(
        &w,
        &folder_device("late-1", &w, "folder-csv-readings", "settle = \"300ms\""),
    );
    r.agent
        .wait_status("disconnected", Duration::from_secs(20), |s| {
            s["devices"]["late-1"]["state"] == "disconnected"
        });
    std::fs::create_dir_all(&w).unwrap();
    std::fs::write(
        w.join("a.csv"),
        format!("time,temperature_C,humidity_pct\n{},20.0,40.0\n", ts(0)),
    )
    .unwrap();
    r.reader.until(
        "the reading and device_connected",
        Duration::from_secs(30),
        |m| {
            readings(m, "a.csv").len() == 2
                && m.iter().any(|x| x.json["event"] == "device_connected")
        },
    );
    r.agent
        .wait_status("running", Duration::from_secs(10), |s| {
            s["devices"]["late-1"]["state"] == "running"
        });
}

/// Under `reject_new` a full buffer refuses rows: the device goes back to its last
/// durable position and reads them again once there is room, so none is lost and none
/// is read twice.
#[test]
fn a_full_buffer_holds_a_file_back_without_losing_or_repeating_a_row() {
    const ROWS: u64 = 3_000;
    let watched = tempdir();
    let w = watched.path();
    let mut text = String::from("time,temperature_C,humidity_pct\n");
    for i in 0..ROWS {
        text.push_str(&format!("{},{}.25,{}.5\n", ts(i), i % 1000, i % 100));
    }
    std::fs::write(w.join("full.csv"), &text).unwrap();
    // No broker yet: the buffer (64 KiB, reject_new) fills and refuses.
    let port = free_port();
    let dir = tempdir();
    let topics = Topics::new();
    let device = format!(
        "[buffer]\nmax_bytes = 65536\noverflow = \"reject_new\"\n\n{}",
        folder_device(
            "logger-full",
            w,
            "folder-csv-readings",
            "settle = \"300ms\""
        )
    );
    let cfg = agent_config(
        dir.path(),
        "agent-full",
        &format!("127.0.0.1:{port}"),
        &topics,
        free_port(),
        &device,
    );
    let agent = Agent::start(dir.path(), &cfg);
    agent.wait_status("the buffer refusing rows", Duration::from_secs(30), |_| {
        agent.metric("labgate_records_dropped_total{reason=\"buffer_full_reject_new\"}") > 0.0
    });
    let _broker = Broker::start_on(port);
    let mut reader = Reader::new(&format!("127.0.0.1:{port}"), &[topics.sensors()]);
    reader.until("every row", Duration::from_secs(120), |m| {
        readings(m, "full.csv")
            .iter()
            .map(|x| x.json["event_id"].as_str().unwrap_or(""))
            .collect::<HashSet<_>>()
            .len() as u64
            >= 2 * ROWS
    });
    reader.drain_for(Duration::from_secs(1));
    let mut ids: BTreeMap<(u64, String), HashSet<String>> = BTreeMap::new();
    for m in readings(&reader.msgs, "full.csv") {
        ids.entry((
            m.json["metadata"]["row"].as_u64().unwrap(),
            m.json["sensor_id"].as_str().unwrap().to_string(),
        ))
        .or_default()
        .insert(m.json["event_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len() as u64, 2 * ROWS, "every row's two readings");
    assert!(ids.values().all(|s| s.len() == 1), "no row read twice");
}
