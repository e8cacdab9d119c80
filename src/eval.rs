//! One evaluation: tokenized corpus + strategy -> per-token NLL log -> metrics and run record.

use anyhow::{Result, bail};
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use crate::corpus::Book;
use crate::engine::{EngineKind, run_strategy};
use crate::model::Llama;
use crate::nll_log::{BookMetrics, NllLog};
use crate::strategy::Strategy;
use crate::stream::TokenStream;
use crate::tokenizer::TextTokenizer;

/// Books with their token ids, tokenized only as far as a run needs.
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
}

/// Block size of the block engine unless `--block-size` says otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 64;

impl EvalOptions {
    pub fn new(strategy: Strategy) -> Self {
        EvalOptions {
            strategy,
            pos_shift: true,
            sink_text: None,
            max_tokens: None,
            engine: EngineKind::Block(DEFAULT_BLOCK_SIZE),
        }
    }

    /// A name unique to the options, safe as a directory name: the strategy spec plus variants.
    pub fn run_name(&self) -> String {
        let mut name = self.strategy.to_string();
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
        label
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
        if !self.pos_shift && self.strategy.sink_window().is_none() {
            bail!(
                "--no-pos-shift applies to window:W and sink:S+W only, not `{}`",
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
        let ids = tok.encode(text)?;
        match ids.len() {
            1 => Ok(vec![ids[0]; sinks]),
            n if n == sinks => Ok(ids),
            n => bail!(
                "--sink-text {text:?} is {n} tokens; give one token (repeated S={sinks} times) or exactly S tokens"
            ),
        }
    }
}

/// The fed/scored stream of a run: the sink prefix, then the corpus up to `--max-tokens`.
pub fn stream_for(
    tok: &TextTokenizer,
    corpus: &TokenizedCorpus,
    opts: &EvalOptions,
) -> Result<TokenStream> {
    opts.validate()?;
    let stream = TokenStream::new(&corpus.ids, &opts.sink_prefix(tok)?, opts.max_tokens);
    if stream.scored_count() == 0 {
        bail!("the corpus has no token to score (every book is shorter than 2 tokens)");
    }
    Ok(stream)
}

/// Identifies a run's configuration: options, model and the exact token stream. A finished run
/// or checkpoint with the same fingerprint is the same computation.
pub fn fingerprint(opts: &EvalOptions, model_sha256: &str, stream: &TokenStream) -> String {
    let mut h = Sha256::new();
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

/// Runs the strategy over the corpus and returns the per-token log (no checkpoints).
pub fn evaluate(
    model: &Llama,
    tok: &TextTokenizer,
    corpus: &TokenizedCorpus,
    opts: &EvalOptions,
    progress: &ProgressBar,
) -> Result<NllLog> {
    let stream = stream_for(tok, corpus, opts)?;
    progress.set_length(stream.scored_count());
    run_strategy(
        model,
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
    pub per_book: Vec<BookMetrics>,
}

pub fn metrics(log: &NllLog, corpus: &TokenizedCorpus, tok: &TextTokenizer) -> Metrics {
    let mut per_book: Vec<(u64, f64)> = vec![(0, 0.0); corpus.ids.len()];
    for r in &log.records {
        let e = &mut per_book[r.book as usize];
        e.0 += 1;
        e.1 += r.nll as f64;
    }
    let (mut words, mut bytes) = (0u64, 0u64);
    for (b, &(n, _)) in per_book.iter().enumerate() {
        if n == 0 {
            continue;
        }
        // Scored tokens of a book are its tokens 1..=n; their text follows token 0's bytes.
        let ids = &corpus.ids[b];
        let start = if tok.bos() == Some(ids[0]) {
            0
        } else {
            tok.token_bytes(ids[0]) as usize
        };
        let len: u64 = ids[1..=n as usize]
            .iter()
            .map(|&id| tok.token_bytes(id))
            .sum();
        let text = corpus.books[b].text.as_bytes();
        let span = &text[start.min(text.len())..(start + len as usize).min(text.len())];
        words += String::from_utf8_lossy(span).split_whitespace().count() as u64;
        bytes += len;
    }
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
        per_book: per_book
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| *n > 0)
            .map(|(b, &(n, s))| BookMetrics {
                book: b as u32,
                title: corpus.books[b].title.clone(),
                tokens_scored: n,
                ppl: (s / n as f64).exp(),
            })
            .collect(),
    }
}
