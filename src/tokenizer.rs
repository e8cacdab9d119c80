//! The tokenizer: built from a GGUF file's own metadata (GPT-2-style byte-level BPE), or read
//! from a `tokenizer.json` beside the model when there is one.
//!
//! ```no_run
//! use streamppl::tokenizer::TextTokenizer;
//! let tok = TextTokenizer::for_model(std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
//! let ids = tok.encode("Of Mans First Disobedience").unwrap();
//! assert_eq!(tok.decode(&ids).unwrap(), "Of Mans First Disobedience");
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// A tokenizer plus what metrics need from it: each token's length in UTF-8 bytes.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Prepended to every book when the model's config asks for it (SmolLM2's does not).
    bos: Option<u32>,
    token_bytes: Vec<u32>,
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

impl TextTokenizer {
    /// `tokenizer.json` beside the model if present, else the GGUF's own tokenizer metadata.
    pub fn for_model(model_path: &Path) -> Result<Self> {
        crate::model::gguf::check_model_file(model_path)?;
        let beside = model_path.with_file_name("tokenizer.json");
        if beside.is_file() {
            let inner = Tokenizer::from_file(&beside)
                .map_err(|e| anyhow!("{}: cannot read tokenizer ({e})", beside.display()))?;
            return Ok(Self::from_tokenizer(inner, None));
        }
        let mut reader = BufReader::new(
            File::open(model_path)
                .with_context(|| format!("{}: cannot open model", model_path.display()))?,
        );
        let content = Content::read(&mut reader)
            .map_err(|e| anyhow!("{}: not a readable GGUF file ({e})", model_path.display()))?;
        Self::from_gguf_metadata(&content.metadata).with_context(|| {
            format!(
                "{}: building the tokenizer from GGUF metadata",
                model_path.display()
            )
        })
    }

    /// Byte-level BPE from `tokenizer.ggml.{tokens,merges,token_type,pre}` (spec section 4).
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let get = |k: &str| {
            md.get(k).ok_or_else(|| {
                anyhow!("no `{k}` in the GGUF metadata; put a tokenizer.json beside the model")
            })
        };
        let model = get("tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            bail!(
                "tokenizer model `{model}` is not byte-level BPE (gpt2); put a tokenizer.json beside the model"
            );
        }
        let tokens: Vec<String> = get("tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()?;
        let merges: Vec<(String, String)> = get("tokenizer.ggml.merges")?
            .to_vec()?
            .iter()
            .map(|v| {
                let m = v.to_string()?;
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("bad merge `{m}`"))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32())
                .collect::<Result<_, _>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
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
        // token_type 3 = control tokens: matched whole in the text, never split.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == 3)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| anyhow!("adding control tokens: {e}"))?;
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let bos = match add_bos {
            true => Some(get("tokenizer.ggml.bos_token_id")?.to_u32()?),
            false => None,
        };
        Ok(Self::from_tokenizer(inner, bos))
    }

    fn from_tokenizer(inner: Tokenizer, bos: Option<u32>) -> Self {
        let map = byte_level_decoder_map();
        let vocab_size = inner.get_vocab_size(true);
        let token_bytes = (0..vocab_size as u32)
            .map(|id| {
                let s = inner.id_to_token(id).unwrap_or_default();
                let is_byte_level = s.chars().all(|c| map.contains_key(&c));
                let special = inner.get_added_vocabulary().is_special_token(&s);
                if is_byte_level && !special {
                    s.chars().count() as u32
                } else {
                    s.len() as u32
                }
            })
            .collect();
        TextTokenizer {
            inner,
            bos,
            token_bytes,
        }
    }

    /// Token ids of `text`, exactly as stored (no normalization), with BOS if the model wants it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(self
            .bos
            .into_iter()
            .chain(enc.get_ids().iter().copied())
            .collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding: {e}"))
    }

    /// How many UTF-8 bytes of text token `id` stands for.
    pub fn token_bytes(&self, id: u32) -> u64 {
        self.token_bytes.get(id as usize).copied().unwrap_or(0) as u64
    }

    /// The BOS token prepended to every book, if the model asks for one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
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
