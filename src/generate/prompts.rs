//! The prompt file of `streamppl generate`: MT-Bench's question format, one JSON object per
//! line (`{"question_id": 81, "turns": ["..", ".."]}`), or plain text lines, each a question of
//! one turn. Blank lines are skipped.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;

/// One question: its turns are asked one after another in the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// MT-Bench's `question_id` as written (a number or a string), or the line number of a
    /// plain text line.
    pub id: String,
    pub turns: Vec<String>,
}

/// Reads `path`; a broken line is an error naming the file and the line.
pub fn read_prompts(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "{}: cannot read the prompt file; give a JSONL file of {{\"question_id\", \"turns\"}} objects or plain text lines",
            path.display()
        )
    })?;
    let mut questions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let question =
            parse_line(line, i + 1).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        questions.push(question);
    }
    if questions.is_empty() {
        bail!(
            "{}: holds no prompt; give one question per line",
            path.display()
        );
    }
    Ok(questions)
}

/// A JSON object line (it starts with `{`) or a plain text question.
fn parse_line(line: &str, number: usize) -> Result<Question> {
    if !line.trim_start().starts_with('{') {
        return Ok(Question {
            id: number.to_string(),
            turns: vec![line.to_string()],
        });
    }
    let json: Json = serde_json::from_str(line).map_err(|e| {
        anyhow::anyhow!(
            "not a JSON object ({e}); write {{\"question_id\": 1, \"turns\": [\"...\"]}}"
        )
    })?;
    let id = match json.get("question_id") {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Number(n)) => n.to_string(),
        None => number.to_string(),
        Some(other) => bail!("`question_id` {other} is neither a number nor a string"),
    };
    let turns = match json.get("turns") {
        Some(Json::Array(turns)) if !turns.is_empty() => turns
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("a turn is {t}, not a string"))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(_) => bail!("`turns` must be a non-empty list of strings"),
        None => bail!("no `turns`: write {{\"question_id\": 1, \"turns\": [\"...\"]}}"),
    };
    Ok(Question { id, turns })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("streamppl-prompts-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn mt_bench_lines_and_plain_lines() {
        let path = write(
            "ok.jsonl",
            "{\"question_id\": 81, \"category\": \"writing\", \"turns\": [\"Write.\", \"Again.\"]}\n\n\
             Why is the sky blue?\r\n{\"question_id\": \"q2\", \"turns\": [\"One.\"]}\n",
        );
        let q = read_prompts(&path).unwrap();
        assert_eq!(q.len(), 3);
        assert_eq!(q[0].id, "81");
        assert_eq!(q[0].turns, ["Write.", "Again."]);
        assert_eq!(q[1].id, "3");
        assert_eq!(q[1].turns, ["Why is the sky blue?"]);
        assert_eq!(q[2].id, "q2");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_broken_line_is_named_by_its_number() {
        for (text, want) in [
            ("Hello\n{\"turns\": [\"a\"\n", ":2: not a JSON object"),
            ("{\"question_id\": 1}\n", ":1: no `turns`"),
            ("{\"turns\": []}\n", ":1: `turns` must be a non-empty list"),
            ("{\"turns\": [1]}\n", ":1: a turn is 1, not a string"),
            ("\n\n", "holds no prompt"),
        ] {
            let path = write("bad.jsonl", text);
            let err = format!("{:#}", read_prompts(&path).unwrap_err());
            assert!(err.contains(want), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
            std::fs::remove_file(path).unwrap();
        }
    }
}
