//! Bad input, as one table: each row is a command line and a substring its error must contain.
//! Every row must exit with status 1 (not 101, a panic, nor a signal) and print exactly one
//! stderr line, `error: ...`, that contains the substring.
//!
//! To add a case, add a row to `CASES`. A row's command line is split on spaces; '...' is one
//! argument (spaces kept, '' is empty). Placeholders name the fixtures that `Fixtures::new`
//! writes into a fresh temp dir: `{dir}` (the temp dir, with more files in it: see
//! `Fixtures::new`), `{tiny}` (a valid tiny GGUF model with a byte-level tokenizer: one token
//! per byte), `{books}` (a folder of 3 text books), `{text}` (one text file), `{run}` (a
//! finished run of the tiny model), `{fifo}` (a named pipe), `{dir}/NAME.gguf` (the tiny
//! model with one defect, see `bad_models`), and `{model}` (the real model; rows with it are
//! skipped, loudly, when it is missing, and fail when STREAMPPL_REQUIRE_MODELS=1).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

const CASES: &[(&str, &str)] = &[
    // 1. Sizes that overflow or cannot fit in memory.
    (
        "eval --model {tiny} --corpus {books} --strategy sink:1+18446744073709551615",
        "`sink:1+18446744073709551615`: S+W+1",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy sink:9223372036854775808+9223372036854775807",
        "overflows a 64-bit count",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy window:18446744073709551615",
        "`window:18446744073709551615`: S+W+1",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy recompute:18446744073709551615",
        "`recompute:18446744073709551615`: W+1",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy window:99999999999999999999",
        "is larger than 18446744073709551615",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy sink:4+0",
        "window size must be at least 1",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --block-size 18446744073709551615",
        "--block-size 18446744073709551615: give 1 to 65536",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --block-size 1000000000000",
        "--block-size 1000000000000: give 1 to 65536",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --block-size 65537",
        "give 1 to 65536",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --block-size 0",
        "--block-size 0",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --block-size -1",
        "-1",
    ),
    (
        "bench --model {tiny} --corpus {books} --block-size 0 --out {dir}/bench",
        "--block-size 0",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --max-tokens 0",
        "--max-tokens 0",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --max-tokens 18446744073709551616",
        "--max-tokens",
    ),
    // 2. --books.
    (
        "eval --model {tiny} --corpus {books} --strategy dense --books 5-2",
        "--books `5-2`: the range is reversed; write A-B with A <= B",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --books 0",
        "--books 0 selects no book; give N >= 1",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --books 0-18446744073709551615",
        "book 18446744073709551615 does not exist; the corpus has 3 books",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --books 1,7",
        "book 7 does not exist; the corpus has 3 books, indices 0..=2",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --books 1,,2",
        "--books `1,,2`: an index is missing",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --books 1,1",
        "book 1 is listed twice",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --books ' '",
        "an index is missing",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --books first",
        "`first` is not a book index",
    ),
    // 3. Model configs that no model can have, and tensors that disagree with the config.
    (
        "eval --model {dir}/heads_zero.gguf --corpus {books} --strategy dense",
        "heads_zero.gguf: invalid model config: llama.attention.head_count = 0",
    ),
    (
        "info {dir}/kv_heads_zero.gguf",
        "invalid model config: llama.attention.head_count_kv = 0",
    ),
    (
        "info {dir}/kv_heads_not_dividing.gguf",
        "llama.attention.head_count_kv = 3 (must divide the 2 attention heads",
    ),
    (
        "info {dir}/hidden_not_multiple.gguf",
        "llama.embedding_length = 9 (must be a multiple of the 2 attention heads)",
    ),
    (
        "info {dir}/head_dim_odd.gguf",
        "head dim (llama.embedding_length / llama.attention.head_count) = 1",
    ),
    ("info {dir}/layers_zero.gguf", "llama.block_count = 0"),
    (
        "info {dir}/layers_more_than_tensors.gguf",
        "llama.block_count = 3 (the file has tensors for 1 layer(s)",
    ),
    (
        "info {dir}/layers_huge.gguf",
        "llama.block_count = 1099511627776",
    ),
    ("info {dir}/ffn_zero.gguf", "llama.feed_forward_length = 0"),
    (
        "info {dir}/ffn_disagrees_with_tensors.gguf",
        "invalid model config: blk.0.ffn_gate.weight shape = [16, 8] (the config makes it [feed_forward_length, embedding_length] = [17, 8])",
    ),
    (
        "info {dir}/embedding_disagrees_with_tensors.gguf",
        "token_embd.weight shape = [256, 6]",
    ),
    (
        "info {dir}/tensor_missing.gguf",
        "no tensor `blk.0.attn_q.weight`",
    ),
    ("info {dir}/context_zero.gguf", "llama.context_length = 0"),
    (
        "info {dir}/vocab_empty.gguf",
        "vocab size (entries of tokenizer.ggml.tokens) = 0",
    ),
    (
        "info {dir}/rope_theta_nan.gguf",
        "llama.rope.freq_base = NaN (must be positive and finite)",
    ),
    (
        "info {dir}/rope_theta_negative.gguf",
        "llama.rope.freq_base = -1",
    ),
    (
        "info {dir}/rms_eps_zero.gguf",
        "llama.attention.layer_norm_rms_epsilon = 0",
    ),
    (
        "info {dir}/rms_eps_infinite.gguf",
        "llama.attention.layer_norm_rms_epsilon = inf",
    ),
    (
        "info {dir}/architecture_gpt2.gguf",
        "unsupported model (architecture `gpt2`)",
    ),
    (
        "info {dir}/embedding_length_missing.gguf",
        "no `llama.embedding_length` metadata",
    ),
    (
        "info {dir}/head_count_a_string.gguf",
        "llama.attention.head_count = String(\"2\") (must be an unsigned integer)",
    ),
    (
        "info {dir}/rope_theta_a_string.gguf",
        "llama.rope.freq_base = String(\"1e4\") (must be a number)",
    ),
    (
        "info {dir}/truncated.gguf",
        "truncated.gguf: not a readable GGUF file",
    ),
    // 4. Something other than a model file given as the model.
    (
        "eval --model {dir} --corpus {books} --strategy dense",
        "is a folder; give the model file (a .gguf)",
    ),
    ("info {dir}", "is a folder; give the model file (a .gguf)"),
    (
        "tokenize --model {dir} hello",
        "is a folder; give the model file (a .gguf)",
    ),
    (
        "eval --model {text} --corpus {books} --strategy dense",
        "book.txt: not a GGUF file (it starts with \"It w\", not \"GGUF\")",
    ),
    ("tokenize --model {text} hello", "not a GGUF file"),
    (
        "info {dir}/empty.gguf",
        "empty.gguf: not a GGUF file (it is empty)",
    ),
    ("info {fifo}", "not a regular file"),
    (
        "info {dir}/no-such-model.gguf",
        "no-such-model.gguf: model file not found; run scripts/fetch-defaults.sh",
    ),
    // 5. --sink-text escapes.
    (
        r"eval --model {tiny} --corpus {books} --strategy sink:2+4 --sink-text \q",
        r"--sink-text `\q`: unknown escape `\q`",
    ),
    (
        r"eval --model {tiny} --corpus {books} --strategy sink:2+4 --sink-text ab\",
        r"a lone `\` ends the text",
    ),
    (
        r"eval --model {tiny} --corpus {books} --strategy sink:2+4 --sink-text \xe9",
        r"`\xe9` is not two hex digits of an ASCII byte",
    ),
    (
        r"eval --model {tiny} --corpus {books} --strategy sink:2+4 --sink-text \u{d800}",
        "is not a Unicode scalar value",
    ),
    (
        // A real newline (as $'...' gives it) stays on the error's one line, escaped.
        "eval --model {tiny} --corpus {books} --strategy sink:2+4 --sink-text 'a\n\\q'",
        "--sink-text `a\\n\\q`: unknown escape `\\q`",
    ),
    (
        r"eval --model {tiny} --corpus {books} --strategy dense --sink-text \n",
        "--sink-text needs a strategy with sinks",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy window:8 --local-sinks",
        "--local-sinks needs a strategy with sinks",
    ),
    (
        "eval --model gemma3-9999 --corpus {books} --strategy dense",
        "gemma3-9999",
    ),
    (
        r"eval --model {tiny} --corpus {books} --strategy sink:3+4 --sink-text ab",
        "is 2 tokens; give one token",
    ),
    (
        "generate --model {tiny} --strategy recompute:64 --prompts {books} --out {dir}/gen",
        "keeps no cache to generate from",
    ),
    (
        "generate --model {tiny} --prompts {dir}/no-such-prompts.jsonl --out {dir}/gen",
        "no-such-prompts.jsonl: cannot read the prompt file",
    ),
    (
        "generate --model {tiny} --prompts {books} --temperature=-1 --out {dir}/gen",
        "--temperature -1: give 0 (greedy) or a positive number",
    ),
    (
        "generate --model {tiny} --prompts {books} --max-new-tokens 0 --out {dir}/gen",
        "--max-new-tokens 0 answers nothing",
    ),
    // 6. Other commands, and usage errors (one line too).
    ("table {dir}/no-such-run", "no-such-run"),
    ("compare {run} {dir}/no-such-run", "no-such-run"),
    ("plot {dir}/no-such-run -o {dir}/p.png", "no-such-run"),
    (
        "tokenize --model {tiny}",
        "give a TEXT argument or --file PATH",
    ),
    ("tokenize --model {tiny} --file {books}", "books"),
    (
        "corpus build --out {dir}/c.parquet",
        "give --gutenberg-mini DIR or one or more --corpus PATH",
    ),
    (
        "corpus build --corpus {dir}/no-such-corpus --out {dir}/c.parquet",
        "no-such-corpus: no such file or folder",
    ),
    (
        "eval --model {tiny} --corpus {dir}/empty-folder --strategy dense",
        "empty-folder",
    ),
    (
        "eval --model {tiny} --corpus {dir}/wrong-schema.parquet --strategy dense",
        "wrong-schema.parquet: no `text` column (columns: body)",
    ),
    (
        "eval --model {tiny} --corpus {dir}/text.parquet --strategy dense",
        "text.parquet: not a readable parquet file",
    ),
    (
        "eval --model {tiny} --corpus {dir}/bad.jsonl --strategy dense",
        "bad.jsonl: line 1: no \"text\" string field",
    ),
    (
        "eval --model {tiny} --corpus {dir}/latin1.txt --strategy dense",
        "latin1.txt: not valid UTF-8 at byte offset 3",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --out {text}",
        "is a file, not a folder; give --out a folder",
    ),
    ("table {dir}/empty-folder", "holds no run"),
    ("report {dir}/empty-folder", "holds no experiment"),
    (
        "reproduce no-such-experiment --model {tiny}",
        "unknown experiment `no-such-experiment`",
    ),
    (
        "sweep --sinks '' --windows 4",
        "invalid value '' for '--sinks <SINKS>'",
    ),
    ("eval --model {tiny} --corpus {books}", "--strategy"),
    (
        "evaluate --model {tiny}",
        "unrecognized subcommand 'evaluate'",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --engine warp",
        "invalid value 'warp' for '--engine <ENGINE>'",
    ),
    // Run folders and records.
    (
        "eval --model {tiny} --corpus {books} --strategy dense --max-tokens 5 --out {dir}/run",
        "holds a finished run of another configuration (books 3 -> 1, max tokens none -> 5",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --engine token --out {dir}/run",
        "engine block -> token",
    ),
    (
        "compare {run} {dir}/short/dense",
        "tokens; compare runs over the same tokens",
    ),
    (
        "table {dir}/broken",
        "nll.parquet: missing (run.json counts",
    ),
    ("plot {dir}/broken -o {dir}/p.png", "nll.parquet: missing"),
    ("report {dir}/no-such-results", "no such folder"),
    (
        "reproduce table1 --model {tiny} --experiments {dir}/no-such-folder",
        "no such folder of experiment files; run from the repository root",
    ),
    (
        "reproduce all --model {tiny} --experiments {dir}/empty-folder",
        "holds no experiment file",
    ),
    (
        "sweep --model {tiny} --corpus {books} --sinks 18446744073709551615 --windows 4",
        "overflows a 64-bit count",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy sink:1000000000000+4 --sink-text x",
        "give S <= 1048576",
    ),
    // 9. Hugging Face checkpoints and hub ids ({dir}/hf-NAME: a fixture with one defect, see
    // `write_bad_checkpoints`; the hub cache is {dir}/hub, empty, offline).
    ("info {dir}/hf-unknown-type", "unknown model_type `bert`"),
    (
        "info {dir}/hf-yarn",
        "unsupported rope_scaling type = `yarn`",
    ),
    (
        "eval --model {dir}/hf-shape --corpus {books} --strategy dense",
        "model.layers.0.mlp.gate_proj.weight",
    ),
    (
        "info {dir}/hf-missing-shard",
        "model-00002-of-00003.safetensors",
    ),
    ("info {dir}/hf-big-vocab", "384"),
    (
        "eval --model nosuch-org/nosuch-model --corpus {books} --strategy dense",
        "nosuch-org/nosuch-model",
    ),
    ("info nosuch-org/nosuch-model@v2", "hub"),
    // 10. Devices.
    (
        "eval --model {tiny} --corpus {books} --strategy dense --device cuda",
        "built without CUDA; build it with `cargo build --release --features cuda`",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --device gpu",
        "--device gpu: give cpu, cuda or cuda:N",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --dtype f16",
        "--dtype f16: the CPU engine computes in f32 from f32 or bf16 weights; use --dtype f32 or bf16, or --device cuda",
    ),
    (
        "eval --model {tiny} --corpus {books} --strategy dense --dtype fp8",
        "--dtype fp8: give f32, bf16 or f16",
    ),
    (
        "reproduce table1 --model {tiny} --corpus {books} --device cuda:1",
        "built without CUDA",
    ),
    (
        "sweep --sinks 4 --windows 8 --model {tiny} --corpus {books} --dtype f16",
        "--dtype f16: the CPU engine computes in f32",
    ),
    // The real model's tokenizer: a text of several tokens as sinks of another count.
    (
        "eval --model {model} --corpus {books} --strategy sink:4+8 --sink-text 'Of Mans First'",
        "tokens; give one token (repeated S=4 times) or exactly S tokens",
    ),
];

#[test]
fn bad_input_is_one_line_naming_the_input_and_the_fix() {
    let fx = Fixtures::new();
    let mut failures = Vec::new();
    let mut skipped = 0;
    for &(line, want) in CASES {
        let Some(args) = fx.args(line) else {
            skipped += 1;
            continue;
        };
        if let Err(why) = check_one_line_error(&streamppl(&args), want) {
            failures.push(format!("`{line}`: {why}"));
        }
    }
    if skipped > 0 {
        eprintln!(
            "\n!!! SKIPPED {skipped} bad-input cases: {REAL_MODEL} is missing; run scripts/fetch-defaults.sh !!!\n"
        );
    }
    assert!(
        CASES.len() - skipped >= 40,
        "too few cases ran: {}",
        CASES.len() - skipped
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

/// The fixtures are what they claim: the tiny model and corpus run, so every bad-model row
/// fails for its one defect.
#[test]
fn the_fixtures_are_valid() {
    let fx = Fixtures::new();
    let info = streamppl(&fx.args("info {tiny}").unwrap());
    assert!(info.status.success(), "{}", stderr(&info));
    let facts = String::from_utf8_lossy(&info.stdout);
    assert!(
        facts.contains("1 layers, hidden 8, 2 heads (2 KV heads)"),
        "{facts}"
    );
    let run = fx.dir.join("run/dense");
    assert!(run.join("run.json").is_file() && run.join("nll.parquet").is_file());
}

/// `--sink-text "\n"` as the README writes it reaches the program as a backslash and an `n`;
/// it must mean a newline (one byte-level token here), not those two characters.
#[test]
fn sink_text_escapes_are_read() {
    let fx = Fixtures::new();
    let line =
        r"eval --model {tiny} --corpus {books} --strategy sink:2+4 --sink-text \n --out {dir}/out";
    let ran = streamppl(&fx.args(line).unwrap());
    assert!(ran.status.success(), "{}", stderr(&ran));
    // The run is named by the text's bytes: %0A is a newline, %5Cn would be `\` `n`.
    let record = read_json(&fx.dir.join("out/sink:2+4@sink-text=%0A/run.json"));
    assert_eq!(record["label"], "StreamingLLM 2\"\\n\"+4");
}

/// `--max-tokens` is a limit, so the largest one scores the whole corpus.
#[test]
fn the_largest_max_tokens_scores_the_whole_corpus() {
    let fx = Fixtures::new();
    let line = "eval --model {tiny} --corpus {books} --strategy sink:1+2 --max-tokens 18446744073709551615 --out {dir}/out";
    let ran = streamppl(&fx.args(line).unwrap());
    assert!(ran.status.success(), "{}", stderr(&ran));
    let record = read_json(&fx.dir.join("out/sink:1+2/run.json"));
    // One token per byte; each book scores all its tokens but the first.
    let whole: usize = BOOKS.iter().map(|b| b.len() - 1).sum();
    assert_eq!(record["tokens_scored"], whole);
}

#[test]
fn help_still_prints_and_documents_the_escapes() {
    let help = streamppl(&["eval".into(), "--help".into()]);
    assert!(help.status.success(), "{}", stderr(&help));
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains(r"\xHH") && text.contains("1 to 65536"),
        "{text}"
    );
}

const REAL_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const BOOKS: [&str; 3] = [
    "It was the best of times, it was the worst of times.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "Of Mans First Disobedience, and the Fruit of that Forbidden Tree.",
];

fn streamppl(args: &[String]) -> Output {
    // Hub ids resolve in an empty cache, offline: never the network, never the user's cache.
    let hub = std::env::temp_dir().join(format!("streamppl-bad-input-hub-{}", std::process::id()));
    Command::new(env!("CARGO_BIN_EXE_streamppl"))
        .env("HF_HUB_CACHE", hub)
        .env("HF_HUB_OFFLINE", "1")
        .args(args)
        .output()
        .expect("run streamppl")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Exit status 1, and stderr exactly one line: `error: ...` containing `want`, no panic.
fn check_one_line_error(out: &Output, want: &str) -> Result<(), String> {
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().collect();
    match out.status.code() {
        Some(1) => {}
        Some(101) => return Err(format!("panicked: {err}")),
        Some(code) => return Err(format!("exit status {code}, want 1; stderr: {err}")),
        None => return Err(format!("killed by a signal; stderr: {err}")),
    }
    if err.contains("panicked") {
        return Err(format!("panicked: {err}"));
    }
    if lines.len() != 1 || !lines[0].starts_with("error: ") || lines[0].len() <= 7 {
        return Err(format!("want one `error: ...` line, got:\n{err}"));
    }
    if !lines[0].contains(want) {
        return Err(format!("want `{want}` in: {}", lines[0]));
    }
    Ok(())
}

/// Splits a row's command line on spaces; '...' is one argument (possibly empty).
fn split_args(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    for (i, part) in line.split('\'').enumerate() {
        if i % 2 == 1 {
            args.push(part.to_string());
        } else {
            args.extend(part.split_whitespace().map(String::from));
        }
    }
    args
}

/// Files the rows refer to, written once per test into a fresh temp dir.
struct Fixtures {
    dir: PathBuf,
    real_model: Option<PathBuf>,
}

impl Fixtures {
    fn new() -> Self {
        let real_model = real_model(); // first: it may panic, and nothing is written yet
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("streamppl-bad-input-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("books")).unwrap();
        std::fs::create_dir_all(dir.join("empty-folder")).unwrap();
        for (i, text) in BOOKS.iter().enumerate() {
            std::fs::write(dir.join(format!("books/{i}.txt")), text).unwrap();
        }
        std::fs::write(dir.join("book.txt"), BOOKS[0]).unwrap();
        std::fs::write(dir.join("empty.gguf"), "").unwrap();
        std::fs::write(dir.join("text.parquet"), BOOKS[0]).unwrap();
        std::fs::write(dir.join("bad.jsonl"), "{\"text\": 3}\n").unwrap();
        std::fs::write(dir.join("latin1.txt"), b"caf\xe9").unwrap();
        write_wrong_schema_parquet(&dir.join("wrong-schema.parquet"));
        let fifo = Command::new("mkfifo").arg(dir.join("fifo")).status();
        assert!(fifo.is_ok_and(|s| s.success()), "mkfifo failed");
        let tiny = TinyGguf::valid();
        tiny.write(&dir.join("tiny.gguf"));
        for (name, model) in bad_models() {
            model.write(&dir.join(format!("{name}.gguf")));
        }
        write_bad_checkpoints(&dir);
        let bytes = std::fs::read(dir.join("tiny.gguf")).unwrap();
        std::fs::write(dir.join("truncated.gguf"), &bytes[..bytes.len() / 2]).unwrap();
        let fx = Fixtures { real_model, dir };
        let run = streamppl(
            &fx.args("eval --model {tiny} --corpus {books} --strategy dense --out {dir}/run")
                .unwrap(),
        );
        assert!(
            run.status.success(),
            "the tiny model must run: {}",
            stderr(&run)
        );
        let short = streamppl(
            &fx.args("eval --model {tiny} --corpus {books} --strategy dense --max-tokens 5 --out {dir}/short")
                .unwrap(),
        );
        assert!(short.status.success(), "{}", stderr(&short));
        // A run folder whose log is gone.
        std::fs::create_dir_all(fx.dir.join("broken/dense")).unwrap();
        std::fs::copy(
            fx.dir.join("run/dense/run.json"),
            fx.dir.join("broken/dense/run.json"),
        )
        .unwrap();
        fx
    }

    /// The row's arguments with the placeholders filled in; `None` when it needs the real model
    /// and there is none.
    fn args(&self, line: &str) -> Option<Vec<String>> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut fill = vec![
            ("{tiny}", d("tiny.gguf")),
            ("{books}", d("books")),
            ("{text}", d("book.txt")),
            ("{run}", d("run/dense")),
            ("{fifo}", d("fifo")),
            ("{dir}", self.dir.display().to_string()),
        ];
        if line.contains("{model}") {
            fill.push(("{model}", self.real_model.as_ref()?.display().to_string()));
        }
        let args = split_args(line)
            .into_iter()
            .map(|arg| fill.iter().fold(arg, |a, (from, to)| a.replace(from, to)))
            .collect();
        Some(args)
    }
}

impl Drop for Fixtures {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies of the sharded `llama-linear` fixture (vocab 384), each with one defect.
fn write_bad_checkpoints(dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama-linear");
    let copy = |name: &str| {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&fixture).unwrap() {
            let from = entry.unwrap().path();
            std::fs::copy(&from, to.join(from.file_name().unwrap())).unwrap();
        }
        to
    };
    let edit_json = |path: PathBuf, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = read_json(&path);
        edit(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    };
    edit_json(copy("hf-unknown-type").join("config.json"), &|c| {
        c["model_type"] = "bert".into()
    });
    edit_json(copy("hf-yarn").join("config.json"), &|c| {
        c["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0})
    });
    edit_json(copy("hf-shape").join("config.json"), &|c| {
        c["intermediate_size"] = 100.into()
    });
    let missing = copy("hf-missing-shard");
    std::fs::remove_file(missing.join("model-00002-of-00003.safetensors")).unwrap();
    edit_json(copy("hf-big-vocab").join("tokenizer.json"), &|t| {
        let added = t["added_tokens"].as_array_mut().unwrap();
        added.push(
            serde_json::json!({"id": 500, "content": "<beyond-the-embedding>",
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false,
            "special": true}),
        );
    });
}

/// The real model, or `None` (the caller skips, loudly) unless STREAMPPL_REQUIRE_MODELS=1.
fn real_model() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(REAL_MODEL);
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var("STREAMPPL_REQUIRE_MODELS").as_deref() != Ok("1"),
        "{REAL_MODEL} is missing and STREAMPPL_REQUIRE_MODELS=1; run scripts/fetch-defaults.sh"
    );
    None
}

/// A tiny Llama GGUF (1 layer, hidden 8, 2 heads, 2 KV heads, ffn 16, zero weights) with a
/// byte-level BPE tokenizer of the 256 bytes and no merges.
struct TinyGguf {
    metadata: HashMap<String, Value>,
    tensors: Vec<(String, Vec<usize>)>,
}

impl TinyGguf {
    fn valid() -> Self {
        let u = |v: u32| Value::U32(v);
        let s = |v: &str| Value::String(v.into());
        let tokens = (0..=255u8)
            .map(|b| s(&byte_level_char(b).to_string()))
            .collect();
        let metadata = [
            ("general.architecture", s("llama")),
            ("llama.embedding_length", u(8)),
            ("llama.feed_forward_length", u(16)),
            ("llama.block_count", u(1)),
            ("llama.attention.head_count", u(2)),
            ("llama.attention.head_count_kv", u(2)),
            ("llama.context_length", u(4096)),
            ("llama.rope.freq_base", Value::F32(10_000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.tokens", Value::Array(tokens)),
            ("tokenizer.ggml.merges", Value::Array(vec![])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut tensors = vec![
            ("token_embd.weight".to_string(), vec![256, 8]),
            ("output_norm.weight".to_string(), vec![8]),
        ];
        for (name, shape) in [
            ("attn_norm", vec![8]),
            ("attn_q", vec![8, 8]),
            ("attn_k", vec![8, 8]),
            ("attn_v", vec![8, 8]),
            ("attn_output", vec![8, 8]),
            ("ffn_norm", vec![8]),
            ("ffn_gate", vec![16, 8]),
            ("ffn_up", vec![16, 8]),
            ("ffn_down", vec![8, 16]),
        ] {
            tensors.push((format!("blk.0.{name}.weight"), shape));
        }
        TinyGguf { metadata, tensors }
    }

    fn with(mut self, key: &str, value: Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }

    fn without(mut self, key: &str) -> Self {
        self.metadata.remove(key);
        self
    }

    fn with_tensor(mut self, name: &str, shape: Option<Vec<usize>>) -> Self {
        self.tensors.retain(|(n, _)| n != name);
        if let Some(shape) = shape {
            self.tensors.push((name.into(), shape));
        }
        self
    }

    fn write(&self, path: &Path) {
        let tensors: Vec<(&str, QTensor)> = self
            .tensors
            .iter()
            .map(|(name, shape)| {
                let zeros =
                    Tensor::zeros(shape.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap();
                (
                    name.as_str(),
                    QTensor::quantize(&zeros, GgmlDType::F32).unwrap(),
                )
            })
            .collect();
        let metadata: Vec<(&str, &Value)> =
            self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &metadata, &tensor_refs).unwrap();
    }
}

/// The tiny model with one defect each; the rows of `CASES` name them `{dir}/NAME.gguf`.
fn bad_models() -> Vec<(&'static str, TinyGguf)> {
    let t = TinyGguf::valid;
    let (heads, kv_heads) = (
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
    );
    let (theta, eps) = (
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
    );
    vec![
        ("heads_zero", t().with(heads, Value::U32(0))),
        ("kv_heads_zero", t().with(kv_heads, Value::U32(0))),
        ("kv_heads_not_dividing", t().with(kv_heads, Value::U32(3))),
        (
            "hidden_not_multiple",
            t().with("llama.embedding_length", Value::U32(9)),
        ),
        ("head_dim_odd", t().with(heads, Value::U32(8))),
        ("layers_zero", t().with("llama.block_count", Value::U32(0))),
        (
            "layers_more_than_tensors",
            t().with("llama.block_count", Value::U32(3)),
        ),
        (
            "layers_huge",
            t().with("llama.block_count", Value::U64(1 << 40)),
        ),
        (
            "ffn_zero",
            t().with("llama.feed_forward_length", Value::U32(0)),
        ),
        (
            "ffn_disagrees_with_tensors",
            t().with("llama.feed_forward_length", Value::U32(17)),
        ),
        (
            "embedding_disagrees_with_tensors",
            t().with_tensor("token_embd.weight", Some(vec![256, 6])),
        ),
        (
            "tensor_missing",
            t().with_tensor("blk.0.attn_q.weight", None),
        ),
        (
            "context_zero",
            t().with("llama.context_length", Value::U32(0)),
        ),
        (
            "vocab_empty",
            t().with("tokenizer.ggml.tokens", Value::Array(vec![])),
        ),
        ("rope_theta_nan", t().with(theta, Value::F32(f32::NAN))),
        ("rope_theta_negative", t().with(theta, Value::F32(-1.0))),
        ("rms_eps_zero", t().with(eps, Value::F32(0.0))),
        ("rms_eps_infinite", t().with(eps, Value::F32(f32::INFINITY))),
        (
            "architecture_gpt2",
            t().with("general.architecture", Value::String("gpt2".into())),
        ),
        (
            "embedding_length_missing",
            t().without("llama.embedding_length"),
        ),
        (
            "head_count_a_string",
            t().with(heads, Value::String("2".into())),
        ),
        (
            "rope_theta_a_string",
            t().with(theta, Value::String("1e4".into())),
        ),
    ]
}

/// A parquet file whose one column is `body`, not PG19's `text`.
fn write_wrong_schema_parquet(path: &Path) {
    let body: arrow::array::ArrayRef =
        std::sync::Arc::new(arrow::array::StringArray::from(vec![BOOKS[0]]));
    let batch = arrow::array::RecordBatch::try_from_iter([("body", body)]).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// GPT-2's printable stand-in for byte `b` in byte-level BPE vocabularies.
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap()
}
