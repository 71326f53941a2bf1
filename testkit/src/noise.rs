//! Deterministic, incompressible-looking bytes for test fixtures and benchmark payloads: the
//! same on every run and machine, with no random-number dependency.

/// A xorshift64 generator.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Noise {
        // xorshift never leaves zero.
        Noise(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}
