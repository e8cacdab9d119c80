//! `--model` and `--corpus hf:...` sources: GGUF files, Hugging Face model folders, hub ids and
//! hub datasets through a hub cache laid out here as `huggingface_hub` lays it out
//! (`models--ORG--NAME/{refs/main, snapshots/<commit>/, blobs/}`), offline and against a small
//! fake hub served on localhost (the real one is never asked).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use streamppl::corpus::{Book, load_hub_dataset, write_pg19_parquet};
use streamppl::source::{
    HfModelFiles, HubSettings, ModelFiles, ModelSource, ResolvedModel, resolve_dataset,
    resolve_model,
};
use streamppl::tokenizer::TextTokenizer;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A fresh folder under the system temp dir, unique per call (tests run in parallel and
/// several build the same files).
fn temp_dir(name: &str) -> PathBuf {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "streamppl-sources-{}-{call}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn offline(cache: &Path) -> HubSettings {
    HubSettings {
        cache: cache.into(),
        offline: true,
        token: None,
        endpoint: None,
    }
}

/// A word-level tokenizer.json: enough for the tokenizer to load from the resolved files.
const TOKENIZER_JSON: &str = r#"{"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null, "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}}"#;

/// A real safetensors file holding one small tensor.
fn write_safetensors(path: &Path, name: &str) {
    let tensor = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([(name.to_string(), tensor)]), path).unwrap();
}

/// The files of a small model folder: config, single-file weights, tokenizer and its config.
fn model_files() -> Vec<(&'static str, Vec<u8>)> {
    let dir = temp_dir("weights-source");
    let weights = dir.join("model.safetensors");
    write_safetensors(&weights, "embed.weight");
    let files = vec![
        ("config.json", br#"{"model_type": "llama"}"#.to_vec()),
        ("model.safetensors", std::fs::read(&weights).unwrap()),
        ("tokenizer.json", TOKENIZER_JSON.as_bytes().to_vec()),
        (
            "tokenizer_config.json",
            br#"{"add_bos_token": false}"#.to_vec(),
        ),
    ];
    std::fs::remove_dir_all(dir).unwrap();
    files
}

/// Lays out `<cache>/<repo_folder>` as huggingface_hub does: each file a blob under `blobs/`,
/// symlinked from `snapshots/<commit>/`, and `refs/main` holding the commit.
fn lay_out_cache(cache: &Path, repo_folder: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let repo = cache.join(repo_folder);
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for (i, (name, bytes)) in files.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("blob{i}"));
        std::fs::write(&blob, bytes).unwrap();
        let link = snapshot.join(name);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = name.matches('/').count() + 2;
        let up = "../".repeat(depth);
        std::os::unix::fs::symlink(format!("{up}blobs/blob{i}"), &link).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    // huggingface_hub writes the hash without a newline; a hand-written ref often has one.
    std::fs::write(repo.join("refs/main"), format!("{COMMIT}\n")).unwrap();
    snapshot
}

fn assert_one_line(message: &str, wants: &[&str]) {
    assert!(!message.contains('\n'), "multi-line: {message}");
    for want in wants {
        assert!(message.contains(want), "`{want}` missing: {message}");
    }
}

fn hf_files(model: &ResolvedModel) -> &HfModelFiles {
    match &model.files {
        ModelFiles::HuggingFace(files) => files,
        ModelFiles::Gguf(path) => panic!("resolved as GGUF {}", path.display()),
    }
}

#[test]
fn a_cached_hub_id_resolves_by_branch_and_by_commit_offline() {
    let cache = temp_dir("hub-model");
    let snapshot = lay_out_cache(&cache, "models--org--name", &model_files());
    for arg in ["org/name", "org/name@main", &format!("org/name@{COMMIT}")] {
        let model = resolve_model(arg, &offline(&cache)).unwrap();
        let revision = arg.split_once('@').map_or("main", |(_, r)| r);
        assert_eq!(
            model.source,
            ModelSource::Hub {
                id: "org/name".into(),
                revision: revision.into(),
                commit: COMMIT.into(),
                folder: snapshot.clone(),
            },
            "{arg}"
        );
        let files = hf_files(&model);
        assert_eq!(files.config, snapshot.join("config.json"));
        assert_eq!(files.weights, vec![snapshot.join("model.safetensors")]);
        assert_eq!(files.tokenizer, snapshot.join("tokenizer.json"));
        assert_eq!(
            files.tokenizer_config,
            Some(snapshot.join("tokenizer_config.json"))
        );
    }
    // The resolved files are real: the weights load, the tokenizer reads its config.
    let model = resolve_model("org/name", &offline(&cache)).unwrap();
    let tensors =
        candle_core::safetensors::load(&hf_files(&model).weights[0], &Device::Cpu).unwrap();
    assert_eq!(tensors["embed.weight"].dims(), &[2, 3]);
    let tok = TextTokenizer::for_resolved(&model).unwrap();
    assert_eq!(tok.encode("hello world").unwrap(), vec![1, 2]);
    assert!(!tok.bos_added());
    // run.json names the source.
    let json = serde_json::to_value(&model.source).unwrap();
    assert_eq!(json["kind"], "hub");
    assert_eq!(json["commit"], COMMIT);
    std::fs::remove_dir_all(cache).unwrap();
}

#[test]
fn an_uncached_hub_id_offline_is_one_line_naming_the_id_and_the_cache() {
    let cache = temp_dir("hub-uncached");
    lay_out_cache(&cache, "models--org--name", &model_files());
    let searched = cache.join("models--org--other").display().to_string();
    let e = resolve_model("org/other", &offline(&cache))
        .unwrap_err()
        .to_string();
    assert_one_line(
        &e,
        &[
            "model org/other@main",
            &searched,
            "HF_HUB_OFFLINE",
            "huggingface-cli download org/other",
            "HF_HUB_CACHE",
        ],
    );
    let e = resolve_model("org/name@v2", &offline(&cache))
        .unwrap_err()
        .to_string();
    assert_one_line(&e, &["org/name@v2", "--revision v2"]);
    // A ref whose snapshot is gone is not cached either.
    let other = format!("{:040x}", 7);
    let e = resolve_model(&format!("org/name@{other}"), &offline(&cache))
        .unwrap_err()
        .to_string();
    assert_one_line(&e, &["not in the Hugging Face cache"]);
    std::fs::remove_dir_all(cache).unwrap();
}

#[test]
fn a_sharded_folder_resolves_its_shards_once_in_order() {
    let dir = temp_dir("sharded");
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON).unwrap();
    let index = r#"{"metadata": {"total_size": 48}, "weight_map": {
        "lm_head.weight": "model-00002-of-00002.safetensors",
        "embed.weight": "model-00001-of-00002.safetensors",
        "norm.weight": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    write_safetensors(
        &dir.join("model-00001-of-00002.safetensors"),
        "embed.weight",
    );
    let arg = dir.to_str().unwrap();
    let e = resolve_model(arg, &offline(&dir)).unwrap_err().to_string();
    assert_one_line(
        &e,
        &[
            "shard model-00002-of-00002.safetensors",
            &dir.display().to_string(),
        ],
    );
    write_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        "lm_head.weight",
    );
    let model = resolve_model(arg, &offline(&dir)).unwrap();
    assert_eq!(model.source, ModelSource::Folder { path: dir.clone() });
    let files = hf_files(&model);
    assert_eq!(
        files.weights,
        vec![
            dir.join("model-00001-of-00002.safetensors"),
            dir.join("model-00002-of-00002.safetensors"),
        ]
    );
    assert_eq!(files.tokenizer_config, None);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn incomplete_folders_are_one_line_errors() {
    let dir = temp_dir("incomplete");
    let arg = dir.to_str().unwrap();
    let shown = dir.display().to_string();
    let e = resolve_model(arg, &offline(&dir)).unwrap_err().to_string();
    assert_one_line(&e, &[&shown, "is a folder", "config.json"]);
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    let e = resolve_model(arg, &offline(&dir)).unwrap_err().to_string();
    assert_one_line(&e, &[&shown, "no tokenizer.json", "save_pretrained"]);
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON).unwrap();
    let e = resolve_model(arg, &offline(&dir)).unwrap_err().to_string();
    assert_one_line(&e, &[&shown, "neither model.safetensors nor"]);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        "{\"weight_map\": 1}",
    )
    .unwrap();
    let e = resolve_model(arg, &offline(&dir)).unwrap_err().to_string();
    assert_one_line(
        &e,
        &["model.safetensors.index.json", "no `weight_map` object"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_gguf_path_resolves_as_gguf_and_other_files_are_refused() {
    let dir = temp_dir("gguf");
    let gguf = dir.join("tiny.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    let model = resolve_model(gguf.to_str().unwrap(), &offline(&dir)).unwrap();
    assert_eq!(model.source, ModelSource::Gguf { path: gguf.clone() });
    assert_eq!(model.files, ModelFiles::Gguf(gguf.clone()));
    // Any file that starts with the magic, whatever its name.
    let renamed = dir.join("weights.bin");
    std::fs::copy(&gguf, &renamed).unwrap();
    let model = resolve_model(renamed.to_str().unwrap(), &offline(&dir)).unwrap();
    assert_eq!(model.files, ModelFiles::Gguf(renamed));
    let text = dir.join("book.txt");
    std::fs::write(&text, "It was a dark night").unwrap();
    let e = resolve_model(text.to_str().unwrap(), &offline(&dir))
        .unwrap_err()
        .to_string();
    assert_one_line(&e, &["book.txt: not a GGUF file"]);
    let missing = dir.join("missing.gguf");
    let e = resolve_model(missing.to_str().unwrap(), &offline(&dir))
        .unwrap_err()
        .to_string();
    assert_one_line(&e, &["missing.gguf: model file not found"]);
    std::fs::remove_dir_all(dir).unwrap();
}

fn book(title: &str, text: &str) -> Book {
    Book {
        title: title.into(),
        url: None,
        publication_date: None,
        text: text.into(),
    }
}

/// Two PG19-schema parquet files (written out of order) and a README, as a dataset repo has.
fn dataset_files() -> Vec<(&'static str, Vec<u8>)> {
    let dir = temp_dir("parquet-source");
    let parquet = |name: &str, books: &[Book]| {
        let path = dir.join(name);
        write_pg19_parquet(books, &path).unwrap();
        std::fs::read(path).unwrap()
    };
    let files = vec![
        (
            "data/test-00001-of-00002.parquet",
            parquet("b.parquet", &[book("Third", "c")]),
        ),
        ("README.md", b"# a dataset".to_vec()),
        (
            "data/test-00000-of-00002.parquet",
            parquet("a.parquet", &[book("First", "a"), book("Second", "b")]),
        ),
    ];
    std::fs::remove_dir_all(dir).unwrap();
    files
}

#[test]
fn a_cached_hub_dataset_resolves_its_parquet_files_in_order() {
    let cache = temp_dir("hub-dataset");
    let snapshot = lay_out_cache(&cache, "datasets--org--books", &dataset_files());
    let want = vec![
        snapshot.join("data/test-00000-of-00002.parquet"),
        snapshot.join("data/test-00001-of-00002.parquet"),
    ];
    for spec in ["hf:org/books", &format!("hf:org/books@{COMMIT}")] {
        let dataset = resolve_dataset(spec, &offline(&cache)).unwrap();
        assert_eq!(dataset.files, want, "{spec}");
        assert_eq!(dataset.commit, COMMIT);
        let books = load_hub_dataset(spec, &offline(&cache)).unwrap();
        let titles: Vec<&str> = books.iter().map(|b| b.title.as_str()).collect();
        assert_eq!(titles, ["First", "Second", "Third"]);
    }
    let e = resolve_dataset("hf:org/other", &offline(&cache))
        .unwrap_err()
        .to_string();
    assert_one_line(
        &e,
        &[
            "dataset org/other@main",
            "datasets--org--other",
            "huggingface-cli download org/other --repo-type dataset",
        ],
    );
    let e = resolve_dataset("hf:books", &offline(&cache))
        .unwrap_err()
        .to_string();
    assert_one_line(&e, &["`hf:books`: not a hub dataset id", "hf:ORG/NAME"]);
    std::fs::remove_dir_all(cache).unwrap();
}

#[test]
fn an_unreachable_hub_falls_back_to_the_cache() {
    let cache = temp_dir("unreachable");
    lay_out_cache(&cache, "models--org--name", &model_files());
    // Port 0 cannot be connected to: the connection fails at once, and no other test's fake
    // hub can be listening there.
    let hub = HubSettings {
        offline: false,
        endpoint: Some("http://127.0.0.1:0".into()),
        ..offline(&cache)
    };
    let model = resolve_model("org/name", &hub).unwrap();
    assert!(matches!(model.source, ModelSource::Hub { commit, .. } if commit == COMMIT));
    let e = resolve_model("org/other", &hub).unwrap_err().to_string();
    assert_one_line(&e, &["org/other@main", "the hub is unreachable"]);
    std::fs::remove_dir_all(cache).unwrap();
}

/// What a fake hub saw: each request's path and Authorization header.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A hub on localhost serving one repo (`route` is `models/org/name` or `datasets/org/name`)
/// at commit `sha`, as huggingface.co answers hf-hub: the repo info at `/api/<route>/revision/*`
/// and each file at `/<org/name or datasets/org/name>/resolve/<sha>/<file>`, with ranges.
/// `refuse` answers every request with that status instead.
fn fake_hub(route: &str, files: Vec<(&str, Vec<u8>)>, refuse: Option<u16>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let route = route.to_string();
    let files: HashMap<String, Vec<u8>> = files
        .into_iter()
        .map(|(name, bytes)| (name.to_string(), bytes))
        .collect();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let path = request.split(' ').nth(1).unwrap_or_default().to_string();
            let (mut range, mut auth) = (None, None);
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let Some((name, value)) = line.trim_end().split_once(": ") else {
                    break;
                };
                match name.to_ascii_lowercase().as_str() {
                    "range" => range = Some(value.to_string()),
                    "authorization" => auth = Some(value.to_string()),
                    _ => {}
                }
            }
            log.lock().unwrap().push((path.clone(), auth));
            let reply = fake_hub_reply(&route, &files, &path, range.as_deref(), refuse);
            stream.write_all(&reply).unwrap();
        }
    });
    (address, seen)
}

fn fake_hub_reply(
    route: &str,
    files: &HashMap<String, Vec<u8>>,
    path: &str,
    range: Option<&str>,
    refuse: Option<u16>,
) -> Vec<u8> {
    let respond = |status: &str, headers: &str, body: &[u8]| {
        let mut reply = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
            body.len()
        )
        .into_bytes();
        reply.extend_from_slice(body);
        reply
    };
    if let Some(status) = refuse {
        return respond(&format!("{status} Refused"), "", b"{}");
    }
    if path.starts_with(&format!("/api/{route}/revision/")) {
        let siblings: Vec<_> = files
            .keys()
            .map(|f| serde_json::json!({"rfilename": f}))
            .collect();
        let info = serde_json::json!({"sha": COMMIT, "siblings": siblings});
        return respond("200 OK", "", info.to_string().as_bytes());
    }
    let repo = route.strip_prefix("models/").unwrap_or(route);
    let prefix = format!("/{repo}/resolve/{COMMIT}/");
    let Some(bytes) = path.strip_prefix(&prefix).and_then(|f| files.get(f)) else {
        return respond("404 Not Found", "", b"{}");
    };
    let start: usize = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end = match range.is_some_and(|r| r.ends_with("-0")) {
        true => 1,
        false => bytes.len(),
    };
    let headers = format!(
        "ETag: \"etag{}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Range: bytes {start}-{}/{}\r\n",
        path.replace('/', "-"),
        end.max(1) - 1,
        bytes.len()
    );
    respond("206 Partial Content", &headers, &bytes[start..end])
}

#[test]
fn online_a_hub_id_is_downloaded_into_the_cache_then_found_offline() {
    let cache = temp_dir("download-model");
    let files = model_files();
    let (endpoint, seen) = fake_hub("models/org/name", files.clone(), None);
    let hub = HubSettings {
        cache: cache.clone(),
        offline: false,
        token: Some("hf_secret".into()),
        endpoint: Some(endpoint),
    };
    let model = resolve_model("org/name", &hub).unwrap();
    let snapshot = cache.join("models--org--name/snapshots").join(COMMIT);
    assert_eq!(
        model.source,
        ModelSource::Hub {
            id: "org/name".into(),
            revision: "main".into(),
            commit: COMMIT.into(),
            folder: snapshot.clone(),
        }
    );
    for (name, bytes) in &files {
        assert_eq!(
            &std::fs::read(snapshot.join(name)).unwrap(),
            bytes,
            "{name}"
        );
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen[0].0.starts_with("/api/models/org/name/revision/main"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|(_, auth)| auth.as_deref() == Some("Bearer hf_secret")),
        "the token goes with every request: {seen:?}"
    );
    // The cache is now as huggingface_hub leaves it: offline finds the same files.
    let again = resolve_model("org/name", &offline(&cache)).unwrap();
    assert_eq!(again, model);
    // A second online resolution downloads nothing: only the repo info is asked.
    let (endpoint, seen) = fake_hub("models/org/name", files, None);
    let hub = HubSettings {
        endpoint: Some(endpoint),
        ..hub
    };
    assert_eq!(resolve_model("org/name", &hub).unwrap(), model);
    assert_eq!(seen.lock().unwrap().len(), 1, "{:?}", seen.lock().unwrap());
    std::fs::remove_dir_all(cache).unwrap();
}

#[test]
fn online_a_hub_dataset_downloads_only_its_parquet_files() {
    let cache = temp_dir("download-dataset");
    let (endpoint, _) = fake_hub("datasets/org/books", dataset_files(), None);
    let hub = HubSettings {
        cache: cache.clone(),
        offline: false,
        token: None,
        endpoint: Some(endpoint),
    };
    let books = load_hub_dataset("hf:org/books", &hub).unwrap();
    let titles: Vec<&str> = books.iter().map(|b| b.title.as_str()).collect();
    assert_eq!(titles, ["First", "Second", "Third"]);
    let snapshot = cache.join("datasets--org--books/snapshots").join(COMMIT);
    assert!(!snapshot.join("README.md").exists());
    assert_eq!(
        resolve_dataset("hf:org/books", &offline(&cache))
            .unwrap()
            .files
            .len(),
        2
    );
    std::fs::remove_dir_all(cache).unwrap();
}

#[test]
fn a_hub_refusal_is_one_line_with_the_fix() {
    let cache = temp_dir("refused");
    for (status, want) in [
        (401, "HF_TOKEN"),
        (403, "request access"),
        (404, "no such repo"),
    ] {
        let (endpoint, _) = fake_hub("models/org/gated", vec![], Some(status));
        let hub = HubSettings {
            cache: cache.clone(),
            offline: false,
            token: None,
            endpoint: Some(endpoint),
        };
        let e = resolve_model("org/gated", &hub).unwrap_err().to_string();
        assert_one_line(
            &e,
            &["model org/gated@main", &format!("HTTP {status}"), want],
        );
    }
    std::fs::remove_dir_all(cache).unwrap();
}
