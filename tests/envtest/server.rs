//! One kube-apiserver and etcd per test binary, envtest-style: the binaries come from
//! `KUBEBUILDER_ASSETS` (`scripts/envtest-assets` provides them), everything listens on
//! 127.0.0.1, and both die with the test process.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

use crate::common;

/// How long the API server may take to become ready; it takes seconds, this only turns a hang
/// into a failure.
const START_PATIENCE: Duration = Duration::from_secs(120);

/// A running API server: where it is and how to reach it as cluster admin.
pub struct ApiServer {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    pub dir: PathBuf,
    /// A kubeconfig with the admin client certificate (`O=system:masters`).
    pub admin_kubeconfig: PathBuf,
    /// The CA that signed the serving certificate, PEM.
    pub ca_pem: String,
    /// `tls.crt`, `tls.key` and `ca.crt` for a webhook on 127.0.0.1, signed by that CA.
    pub webhook_cert_dir: PathBuf,
    pub assets: PathBuf,
    _processes: Vec<Child>,
}

/// The shared API server, started on first use; `None` (after saying so loudly) when there are
/// no assets and `SIDEYARD_REQUIRE_ENVTEST` is not set.
pub fn api_server() -> Option<&'static ApiServer> {
    static SERVER: OnceLock<Option<ApiServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let required = std::env::var("SIDEYARD_REQUIRE_ENVTEST").is_ok_and(|v| v == "1");
            match assets() {
                Ok(assets) => Some(start(assets)),
                Err(why) if required => panic!("SIDEYARD_REQUIRE_ENVTEST=1, but {why}"),
                Err(why) => {
                    // Straight to the process's stderr: libtest captures eprintln! of passing
                    // tests, and a skip must be seen.
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr(),
                        format!(
                            "\n=== SKIPPED: the envtest suite needs a real API server, but {why}.\n\
                             === Provide one with: export KUBEBUILDER_ASSETS=\"$(scripts/envtest-assets)\"\n\n"
                        )
                        .as_bytes(),
                    );
                    None
                }
            }
        })
        .as_ref()
}

fn assets() -> Result<PathBuf, String> {
    let dir = std::env::var_os("KUBEBUILDER_ASSETS").ok_or("KUBEBUILDER_ASSETS is not set")?;
    let dir = PathBuf::from(dir);
    for tool in ["kube-apiserver", "etcd", "kubectl"] {
        if !dir.join(tool).is_file() {
            return Err(format!("KUBEBUILDER_ASSETS ({}) has no {tool}", dir.display()));
        }
    }
    Ok(dir)
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Starts `program` so that it dies with this process: a shell holds its stdin, and when the test
/// process exits (however it exits) the pipe closes and the shell kills it.
fn spawn_tied(program: &Path, args: &[String], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new("sh")
        .arg("-c")
        .arg(r#""$@" & child=$!; read _ignored; kill -9 "$child" 2>/dev/null; wait"#)
        .arg("envtest")
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn start(assets: PathBuf) -> ApiServer {
    let dir = common::temp_dir("envtest");
    let started = Instant::now();

    // One CA signs the serving certificate and the admin's client certificate.
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "sideyard-envtest-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let issue = |names: Vec<String>, common_name: &str, organization: Option<&str>, usage| {
        let mut params = CertificateParams::new(names).expect("names");
        params.distinguished_name.push(DnType::CommonName, common_name);
        if let Some(o) = organization {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        (params.signed_by(&key, &issuer).expect("certificate").pem(), key.serialize_pem())
    };
    let (serving_cert, serving_key) = issue(
        vec!["127.0.0.1".into(), "localhost".into()],
        "kube-apiserver",
        None,
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (admin_cert, admin_key) = issue(vec![], "admin", Some("system:masters"), ExtendedKeyUsagePurpose::ClientAuth);
    // For the operator's webhook on 127.0.0.1, which the API server calls trusting the same CA
    // (the certificate the operator manages names only the webhook Service).
    let (webhook_cert, webhook_key) =
        issue(vec!["127.0.0.1".into()], "sideyard-webhook", None, ExtendedKeyUsagePurpose::ServerAuth);
    let webhook_cert_dir = dir.join("webhook-tls");
    std::fs::create_dir_all(&webhook_cert_dir).expect("webhook cert dir");
    write(&webhook_cert_dir.join("tls.crt"), &webhook_cert);
    write(&webhook_cert_dir.join("tls.key"), &webhook_key);
    write(&webhook_cert_dir.join("ca.crt"), &ca_pem);
    // The key ServiceAccount tokens are signed with (ECDSA P-256 is accepted as RSA is).
    let sa_key = KeyPair::generate().expect("key");
    write(&dir.join("ca.crt"), &ca_pem);
    write(&dir.join("apiserver.crt"), &serving_cert);
    write(&dir.join("apiserver.key"), &serving_key);
    write(&dir.join("sa.key"), &sa_key.serialize_pem());
    write(&dir.join("sa.pub"), &sa_key.public_key_pem());

    let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let etcd = spawn_tied(
        &assets.join("etcd"),
        &[
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
        ],
        &dir.join("etcd.log"),
    );
    let path = |name: &str| dir.join(name).display().to_string();
    let apiserver = spawn_tied(
        &assets.join("kube-apiserver"),
        &[
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", path("certs")),
            format!("--tls-cert-file={}", path("apiserver.crt")),
            format!("--tls-private-key-file={}", path("apiserver.key")),
            format!("--client-ca-file={}", path("ca.crt")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", path("sa.pub")),
            format!("--service-account-signing-key-file={}", path("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            // No controller creates ServiceAccounts here: tests create the ones they use.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--allow-privileged=true".into(),
        ],
        &dir.join("kube-apiserver.log"),
    );

    let url = format!("https://127.0.0.1:{api_port}");
    let admin_kubeconfig = dir.join("admin.kubeconfig");
    write(
        &admin_kubeconfig,
        &kubeconfig(
            &url,
            &ca_pem,
            &format!("client-certificate-data: {}\n    client-key-data: {}", b64(&admin_cert), b64(&admin_key)),
        ),
    );
    let server =
        ApiServer { url, dir, admin_kubeconfig, ca_pem, webhook_cert_dir, assets, _processes: vec![apiserver, etcd] };
    server.wait_ready(started);
    server
}

/// A kubeconfig for `url` that trusts `ca_pem` and authenticates with `user` (YAML lines).
pub fn kubeconfig(url: &str, ca_pem: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\nusers:\n- name: envtest\n  user:\n    {user}\ncontexts:\n- name: envtest\n  context: {{cluster: envtest, user: envtest, namespace: default}}\ncurrent-context: envtest\n",
        b64(ca_pem)
    )
}

pub fn b64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl ApiServer {
    fn wait_ready(&self, started: Instant) {
        loop {
            let out = self.kubectl(&["get", "--raw", "/readyz"]);
            if out.status.success() {
                eprintln!("envtest: kube-apiserver ready at {} in {:.1}s", self.url, started.elapsed().as_secs_f64());
                return;
            }
            if started.elapsed() > START_PATIENCE {
                let log = log_tail(&self.dir.join("kube-apiserver.log"), 30);
                panic!("kube-apiserver was not ready after {START_PATIENCE:?}; its log ends:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs the real kubectl as cluster admin.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        self.kubectl_as(&self.admin_kubeconfig, args, None)
    }

    /// Runs the real kubectl with `kubeconfig`, `stdin` piped in when given.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let mut command = Command::new(self.assets.join("kubectl"));
        command
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--request-timeout=20s")
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("kubectl");
        if let Some(text) = stdin {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("kubectl stdin");
        }
        child.wait_with_output().expect("kubectl")
    }

    /// A kube client as cluster admin.
    pub async fn admin(&self) -> kube::Client {
        client(&self.admin_kubeconfig).await
    }
}

/// A kube client from a kubeconfig file.
pub async fn client(path: &Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("kube config");
    kube::Client::try_from(config).expect("kube client")
}

/// The last `lines` lines of a log file, for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(file) = std::fs::File::open(path) else { return String::new() };
    let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
