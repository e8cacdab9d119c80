//! `--shard K/N`: which runs of a sweep or reproduction shard K of N computes, so a Slurm job
//! array (task K of N) splits the work with no scheduler of our own.
//!
//! The partition depends only on the list of runs (names and estimated costs), never on the
//! machine or the time: every shard of every invocation computes the same assignment. Runs are
//! balanced by estimated cost (longest first, each to the least-loaded shard; ties to the run
//! name and the lowest shard), so one expensive run does not stall a shard of cheap ones.
//!
//! ```
//! use streamppl::shard::{Shard, partition};
//! let shard: Shard = "1/2".parse().unwrap();
//! let owner = partition(&[("a".into(), 3.0), ("b".into(), 1.0), ("c".into(), 1.0)], 2);
//! assert_eq!(owner, vec![0, 1, 1]);
//! assert!(shard.owns(owner[1]));
//! ```

use std::str::FromStr;

use crate::eval::EvalOptions;
use crate::strategy::Strategy;

/// Shard `index` (0-based, as `SLURM_ARRAY_TASK_ID`) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Whether this shard computes a run assigned to shard `owner`.
    pub fn owns(&self, owner: usize) -> bool {
        owner == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("`{s}`: give K/N with 0 <= K < N, e.g. --shard $SLURM_ARRAY_TASK_ID/4");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            k.trim().parse::<usize>().map_err(|_| bad())?,
            n.trim().parse::<usize>().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// The shard (0..n) of each run, given `(name, estimated cost)` per run.
pub fn partition(runs: &[(String, f64)], n: usize) -> Vec<usize> {
    let n = n.max(1);
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| {
        runs[b]
            .1
            .total_cmp(&runs[a].1)
            .then_with(|| runs[a].0.cmp(&runs[b].0))
    });
    let mut load = vec![0f64; n];
    let mut owner = vec![0; runs.len()];
    for i in order {
        let least = (0..n)
            .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
            .expect("at least one shard");
        load[least] += runs[i].1;
        owner[i] = least;
    }
    owner
}

/// A run's estimated cost in token-layer units: each scored token's forward pass, plus its
/// attention over the keys it sees (a key costs about 1/1024 of the rest of a token's work for
/// the default model). `tokens` is the run's scored tokens (its `--max-tokens`, or the corpus's).
/// Re-computation runs a window of W+1 tokens per `stride` scored tokens.
pub fn estimated_cost(opts: &EvalOptions, tokens: u64) -> f64 {
    let tokens = tokens as f64;
    let per_token = |keys: f64| 1.0 + keys / 1024.0;
    match opts.strategy {
        Strategy::Dense => tokens * per_token(tokens / 2.0),
        Strategy::Sink { sinks, window } => {
            tokens * per_token(((sinks + window) as f64).min(tokens))
        }
        Strategy::Recompute { window, stride } => {
            let sampled = tokens / opts.score_every.unwrap_or(1).max(1) as f64;
            let windows = sampled / stride.max(1) as f64;
            let len = (window as f64 + 1.0).min(tokens);
            windows * len * per_token(len / 2.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(costs: &[f64]) -> Vec<(String, f64)> {
        costs
            .iter()
            .enumerate()
            .map(|(i, &c)| (format!("run-{i:02}"), c))
            .collect()
    }

    #[test]
    fn every_run_is_in_exactly_one_shard_and_the_partition_is_stable() {
        let costs: Vec<f64> = (0..23).map(|i| ((i * 7919) % 31) as f64 + 0.5).collect();
        for n in 1..=8 {
            let owner = partition(&runs(&costs), n);
            assert_eq!(owner.len(), costs.len());
            assert!(owner.iter().all(|&s| s < n));
            // The same list, in another order, gives every run the same shard.
            let mut shuffled = runs(&costs);
            shuffled.reverse();
            let again = partition(&shuffled, n);
            assert_eq!(
                again.into_iter().rev().collect::<Vec<_>>(),
                owner,
                "n = {n}"
            );
            // Balanced: no shard carries more than the fair share plus the largest run.
            let mut load = vec![0.0; n];
            for (i, &s) in owner.iter().enumerate() {
                load[s] += costs[i];
            }
            let fair = costs.iter().sum::<f64>() / n as f64;
            let largest = costs.iter().copied().fold(0.0, f64::max);
            assert!(
                load.iter().all(|&l| l <= fair + largest),
                "n = {n}: {load:?}"
            );
        }
    }

    #[test]
    fn shard_specs_parse_or_name_the_fix() {
        assert_eq!("3/4".parse::<Shard>(), Ok(Shard { index: 3, count: 4 }));
        for bad in ["4/4", "1/0", "x/2", "2", "-1/3"] {
            let err = bad.parse::<Shard>().unwrap_err();
            assert!(err.contains("0 <= K < N"), "{bad}: {err}");
        }
    }

    #[test]
    fn costs_order_strategies_as_their_work() {
        let cost = |s: &str| estimated_cost(&EvalOptions::new(s.parse().unwrap()), 8192);
        assert!(cost("dense") > cost("sink:4+1020"));
        assert!(cost("sink:4+2044") > cost("sink:4+1020"));
        assert!(cost("recompute:1024") > cost("dense"));
        assert!(cost("recompute:1024/64") < cost("recompute:1024"));
    }
}
