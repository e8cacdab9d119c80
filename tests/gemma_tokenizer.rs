//! Gemma 3's SentencePiece tokenizer, built from the real GGUF's own metadata
//! (models/gemma-3-270m-q4_k_m.gguf, fetched by `scripts/fetch-defaults.sh --model gemma3-270m`),
//! against references computed outside streamppl. Without the model or the default corpus the
//! tests skip, loudly, or fail instead when CI=true or STREAMPPL_REQUIRE_MODELS=1.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use streamppl::corpus::load_corpus;
use streamppl::tokenizer::TextTokenizer;

const GEMMA: &str = "models/gemma-3-270m-q4_k_m.gguf";
const CORPUS: &str = "datasets/gutenberg-mini/test.parquet";
/// Written by scripts/gemma3_reference.py: Google's SentencePiece on the GGUF's vocabulary.
const REFERENCE: &str = "tests/fixtures/gemma3-270m/reference.json";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Gemma's tokenizer, or `None` after a loud skip when the model or the corpus is missing
/// (a panic instead under CI=true or STREAMPPL_REQUIRE_MODELS=1, so that CI never passes by
/// skipping).
fn gemma_tokenizer() -> Option<TextTokenizer> {
    let missing: Vec<String> = [GEMMA, CORPUS]
        .map(repo_path)
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Some(TextTokenizer::for_model(&repo_path(GEMMA)).unwrap());
    }
    let why = format!(
        "missing {}; run scripts/fetch-defaults.sh and scripts/fetch-defaults.sh --model gemma3-270m",
        missing.join(" and ")
    );
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        !(in_ci || common::models_required()),
        "CI=true or STREAMPPL_REQUIRE_MODELS=1 (CI runs this test, never skips it): {why}"
    );
    // Straight to stderr: libtest captures `eprintln!` of passing tests, and a skip must show.
    let _ = writeln!(std::io::stderr(), "\n!!! SKIPPED: {why} !!!\n");
    None
}

/// The sha256 of ids as little-endian u32 bytes, as the reference writes it.
fn ids_sha256(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What is wrong with `text`'s ids, if anything: they round-trip to the text and their byte
/// lengths add up to its UTF-8 length (BOS counting 0).
fn check_ids(tok: &TextTokenizer, text: &str, ids: &[u32]) -> Option<String> {
    let bytes: u64 = (0..ids.len())
        .map(|i| tok.bytes_in_text(text, ids, i))
        .sum();
    if bytes != text.len() as u64 {
        return Some(format!("{bytes} token bytes for {} text bytes", text.len()));
    }
    match tok.decode(&ids[1..]).unwrap() == text {
        true => None,
        false => Some("does not decode to the text".into()),
    }
}

/// What differs between a book's ids and the reference's row for it, if anything.
fn book_problem(tok: &TextTokenizer, text: &str, ids: &[u32], want: &Json) -> Option<String> {
    let (tokens, sha) = (want["tokens"].as_u64(), want["sha256"].as_str());
    if (Some(ids.len() as u64), Some(ids_sha256(ids).as_str())) != (tokens, sha) {
        return Some(format!(
            "{} ids (reference {tokens:?}) with another sha256",
            ids.len()
        ));
    }
    check_ids(tok, text, ids)
}

#[test]
fn every_book_of_the_default_corpus_gets_the_reference_ids() {
    let Some(tok) = gemma_tokenizer() else {
        return;
    };
    let reference: Json = serde_json::from_str(
        &std::fs::read_to_string(repo_path(REFERENCE))
            .unwrap_or_else(|e| panic!("{REFERENCE}: {e}; run scripts/gemma3_reference.py")),
    )
    .unwrap();
    let books = load_corpus(&repo_path(CORPUS)).unwrap();
    let rows = reference["books"].as_array().unwrap();
    assert_eq!(
        books.len(),
        rows.len(),
        "books in the corpus and the reference"
    );
    let ids: Vec<Vec<u32>> = books
        .par_iter()
        .map(|book| tok.encode(&book.text).unwrap())
        .collect();
    let problems: Vec<String> = (0..books.len())
        .into_par_iter()
        .filter_map(|i| {
            assert_eq!(books[i].title, rows[i]["title"].as_str().unwrap());
            let problem = book_problem(&tok, &books[i].text, &ids[i], &rows[i])?;
            Some(format!("book {i} ({}): {problem}", books[i].title))
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let first: Vec<u64> = ids[0][..64].iter().map(|&id| u64::from(id)).collect();
    let want_first: Vec<u64> = reference["book0_first_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap())
        .collect();
    assert_eq!(first, want_first);
    let all: Vec<u32> = ids.concat();
    assert_eq!(
        all.len() as u64,
        reference["total"]["tokens"].as_u64().unwrap()
    );
    assert_eq!(
        ids_sha256(&all),
        reference["total"]["sha256"].as_str().unwrap()
    );
}

/// Texts whose whitespace runs (a run longer than the longest run token included), non-ASCII
/// characters (byte fallback for 𓀀ꙮǅ) and control or user-defined token spellings exercise
/// every path, with their ids from llama.cpp: `llama-tokenize --no-escape --no-parse-special`
/// (parse_special off, as its perplexity tool tokenizes) of the vendored llama.cpp in
/// llama-cpp-python 0.3.36, on the GGUF. Google's SentencePiece 0.2.3 on the vocabulary rebuilt
/// by scripts/gemma3_reference.py gives the same ids. transformers 5.17's tokenizer from the
/// GGUF does not: it builds a Unigram model (`" one leading space"` gives 7 pieces, not 3) and
/// adds no BOS.
const LLAMA_CPP_IDS: &[(&str, &[u32])] = &[
    (
        "a  b\t\tc\n\n\nd",
        &[2, 236746, 138, 236763, 255969, 236755, 109, 236753],
    ),
    (
        "  leading and trailing  ",
        &[2, 138, 26016, 532, 45330, 138],
    ),
    (" one leading space", &[2, 886, 5830, 2557]),
    ("trailing space ", &[2, 136697, 2557, 236743]),
    ("\n", &[2, 107]),
    ("\t", &[2, 255968]),
    (" ", &[2, 236743]),
    ("", &[2]),
    ("\r\n", &[2, 251, 107]),
    (
        "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\nx                                   y\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t",
        &[2, 137, 115, 236781, 167, 140, 236762, 255987],
    ),
    (
        "é ß 中文 🚀 𓀀ꙮǅ",
        &[
            2, 236859, 114881, 17346, 237364, 236743, 242015, 236743, 478, 385, 366, 366, 472, 391,
            412, 437, 371,
        ],
    ),
    (
        "Of Mans First Disobedience, and the Fruit",
        &[2, 4088, 34557, 5315, 3725, 118644, 236764, 532, 506, 44832],
    ),
    // llama.cpp tokenizes with `parse_special` off: control tokens in the text are plain text.
    (
        "<bos> and <start_of_turn>user",
        &[
            2, 236820, 46757, 236813, 532, 655, 3041, 236779, 1340, 236779, 887, 236813, 2364,
        ],
    ),
    // User-defined tokens (HTML tags among them) are matched whole.
    ("<b>bold</b> <h1>", &[2, 200, 15640, 209, 236743, 184]),
];

#[test]
fn whitespace_runs_and_byte_fallback_get_llama_cpp_ids() {
    let Some(tok) = gemma_tokenizer() else {
        return;
    };
    for (text, want) in LLAMA_CPP_IDS {
        let ids = tok.encode(text).unwrap();
        assert_eq!(&ids, want, "{text:?}");
        assert_eq!(check_ids(&tok, text, &ids), None, "{text:?}");
    }
}

/// `--sink-text "\n"` on Gemma: the sinks are S copies of the newline's token, never the BOS
/// that `encode` puts before a whole text (the ablation's `4"\n"+1020` run).
#[test]
fn sink_text_is_tokenized_without_the_bos() {
    let Some(tok) = gemma_tokenizer() else {
        return;
    };
    let newline = tok.encode_without_bos("\n").unwrap();
    assert_eq!(tok.encode("\n").unwrap(), [&[2][..], &newline].concat());
    assert_eq!(newline.len(), 1, "{newline:?}");
    let mut opts = streamppl::eval::EvalOptions::new("sink:4+1020".parse().unwrap());
    opts.sink_text = Some("\n".into());
    assert_eq!(opts.sink_prefix(&tok).unwrap(), vec![newline[0]; 4]);
}
