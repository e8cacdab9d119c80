//! Experiment definitions as data: one TOML file per table or figure of the paper under
//! `experiments/`, resolved for a scale (`quick`, `default`, `paper`) into concrete runs.
//!
//! ```
//! use streamppl::experiment::{Experiment, Scale};
//! let exp = Experiment::parse("table6", r#"
//!     name = "table6"
//!     title = "Cache size"
//!     mirrors = "Table 6"
//!     tokens = { quick = 2048, default = 20480, paper = 400000 }
//!     cache_divisor = { quick = 4 }
//!     [[run]]
//!     id = "4+252"
//!     strategy = "sink:4+252"
//! "#).unwrap();
//! let runs = exp.resolve(Scale::Quick, 128).unwrap();
//! assert_eq!(runs[0].options.strategy.to_string(), "sink:4+60");
//! assert_eq!(runs[0].options.max_tokens, Some(2048));
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::engine::EngineKind;
use crate::eval::{DEFAULT_BLOCK_SIZE, EvalOptions};
use crate::strategy::Strategy;

/// How big an experiment runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// Minutes on a laptop CPU, caches shrunk so strategies still evict: smoke tests.
    Quick,
    /// What the committed results use: every experiment in about an hour and a half on 2 cores.
    Default,
    /// The paper's token counts: for a GPU or a long night.
    Paper,
}

impl Scale {
    pub const ALL: [Scale; 3] = [Scale::Quick, Scale::Default, Scale::Paper];

    pub fn name(self) -> &'static str {
        match self {
            Scale::Quick => "quick",
            Scale::Default => "default",
            Scale::Paper => "paper",
        }
    }
}

/// A number per scale; a scale left out falls back to `default`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerScale<T> {
    pub quick: Option<T>,
    pub default: Option<T>,
    pub paper: Option<T>,
}

impl<T: Copy> PerScale<T> {
    pub fn get(&self, scale: Scale) -> Option<T> {
        let own = match scale {
            Scale::Quick => self.quick,
            Scale::Default => self.default,
            Scale::Paper => self.paper,
        };
        own.or(self.default)
    }
}

/// What an experiment measures: NLL runs (tables, running-PPL figures), decoding latency, or
/// a generated conversation per run (`streamppl generate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Runs,
    Latency,
    Chat,
}

/// A figure to draw from an experiment's results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plot {
    /// Running PPL of every run against tokens (Figure 3 style).
    RunningPpl,
    /// Running and windowed PPL with book boundaries, and memory over the stream (Figure 5).
    LongStream,
    /// Latency and memory against cache size (Figure 10).
    Latency,
}

/// One run of an experiment, as written in the TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunDef {
    /// The paper's name for the configuration, e.g. `4+1020` or `dense`; keys the paper's numbers.
    pub id: String,
    /// Strategy spec at paper cache sizes (`cache_divisor` shrinks it at a scale).
    pub strategy: String,
    /// `--sink-text`: the sinks are copies of this text's token.
    #[serde(default)]
    pub sink_text: Option<String>,
    /// `false` is `--no-pos-shift`.
    #[serde(default = "yes")]
    pub pos_shift: bool,
    /// `--score-every k` per scale: an exact sample, for runs too slow to score every token.
    #[serde(default)]
    pub score_every: Option<PerScale<u64>>,
    /// `--local-sinks`: the sinks visible in layers with a window of their own too.
    #[serde(default)]
    pub local_sinks: bool,
    /// `false` is `--no-bos`: books fed without their BOS token.
    #[serde(default = "yes")]
    pub bos: bool,
}

fn yes() -> bool {
    true
}

/// The paper's numbers for one model, keyed by run id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaperNumbers {
    pub model: String,
    /// What differs from our runs (e.g. the paper's cache sizes), shown under the table.
    #[serde(default)]
    pub note: Option<String>,
    pub values: std::collections::BTreeMap<String, f64>,
}

/// Settings of a latency experiment (Figure 10).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyDef {
    /// Cache sizes at paper scale (`cache_divisor` shrinks them).
    pub caches: Vec<usize>,
    pub sinks: usize,
    /// Tokens timed per method and cache size.
    pub steps: PerScale<usize>,
    /// Largest paper-scale cache measured at a scale (all when left out).
    #[serde(default)]
    pub max_cache: Option<PerScale<usize>>,
}

/// Settings of a chat experiment: each run generates `tokens` tokens (at the scale) in one
/// conversation, asking the prompt file again and again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatDef {
    /// MT-Bench-style JSONL, relative to the experiments folder.
    pub prompts: PathBuf,
    /// Most tokens of one answer.
    pub max_new_tokens: usize,
}

/// One experiment file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Equals the file stem; `streamppl reproduce NAME`.
    pub name: String,
    pub title: String,
    /// The paper's table or figure it mirrors.
    pub mirrors: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub kind: Kind,
    /// `--books` (e.g. `1` = the first book); all books when left out.
    #[serde(default)]
    pub books: Option<String>,
    /// Scored tokens per scale; `None` at a scale = the whole selection.
    #[serde(default)]
    pub tokens: Option<PerScale<u64>>,
    /// Divide every cache size by this at a scale (quick runs keep evicting on short streams).
    #[serde(default)]
    pub cache_divisor: Option<PerScale<usize>>,
    /// Run id whose curve others are compared against: where each one departs from it.
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub plots: Vec<Plot>,
    #[serde(default, rename = "run")]
    pub runs: Vec<RunDef>,
    #[serde(default)]
    pub latency: Option<LatencyDef>,
    #[serde(default)]
    pub chat: Option<ChatDef>,
    #[serde(default)]
    pub paper: Vec<PaperNumbers>,
}

/// A run resolved for a scale: its id and the options `eval` takes.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedRun {
    pub id: String,
    pub options: EvalOptions,
}

impl Experiment {
    /// Parses and checks a definition; `name` (the file stem) must match its `name` field.
    pub fn parse(name: &str, text: &str) -> Result<Self> {
        let exp: Experiment = toml::from_str(text).map_err(|e| {
            anyhow::anyhow!("{}", e.to_string().lines().collect::<Vec<_>>().join(" "))
        })?;
        if exp.name != name {
            bail!(
                "name = \"{}\" differs from the file name `{name}`; make them equal",
                exp.name
            );
        }
        exp.check()?;
        Ok(exp)
    }

    /// Reads `path` (e.g. `experiments/table2.toml`); errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read experiment file", path.display()))?;
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        Experiment::parse(&stem, &text).with_context(|| format!("{}", path.display()))
    }

    /// Everything that can be wrong before a run starts, at every scale.
    fn check(&self) -> Result<()> {
        match (self.kind, &self.latency, self.runs.is_empty()) {
            (Kind::Runs, _, true) => bail!("no [[run]]: give at least one"),
            (Kind::Latency, None, _) => bail!("kind = \"latency\" needs a [latency] table"),
            (Kind::Latency, Some(_), false) => {
                bail!("kind = \"latency\" takes no [[run]] (its methods are fixed)")
            }
            (Kind::Chat, ..) => self.check_chat()?,
            _ => {}
        }
        if self.chat.is_some() && self.kind != Kind::Chat {
            bail!("a [chat] table belongs to kind = \"chat\"; add that line or remove the table");
        }
        let mut ids = std::collections::HashSet::new();
        for run in &self.runs {
            if !ids.insert(run.id.as_str()) {
                bail!("run id `{}` appears twice; ids must be unique", run.id);
            }
        }
        for id in self.reference.iter() {
            if !ids.contains(id.as_str()) {
                bail!("reference = \"{id}\" is not the id of a [[run]]");
            }
        }
        // A latency experiment keys its paper numbers by `method@cache`, not by run id.
        for p in self.paper.iter().filter(|_| self.kind == Kind::Runs) {
            if let Some(id) = p.values.keys().find(|id| !ids.contains(id.as_str())) {
                bail!(
                    "paper numbers of {}: `{id}` is not the id of a [[run]]",
                    p.model
                );
            }
        }
        for scale in Scale::ALL {
            if self.divisor(scale) == 0 {
                bail!("cache_divisor must be at least 1");
            }
            self.resolve(scale, DEFAULT_BLOCK_SIZE)
                .with_context(|| format!("at scale {}", scale.name()))?;
            if let Some(lat) = &self.latency {
                self.latency_caches(scale)?;
                if lat.steps.get(scale).unwrap_or(0) == 0 {
                    bail!(
                        "[latency] steps must be at least 1 at scale {}",
                        scale.name()
                    );
                }
            }
        }
        Ok(())
    }

    /// A chat experiment has a `[chat]` table, runs, and a number of tokens at every scale.
    fn check_chat(&self) -> Result<()> {
        let Some(chat) = &self.chat else {
            bail!("kind = \"chat\" needs a [chat] table (prompts, max_new_tokens)")
        };
        if chat.max_new_tokens == 0 {
            bail!("[chat] max_new_tokens must be at least 1");
        }
        if self.runs.is_empty() {
            bail!("no [[run]]: give at least one strategy to generate with");
        }
        if let Some(run) = (self.runs.iter()).find(|r| r.strategy.starts_with("recompute")) {
            bail!(
                "run `{}`: re-computation keeps no cache to generate from; give dense, window:W or sink:S+W",
                run.id
            );
        }
        if let Some(scale) = Scale::ALL
            .into_iter()
            .find(|&s| self.max_tokens(s).is_none())
        {
            bail!(
                "kind = \"chat\" needs tokens at every scale (none at {}): how many to generate",
                scale.name()
            );
        }
        Ok(())
    }

    fn divisor(&self, scale: Scale) -> usize {
        self.cache_divisor.and_then(|d| d.get(scale)).unwrap_or(1)
    }

    /// Scored tokens at `scale`, `None` for the whole selection.
    pub fn max_tokens(&self, scale: Scale) -> Option<u64> {
        self.tokens.and_then(|t| t.get(scale))
    }

    /// The runs at `scale`, with caches divided by `cache_divisor` (the total S+W is divided,
    /// the sinks kept: `sink:4+1020` at divisor 8 is `sink:4+124`), on the block engine with
    /// blocks of `block_size`.
    pub fn resolve(&self, scale: Scale, block_size: usize) -> Result<Vec<ResolvedRun>> {
        let div = self.divisor(scale);
        self.runs
            .iter()
            .map(|run| {
                let paper: Strategy = run
                    .strategy
                    .parse()
                    .with_context(|| format!("run `{}`", run.id))?;
                let strategy = scale_strategy(paper, div)
                    .with_context(|| format!("run `{}` at cache_divisor {div}", run.id))?;
                let options = EvalOptions {
                    strategy,
                    pos_shift: run.pos_shift,
                    sink_text: run.sink_text.clone(),
                    max_tokens: self.max_tokens(scale),
                    engine: EngineKind::Block(block_size),
                    // 1 = every token: exact, not a sample.
                    score_every: run
                        .score_every
                        .and_then(|k| k.get(scale))
                        .filter(|&k| k > 1),
                    local_sinks: run.local_sinks,
                    bos: run.bos,
                };
                options
                    .validate()
                    .with_context(|| format!("run `{}`", run.id))?;
                Ok(ResolvedRun {
                    id: run.id.clone(),
                    options,
                })
            })
            .collect()
    }

    /// Cache sizes of a latency experiment at `scale`.
    pub fn latency_caches(&self, scale: Scale) -> Result<Vec<usize>> {
        let Some(lat) = &self.latency else {
            return Ok(Vec::new());
        };
        let div = self.divisor(scale);
        let max = lat
            .max_cache
            .and_then(|m| m.get(scale))
            .unwrap_or(usize::MAX);
        lat.caches
            .iter()
            .filter(|&&c| c <= max)
            .map(|&c| match c / div {
                n if n > lat.sinks => Ok(n),
                _ => bail!(
                    "[latency] cache {c} / cache_divisor {div} leaves no window after {} sinks",
                    lat.sinks
                ),
            })
            .collect()
    }
}

/// Divides a strategy's cache by `div`: the S+W total for sink, W for window and recompute.
pub fn scale_strategy(s: Strategy, div: usize) -> Result<Strategy> {
    if div == 1 {
        return Ok(s);
    }
    Ok(match s {
        Strategy::Dense => Strategy::Dense,
        Strategy::Sink { sinks, window } => {
            let total = (sinks + window) / div;
            if total <= sinks {
                bail!("{s}: the scaled cache {total} leaves no window after {sinks} sinks");
            }
            Strategy::Sink {
                sinks,
                window: total - sinks,
            }
        }
        Strategy::Recompute { window, stride } => Strategy::Recompute {
            window: (window / div).max(1),
            stride: (stride / div).max(1),
        },
    })
}

/// The experiment files of a folder, sorted by name.
pub fn list(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list experiment folder", dir.display()))?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "t"
        title = "T"
        mirrors = "Table 0"
        tokens = { quick = 100, default = 1000 }
        cache_divisor = { quick = 8 }
        reference = "sink"
        [[run]]
        id = "sink"
        strategy = "sink:4+1020"
        [[run]]
        id = "rc"
        strategy = "recompute:1024"
        score_every = { quick = 16, default = 512 }
        [[paper]]
        model = "M"
        values = { sink = 5.4 }
    "#;

    #[test]
    fn resolves_per_scale_with_fallback_to_default() {
        let exp = Experiment::parse("t", MINIMAL).unwrap();
        let quick = exp.resolve(Scale::Quick, DEFAULT_BLOCK_SIZE).unwrap();
        assert_eq!(quick[0].options.strategy.to_string(), "sink:4+124");
        assert_eq!(quick[1].options.strategy.to_string(), "recompute:128");
        assert_eq!(quick[1].options.score_every, Some(16));
        let paper = exp.resolve(Scale::Paper, DEFAULT_BLOCK_SIZE).unwrap();
        assert_eq!(paper[0].options.strategy.to_string(), "sink:4+1020");
        assert_eq!(paper[0].options.max_tokens, Some(1000)); // paper falls back to default
        assert_eq!(paper[1].options.score_every, Some(512));
    }

    #[test]
    fn bad_definitions_are_one_line_errors_naming_the_problem() {
        let cases = [
            (MINIMAL.replace("mirrors", "mirror"), "unknown field"),
            (MINIMAL.replace("sink:4+1020", "sink:4+0"), "sink:4+0"),
            (
                MINIMAL.replace("quick = 8", "quick = 512"),
                "leaves no window",
            ),
            (
                MINIMAL.replace("reference = \"sink\"", "reference = \"x\""),
                "reference",
            ),
            (
                MINIMAL.replace("values = { sink", "values = { nope"),
                "nope",
            ),
            (MINIMAL.replace("id = \"rc\"", "id = \"sink\""), "twice"),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", Experiment::parse("t", &text).unwrap_err());
            assert!(err.contains(want), "want `{want}` in: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = format!("{:#}", Experiment::parse("u", MINIMAL).unwrap_err());
        assert!(err.contains("file name `u`"), "{err}");
    }

    const CHAT: &str = r#"
        name = "c"
        kind = "chat"
        title = "C"
        mirrors = "the demo"
        tokens = { quick = 100, default = 1000 }
        [chat]
        prompts = "prompts/chat.jsonl"
        max_new_tokens = 64
        [[run]]
        id = "4+1020"
        strategy = "sink:4+1020"
    "#;

    #[test]
    fn a_chat_experiment_needs_its_table_tokens_and_a_strategy_with_a_cache() {
        let exp = Experiment::parse("c", CHAT).unwrap();
        assert_eq!(exp.chat.as_ref().unwrap().max_new_tokens, 64);
        assert_eq!(exp.max_tokens(Scale::Paper), Some(1000));
        let cases = [
            (
                CHAT.replace("[chat]", "")
                    .replace("prompts = ", "description = ")
                    .replace("max_new_tokens = 64", ""),
                "needs a [chat] table",
            ),
            (
                CHAT.replace("sink:4+1020", "recompute:1024"),
                "keeps no cache",
            ),
            (
                CHAT.replace("max_new_tokens = 64", "max_new_tokens = 0"),
                "at least 1",
            ),
            (
                CHAT.replace("kind = \"chat\"", ""),
                "belongs to kind = \"chat\"",
            ),
            (
                CHAT.replace("tokens = { quick = 100, default = 1000 }", ""),
                "tokens at every scale",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", Experiment::parse("c", &text).unwrap_err());
            assert!(err.contains(want), "want `{want}` in: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn every_shipped_experiment_parses_at_every_scale() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
        let files = list(&dir).unwrap();
        assert!(files.len() >= 7, "{files:?}");
        for f in files {
            let exp = Experiment::load(&f).unwrap_or_else(|e| panic!("{e:#}"));
            for scale in Scale::ALL {
                exp.resolve(scale, DEFAULT_BLOCK_SIZE).unwrap();
            }
        }
    }
}
