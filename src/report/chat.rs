//! Where a long generation breaks: its memory, its latency, or its output. [`Health`] reads a
//! `streamppl generate` run folder; [`health_table`] is the table of a chat experiment (see
//! `experiments/chat.toml`) and of `streamppl plot-generation`.
//!
//! ```no_run
//! use streamppl::report::chat::{ChatRun, health_table};
//! let run = ChatRun::load("4+1020", "results/generate/long/sink:4+1020".as_ref()).unwrap();
//! print!("{}", health_table(&[run]));
//! ```

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;

use super::median;
use super::table::cell;
use crate::records::generation::{GenerationLog, GenerationRecord, TurnRecord};

/// A generation breaks by memory when its peak resident memory is this much above the value
/// at a tenth of its tokens (the issue's 5%: 10,000 of 100,000).
pub const RSS_GROWTH_LIMIT: f64 = 0.05;
/// ... by latency when the median per-token latency of its last tenth is this much above that
/// of its tokens n/100 .. n/100 + n/10 (the issue's 10%: 1,000..11,000 of 100,000).
pub const LATENCY_GROWTH_LIMIT: f64 = 0.10;
/// A turn is degenerate when at least this share of its answer's 4-grams repeat earlier ones.
pub const DEGENERATE_REPEATS: f64 = 0.5;
/// ... and the output breaks when at least this share of the last quarter's turns are, and
/// that share is above the first quarter's beyond chance: a one-sided Fisher exact test of the
/// two quarters' counts below [`OUTPUT_CHANGE_P`]. A small model loops often from its first answers
/// on (SmolLM2: a third of them), and a quarter of 8,192 tokens holds about ten answers, so a
/// share alone moves by chance (StreamingLLM's quarters over one run: 0.38, 0.36, 0.07, 0.62).
pub const DEGENERATE_TURNS_LIMIT: f64 = 0.5;
pub const OUTPUT_CHANGE_P: f64 = 0.05;

/// Degenerate turns among the turns of a stretch of a run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TurnCount {
    pub degenerate: usize,
    pub turns: usize,
}

impl TurnCount {
    /// `None` when no turn was counted.
    pub fn share(&self) -> Option<f64> {
        (self.turns > 0).then(|| self.degenerate as f64 / self.turns as f64)
    }
}

/// One generation run as written: its record, per-token log and turns.
pub struct ChatRun {
    pub id: String,
    pub record: GenerationRecord,
    pub log: GenerationLog,
    pub turns: Vec<TurnRecord>,
    /// Of `log` and `turns`, once (`None` under 10 tokens).
    pub health: Option<Health>,
}

impl ChatRun {
    /// Reads `dir`'s `run.json`, `generation.parquet` and `generation.jsonl`.
    pub fn load(id: &str, dir: &Path) -> Result<Self> {
        let log = GenerationLog::read_parquet(&dir.join("generation.parquet"))?;
        let turns = TurnRecord::read_jsonl(&dir.join("generation.jsonl"))?;
        Ok(ChatRun {
            id: id.to_string(),
            record: GenerationRecord::read_json(&dir.join("run.json"))?,
            health: Health::of(&log, &turns),
            log,
            turns,
        })
    }
}

/// The measures of [`health_table`], over a run's `n` generated tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub tokens: usize,
    /// Resident memory (MiB) after token n/10, and the peak over the run.
    pub rss_at_tenth_mib: f64,
    pub peak_rss_mib: f64,
    /// Median per-token latency (s) of tokens n/100 .. n/100 + n/10, and of the last n/10.
    pub early_latency_s: f64,
    pub late_latency_s: f64,
    /// Degenerate turns among those starting in each quarter of the tokens (turns of fewer
    /// than 5 tokens have no 4-gram share and are not counted).
    pub degenerate_by_quarter: [TurnCount; 4],
    /// exp(mean self-NLL) of each quarter's tokens.
    pub self_ppl_by_quarter: [f64; 4],
}

impl Health {
    /// `None` for a run of fewer than 10 tokens (no tenth to compare).
    pub fn of(log: &GenerationLog, turns: &[TurnRecord]) -> Option<Health> {
        let tokens = &log.tokens;
        let n = tokens.len();
        if n < 10 {
            return None;
        }
        let tenth = n / 10;
        let latency = |range: std::ops::Range<usize>| {
            median(tokens[range].iter().map(|t| t.latency_s as f64).collect())
        };
        let early = n / 100..n / 100 + tenth;
        let quarter = |q: usize| q * n / 4..(q + 1) * n / 4;
        let self_ppl = |q: usize| {
            let range = quarter(q);
            let sum: f64 = tokens[range.clone()].iter().map(|t| t.nll as f64).sum();
            (sum / range.len().max(1) as f64).exp()
        };
        Some(Health {
            tokens: n,
            rss_at_tenth_mib: tokens[tenth - 1].rss_mib as f64,
            peak_rss_mib: (tokens.iter()).fold(0.0, |m, t| f64::max(m, t.rss_mib as f64)),
            early_latency_s: latency(early),
            late_latency_s: latency(n - tenth..n),
            degenerate_by_quarter: degenerate_by_quarter(turns, n),
            self_ppl_by_quarter: [0, 1, 2, 3].map(self_ppl),
        })
    }

    pub fn rss_growth(&self) -> f64 {
        self.peak_rss_mib / self.rss_at_tenth_mib - 1.0
    }

    pub fn latency_ratio(&self) -> f64 {
        self.late_latency_s / self.early_latency_s
    }

    /// The one-sided Fisher exact p-value of the last quarter's degenerate share being above
    /// the first quarter's; `None` when either quarter has no counted turn.
    pub fn output_change_p(&self) -> Option<f64> {
        let (first, last) = (self.degenerate_by_quarter[0], self.degenerate_by_quarter[3]);
        (first.turns > 0 && last.turns > 0).then(|| fisher_greater(first, last))
    }

    /// What broke: `memory`, `latency`, `output` (see the limits above); empty when it held.
    pub fn breaks(&self) -> Vec<&'static str> {
        let output = self.degenerate_by_quarter[3]
            .share()
            .is_some_and(|s| s >= DEGENERATE_TURNS_LIMIT)
            && self.output_change_p().is_some_and(|p| p < OUTPUT_CHANGE_P);
        [
            (self.rss_growth() > RSS_GROWTH_LIMIT, "memory"),
            (self.latency_ratio() > 1.0 + LATENCY_GROWTH_LIMIT, "latency"),
            (output, "output"),
        ]
        .into_iter()
        .filter_map(|(broke, what)| broke.then_some(what))
        .collect()
    }
}

/// The share of degenerate turns by the quarter of the run's `n` tokens where each turn's
/// answer starts (turns are in order; their answers tile the generated tokens).
fn degenerate_by_quarter(turns: &[TurnRecord], n: usize) -> [TurnCount; 4] {
    let mut counts = [TurnCount::default(); 4];
    let mut start = 0usize;
    for turn in turns {
        let quarter = (start * 4 / n).min(3);
        start += turn.answer_tokens as usize;
        if let Some(repeats) = turn.repeated_4grams {
            counts[quarter].degenerate += (repeats >= DEGENERATE_REPEATS) as usize;
            counts[quarter].turns += 1;
        }
    }
    counts
}

/// P(X >= late.degenerate) for X hypergeometric: the late turns drawn from both stretches'
/// turns with their degenerate ones (one-sided Fisher exact test: the late share is higher).
fn fisher_greater(early: TurnCount, late: TurnCount) -> f64 {
    let (all, bad) = (early.turns + late.turns, early.degenerate + late.degenerate);
    let ln_draws = ln_choose(all, late.turns);
    (late.degenerate..=bad.min(late.turns))
        .filter(|&x| late.turns - x <= all - bad)
        .map(|x| (ln_choose(bad, x) + ln_choose(all - bad, late.turns - x) - ln_draws).exp())
        .sum::<f64>()
        .min(1.0)
}

/// ln C(n, k), as a sum of k logarithms (a run has at most a few thousand turns).
fn ln_choose(n: usize, k: usize) -> f64 {
    let k = k.min(n - k);
    (1..=k).map(|i| ((n - k + i) as f64 / i as f64).ln()).sum()
}

/// One row per run: tokens, speed, memory, latency, degenerate turns and self-PPL by quarter,
/// and what broke.
pub fn health_table(runs: &[ChatRun]) -> String {
    let mut md = String::from(
        "| run | strategy | tokens | turns | tok/s | RSS at n/10 → peak (MiB) | median latency early → last tenth (ms) | degenerate turns by quarter (p: last above first) | self-PPL by quarter | breaks |\n\
         |---|---|---:|---:|---:|---|---|---|---|---|\n",
    );
    for run in runs {
        let r = &run.record;
        let _ = write!(
            md,
            "| {} | `{}` | {} | {} | {:.1} |",
            cell(&run.id),
            r.strategy,
            r.tokens_generated,
            r.turns,
            r.tokens_per_second
        );
        let Some(h) = &run.health else {
            md.push_str(" - | - | - | - | too few tokens |\n");
            continue;
        };
        let counts = h
            .degenerate_by_quarter
            .map(|c| format!("{}/{}", c.degenerate, c.turns));
        let p = h
            .output_change_p()
            .map_or("-".into(), |p| format!("{p:.3}"));
        let ppls = h.self_ppl_by_quarter.map(|p| format!("{p:.2}"));
        let breaks = h.breaks();
        let _ = writeln!(
            md,
            " {:.0} → {:.0} ({:+.1}%) | {:.1} → {:.1} (×{:.2}) | {} (p {p}) | {} | {} |",
            h.rss_at_tenth_mib,
            h.peak_rss_mib,
            100.0 * h.rss_growth(),
            1e3 * h.early_latency_s,
            1e3 * h.late_latency_s,
            h.latency_ratio(),
            counts.join(" / "),
            ppls.join(" / "),
            if breaks.is_empty() {
                "holds".to_string()
            } else {
                breaks.join(", ")
            }
        );
    }
    md
}

/// A sentence per run: what broke and by how much, against the limits.
pub fn health_reading(runs: &[ChatRun]) -> String {
    let mut text = format!(
        "A run breaks by memory past +{:.0}% resident memory after its first tenth, by latency past ×{:.2} median latency (last tenth against tokens n/100..n/100+n/10), and by output when at least {:.0}% of its last quarter's answers are degenerate (at least {:.0}% of their 4-grams repeat) and that share is above its first quarter's beyond chance (one-sided Fisher exact test, p < {}).",
        100.0 * RSS_GROWTH_LIMIT,
        1.0 + LATENCY_GROWTH_LIMIT,
        100.0 * DEGENERATE_TURNS_LIMIT,
        100.0 * DEGENERATE_REPEATS,
        OUTPUT_CHANGE_P
    );
    for run in runs {
        let Some(h) = &run.health else {
            continue;
        };
        let verdict = match h.breaks().as_slice() {
            [] => "holds".to_string(),
            broke => format!("breaks by {}", broke.join(" and ")),
        };
        let _ = write!(
            text,
            " `{}` {verdict} over {} tokens (memory {:+.1}%, latency ×{:.2}, last quarter self-PPL {:.2}).",
            run.id,
            h.tokens,
            100.0 * h.rss_growth(),
            h.latency_ratio(),
            h.self_ppl_by_quarter[3]
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::generation::GeneratedToken;

    /// `n` tokens; latency and memory grow by `slope` per token.
    fn log(n: usize, slope: f32) -> GenerationLog {
        GenerationLog {
            tokens: (0..n)
                .map(|i| GeneratedToken {
                    turn: (i / 100) as u32,
                    position: i as u64,
                    token_id: 7,
                    nll: if i < n / 2 { 1.0 } else { 2.0 },
                    cache_keys: i as u32,
                    latency_s: 0.01 * (1.0 + slope * i as f32),
                    rss_mib: 100.0 * (1.0 + slope * i as f32),
                })
                .collect(),
        }
    }

    fn turn(answer_tokens: u64, repeats: f64) -> TurnRecord {
        TurnRecord {
            turn: 0,
            question_id: "q".into(),
            question_turn: 0,
            prompt: String::new(),
            answer: String::new(),
            prompt_tokens: 10,
            answer_tokens,
            stop: "end_of_turn".into(),
            repeated_4grams: Some(repeats),
            seconds: 1.0,
        }
    }

    #[test]
    fn a_flat_run_holds_and_a_growing_one_breaks_by_memory_and_latency() {
        let turns: Vec<_> = (0..10).map(|_| turn(100, 0.1)).collect();
        let flat = Health::of(&log(1000, 0.0), &turns).unwrap();
        assert_eq!((flat.rss_growth(), flat.latency_ratio()), (0.0, 1.0));
        assert!(flat.breaks().is_empty());
        // Self-PPL by quarter: NLL 1 in the first half, 2 in the second.
        let e = std::f64::consts::E;
        assert_eq!(
            flat.self_ppl_by_quarter.map(|p| (p * 1e6).round()),
            [
                (e * 1e6).round(),
                (e * 1e6).round(),
                (e * e * 1e6).round(),
                (e * e * 1e6).round()
            ]
        );
        let growing = Health::of(&log(1000, 1e-3), &turns).unwrap();
        // RSS 100 * (1 + 1e-3 i): at token 100 (i = 99) 109.9, peak 199.9.
        assert!((growing.rss_growth() - (199.9 / 109.9 - 1.0)).abs() < 1e-4);
        assert_eq!(growing.breaks(), ["memory", "latency"]);
    }

    #[test]
    fn degenerate_turns_count_by_the_quarter_their_answer_starts_in() {
        // 8 turns of 50 tokens over 400 tokens: two per quarter; the last quarter's both loop.
        let repeats = [0.0, 0.1, 0.6, 0.0, 0.2, 0.3, 0.9, 0.5];
        let turns: Vec<_> = repeats.iter().map(|&r| turn(50, r)).collect();
        let h = Health::of(&log(400, 0.0), &turns).unwrap();
        let shares = h.degenerate_by_quarter.map(|c| c.share());
        assert_eq!(shares, [Some(0.0), Some(0.5), Some(0.0), Some(1.0)]);
        // 0/2 then 2/2: P = C(2,2) C(2,0) / C(4,2) = 1/6, not beyond chance.
        assert!((h.output_change_p().unwrap() - 1.0 / 6.0).abs() < 1e-12);
        assert!(h.breaks().is_empty());
    }

    /// Fisher's one-sided p against hand-computed hypergeometric tails: 5 of 10 degenerate,
    /// then 8 of 8: C(13,8) / C(18,8) = 1287 / 43758; then 7 of 8: (C(12,7) C(6,1) + C(12,8))
    /// / C(18,8) = 5247 / 43758; and a late share below the early one gives a p near 1.
    #[test]
    fn output_change_is_a_one_sided_fisher_exact_test() {
        let count = |degenerate, turns| TurnCount { degenerate, turns };
        let p = |late| fisher_greater(count(5, 10), late);
        assert!((p(count(8, 8)) - 1287.0 / 43758.0).abs() < 1e-12);
        assert!((p(count(7, 8)) - 5247.0 / 43758.0).abs() < 1e-12);
        assert!(p(count(0, 8)) > 0.99);
        // A run whose answers loop from its second quarter on breaks by output.
        let repeats = [0.0, 0.1, 0.0, 0.2, 0.9, 0.8, 0.9, 0.7]
            .into_iter()
            .chain([0.9; 8]);
        let turns: Vec<_> = repeats.map(|r| turn(25, r)).collect();
        let h = Health::of(&log(400, 0.0), &turns).unwrap();
        assert_eq!(h.degenerate_by_quarter[3], count(4, 4));
        assert_eq!(h.breaks(), ["output"]);
    }

    #[test]
    fn too_short_a_run_has_no_health() {
        assert_eq!(Health::of(&log(9, 0.0), &[]), None);
    }
}
