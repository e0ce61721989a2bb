//! A tiny seeded PRNG (splitmix64). The whole simulation is a pure function
//! of the seed, so a failure seen once can be replayed forever.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64) < p * (1u64 << 53) as f64
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.next_u64() as usize % items.len()]
    }

    /// A random subset of `items` with at least one member and at least one
    /// left out (`items` must have two or more).
    pub fn split<T: Copy>(&mut self, items: &[T]) -> (Vec<T>, Vec<T>) {
        loop {
            let (a, b): (Vec<T>, Vec<T>) = items.iter().partition(|_| self.chance(0.5));
            if !a.is_empty() && !b.is_empty() {
                return (a, b);
            }
        }
    }
}
