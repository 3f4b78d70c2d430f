//! What the simulated cell answers to each MethodSCRIPT measurement loop: the samples of
//! a loop, each with its time from the loop's start and one value per output variable.
//!
//! Sweeps (CV, LSV) and CA come from the diffusion model the simulated potentiostat
//! uses. The pulse techniques use the closed-form pulse currents of a reversible couple
//! (a sigmoidal wave; DPV and SWV differences peak at E°), CP the Sand equation, EIS and
//! GEIS a Randles circuit, OCP a slowly settling rest potential.

use std::f64::consts::FRAC_1_SQRT_2;

use crate::devices::simulated::cell::{Generator, Step};
use crate::devices::simulated::rng::Rng;

/// Formal potential of the simulated couple, V.
pub const E0: f64 = 0.2;
const F_RT: f64 = 38.921;
/// Cottrell factor n F A C √D for 1 mM, 0.0707 cm², D = 1e-5 cm²/s, in A·s^½.
const COTTRELL: f64 = 96_485.332 * 0.0707 * 1e-6 * 0.003_162_277_7;
/// Randles circuit: solution resistance, charge transfer, double layer, Warburg σ.
const RS: f64 = 100.0;
const RCT: f64 = 1_000.0;
const CDL: f64 = 20e-6;
const SIGMA: f64 = 150.0;

/// One sample: seconds from the loop start, the value of each output variable (in the
/// command's order), the scan it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Seconds from the start of the loop.
    pub dt: f64,
    /// Output values, one per output argument (for MUX: one per channel after the
    /// potential).
    pub outs: Vec<f64>,
    /// Scan (CV with nscans).
    pub scan: usize,
}

/// Why a loop cannot run.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// Device error code.
    pub code: u16,
    /// Index of the offending argument (0 = the command).
    pub arg: usize,
}

/// A loop's samples, made as the loop asks for them: a one-hour CA at 1 ms is 3.6 million
/// points; only the sweeps (bounded by their potential range) are planned up front.
pub struct Samples {
    inner: Inner,
}

enum Inner {
    List(std::vec::IntoIter<Sample>),
    Cell {
        gen: Generator,
        scale: f64,
        k: usize,
    },
    Timed {
        technique: &'static str,
        args: Vec<f64>,
        n: usize,
        k: usize,
        interval: f64,
        rng: Rng,
        scale: f64,
        mux: (u32, u32),
    },
}

/// Points a time-based loop may have (about 28 hours at 1 ms).
const MAX_TIMED: f64 = 100_000_000.0;

impl Iterator for Samples {
    type Item = Sample;

    fn next(&mut self) -> Option<Sample> {
        match &mut self.inner {
            Inner::List(it) => it.next(),
            Inner::Cell { gen, scale, k } => {
                let p = gen.next_point()?;
                let scan = gen.scan_of(*k);
                *k += 1;
                Some(Sample {
                    dt: p.t,
                    outs: vec![p.e, p.i * *scale],
                    scan,
                })
            }
            Inner::Timed {
                technique,
                args,
                n,
                k,
                interval,
                rng,
                scale,
                mux,
            } => {
                if *k >= *n {
                    return None;
                }
                *k += 1;
                let t = *interval * *k as f64;
                Some(Sample {
                    dt: t,
                    outs: timed(technique, args, t, *scale, *mux, rng),
                    scan: 0,
                })
            }
        }
    }
}

/// The pulse current of the reversible couple at potential `e`, `t_p` s after a step.
fn pulse_current(scale: f64, e: f64, t_p: f64) -> f64 {
    scale * COTTRELL
        / (std::f64::consts::PI * t_p.max(1e-4)).sqrt()
        / (1.0 + (-F_RT * (e - E0)).exp())
}

fn noisy(rng: &mut Rng, v: f64) -> f64 {
    v * (1.0 + 0.003 * rng.symmetric())
}

/// One sample of a time-based loop, `t` s into it.
fn timed(
    technique: &str,
    args: &[f64],
    t: f64,
    scale: f64,
    mux: (u32, u32),
    rng: &mut Rng,
) -> Vec<f64> {
    let a = |i: usize| args.get(i).copied().unwrap_or(0.0);
    match technique {
        // Cottrell at the applied potential's surface ratio.
        "CA" => vec![a(0), noisy(rng, pulse_current(scale, a(0), t))],
        "OCP" => vec![noisy(rng, E0 + 0.03 * (-t / 5.0).exp())],
        "CP" => {
            // Sand: the potential climbs as the surface empties, τ at the end.
            let i = a(0);
            let tau = (COTTRELL * scale * std::f64::consts::PI.sqrt() / (2.0 * i.abs().max(1e-12)))
                .powi(2);
            let r = (t.sqrt() / (tau.sqrt() - t.sqrt()).max(1e-3)).max(1e-9);
            let e = (E0 + i.signum() * r.ln() / F_RT).clamp(-2.0, 2.0) + RS * i;
            vec![noisy(rng, e), i]
        }
        "PAD" => {
            let (dc, pulse, t_p) = (a(0), a(1), a(2));
            let i_dc = pulse_current(scale, dc, t);
            let i_pulse = pulse_current(scale, pulse, t_p);
            let i = match args.get(5).copied().unwrap_or(1.0) as i64 {
                2 => i_pulse,
                3 => i_pulse - i_dc,
                _ => i_dc,
            };
            vec![dc, noisy(rng, i)]
        }
        _ => {
            // CA on alternating MUX channels: the potential, one current per channel.
            let mut outs = vec![a(0)];
            for ch in mux.0..=mux.1 {
                let s = 1.0 + 0.15 * f64::from(ch.saturating_sub(1));
                outs.push(noisy(rng, s * pulse_current(1.0, a(0), t)));
            }
            outs
        }
    }
}

/// The measurement loop's samples. `outs` is the number of output arguments, `args` the
/// input values that follow them, `nscans` the option, `channel_scale` the MUX channel's
/// cell (1 = the plain cell).
pub fn samples(
    technique: &str,
    args: &[f64],
    nscans: u32,
    channel: u32,
    mux: (u32, u32),
    seed: u64,
) -> Result<Samples, Refused> {
    let bad = |arg: usize| Refused { code: 0x0007, arg };
    let scale = 1.0 + 0.15 * f64::from(channel.saturating_sub(1));
    let mut rng = Rng::new(seed ^ u64::from(channel));
    let need = |n: usize| {
        if args.len() < n {
            Err(bad(args.len() + 1))
        } else {
            Ok(())
        }
    };
    let positive = |i: usize| {
        if args[i] > 0.0 && args[i].is_finite() {
            Ok(args[i])
        } else {
            Err(bad(i + 1))
        }
    };
    let count = |span: f64, step: f64| -> Result<usize, Refused> {
        let n = (span.abs() / step).round();
        if !(n.is_finite() && n < 2_000_000.0) {
            return Err(bad(0));
        }
        Ok(n as usize + 1)
    };
    let wave = |e: f64, t_p: f64| pulse_current(scale, e, t_p);
    let mut out = Vec::new();
    match technique {
        "CV" | "LSV" => {
            let step = if technique == "CV" {
                need(5)?;
                Step::Cv {
                    e_begin: args[0],
                    e_vertex1: args[1],
                    e_vertex2: args[2],
                    e_step: positive(3)?,
                    scan_rate: positive(4)?,
                    n_scans: nscans.max(1),
                }
            } else {
                need(4)?;
                Step::Lsv {
                    e_begin: args[0],
                    e_end: args[1],
                    e_step: positive(2)?,
                    scan_rate: positive(3)?,
                }
            };
            // Refuse before building: the generator plans every potential.
            let n = match (technique, args) {
                ("CV", [b, v1, v2, st, ..]) => {
                    ((v1 - b).abs() + (v2 - v1).abs() + (b - v2).abs()) / st
                        * f64::from(nscans.max(1))
                }
                (_, [b, e, st, ..]) => (e - b).abs() / st,
                _ => f64::NAN,
            };
            if !(n.is_finite() && n < 2_000_000.0) {
                return Err(bad(0));
            }
            return Ok(Samples {
                inner: Inner::Cell {
                    gen: Generator::new(&step, E0, 0.01, seed ^ u64::from(channel)),
                    scale,
                    k: 0,
                },
            });
        }
        "DPV" | "NPV" | "SWV" | "ACV" => {
            // begin end step … : one sample per step
            need(3)?;
            let (begin, end, step) = (args[0], args[1], positive(2)?);
            let n = count(end - begin, step)?;
            let dir = if end >= begin { 1.0 } else { -1.0 };
            let interval = match technique {
                "DPV" => {
                    need(6)?;
                    step / positive(5)?
                }
                "NPV" => {
                    need(5)?;
                    step / positive(4)?
                }
                "SWV" => {
                    need(5)?;
                    1.0 / positive(4)?
                }
                _ => {
                    need(6)?;
                    step / positive(3)?
                }
            };
            for k in 0..n {
                let e = begin + dir * step * k as f64;
                let outs = match technique {
                    "DPV" => {
                        let (pulse, t_p) = (args[3], positive(4)?);
                        let di = wave(e + pulse, t_p) - wave(e, t_p);
                        vec![e, noisy(&mut rng, di)]
                    }
                    "NPV" => vec![e, noisy(&mut rng, wave(e, positive(3)?))],
                    "SWV" => {
                        let (amp, freq) = (args[3], positive(4)?);
                        let t_p = 0.5 / freq;
                        let fwd = noisy(&mut rng, wave(e + amp, t_p));
                        let rev = noisy(&mut rng, wave(e - amp, t_p));
                        vec![e, fwd - rev, fwd, rev]
                    }
                    _ => {
                        // ACV: DC current on the wave, AC current ∝ its slope at E.
                        let (amp, freq) = (args[4], positive(5)?);
                        let x = (F_RT * (e - E0)).exp();
                        let slope = F_RT * x / (1.0 + x).powi(2);
                        let i_ac = noisy(
                            &mut rng,
                            scale * COTTRELL * amp * slope * (std::f64::consts::PI * freq).sqrt(),
                        );
                        let i_dc = noisy(&mut rng, wave(e, interval));
                        let z = amp / i_ac.abs().max(1e-15);
                        vec![e, i_dc, amp, i_ac, z * FRAC_1_SQRT_2, -z * FRAC_1_SQRT_2]
                    }
                };
                out.push(Sample {
                    dt: interval * (k + 1) as f64,
                    outs,
                    scan: 0,
                });
            }
        }
        "CA" | "CP" | "OCP" | "PAD" | "CA_MUX" => {
            let (interval, run) = match technique {
                "OCP" => {
                    need(2)?;
                    (positive(0)?, positive(1)?)
                }
                "PAD" => {
                    need(5)?;
                    positive(2)?;
                    (positive(3)?, positive(4)?)
                }
                "CA_MUX" => {
                    need(5)?;
                    (positive(1)?, positive(2)?)
                }
                _ => {
                    need(3)?;
                    (positive(1)?, positive(2)?)
                }
            };
            let n = (run / interval).round();
            if !(n.is_finite() && n < MAX_TIMED) {
                return Err(bad(0));
            }
            let technique = match technique {
                "CA" => "CA",
                "CP" => "CP",
                "OCP" => "OCP",
                "PAD" => "PAD",
                _ => "CA_MUX",
            };
            return Ok(Samples {
                inner: Inner::Timed {
                    technique,
                    args: args.to_vec(),
                    n: (n as usize).max(1),
                    k: 0,
                    interval,
                    rng,
                    scale,
                    mux,
                },
            });
        }
        "LSP" => {
            need(4)?;
            let (begin, end, step) = (args[0], args[1], positive(2)?);
            let n = count(end - begin, step)?;
            let dir = if end >= begin { 1.0 } else { -1.0 };
            let interval = step / positive(3)?;
            let i_lim = scale * 50e-3;
            for k in 0..n {
                let i = begin + dir * step * k as f64;
                let r = ((i_lim + i) / (i_lim - i).max(1e-12)).max(1e-12);
                let e = E0 + r.ln() / F_RT + RS * i;
                out.push(Sample {
                    dt: interval * (k + 1) as f64,
                    outs: vec![noisy(&mut rng, e), i],
                    scan: 0,
                });
            }
        }
        "EIS" | "GEIS" => {
            need(4)?;
            let (f_start, f_end) = (positive(1)?, positive(2)?);
            let n = args[3];
            if !((1.0..=10_000.0).contains(&n) && n.fract() == 0.0) {
                return Err(bad(4));
            }
            let n = n as usize;
            let mut dt = 0.0;
            for k in 0..n {
                let f = if n == 1 {
                    f_start
                } else {
                    f_start * (f_end / f_start).powf(k as f64 / (n - 1) as f64)
                };
                let (re, im) = randles(f, scale);
                dt += (2.0 / f).max(0.02);
                out.push(Sample {
                    dt,
                    outs: vec![f, noisy(&mut rng, re), noisy(&mut rng, im)],
                    scan: 0,
                });
            }
        }
        _ => {
            return Err(Refused {
                code: 0x001B,
                arg: 0,
            })
        }
    }
    Ok(Samples {
        inner: Inner::List(out.into_iter()),
    })
}

/// Impedance of the Randles circuit at `f` Hz (Z′, Z″; capacitive Z″ is negative), with
/// the channel's scale on the faradaic branch.
pub fn randles(f: f64, scale: f64) -> (f64, f64) {
    let w = 2.0 * std::f64::consts::PI * f;
    // Faradaic branch: Rct + σ ω^-½ (1 − j).
    let (fr, fi) = (RCT / scale + SIGMA / w.sqrt(), -SIGMA / w.sqrt());
    // Its admittance plus jωC.
    let d = fr * fr + fi * fi;
    let (yr, yi) = (fr / d, -fi / d + w * CDL);
    let dy = yr * yr + yi * yi;
    (RS + yr / dy, -yi / dy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulse_techniques_peak_near_e0() {
        for (tech, args) in [
            ("DPV", vec![-0.3, 0.7, 0.01, 0.05, 0.01, 0.1]),
            ("SWV", vec![-0.3, 0.7, 0.01, 0.025, 10.0]),
        ] {
            let s: Vec<Sample> = samples(tech, &args, 1, 1, (1, 1), 3).unwrap().collect();
            assert_eq!(s.len(), 101);
            let peak = s
                .iter()
                .max_by(|a, b| a.outs[1].total_cmp(&b.outs[1]))
                .unwrap();
            assert!(
                (peak.outs[0] - E0).abs() < 0.05,
                "{tech} peak at {}",
                peak.outs[0]
            );
            assert!(peak.outs[1] > 1e-6, "{tech} peak current {}", peak.outs[1]);
        }
        let swv: Vec<Sample> = samples("SWV", &[-0.3, 0.7, 0.01, 0.025, 10.0], 1, 1, (1, 1), 3)
            .unwrap()
            .collect();
        assert!(swv
            .iter()
            .all(|s| (s.outs[1] - (s.outs[2] - s.outs[3])).abs() < 1e-15));
    }

    #[test]
    fn randles_is_rs_at_high_and_grows_at_low_frequency() {
        let (re_hi, im_hi) = randles(1e6, 1.0);
        assert!((re_hi - RS).abs() < 1.0 && im_hi.abs() < 5.0);
        let (re_lo, im_lo) = randles(0.1, 1.0);
        assert!(re_lo > RS + RCT && im_lo < 0.0);
        let eis: Vec<Sample> = samples("EIS", &[0.01, 1e5, 0.1, 31.0, 0.2], 1, 1, (1, 1), 1)
            .unwrap()
            .collect();
        assert_eq!(eis.len(), 31);
        assert!((eis[0].outs[0] - 1e5).abs() < 1e-6 && (eis[30].outs[0] - 0.1).abs() < 1e-9);
    }

    #[test]
    fn bad_arguments_are_refused_not_panics() {
        assert!(samples("CV", &[0.0, 1.0], 1, 1, (1, 1), 1).is_err());
        assert!(samples("CA", &[0.0, 0.0, 1.0], 1, 1, (1, 1), 1).is_err());
        assert!(samples("EIS", &[0.01, 1e5, 1.0, 0.5], 1, 1, (1, 1), 1).is_err());
        assert!(samples("LSV", &[0.0, 1e12, 1e-12, 1.0], 1, 1, (1, 1), 1).is_err());
        assert!(samples("XYZ", &[], 1, 1, (1, 1), 1).is_err());
    }
}
