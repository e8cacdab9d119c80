//! A model's chat format: its Jinja chat template (a GGUF's `tokenizer.chat_template`, or
//! `chat_template` in a Hugging Face folder's `tokenizer_config.json` or `chat_template.jinja`)
//! rendered with minijinja, the tokens that end an answer, and the control tokens its template
//! writes as text. A model without a template gets plain `User:`/`Assistant:` turns.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;
use serde_json::Value as Json;

use crate::source::{ModelFiles, ResolvedModel};
use crate::tokenizer::TextTokenizer;

/// One message of the conversation, as chat templates read it.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

/// How a conversation becomes text, and which tokens end an answer.
pub struct ChatFormat {
    /// The compiled template, or `None`: plain turns.
    template: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
    /// Control tokens (text, id) that the tokenizer spells out in raw text (a SentencePiece
    /// GGUF's, as llama.cpp's perplexity tool reads text) but a rendered template means as one
    /// token each.
    controls: Vec<(String, u32)>,
    /// Tokens that end an answer: the EOS, and the one the template closes an answer with.
    pub stop_tokens: Vec<u32>,
}

/// The template's name inside the environment.
const TEMPLATE: &str = "chat";

impl ChatFormat {
    /// The chat format of a resolved `--model` whose tokenizer is `tok`. A template that does
    /// not compile is an error naming the file; no template at all falls back to plain turns
    /// with a warning.
    pub fn for_model(model: &ResolvedModel, tok: &TextTokenizer) -> Result<Self> {
        let found = match &model.files {
            ModelFiles::Gguf(path) => from_gguf(path)?,
            ModelFiles::HuggingFace(files) => from_hf_folder(&files.folder, tok)?,
        };
        let mut format = ChatFormat {
            template: None,
            bos_token: found
                .bos_id
                .and_then(|id| tok.id_to_token(id))
                .unwrap_or_default(),
            eos_token: found
                .eos_id
                .and_then(|id| tok.id_to_token(id))
                .unwrap_or_default(),
            controls: found.controls,
            stop_tokens: found.eos_id.into_iter().collect(),
        };
        match found.template {
            Some(source) => {
                format.template = Some(compile(source).with_context(|| {
                    format!("{}: the chat template does not compile", found.origin)
                })?);
                if let Some(end) = format.answer_end(tok)?
                    && !format.stop_tokens.contains(&end)
                {
                    format.stop_tokens.push(end);
                }
            }
            None => eprintln!(
                "warning: {} has no chat template; turns are fed as plain `User:`/`Assistant:` text",
                found.origin
            ),
        }
        Ok(format)
    }

    /// Whether turns go through the model's own template.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// The conversation as text, ending with the assistant's prompt when the last message is
    /// the user's.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let add_generation_prompt = messages.last().is_some_and(|m| m.role == "user");
        let Some(env) = &self.template else {
            return Ok(plain(messages, add_generation_prompt));
        };
        let template = env.get_template(TEMPLATE)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| anyhow!("the chat template failed to render: {}", one_line(&e)))
    }

    /// Token ids of rendered text: the control tokens it spells are one token each.
    pub fn encode(&self, tok: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        while let Some((at, text_len, id)) = self.next_control(rest) {
            ids.extend(tok.encode_without_bos(&rest[..at])?);
            ids.push(id);
            rest = &rest[at + text_len..];
        }
        ids.extend(tok.encode_without_bos(rest)?);
        Ok(ids)
    }

    /// The first control token in `text`, the longest at that place: (byte offset, length, id).
    fn next_control(&self, text: &str) -> Option<(usize, usize, u32)> {
        (self.controls.iter())
            .filter_map(|(s, id)| text.find(s.as_str()).map(|at| (at, s.len(), *id)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
    }

    /// The token the template closes an answer with (Gemma's `<end_of_turn>`, ChatML's
    /// `<|im_end|>`): the first token after an answer's text in a rendered conversation.
    fn answer_end(&self, tok: &TextTokenizer) -> Result<Option<u32>> {
        const ANSWER: &str = "streamppl-answer";
        let text = self.render(&[
            Message {
                role: "user",
                content: "hi".into(),
            },
            Message {
                role: "assistant",
                content: ANSWER.into(),
            },
        ])?;
        let after = text.rfind(ANSWER).map(|at| &text[at + ANSWER.len()..]);
        Ok(match after {
            Some(after) => self.encode(tok, after)?.first().copied(),
            None => None,
        })
    }
}

/// Plain turns for a model without a template (the StreamingLLM demo's format).
fn plain(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut text = String::new();
    for m in messages {
        match m.role {
            "user" => text += &format!("User: {}\n\n", m.content),
            // The answer as generated after the prompt's `Assistant:` (its own leading space).
            _ => text += &format!("Assistant:{}\n\n", m.content),
        }
    }
    if add_generation_prompt {
        text += "Assistant:";
    }
    text
}

fn compile(source: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    // Hugging Face templates are Python Jinja: `.strip()`, `.items()` and friends.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_template_owned(TEMPLATE, source)?;
    Ok(env)
}

fn one_line(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text.replace('\n', " ")
}

/// What a model's files say about chatting.
struct Found {
    template: Option<String>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    controls: Vec<(String, u32)>,
    /// Where it was read, for messages.
    origin: String,
}

/// GGUF `tokenizer.token_type` of a control token (llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`).
const TOKEN_CONTROL: i32 = 3;

fn from_gguf(path: &Path) -> Result<Found> {
    let mut reader = BufReader::new(
        File::open(path).with_context(|| format!("{}: cannot open model", path.display()))?,
    );
    let content = Content::read(&mut reader)
        .map_err(|e| anyhow!("{}: not a readable GGUF file ({e})", path.display()))?;
    let md = &content.metadata;
    let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
    Ok(Found {
        template: md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned(),
        bos_id: id("tokenizer.ggml.bos_token_id"),
        eos_id: id("tokenizer.ggml.eos_token_id"),
        controls: gguf_controls(md),
        origin: path.display().to_string(),
    })
}

fn gguf_controls(md: &HashMap<String, Value>) -> Vec<(String, u32)> {
    let (Some(Value::Array(tokens)), Some(Value::Array(types))) = (
        md.get("tokenizer.ggml.tokens"),
        md.get("tokenizer.ggml.token_type"),
    ) else {
        return Vec::new();
    };
    (tokens.iter().zip(types).enumerate())
        .filter(|(_, (_, t))| t.to_i32().ok() == Some(TOKEN_CONTROL))
        .filter_map(|(id, (s, _))| Some((s.to_string().ok()?.clone(), id as u32)))
        .filter(|(s, _)| !s.is_empty())
        .collect()
}

/// `tokenizer_config.json` (its `chat_template`: a string, or a list of named templates of
/// which `default` is taken) or `chat_template.jinja`; BOS and EOS from the config.
fn from_hf_folder(folder: &Path, tok: &TextTokenizer) -> Result<Found> {
    let config_path = folder.join(crate::source::TOKENIZER_CONFIG);
    let config: Option<Json> = match std::fs::read_to_string(&config_path) {
        Ok(text) => Some(serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{}: not JSON ({e}); fix or delete it",
                config_path.display()
            )
        })?),
        Err(_) => None,
    };
    let jinja = folder.join("chat_template.jinja");
    let template = match config.as_ref().and_then(|c| c.get("chat_template")) {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(named)) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        Some(other) => bail!(
            "{}: `chat_template` is {other}, not a string or a list of named templates",
            config_path.display()
        ),
        None => std::fs::read_to_string(&jinja).ok(),
    };
    let token = |key: &str| -> Option<u32> {
        let value = config.as_ref()?.get(key)?;
        let text = value.as_str().or_else(|| value.get("content")?.as_str())?;
        tok.token_to_id(text)
    };
    Ok(Found {
        template,
        bos_id: token("bos_token"),
        eos_id: token("eos_token"),
        controls: Vec::new(),
        origin: folder.display().to_string(),
    })
}
