//! Model code: knows tensors, not files of corpora or the command line.

pub mod gguf;
pub mod kernels;
pub mod kv_cache;
pub mod llama;
pub mod random;
pub mod rope;

pub use kv_cache::KvCache;
pub use llama::{AttnPlan, Config, Llama, SinkRotation};
