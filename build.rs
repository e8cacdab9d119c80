//! Records the resolved versions of candle and tokenizers (from Cargo.lock) for run.json, and
//! with the `cuda` feature compiles our CUDA kernels to PTX with the toolkit's nvcc.
fn main() {
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rerun-if-changed=src/model/cuda/common.cuh");
        compile_ptx("src/model/cuda/attention.cu", "attention.ptx");
        compile_ptx("src/model/cuda/flash.cu", "flash.ptx");
    }
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

/// `nvcc --ptx` of `source` into OUT_DIR/`ptx`, for the compute capability candle's kernels are
/// built for (CUDA_COMPUTE_CAP, as `../shared/tools/build-cuda.sh` sets it; 90 = Hopper).
fn compile_ptx(source: &str, ptx: &str) {
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join(ptx);
    let status = std::process::Command::new("nvcc")
        .args(["--ptx", "-O3", &format!("-arch=sm_{cap}"), "-o"])
        .arg(&out)
        .arg(source)
        .status()
        .unwrap_or_else(|e| panic!("nvcc (the CUDA toolkit) is needed for the cuda feature: {e}"));
    assert!(status.success(), "nvcc failed on {source}");
}
