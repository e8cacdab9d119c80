//! The tokenizer: built from a GGUF file's own metadata (GPT-2-style byte-level BPE, or
//! SentencePiece BPE as Gemma 3's), or read from a Hugging Face `tokenizer.json`
//! (+ `tokenizer_config.json`): a model folder's, or one beside a GGUF file.
//!
//! ```no_run
//! use streamppl::tokenizer::TextTokenizer;
//! let tok = TextTokenizer::for_model(std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
//! let ids = tok.encode("Of Mans First Disobedience").unwrap();
//! assert_eq!(tok.decode(&ids).unwrap(), "Of Mans First Disobedience");
//! ```

use crate::one_line;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::Value as Json;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, Encoding, PreTokenizerWrapper, Token, Tokenizer};

use crate::source::{ModelFiles, ResolvedModel, TOKENIZER_CONFIG};

/// A tokenizer plus what metrics need from it: each token's length in UTF-8 bytes.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Prepended to every book when the model's config asks for it (SmolLM2's does not).
    bos: Option<u32>,
    /// Indexed by token id; ids the vocabulary does not use count 0.
    token_bytes: Vec<u32>,
    prefix_space: PrefixSpace,
    /// The file the tokenizer was read from, for error messages.
    origin: PathBuf,
}

/// Why a tokenizer could not be read or does not fit the model; one line naming the file and
/// the fix.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "{}: cannot read the tokenizer ({why}); re-download it or write it again with `save_pretrained`",
        .path.display()
    )]
    Unreadable { path: PathBuf, why: String },
    #[error("{}: {why}; {fix}", .path.display())]
    Unsupported {
        path: PathBuf,
        why: String,
        fix: &'static str,
    },
    #[error(
        "{}: the tokenizer has token ids up to {highest} but the model's embedding has {model_vocab} rows; use the tokenizer that belongs to this model",
        .path.display()
    )]
    VocabTooLarge {
        path: PathBuf,
        highest: u32,
        model_vocab: usize,
    },
}

/// How a vocabulary spells the bytes of text in its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteScheme {
    /// GPT-2's byte-level BPE: each character of a token stands for one byte.
    ByteLevel,
    /// SentencePiece style: `replacement` (`▁`) stands for a space; with byte fallback, tokens
    /// `<0xHH>` stand for one byte each.
    Metaspace {
        replacement: char,
        byte_fallback: bool,
    },
    /// Tokens are the text itself.
    Plain,
}

/// The space a tokenizer puts before a text by itself (SentencePiece's dummy prefix, ByteLevel's
/// `add_prefix_space`): it is in the first token but not in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrefixSpace {
    Never,
    Always,
    /// Metaspace and ByteLevel: only when the text does not start with a space already.
    UnlessLeadingSpace,
}

/// GPT-2's byte-to-printable-character map, inverted: which byte each character of a
/// byte-level token stands for.
fn byte_level_decoder_map() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut map = HashMap::new();
    let mut next = 0u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(255 + next).expect("valid code point")
        };
        map.insert(c, b);
    }
    map
}

/// SentencePiece's byte-fallback token spelling, `<0x0A>`.
fn is_byte_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && token[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

impl TextTokenizer {
    /// `tokenizer.json` (with `tokenizer_config.json`, if any) beside the model if present, else
    /// the GGUF's own tokenizer metadata.
    pub fn for_model(model_path: &Path) -> Result<Self> {
        crate::model::gguf::check_model_file(model_path)?;
        let beside = model_path.with_file_name("tokenizer.json");
        if beside.is_file() {
            let config = model_path.with_file_name(TOKENIZER_CONFIG);
            let config = config.is_file().then_some(config);
            return Ok(Self::from_hf_files(&beside, config.as_deref())?);
        }
        let mut reader = BufReader::new(
            File::open(model_path)
                .with_context(|| format!("{}: cannot open model", model_path.display()))?,
        );
        let content = Content::read(&mut reader)
            .map_err(|e| anyhow!("{}: not a readable GGUF file ({e})", model_path.display()))?;
        let mut tok = Self::from_gguf_metadata(&content.metadata).with_context(|| {
            format!(
                "{}: building the tokenizer from GGUF metadata",
                model_path.display()
            )
        })?;
        tok.origin = model_path.into();
        Ok(tok)
    }

    /// The tokenizer of a resolved `--model`: a GGUF's (see [`Self::for_model`]) or a Hugging
    /// Face folder's `tokenizer.json` + `tokenizer_config.json`.
    pub fn for_resolved(model: &ResolvedModel) -> Result<Self> {
        match &model.files {
            ModelFiles::Gguf(path) => Self::for_model(path),
            ModelFiles::HuggingFace(files) => Ok(Self::from_hf_files(
                &files.tokenizer,
                files.tokenizer_config.as_deref(),
            )?),
        }
    }

    /// A Hugging Face fast tokenizer. BOS is what `transformers`' `tokenizer(text)["input_ids"]`
    /// starts with: `add_bos_token` in `tokenizer_config.json` decides when it is there (as
    /// Llama's and Gemma's tokenizers rebuild their post-processor from it), else the
    /// `tokenizer.json` post-processor's own prefix. BOS is added once, never twice. Tokens the
    /// post-processor appends (EOS) are not: a book's end is the next book's start.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        let unreadable = |why: String| TokenizerError::Unreadable {
            path: tokenizer_json.into(),
            why,
        };
        let text = std::fs::read_to_string(tokenizer_json).map_err(|e| unreadable(one_line(e)))?;
        let json: Json = serde_json::from_str(&text)
            .map_err(|e| unreadable(format!("not JSON: {}", one_line(e))))?;
        let mut inner: Tokenizer = text.parse().map_err(|e| unreadable(one_line(e)))?;
        // transformers neither truncates nor pads unless asked, whatever tokenizer.json says.
        inner
            .with_truncation(None)
            .map_err(|e| unreadable(one_line(e)))?
            .with_padding(None);
        let scheme = byte_scheme(&json);
        let post_bos = post_processor_bos(&inner, tokenizer_json)?;
        let bos = match tokenizer_config {
            Some(config) => configured_bos(&inner, config, post_bos)?,
            None => post_bos,
        };
        let mut tok = Self::from_tokenizer(inner, bos, scheme, tokenizer_json);
        tok.prefix_space = tok.probe_prefix_space();
        Ok(tok)
    }

    /// The tokenizer a GGUF file describes in `tokenizer.ggml.*`, as llama.cpp reads it:
    /// `gpt2` is byte-level BPE with merges (spec section 4), `llama` is SentencePiece BPE
    /// whose merges follow the token scores (Gemma 3).
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = gguf_key(md, "tokenizer.ggml.model")?.to_string()?;
        let (mut inner, scheme, bos) = match model.as_str() {
            "gpt2" => (
                byte_level_bpe(md)?,
                ByteScheme::ByteLevel,
                gguf_bos(md, false)?,
            ),
            // llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
            "llama" => (sentencepiece_bpe(md)?, SENTENCEPIECE, gguf_bos(md, true)?),
            other => bail!(
                "tokenizer model `{other}` is neither byte-level BPE (gpt2) nor SentencePiece (llama); put a tokenizer.json beside the model"
            ),
        };
        if let Some(bos) = bos {
            with_bos_template(&mut inner, bos)?;
        }
        Ok(Self::from_tokenizer(
            inner,
            bos,
            scheme,
            Path::new("GGUF metadata"),
        ))
    }

    fn from_tokenizer(
        inner: Tokenizer,
        bos: Option<u32>,
        scheme: ByteScheme,
        origin: &Path,
    ) -> Self {
        let map = byte_level_decoder_map();
        let vocab = inner.get_vocab(true);
        let added = inner.get_added_tokens_decoder();
        let bound = vocab.values().max().map_or(0, |&id| id as usize + 1);
        let mut token_bytes = vec![0u32; bound];
        for (token, &id) in &vocab {
            // Added tokens (special or not) are matched whole in the raw text: their bytes are
            // their own. Only the BOS this tokenizer prepends stands for no text, and metrics
            // never count a book's first token.
            let bytes = match (added.contains_key(&id), scheme) {
                (true, _) | (false, ByteScheme::Plain) => token.len(),
                (false, ByteScheme::ByteLevel) => match token.chars().all(|c| map.contains_key(&c))
                {
                    true => token.chars().count(),
                    false => token.len(),
                },
                (
                    false,
                    ByteScheme::Metaspace {
                        byte_fallback: true,
                        ..
                    },
                ) if is_byte_token(token) => 1,
                (false, ByteScheme::Metaspace { replacement, .. }) => token
                    .chars()
                    .map(|c| if c == replacement { 1 } else { c.len_utf8() })
                    .sum(),
            };
            token_bytes[id as usize] = bytes as u32;
        }
        TextTokenizer {
            inner,
            bos,
            token_bytes,
            prefix_space: PrefixSpace::Never,
            origin: origin.into(),
        }
    }

    /// Whether the tokenizer puts a space before a text by itself, found by encoding `a` and
    /// ` a`: one byte more than the text in either says so.
    fn probe_prefix_space(&self) -> PrefixSpace {
        let extra = |text: &str| {
            let bytes: u64 = self
                .inner
                .encode_fast(text, false)
                .map(|e| e.get_ids().iter().map(|&id| self.token_bytes(id)).sum())
                .unwrap_or(text.len() as u64);
            bytes.saturating_sub(text.len() as u64)
        };
        match (extra("a"), extra(" a")) {
            (1, 1) => PrefixSpace::Always,
            (1, 0) => PrefixSpace::UnlessLeadingSpace,
            _ => PrefixSpace::Never,
        }
    }

    /// Token ids of `text`, exactly as stored (no normalization), with BOS if the model wants it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .bos
            .into_iter()
            .chain(self.encode_without_bos(text)?)
            .collect())
    }

    /// Token ids of `text` alone, never a BOS (a piece of text inside a stream: `--sink-text`).
    pub fn encode_without_bos(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding: {e}"))
    }

    /// Writes the tokenizer as a `tokenizer.json` (a GGUF's own tokenizer included), so a
    /// checkpoint folder can carry it.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| anyhow!("{}: cannot write the tokenizer ({e})", path.display()))
    }

    /// How many UTF-8 bytes of text token `id` stands for (`▁` one space, `<0x0A>` one byte, an
    /// added token its own length). See [`Self::bytes_in_text`] for the first tokens of a text.
    pub fn token_bytes(&self, id: u32) -> u64 {
        self.token_bytes.get(id as usize).copied().unwrap_or(0) as u64
    }

    /// How many bytes of `text` token `ids[index]` stands for, where `ids` is `encode(text)`,
    /// with or without its BOS (`--no-bos`): 0 for the BOS, the first text token less the space
    /// the tokenizer put before the text by itself (SentencePiece's dummy prefix), any other
    /// its [`Self::token_bytes`]. Over all of `ids` these add up to `text.len()`.
    pub fn bytes_in_text(&self, text: &str, ids: &[u32], index: usize) -> u64 {
        // A BOS id first is the prepended BOS: a GGUF tokenizer spells control tokens out, and
        // a book that itself starts with the BOS's spelling is not in any corpus here.
        let first_text_token = usize::from(self.bos.is_some() && ids.first() == self.bos.as_ref());
        match index.cmp(&first_text_token) {
            std::cmp::Ordering::Less => 0,
            std::cmp::Ordering::Equal => self
                .token_bytes(ids[index])
                .saturating_sub(self.prefix_space_bytes(text)),
            std::cmp::Ordering::Greater => self.token_bytes(ids[index]),
        }
    }

    /// The bytes of the space the tokenizer puts before `text` by itself (0 or 1).
    pub fn prefix_space_bytes(&self, text: &str) -> u64 {
        match self.prefix_space {
            PrefixSpace::Never => 0,
            PrefixSpace::Always => 1,
            PrefixSpace::UnlessLeadingSpace => u64::from(!text.starts_with(' ')),
        }
    }

    /// The BOS token prepended to every book, if the model asks for one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Whether every book starts with a BOS token (for run records).
    pub fn bos_added(&self) -> bool {
        self.bos.is_some()
    }

    /// One past the highest token id.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Refuses a tokenizer that can produce ids the model's embedding (`model_vocab` rows) does
    /// not have. A smaller tokenizer is fine (embeddings are often padded).
    pub fn check_vocab(&self, model_vocab: usize) -> Result<(), TokenizerError> {
        match self.vocab_size() > model_vocab {
            true => Err(TokenizerError::VocabTooLarge {
                path: self.origin.clone(),
                highest: self.vocab_size() as u32 - 1,
                model_vocab,
            }),
            false => Ok(()),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// How a GGUF SentencePiece vocabulary spells text: `▁` for a space, `<0xHH>` byte tokens.
const SENTENCEPIECE: ByteScheme = ByteScheme::Metaspace {
    replacement: '▁',
    byte_fallback: true,
};

fn gguf_key<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key).ok_or_else(|| {
        anyhow!("no `{key}` in the GGUF metadata; put a tokenizer.json beside the model")
    })
}

fn gguf_strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    Ok(gguf_key(md, key)?
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<_, _>>()?)
}

/// `tokenizer.ggml.token_type`, one per token; every token is normal when it is absent.
fn gguf_token_types(md: &HashMap<String, Value>, tokens: usize) -> Result<Vec<i32>> {
    match md.get("tokenizer.ggml.token_type") {
        Some(v) => Ok(v
            .to_vec()?
            .iter()
            .map(|t| t.to_i32())
            .collect::<Result<_, _>>()?),
        None => Ok(vec![TOKEN_NORMAL; tokens]),
    }
}

/// The BOS to put before every text: `tokenizer.ggml.bos_token_id` when
/// `tokenizer.ggml.add_bos_token` (else `add_by_default`) says so.
fn gguf_bos(md: &HashMap<String, Value>, add_by_default: bool) -> Result<Option<u32>> {
    let add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(add_by_default);
    Ok(match add_bos {
        true => Some(gguf_key(md, "tokenizer.ggml.bos_token_id")?.to_u32()?),
        false => None,
    })
}

/// Puts `bos` before every text in the tokenizer's post-processor. [`TextTokenizer::encode`]
/// adds BOS itself, so this only tells a saved `tokenizer.json` (and whoever loads it) about it.
fn with_bos_template(inner: &mut Tokenizer, bos: u32) -> Result<()> {
    let token = inner.id_to_token(bos).ok_or_else(|| {
        anyhow!("`tokenizer.ggml.bos_token_id` {bos} is not a token id; the GGUF file is damaged, fetch it again")
    })?;
    let template = TemplateProcessing::builder()
        .try_single(vec![token.as_str(), "$A"])
        .map_err(|e| anyhow!("BOS template: {e}"))?
        .special_tokens(vec![(token.as_str(), bos)])
        .build()
        .map_err(|e| anyhow!("BOS template: {e}"))?;
    inner.with_post_processor(Some(template));
    Ok(())
}

/// The tokens of `types` equal to `token_type`, as added tokens (`special` or not).
fn added_tokens(
    tokens: &[String],
    types: &[i32],
    token_type: i32,
    special: bool,
) -> Vec<AddedToken> {
    tokens
        .iter()
        .zip(types)
        .filter(|(_, t)| **t == token_type)
        .map(|(s, _)| AddedToken::from(s.clone(), special).normalized(false))
        .collect()
}

/// Byte-level BPE from `tokenizer.ggml.{tokens,merges,token_type,pre}` (spec section 4).
fn byte_level_bpe(md: &HashMap<String, Value>) -> Result<Tokenizer> {
    let tokens = gguf_strings(md, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = gguf_strings(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("bad merge `{m}`"))
        })
        .collect::<Result<_>>()?;
    let types = gguf_token_types(md, tokens.len())?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_of(&tokens), merges)
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    let mut inner = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    match pre {
        // SmolLM2: every digit is its own pre-token.
        Some("smollm") => inner.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ]))),
        Some("gpt2") | Some("default") | None => inner.with_pre_tokenizer(Some(byte_level)),
        Some(other) => bail!(
            "GGUF pre-tokenizer `{other}` is not supported yet; put a tokenizer.json beside the model"
        ),
    };
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens: matched whole in the text, never split.
    inner
        .add_special_tokens(added_tokens(&tokens, &types, TOKEN_CONTROL, true))
        .map_err(|e| anyhow!("adding control tokens: {e}"))?;
    Ok(inner)
}

/// SentencePiece BPE from `tokenizer.ggml.{tokens,scores,token_type}`, giving llama.cpp's ids:
/// its SPM tokenizer joins, again and again, the adjacent pair that makes the vocabulary's
/// highest-scoring token, which is a BPE whose merges are ranked by that score (see
/// [`merges_by_score`]). As in llama.cpp (which tokenizes with `parse_special` off), only the
/// user-defined tokens (runs of newlines, spaces and tabs, HTML tags) are matched whole in the
/// raw text first; control tokens such as `<bos>` are spelled out like any other text.
fn sentencepiece_bpe(md: &HashMap<String, Value>) -> Result<Tokenizer> {
    refuse_dummy_prefix(md)?;
    let tokens = gguf_strings(md, "tokenizer.ggml.tokens")?;
    let scores = gguf_scores(md, tokens.len())?;
    let types = gguf_token_types(md, tokens.len())?;
    let mut inner = Tokenizer::new(score_ranked_bpe(md, &tokens, &scores)?);
    with_metaspace(&mut inner)?;
    // Not normalized: they match the raw text, spaces included, before ` ` becomes `▁`.
    inner
        .add_tokens(added_tokens(&tokens, &types, TOKEN_USER_DEFINED, false))
        .map_err(|e| anyhow!("adding user-defined tokens: {e}"))?;
    Ok(inner)
}

/// With `add_space_prefix` (llama.cpp's default, Llama 2) llama.cpp puts a space before the
/// text and after every user-defined token, which the byte counts of [`PrefixSpace`] cannot
/// follow; Gemma's files turn it off.
fn refuse_dummy_prefix(md: &HashMap<String, Value>) -> Result<()> {
    let space_prefix = md
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    if space_prefix {
        bail!(
            "SentencePiece vocabularies with a dummy prefix (`tokenizer.ggml.add_space_prefix` true or absent) are not supported yet; put a tokenizer.json beside the model"
        );
    }
    Ok(())
}

/// A byte-fallback BPE over `tokens` whose merges follow `scores` (see [`merges_by_score`]).
fn score_ranked_bpe(md: &HashMap<String, Value>, tokens: &[String], scores: &[f32]) -> Result<BPE> {
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab_of(tokens), merges_by_score(tokens, scores))
        .byte_fallback(true);
    let unk = md.get("tokenizer.ggml.unknown_token_id");
    if let Some(unk) = unk.and_then(|id| tokens.get(id.to_u32().ok()? as usize)) {
        bpe = bpe.unk_token(unk.clone());
    }
    bpe.build().map_err(|e| anyhow!("{e}"))
}

/// SentencePiece's spelling: a space is `▁` in tokens, byte tokens `<0xHH>` decode to bytes.
fn with_metaspace(inner: &mut Tokenizer) -> Result<()> {
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| anyhow!("{e}"));
    inner
        .with_normalizer(Some(replace(" ", "▁")?))
        .map_err(|e| anyhow!("{e}"))?;
    inner.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(replace("▁", " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ])));
    Ok(())
}

/// `tokenizer.ggml.scores`, one per token.
fn gguf_scores(md: &HashMap<String, Value>, tokens: usize) -> Result<Vec<f32>> {
    let scores: Vec<f32> = gguf_key(md, "tokenizer.ggml.scores")?
        .to_vec()?
        .iter()
        .map(|s| s.to_f32())
        .collect::<Result<_, _>>()?;
    if scores.len() != tokens {
        bail!(
            "`tokenizer.ggml.scores` holds {} scores for {tokens} tokens; the GGUF file is damaged, fetch it again",
            scores.len()
        );
    }
    Ok(scores)
}

fn vocab_of(tokens: &[String]) -> ahash::AHashMap<String, u32> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// The BPE merges equivalent to SentencePiece's scores: every way to write a token as two
/// vocabulary tokens, ranked by the joined token's score, highest first (as transformers'
/// GGUF converter and SentencePieceExtractor derive them). Equal scores keep vocabulary order.
fn merges_by_score(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let known: ahash::AHashSet<&str> = tokens.iter().map(String::as_str).collect();
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    // `+ 0.0` turns -0.0 into 0.0: llama.cpp compares scores with `<`, where they are equal.
    order.sort_by(|&a, &b| (scores[b] + 0.0).total_cmp(&(scores[a] + 0.0)));
    order
        .into_iter()
        .flat_map(|i| {
            let token = tokens[i].as_str();
            let known = &known;
            token
                .char_indices()
                .skip(1)
                .map(move |(at, _)| token.split_at(at))
                .filter(move |(left, right)| known.contains(left) && known.contains(right))
        })
        .map(|(left, right)| (left.to_string(), right.to_string()))
        .collect()
}

/// Every component object (`{"type": ...}`) of a `tokenizer.json` section, sequences flattened.
fn components<'a>(json: &'a Json, out: &mut Vec<&'a Json>) {
    match json {
        Json::Object(map) => {
            if map.contains_key("type") {
                out.push(json);
            }
            map.values().for_each(|v| components(v, out));
        }
        Json::Array(items) => items.iter().for_each(|v| components(v, out)),
        _ => {}
    }
}

/// Byte-level if the pre-tokenizer or decoder is ByteLevel; SentencePiece style if a Metaspace
/// or a `▁` replacement is anywhere in the pipeline; else plain.
fn byte_scheme(json: &Json) -> ByteScheme {
    let mut parts = Vec::new();
    for section in ["normalizer", "pre_tokenizer", "decoder"] {
        components(&json[section], &mut parts);
    }
    let kind = |p: &Json| p["type"].as_str().unwrap_or_default().to_string();
    if parts.iter().any(|p| kind(p) == "ByteLevel") {
        return ByteScheme::ByteLevel;
    }
    let metaspace_char = parts.iter().find_map(|p| match kind(p).as_str() {
        "Metaspace" => p["replacement"].as_str()?.chars().next(),
        "Prepend" => p["prepend"].as_str()?.chars().next(),
        "Replace" => {
            let (pattern, content) = (p["pattern"]["String"].as_str()?, p["content"].as_str()?);
            // The normalizer writes ` ` as `▁`; the decoder writes `▁` back as ` `.
            [(pattern, content), (content, pattern)]
                .into_iter()
                .find(|(from, _)| *from == " ")
                .and_then(|(_, to)| to.chars().next())
        }
        _ => None,
    });
    let Some(replacement) = metaspace_char else {
        return ByteScheme::Plain;
    };
    let byte_fallback = json["model"]["byte_fallback"].as_bool() == Some(true)
        || parts.iter().any(|p| kind(p) == "ByteFallback");
    ByteScheme::Metaspace {
        replacement,
        byte_fallback,
    }
}

/// The token the `tokenizer.json` post-processor puts before every text, if any: found by
/// post-processing a one-token encoding whose id no vocabulary has, so it works whatever the
/// vocabulary can encode.
fn post_processor_bos(inner: &Tokenizer, path: &Path) -> Result<Option<u32>, TokenizerError> {
    const MARK: u32 = u32::MAX;
    let text = Encoding::from_tokens(vec![Token::new(MARK, "a".into(), (0, 1))], 0);
    let processed =
        inner
            .post_process(text, None, true)
            .map_err(|e| TokenizerError::Unreadable {
                path: path.into(),
                why: format!("its post-processor failed on a probe: {}", one_line(e)),
            })?;
    let ids = processed.get_ids();
    match &ids[..ids.iter().position(|&id| id == MARK).unwrap_or(0)] {
        [] => Ok(None),
        [bos] => Ok(Some(*bos)),
        more => Err(TokenizerError::Unsupported {
            path: path.into(),
            why: format!(
                "its post-processor puts {} tokens before every text",
                more.len()
            ),
            fix: "streamppl supports a BOS token only; remove the others from `post_processor`",
        }),
    }
}

/// BOS as `tokenizer_config.json` says: `add_bos_token` true adds `bos_token` (a string or an
/// `{"content": ...}` object), false adds none, absent leaves the post-processor's choice.
fn configured_bos(
    inner: &Tokenizer,
    config: &Path,
    post_bos: Option<u32>,
) -> Result<Option<u32>, TokenizerError> {
    let unsupported = |why: String| TokenizerError::Unsupported {
        path: config.into(),
        why,
        fix: "set `add_bos_token` and `bos_token` to the model's, or delete the file",
    };
    let text = std::fs::read_to_string(config).map_err(|e| TokenizerError::Unreadable {
        path: config.into(),
        why: one_line(e),
    })?;
    let json: Json = serde_json::from_str(&text)
        .map_err(|e| unsupported(format!("not JSON ({})", one_line(e))))?;
    match &json["add_bos_token"] {
        Json::Null => Ok(post_bos),
        Json::Bool(false) => Ok(None),
        Json::Bool(true) => {
            let named = json["bos_token"]
                .as_str()
                .or_else(|| json["bos_token"]["content"].as_str());
            match named {
                Some(token) => inner.token_to_id(token).map(Some).ok_or_else(|| {
                    unsupported(format!(
                        "bos_token `{token}` is not in the tokenizer's vocabulary"
                    ))
                }),
                None => post_bos.map(Some).ok_or_else(|| {
                    unsupported("add_bos_token is true but there is no bos_token".into())
                }),
            }
        }
        other => Err(unsupported(format!(
            "add_bos_token is {other}, not true or false"
        ))),
    }
}

/// Why a command-line text with backslash escapes could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EscapeError {
    #[error("a lone `\\` ends the text; write `\\\\` for a backslash")]
    Dangling,
    #[error(
        "unknown escape `\\{0}`; use \\n, \\t, \\r, \\\\, \\\", \\xHH (ASCII) or \\u{{HEX}}, or `\\\\` for a backslash"
    )]
    Unknown(char),
    #[error(
        "`\\x{0}` is not two hex digits of an ASCII byte (00-7F); write \\u{{HEX}} for other characters"
    )]
    BadByte(String),
    #[error("`\\u{0}` is not a Unicode scalar value written \\u{{1-6 hex digits}}, e.g. \\u{{a0}}")]
    BadUnicode(String),
}

/// Interprets the backslash escapes of a command-line text, as a shell leaves them in `"\n"`:
/// `\n`, `\t`, `\r`, `\\`, `\"`, `\xHH` (an ASCII byte, 00-7F) and `\u{HEX}` (any character).
/// Any other escape, and a `\` at the end, is an error rather than a guess.
///
/// ```
/// use streamppl::tokenizer::unescape;
/// assert_eq!(unescape(r"\n").unwrap(), "\n");
/// assert_eq!(unescape(r"a\tb\\c\x41\u{e9}").unwrap(), "a\tb\\cA\u{e9}");
/// assert!(unescape(r"\q").is_err());
/// ```
pub fn unescape(text: &str) -> Result<String, EscapeError> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let escaped = match chars.next().ok_or(EscapeError::Dangling)? {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            '\\' => '\\',
            '"' => '"',
            'x' => {
                let hex: String = chars.by_ref().take(2).collect();
                let two_digits = hex.len() == 2 && hex.chars().all(|c| c.is_ascii_hexdigit());
                u8::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|b| two_digits && b.is_ascii())
                    .map(char::from)
                    .ok_or(EscapeError::BadByte(hex))?
            }
            'u' => unicode_escape(&mut chars)?,
            other => return Err(EscapeError::Unknown(other)),
        };
        out.push(escaped);
    }
    Ok(out)
}

/// The character of a `\u{HEX}` escape whose `\u` has been read.
fn unicode_escape(chars: &mut std::str::Chars) -> Result<char, EscapeError> {
    let rest = chars.as_str();
    let Some(body) = rest
        .strip_prefix('{')
        .and_then(|r| r.split_once('}'))
        .map(|(h, _)| h)
    else {
        let shown: String = rest.chars().take(8).collect();
        return Err(EscapeError::BadUnicode(shown));
    };
    let bad = || EscapeError::BadUnicode(format!("{{{body}}}"));
    let valid_hex = (1..=6).contains(&body.len()) && body.chars().all(|c| c.is_ascii_hexdigit());
    let c = valid_hex
        .then(|| u32::from_str_radix(body, 16).ok().and_then(char::from_u32))
        .flatten()
        .ok_or_else(bad)?;
    *chars = rest[body.len() + 2..].chars(); // past `{`, the digits and `}`
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A fresh folder under the system temp dir, unique per test and process.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("streamppl-tok-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn added(id: u32, content: &str) -> Json {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    }

    /// A TemplateProcessing post-processor: `<s>` before the text, `</s>` after it, as asked.
    fn template(bos: bool, eos: bool) -> Json {
        let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
        let single: Vec<Json> = [
            (bos, special("<s>")),
            (true, json!({"Sequence": {"id": "A", "type_id": 0}})),
            (eos, special("</s>")),
        ]
        .into_iter()
        .filter_map(|(keep, part)| keep.then_some(part))
        .collect();
        json!({"type": "TemplateProcessing", "single": single, "pair": single,
               "special_tokens": {
                   "<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                   "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}})
    }

    fn bos_template() -> Json {
        template(true, false)
    }

    /// A Llama-2-style SentencePiece BPE: `<unk> <s> </s>`, the 256 byte-fallback tokens, a few
    /// `▁` pieces. `legacy` spells the dummy prefix as Llama 2's tokenizer.json does (a Prepend
    /// normalizer); otherwise as a Metaspace pre-tokenizer (prepend_scheme "first").
    fn sentencepiece_json(legacy: bool, post_processor: Json) -> Json {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(t.to_string(), json!(i));
        }
        for b in 0..=255u32 {
            vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
        }
        let pieces = [
            "▁", "t", "h", "e", "c", "a", "s", "▁t", "he", "▁the", "▁c", "at", "▁cat", "▁s", "▁sat",
        ];
        for (i, p) in pieces.iter().enumerate() {
            vocab.insert(p.to_string(), json!(259 + i));
        }
        let merges = ["▁ t", "h e", "▁t he", "▁ c", "a t", "▁c at", "▁ s", "▁s at"];
        // Llama 2's decoder, for both spellings of the prefix.
        let decoder = json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
        let (normalizer, pre_tokenizer) = match legacy {
            true => (
                json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "▁"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}),
                Json::Null,
            ),
            false => (
                Json::Null,
                json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                       "split": false}),
            ),
        };
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
            "post_processor": post_processor, "decoder": decoder,
        })
    }

    /// A GPT-2-style byte-level BPE: the 256 byte characters, `Ġt he` merges, `<|endoftext|>`.
    fn byte_level_json(add_prefix_space: bool) -> Json {
        let mut chars: Vec<(u8, char)> = byte_level_decoder_map()
            .into_iter()
            .map(|(c, b)| (b, c))
            .collect();
        chars.sort();
        let mut vocab = serde_json::Map::new();
        for (b, c) in chars {
            vocab.insert(c.to_string(), json!(b));
        }
        for (i, t) in ["Ġt", "he", "Ġthe"].iter().enumerate() {
            vocab.insert(t.to_string(), json!(256 + i));
        }
        vocab.insert("<|endoftext|>".into(), json!(259));
        let byte_level = |prefix: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true,
                   "use_regex": true})
        };
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added(259, "<|endoftext|>")],
            "normalizer": null, "pre_tokenizer": byte_level(add_prefix_space),
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": ["Ġ t", "h e", "Ġt he"]},
            "post_processor": byte_level(true), "decoder": byte_level(true),
        })
    }

    /// Writes tokenizer.json (and tokenizer_config.json when given) and loads them.
    fn load(
        dir: &Path,
        tokenizer: &Json,
        config: Option<Json>,
    ) -> Result<TextTokenizer, TokenizerError> {
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, tokenizer.to_string()).unwrap();
        let config_path = dir.join("tokenizer_config.json");
        let _ = std::fs::remove_file(&config_path);
        if let Some(config) = config {
            std::fs::write(&config_path, config.to_string()).unwrap();
        }
        TextTokenizer::from_hf_files(
            &path,
            Some(&config_path)
                .filter(|p| p.is_file())
                .map(|p| p.as_path()),
        )
    }

    const TEXTS: [&str; 5] = [
        "the cat sat\n\non the mat. thé 日本 🚀",
        " the leading space",
        "\nthe newline first",
        "t",
        "  two spaces, tabs\tand\r\nCRLF ",
    ];

    /// The byte lengths of `text`'s tokens add up to its UTF-8 length, BOS counting 0.
    fn assert_bytes_add_up(tok: &TextTokenizer, text: &str) {
        let ids = tok.encode(text).unwrap();
        let bytes: u64 = (0..ids.len())
            .map(|i| tok.bytes_in_text(text, &ids, i))
            .sum();
        assert_eq!(bytes, text.len() as u64, "{text:?} -> {ids:?}");
    }

    #[test]
    fn sentencepiece_bytes_count_the_space_and_byte_tokens_once() {
        let dir = temp_dir("sp-bytes");
        for legacy in [true, false] {
            let tok = load(&dir, &sentencepiece_json(legacy, bos_template()), None).unwrap();
            let id = |t: &str| tok.inner.token_to_id(t).unwrap();
            assert_eq!(tok.token_bytes(id("▁the")), 4);
            assert_eq!(tok.token_bytes(id("▁")), 1);
            assert_eq!(tok.token_bytes(id("<0x0A>")), 1);
            assert_eq!(tok.token_bytes(id("<0xE6>")), 1);
            assert_eq!(
                tok.token_bytes(id("<s>")),
                3,
                "a special token matched in the text"
            );
            for text in TEXTS {
                assert_bytes_add_up(&tok, text);
                let ids = tok.encode(text).unwrap();
                assert_eq!(ids[0], 1, "BOS");
                // Prepend + Strip round-trips; Metaspace's decoder drops a leading space.
                if legacy {
                    assert_eq!(tok.decode(&ids[1..]).unwrap(), text);
                }
            }
            // Byte fallback really happens: 日 is three byte tokens.
            let ids = tok.encode("日").unwrap();
            assert_eq!(ids.len(), 1 + 1 + 3, "BOS, ▁, three bytes: {ids:?}");
        }
        // The dummy prefix: always with Prepend, only before a non-space with Metaspace.
        let legacy = load(&dir, &sentencepiece_json(true, bos_template()), None).unwrap();
        assert_eq!(legacy.prefix_space, PrefixSpace::Always);
        let metaspace = load(&dir, &sentencepiece_json(false, bos_template()), None).unwrap();
        assert_eq!(metaspace.prefix_space, PrefixSpace::UnlessLeadingSpace);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn byte_level_bytes_count_one_byte_per_character() {
        let dir = temp_dir("bl-bytes");
        for prefix in [false, true] {
            let tok = load(&dir, &byte_level_json(prefix), None).unwrap();
            assert_eq!(tok.bos(), None, "the ByteLevel post-processor adds nothing");
            assert_eq!(tok.token_bytes(tok.inner.token_to_id("Ġthe").unwrap()), 4);
            assert_eq!(tok.token_bytes(tok.inner.token_to_id("Ã").unwrap()), 1);
            let want = match prefix {
                true => PrefixSpace::UnlessLeadingSpace,
                false => PrefixSpace::Never,
            };
            assert_eq!(tok.prefix_space, want);
            for text in TEXTS.iter().chain(&["a <|endoftext|> in the text"]) {
                assert_bytes_add_up(&tok, text);
            }
            let ids = tok.encode("the<|endoftext|>").unwrap();
            assert_eq!(ids.last(), Some(&259), "special token matched whole");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bos_follows_add_bos_token_and_is_never_doubled() {
        let dir = temp_dir("bos");
        let with_bos = sentencepiece_json(true, bos_template());
        let eos_only = sentencepiece_json(true, template(false, true));
        let both = sentencepiece_json(true, template(true, true));
        let bare = sentencepiece_json(true, Json::Null);
        let bos_object = json!({"content": "<s>", "lstrip": false, "normalized": false,
                                "rstrip": false, "single_word": false});
        for (tokenizer, config, want) in [
            (&with_bos, None, Some(1)),
            (
                &with_bos,
                Some(json!({"add_bos_token": true, "bos_token": "<s>"})),
                Some(1),
            ),
            (
                &with_bos,
                Some(json!({"add_bos_token": false, "bos_token": "<s>"})),
                None,
            ),
            (&with_bos, Some(json!({"bos_token": "<s>"})), Some(1)),
            (&bare, None, None),
            (&eos_only, None, None),
            (&both, None, Some(1)),
            (
                &bare,
                Some(json!({"add_bos_token": true, "bos_token": bos_object})),
                Some(1),
            ),
            (
                &bare,
                Some(json!({"add_bos_token": true, "bos_token": "</s>"})),
                Some(2),
            ),
        ] {
            let tok = load(&dir, tokenizer, config.clone()).unwrap();
            assert_eq!(tok.bos(), want, "{config:?}");
            assert_eq!(tok.bos_added(), want.is_some());
            let ids = tok.encode("the cat").unwrap();
            let plain = tok.inner.encode_fast("the cat", false).unwrap();
            let expected: Vec<u32> = want
                .into_iter()
                .chain(plain.get_ids().iter().copied())
                .collect();
            assert_eq!(ids, expected, "{config:?}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn truncation_and_padding_in_tokenizer_json_are_ignored() {
        let dir = temp_dir("truncation");
        let mut tokenizer = byte_level_json(false);
        tokenizer["truncation"] = json!({"direction": "Right", "max_length": 4,
                                         "strategy": "LongestFirst", "stride": 0});
        tokenizer["padding"] = json!({"strategy": {"Fixed": 64}, "direction": "Right",
                                      "pad_to_multiple_of": null, "pad_id": 0,
                                      "pad_type_id": 0, "pad_token": "<|endoftext|>"});
        let tok = load(&dir, &tokenizer, None).unwrap();
        let text = "the cat sat on the mat";
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_tokenizer_files_are_one_line_errors_naming_the_file() {
        let dir = temp_dir("bad");
        let tokenizer = sentencepiece_json(true, Json::Null);
        let config = dir.join("tokenizer_config.json");
        for (config_json, want) in [
            (
                json!({"add_bos_token": true, "bos_token": "<nope>"}),
                "`<nope>` is not in the tokenizer's vocabulary",
            ),
            (
                json!({"add_bos_token": true}),
                "add_bos_token is true but there is no bos_token",
            ),
            (json!({"add_bos_token": "yes"}), "not true or false"),
        ] {
            let e = load(&dir, &tokenizer, Some(config_json))
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains(want) && e.contains(&config.display().to_string()),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, "{\"model\": 3}").unwrap();
        let e = TextTokenizer::from_hf_files(&path, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("cannot read the tokenizer") && e.contains(&path.display().to_string()),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_tokenizer_larger_than_the_embedding_is_refused() {
        let dir = temp_dir("vocab");
        let tok = load(&dir, &sentencepiece_json(true, Json::Null), None).unwrap();
        assert_eq!(tok.vocab_size(), 3 + 256 + 15);
        assert!(tok.check_vocab(274).is_ok());
        assert!(tok.check_vocab(32000).is_ok(), "a padded embedding is fine");
        let e = tok.check_vocab(100).unwrap_err().to_string();
        assert!(
            e.contains("token ids up to 273") && e.contains("100 rows"),
            "{e}"
        );
        assert!(
            e.contains(&dir.join("tokenizer.json").display().to_string()),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn merges_follow_the_score_of_the_joined_token() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc", "x"].map(String::from);
        // `bc` outranks `ab`; `abc` comes last and has two spellings, both kept, left to right.
        let merges = merges_by_score(&tokens, &[-1.0, -2.0, -3.0, -20.0, -10.0, -30.0, 0.0]);
        let pair = |l: &str, r: &str| (l.to_string(), r.to_string());
        let want = [
            pair("b", "c"),
            pair("a", "b"),
            pair("a", "bc"),
            pair("ab", "c"),
        ];
        assert_eq!(merges, want);
        let swapped = merges_by_score(&tokens, &[-1.0, -2.0, -3.0, -10.0, -20.0, -30.0, 0.0]);
        assert_eq!(swapped[..2], [pair("a", "b"), pair("b", "c")]);
    }

    /// GGUF metadata of a tiny SentencePiece vocabulary: `<pad> <eos> <bos> <unk>`, the 256
    /// byte tokens, `▁ a b c ab bc`, and the user-defined `\n\n` and two spaces; `ab` and `bc`
    /// score as given.
    fn sentencepiece_gguf(ab: f32, bc: f32) -> HashMap<String, Value> {
        let mut tokens: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>"]
            .map(String::from)
            .into();
        let mut types = vec![TOKEN_CONTROL; 4];
        tokens.extend((0..=255).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
        tokens.extend(["▁", "a", "b", "c", "ab", "bc", "\n\n", "  "].map(String::from));
        types.extend([1, 1, 1, 1, 1, 1, TOKEN_USER_DEFINED, TOKEN_USER_DEFINED]);
        let mut scores = vec![0.0; tokens.len()];
        scores[tokens.len() - 4] = ab;
        scores[tokens.len() - 3] = bc;
        let array = |v: Vec<Value>| Value::Array(v);
        HashMap::from([
            ("tokenizer.ggml.model".into(), Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens".into(),
                array(tokens.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.scores".into(),
                array(scores.into_iter().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                array(types.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)),
            ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
        ])
    }

    #[test]
    fn sentencepiece_gguf_merges_by_score_and_counts_every_byte() {
        let pieces = |tok: &TextTokenizer, text: &str| -> Vec<String> {
            let ids = tok.encode(text).unwrap();
            assert_eq!(ids[0], 2, "BOS, as llama.cpp adds by default");
            assert_eq!(tok.decode(&ids[1..]).unwrap(), text);
            assert_bytes_add_up(tok, text);
            ids[1..]
                .iter()
                .map(|&id| tok.id_to_token(id).unwrap())
                .collect()
        };
        let ab_first = TextTokenizer::from_gguf_metadata(&sentencepiece_gguf(-1.0, -2.0)).unwrap();
        let bc_first = TextTokenizer::from_gguf_metadata(&sentencepiece_gguf(-2.0, -1.0)).unwrap();
        assert_eq!(pieces(&ab_first, "abc"), ["ab", "c"]);
        assert_eq!(pieces(&bc_first, "abc"), ["a", "bc"]);
        // User-defined tokens match the raw text; a lone space is `▁`; the rest falls back to
        // bytes, `<bos>` included (llama.cpp does not look for control tokens in text).
        let want = [
            "▁", "a", "  ", "b", "\n\n", "<0x0A>", "<0xC3>", "<0xA9>", "<0x3C>", "b", "<0x6F>",
            "<0x73>", "<0x3E>",
        ];
        assert_eq!(pieces(&ab_first, " a  b\n\n\né<bos>"), want);
        for text in TEXTS.iter().chain(&["", "\n\n\n", "   "]) {
            pieces(&ab_first, text);
        }
    }

    #[test]
    fn a_saved_sentencepiece_gguf_tokenizer_loads_back_with_its_bos() {
        let dir = temp_dir("sp-gguf-saved");
        let path = dir.join("tokenizer.json");
        let tok = TextTokenizer::from_gguf_metadata(&sentencepiece_gguf(-1.0, -2.0)).unwrap();
        tok.save_json(&path).unwrap();
        let loaded = TextTokenizer::from_hf_files(&path, None).unwrap();
        assert_eq!(loaded.bos(), Some(2), "the post-processor carries BOS");
        assert_eq!(loaded.prefix_space, PrefixSpace::Never);
        for text in TEXTS.iter().chain(&[" a  b\n\n\né<bos>", "abc"]) {
            assert_eq!(loaded.encode(text).unwrap(), tok.encode(text).unwrap());
            assert_bytes_add_up(&loaded, text);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unsupported_gguf_tokenizers_are_one_line_errors() {
        let error = |changes: &[(&str, Option<Value>)]| {
            let mut md = sentencepiece_gguf(-1.0, -2.0);
            for (key, value) in changes {
                match value {
                    Some(value) => md.insert(key.to_string(), value.clone()),
                    None => md.remove(*key),
                };
            }
            let e = TextTokenizer::from_gguf_metadata(&md)
                .err()
                .unwrap()
                .to_string();
            assert!(!e.contains('\n'), "{e}");
            e
        };
        let e = error(&[("tokenizer.ggml.add_space_prefix", Some(Value::Bool(true)))]);
        assert!(
            e.contains("add_space_prefix") && e.contains("tokenizer.json"),
            "{e}"
        );
        let e = error(&[("tokenizer.ggml.model", Some(Value::String("bert".into())))]);
        assert!(
            e.contains("`bert` is neither") && e.contains("tokenizer.json"),
            "{e}"
        );
        let one_score = Value::Array(vec![Value::F32(0.0)]);
        let e = error(&[("tokenizer.ggml.scores", Some(one_score))]);
        assert!(e.contains("holds 1 scores for 268 tokens"), "{e}");
        let e = error(&[("tokenizer.ggml.scores", None)]);
        assert!(e.contains("no `tokenizer.ggml.scores`"), "{e}");
    }

    #[test]
    fn unescape_reads_every_documented_escape() {
        for (given, want) in [
            (r"\n", "\n"),
            (r"\t\r", "\t\r"),
            (r"\\n", "\\n"),
            (r#"say \"hi\""#, "say \"hi\""),
            (r"\x41\x7f\x00", "A\x7f\0"),
            (r"\u{e9}\u{1F600}\u{0}", "\u{e9}\u{1F600}\0"),
            ("plain text, é\n", "plain text, é\n"),
            ("", ""),
        ] {
            assert_eq!(unescape(given).as_deref(), Ok(want), "{given}");
        }
    }

    #[test]
    fn unescape_rejects_what_it_cannot_read() {
        for (given, want) in [
            (r"\q", EscapeError::Unknown('q')),
            (r"\0", EscapeError::Unknown('0')),
            (r"ab\", EscapeError::Dangling),
            (r"\x4", EscapeError::BadByte("4".into())),
            (r"\x", EscapeError::BadByte("".into())),
            (r"\xzz", EscapeError::BadByte("zz".into())),
            (r"\x+1", EscapeError::BadByte("+1".into())),
            (r"\xe9", EscapeError::BadByte("e9".into())),
            (r"\u41", EscapeError::BadUnicode("41".into())),
            (r"\u{}", EscapeError::BadUnicode("{}".into())),
            (r"\u{d800}", EscapeError::BadUnicode("{d800}".into())),
            (r"\u{1234567}", EscapeError::BadUnicode("{1234567}".into())),
            (r"\u{+1}", EscapeError::BadUnicode("{+1}".into())),
            (r"\u{41", EscapeError::BadUnicode("{41".into())),
        ] {
            let e = unescape(given).unwrap_err();
            assert_eq!(e, want, "{given}");
            assert!(!e.to_string().contains('\n'));
        }
    }
}
