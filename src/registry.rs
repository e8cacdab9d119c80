//! Short model names (`--model gemma3-270m`) from the registry file `models.toml`, compiled in:
//! each names the file `scripts/fetch-defaults.sh` fetches, the command that fetches it, and
//! the folder under `results/` that `streamppl reproduce` writes the model's experiments to.
//!
//! ```
//! let gemma = streamppl::registry::lookup("gemma3-270m").unwrap();
//! assert_eq!(gemma.path, std::path::Path::new("models/gemma-3-270m-q4_k_m.gguf"));
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

const REGISTRY: &str = include_str!("../models.toml");

/// One registered model.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// The model file, relative to the repository root.
    pub path: PathBuf,
    /// The command that fetches it.
    pub fetch: String,
    /// The folder under `results/` for its experiments; empty for the default model's.
    pub results: String,
    pub about: String,
}

fn entries() -> BTreeMap<String, Entry> {
    toml::from_str(REGISTRY).expect("models.toml is checked by a unit test")
}

/// The registered model `name`, if there is one.
pub fn lookup(name: &str) -> Option<Entry> {
    entries().remove(name)
}

/// Every registered name, sorted (for error messages).
pub fn names() -> Vec<String> {
    entries().into_keys().collect()
}

/// The registered model whose file is `path`, if any: reproduce files a model's results
/// under its folder whether `--model` gave the name or the path.
pub fn by_path(path: &std::path::Path) -> Option<Entry> {
    entries().into_values().find(|e| e.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_parses_and_names_fetchable_files() {
        let all = entries();
        assert!(all.len() >= 2);
        for (name, entry) in &all {
            assert!(entry.path.starts_with("models"), "{name}");
            assert!(
                entry.fetch.starts_with("scripts/fetch-defaults.sh"),
                "{name}"
            );
        }
        assert_eq!(lookup("smollm2-135m").unwrap().results, "");
        assert_eq!(
            by_path(std::path::Path::new("models/gemma-3-270m-q4_k_m.gguf"))
                .unwrap()
                .results,
            "gemma3-270m"
        );
        assert!(lookup("nope").is_none());
    }
}
