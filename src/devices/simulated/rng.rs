//! Seedable noise for the simulated devices and the protocol simulators.

/// SplitMix64: a small, fast, seedable generator for simulated noise.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (the same seed gives the same noise).
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// A generator seeded from the clock.
    pub fn from_time() -> Rng {
        Rng(crate::record::unix_us(std::time::SystemTime::now()) ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn symmetric(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}
