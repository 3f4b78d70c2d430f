//! Every MethodSCRIPT measurement loop end to end: the example scripts in
//! `devices/methods/examples` (one per loop type, a MUX script and a multi-loop sequence)
//! run unchanged on EmStat simulators on real ptys, through the real agent, into a real
//! tansu. The points in Kafka are compared with what each simulator sent, decoded by an
//! independent MethodSCRIPT decoder (labmcp-palmsens, PyPI); `labgate check` is compared
//! with PalmSens' own MethodSCRIPT grammar (pypalmsens, PyPI). `scripts/test` installs both
//! (`LABGATE_PYTHON`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use labgate::devices::methodscript::Package;
use labgate::sim::emstat::{Emstat, Options};
use serde_json::Value;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/methods/examples")
}

fn python() -> String {
    std::env::var("LABGATE_PYTHON").unwrap_or_else(|_| {
        panic!(
            "LABGATE_PYTHON is not set: run scripts/test, which installs the MethodSCRIPT \
             cross-check tools (pypalmsens, labmcp-palmsens) and sets it"
        )
    })
}

fn crosscheck(args: &[&str], stdin: Option<&str>) -> Value {
    use std::io::Write;
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/mscript_crosscheck.py");
    let mut child = Command::new(python())
        .arg(tool)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the cross-check tool");
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cross-check tool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What each example packs, in `pck_add` order, and the technique of each step.
struct Expect {
    name: &'static str,
    fields: &'static [&'static str],
    steps: &'static [&'static str],
    /// (field, value) the agent fills from the applied setting.
    applied: Option<(&'static str, f64)>,
    /// MUX: channels per package (the package's last `n` values are currents).
    channels: usize,
}

const EXPECT: &[Expect] = &[
    Expect {
        name: "lsv",
        fields: &["e", "i"],
        steps: &["LSV"],
        applied: None,
        channels: 0,
    },
    Expect {
        name: "cv",
        fields: &["e", "i"],
        steps: &["CV"],
        applied: None,
        channels: 0,
    },
    Expect {
        name: "dpv",
        fields: &["e", "i"],
        steps: &["DPV"],
        applied: None,
        channels: 0,
    },
    Expect {
        name: "swv",
        fields: &["e", "i", "i_fwd", "i_rev"],
        steps: &["SWV"],
        applied: None,
        channels: 0,
    },
    Expect {
        name: "npv",
        fields: &["e", "i"],
        steps: &["NPV"],
        applied: None,
        channels: 0,
    },
    Expect {
        name: "acv",
        fields: &["e", "i_ac", "z_re", "z_im"],
        steps: &["ACV"],
        applied: None,
        channels: 0,
    },
    Expect {
        name: "ca",
        fields: &["t", "i"],
        steps: &["CA"],
        applied: Some(("e", 0.3)),
        channels: 0,
    },
    Expect {
        name: "pad",
        fields: &["e", "i"],
        steps: &["PAD"],
        applied: None,
        channels: 0,
    },
    Expect {
        name: "cp",
        fields: &["t", "i", "e"],
        steps: &["CP"],
        applied: None,
        channels: 0,
    },
    Expect {
        name: "lsp",
        fields: &["i", "e"],
        steps: &["LSP"],
        applied: None,
        channels: 0,
    },
    Expect {
        name: "ocp",
        fields: &["t", "e"],
        steps: &["OCP"],
        applied: Some(("i", 0.0)),
        channels: 0,
    },
    Expect {
        name: "eis",
        fields: &["f", "z_re", "z_im"],
        steps: &["EIS"],
        applied: Some(("e", 0.2)),
        channels: 0,
    },
    Expect {
        name: "eis_single",
        fields: &["f", "z_re", "z_im"],
        steps: &["EIS", "EIS", "EIS", "EIS", "EIS"],
        applied: Some(("e", 0.0)),
        channels: 0,
    },
    Expect {
        name: "geis",
        fields: &["f", "z_re", "z_im"],
        steps: &["GEIS"],
        applied: Some(("i", 100e-6)),
        channels: 0,
    },
    Expect {
        name: "mux_ca",
        fields: &["t", "e"],
        steps: &["CA"],
        applied: None,
        channels: 4,
    },
    Expect {
        name: "sequence",
        fields: &[],
        steps: &["EIS", "CA", "CV", "CA", "CV", "LSV"],
        applied: None,
        channels: 0,
    },
];

fn device(id: &str, link: &Path, method: &Path) -> String {
    format!(
        "[[devices]]\nkind = \"methodscript\"\nid = \"{id}\"\nport = \"{}\"\nmethod = \"{}\"\n\
         autostart = true\npoints_per_message = 25\nmax_interval = \"200ms\"\n",
        link.display(),
        method.display()
    )
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

#[test]
fn every_loop_type_runs_unchanged_and_reaches_kafka_as_the_simulator_sent_it() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let mut sims = Vec::new();
    let mut devices = String::new();
    for e in EXPECT {
        let link = dir.path().join(format!("tty-{}", e.name));
        let sim = Emstat::start(
            Options {
                speed: 0.0,
                seed: 11,
                ..Options::default()
            },
            Some(&link),
        )
        .unwrap();
        devices.push_str(&device(
            &format!("ms-{}", e.name),
            &link,
            &examples().join(format!("{}.mscr", e.name)),
        ));
        sims.push(sim);
    }
    let cfg = agent_config(
        dir.path(),
        "agent-tech",
        &broker.addr(),
        &topics,
        free_port(),
        &devices,
    );
    let agent = Agent::start(dir.path(), &cfg);
    let mut reader = Reader::new(&broker.addr(), &[topics.events(), topics.data()]);
    let ids: Vec<String> = EXPECT.iter().map(|e| format!("ms-{}", e.name)).collect();
    // Every run completed, and every point the simulators sent is in Kafka (the
    // simulators' counts are read as the runs go: they may still be running).
    let expected_points = |id: &str| -> usize {
        EXPECT
            .iter()
            .zip(&sims)
            .find(|(e, _)| format!("ms-{}", e.name) == id)
            .map_or(0, |(e, s)| s.data_lines().len() * e.channels.max(1))
    };
    let msgs = reader
        .until(
            "every run completed with all its points",
            Duration::from_secs(90),
            |m| {
                ids.iter().all(|id| {
                    let done = m.iter().any(|x| {
                        x.json["device_id"] == id.as_str()
                            && x.json["event"] == "experiment_completed"
                    });
                    let n: usize = m
                        .iter()
                        .filter(|x| {
                            x.json["device_id"] == id.as_str() && x.json["type"] == "echem_data"
                        })
                        .map(|x| x.json["points"].as_array().map_or(0, Vec::len))
                        .sum();
                    done && n > 0 && n == expected_points(id)
                })
            },
        )
        .to_vec();
    for m in &msgs {
        assert_matches_schema(m);
    }
    for (e, sim) in EXPECT.iter().zip(&sims) {
        let id = format!("ms-{}", e.name);
        let sent = sim.received();
        assert_eq!(
            sent.iter().filter(|c| *c == "e").count(),
            1,
            "{id}: one run, one e"
        );
        let lines = sim.data_lines();
        // The independent decoder and ours agree on every package.
        let theirs = crosscheck(&["decode"], Some(&(lines.join("\n") + "\n")));
        let theirs = theirs.as_array().unwrap();
        assert_eq!(theirs.len(), lines.len());
        for (line, t) in lines.iter().zip(theirs) {
            let ours = Package::parse(&line[1..]).unwrap();
            let t = t.as_array().unwrap();
            assert_eq!(ours.vars.len(), t.len(), "{line}");
            for (v, tv) in ours.vars.iter().zip(t) {
                assert_eq!(v.kind.code(), tv[0].as_str().unwrap(), "{line}");
                match (v.value, tv[1].as_f64()) {
                    (Some(a), Some(b)) => assert!(close(a, b), "{line}: {a} vs {b}"),
                    (None, None) => {}
                    other => panic!("{line}: {other:?}"),
                }
            }
        }
        // The records in the order the agent made them.
        let mut records: Vec<&Msg> = msgs
            .iter()
            .filter(|m| m.json["device_id"] == id.as_str() && m.json["type"] == "echem_data")
            .collect();
        records.sort_by_key(|m| m.json["seq"].as_u64());
        let mut steps: Vec<(u64, String)> = Vec::new();
        let mut points: Vec<(String, Value, Value)> = Vec::new(); // technique, point, applied
        for r in &records {
            let step = r.json["step_index"].as_u64().unwrap();
            let tech = r.json["technique"].as_str().unwrap().to_string();
            if steps.last().map(|s| s.0) != Some(step) {
                steps.push((step, tech.clone()));
            }
            assert_eq!(
                steps.last().unwrap().1,
                tech,
                "{id}: one technique per step"
            );
            for p in r.json["points"].as_array().unwrap() {
                points.push((tech.clone(), p.clone(), r.json["applied"].clone()));
            }
        }
        let techniques: Vec<&str> = steps.iter().map(|s| s.1.as_str()).collect();
        assert_eq!(techniques, e.steps, "{id}: the technique of each step");
        let step_numbers: Vec<u64> = steps.iter().map(|s| s.0).collect();
        assert_eq!(
            step_numbers,
            (0..e.steps.len() as u64).collect::<Vec<_>>(),
            "{id}"
        );
        // Every value in Kafka is the value the simulator sent, in order.
        let mut k = 0;
        for t in theirs {
            let t = t.as_array().unwrap();
            let value = |j: usize| t[j][1].as_f64().unwrap();
            let (tech, p, applied) = &points[k];
            let fields: &[&str] = if e.name == "sequence" {
                if tech == "EIS" {
                    &["f", "z_re", "z_im"]
                } else {
                    &["e", "i"]
                }
            } else {
                e.fields
            };
            for (j, f) in fields.iter().enumerate() {
                let got = p[f]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{id}: point {k} has no {f}: {p}"));
                assert!(
                    close(got, value(j)),
                    "{id}: point {k} {f} = {got}, sent {}",
                    value(j)
                );
            }
            for f in ["t", "e", "i"] {
                // Impedance points carry the applied DC side only (e for EIS, i for GEIS).
                if !(tech == "EIS" && f == "i" || tech == "GEIS" && f == "e") {
                    assert!(p[f].is_number(), "{id}: point {k} lacks {f}: {p}");
                }
            }
            if e.name == "acv" {
                assert_eq!(
                    p["i"], p["i_ac"],
                    "{id}: an ACV's current is its AC current"
                );
            }
            let expect_applied = match (e.name, tech.as_str()) {
                ("sequence", "EIS") => Some(("e", 0.0)),
                _ => e.applied,
            };
            match expect_applied {
                Some((f, v)) => {
                    assert_eq!(
                        applied,
                        &serde_json::json!([f]),
                        "{id}: {f} is flagged as applied"
                    );
                    assert!(close(p[f].as_f64().unwrap(), v), "{id}: applied {f} {p}");
                }
                None => assert!(applied.is_null(), "{id}: nothing applied, got {applied}"),
            }
            if let (Some(re), Some(im)) = (p["z_re"].as_f64(), p["z_im"].as_f64()) {
                let m = p["z_mod"].as_f64().unwrap();
                assert!(close(m, (re * re + im * im).sqrt()), "{id}: |Z|");
                assert!(
                    p["phase"].as_f64().unwrap() < 0.0,
                    "{id}: capacitive phase {p}"
                );
            }
            k += 1;
            if e.channels > 0 {
                // One point per channel: channels 1..=4 with the package's currents.
                let first = k - 1;
                for ch in 0..e.channels {
                    let (_, q, _) = &points[first + ch];
                    assert_eq!(q["channel"], ch as u64 + 1, "{id}: {q}");
                    assert!(
                        close(q["i"].as_f64().unwrap(), value(2 + ch)),
                        "{id}: channel {ch}"
                    );
                    assert!(close(q["e"].as_f64().unwrap(), value(1)));
                }
                k = first + e.channels;
            }
        }
        assert_eq!(
            k,
            points.len(),
            "{id}: no point more in Kafka than the simulator sent"
        );
        // The run's events name its steps and how it ended.
        let step_events: Vec<&Msg> = msgs
            .iter()
            .filter(|m| m.json["device_id"] == id.as_str() && m.json["event"] == "step_started")
            .collect();
        assert_eq!(step_events.len(), e.steps.len(), "{id}");
        let done = msgs
            .iter()
            .find(|m| {
                m.json["device_id"] == id.as_str() && m.json["event"] == "experiment_completed"
            })
            .unwrap();
        assert_eq!(done.json["data"]["reason"], "completed");
        assert_eq!(done.json["data"]["points"], points.len() as u64, "{id}");
    }
    // Shapes worth a look: the SWV net current peaks near E°, EIS has a semicircle.
    let swv: Vec<&Msg> = msgs
        .iter()
        .filter(|m| m.json["device_id"] == "ms-swv" && m.json["type"] == "echem_data")
        .collect();
    let peak = swv
        .iter()
        .flat_map(|m| m.json["points"].as_array().unwrap().clone())
        .max_by(|a, b| {
            a["i"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["i"].as_f64().unwrap())
        })
        .unwrap();
    assert!(
        (peak["e"].as_f64().unwrap() - 0.2).abs() < 0.05,
        "SWV peak {peak}"
    );
    drop(agent);
}

fn check(dir: &Path, script: &str) -> (Option<i32>, String) {
    check_bytes(dir, script.as_bytes())
}

fn check_bytes(dir: &Path, script: &[u8]) -> (Option<i32>, String) {
    let path = dir.join("user.mscr");
    std::fs::write(&path, script).unwrap();
    let cfg = format!(
        "[agent]\nagent_id = \"c\"\ndata_dir = \"{}\"\n[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\n[http]\nlisten = \"\"\n\
         [[devices]]\nkind = \"methodscript\"\nid = \"p\"\nport = \"/dev/null\"\nmethod = \"{}\"\n",
        dir.join("data").display(),
        path.display()
    );
    let cfg_path = dir.join("c.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["check", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_finds_what_a_device_would_refuse_at_the_users_line_and_column() {
    let dir = tempdir();
    // Every example, and the shipped methods rendered with their defaults, are valid for
    // PalmSens' grammar and for `labgate check`.
    let mut files: Vec<String> = std::fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    files.sort();
    for f in &files {
        let (code, err) = check(dir.path(), &std::fs::read_to_string(f).unwrap());
        assert_eq!(code, Some(0), "{f}: {err}");
    }
    // As a Windows editor saves it: a byte-order mark, CRLF, Latin-1 µ in a comment.
    let mut windows = b"\xEF\xBB\xBFe\r\nvar p\r\nvar c # Strom in \xB5A\r\n".to_vec();
    windows.extend_from_slice(b"meas_loop_ca p c 0 100m 1\r\nendloop\r\n");
    let (code, err) = check_bytes(dir.path(), &windows);
    assert_eq!(code, Some(0), "a Windows-saved script: {err}");
    let methods = Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/methods");
    for name in ["cv", "ca", "lsv"] {
        let m = labgate::devices::methodscript::method::Method::load(&methods, name).unwrap();
        let (script, _) = m.render(&serde_json::Map::new()).unwrap();
        let p = dir.path().join(format!("rendered-{name}.mscr"));
        std::fs::write(&p, script).unwrap();
        files.push(p.display().to_string());
    }
    let mut args = vec!["validate"];
    args.extend(files.iter().map(String::as_str));
    let verdicts = crosscheck(&args, None);
    for f in &files {
        assert_eq!(
            verdicts[f.as_str()],
            serde_json::json!([]),
            "PalmSens' grammar on {f}"
        );
    }
    // Broken scripts: (text, line, col, what the message names, the line PalmSens' grammar
    // reports, None when the grammar accepts it). Lines and columns are the user's file's:
    // comments and the e line count.
    let head = "e\n# a header comment\n#\nvar c\nvar p\n";
    let cases: &[(String, usize, usize, &str, Option<u64>)] = &[
        (format!("{head}meas_loop_cvv p c 0 1 0 10m 1\nendloop\n"), 6, 1, "unknown command", Some(6)),
        // Unclosed: we point at the loop, the grammar at the end of the file.
        (format!("{head}meas_loop_cv p c 0 1 0 10m 1\n  pck_start\n  pck_add p\n  pck_end\n"), 6, 1, "never closed", Some(10)),
        (format!("{head}  set_e q\n"), 6, 9, "q is used before it is declared", None),
        (format!("{head}meas_loop_ca p c 0 100m\nendloop\n"), 6, 1, "takes 5 arguments, not 4", None),
        (format!("{head}var c\n"), 6, 5, "already exists", None),
        (format!("{head}meas_loop_ca p c 0 100m 1\n  meas_loop_ca p c 0 100m 1\n  endloop\nendloop\n"), 7, 3, "cannot be nested", None),
        (format!("{head}store_var c 12q ja\n"), 6, 13, "not a number", None),
        (format!("{head}loop c < 3\nendif\n"), 7, 1, "endif without a matching if", Some(7)),
    ];
    for (i, (text, line, col, what, grammar_line)) in cases.iter().enumerate() {
        let (code, err) = check(dir.path(), text);
        assert_eq!(code, Some(64), "case {i}: {err}");
        assert!(
            err.contains("devices[0].method"),
            "case {i}: the key is named: {err}"
        );
        let at = format!("line {line}, col {col}");
        assert!(
            err.contains(&at) && err.contains(what),
            "case {i}: want {at}: {what}; got {err}"
        );
        let p = dir.path().join(format!("broken-{i}.mscr"));
        std::fs::write(&p, text).unwrap();
        let v = crosscheck(&["validate", p.to_str().unwrap()], None);
        let theirs = v[p.to_str().unwrap()].as_array().unwrap();
        if let Some(gl) = grammar_line {
            let lines: Vec<u64> = theirs.iter().map(|e| e[0].as_u64().unwrap()).collect();
            assert!(
                lines.contains(gl),
                "case {i}: PalmSens' grammar: {theirs:?}"
            );
        } else {
            // Beyond the grammar: declarations, argument counts and nesting, as the
            // device's own checks would find them.
            assert!(theirs.is_empty(), "case {i}: {theirs:?}");
        }
    }
}

#[test]
fn a_device_error_at_run_time_points_at_the_users_file() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let link = dir.path().join("tty");
    let sim = Emstat::start(
        Options {
            speed: 0.0,
            ..Options::default()
        },
        Some(&link),
    )
    .unwrap();
    let script = dir.path().join("div.mscr");
    // Valid as written, fails on the device: a division by a variable that is zero.
    std::fs::write(
        &script,
        "e\n# divide by what the loop measured last\n\nvar c\nvar p\nvar z\nstore_var z 0 ja\n\
         meas_loop_ca p c 100m 100m 500m\n  pck_start\n    pck_add c\n  pck_end\nendloop\n\
         # the faulty line\n   div_var c z\non_finished:\n  cell_off\n",
    )
    .unwrap();
    let cfg = agent_config(
        dir.path(),
        "agent-err",
        &broker.addr(),
        &topics,
        free_port(),
        &device("p", &link, &script),
    );
    let agent = Agent::start(dir.path(), &cfg);
    let mut reader = Reader::new(&broker.addr(), &[topics.events()]);
    let msgs = reader.until("experiment_failed", Duration::from_secs(30), |m| {
        m.iter().any(|x| x.json["event"] == "experiment_failed")
    });
    let failed = msgs
        .iter()
        .find(|x| x.json["event"] == "experiment_failed")
        .unwrap();
    let d = &failed.json["data"];
    assert_eq!(d["error_code"], "0028", "{d}");
    assert_eq!(d["reason"], "device error");
    // The device said line 10 of what it received (comments and blank lines are not
    // sent); that is line 14 of the user's file. The column is the divisor's.
    assert_eq!(d["context"], "Line 10, Col 14", "{d}");
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(14), Some(14)),
        "{d}"
    );
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("line 14, col 14 of div"),
        "{d}"
    );
    drop((agent, sim));
}

/// The driver against a device model nobody on this project wrote: labmcp-palmsens'
/// EmStat Pico simulator (PyPI), served on a pty. It runs CV, LSV, DPV and CA; the same
/// example scripts run unchanged, and a stop command ends a long CA.
#[test]
fn a_third_party_device_model_runs_the_same_scripts_and_stops() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/labmcp_emstat_pty.py");
    let long_ca = dir.path().join("long_ca.mscr");
    std::fs::write(
        &long_ca,
        "e\nvar p\nvar c\nset_pgstat_mode 3\nset_e 200m\ncell_on\nmeas_loop_ca p c 200m 100m 300\n  pck_start\n    pck_add p\n    pck_add c\n  pck_end\nendloop\non_finished:\n  cell_off\n",
    )
    .unwrap();
    let runs: Vec<(&str, PathBuf, &str)> = vec![
        ("cv", examples().join("cv.mscr"), "CV"),
        ("lsv", examples().join("lsv.mscr"), "LSV"),
        ("dpv", examples().join("dpv.mscr"), "DPV"),
        ("ca", examples().join("ca.mscr"), "CA"),
        ("long", long_ca, "CA"),
    ];
    let mut bridges = Vec::new();
    let mut devices = String::new();
    for (name, script, _) in &runs {
        let link = dir.path().join(format!("tty-{name}"));
        let log = dir.path().join(format!("{name}.out"));
        let speed = if *name == "long" { "1" } else { "50" };
        let child = Command::new(python())
            .arg(&tool)
            .arg(&link)
            .arg(&log)
            .arg(speed)
            .spawn()
            .expect("start the third-party simulator");
        bridges.push(KillOnDrop(child));
        for _ in 0..100 {
            if link.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(link.exists(), "the third-party simulator made no pty");
        devices.push_str(&device(&format!("tp-{name}"), &link, script));
    }
    let cfg = agent_config(
        dir.path(),
        "agent-tp",
        &broker.addr(),
        &topics,
        free_port(),
        &devices,
    );
    let agent = Agent::start(dir.path(), &cfg);
    let mut reader = Reader::new(
        &broker.addr(),
        &[topics.events(), topics.data(), topics.results()],
    );
    let sender = Sender::new(&broker.addr());
    wait_until_commands_answered(&sender, &mut reader, &topics.commands(), "agent-tp");
    let data_lines = |name: &str| -> Vec<String> {
        std::fs::read_to_string(dir.path().join(format!("{name}.out")))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with('P'))
            .map(String::from)
            .collect()
    };
    let kafka_points = |m: &[Msg], id: &str| -> usize {
        m.iter()
            .filter(|x| x.json["device_id"] == id && x.json["type"] == "echem_data")
            .map(|x| x.json["points"].as_array().map_or(0, Vec::len))
            .sum()
    };
    let msgs = reader
        .until(
            "the four short runs, complete",
            Duration::from_secs(60),
            |m| {
                runs.iter().filter(|r| r.0 != "long").all(|(name, _, _)| {
                    let id = format!("tp-{name}");
                    let done = m.iter().any(|x| {
                        x.json["device_id"] == id.as_str()
                            && x.json["event"] == "experiment_completed"
                    });
                    let n = kafka_points(m, &id);
                    done && n > 0 && n == data_lines(name).len()
                })
            },
        )
        .to_vec();
    for (name, _, technique) in runs.iter().filter(|r| r.0 != "long") {
        let id = format!("tp-{name}");
        let lines = data_lines(name);
        let theirs = crosscheck(&["decode"], Some(&(lines.join("\n") + "\n")));
        let mut records: Vec<&Msg> = msgs
            .iter()
            .filter(|m| m.json["device_id"] == id.as_str() && m.json["type"] == "echem_data")
            .collect();
        records.sort_by_key(|m| m.json["seq"].as_u64());
        let points: Vec<&Value> = records
            .iter()
            .flat_map(|r| r.json["points"].as_array().unwrap())
            .collect();
        assert!(
            records.iter().all(|r| r.json["technique"] == *technique),
            "{id}"
        );
        for (k, (p, t)) in points.iter().zip(theirs.as_array().unwrap()).enumerate() {
            for var in t.as_array().unwrap() {
                let (code, v) = (var[0].as_str().unwrap(), var[1].as_f64().unwrap());
                let field = match code {
                    "da" => "e",
                    "ba" => "i",
                    "eb" => "t",
                    other => panic!("{id}: unexpected {other}"),
                };
                assert!(
                    close(p[field].as_f64().unwrap(), v),
                    "{id}: point {k} {field}: {p} vs {v}"
                );
            }
            if *name == "ca" {
                assert_eq!(p["e"], 0.3, "{id}: the applied potential");
            }
        }
    }
    // A stop command ends the long CA on the third-party model: Z, on_finished, the end.
    let command = serde_json::json!({"type":"command","command":"stop","command_id":"tp-stop","params":{},"target":{"agent":"agent-tp","device":"tp-long"}});
    reader.until("the long run under way", Duration::from_secs(30), |m| {
        kafka_points(m, "tp-long") > 5
    });
    sender.send(&topics.commands(), "agent-tp", &command.to_string());
    let msgs = reader.until("the long run stopped", Duration::from_secs(30), |m| {
        m.iter()
            .any(|x| x.json["device_id"] == "tp-long" && x.json["event"] == "experiment_stopped")
            && m.iter()
                .any(|x| x.json["command_id"] == "tp-stop" && x.json["status"] == "completed")
    });
    let stopped = msgs
        .iter()
        .find(|x| x.json["device_id"] == "tp-long" && x.json["event"] == "experiment_stopped")
        .unwrap();
    assert_eq!(
        stopped.json["data"]["reason"], "stop command",
        "{}",
        stopped.json
    );
    assert_eq!(stopped.json["data"]["command_id"], "tp-stop");
    let sent = data_lines("long").len();
    assert!(sent < 3000, "the run was cut short: {sent} of 3000 points");
    drop((agent, bridges));
}
