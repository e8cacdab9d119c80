//! `streamppl generate`: the StreamingLLM chat demo. Every turn of every question is one
//! conversation over ONE cache on the token engine: each user turn is rendered with the model's
//! chat template, fed, and answered token by token until the end-of-turn token or
//! `--max-new-tokens`, the answer streaming to stdout. Every generated token is logged like a
//! scored one (see [`crate::records::generation`]).
//!
//! ```no_run
//! use streamppl::generate::{GenerateJob, Prompts, generate};
//! use streamppl::generate::sampler::Sampling;
//! let job = GenerateJob {
//!     model: "models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
//!     compute: streamppl::runner::Compute::cpu(),
//!     strategy: "sink:4+2000".parse().unwrap(),
//!     prompts: Prompts::File("question.jsonl".into()),
//!     max_new_tokens: 256,
//!     sampling: Sampling::GREEDY,
//!     total_tokens: None,
//!     out: "results/generate".into(),
//!     echo: true,
//!     checkpoint_every: std::time::Duration::from_secs(60),
//!     rerun: false,
//! };
//! let record = generate(&job).unwrap();
//! println!("{} tokens at {:.1} tok/s", record.tokens_generated, record.tokens_per_second);
//! ```

pub mod chat;
mod checkpoint;
pub mod prompts;
pub mod sampler;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use indicatif::ProgressBar;

use crate::engine::token::TokenEngine;
use crate::memory::current_rss_mib;
use crate::records::generation::{
    GENERATION_SCHEMA, GeneratedToken, GenerationLog, GenerationRecord, TurnRecord, repeated_4grams,
};
use crate::records::write_json;
use crate::runner::{
    Compute, LoadedModel, load_model, now_rfc3339, peak_rss_bytes, progress_bar, versions,
};
use crate::source::{HubSettings, resolve_model};
use crate::strategy::Strategy;
use chat::{ChatFormat, Message};
use checkpoint::{ChatCheckpoint, ChatState, Restored, tokens_crc32};
use prompts::{Question, read_prompts};
use sampler::{Sampler, Sampling};

/// Where the user turns come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompts {
    /// A prompt file (see [`prompts`]), asked once.
    File(PathBuf),
    /// A prompt file asked again and again until `total_tokens` are generated.
    Repeat(PathBuf),
    /// Lines of stdin, one user turn each, until end of input.
    Interactive,
}

/// One `streamppl generate` run.
pub struct GenerateJob {
    pub model: PathBuf,
    pub compute: Compute,
    pub strategy: Strategy,
    pub prompts: Prompts,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Stop once this many tokens are generated (mid-answer if need be).
    pub total_tokens: Option<u64>,
    /// The run folder is OUT/<strategy>.
    pub out: PathBuf,
    /// Print the conversation to stdout as it is generated.
    pub echo: bool,
    /// How often the chat saves its state between turns (see [`checkpoint`]); a prompt file's
    /// chat interrupted and run again with the same job resumes from the last save.
    pub checkpoint_every: Duration,
    /// Start afresh, ignoring a checkpoint in the run folder.
    pub rerun: bool,
}

impl GenerateJob {
    /// The run folder: OUT/<strategy>, e.g. `results/generate/sink:4+2000`.
    pub fn run_dir(&self) -> PathBuf {
        self.out.join(self.strategy.to_string().replace('/', "_"))
    }
}

/// Runs the conversation; writes `generation.parquet`, `generation.jsonl` and `run.json` into
/// the run folder (the first two after every turn, so an interrupted run keeps its turns).
pub fn generate(job: &GenerateJob) -> Result<GenerationRecord> {
    check(job)?;
    // The prompts first: a broken prompt file fails before a model is loaded.
    let turns = TurnSource::new(&job.prompts)?;
    let lm = load_model(&job.model, &job.compute)?;
    converse(&lm, job, turns)
}

/// [`generate`] on a model already loaded, the one the job's `model` and `compute` name.
pub fn generate_with(lm: &LoadedModel, job: &GenerateJob) -> Result<GenerationRecord> {
    check(job)?;
    converse(lm, job, TurnSource::new(&job.prompts)?)
}

/// What is wrong with a job before anything is read.
fn check(job: &GenerateJob) -> Result<()> {
    if matches!(job.strategy, Strategy::Recompute { .. }) {
        bail!(
            "{}: re-computation rebuilds a window per token and keeps no cache to generate from; give dense, window:W or sink:S+W",
            job.strategy
        );
    }
    if job.max_new_tokens == 0 {
        bail!("--max-new-tokens 0 answers nothing; give a positive number");
    }
    if matches!(job.prompts, Prompts::Repeat(_)) && job.total_tokens.is_none() {
        bail!("--repeat-prompts needs --total-tokens N, or it never ends");
    }
    Ok(())
}

/// The conversation of `job` on `lm`, its user turns from `turns`; resumed from the run
/// folder's checkpoint when there is a sound one of the same settings.
fn converse(
    lm: &LoadedModel,
    job: &GenerateJob,
    mut turns: TurnSource,
) -> Result<GenerationRecord> {
    let resolved = resolve_model(&job.model.to_string_lossy(), &HubSettings::from_env())?;
    let chat = ChatFormat::for_model(&resolved, &lm.tokenizer)?;
    let dir = job.run_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut conversation = Conversation::new(lm, &chat, job)?;
    let mut ckpt = match &job.prompts {
        // Turns typed on stdin are not asked again: nothing to resume.
        Prompts::Interactive => None,
        Prompts::File(path) | Prompts::Repeat(path) => Some(ChatCheckpoint::new(
            &dir,
            fingerprint(job, lm, path)?,
            job.checkpoint_every,
        )),
    };
    let mut done_turns = Vec::new();
    if let Some(restored) = (ckpt.as_ref())
        .filter(|_| !job.rerun)
        .and_then(|c| c.load(&lm.model))
    {
        turns.next = restored.chat.next_turn;
        done_turns = conversation.restore(restored)?;
    }
    let started = Instant::now();
    let mut jsonl = start_turns_file(&dir, &done_turns)?;
    // Without the conversation on stdout, a bar shows the progress (by turn).
    let bar = match job.echo {
        true => ProgressBar::hidden(),
        false => progress_bar(
            job.total_tokens.unwrap_or(0),
            &job.strategy.to_string(),
            "tokens",
        ),
    };
    while let Some((question_id, question_turn, prompt)) = turns.next_turn()? {
        if conversation.done() {
            break;
        }
        let turn = conversation.answer(&question_id, question_turn, &prompt)?;
        bar.set_position(conversation.generated());
        writeln!(jsonl, "{}", serde_json::to_string(&turn)?)?;
        jsonl.flush()?;
        conversation
            .log
            .write_parquet(&dir.join("generation.parquet"))?;
        if let Some(c) = ckpt.as_mut().filter(|c| c.due()) {
            let (cache, slot_token) = conversation.engine.cache_state();
            c.save(conversation.state(turns.next)?, cache, slot_token)?;
        }
    }
    bar.finish_and_clear();
    let record = conversation.record(job, started.elapsed(), turns.origin());
    write_json(&record, &dir.join("run.json"))?;
    if let Some(c) = &ckpt {
        c.clear()?;
    }
    Ok(record)
}

/// `generation.jsonl` holding `turns` (those a checkpoint restored, or none), open for more.
/// Written aside and renamed in: a kill meanwhile leaves the file the checkpoint covers.
fn start_turns_file(dir: &std::path::Path, turns: &[TurnRecord]) -> Result<std::fs::File> {
    let path = dir.join("generation.jsonl");
    let mut text = String::new();
    for turn in turns {
        text += &serde_json::to_string(turn)?;
        text.push('\n');
    }
    crate::records::write_atomically(&path, text.as_bytes())?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))
}

/// The settings a chat's checkpoint belongs to: everything that decides its tokens but how
/// many (so a longer `--total-tokens` goes on from the same checkpoint).
fn fingerprint(job: &GenerateJob, lm: &LoadedModel, prompts: &std::path::Path) -> Result<String> {
    let text = std::fs::read(prompts)
        .with_context(|| format!("{}: cannot read the prompt file", prompts.display()))?;
    Ok(format!(
        "{} · model {} {:?} · max_new_tokens {} · {:?} · prompts {} bytes crc32 {:08x}{} · numerics epoch {}",
        job.strategy,
        lm.info.sha256,
        lm.info.details.as_ref().map(|d| (&d.device, &d.dtype)),
        job.max_new_tokens,
        job.sampling,
        text.len(),
        crc32fast::hash(&text),
        if matches!(job.prompts, Prompts::Repeat(_)) {
            " repeated"
        } else {
            ""
        },
        crate::eval::numerics_epoch()
    ))
}

/// The user turns in order: (question id, which of its turns, text).
struct TurnSource {
    questions: Vec<Question>,
    repeat: bool,
    /// (question, turn) of the next turn.
    next: (usize, usize),
    stdin: bool,
    origin: String,
}

impl TurnSource {
    fn new(prompts: &Prompts) -> Result<Self> {
        let (questions, repeat, stdin, origin) = match prompts {
            Prompts::File(path) => (
                read_prompts(path)?,
                false,
                false,
                path.display().to_string(),
            ),
            Prompts::Repeat(path) => (read_prompts(path)?, true, false, path.display().to_string()),
            Prompts::Interactive => (Vec::new(), false, true, "stdin".to_string()),
        };
        Ok(TurnSource {
            questions,
            repeat,
            next: (0, 0),
            stdin,
            origin,
        })
    }

    fn origin(&self) -> String {
        self.origin.clone()
    }

    fn next_turn(&mut self) -> Result<Option<(String, u32, String)>> {
        if self.stdin {
            return read_stdin_turn(self.next.1);
        }
        let (q, t) = self.next;
        let Some(question) = self.questions.get(q) else {
            return Ok(None);
        };
        let turn = (question.id.clone(), t as u32, question.turns[t].clone());
        self.next = match (t + 1 < question.turns.len(), q + 1 < self.questions.len()) {
            (true, _) => (q, t + 1),
            (false, true) => (q + 1, 0),
            (false, false) if self.repeat => (0, 0),
            (false, false) => (q + 1, 0),
        };
        Ok(Some(turn))
    }
}

/// The next non-empty line of stdin, or `None` at end of input.
fn read_stdin_turn(asked: usize) -> Result<Option<(String, u32, String)>> {
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if !line.trim().is_empty() {
            return Ok(Some(("stdin".into(), asked as u32, line.to_string())));
        }
    }
}

/// One conversation on one cache.
struct Conversation<'m> {
    lm: &'m LoadedModel,
    chat: &'m ChatFormat,
    engine: TokenEngine<'m>,
    sampler: Sampler,
    messages: Vec<Message>,
    /// The text fed so far, to feed only what a new rendering adds.
    fed_text: String,
    /// Where the last answer starts in `fed_text`: a template may re-write an answer (trim
    /// it), never what came before.
    answer_start: usize,
    /// The last fed token's hidden state, and how long its forward pass took.
    last: Option<(Tensor, Duration)>,
    log: GenerationLog,
    turns: u32,
    max_new_tokens: usize,
    total_tokens: Option<u64>,
    echo: bool,
    warned_prefix: bool,
}

impl<'m> Conversation<'m> {
    fn new(lm: &'m LoadedModel, chat: &'m ChatFormat, job: &GenerateJob) -> Result<Self> {
        Ok(Conversation {
            lm,
            chat,
            engine: TokenEngine::new(&lm.model, job.strategy, true)?,
            sampler: Sampler::new(job.sampling),
            messages: Vec::new(),
            fed_text: String::new(),
            answer_start: 0,
            last: None,
            log: GenerationLog::default(),
            turns: 0,
            max_new_tokens: job.max_new_tokens,
            total_tokens: job.total_tokens,
            echo: job.echo,
            warned_prefix: false,
        })
    }

    /// The state between two turns, `next_turn` being the next user turn's place.
    fn state(&self, next_turn: (usize, usize)) -> Result<ChatState> {
        let (hidden, forward) = self.last.as_ref().context("no token fed to checkpoint")?;
        Ok(ChatState {
            turns: self.turns,
            tokens: self.log.tokens.len(),
            tokens_crc32: tokens_crc32(&self.log.tokens),
            next_turn,
            messages: (self.messages.iter())
                .map(|m| (m.role.to_string(), m.content.clone()))
                .collect(),
            fed_text: self.fed_text.clone(),
            answer_start: self.answer_start,
            warned_prefix: self.warned_prefix,
            fed: self.engine.fed(),
            hidden: hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            forward_s: forward.as_secs_f64(),
            sampler_state: self.sampler.state(),
        })
    }

    /// Puts back a checkpoint's state; returns the turns answered before it.
    fn restore(&mut self, restored: Restored) -> Result<Vec<TurnRecord>> {
        let Restored {
            chat,
            cache,
            slot_token,
            log,
            turns,
        } = restored;
        self.engine.restore(cache, slot_token, chat.fed)?;
        let model = &self.lm.model;
        let hidden = Tensor::from_vec(chat.hidden, (1, model.dims.hidden_size), model.device())?;
        self.last = Some((
            hidden.to_dtype(model.dtype())?,
            Duration::from_secs_f64(chat.forward_s),
        ));
        self.messages = (chat.messages.into_iter())
            .map(|(role, content)| {
                let role = match role.as_str() {
                    "user" => "user",
                    "assistant" => "assistant",
                    other => bail!("a checkpoint's message has role `{other}`"),
                };
                Ok(Message { role, content })
            })
            .collect::<Result<_>>()?;
        (self.fed_text, self.answer_start) = (chat.fed_text, chat.answer_start);
        (self.turns, self.warned_prefix) = (chat.turns, chat.warned_prefix);
        self.sampler.set_state(chat.sampler_state);
        self.log = log;
        Ok(turns)
    }

    fn generated(&self) -> u64 {
        self.log.tokens.len() as u64
    }

    fn done(&self) -> bool {
        self.total_tokens.is_some_and(|n| self.generated() >= n)
    }

    /// Feeds one user turn and generates its answer.
    fn answer(
        &mut self,
        question_id: &str,
        question_turn: u32,
        prompt: &str,
    ) -> Result<TurnRecord> {
        let started = Instant::now();
        self.messages.push(Message {
            role: "user",
            content: prompt.to_string(),
        });
        let prompt_tokens = self.feed_new_text()?;
        if self.echo {
            print!("USER: {prompt}\n\nASSISTANT: ");
            std::io::stdout().flush()?;
        }
        let (ids, stop) = self.generate_answer()?;
        let answer_ids: Vec<u32> = (ids.iter().copied())
            .filter(|id| !self.chat.stop_tokens.contains(id))
            .collect();
        let answer = self.lm.tokenizer.decode(&answer_ids)?;
        if self.echo {
            println!("\n");
        }
        // What was fed: the rendered prompt, then the answer (an end-of-turn token is fed with
        // the next turn's text, where the template writes it).
        self.answer_start = self.fed_text.len();
        self.fed_text += &answer;
        self.messages.push(Message {
            role: "assistant",
            content: answer.clone(),
        });
        let record = TurnRecord {
            turn: self.turns,
            question_id: question_id.to_string(),
            question_turn,
            prompt: prompt.to_string(),
            answer,
            prompt_tokens,
            answer_tokens: ids.len() as u64,
            stop: stop.into(),
            repeated_4grams: repeated_4grams(&answer_ids),
            seconds: started.elapsed().as_secs_f64(),
        };
        self.turns += 1;
        Ok(record)
    }

    /// Feeds what the rendered conversation adds to the text fed so far; returns its tokens.
    fn feed_new_text(&mut self) -> Result<u64> {
        let rendered = self.chat.render(&self.messages)?;
        let common = common_prefix_len(&rendered, &self.fed_text);
        let extends = common >= self.answer_start;
        let new_text = match extends {
            // What follows the text the rendering shares with what was fed: the new turn, after
            // the end of the answer as the template writes it.
            true => rendered[common..].to_string(),
            false => {
                if !self.warned_prefix {
                    self.warned_prefix = true;
                    eprintln!(
                        "warning: the chat template does not extend the conversation's text (it rewrites earlier turns); each turn is fed rendered on its own"
                    );
                }
                self.chat
                    .render(&self.messages[self.messages.len() - 1..])?
            }
        };
        let mut ids = self.chat.encode(&self.lm.tokenizer, &new_text)?;
        if self.engine.fed() == 0
            && let Some(bos) = self.lm.tokenizer.bos()
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        for &id in &ids {
            self.feed(id)?;
        }
        self.fed_text = match extends {
            true => rendered,
            false => self.fed_text.clone() + &new_text,
        };
        Ok(ids.len() as u64)
    }

    fn feed(&mut self, id: u32) -> Result<()> {
        let t = Instant::now();
        let hidden = self.engine.step(id)?;
        self.last = Some((hidden, t.elapsed()));
        Ok(())
    }

    /// Generates until an end-of-turn token, `max_new_tokens` or `total_tokens`; returns the
    /// generated ids (the end-of-turn token included, not fed) and why it stopped.
    fn generate_answer(&mut self) -> Result<(Vec<u32>, &'static str)> {
        let mut ids = Vec::new();
        let mut printed = 0;
        loop {
            if ids.len() >= self.max_new_tokens {
                return Ok((ids, "max_new_tokens"));
            }
            if self.done() {
                return Ok((ids, "total_tokens"));
            }
            let (hidden, forward) = self.last.take().context("nothing fed to answer")?;
            let t = Instant::now();
            let log_probs = self.lm.model.log_probs(&hidden)?;
            let id = self.sampler.pick(&log_probs);
            self.log.tokens.push(GeneratedToken {
                turn: self.turns,
                position: self.engine.fed(),
                token_id: id,
                nll: -log_probs[id as usize],
                cache_keys: self.engine.cached() as u32,
                latency_s: (forward + t.elapsed()).as_secs_f32(),
                rss_mib: current_rss_mib().unwrap_or(f64::NAN) as f32,
            });
            ids.push(id);
            if self.chat.stop_tokens.contains(&id) {
                // Not fed now; `last` stays for the next turn's first token.
                self.last = Some((hidden, forward));
                return Ok((ids, "end_of_turn"));
            }
            if self.echo {
                printed = self.print_new_text(&ids, printed)?;
            }
            self.feed(id)?;
        }
    }

    /// Prints the answer's text past the first `printed` bytes, unless it ends inside a
    /// character (a byte-fallback token); returns the bytes printed so far.
    fn print_new_text(&self, ids: &[u32], printed: usize) -> Result<usize> {
        let text = self.lm.tokenizer.decode(ids)?;
        if text.ends_with('\u{FFFD}') || text.len() <= printed || !text.is_char_boundary(printed) {
            return Ok(printed);
        }
        print!("{}", &text[printed..]);
        std::io::stdout().flush()?;
        Ok(text.len())
    }

    fn record(&self, job: &GenerateJob, wall: Duration, prompts: String) -> GenerationRecord {
        let mut latencies: Vec<f64> = (self.log.tokens.iter())
            .map(|t| t.latency_s as f64)
            .collect();
        let busy: f64 = latencies.iter().sum();
        latencies.sort_by(f64::total_cmp);
        let n = self.log.tokens.len();
        let sum_nll: f64 = self.log.tokens.iter().map(|t| t.nll as f64).sum();
        GenerationRecord {
            schema: GENERATION_SCHEMA,
            kind: "generation".into(),
            strategy: job.strategy.to_string(),
            label: job.strategy.label(),
            model: self.lm.info.clone(),
            prompts,
            chat_template: self.chat.has_template(),
            stop_tokens: self.chat.stop_tokens.clone(),
            temperature: job.sampling.temperature,
            top_p: job.sampling.top_p,
            seed: job.sampling.seed,
            max_new_tokens: job.max_new_tokens,
            turns: self.turns,
            tokens_generated: n as u64,
            tokens_fed: self.engine.fed(),
            tokens_per_second: n as f64 / busy,
            median_latency_s: latencies.get(n / 2).copied().unwrap_or(f64::NAN),
            self_ppl: (sum_nll / n.max(1) as f64).exp(),
            wall_seconds: wall.as_secs_f64(),
            peak_rss_bytes: peak_rss_bytes(),
            threads: candle_core::utils::get_num_threads(),
            versions: versions(),
            finished_at: now_rfc3339(),
        }
    }
}

/// Bytes of the longest common prefix of `a` and `b` (a character boundary of both).
fn common_prefix_len(a: &str, b: &str) -> usize {
    (a.char_indices().zip(b.chars()))
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((at, _), _)| at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefixes_end_on_a_character() {
        assert_eq!(common_prefix_len("abc", "abd"), 2);
        assert_eq!(common_prefix_len("ab", "abc"), 2);
        assert_eq!(common_prefix_len("abc", ""), 0);
        assert_eq!(common_prefix_len("aé", "aè"), 1);
    }
}
