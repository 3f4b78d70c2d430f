//! The simulated cell's chemistry, shared by the `simulated_potentiostat` device and the
//! EmStat protocol simulator so that both speak the same physics.
//!
//! CV currents come from a one-dimensional diffusion model of a reversible couple
//! (R → O + e⁻, equal diffusion coefficients) solved with explicit finite differences
//! under a Nernstian surface condition, plus double-layer charging and noise: the
//! voltammogram has the familiar anodic and cathodic peaks with diffusion tails. CA is the
//! Cottrell transient at the applied potential; LSV a single sweep.

use serde::{Deserialize, Serialize};

use super::rng::Rng;
use crate::record::Point;

const FARADAY: f64 = 96_485.332;
/// F / RT at 25 °C, 1/V.
const F_RT: f64 = 38.921;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "technique", rename_all = "snake_case", deny_unknown_fields)]
/// One step of a simulated experiment.
pub enum Step {
    /// Cyclic voltammetry: begin → vertex1 → vertex2 → begin, `n_scans` times.
    Cv {
        /// Start and end potential, V.
        e_begin: f64,
        /// First turning potential, V.
        e_vertex1: f64,
        /// Second turning potential, V.
        e_vertex2: f64,
        /// Potential step, V.
        e_step: f64,
        /// V/s.
        scan_rate: f64,
        #[serde(default = "one")]
        /// Scans, 1 or more.
        n_scans: u32,
    },
    /// Chronoamperometry: hold `e_dc` for `t_run` s, a point every `t_interval` s.
    Ca {
        /// The applied potential, V.
        e_dc: f64,
        /// s between points.
        t_interval: f64,
        /// s in all.
        t_run: f64,
    },
    /// Linear sweep voltammetry: `e_begin` → `e_end`.
    Lsv {
        /// Start potential, V.
        e_begin: f64,
        /// End potential, V.
        e_end: f64,
        /// Potential step, V.
        e_step: f64,
        /// V/s.
        scan_rate: f64,
    },
}

fn one() -> u32 {
    1
}

impl Step {
    /// The technique as records name it.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Cv { .. } => "CV",
            Step::Ca { .. } => "CA",
            Step::Lsv { .. } => "LSV",
        }
    }
}

/// The electrode and solution of the simulated cell.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cell {
    e0: f64,
    /// Electrode area, cm².
    area: f64,
    /// Bulk concentration, mol/cm³ (1 mM).
    conc: f64,
    /// Diffusion coefficient, cm²/s.
    diff: f64,
    /// Double-layer capacitance, F/cm².
    cdl: f64,
}

impl Cell {
    pub(crate) fn new(e0: f64) -> Cell {
        Cell {
            e0,
            area: 0.0707,
            conc: 1e-6,
            diff: 1e-5,
            cdl: 20e-6,
        }
    }

    /// Fraction of the couple in the oxidised form at the surface (Nernst).
    fn surface_ox(&self, e: f64) -> f64 {
        1.0 / (1.0 + (-F_RT * (e - self.e0)).exp())
    }
}

/// Explicit finite-difference diffusion of the oxidised form (normalised to the bulk
/// concentration of the reduced form).
struct Diffusion {
    u: Vec<f64>,
    next: Vec<f64>,
    dx: f64,
    dt: f64,
    lambda: f64,
}

impl Diffusion {
    fn new(cell: &Cell, t_total: f64) -> Diffusion {
        let n = 120;
        let len = 6.0 * (cell.diff * t_total.max(1e-3)).sqrt();
        let dx = len / n as f64;
        let dt = 0.45 * dx * dx / cell.diff;
        Diffusion {
            u: vec![0.0; n + 1],
            next: vec![0.0; n + 1],
            dx,
            dt,
            lambda: cell.diff * dt / (dx * dx),
        }
    }

    /// Advances `dt_total` seconds with the surface held at `u0`; returns the faradaic
    /// current density factor d(u)/dx at the surface (positive = anodic).
    fn advance(&mut self, mut dt_total: f64, u0: f64) -> f64 {
        let n = self.u.len() - 1;
        while dt_total > 1e-15 {
            let dt = dt_total.min(self.dt);
            let lam = self.lambda * dt / self.dt;
            self.u[0] = u0;
            self.next[0] = u0;
            for j in 1..n {
                self.next[j] = self.u[j] + lam * (self.u[j + 1] - 2.0 * self.u[j] + self.u[j - 1]);
            }
            self.next[n] = 0.0;
            std::mem::swap(&mut self.u, &mut self.next);
            dt_total -= dt;
        }
        self.u[0] = u0;
        (3.0 * self.u[0] - 4.0 * self.u[1] + self.u[2]) / (2.0 * self.dx)
    }
}

/// The points of one step, generated lazily.
pub(crate) struct StepGen {
    /// (t, E) plan; the current is computed as time advances.
    pub(crate) points: Vec<(f64, f64)>,
    /// Index of the next point.
    pub(crate) k: usize,
    cell: Cell,
    diffusion: Option<Diffusion>,
    last_t: f64,
    scan_rate: f64,
    /// CV scan boundaries: index of the first point of each scan.
    scan_starts: Vec<usize>,
    ca: bool,
}

impl StepGen {
    pub(crate) fn new(step: &Step, cell: Cell) -> StepGen {
        match *step {
            Step::Cv {
                e_begin,
                e_vertex1,
                e_vertex2,
                e_step,
                scan_rate,
                n_scans,
            } => {
                let mut es = Vec::new();
                let mut scan_starts = Vec::new();
                for _ in 0..n_scans {
                    scan_starts.push(es.len());
                    ramp(&mut es, e_begin, e_vertex1, e_step);
                    ramp(&mut es, e_vertex1, e_vertex2, e_step);
                    ramp(&mut es, e_vertex2, e_begin, e_step);
                }
                es.push(e_begin);
                StepGen::sweep(es, e_step / scan_rate, scan_rate, scan_starts, cell)
            }
            Step::Lsv {
                e_begin,
                e_end,
                e_step,
                scan_rate,
            } => {
                let mut es = Vec::new();
                ramp(&mut es, e_begin, e_end, e_step);
                es.push(e_end);
                StepGen::sweep(es, e_step / scan_rate, scan_rate, vec![0], cell)
            }
            Step::Ca {
                e_dc,
                t_interval,
                t_run,
            } => {
                let n = (t_run / t_interval).round() as usize;
                let points = (1..=n).map(|i| (i as f64 * t_interval, e_dc)).collect();
                StepGen {
                    points,
                    k: 0,
                    cell,
                    diffusion: None,
                    last_t: 0.0,
                    scan_rate: 0.0,
                    scan_starts: vec![0],
                    ca: true,
                }
            }
        }
    }

    /// A potential sweep: potentials `es`, one every `dt` seconds.
    fn sweep(
        es: Vec<f64>,
        dt: f64,
        scan_rate: f64,
        scan_starts: Vec<usize>,
        cell: Cell,
    ) -> StepGen {
        let points: Vec<(f64, f64)> = es
            .iter()
            .enumerate()
            .map(|(i, e)| (i as f64 * dt, *e))
            .collect();
        let t_total = points.last().map_or(1.0, |p| p.0);
        StepGen {
            diffusion: Some(Diffusion::new(&cell, t_total)),
            points,
            k: 0,
            cell,
            last_t: 0.0,
            scan_rate,
            scan_starts,
            ca: false,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.points.len()
    }

    /// Scan number (0-based) of point `k`.
    pub(crate) fn scan_of(&self, k: usize) -> usize {
        self.scan_starts.iter().rposition(|s| *s <= k).unwrap_or(0)
    }

    pub(crate) fn next(&mut self, rng: &mut Rng, noise: f64) -> Option<Point> {
        let (t, e) = *self.points.get(self.k)?;
        let c = self.cell;
        let nfac = FARADAY * c.area * c.conc;
        let i = if self.ca {
            // Cottrell at the applied potential's surface ratio.
            nfac * (c.diff / (std::f64::consts::PI * t)).sqrt() * c.surface_ox(e)
        } else {
            let dt = t - self.last_t;
            let grad = match self.diffusion.as_mut() {
                Some(d) => d.advance(dt, c.surface_ox(e)),
                None => 0.0,
            };
            let direction = match self.points.get(self.k + 1) {
                Some(&(_, e_next)) => (e_next - e).signum(),
                None => 0.0,
            };
            nfac * c.diff * grad + c.cdl * c.area * self.scan_rate * direction
        };
        self.last_t = t;
        self.k += 1;
        let i = i * (1.0 + noise * rng.symmetric()) + 1e-9 * noise * rng.symmetric();
        Some(Point::tei(t, e, i))
    }
}

/// The points of one step as the simulated cell produces them, with noise; shared with
/// the EmStat protocol simulator so both speak the same chemistry.
pub struct Generator {
    gen: StepGen,
    rng: Rng,
    noise: f64,
}

impl Generator {
    /// Points of `step` on a cell with formal potential `e0`, with seeded noise.
    pub fn new(step: &Step, e0: f64, noise: f64, seed: u64) -> Generator {
        Generator {
            gen: StepGen::new(step, Cell::new(e0)),
            rng: Rng::new(seed),
            noise,
        }
    }

    /// Points in the step.
    pub fn len(&self) -> usize {
        self.gen.len()
    }

    /// True when the step has no points.
    pub fn is_empty(&self) -> bool {
        self.gen.len() == 0
    }

    /// Index of the next point.
    pub fn position(&self) -> usize {
        self.gen.k
    }

    /// Scan (0-based) of point `k`.
    pub fn scan_of(&self, k: usize) -> usize {
        self.gen.scan_of(k)
    }

    /// The next point, or None at the end of the step.
    pub fn next_point(&mut self) -> Option<Point> {
        self.gen.next(&mut self.rng, self.noise)
    }
}

fn ramp(out: &mut Vec<f64>, from: f64, to: f64, step: f64) {
    let n = ((to - from).abs() / step).round() as usize;
    let dir = (to - from).signum();
    for j in 0..n {
        out.push(from + dir * step * j as f64);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One CV scan from −0.2 V to 0.6 V and back at 100 mV/s (also used by the driver's
    /// tests).
    pub(crate) fn cv() -> Step {
        Step::Cv {
            e_begin: -0.2,
            e_vertex1: 0.6,
            e_vertex2: -0.2,
            e_step: 0.005,
            scan_rate: 0.1,
            n_scans: 1,
        }
    }

    #[test]
    fn cv_has_an_anodic_peak_near_e0_and_a_cathodic_return_peak() {
        let mut g = StepGen::new(&cv(), Cell::new(0.2));
        let mut rng = Rng::new(1);
        let pts: Vec<Point> = std::iter::from_fn(|| g.next(&mut rng, 0.0)).collect();
        let (imax, pmax) = pts
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.i.total_cmp(&b.1.i))
            .unwrap();
        let pmin = pts.iter().min_by(|a, b| a.i.total_cmp(&b.i)).unwrap();
        // Reversible couple: anodic peak ~28.5 mV above E0 (n = 1) on the forward scan,
        // cathodic peak ~28.5 mV below on the return; ip ~ 20 µA for 1 mM, 0.07 cm², 0.1 V/s.
        assert!(
            (pmax.e - 0.2285).abs() < 0.02,
            "anodic peak at {} V",
            pmax.e
        );
        assert!(imax < pts.len() / 2, "anodic peak on the forward scan");
        assert!(
            (pmin.e - 0.1715).abs() < 0.02,
            "cathodic peak at {} V",
            pmin.e
        );
        assert!(pmax.i > 1.2e-5 && pmax.i < 3e-5, "ip = {}", pmax.i);
        assert!(pmin.i < -0.6 * pmax.i && pmin.i < 0.0);
        // Diffusion tail: current past the peak falls but stays anodic.
        let tail = pts
            .iter()
            .find(|p| p.e > 0.55 && p.t < pts[pts.len() / 2].t)
            .unwrap();
        assert!(tail.i > 0.3 * pmax.i && tail.i < pmax.i);
    }

    #[test]
    fn lsv_rises_to_a_peak_and_ends_at_e_end() {
        let step = Step::Lsv {
            e_begin: -0.2,
            e_end: 0.6,
            e_step: 0.005,
            scan_rate: 0.1,
        };
        let mut g = Generator::new(&step, 0.2, 0.0, 1);
        let pts: Vec<Point> = std::iter::from_fn(|| g.next_point()).collect();
        assert_eq!(pts.len(), 161);
        assert!((pts.last().unwrap().e - 0.6).abs() < 1e-9);
        let peak = pts.iter().max_by(|a, b| a.i.total_cmp(&b.i)).unwrap();
        assert!((peak.e - 0.2285).abs() < 0.02, "peak at {}", peak.e);
    }

    #[test]
    fn ca_follows_cottrell_decay() {
        let step = Step::Ca {
            e_dc: 0.6,
            t_interval: 0.1,
            t_run: 2.0,
        };
        let mut g = StepGen::new(&step, Cell::new(0.2));
        let mut rng = Rng::new(2);
        let pts: Vec<Point> = std::iter::from_fn(|| g.next(&mut rng, 0.0)).collect();
        assert_eq!(pts.len(), 20);
        // i ∝ t^-1/2: quadrupling t halves i.
        let ratio = pts[0].i / pts[3].i;
        assert!((ratio - 2.0).abs() < 1e-6, "{ratio}");
    }
}
