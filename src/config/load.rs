//! Standalone mode's input: YAML files and directories, read the way `kubectl apply -f` reads them.

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::compile::{DEFAULT_NAMESPACE, Document, Documents, Resolver, compile};
use super::wire::{COMPILED_CONFIG_KIND, CompiledConfig};
use super::{Config, ConfigError, ConfigErrors, ObjectRef, Origin, Reason, schema, selector};
use crate::api::{API_VERSION, GROUP};

/// The paths the sidecar was started with (`-f`): files, or directories whose `*.yaml`, `*.yml` and
/// `*.json` files are read in name order (not recursively, as `kubectl apply -f DIR`).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub paths: Vec<PathBuf>,
    /// The pod's labels as the downward API writes them; without it every `workloadSelector`
    /// matches.
    pub pod_labels_file: Option<PathBuf>,
}

/// The sources' content as read at one moment.
#[derive(Debug)]
pub struct SourceTexts {
    /// Each file's name and text.
    pub texts: Vec<(String, String)>,
    pub pod_labels: Option<String>,
    /// Hash of all of the above.
    pub hash: u64,
}

/// A compiled configuration and the fingerprint of every input it was built from.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The operator's version of the configuration, when it is a [`CompiledConfig`].
    pub version: Option<u64>,
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
    pub fn read(&self) -> Result<SourceTexts, ConfigErrors> {
        let mut hasher = DefaultHasher::new();
        let mut texts = Vec::new();
        for file in self.files()? {
            let text = std::fs::read_to_string(&file).map_err(|e| io_error(&file, &e))?;
            let name = file.display().to_string();
            (&name, &text).hash(&mut hasher);
            texts.push((name, text));
        }
        let pod_labels = match &self.pod_labels_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| io_error(path, &e))?),
            None => None,
        };
        pod_labels.hash(&mut hasher);
        Ok(SourceTexts { texts, pod_labels, hash: hasher.finish() })
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
    ConfigError::input("", format!("{}: {e}", path.display())).into()
}

/// Reads and compiles the sources, and keeps what selects this pod.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigErrors> {
    let snapshot = sources.read()?;
    let labels = match (&snapshot.pod_labels, &sources.pod_labels_file) {
        (Some(text), Some(path)) => selector::parse_labels_file(text)
            .map(Some)
            .map_err(|e| ConfigError::input("--pod-labels-file", format!("{}: {e}", path.display()))),
        _ => Ok(None),
    };
    let resolver = FsResolver::default();
    let ((mut config, version), labels) = match (compile_texts(&snapshot.texts, &resolver), labels) {
        (Ok(compiled), Ok(labels)) => (compiled, labels),
        (compiled, labels) => {
            let mut errors = compiled.err().map(|e| e.0).unwrap_or_default();
            errors.extend(labels.err());
            return Err(ConfigErrors(errors));
        }
    };
    if let Some(labels) = &labels {
        config.retain_for(labels);
    }
    Ok(Loaded { config, version, fingerprint: Fingerprint::new(snapshot.hash, resolver.files.into_inner()) })
}

/// Reads every document of `texts` (each a file's name and text) and compiles them: the
/// configuration, with the operator's version when it is a [`CompiledConfig`], or every problem of
/// every document. The documents that read well are compiled even when others did not, so that one
/// run reports all there is to fix.
pub fn compile_texts(
    texts: &[(String, String)],
    resolver: &dyn Resolver,
) -> Result<(Config, Option<u64>), ConfigErrors> {
    let mut docs = Documents::default();
    let mut errors = Vec::new();
    for (name, text) in texts {
        parse_file(name, text, &mut docs, &mut errors);
    }
    let compiled = match docs.compiled.pop() {
        // Without one route that read well, "no route" would only repeat the problems above.
        None if !errors.is_empty() && docs.routes.is_empty() => None,
        None => compile(&docs, resolver).map(|config| (config, None)).map_err(|e| errors.extend(e.0)).ok(),
        Some(compiled) => from_compiled(compiled, &docs).map_err(|e| errors.extend(e.0)).ok(),
    };
    match compiled {
        Some(compiled) if errors.is_empty() => Ok(compiled),
        _ => Err(ConfigErrors(errors)),
    }
}

/// The configuration of an operator-compiled document, which must be the only input: mixing it
/// with ProviderRoutes would leave two owners for the same model names.
fn from_compiled(compiled: Document<CompiledConfig>, rest: &Documents) -> Result<(Config, Option<u64>), ConfigErrors> {
    let error = |message: String| ConfigError {
        origin: compiled.origin.clone(),
        object: None,
        path: String::new(),
        message,
        reason: Reason::Invalid,
    };
    if !rest.compiled.is_empty() {
        return Err(error("only one CompiledConfig may be loaded at a time".into()).into());
    }
    if !rest.routes.is_empty() || !rest.budgets.is_empty() {
        return Err(error(
            "a CompiledConfig cannot be loaded together with ProviderRoute or ApiKeyBudget documents".into(),
        )
        .into());
    }
    let version = compiled.object.version;
    let config = compiled.object.into_config().map_err(error)?;
    Ok((config, Some(version)))
}

/// Splits a file into YAML documents and sorts the Sideyard objects and Secrets into `docs`.
/// Documents of other kinds are skipped, so a directory can hold a whole application's manifests.
pub fn parse_file(file: &str, text: &str, docs: &mut Documents, errors: &mut Vec<ConfigError>) {
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = Origin { file: file.to_string(), document: i + 1 };
        let error = |object: Option<ObjectRef>, path: String, message: String| ConfigError {
            origin: Some(origin.clone()),
            object,
            path,
            message,
            reason: Reason::Invalid,
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
        errors.push(ConfigError {
            origin: Some(origin.clone()),
            object: object.clone(),
            path: path.into(),
            message,
            reason: Reason::Invalid,
        })
    };
    let mut report = |problems: Vec<(String, String)>| {
        for (path, message) in problems {
            error(&path, message);
        }
    };
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        error("", "not a Kubernetes object: apiVersion and kind are required".into());
        return;
    };
    match (api_version.as_str(), kind.as_str()) {
        (API_VERSION, "ProviderRoute") => match checked::<crate::api::ProviderRoute>("ProviderRoute", value) {
            Ok(route) => docs.routes.push(Document { origin: Some(origin.clone()), object: route }),
            Err(problems) => report(problems),
        },
        (API_VERSION, "ApiKeyBudget") => match checked::<crate::api::ApiKeyBudget>("ApiKeyBudget", value) {
            Ok(budget) => docs.budgets.push(Document { origin: Some(origin.clone()), object: budget }),
            Err(problems) => report(problems),
        },
        (API_VERSION, COMPILED_CONFIG_KIND) => match strict::<CompiledConfig>(&value) {
            Ok(compiled) => docs.compiled.push(Document { origin: Some(origin.clone()), object: compiled }),
            Err(problems) => report(problems),
        },
        ("v1", "Secret") => match strict::<Secret>(&value) {
            Ok(secret) => docs.secrets.push(Document { origin: Some(origin.clone()), object: secret }),
            Err(problems) => report(problems),
        },
        ("v1", "List") => match value.get("items").and_then(|i| i.as_sequence()) {
            Some(items) => {
                for item in items {
                    parse_object(item.clone(), origin, docs, errors);
                }
            }
            None => report(vec![("items".into(), "a List must have items".into())]),
        },
        (v, k) if v.split('/').next() == Some(GROUP) => report(vec![(
            String::new(),
            format!("unknown kind {k:?} in {v:?}: this Sideyard knows ProviderRoute and ApiKeyBudget in {API_VERSION}"),
        )]),
        _ => {
            tracing::debug!(file = %origin.file, document = origin.document, %kind, "skipping a document of another kind")
        }
    }
}

/// A Sideyard object, read; one that does not read is checked against its CRD's schema, as the
/// API server would check it, so that every problem of the document is reported at once rather
/// than the first that stopped the reading. (Building the schema costs more than reading a whole
/// configuration: only a document that needs it pays.)
fn checked<T: DeserializeOwned>(kind: &str, value: serde_yaml::Value) -> Result<T, Vec<schema::Problem>> {
    static SCHEMAS: LazyLock<[(&str, Option<serde_json::Value>); 2]> =
        LazyLock::new(|| ["ProviderRoute", "ApiKeyBudget"].map(|kind| (kind, crate::api::schema_of(kind))));
    strict(&value).map_err(|first| {
        let schema = SCHEMAS.iter().find(|(k, _)| *k == kind).and_then(|(_, s)| s.as_ref());
        let problems = schema.map(|s| schema::problems(s, &value)).unwrap_or_default();
        match problems.is_empty() {
            // What the schema cannot see (a number too large for its field, say).
            true => first,
            false => problems.into_iter().map(|(path, message)| explained(path, message)).collect(),
        }
    })
}

/// Deserialises an object, naming the field path of a type error, and rejecting every field that
/// the type does not have (a misspelt field would otherwise be silently ignored).
fn strict<T: DeserializeOwned>(value: &serde_yaml::Value) -> Result<T, Vec<schema::Problem>> {
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(value, &mut record);
    let object: Result<T, _> = serde_path_to_error::deserialize(de);
    // Generated resource types check apiVersion and kind without keeping them.
    let mut problems: Vec<schema::Problem> = unknown
        .into_iter()
        .filter(|p| p != "apiVersion" && p != "kind")
        .map(|path| explained(path, "unknown field".into()))
        .collect();
    match object {
        Ok(object) if problems.is_empty() => Ok(object),
        Ok(_) => Err(problems),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            problems.push((path, e.into_inner().to_string()));
            Err(problems)
        }
    }
}

/// A problem, with what to do for the one every kubectl user meets: the field's old name `on`,
/// which YAML 1.1 readers (kubectl, Helm) read as `true`.
fn explained(path: String, message: String) -> schema::Problem {
    if message.starts_with("unknown field") && (path == "spec.fallback.on" || path == "spec.fallback.true") {
        let message = "unknown field: the fallback reasons are set with `when` (kubectl reads a key `on` as `true`)";
        return (path, message.into());
    }
    (path, message)
}

/// The real environment and file system, remembering which files it read.
#[derive(Debug, Default)]
struct FsResolver {
    files: RefCell<Vec<String>>,
}

impl Resolver for FsResolver {
    fn env(&self, name: &str) -> Result<String, String> {
        std::env::var(name).map_err(|_| super::compile::env_not_set(name))
    }

    fn file(&self, path: &str) -> std::io::Result<String> {
        self.files.borrow_mut().push(path.to_string());
        std::fs::read_to_string(path)
    }
}
