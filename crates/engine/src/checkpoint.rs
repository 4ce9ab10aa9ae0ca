//! Where a model's files are: a local folder, or a Hugging Face repository fetched into the
//! standard Hugging Face cache with `hf-hub`.
//!
//! The hub path honours `HF_HOME` (cache location), `HF_ENDPOINT`, `HF_TOKEN` (or the token file
//! that `huggingface-cli login` writes) and `HF_HUB_OFFLINE=1` (use only what is cached).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{EngineError, Result};

/// The files of one checkpoint, resolved to local paths.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    /// Human-readable origin, used in messages (a folder path or `repo@revision`).
    pub origin: String,
    /// `config.json`.
    pub config: PathBuf,
    /// `generation_config.json`, when the checkpoint has one.
    pub generation_config: Option<PathBuf>,
    /// The tokenizer: `tokenizer.json`, or for a checkpoint without one (Phi-3-small) the tiktoken
    /// ranks file `cl100k_base.tiktoken` ([`crate::tokenizer::PhiTokenizer::from_files`] tells
    /// them apart by the `.tiktoken` extension).
    pub tokenizer: PathBuf,
    /// `tokenizer_config.json`, when the checkpoint has one (chat template, special tokens).
    pub tokenizer_config: Option<PathBuf>,
    /// Every safetensors shard, in the order of the index (or the single file); empty for a
    /// GGUF model.
    pub weights: Vec<PathBuf>,
    /// A GGUF file that holds the whole model (hyper-parameters, tokenizer, chat template and
    /// tensors); `config` and `tokenizer` then name the same file.
    pub gguf: Option<PathBuf>,
}

/// How a model is named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder holding `config.json`, tokenizer files and safetensors.
    Local(PathBuf),
    /// A Hugging Face repository id such as `microsoft/Phi-3-mini-4k-instruct`.
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit; `main` when not given.
        revision: String,
    },
    /// A local GGUF file.
    GgufFile(PathBuf),
    /// One GGUF file of a hub repository, named `owner/name/file.gguf`, e.g.
    /// `microsoft/Phi-3-mini-4k-instruct-gguf/Phi-3-mini-4k-instruct-q4.gguf`.
    HubGguf {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit; `main` when not given.
        revision: String,
        /// The file's path inside the repository.
        file: String,
    },
}

impl ModelSource {
    /// An existing path is a local folder or `.gguf` file; anything else of the form
    /// `owner/name` is a hub id, and `owner/name/file.gguf` one GGUF file of a hub repository.
    pub fn parse(name: &str, revision: Option<&str>) -> Result<Self> {
        let path = Path::new(name);
        let is_gguf = |p: &str| p.to_ascii_lowercase().ends_with(".gguf");
        if path.exists() {
            if path.is_file() && is_gguf(name) {
                return Ok(Self::GgufFile(path.to_path_buf()));
            }
            if !path.is_dir() {
                return Err(EngineError::InvalidRequest(format!(
                    "{name}: a model is a folder with config.json and safetensors, or a .gguf \
                     file"
                )));
            }
            return Ok(Self::Local(path.to_path_buf()));
        }
        let parts: Vec<&str> = name.split('/').collect();
        if parts.len() >= 3
            && is_gguf(name)
            && !name.starts_with('.')
            && !name.starts_with('/')
            && parts.iter().all(|p| !p.is_empty() && *p != "..")
        {
            return Ok(Self::HubGguf {
                repo: format!("{}/{}", parts[0], parts[1]),
                revision: revision.unwrap_or("main").to_string(),
                file: parts[2..].join("/"),
            });
        }
        let looks_like_repo = name.split('/').count() == 2
            && !name.starts_with('.')
            && !name.starts_with('/')
            && name.split('/').all(|p| !p.is_empty());
        if looks_like_repo {
            Ok(Self::Hub {
                repo: name.to_string(),
                revision: revision.unwrap_or("main").to_string(),
            })
        } else {
            Err(EngineError::InvalidRequest(format!(
                "{name}: no such folder, and not a Hugging Face repository id (owner/name)"
            )))
        }
    }

    /// Finds (downloading if needed) every file of the checkpoint.
    pub fn resolve(&self) -> Result<CheckpointFiles> {
        match self {
            Self::Local(dir) => resolve_with(&dir.display().to_string(), |f| {
                let p = dir.join(f);
                Ok(p.is_file().then_some(p))
            }),
            Self::Hub { repo, revision } => {
                let fetcher = HubFetcher::new(repo, revision)?;
                resolve_with(&format!("{repo}@{revision}"), |f| fetcher.get(f))
            }
            Self::GgufFile(path) => Ok(gguf_files(path.display().to_string(), path.clone())),
            Self::HubGguf { repo, revision, file } => {
                let fetcher = HubFetcher::new(repo, revision)?;
                let origin = format!("{repo}@{revision}");
                let path = fetcher.get(file)?.ok_or_else(|| EngineError::MissingFile {
                    location: origin.clone(),
                    file: file.clone(),
                    hint: "the GGUF file named after the repository".into(),
                })?;
                Ok(gguf_files(format!("{origin}/{file}"), path))
            }
        }
    }
}

/// The files of a model that is one GGUF file.
fn gguf_files(origin: String, path: PathBuf) -> CheckpointFiles {
    CheckpointFiles {
        origin,
        config: path.clone(),
        generation_config: None,
        tokenizer: path.clone(),
        tokenizer_config: None,
        weights: Vec::new(),
        gguf: Some(path),
    }
}

/// Resolves the checkpoint's files with `get`, which returns `Ok(None)` for a file that does not
/// exist in the checkpoint.
fn resolve_with(
    origin: &str,
    get: impl Fn(&str) -> Result<Option<PathBuf>>,
) -> Result<CheckpointFiles> {
    let missing = |file: &str, hint: &str| EngineError::MissingFile {
        location: origin.to_string(),
        file: file.to_string(),
        hint: hint.to_string(),
    };
    let config = get("config.json")?
        .ok_or_else(|| missing("config.json", "the model's architecture settings"))?;
    let tokenizer = match get("tokenizer.json")? {
        Some(p) => p,
        None => get(crate::tiktoken::CL100K_FILE_NAME)?.ok_or_else(|| {
            missing(
                "tokenizer.json (or cl100k_base.tiktoken)",
                "the Hugging Face fast tokenizer file, or Phi-3-small's tiktoken ranks file",
            )
        })?,
    };
    let tokenizer_config = get("tokenizer_config.json")?;
    let generation_config = get("generation_config.json")?;

    let weights = if let Some(index) = get("model.safetensors.index.json")? {
        let shards = shard_names(&index)?;
        let mut paths = Vec::with_capacity(shards.len());
        for shard in shards {
            let p = get(&shard)?
                .ok_or_else(|| missing(&shard, "a shard listed in model.safetensors.index.json"))?;
            paths.push(p);
        }
        paths
    } else if let Some(single) = get("model.safetensors")? {
        vec![single]
    } else {
        return Err(missing(
            "model.safetensors (or model.safetensors.index.json)",
            "the weights; .bin checkpoints are not supported, convert them to safetensors",
        ));
    };
    Ok(CheckpointFiles {
        origin: origin.to_string(),
        config,
        generation_config,
        tokenizer,
        tokenizer_config,
        weights,
        gguf: None,
    })
}

/// The distinct shard file names of a `model.safetensors.index.json`, in first-seen order.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| EngineError::Io { path: index.to_path_buf(), source: e })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| EngineError::Config {
        path: index.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| {
        EngineError::Config { path: index.to_path_buf(), message: "no `weight_map` object".into() }
    })?;
    let mut names: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| EngineError::Config {
            path: index.to_path_buf(),
            message: format!("weight_map value {file} is not a file name"),
        })?;
        if file.contains("..") || file.starts_with('/') {
            return Err(EngineError::Config {
                path: index.to_path_buf(),
                message: format!("shard name `{file}` escapes the model folder"),
            });
        }
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    if names.is_empty() {
        return Err(EngineError::Config {
            path: index.to_path_buf(),
            message: "`weight_map` lists no tensors".into(),
        });
    }
    Ok(names)
}

/// Fetches files of one hub repository through the standard cache.
struct HubFetcher {
    repo: hf_hub::Repo,
    cache: hf_hub::Cache,
    api: Option<hf_hub::api::sync::ApiRepo>,
    label: String,
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

impl HubFetcher {
    fn new(repo_id: &str, revision: &str) -> Result<Self> {
        let repo = hf_hub::Repo::with_revision(
            repo_id.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        );
        let cache = hf_hub::Cache::from_env();
        let offline = env_flag("HF_HUB_OFFLINE");
        let api = if offline {
            None
        } else {
            let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or(cache.token());
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_token(token)
                .with_progress(std::io::stderr().is_terminal())
                .build()
                .map_err(|e| {
                    EngineError::Hub(format!("cannot set up the Hugging Face client: {e}"))
                })?;
            Some(api.repo(repo.clone()))
        };
        Ok(Self { repo, cache, api, label: format!("{repo_id}@{revision}") })
    }

    /// `Ok(None)` when the repository has no such file; an error when the hub cannot be reached.
    fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cache.repo(self.repo.clone()).get(file) {
            return Ok(Some(p));
        }
        let Some(api) = &self.api else {
            // Offline: a file that is not cached is treated as absent, so the error names it.
            return Ok(None);
        };
        match api.get(file) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e))
                if matches!(*e, ureq::Error::Status(404, _)) =>
            {
                Ok(None)
            }
            Err(e) => Err(EngineError::Hub(format!(
                "{}: cannot download {file}: {e} (set HF_TOKEN for gated repositories, or \
                 HF_HUB_OFFLINE=1 to use only the local cache)",
                self.label
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_parsed() {
        assert_eq!(
            ModelSource::parse("microsoft/Phi-3-mini-4k-instruct", None).unwrap(),
            ModelSource::Hub {
                repo: "microsoft/Phi-3-mini-4k-instruct".into(),
                revision: "main".into()
            }
        );
        assert!(ModelSource::parse("./no/such/dir", None).is_err());
        assert!(ModelSource::parse("nonsense", None).is_err());
        assert_eq!(
            ModelSource::parse(
                "microsoft/Phi-3-mini-4k-instruct-gguf/Phi-3-mini-4k-instruct-q4.gguf",
                Some("v1")
            )
            .unwrap(),
            ModelSource::HubGguf {
                repo: "microsoft/Phi-3-mini-4k-instruct-gguf".into(),
                revision: "v1".into(),
                file: "Phi-3-mini-4k-instruct-q4.gguf".into(),
            }
        );
        assert!(ModelSource::parse("owner/repo/../x.gguf", None).is_err());
        let file = std::env::temp_dir().join(format!("phi-parse-{}.gguf", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        assert_eq!(
            ModelSource::parse(file.to_str().unwrap(), None).unwrap(),
            ModelSource::GgufFile(file.clone())
        );
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn offline_hub_miss_names_the_file() {
        let dir = std::env::temp_dir().join(format!("phi-hf-home-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Only this test touches these variables in this process.
        std::env::set_var("HF_HOME", &dir);
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let err = ModelSource::parse("microsoft/Phi-3-mini-4k-instruct", Some("main"))
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("microsoft/Phi-3-mini-4k-instruct"),
            "{err}"
        );
    }
}
