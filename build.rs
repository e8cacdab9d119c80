//! Records the resolved versions of candle and tokenizers (from Cargo.lock) for run.json.
fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    for (krate, var) in [
        ("candle-core", "STREAMPPL_CANDLE_VERSION"),
        ("tokenizers", "STREAMPPL_TOKENIZERS_VERSION"),
    ] {
        let version = lock
            .split("[[package]]")
            .find(|pkg| pkg.contains(&format!("name = \"{krate}\"\n")))
            .and_then(|pkg| pkg.lines().find_map(|l| l.strip_prefix("version = \"")))
            .map(|v| v.trim_end_matches('"').to_string())
            .unwrap_or_else(|| "unknown".into());
        println!("cargo:rustc-env={var}={version}");
    }
}
