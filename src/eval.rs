//! One evaluation: tokenized corpus + strategy -> per-token NLL log -> metrics and run record.

use std::borrow::Cow;

use anyhow::{Result, bail};
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use crate::corpus::Book;
use crate::engine::{EngineKind, run_strategy};
use crate::model::Model;
use crate::nll_log::NllLog;
use crate::records::run::BookMetrics;
use crate::strategy::Strategy;
use crate::stream::TokenStream;
use crate::tokenizer::TextTokenizer;

/// Books with their token ids, tokenized only as far as a run needs.
#[derive(Clone)]
pub struct TokenizedCorpus {
    pub books: Vec<Book>,
    pub ids: Vec<Vec<u32>>,
}

impl TokenizedCorpus {
    /// Tokenizes books in order until `max_scored` scored tokens are covered (all if `None`).
    pub fn new(
        tok: &TextTokenizer,
        books: Vec<Book>,
        max_scored: Option<u64>,
        progress: &ProgressBar,
    ) -> Result<Self> {
        let mut ids = Vec::new();
        let mut scored = 0u64;
        for book in &books {
            if max_scored.is_some_and(|m| scored >= m) {
                break;
            }
            let b = tok.encode(&book.text)?;
            scored += b.len().saturating_sub(1) as u64;
            ids.push(b);
            progress.inc(1);
        }
        let mut books = books;
        books.truncate(ids.len());
        Ok(TokenizedCorpus { books, ids })
    }

    /// The same books with `token` removed from the start of every book that starts with it.
    fn without_leading(&self, token: u32) -> TokenizedCorpus {
        let ids = self
            .ids
            .iter()
            .map(|ids| match ids.first() {
                Some(&first) if first == token => ids[1..].to_vec(),
                _ => ids.clone(),
            })
            .collect();
        TokenizedCorpus {
            books: self.books.clone(),
            ids,
        }
    }
}

/// What one run evaluates.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    pub strategy: Strategy,
    /// `false` is `--no-pos-shift`: cached keys keep their stream positions.
    pub pos_shift: bool,
    /// `--sink-text`: the sinks are copies of this text's token instead of the stream's first tokens.
    pub sink_text: Option<String>,
    pub max_tokens: Option<u64>,
    /// Engine for dense, window and sink.
    pub engine: EngineKind,
    /// `--score-every k`: score only stream positions 0, k, 2k, ... (a sample; `None` = all).
    pub score_every: Option<u64>,
    /// `--local-sinks`: layers with a sliding window of their own (Gemma 3's local layers) see
    /// the sinks too, an ablation of the model as trained.
    pub local_sinks: bool,
    /// `false` is `--no-bos`: books are fed without the BOS token their tokenizer puts first.
    pub bos: bool,
}

/// Block size of the block engine on the CPU unless `--block-size` says otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 128;

/// Block size of the block engine on a GPU unless `--block-size` says otherwise: large blocks
/// amortize the launches of a forward pass. Measured on an H200 in bf16, `sink:4+1020`
/// (results/bench/gpu-h200-flash2.md and -run2): SmolLM2's shape 118.9k / 159.7k / 189.1k and
/// 88.8k / 162.1k / 174.1k tok/s at 1024 / 2048 / 4096, the 7B shape 23.2k / 25.3k at 1024 /
/// 2048; 2048 serves both (4096 adds keys per query and memory for the 7B).
pub const GPU_BLOCK_SIZE: usize = 2048;

/// The block engine's default block size on `device`.
pub fn default_block_size(device: &candle_core::Device) -> usize {
    match device.is_cpu() {
        true => DEFAULT_BLOCK_SIZE,
        false => GPU_BLOCK_SIZE,
    }
}

/// The most injected sink tokens `--sink-text` may feed: far past any experiment (the paper
/// uses 4), and a bound, so that a typo never allocates the stream of a huge S.
pub const MAX_INJECTED_SINKS: usize = 1 << 20;

impl EvalOptions {
    pub fn new(strategy: Strategy) -> Self {
        EvalOptions {
            strategy,
            pos_shift: true,
            sink_text: None,
            max_tokens: None,
            engine: EngineKind::Block(DEFAULT_BLOCK_SIZE),
            score_every: None,
            local_sinks: false,
            bos: true,
        }
    }

    /// A name unique to the options, safe as a directory name: the strategy spec (with `/`
    /// written `_`, e.g. `recompute:256_64`) plus variants.
    pub fn run_name(&self) -> String {
        let mut name = self.strategy.to_string().replace('/', "_");
        if !self.pos_shift {
            name.push_str("@no-pos-shift");
        }
        if let Some(text) = &self.sink_text {
            let escaped: String = text
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            name.push_str(&format!("@sink-text={escaped}"));
        }
        if let Some(k) = self.score_every {
            name.push_str(&format!("@every-{k}"));
        }
        if self.local_sinks {
            name.push_str("@local-sinks");
        }
        if !self.bos {
            name.push_str("@no-bos");
        }
        name
    }

    /// The paper's name for the run, with its variants.
    pub fn label(&self) -> String {
        let mut label = self.strategy.label();
        if let (Some(text), Strategy::Sink { sinks, window }) = (&self.sink_text, self.strategy) {
            label = format!("StreamingLLM {sinks}{text:?}+{window}");
        }
        if !self.pos_shift {
            label.push_str(", no pos shift");
        }
        if self.local_sinks {
            label.push_str(", sinks in local layers");
        }
        if !self.bos {
            label.push_str(", no BOS");
        }
        if let Some(k) = self.score_every {
            label.push_str(&format!(" (sample 1/{k})"));
        }
        label
    }

    /// Whether the numbers estimate rather than compute the strategy's PPL: the stride
    /// approximation, or a `--score-every` sample.
    pub fn is_approximate(&self) -> bool {
        self.strategy.is_approximate() || self.score_every.is_some_and(|k| k > 1)
    }

    /// Checks the options against each other; the error names the fix.
    pub fn validate(&self) -> Result<()> {
        let sink = matches!(self.strategy, Strategy::Sink { sinks, .. } if sinks > 0);
        if self.sink_text.is_some() && !sink {
            bail!(
                "--sink-text needs a strategy with sinks (sink:S+W with S >= 1), not `{}`",
                self.strategy
            );
        }
        if let (Some(_), Strategy::Sink { sinks, .. }) = (&self.sink_text, self.strategy)
            && sinks > MAX_INJECTED_SINKS
        {
            bail!(
                "--sink-text with S={sinks} feeds {sinks} injected tokens before the corpus; give S <= {MAX_INJECTED_SINKS}"
            );
        }
        if !self.pos_shift && self.strategy.sink_window().is_none() {
            bail!(
                "--no-pos-shift applies to window:W and sink:S+W only, not `{}`",
                self.strategy
            );
        }
        if self.local_sinks && !sink {
            bail!(
                "--local-sinks needs a strategy with sinks (sink:S+W with S >= 1), not `{}`",
                self.strategy
            );
        }
        if self.score_every == Some(0) {
            bail!("--score-every 0: give k >= 1 to score every k-th token");
        }
        if self.score_every.is_some()
            && matches!(self.strategy, Strategy::Recompute { stride, .. } if stride > 1)
        {
            bail!(
                "--score-every samples the exact recompute:W; it does not combine with the stride approximation `{}`",
                self.strategy
            );
        }
        if self.max_tokens == Some(0) {
            bail!(
                "--max-tokens 0 scores nothing; give a positive number or leave it out for the whole corpus"
            );
        }
        Ok(())
    }

    /// Tokens fed before the corpus: S copies of the `--sink-text` token, or its S tokens.
    pub fn sink_prefix(&self, tok: &TextTokenizer) -> Result<Vec<u32>> {
        let (Some(text), Strategy::Sink { sinks, .. }) = (&self.sink_text, self.strategy) else {
            return Ok(Vec::new());
        };
        let ids = tok.encode_without_bos(text)?;
        match ids.len() {
            1 => Ok(vec![ids[0]; sinks]),
            n if n == sinks => Ok(ids),
            n => bail!(
                "--sink-text {text:?} is {n} tokens; give one token (repeated S={sinks} times) or exactly S tokens"
            ),
        }
    }
}

/// The corpus as the options feed it: with `--no-bos`, every book without the BOS token its
/// tokenizer put first (so each book's first text token is fed, not scored). Without a BOS
/// (SmolLM2) the flag changes nothing.
pub fn corpus_as_fed<'c>(
    corpus: &'c TokenizedCorpus,
    tok: &TextTokenizer,
    opts: &EvalOptions,
) -> Cow<'c, TokenizedCorpus> {
    match (opts.bos, tok.bos()) {
        (false, Some(bos)) => Cow::Owned(corpus.without_leading(bos)),
        _ => Cow::Borrowed(corpus),
    }
}

/// The fed/scored stream of a run: the sink prefix, then the corpus up to `--max-tokens`.
pub fn stream_for(
    tok: &TextTokenizer,
    corpus: &TokenizedCorpus,
    opts: &EvalOptions,
) -> Result<TokenStream> {
    opts.validate()?;
    let mut stream = TokenStream::new(&corpus.ids, &opts.sink_prefix(tok)?, opts.max_tokens);
    if let Some(k) = opts.score_every {
        stream = stream.sample_every(k);
    }
    if stream.scored_count() == 0 {
        bail!("the corpus has no token to score (every book is shorter than 2 tokens)");
    }
    Ok(stream)
}

/// The numerics of this build's engines and kernels. Bump it whenever a change moves per-token
/// NLLs beyond float noise (the token engine against the tiny-model oracle, or the real model
/// by more than about 1e-4): runs computed by another epoch are then reported stale, not
/// silently reused. Epoch 1 is every run before epochs were recorded.
pub const NUMERICS_EPOCH: u32 = 1;

/// [`NUMERICS_EPOCH`], unless `STREAMPPL_NUMERICS_EPOCH` overrides it (to exercise the stale
/// path without a rebuild).
pub fn numerics_epoch() -> u32 {
    std::env::var("STREAMPPL_NUMERICS_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(NUMERICS_EPOCH)
}

/// Identifies a run's configuration: options, engine, model, the exact token stream and the
/// numerics epoch. A finished run or checkpoint with the same fingerprint is the same
/// computation. Epoch 1 hashes no epoch, so the runs computed before epochs existed keep their
/// fingerprints.
pub fn fingerprint(
    opts: &EvalOptions,
    model_sha256: &str,
    stream: &TokenStream,
    numerics_epoch: u32,
) -> String {
    let mut h = Sha256::new();
    if numerics_epoch != 1 {
        h.update(format!("numerics epoch {numerics_epoch}").as_bytes());
    }
    h.update(opts.run_name().as_bytes());
    h.update(format!("{:?}", opts.engine).as_bytes());
    h.update(model_sha256.as_bytes());
    for (fed, target) in stream.fed.iter().zip(&stream.targets) {
        h.update(fed.to_le_bytes());
        if let Some(t) = target {
            h.update(t.token.to_le_bytes());
            h.update(t.book.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The model as the options run it: with `--local-sinks`, a view whose windowed layers see the
/// sinks (its tensors shared).
pub fn model_for<'m>(model: &'m Model, opts: &EvalOptions) -> Result<Cow<'m, Model>> {
    Ok(match (opts.local_sinks, opts.strategy) {
        (true, Strategy::Sink { sinks, .. }) => Cow::Owned(model.with_local_sinks(sinks as u64)?),
        _ => Cow::Borrowed(model),
    })
}

/// Runs the strategy over the corpus and returns the per-token log (no checkpoints).
pub fn evaluate(
    model: &Model,
    tok: &TextTokenizer,
    corpus: &TokenizedCorpus,
    opts: &EvalOptions,
    progress: &ProgressBar,
) -> Result<NllLog> {
    let stream = stream_for(tok, &corpus_as_fed(corpus, tok, opts), opts)?;
    progress.set_length(stream.scored_count());
    run_strategy(
        &*model_for(model, opts)?,
        opts.strategy,
        opts.pos_shift,
        opts.engine,
        &stream,
        progress,
        None,
    )
}

/// Metrics of a log (spec section 1), with words and bytes counted over the text that the
/// scored tokens cover.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub tokens: u64,
    pub sum_nll: f64,
    pub ppl: f64,
    pub words: u64,
    pub bytes: u64,
    pub word_perplexity: f64,
    pub byte_perplexity: f64,
    pub bits_per_byte: f64,
    /// Standard error of the mean NLL (tokens taken as independent): the uncertainty of a
    /// `--score-every` sample's PPL, exp(mean +/- 1.96 SE) for a 95% interval.
    pub mean_nll_standard_error: f64,
    pub per_book: Vec<BookMetrics>,
}

fn standard_error(log: &NllLog) -> f64 {
    let n = log.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let mean = log.sum_nll() / n;
    let var = log
        .records
        .iter()
        .map(|r| (r.nll as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    (var / n).sqrt()
}

pub fn metrics(log: &NllLog, corpus: &TokenizedCorpus, tok: &TextTokenizer) -> Metrics {
    // Stream position of each book's first fed token (books are fed in order, n-1 tokens each).
    let mut book_start = Vec::with_capacity(corpus.ids.len());
    let mut next = 0u64;
    for ids in &corpus.ids {
        book_start.push(next);
        next += ids.len().saturating_sub(1) as u64;
    }
    // Per book: tokens scored, sum NLL, bytes of the scored tokens, last token index scored.
    let mut per_book: Vec<(u64, f64, u64, usize)> = vec![(0, 0.0, 0, 0); corpus.ids.len()];
    for r in &log.records {
        let b = r.book as usize;
        let index = (r.position - book_start[b]) as usize + 1; // the scored token's index in its book
        let e = &mut per_book[b];
        e.0 += 1;
        e.1 += r.nll as f64;
        e.2 += tok.bytes_in_text(&corpus.books[b].text, &corpus.ids[b], index);
        e.3 = e.3.max(index);
    }
    let (mut words, mut bytes) = (0f64, 0u64);
    for (b, &(n, _, sampled_bytes, last)) in per_book.iter().enumerate() {
        if n == 0 {
            continue;
        }
        // The text the scored tokens span: tokens 1..=last, after token 0's bytes. A sample
        // (`--score-every`) counts the words of the span in proportion to the bytes it scored.
        let (ids, text) = (&corpus.ids[b], &corpus.books[b].text);
        let start = tok.bytes_in_text(text, ids, 0) as usize;
        let span_bytes: u64 = (1..=last).map(|i| tok.bytes_in_text(text, ids, i)).sum();
        let text = text.as_bytes();
        let span = &text[start.min(text.len())..(start + span_bytes as usize).min(text.len())];
        let span_words = String::from_utf8_lossy(span).split_whitespace().count() as f64;
        words += span_words * sampled_bytes as f64 / span_bytes.max(1) as f64;
        bytes += sampled_bytes;
    }
    let words = words.round() as u64;
    let sum_nll = log.sum_nll();
    let tokens = log.len() as u64;
    Metrics {
        tokens,
        sum_nll,
        ppl: (sum_nll / tokens.max(1) as f64).exp(),
        words,
        bytes,
        word_perplexity: (sum_nll / words.max(1) as f64).exp(),
        byte_perplexity: (sum_nll / bytes.max(1) as f64).exp(),
        bits_per_byte: sum_nll / bytes.max(1) as f64 / std::f64::consts::LN_2,
        mean_nll_standard_error: standard_error(log),
        per_book: per_book
            .iter()
            .enumerate()
            .filter(|(_, (n, ..))| *n > 0)
            .map(|(b, &(n, s, ..))| BookMetrics {
                book: b as u32,
                title: corpus.books[b].title.clone(),
                tokens_scored: n,
                ppl: (s / n as f64).exp(),
            })
            .collect(),
    }
}
