//! Seeded test and benchmark inputs (no randomness crate: the same values on every
//! machine and in every language that reimplements this generator).

/// `n` values uniform in [-1, 1), from a 64-bit LCG seeded with `seed`.
pub fn uniform_pm1(n: usize, seed: u64) -> Vec<f32> {
    const MUL: u64 = 6364136223846793005;
    const INC: u64 = 1442695040888963407;
    let mut s = seed.wrapping_mul(MUL).wrapping_add(INC);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(MUL).wrapping_add(INC);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
