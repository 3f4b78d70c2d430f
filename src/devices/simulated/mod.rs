//! Simulated devices and their physics: for users without hardware, the demo and the
//! tests. The protocol simulators in `crate::sim` use the same chemistry (`cell`) and
//! noise (`rng`), so a simulated instrument and the EmStat simulator agree.

pub mod cell;
pub mod potentiostat;
pub mod rng;
pub mod sensors;

pub use rng::Rng;
