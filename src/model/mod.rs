//! Model code: knows tensors, not files of corpora or the command line.
//!
//! Every family (one file each: [`llama`], [`neox`], [`falcon`], [`mpt`], [`gemma3`]) builds the same
//! [`Model`] of [`decoder`] parts over the shared [`attention`] core; the engines see only
//! [`Model`]. [`hf`] picks the family of a Hugging Face checkpoint, [`gguf`] reads GGUF files.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decoder;
pub mod falcon;
pub mod gemma3;
pub mod gguf;
pub mod hf;
pub mod huge_pages;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod mpt;
pub mod neox;
pub mod ops;
pub mod random;
pub mod rope;
pub mod step_tally;
pub mod team;
pub mod weights;

pub use attention::{AttnPlan, SinkRotation, Visibility};
pub use decoder::{Dims, Model};
pub use kv_cache::KvCache;
pub use llama::Config;
