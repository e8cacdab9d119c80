//! A damaged checkpoint never gives a wrong number and never blocks a run: every kind of damage
//! to `checkpoint/` is noticed, reported on one line naming the file, and the run falls back to
//! `checkpoint.old/` (or starts over), ending with exactly the uninterrupted run's NLLs. Cache
//! budgets far beyond the stream run in memory proportional to the stream, and sizes that
//! overflow are one-line errors.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use indicatif::ProgressBar;
use streamppl::checkpoint::Checkpointer;
use streamppl::engine::{EngineKind, run_strategy};
use streamppl::model::random::random_llama;
use streamppl::model::{Config, Model};
use streamppl::nll_log::NllLog;
use streamppl::strategy::Strategy;
use streamppl::stream::TokenStream;

const VOCAB: usize = 61;
const FINGERPRINT: &str = "this run";

fn model() -> Model {
    random_llama(&Config::tiny(VOCAB), 7, &Device::Cpu).unwrap()
}

/// 128 fed tokens over two books.
fn stream() -> TokenStream {
    TokenStream::new(&common::books(&[70, 60], VOCAB, 4), &[], None)
}

/// A strategy, its engine, and where the interrupted run stops: right after a checkpoint, at a
/// block (batch) boundary, with an earlier checkpoint before it.
#[derive(Clone, Copy)]
struct Case {
    strategy: &'static str,
    engine: EngineKind,
    cut: usize,
}

impl Case {
    fn keeps_a_cache(&self) -> bool {
        !self.strategy.starts_with("recompute")
    }

    fn name(&self) -> String {
        format!("{} {:?}", self.strategy, self.engine).replace([':', '/', '+', ' ', '(', ')'], "_")
    }
}

const CASES: [Case; 4] = [
    Case {
        strategy: "sink:2+9",
        engine: EngineKind::Block(8),
        cut: 64,
    },
    Case {
        strategy: "dense",
        engine: EngineKind::Block(8),
        cut: 40,
    },
    Case {
        strategy: "sink:2+5",
        engine: EngineKind::Token,
        cut: 40,
    },
    // 16 windows of stride 3 per batch: checkpoints at 48 and 96.
    Case {
        strategy: "recompute:6/3",
        engine: EngineKind::Token,
        cut: 96,
    },
];

fn run(model: &Model, case: Case, stream: &TokenStream, ckpt: Option<&mut Checkpointer>) -> NllLog {
    run_with(model, case.strategy, case.engine, stream, ckpt)
}

fn run_with(
    model: &Model,
    strategy: &str,
    engine: EngineKind,
    stream: &TokenStream,
    ckpt: Option<&mut Checkpointer>,
) -> NllLog {
    let s: Strategy = strategy.parse().unwrap();
    run_strategy(model, s, true, engine, stream, &ProgressBar::hidden(), ckpt).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "streamppl-ckpt-corruption-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A run killed right after its checkpoint at fed token `case.cut`, saving after every block:
/// leaves `run_dir/checkpoint/` (at the cut) and `run_dir/checkpoint.old/` (the one before).
fn interrupted(model: &Model, case: Case, stream: &TokenStream, run_dir: &Path, fingerprint: &str) {
    let cut = TokenStream {
        fed: stream.fed[..case.cut].to_vec(),
        targets: stream.targets[..case.cut].to_vec(),
    };
    let mut every_block = Checkpointer::new(run_dir, fingerprint.into(), Duration::ZERO);
    run(model, case, &cut, Some(&mut every_block));
}

/// Resumes over the whole stream (saving no new checkpoint); the log and the checkpointer.
fn resumed(
    model: &Model,
    case: Case,
    stream: &TokenStream,
    run_dir: &Path,
) -> (NllLog, Checkpointer) {
    let mut rarely = Checkpointer::new(run_dir, FINGERPRINT.into(), Duration::from_secs(3600));
    let log = run(model, case, stream, Some(&mut rarely));
    (log, rarely)
}

fn log_records(dir: &Path) -> usize {
    NllLog::read_parquet(&dir.join("nll.parquet"))
        .unwrap()
        .len()
}

fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap()
}

fn write_state(dir: &Path, state: &serde_json::Value) {
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
}

fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

/// Replaces the log with its first half: a valid parquet file, shorter than the position says.
fn shorten_log(dir: &Path) {
    let mut log = NllLog::read_parquet(&dir.join("nll.parquet")).unwrap();
    assert!(log.len() >= 2, "a log worth shortening");
    log.records.truncate(log.len() / 2);
    log.write_parquet(&dir.join("nll.parquet")).unwrap();
}

/// Makes `state.json` agree with the log file as it is now (length, CRC-32, record count), as a
/// checkpoint written by a buggy or foreign tool might: only the log-against-stream check can
/// then tell.
fn reseal_log(dir: &Path) {
    let bytes = std::fs::read(dir.join("nll.parquet")).unwrap();
    let mut state = state(dir);
    state["log"]["seal"] =
        serde_json::json!({ "bytes": bytes.len(), "crc32": crc32fast::hash(&bytes) });
    state["log"]["records"] = log_records(dir).into();
    write_state(dir, &state);
}

/// Flips a few bits of the cache's data (past the header, so the file still parses).
fn flip_kv_bits(dir: &Path) {
    let path = dir.join("kv.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 17;
    bytes[at] ^= 0b0100_0001;
    std::fs::write(&path, bytes).unwrap();
}

/// One way to damage `checkpoint/`, and the file the note must name.
struct Damage {
    what: &'static str,
    needs_cache: bool,
    blamed: &'static str,
    apply: Box<dyn Fn(&Path)>,
}

fn damages(foreign_state: PathBuf) -> Vec<Damage> {
    let mut all = Vec::new();
    let mut add = |what, needs_cache, blamed, apply: Box<dyn Fn(&Path)>| {
        all.push(Damage {
            what,
            needs_cache,
            blamed,
            apply,
        })
    };
    for file in ["state.json", "nll.parquet", "kv.safetensors"] {
        let needs_cache = file == "kv.safetensors";
        add(
            "truncated",
            needs_cache,
            file,
            Box::new(move |d: &Path| truncate(&d.join(file))),
        );
        add(
            "deleted",
            needs_cache,
            file,
            Box::new(move |d: &Path| std::fs::remove_file(d.join(file)).unwrap()),
        );
    }
    add(
        "a shorter valid log",
        false,
        "nll.parquet",
        Box::new(shorten_log),
    );
    add(
        "a shorter valid log that state.json agrees with",
        false,
        "nll.parquet",
        Box::new(|d: &Path| {
            shorten_log(d);
            reseal_log(d);
        }),
    );
    add(
        "a position behind its log",
        false,
        "nll.parquet",
        Box::new(|d: &Path| {
            let mut state = state(d);
            state["next"] = (state["next"].as_u64().unwrap() - 1).into();
            write_state(d, &state);
        }),
    );
    add(
        "a slot map that is not the engine's",
        true,
        "state.json",
        Box::new(|d: &Path| {
            let mut state = state(d);
            let slots = state["kv"]["slot_token"].as_array_mut().unwrap();
            slots.swap(0, 1);
            write_state(d, &state);
        }),
    );
    add(
        "flipped bits in the cache",
        true,
        "kv.safetensors",
        Box::new(flip_kv_bits),
    );
    add(
        "a state.json of another run",
        false,
        "state.json",
        Box::new(move |d: &Path| {
            std::fs::copy(&foreign_state, d.join("state.json")).unwrap();
        }),
    );
    add(
        "the state.json of the checkpoint before",
        false,
        "nll.parquet",
        Box::new(|d: &Path| {
            std::fs::copy(
                d.with_extension("old").join("state.json"),
                d.join("state.json"),
            )
            .unwrap();
        }),
    );
    all
}

#[test]
fn every_damaged_checkpoint_falls_back_to_the_previous_one_and_the_same_numbers() {
    let model = model();
    let stream = stream();
    for case in CASES {
        let whole = run(&model, case, &stream, None);
        // Another run's checkpoint: another fingerprint over another stream.
        let other_dir = scratch(&format!("{}-other", case.name()));
        let other_stream = TokenStream::new(&common::books(&[90, 50], VOCAB, 9), &[], None);
        interrupted(&model, case, &other_stream, &other_dir, "another run");
        let foreign_state = other_dir.join("checkpoint/state.json");
        for damage in damages(foreign_state) {
            if damage.needs_cache && !case.keeps_a_cache() {
                continue;
            }
            let what = format!("{}: {} {}", case.strategy, damage.blamed, damage.what);
            let run_dir = scratch(&case.name());
            interrupted(&model, case, &stream, &run_dir, FINGERPRINT);
            let (dir, old) = (run_dir.join("checkpoint"), run_dir.join("checkpoint.old"));
            let old_records = log_records(&old);
            assert!(
                old_records > 0 && old_records < log_records(&dir),
                "{what}: the previous checkpoint is an earlier one"
            );
            (damage.apply)(&dir);
            let (log, ckpt) = resumed(&model, case, &stream, &run_dir);
            assert_same(&log, &whole, &what);
            assert_eq!(
                ckpt.resumed_tokens(),
                old_records,
                "{what}: resumed from checkpoint.old"
            );
            let note = ckpt.note().unwrap_or_else(|| panic!("{what}: no note"));
            assert!(!note.contains('\n'), "{what}: one line: {note}");
            let blamed = dir.join(damage.blamed).display().to_string();
            assert!(
                note.starts_with(&blamed),
                "{what}: the note names {blamed}: {note}"
            );
            assert!(
                note.ends_with(&format!("; falling back to {}", old.display())),
                "{what}: {note}"
            );
            std::fs::remove_dir_all(&run_dir).unwrap();
        }
        std::fs::remove_dir_all(&other_dir).unwrap();
    }
}

#[test]
fn with_both_checkpoints_damaged_the_run_starts_over() {
    let model = model();
    let stream = stream();
    for case in CASES {
        let whole = run(&model, case, &stream, None);
        let run_dir = scratch(&format!("{}-both", case.name()));
        interrupted(&model, case, &stream, &run_dir, FINGERPRINT);
        let (dir, old) = (run_dir.join("checkpoint"), run_dir.join("checkpoint.old"));
        truncate(&dir.join("nll.parquet"));
        std::fs::remove_file(old.join("state.json")).unwrap();
        let (log, ckpt) = resumed(&model, case, &stream, &run_dir);
        assert_same(&log, &whole, case.strategy);
        assert_eq!(ckpt.resumed_tokens(), 0);
        let note = ckpt.note().unwrap();
        assert!(!note.contains('\n'), "one line: {note}");
        for blamed in [dir.join("nll.parquet"), old.join("state.json")] {
            assert!(note.contains(&blamed.display().to_string()), "{note}");
        }
        assert!(note.ends_with("; starting over"), "{note}");
        std::fs::remove_dir_all(&run_dir).unwrap();
    }
}

#[test]
fn a_run_killed_between_the_two_renames_resumes_from_checkpoint_old_silently() {
    let model = model();
    let stream = stream();
    for case in CASES {
        let whole = run(&model, case, &stream, None);
        let run_dir = scratch(&format!("{}-renames", case.name()));
        interrupted(&model, case, &stream, &run_dir, FINGERPRINT);
        let old = run_dir.join("checkpoint.old");
        let old_records = log_records(&old);
        // A sound checkpoint/ wins over checkpoint.old/.
        let (log, ckpt) = resumed(&model, case, &stream, &run_dir);
        assert_same(&log, &whole, case.strategy);
        let at_cut = stream.targets[..case.cut].iter().flatten().count();
        assert_eq!(ckpt.resumed_tokens(), at_cut);
        assert_eq!(ckpt.note(), None);
        // Without checkpoint/ (set aside, new one not yet in place), checkpoint.old/ resumes.
        std::fs::remove_dir_all(run_dir.join("checkpoint")).unwrap();
        let (log, ckpt) = resumed(&model, case, &stream, &run_dir);
        assert_same(&log, &whole, case.strategy);
        assert_eq!(ckpt.resumed_tokens(), old_records);
        assert_eq!(ckpt.note(), None);
        std::fs::remove_dir_all(&run_dir).unwrap();
    }
}

#[test]
fn a_checkpoint_stores_only_the_occupied_cache_slots() {
    let model = model();
    let cfg = Config::tiny(VOCAB);
    let stream = stream();
    for case in CASES.into_iter().filter(Case::keeps_a_cache) {
        let run_dir = scratch(&format!("{}-occupied", case.name()));
        interrupted(&model, case, &stream, &run_dir, FINGERPRINT);
        let dir = run_dir.join("checkpoint");
        let state = state(&dir);
        let slots = state["kv"]["slot_token"].as_array().unwrap().len();
        assert_eq!(state["kv"]["occupied"].as_u64(), Some(slots as u64));
        let tensors =
            candle_core::safetensors::load(dir.join("kv.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(tensors.len(), 2 * cfg.n_layer);
        for (name, t) in &tensors {
            assert_eq!(
                t.dims(),
                [cfg.n_kv_head, slots, cfg.head_dim()],
                "{} {name}",
                case.strategy
            );
        }
        // Dense at 40 fed tokens holds 40; the block engine's sink:2+9 holds 2 + 9 in a cache
        // of 2 + 9 + 8, and the token engine's sink:2+5 its 2 + 5 + 1.
        let want = match case.strategy {
            "dense" => case.cut,
            "sink:2+9" => 11,
            _ => 8,
        };
        assert_eq!(slots, want, "{}", case.strategy);
        std::fs::remove_dir_all(&run_dir).unwrap();
    }
}

/// The same log as `want`, bit for bit; names the first record that differs.
fn assert_same(got: &NllLog, want: &NllLog, what: &str) {
    if let Some((i, (a, b))) = got
        .records
        .iter()
        .zip(&want.records)
        .enumerate()
        .find(|(_, (a, b))| a != b)
    {
        panic!("{what}: record {i} is {a:?}, the uninterrupted run's {b:?}");
    }
    assert_eq!(got.len(), want.len(), "{what}: records");
}

/// A log within 1e-5 of `want`, record by record.
fn assert_close(got: &NllLog, want: &NllLog, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (a, b) in got.records.iter().zip(&want.records) {
        assert_eq!(
            (a.position, a.book, a.token_id),
            (b.position, b.book, b.token_id)
        );
        assert!(
            (a.nll - b.nll).abs() <= 1e-5,
            "{what}: position {}: {} vs {}",
            a.position,
            a.nll,
            b.nll
        );
    }
}

#[test]
fn budgets_beyond_the_stream_run_as_dense_without_allocating_the_budget() {
    // A cache of 2e9 slots would need about 0.5 TB even for this tiny model: only a cache
    // that grows with the stream can run these.
    let model = model();
    let stream = stream();
    let dense = |engine| run_with(&model, "dense", engine, &stream, None);
    for (strategy, engine) in [
        ("sink:1000000000+1000000000", EngineKind::Token),
        ("sink:1000000000+1000000000", EngineKind::Block(8)),
        ("window:1000000000", EngineKind::Block(8)),
        ("recompute:1000000000", EngineKind::Token),
    ] {
        let what = format!("{strategy} {engine:?}");
        let log = run_with(&model, strategy, engine, &stream, None);
        assert_close(&log, &dense(engine), &what);
    }
}

/// The parser refuses these specs; the engines check again for strategies built from numbers
/// in code (`Strategy::Sink { .. }`), which never pass through it.
#[test]
fn cache_sizes_that_overflow_are_one_line_errors() {
    let model = model();
    let stream = stream();
    let max = usize::MAX;
    for (sinks, window, engine, want) in [
        (max, 4, EngineKind::Token, "S+W overflows"),
        (max, 4, EngineKind::Block(8), "S+W overflows"),
        (max - 4, 4, EngineKind::Token, "S+W+1 overflows"),
        (
            max - 8,
            4,
            EngineKind::Block(8),
            "S+W+B (B = --block-size 8) overflows",
        ),
        (0, max, EngineKind::Token, "S+W+1 overflows"),
    ] {
        let s = Strategy::Sink { sinks, window };
        let strategy = s.to_string();
        let err = run_strategy(
            &model,
            s,
            true,
            engine,
            &stream,
            &ProgressBar::hidden(),
            None,
        )
        .expect_err(&strategy);
        let line = format!("{err:#}");
        assert!(!line.contains('\n'), "{strategy}: one line: {line}");
        assert!(
            line.starts_with(&strategy),
            "{strategy}: names the strategy: {line}"
        );
        assert!(
            line.contains(want) && line.ends_with("give smaller sizes"),
            "{strategy}: {line}"
        );
    }
}

/// Size and time of one checkpoint of a dense block run at 20,000 fed tokens on the default
/// model's cache shape (30 layers, 3 KV heads, head dim 64), in the cache of 32,768 slots the
/// block engine has by then (doubling from 4 blocks of 128). Run by hand:
/// `cargo test --release --test checkpoint_corruption -- --ignored --nocapture`.
#[test]
#[ignore]
fn time_a_dense_checkpoint_at_20k_tokens() {
    use std::time::Instant;
    use streamppl::model::KvCache;
    use streamppl::nll_log::NllRecord;
    let (tokens, capacity) = (20_000usize, 32_768);
    let mut cache =
        KvCache::new(30, 3, 64, capacity, candle_core::DType::F32, &Device::Cpu).unwrap();
    // Distinct bit patterns in the occupied slots, as a real run leaves.
    for layer in 0..30 {
        let data: Vec<f32> = (0..3 * tokens * 64)
            .map(|i| (i as f32 * 0.37 + layer as f32).sin())
            .collect();
        let k = candle_core::Tensor::from_vec(data, (3, tokens, 64), &Device::Cpu).unwrap();
        cache.write(layer, 0, &k, &k).unwrap();
    }
    let mut log = NllLog::default();
    for p in 0..tokens as u64 {
        log.push(NllRecord {
            position: p,
            book: 0,
            token_id: p as u32 % 49152,
            nll: 3.0,
        });
    }
    let slots: Vec<u64> = (0..tokens as u64).collect();
    let run_dir = scratch("timing");
    let mut ckpt = Checkpointer::new(&run_dir, FINGERPRINT.into(), Duration::ZERO);
    for repeat in 0..4 {
        let start = Instant::now();
        ckpt.save(tokens, &log, Some((&cache, &slots))).unwrap();
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let bytes = |dir: &str| -> u64 {
            std::fs::read_dir(run_dir.join(dir)).map_or(0, |files| {
                files.map(|f| f.unwrap().metadata().unwrap().len()).sum()
            })
        };
        println!(
            "save {repeat}: {ms:.0} ms; {} bytes in checkpoint/, {} in checkpoint.old/",
            bytes("checkpoint"),
            bytes("checkpoint.old")
        );
    }
    std::fs::remove_dir_all(&run_dir).unwrap();
}
