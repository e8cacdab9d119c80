//! Shared by the integration tests.

/// Deterministic pseudo-random books of the given lengths over a vocabulary of `vocab` ids.
pub fn books(lengths: &[usize], vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut x = seed;
    lengths
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}
