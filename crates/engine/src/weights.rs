//! Memory-mapped safetensors shards, with every tensor checked against the shape the config
//! implies, so a wrong or truncated checkpoint fails at load with the tensor's name and file.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::error::{EngineError, Result};
use crate::projection::{Embedding, Projection};

/// Where the model's tensors come from, by Hugging Face name: a safetensors checkpoint
/// ([`WeightStore`]), one quantized as it loads ([`crate::quantize::QuantizingWeights`]) or a
/// GGUF file ([`crate::gguf::GgufWeights`]).
pub trait ModelWeights {
    /// A dense tensor (norm weights) of exactly `shape`, in the model's dtype and device.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// A weight matrix `[out, in]` used as a projection.
    fn projection(&self, name: &str, shape: [usize; 2]) -> Result<Projection>;
    /// The token embedding table `[vocab, hidden]`.
    fn embedding(&self, name: &str, shape: [usize; 2]) -> Result<Embedding>;
    /// Every tensor name the source holds (Hugging Face names where a mapping exists), so the
    /// loader can refuse a file of another architecture.
    fn names(&self) -> Vec<String>;
}

/// One memory-mapped shard.
struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

/// Every tensor of a (possibly sharded) safetensors checkpoint, loaded on demand.
pub struct WeightStore {
    shards: Vec<Shard>,
    /// Tensor name to the index of the shard holding it.
    routing: HashMap<String, usize>,
    /// The dtype tensors are converted to when loaded.
    dtype: DType,
    device: Device,
}

impl WeightStore {
    /// Maps every shard and indexes its tensors. Weights stay on disk until [`Self::get`].
    pub fn open(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path)
                .map_err(|e| EngineError::Io { path: path.clone(), source: e })?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we rely on the
            // checkpoint not being modified while the server runs.
            let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }
                .map_err(|e| EngineError::Io { path: path.clone(), source: e })?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| EngineError::Weights {
                location: path.display().to_string(),
                message: format!("not a valid safetensors file: {e}"),
            })?;
            for name in st.names() {
                if let Some(prev) = routing.insert(name.to_string(), i) {
                    return Err(EngineError::Weights {
                        location: path.display().to_string(),
                        message: format!("tensor `{name}` is also in {}", paths[prev].display()),
                    });
                }
            }
            drop(st);
            shards.push(Shard { path: path.clone(), mmap });
        }
        Ok(Self { shards, routing, dtype, device: device.clone() })
    }

    /// The dtype [`Self::get`] converts to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the checkpoint holds a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// Every shard path, joined for messages.
    fn all_files(&self) -> String {
        self.shards.iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Loads `name`, checks it has exactly `shape` and converts it to the store's dtype and device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype, &self.device)
    }

    /// Like [`Self::get`], converted to `dtype` on `device` instead.
    pub fn get_as(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let &idx = self.routing.get(name).ok_or_else(|| EngineError::Weights {
            location: self.all_files(),
            message: format!("tensor `{name}` (shape {shape:?}) is missing"),
        })?;
        let shard = &self.shards[idx];
        let location = shard.path.display().to_string();
        let st = SafeTensors::deserialize(&shard.mmap).map_err(|e| EngineError::Weights {
            location: location.clone(),
            message: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|e| EngineError::Weights {
            location: location.clone(),
            message: e.to_string(),
        })?;
        if view.shape() != shape {
            return Err(EngineError::Weights {
                location,
                message: format!(
                    "tensor `{name}` has shape {:?}, but config.json implies {shape:?}",
                    view.shape()
                ),
            });
        }
        let src_dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(EngineError::Weights {
                    location,
                    message: format!(
                        "tensor `{name}` has dtype {other:?}; phi-serve loads bf16, f16 or f32"
                    ),
                })
            }
        };
        // from_raw_buffer copies the bytes out of the map; the converted tensor owns its memory.
        let t =
            Tensor::from_raw_buffer(view.data(), src_dtype, shape, &Device::Cpu).map_err(|e| {
                EngineError::Weights { location: location.clone(), message: e.to_string() }
            })?;
        let t = if src_dtype == dtype { t } else { t.to_dtype(dtype)? };
        Ok(t.to_device(device)?)
    }
}

impl ModelWeights for WeightStore {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(name, shape)
    }

    fn projection(&self, name: &str, shape: [usize; 2]) -> Result<Projection> {
        Ok(Projection::dense(self.get(name, &shape)?))
    }

    fn embedding(&self, name: &str, shape: [usize; 2]) -> Result<Embedding> {
        Ok(Embedding::Dense(self.get(name, &shape)?))
    }

    fn names(&self) -> Vec<String> {
        self.routing.keys().cloned().collect()
    }
}
