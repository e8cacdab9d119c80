//! Shared by the integration tests.

/// Deterministic pseudo-random books of the given lengths over a vocabulary of `vocab` ids.
pub fn books(lengths: &[usize], vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut seed = seed;
    lengths
        .iter()
        .map(|&n| {
            seed = seed.wrapping_add(1);
            streamppl::model::random::random_tokens(n, vocab, seed)
        })
        .collect()
}
