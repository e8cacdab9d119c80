//! streamppl: stream long corpora through a language model under each KV-cache strategy
//! and log every token's negative log-likelihood.
//!
//! The flow, one module per stage:
//! `source` (GGUF file, Hugging Face folder or hub id) -> `corpus` (text / PG19 parquet)
//! -> `tokenizer` -> `stream` (books into one fed/scored stream) -> `engine` (token-by-token,
//! running `model` under a `strategy`) -> `nll_log` -> `report`.

pub mod bench;
pub mod checkpoint;
pub mod corpus;
pub mod engine;
pub mod eval;
pub mod experiment;
pub mod generate;
pub mod latency;
pub mod memory;
pub mod model;
pub mod nll_log;
pub mod records;
pub mod registry;
pub mod report;
pub mod reproduce;
pub mod run_dir;
pub mod runner;
pub mod shard;
pub mod slurm;
pub mod source;
pub mod strategy;
pub mod stream;
pub mod sweep;
pub mod tokenizer;

/// mimalloc, not the system allocator: a one-token step makes some 600 small tensors (candle
/// allocates every op's output), and glibc's malloc served their 2.3 KB rows from its large
/// bins, sorting its free lists on the way: 3% of the token engine's samples on the 2-core
/// Xeon here. `eval --engine token sink:4+1020` over 2000 tokens, four alternating pairs:
/// 49.1-50.7 tok/s with glibc, 54.8-55.0 with mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An error message of another library on one line (some span several, with backtraces or
/// pretty-printed context); streamppl's errors are one line each.
pub(crate) fn one_line(message: impl std::fmt::Display) -> String {
    message
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first line of an error message, trimmed (candle appends a backtrace to some errors when
/// RUST_BACKTRACE is set).
pub(crate) fn first_line(message: impl std::fmt::Display) -> String {
    message
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}
