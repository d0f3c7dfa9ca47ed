//! Standalone mode's input: YAML files and directories, read the way `kubectl apply -f` reads them.

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::compile::{DEFAULT_NAMESPACE, Document, Documents, Resolver, compile};
use super::{Config, ConfigError, ConfigErrors, ObjectRef, Origin};
use crate::api::{API_VERSION, GROUP};

/// The paths the sidecar was started with (`-f`): files, or directories whose `*.yaml`, `*.yml` and
/// `*.json` files are read in name order (not recursively, as `kubectl apply -f DIR`).
#[derive(Clone, Debug)]
pub struct Sources {
    pub paths: Vec<PathBuf>,
}

/// A compiled configuration and the fingerprint of every input it was built from.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub fingerprint: Fingerprint,
}

/// The content hash of a configuration's inputs, and the credential files it read (which the watcher
/// must keep reading, as they are not among the sources).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint {
    pub hash: u64,
    pub credential_files: Vec<String>,
}

impl Sources {
    /// The files to read now: a directory's listing can change between reloads.
    fn files(&self) -> Result<Vec<PathBuf>, ConfigErrors> {
        let mut files = Vec::new();
        for path in &self.paths {
            let meta = std::fs::metadata(path).map_err(|e| io_error(path, &e))?;
            if !meta.is_dir() {
                files.push(path.clone());
                continue;
            }
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| io_error(path, &e))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                // Kubernetes volume mounts keep their real files in hidden `..data` directories.
                .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            files.extend(entries);
        }
        Ok(files)
    }

    /// Reads the sources as they are now, with the hash of their names and content.
    pub fn read(&self) -> Result<(Vec<(String, String)>, u64), ConfigErrors> {
        let mut hasher = DefaultHasher::new();
        let mut texts = Vec::new();
        for file in self.files()? {
            let text = std::fs::read_to_string(&file).map_err(|e| io_error(&file, &e))?;
            let name = file.display().to_string();
            (&name, &text).hash(&mut hasher);
            texts.push((name, text));
        }
        Ok((texts, hasher.finish()))
    }
}

impl Fingerprint {
    /// Combines the sources' hash with the current content of the credential files.
    pub fn new(sources_hash: u64, credential_files: Vec<String>) -> Self {
        let mut hasher = DefaultHasher::new();
        sources_hash.hash(&mut hasher);
        for file in &credential_files {
            // A credential file that vanished changes the hash too; compile reports the error.
            (file, std::fs::read(file).ok()).hash(&mut hasher);
        }
        Fingerprint { hash: hasher.finish(), credential_files }
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> ConfigErrors {
    ConfigError { origin: None, object: None, path: String::new(), message: format!("{}: {e}", path.display()) }.into()
}

/// Reads and compiles the sources.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigErrors> {
    let (texts, sources_hash) = sources.read()?;
    let mut docs = Documents::default();
    let mut errors = Vec::new();
    for (name, text) in &texts {
        parse_file(name, text, &mut docs, &mut errors);
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let resolver = FsResolver::default();
    let config = compile(&docs, &resolver)?;
    Ok(Loaded { config, fingerprint: Fingerprint::new(sources_hash, resolver.files.into_inner()) })
}

/// Splits a file into YAML documents and sorts the Switchyard objects and Secrets into `docs`.
/// Documents of other kinds are skipped, so a directory can hold a whole application's manifests.
pub fn parse_file(file: &str, text: &str, docs: &mut Documents, errors: &mut Vec<ConfigError>) {
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = Origin { file: file.to_string(), document: i + 1 };
        let error = |object: Option<ObjectRef>, path: String, message: String| ConfigError {
            origin: Some(origin.clone()),
            object,
            path,
            message,
        };
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                errors.push(error(None, String::new(), format!("invalid YAML: {e}")));
                // The parser cannot find the next document after a syntax error.
                return;
            }
        };
        if value.is_null() {
            continue; // An empty document, as between `---` separators.
        }
        parse_object(value, &origin, docs, errors);
    }
}

fn parse_object(value: serde_yaml::Value, origin: &Origin, docs: &mut Documents, errors: &mut Vec<ConfigError>) {
    let str_at = |v: &serde_yaml::Value, keys: &[&str]| {
        keys.iter().try_fold(v, |v, k| v.get(k)).and_then(|v| v.as_str()).map(str::to_string)
    };
    let api_version = str_at(&value, &["apiVersion"]);
    let kind = str_at(&value, &["kind"]);
    let object = kind.as_ref().map(|kind| ObjectRef {
        kind: kind.clone(),
        namespace: str_at(&value, &["metadata", "namespace"]).unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        name: str_at(&value, &["metadata", "name"]).unwrap_or_default(),
    });
    let mut error = |path: &str, message: String| {
        errors.push(ConfigError { origin: Some(origin.clone()), object: object.clone(), path: path.into(), message })
    };
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        error("", "not a Kubernetes object: apiVersion and kind are required".into());
        return;
    };
    match (api_version.as_str(), kind.as_str()) {
        (API_VERSION, "ProviderRoute") => match strict::<crate::api::ProviderRoute>(value) {
            Ok(route) => docs.routes.push(Document { origin: Some(origin.clone()), object: route }),
            Err((path, message)) => error(&path, message),
        },
        (API_VERSION, "ApiKeyBudget") => match strict::<crate::api::ApiKeyBudget>(value) {
            Ok(budget) => docs.budgets.push(Document { origin: Some(origin.clone()), object: budget }),
            Err((path, message)) => error(&path, message),
        },
        ("v1", "Secret") => match strict::<Secret>(value) {
            Ok(secret) => docs.secrets.push(Document { origin: Some(origin.clone()), object: secret }),
            Err((path, message)) => error(&path, message),
        },
        ("v1", "List") => match value.get("items").and_then(|i| i.as_sequence()) {
            Some(items) => {
                for item in items {
                    parse_object(item.clone(), origin, docs, errors);
                }
            }
            None => error("items", "a List must have items".into()),
        },
        (v, k) if v.split('/').next() == Some(GROUP) => {
            error(
                "",
                format!(
                    "unknown kind {k:?} in {v:?}: this Switchyard knows ProviderRoute and ApiKeyBudget in {API_VERSION}"
                ),
            );
        }
        _ => {
            tracing::debug!(file = %origin.file, document = origin.document, %kind, "skipping a document of another kind")
        }
    }
}

/// Deserialises an object, naming the field path of a type error, and rejecting fields that the
/// type does not have (a misspelt field would otherwise be silently ignored).
fn strict<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, (String, String)> {
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(value, &mut record);
    let object: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        (path, e.into_inner().to_string())
    })?;
    // Generated resource types check apiVersion and kind without keeping them.
    match unknown.into_iter().find(|p| p != "apiVersion" && p != "kind") {
        Some(path) => Err((path, "unknown field".into())),
        None => Ok(object),
    }
}

/// The real environment and file system, remembering which files it read.
#[derive(Debug, Default)]
struct FsResolver {
    files: RefCell<Vec<String>>,
}

impl Resolver for FsResolver {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn file(&self, path: &str) -> std::io::Result<String> {
        self.files.borrow_mut().push(path.to_string());
        std::fs::read_to_string(path)
    }
}
