//! phi-engine: load Phi-3 checkpoints and generate text exactly as Hugging Face transformers does.
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod detokenizer;
pub mod engine;
pub mod error;
pub mod kv_cache;
pub mod phi3;
pub mod prefix_cache;
pub mod rope;
pub mod sampling;
pub mod stop;
pub mod tokenizer;
pub mod weights;
