//! The markdown results table.

use std::fmt::Write;
use std::path::Path;

use super::Run;

/// Marks approximate rows, and their footnotes.
const APPROX: &str = "(approx.)";

const HEADER: &str = "| strategy | engine | tokens scored | PPL | word PPL | byte PPL | bits/byte | tokens/s |\n\
                      |---|---|---:|---:|---:|---:|---:|---:|\n";

/// One markdown table over runs: columns strategy (label; append " (approx.)" when approximate),
/// engine, tokens scored, PPL (2 decimals), word PPL, byte PPL (3 decimals), bits/byte
/// (4 decimals), tokens/s (1 decimal). Followed by one footnote line per distinct note of
/// approximate runs. Also the model file name and corpus once, above the table, if all runs
/// share them.
pub fn markdown_table(runs: &[Run]) -> String {
    let mut out = shared_context(runs);
    out.push_str(HEADER);
    for run in runs {
        out.push_str(&row(run));
    }
    out.push_str(&footnotes(runs));
    out
}

/// "Model: … · Corpus: …" for whatever all runs have in common; empty if nothing is.
fn shared_context(runs: &[Run]) -> String {
    let Some(first) = runs.first() else {
        return String::new();
    };
    let mut parts = Vec::new();
    if runs.iter().all(|r| r.record.model == first.record.model) {
        let model = &first.record.model.path;
        // The file name is what tells models apart; the full path is machine-specific.
        let name = Path::new(model)
            .file_name()
            .map_or(model.clone(), |n| n.to_string_lossy().into_owned());
        parts.push(format!("Model: `{}`", cell(&name)));
    }
    if runs.iter().all(|r| r.record.corpus == first.record.corpus) {
        let corpus = &first.record.corpus;
        let books = if corpus.books == 1 { "book" } else { "books" };
        parts.push(format!(
            "Corpus: `{}` ({} {books})",
            cell(&corpus.path),
            corpus.books
        ));
    }
    if parts.is_empty() {
        String::new()
    } else {
        parts.join(" · ") + "\n\n"
    }
}

fn row(run: &Run) -> String {
    let r = &run.record;
    let label = if r.approximate {
        format!("{} {APPROX}", r.label)
    } else {
        r.label.clone()
    };
    format!(
        "| {} | {} | {} | {:.2} | {:.3} | {:.3} | {:.4} | {:.1} |\n",
        cell(&label),
        cell(&r.engine),
        r.tokens_scored,
        r.ppl,
        r.word_perplexity,
        r.byte_perplexity,
        r.bits_per_byte,
        r.tokens_per_second
    )
}

/// One line per distinct note of approximate runs, naming the runs it qualifies,
/// in order of first appearance.
fn footnotes(runs: &[Run]) -> String {
    let mut notes: Vec<(&str, Vec<&str>)> = Vec::new();
    for r in runs.iter().map(|run| &run.record).filter(|r| r.approximate) {
        let Some(note) = r.note.as_deref() else {
            continue;
        };
        match notes.iter_mut().find(|(n, _)| *n == note) {
            Some((_, labels)) => labels.push(&r.label),
            None => notes.push((note, vec![&r.label])),
        }
    }
    let mut out = String::new();
    for (note, labels) in notes {
        // A list item per note: plain lines would merge into one paragraph when rendered.
        let _ = writeln!(out, "\n- {APPROX} {}: {}", labels.join(", "), note);
    }
    out
}

/// Escapes the one character that would break a table cell.
pub(super) fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::fake_runs;

    #[test]
    fn one_row_per_run_with_its_ppl() {
        let (_scratch, runs) = fake_runs("table");
        let table = markdown_table(&runs);
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| strategy"))
            .collect();
        assert_eq!(rows.len(), runs.len(), "{table}");
        for (row, run) in rows.iter().zip(&runs) {
            assert!(row.starts_with(&format!("| {}", run.record.label)), "{row}");
            assert!(row.contains(&format!("| {:.2} |", run.record.ppl)), "{row}");
        }
        assert!(rows[2].contains("Recompute 256/64 (approx.)"), "{table}");
    }

    #[test]
    fn shared_model_and_corpus_and_footnote() {
        let (_scratch, runs) = fake_runs("table-notes");
        let table = markdown_table(&runs);
        assert!(table.starts_with(
            "Model: `model.safetensors` · Corpus: `/data/pg19-test.parquet` (1 book)\n"
        ));
        let notes: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("- (approx.)"))
            .collect();
        assert_eq!(
            notes,
            ["- (approx.) Recompute 256/64: stride 64: tokens share a recomputed cache"]
        );
    }

    #[test]
    fn empty_runs_give_a_bare_header() {
        assert_eq!(markdown_table(&[]), HEADER);
    }
}
