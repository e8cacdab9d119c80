//! KV-cache strategies (spec section 2) as one small type that every engine uses.
//!
//! ```
//! use streamppl::strategy::Strategy;
//! let s: Strategy = "sink:4+252".parse().unwrap();
//! assert_eq!(s, Strategy::Sink { sinks: 4, window: 252 });
//! assert_eq!(s.to_string(), "sink:4+252");
//! assert!("sink:4+0".parse::<Strategy>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;

/// Which earlier fed tokens a fed token attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Every earlier token of the stream, at true positions.
    Dense,
    /// The first `sinks` fed tokens plus the `window` most recent earlier ones (`window:W` is `sinks = 0`).
    Sink { sinks: usize, window: usize },
    /// The `window` most recent earlier tokens, recomputed from scratch at positions 0..=window.
    /// With `stride` > 1, one window every `stride` tokens scores its last `stride` tokens
    /// (an approximation; `stride = 1` is exact).
    Recompute { window: usize, stride: usize },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid strategy `{spec}`: {why}; expected one of dense, window:W, sink:S+W, recompute:W, recompute:W/s (W >= 1, 1 <= s <= W)"
)]
pub struct StrategyParseError {
    spec: String,
    why: String,
}

impl Strategy {
    /// `sink:S+W` (`window:W` when S = 0) with the checks of its spec: W >= 1 and the S+W+1
    /// keys of a query countable. Code that builds strategies from numbers (a sweep grid)
    /// gets the same one-line error as the command line.
    pub fn sink(sinks: usize, window: usize) -> Result<Self, StrategyParseError> {
        Strategy::Sink { sinks, window }.to_string().parse()
    }

    /// The cache budget `(sinks, window)` of an evicting strategy, `None` for dense and recompute.
    pub fn sink_window(&self) -> Option<(usize, usize)> {
        match *self {
            Strategy::Sink { sinks, window } => Some((sinks, window)),
            _ => None,
        }
    }

    /// Whether the reported PPL is an approximation of the strategy's exact definition.
    pub fn is_approximate(&self) -> bool {
        matches!(self, Strategy::Recompute { stride, .. } if *stride > 1)
    }

    /// The paper's name for the strategy, used in tables and legends.
    pub fn label(&self) -> String {
        match *self {
            Strategy::Dense => "Dense".into(),
            Strategy::Sink { sinks: 0, window } => format!("Window {window}"),
            Strategy::Sink { sinks, window } => format!("StreamingLLM {sinks}+{window}"),
            Strategy::Recompute { window, stride: 1 } => {
                format!("Sliding window w/ re-computation {window}")
            }
            Strategy::Recompute { window, stride } => {
                format!("Sliding window w/ re-computation {window}, stride {stride}")
            }
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Strategy::Dense => write!(f, "dense"),
            Strategy::Sink { sinks: 0, window } => write!(f, "window:{window}"),
            Strategy::Sink { sinks, window } => write!(f, "sink:{sinks}+{window}"),
            Strategy::Recompute { window, stride: 1 } => write!(f, "recompute:{window}"),
            Strategy::Recompute { window, stride } => write!(f, "recompute:{window}/{stride}"),
        }
    }
}

impl FromStr for Strategy {
    type Err = StrategyParseError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| StrategyParseError {
            spec: spec.to_string(),
            why: why.to_string(),
        };
        let count = |s: &str, what: &str| -> Result<usize, StrategyParseError> {
            s.trim().parse::<usize>().map_err(|e| match e.kind() {
                std::num::IntErrorKind::PosOverflow => {
                    err(&format!("{what} `{s}` is larger than {}", usize::MAX))
                }
                _ => err(&format!("{what} `{s}` is not a non-negative integer")),
            })
        };
        let positive = |s: &str, what: &str| -> Result<usize, StrategyParseError> {
            match count(s, what)? {
                0 => Err(err(&format!("{what} must be at least 1"))),
                n => Ok(n),
            }
        };
        let (kind, arg) = spec.split_once(':').unwrap_or((spec, ""));
        match kind.trim() {
            "dense" if arg.is_empty() => Ok(Strategy::Dense),
            "dense" => Err(err("dense takes no argument")),
            "window" => sink_budget(0, positive(arg, "window size")?).map_err(|why| err(&why)),
            "sink" => {
                let (s, w) = arg
                    .split_once('+')
                    .ok_or_else(|| err("sink needs S+W, e.g. sink:4+252"))?;
                sink_budget(count(s, "sink count")?, positive(w, "window size")?)
                    .map_err(|why| err(&why))
            }
            "recompute" => {
                let (w, s) = arg.split_once('/').unwrap_or((arg, "1"));
                let window = positive(w, "window size")?;
                // A recomputed window holds W context tokens plus the scored one.
                if window.checked_add(1).is_none() {
                    return Err(err(&format!(
                        "W+1 = {window}+1 tokens per window overflows a {}-bit count; give a smaller W",
                        usize::BITS
                    )));
                }
                let stride = positive(s, "stride")?;
                if stride > window {
                    return Err(err("stride must not exceed the window size"));
                }
                Ok(Strategy::Recompute { window, stride })
            }
            _ => Err(err("unknown strategy name")),
        }
    }
}

/// `sink:S+W` (`window:W` when S = 0), if a query's keys, S sinks + W recent + itself, can be
/// counted: every engine sizes its cache and masks from S+W+1.
fn sink_budget(sinks: usize, window: usize) -> Result<Strategy, String> {
    match sinks.checked_add(window).and_then(|k| k.checked_add(1)) {
        Some(_) => Ok(Strategy::Sink { sinks, window }),
        None => Err(format!(
            "S+W+1 = {sinks}+{window}+1 keys per query overflows a {}-bit count; give smaller S and W",
            usize::BITS
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for spec in [
            "dense",
            "window:256",
            "sink:4+252",
            "sink:0+8",
            "recompute:256",
            "recompute:256/64",
        ] {
            let s: Strategy = spec.parse().unwrap();
            let back = if spec == "sink:0+8" { "window:8" } else { spec };
            assert_eq!(s.to_string(), back);
        }
        assert_eq!(
            "window:8".parse::<Strategy>().unwrap(),
            Strategy::Sink {
                sinks: 0,
                window: 8
            }
        );
        assert_eq!(
            "recompute:8/1".parse::<Strategy>().unwrap(),
            Strategy::Recompute {
                window: 8,
                stride: 1
            }
        );
    }

    #[test]
    fn rejects_impossible_strategies() {
        for bad in [
            "sink:4",
            "sink:4+0",
            "window:-1",
            "window:0",
            "recompute:0",
            "recompute:8/0",
            "recompute:8/9",
            "dense:3",
            "foo",
            "",
            "sink:a+3",
            "sink:1+18446744073709551615",
            "sink:18446744073709551615+1",
            "sink:9223372036854775808+9223372036854775807",
            "window:18446744073709551615",
            "recompute:18446744073709551615",
            "window:99999999999999999999",
        ] {
            let e = bad.parse::<Strategy>().unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{bad}`")) && !e.contains('\n'),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_largest_budget_that_fits_is_accepted() {
        let max = usize::MAX;
        let fits = format!("sink:{}+{}", max / 2, max / 2 - 1); // S+W+1 = max - 1
        assert!(fits.parse::<Strategy>().is_ok(), "{fits}");
        let one_over = format!("sink:{}+{}", max / 2, max / 2 + 1); // S+W+1 = max + 1
        let e = one_over.parse::<Strategy>().unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
        assert!(format!("recompute:{}", max - 1).parse::<Strategy>().is_ok());
    }

    #[test]
    fn sink_checks_its_numbers_like_its_spec() {
        assert_eq!(
            Strategy::sink(4, 252),
            Ok(Strategy::Sink {
                sinks: 4,
                window: 252
            })
        );
        let e = Strategy::sink(usize::MAX, 5).unwrap_err().to_string();
        assert!(
            e.contains(&format!("`sink:{}+5`", usize::MAX)) && e.contains("overflows"),
            "{e}"
        );
        assert!(
            Strategy::sink(4, 0)
                .unwrap_err()
                .to_string()
                .contains("`sink:4+0`")
        );
    }

    #[test]
    fn only_strided_recompute_is_approximate() {
        assert!(
            "recompute:8/2"
                .parse::<Strategy>()
                .unwrap()
                .is_approximate()
        );
        assert!(!"recompute:8".parse::<Strategy>().unwrap().is_approximate());
        assert!(!"sink:4+8".parse::<Strategy>().unwrap().is_approximate());
    }
}
