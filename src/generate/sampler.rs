//! Picks the next token from the model's log-probabilities: greedy (the default), or sampled at
//! a temperature within the top-p nucleus from a seeded generator, so a run is reproducible.

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 is greedy (the most likely token; the lowest id among equals).
    pub temperature: f32,
    /// Sample among the most likely tokens whose probabilities add up to at least this.
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };

    /// The options as the command line gives them; the error names the fix.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> anyhow::Result<Self> {
        if !(temperature >= 0.0 && temperature.is_finite()) {
            anyhow::bail!("--temperature {temperature}: give 0 (greedy) or a positive number");
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            anyhow::bail!("--top-p {top_p}: give a number in (0, 1]");
        }
        Ok(Sampling {
            temperature,
            top_p,
            seed,
        })
    }
}

/// A [`Sampling`] with its generator's state.
pub struct Sampler {
    sampling: Sampling,
    state: u64,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        Sampler {
            sampling,
            state: sampling.seed,
        }
    }

    /// The generator's state (a checkpoint saves it).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// Puts back a state [`Sampler::state`] returned.
    pub fn set_state(&mut self, state: u64) {
        self.state = state;
    }

    /// The next token given the log-probabilities of every token.
    pub fn pick(&mut self, log_probs: &[f32]) -> u32 {
        if self.sampling.temperature == 0.0 {
            return greedy(log_probs);
        }
        // Scaled probabilities, most likely first, cut to the nucleus.
        let t = self.sampling.temperature;
        let max = log_probs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut ranked: Vec<(u32, f64)> = (log_probs.iter().enumerate())
            .map(|(id, &lp)| (id as u32, (((lp - max) / t) as f64).exp()))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = ranked.iter().map(|r| r.1).sum();
        let mut kept = 0.0;
        let mut n = 0;
        for r in &ranked {
            kept += r.1;
            n += 1;
            if kept >= self.sampling.top_p as f64 * total {
                break;
            }
        }
        let mut u = self.uniform() * kept;
        for &(id, p) in &ranked[..n] {
            if u < p {
                return id;
            }
            u -= p;
        }
        ranked[n - 1].0
    }

    /// A uniform number in [0, 1) from SplitMix64.
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The most likely token, the lowest id among equals.
fn greedy(log_probs: &[f32]) -> u32 {
    let mut best = 0;
    for (id, &lp) in log_probs.iter().enumerate() {
        if lp > log_probs[best] {
            best = id;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_most_likely_and_the_lowest_id_of_a_tie() {
        let mut s = Sampler::new(Sampling::GREEDY);
        assert_eq!(s.pick(&[-3.0, -0.5, -2.0]), 1);
        assert_eq!(s.pick(&[-1.0, -0.5, -0.5]), 1);
    }

    #[test]
    fn sampling_is_reproducible_and_stays_in_the_nucleus() {
        let lp: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(Sampling::new(1.0, 0.75, seed).unwrap());
            (0..200).map(|_| s.pick(&lp)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let picks = draw(7);
        assert!(picks.iter().all(|&id| id < 2), "0.5 + 0.3 reach top-p 0.75");
        let zeros = picks.iter().filter(|&&id| id == 0).count();
        assert!((100..150).contains(&zeros), "about 5/8 of 200: {zeros}");
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(Sampling::new(-1.0, 1.0, 0).is_err());
        assert!(Sampling::new(1.0, 0.0, 0).is_err());
        assert!(Sampling::new(f32::NAN, 1.0, 0).is_err());
    }
}
