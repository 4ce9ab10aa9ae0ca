//! phi-engine: load Phi-3 checkpoints and generate text exactly as Hugging Face transformers does.
pub mod chat_template;
pub mod checkpoint;
pub mod config;
mod cpu_decode_batch;
#[cfg(feature = "cuda")]
mod cuda_kernels;
#[cfg(feature = "cuda")]
pub mod cuda_layer_ops;
#[cfg(feature = "cuda")]
pub mod cuda_paged;
#[cfg(feature = "cuda")]
pub mod cuda_sampling;
pub mod decode_split;
pub mod detokenizer;
pub mod device_draw;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod gguf_vocab;
mod huge_pages;
pub mod kv_cache;
pub mod kv_pool;
mod kv_rows;
pub mod model;
pub mod model_pool;
pub mod paged_attention;
pub mod phi3;
pub mod phi3_small;
pub mod phi3_small_config;
pub mod prefix_cache;
pub mod projection;
pub mod qgemm;
mod qgemm_pool;
pub mod quantize;
pub mod rope;
pub mod sampling;
pub mod span_attention;
mod step_logits;
pub mod stop;
pub mod tiktoken;
pub mod tokenizer;
pub mod weights;
