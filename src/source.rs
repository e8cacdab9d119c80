//! Where a model and a hub corpus come from. `--model` is one of:
//! - a GGUF file (`models/SmolLM2-135M-Instruct.Q4_1.gguf`; any file that starts with the GGUF
//!   magic);
//! - a local Hugging Face model folder: `config.json`, the weights as `model.safetensors` or as
//!   the shards listed by `model.safetensors.index.json`, `tokenizer.json` and, optionally,
//!   `tokenizer_config.json`;
//! - a name from the registry `models.toml` (`gemma3-270m`: [`crate::registry`]) when no such
//!   path exists;
//! - a hub id `ORG/NAME[@REVISION]` (revision `main` by default; a branch, a tag or a 40-hex
//!   commit) when no such path exists, resolved through the standard Hugging Face cache.
//!
//! `--corpus hf:ORG/NAME[@REVISION]` names a hub dataset repo: its `.parquet` files, in the order
//! of their paths in the repo (`data/test-00000-of-00002.parquet` first).
//!
//! The cache ([`HubSettings::from_env`]) is the one `huggingface_hub` uses: `HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`; a repo lives in `models--ORG--NAME` (datasets:
//! `datasets--ORG--NAME`), with `refs/<revision>` holding a commit hash and the files under
//! `snapshots/<commit>/`. Online, the hub is asked which commit the revision is and the missing
//! files are downloaded into that cache (with `HF_TOKEN` for gated repos); if the hub cannot be
//! reached, the cached snapshot is used. With `HF_HUB_OFFLINE=1` only the cache is read.
//!
//! ```no_run
//! use streamppl::source::{HubSettings, ModelFiles, resolve_model};
//! let model = resolve_model("HuggingFaceTB/SmolLM2-135M", &HubSettings::from_env()).unwrap();
//! if let ModelFiles::HuggingFace(files) = &model.files {
//!     println!("{}: {} weight file(s)", model.source, files.weights.len());
//! }
//! ```

use crate::one_line;
use std::collections::HashSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::{Deserialize, Serialize};

use crate::model::gguf::{ModelError, check_model_file};

pub const CONFIG: &str = "config.json";
pub const SINGLE_WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// The prefix that makes a `--corpus` argument a hub dataset rather than a path.
pub const DATASET_PREFIX: &str = "hf:";

/// Where a model came from, as run records name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSource {
    Gguf {
        path: PathBuf,
    },
    Folder {
        path: PathBuf,
    },
    /// `folder` is the snapshot folder the files were read from.
    Hub {
        id: String,
        revision: String,
        commit: String,
        folder: PathBuf,
    },
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ModelSource::Gguf { path } => write!(f, "GGUF file {}", path.display()),
            ModelSource::Folder { path } => write!(f, "model folder {}", path.display()),
            ModelSource::Hub {
                id,
                revision,
                commit,
                ..
            } => write!(f, "hub model {id}@{revision} (commit {commit})"),
        }
    }
}

/// The files of a Hugging Face model folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfModelFiles {
    pub folder: PathBuf,
    pub config: PathBuf,
    /// `model.safetensors`, or every shard of `model.safetensors.index.json` once, sorted.
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    Gguf(PathBuf),
    HuggingFace(HfModelFiles),
}

/// A `--model` argument resolved to files on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub source: ModelSource,
    pub files: ModelFiles,
}

/// A `--corpus hf:...` argument resolved to the dataset's parquet files on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDataset {
    pub id: String,
    pub revision: String,
    pub commit: String,
    /// The snapshot folder the files are in.
    pub folder: PathBuf,
    /// The `.parquet` files, sorted by their path in the repo.
    pub files: Vec<PathBuf>,
}

/// How hub ids are resolved: which cache, whether the network may be used, and the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The hub cache folder (the one holding `models--ORG--NAME`).
    pub cache: PathBuf,
    /// Read only the cache, never the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Sent to the hub, for gated and private repos.
    pub token: Option<String>,
    /// The hub's address, when not the default (`HF_ENDPOINT`, for mirrors).
    pub endpoint: Option<String>,
}

impl HubSettings {
    /// The settings `huggingface_hub` reads from the environment: the cache from `HF_HUB_CACHE`
    /// (or its old name `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE`
    /// (1, ON, YES or TRUE); the token from `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else
    /// `HF_HOME/token` (where `huggingface-cli login` writes it); `HF_ENDPOINT`.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] over any variable lookup (tests pass their own).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        let home = || {
            var("HOME")
                .map(PathBuf::from)
                .or_else(std::env::home_dir)
                .unwrap_or_default()
        };
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home().join(".cache"))
                .join("huggingface")
        });
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            ["1", "ON", "YES", "TRUE"].contains(&v.trim().to_ascii_uppercase().as_str())
        });
        let token_file = || match var("HF_TOKEN_PATH") {
            Some(path) => std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
            // hf-hub reads `<cache>/../token`, which is HF_HOME/token for the default layout.
            None => Cache::new(hf_home.join("hub")).token(),
        };
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(token_file);
        HubSettings {
            cache,
            offline,
            token,
            endpoint: var("HF_ENDPOINT"),
        }
    }
}

/// A model repo or a dataset repo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubRepoKind {
    Model,
    Dataset,
}

impl HubRepoKind {
    fn repo_type(self) -> RepoType {
        match self {
            HubRepoKind::Model => RepoType::Model,
            HubRepoKind::Dataset => RepoType::Dataset,
        }
    }
}

impl fmt::Display for HubRepoKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            HubRepoKind::Model => "model",
            HubRepoKind::Dataset => "dataset",
        })
    }
}

/// A repo on the hub at a revision: `ORG/NAME[@REVISION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub kind: HubRepoKind,
    pub id: String,
    pub revision: String,
}

impl HubSpec {
    /// Parses `ORG/NAME[@REVISION]` with the hub's rules for names: letters, digits, `-`, `_`
    /// and `.`, neither `--` nor `..`, not starting or ending with `-` or `.`, 96 characters at
    /// most.
    pub fn parse(kind: HubRepoKind, spec: &str) -> Result<Self, String> {
        let (id, revision) = match spec.split_once('@') {
            Some((_, "")) => return Err("the revision after `@` is empty".into()),
            Some((id, revision)) => (id, revision),
            None => (spec, "main"),
        };
        let Some((org, name)) = id.split_once('/') else {
            return Err("it has no `/` between ORG and NAME".into());
        };
        for part in [org, name] {
            let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
            let edge = |c: char| c == '-' || c == '.';
            let ok = !part.is_empty()
                && part.len() <= 96
                && part.chars().all(allowed)
                && !part.starts_with(edge)
                && !part.ends_with(edge)
                && !part.contains("--")
                && !part.contains("..");
            if !ok {
                return Err(format!(
                    "`{part}` is not a hub name (letters, digits, -, _ and . only)"
                ));
            }
        }
        Ok(HubSpec {
            kind,
            id: id.to_string(),
            revision: revision.to_string(),
        })
    }

    fn repo(&self, revision: &str) -> Repo {
        Repo::with_revision(self.id.clone(), self.kind.repo_type(), revision.to_string())
    }

    /// `<cache>/models--ORG--NAME` (or `datasets--...`), hf-hub's layout.
    fn cache_folder(&self, cache: &Path) -> PathBuf {
        cache.join(self.repo(&self.revision).folder_name())
    }

    /// The command that puts this repo into a cache, for error messages.
    fn download_command(&self) -> String {
        let mut command = format!("huggingface-cli download {}", self.id);
        if self.kind == HubRepoKind::Dataset {
            command.push_str(" --repo-type dataset");
        }
        if self.revision != "main" {
            command.push_str(&format!(" --revision {}", self.revision));
        }
        command
    }
}

/// Why a model or dataset could not be resolved; every message is one line naming the input and
/// the fix.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(
        "{} is a folder; give the model file (a .gguf) or a Hugging Face model folder (config.json, model.safetensors or model.safetensors.index.json, tokenizer.json)",
        .path.display()
    )]
    NotAModelFolder { path: PathBuf },
    #[error("{}: no {file}; {fix}", .folder.display())]
    MissingFile {
        folder: PathBuf,
        file: &'static str,
        fix: &'static str,
    },
    #[error(
        "{}: neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX}; streamppl reads safetensors weights (save them with `model.save_pretrained(DIR, safe_serialization=True)`)",
        .folder.display()
    )]
    NoWeights { folder: PathBuf },
    #[error("{}: {why}; re-download it or write it again with `save_pretrained`", .path.display())]
    BadIndex { path: PathBuf, why: String },
    #[error(
        "{}: shard {shard} listed in {WEIGHTS_INDEX} is missing; download every shard (e.g. `huggingface-cli download ORG/NAME`) or fix the index",
        .folder.display()
    )]
    MissingShard { folder: PathBuf, shard: String },
    #[error("`{spec}`: not a hub {kind} id ({why}); write {example}")]
    BadHubId {
        kind: HubRepoKind,
        spec: String,
        why: String,
        example: &'static str,
    },
    #[error(
        "{} {}@{} is not in the Hugging Face cache (searched {}; {why}); run `{}` on a machine with network and copy its cache here, or set HF_HUB_CACHE to a cache that has it",
        .spec.kind, .spec.id, .spec.revision, .searched.display(), .spec.download_command()
    )]
    NotCached {
        spec: HubSpec,
        searched: PathBuf,
        why: String,
    },
    #[error("{} {}@{}: the hub answered HTTP {status}; {fix}", .spec.kind, .spec.id, .spec.revision)]
    HubRefused {
        spec: HubSpec,
        status: u16,
        fix: &'static str,
    },
    #[error(
        "{} {}@{}: {what} failed ({why}); run again, or put it in the cache with `{}`",
        .spec.kind, .spec.id, .spec.revision, .spec.download_command()
    )]
    Hub {
        spec: HubSpec,
        what: String,
        why: String,
    },
    #[error(
        "dataset {}@{} has no .parquet files (in {}); use a dataset repo with parquet files, e.g. the hub's own conversion: hf:{}@refs/convert/parquet",
        .spec.id, .spec.revision, .folder.display(), .spec.id
    )]
    NoParquet { spec: HubSpec, folder: PathBuf },
    #[error("{}: cannot read ({why}); check that it exists and is readable", .path.display())]
    Io { path: PathBuf, why: String },
    #[error("model `{name}` is not fetched ({} is missing); run {fetch}", .path.display())]
    NotFetched {
        name: String,
        path: PathBuf,
        fetch: String,
    },
}

type Result<T, E = SourceError> = std::result::Result<T, E>;

/// Resolves a `--model` argument (see the module docs for the three forms). A path that exists
/// is a file or a folder, never a hub id; a missing path is a hub id when it reads as one.
pub fn resolve_model(arg: &str, hub: &HubSettings) -> Result<ResolvedModel> {
    let path = Path::new(arg);
    if !path.exists()
        && let Some(entry) = crate::registry::lookup(arg)
    {
        if !entry.path.exists() {
            return Err(SourceError::NotFetched {
                name: arg.into(),
                path: entry.path,
                fetch: entry.fetch,
            });
        }
        return resolve_model(&entry.path.to_string_lossy(), hub);
    }
    if !path.exists()
        && !reads_as_path(arg)
        && let Ok(spec) = HubSpec::parse(HubRepoKind::Model, arg)
    {
        return resolve_hub_model(&spec, hub);
    }
    if path.is_dir() {
        if !path.join(CONFIG).is_file() {
            return Err(SourceError::NotAModelFolder { path: path.into() });
        }
        return Ok(ResolvedModel {
            source: ModelSource::Folder { path: path.into() },
            files: ModelFiles::HuggingFace(model_folder_files(path)?),
        });
    }
    check_model_file(path)?;
    Ok(ResolvedModel {
        source: ModelSource::Gguf { path: path.into() },
        files: ModelFiles::Gguf(path.into()),
    })
}

/// Spellings that only a path has, so a missing one is reported as a missing file.
fn reads_as_path(arg: &str) -> bool {
    let lower = arg.to_ascii_lowercase();
    arg.starts_with(['/', '.', '~']) || lower.ends_with(".gguf") || lower.ends_with(".safetensors")
}

/// The files of a Hugging Face model folder, each checked to exist.
pub fn model_folder_files(folder: &Path) -> Result<HfModelFiles> {
    let config = folder.join(CONFIG);
    if !config.is_file() {
        return Err(SourceError::NotAModelFolder {
            path: folder.into(),
        });
    }
    let tokenizer = folder.join(TOKENIZER);
    if !tokenizer.is_file() {
        return Err(SourceError::MissingFile {
            folder: folder.into(),
            file: TOKENIZER,
            fix: "streamppl reads fast tokenizers; write one with `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`",
        });
    }
    let tokenizer_config = Some(folder.join(TOKENIZER_CONFIG)).filter(|p| p.is_file());
    Ok(HfModelFiles {
        folder: folder.into(),
        config,
        weights: weight_files(folder)?,
        tokenizer,
        tokenizer_config,
    })
}

/// `model.safetensors`, or the shards of the index, each once, in file-name order.
fn weight_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let index = folder.join(WEIGHTS_INDEX);
    if !index.is_file() {
        let single = folder.join(SINGLE_WEIGHTS);
        return match single.is_file() {
            true => Ok(vec![single]),
            false => Err(SourceError::NoWeights {
                folder: folder.into(),
            }),
        };
    }
    shard_names(&index)?
        .into_iter()
        .map(|shard| {
            let path = folder.join(&shard);
            match path.is_file() {
                true => Ok(path),
                false => Err(SourceError::MissingShard {
                    folder: folder.into(),
                    shard,
                }),
            }
        })
        .collect()
}

/// The distinct files named by an index's `weight_map`, sorted (`model-00001-of-00002...`
/// first). Names that would leave the folder are refused.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let bad = |why: String| SourceError::BadIndex {
        path: index.into(),
        why,
    };
    let text = std::fs::read_to_string(index).map_err(|e| SourceError::Io {
        path: index.into(),
        why: one_line(e),
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON ({})", one_line(e))))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(bad("no `weight_map` object".into()));
    };
    let mut names = Vec::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(bad(format!("`weight_map.{tensor}` is not a file name")));
        };
        let inside = Path::new(file)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !inside || file.is_empty() {
            return Err(bad(format!(
                "shard `{file}` is not a file name inside the folder"
            )));
        }
        names.push(file.to_string());
    }
    if names.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// A hub model: its snapshot in the cache (downloaded first unless offline), then its files.
fn resolve_hub_model(spec: &HubSpec, hub: &HubSettings) -> Result<ResolvedModel> {
    let snapshot = snapshot(spec, hub, download_model_files)?;
    let files = model_folder_files(&snapshot.folder)?;
    Ok(ResolvedModel {
        source: ModelSource::Hub {
            id: spec.id.clone(),
            revision: spec.revision.clone(),
            commit: snapshot.commit,
            folder: snapshot.folder,
        },
        files: ModelFiles::HuggingFace(files),
    })
}

/// Resolves `hf:ORG/NAME[@REVISION]` (a hub dataset repo) to its `.parquet` files, sorted by
/// their path in the repo, e.g. `data/test-00000-of-00002.parquet` before
/// `data/test-00001-of-00002.parquet`. Offline, the cached snapshot is listed; online, the repo's
/// parquet files are downloaded into the cache first.
pub fn resolve_dataset(spec: &str, hub: &HubSettings) -> Result<ResolvedDataset> {
    let bad_id = |why: String| SourceError::BadHubId {
        kind: HubRepoKind::Dataset,
        spec: spec.to_string(),
        why,
        example: "hf:ORG/NAME or hf:ORG/NAME@REVISION, e.g. hf:emozilla/pg19-test",
    };
    let Some(id) = spec.strip_prefix(DATASET_PREFIX) else {
        return Err(bad_id(format!("it does not start with `{DATASET_PREFIX}`")));
    };
    let spec = HubSpec::parse(HubRepoKind::Dataset, id).map_err(bad_id)?;
    let snapshot = snapshot(&spec, hub, download_parquet_files)?;
    let files = parquet_files(&snapshot.folder)?;
    if files.is_empty() {
        return Err(SourceError::NoParquet {
            spec,
            folder: snapshot.folder,
        });
    }
    Ok(ResolvedDataset {
        id: spec.id,
        revision: spec.revision,
        commit: snapshot.commit,
        folder: snapshot.folder,
        files,
    })
}

/// The `.parquet` files under a snapshot folder, sorted by their path relative to it.
fn parquet_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let mut pending = vec![folder.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let io = |e: std::io::Error| SourceError::Io {
            path: dir.clone(),
            why: one_line(e),
        };
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") && path.is_file() {
                let relative = path.strip_prefix(folder).unwrap_or(&path);
                let in_repo: Vec<_> = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect();
                found.push((in_repo.join("/"), path));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// A repo's files at one commit, in the cache.
struct Snapshot {
    commit: String,
    folder: PathBuf,
}

/// Why asking the hub did not give a snapshot.
enum FetchError {
    /// No answer at all (no network, DNS, TLS): the cache may still have the repo.
    Unreachable(String),
    Failed(SourceError),
}

/// Downloads the files a repo needs into its snapshot folder, given the repo's file list.
type Downloader = fn(&Fetcher, &HashSet<String>) -> Result<(), FetchError>;

/// The snapshot of `spec`: fetched from the hub unless offline (falling back to the cache when
/// the hub cannot be reached), else from the cache.
fn snapshot(spec: &HubSpec, hub: &HubSettings, download: Downloader) -> Result<Snapshot> {
    let why = match hub.offline {
        true => "HF_HUB_OFFLINE is set, so the hub was not asked".to_string(),
        false => match fetch_snapshot(spec, hub, download) {
            Ok(snapshot) => return Ok(snapshot),
            Err(FetchError::Failed(e)) => return Err(e),
            Err(FetchError::Unreachable(why)) => format!("the hub is unreachable: {why}"),
        },
    };
    cached_snapshot(spec, &hub.cache).ok_or_else(|| SourceError::NotCached {
        spec: spec.clone(),
        searched: spec.cache_folder(&hub.cache),
        why,
    })
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The cached snapshot of `spec`: a 40-hex revision is the commit itself; any other revision is
/// looked up in `refs/<revision>`.
fn cached_snapshot(spec: &HubSpec, cache: &Path) -> Option<Snapshot> {
    let repo_folder = spec.cache_folder(cache);
    let commit = match is_commit_hash(&spec.revision) {
        true => spec.revision.clone(),
        false => std::fs::read_to_string(repo_folder.join("refs").join(&spec.revision))
            .ok()?
            .trim()
            .to_string(),
    };
    let folder = repo_folder.join("snapshots").join(&commit);
    folder.is_dir().then_some(Snapshot { commit, folder })
}

/// Downloads into one snapshot folder, skipping files it already has.
struct Fetcher {
    spec: HubSpec,
    /// The repo pinned at the commit, so every file comes from the same one.
    pinned: ApiRepo,
    folder: PathBuf,
}

impl Fetcher {
    fn get(&self, file: &str) -> Result<PathBuf, FetchError> {
        let path = self.folder.join(file);
        if path.is_file() {
            return Ok(path);
        }
        self.pinned
            .download(file)
            .map_err(|e| fetch_error(&self.spec, format!("downloading {file}"), e))
    }
}

/// Asks the hub for the revision's commit and file list, downloads what `download` picks, and
/// points `refs/<revision>` at the commit.
fn fetch_snapshot(
    spec: &HubSpec,
    hub: &HubSettings,
    download: Downloader,
) -> Result<Snapshot, FetchError> {
    let mut builder = ApiBuilder::from_cache(Cache::new(hub.cache.clone()))
        .with_token(hub.token.clone())
        .with_progress(true);
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder
        .build()
        .map_err(|e| fetch_error(spec, "starting the hub client".into(), e))?;
    let info = api
        .repo(spec.repo(&spec.revision))
        .info()
        .map_err(|e| fetch_error(spec, "asking the hub for the repo's files".into(), e))?;
    let fetcher = Fetcher {
        spec: spec.clone(),
        pinned: api.repo(spec.repo(&info.sha)),
        folder: spec
            .cache_folder(&hub.cache)
            .join("snapshots")
            .join(&info.sha),
    };
    let listed: HashSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    download(&fetcher, &listed)?;
    if spec.revision != info.sha {
        Cache::new(hub.cache.clone())
            .repo(spec.repo(&spec.revision))
            .create_ref(&info.sha)
            .map_err(|e| {
                FetchError::Failed(SourceError::Io {
                    path: spec.cache_folder(&hub.cache).join("refs"),
                    why: one_line(e),
                })
            })?;
    }
    Ok(Snapshot {
        commit: info.sha,
        folder: fetcher.folder,
    })
}

/// A model's config, tokenizer files and weights (the index and every shard it lists).
fn download_model_files(fetcher: &Fetcher, listed: &HashSet<String>) -> Result<(), FetchError> {
    for file in [CONFIG, TOKENIZER, TOKENIZER_CONFIG] {
        if listed.contains(file) {
            fetcher.get(file)?;
        }
    }
    if listed.contains(WEIGHTS_INDEX) {
        let index = fetcher.get(WEIGHTS_INDEX)?;
        for shard in shard_names(&index).map_err(FetchError::Failed)? {
            fetcher.get(&shard)?;
        }
    } else if listed.contains(SINGLE_WEIGHTS) {
        fetcher.get(SINGLE_WEIGHTS)?;
    }
    Ok(())
}

/// Every `.parquet` file of a dataset repo.
fn download_parquet_files(fetcher: &Fetcher, listed: &HashSet<String>) -> Result<(), FetchError> {
    let mut files: Vec<&String> = listed.iter().filter(|f| f.ends_with(".parquet")).collect();
    files.sort();
    for file in files {
        fetcher.get(file)?;
    }
    Ok(())
}

/// Sorts hf-hub's errors into "no answer" (the cache may do) and a refusal or failure.
fn fetch_error(spec: &HubSpec, what: String, error: ApiError) -> FetchError {
    match error {
        ApiError::TooManyRetries(inner) => fetch_error(spec, what, *inner),
        ApiError::RequestError(request) => match *request {
            ureq::Error::Transport(transport) => FetchError::Unreachable(one_line(transport)),
            ureq::Error::Status(status, _) => FetchError::Failed(SourceError::HubRefused {
                spec: spec.clone(),
                status,
                fix: refusal_fix(status),
            }),
        },
        other => FetchError::Failed(SourceError::Hub {
            spec: spec.clone(),
            what,
            why: one_line(other),
        }),
    }
}

fn refusal_fix(status: u16) -> &'static str {
    match status {
        401 => {
            "no such repo, or it is gated or private: check the id, and for gated repos set HF_TOKEN (or run `huggingface-cli login`) with a token that has access"
        }
        403 => {
            "the token has no access to this gated or private repo: request access on its hub page, or set HF_TOKEN to a token that has it"
        }
        404 => "no such repo or revision: check the id and the revision",
        429 => "too many requests: wait a minute and run again",
        _ => "run again later, or put the repo in the cache with `huggingface-cli download`",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn cache_folder_follows_the_huggingface_hub_precedence() {
        let from = |pairs: &[(&str, &str)]| HubSettings::from_vars(vars(pairs)).cache;
        let home = [("HOME", "/home/u")];
        assert_eq!(from(&home), Path::new("/home/u/.cache/huggingface/hub"));
        assert_eq!(
            from(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/x")]),
            Path::new("/x/huggingface/hub")
        );
        assert_eq!(
            from(&[
                ("HOME", "/home/u"),
                ("XDG_CACHE_HOME", "/x"),
                ("HF_HOME", "/h")
            ]),
            Path::new("/h/hub")
        );
        assert_eq!(
            from(&[("HF_HOME", "/h"), ("HF_HUB_CACHE", "/c")]),
            Path::new("/c")
        );
        assert_eq!(
            from(&[("HF_HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "/old")]),
            Path::new("/old")
        );
        assert_eq!(
            from(&[("HF_HOME", "/h"), ("HF_HUB_CACHE", "")]),
            Path::new("/h/hub"),
            "an empty variable counts as unset"
        );
    }

    #[test]
    fn offline_token_and_endpoint_come_from_their_variables() {
        let from = |pairs: &[(&str, &str)]| HubSettings::from_vars(vars(pairs));
        for (value, offline) in [("1", true), ("true", true), ("ON", true), ("0", false)] {
            assert_eq!(
                from(&[("HF_HOME", "/nonexistent"), ("HF_HUB_OFFLINE", value)]).offline,
                offline,
                "{value}"
            );
        }
        let base = [("HF_HOME", "/nonexistent")];
        assert!(!from(&base).offline);
        assert_eq!(from(&base).token, None);
        assert_eq!(from(&base).endpoint, None);
        let set = from(&[
            ("HF_HOME", "/nonexistent"),
            ("HF_TOKEN", "hf_abc"),
            ("HF_ENDPOINT", "https://mirror.example"),
        ]);
        assert_eq!(set.token.as_deref(), Some("hf_abc"));
        assert_eq!(set.endpoint.as_deref(), Some("https://mirror.example"));
    }

    #[test]
    fn the_token_file_is_read_when_hf_token_is_unset() {
        let home = std::env::temp_dir().join(format!("streamppl-hf-home-{}", std::process::id()));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("token"), "hf_from_file\n").unwrap();
        let home_str = home.to_str().unwrap();
        let settings = HubSettings::from_vars(vars(&[("HF_HOME", home_str)]));
        assert_eq!(settings.token.as_deref(), Some("hf_from_file"));
        let other = home.join("elsewhere");
        std::fs::write(&other, "hf_from_path").unwrap();
        let settings = HubSettings::from_vars(vars(&[
            ("HF_HOME", home_str),
            ("HF_TOKEN_PATH", other.to_str().unwrap()),
        ]));
        assert_eq!(settings.token.as_deref(), Some("hf_from_path"));
        let settings = HubSettings::from_vars(vars(&[("HF_HOME", home_str), ("HF_TOKEN", "env")]));
        assert_eq!(settings.token.as_deref(), Some("env"), "HF_TOKEN wins");
        std::fs::remove_dir_all(home).unwrap();
    }

    #[test]
    fn hub_ids_parse_with_the_hubs_rules() {
        let parse = |s| HubSpec::parse(HubRepoKind::Model, s);
        let spec = parse("meta-llama/Llama-2-7b-hf").unwrap();
        assert_eq!(
            (spec.id.as_str(), spec.revision.as_str()),
            ("meta-llama/Llama-2-7b-hf", "main")
        );
        let spec = parse("org/name@refs/pr/1").unwrap();
        assert_eq!(
            (spec.id.as_str(), spec.revision.as_str()),
            ("org/name", "refs/pr/1")
        );
        for bad in [
            "gpt2",
            "org/",
            "/name",
            "a/b/c",
            "org/na me",
            "org/-x",
            "org/a--b",
            "org/a..b",
            "org/name@",
        ] {
            let why = parse(bad).unwrap_err();
            assert!(!why.contains('\n'), "{bad}: {why}");
        }
    }

    #[test]
    fn paths_are_never_read_as_hub_ids() {
        let hub = HubSettings::from_vars(vars(&[
            ("HF_HUB_CACHE", "/nonexistent"),
            ("HF_HUB_OFFLINE", "1"),
        ]));
        for missing in ["/nonexistent/m.gguf", "models/missing.gguf", "./org/name"] {
            let e = resolve_model(missing, &hub).unwrap_err().to_string();
            assert!(e.contains("model file not found"), "{missing}: {e}");
        }
        let e = resolve_model("org/name", &hub).unwrap_err().to_string();
        assert!(e.contains("not in the Hugging Face cache"), "{e}");
    }

    #[test]
    fn shard_names_refuse_paths_that_leave_the_folder() {
        let dir = std::env::temp_dir().join(format!("streamppl-index-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let index = dir.join(WEIGHTS_INDEX);
        for (map, want) in [
            (r#"{"a": "../x.safetensors"}"#, "not a file name inside"),
            (r#"{"a": "/etc/passwd"}"#, "not a file name inside"),
            (r#"{"a": 3}"#, "is not a file name"),
            (r#"{}"#, "is empty"),
        ] {
            std::fs::write(&index, format!(r#"{{"weight_map": {map}}}"#)).unwrap();
            let e = shard_names(&index).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{map}: {e}");
        }
        std::fs::write(&index, "not json").unwrap();
        let e = shard_names(&index).unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
