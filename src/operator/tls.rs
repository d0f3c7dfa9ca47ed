//! The webhook's TLS, managed by the operator: the leader keeps a CA and a serving certificate in a
//! Secret (so every replica serves the same chain and restarts keep it), renews the certificate
//! before it expires, and keeps the MutatingWebhookConfiguration's `caBundle` current by
//! server-side apply. Every replica loads the Secret and swaps new certificates in without a
//! restart. With `--webhook-cert-dir` (cert-manager) the files are read instead and nothing is
//! written.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;

use super::controller::FIELD_MANAGER;
use super::leader::Leadership;

/// The webhook's name inside the MutatingWebhookConfiguration (the chart uses the same).
pub const WEBHOOK_NAME: &str = "pods.sideyard.dev";
const NOT_AFTER_ANNOTATION: &str = "sideyard.dev/not-after";
const DNS_NAMES_ANNOTATION: &str = "sideyard.dev/dns-names";
/// A serving certificate lasts a year and is renewed in its last 30 days.
const LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
const CA_NAME: &str = "sideyard-webhook-ca";

/// Where the operator manages its certificates.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// The webhook's Service, which names the certificate.
    pub service: String,
    /// The operator's namespace: the Service's and the Secret's.
    pub namespace: String,
    /// The Secret holding the CA and the serving certificate.
    pub secret: String,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept current.
    pub webhook_configuration: String,
}

/// A CA and the serving certificate it signed, all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingCert {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
    /// Unix seconds.
    pub not_after: i64,
    pub dns_names: Vec<String>,
}

/// The names a client of the Service may use.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Issues a serving certificate for `dns_names`, signed by the CA of `previous` when there is
/// one (so the `caBundle` clients hold stays valid), or by a new CA.
pub fn issue(dns_names: &[String], previous: Option<&ServingCert>, now: SystemTime) -> Result<ServingCert, String> {
    let error = |e: rcgen::Error| format!("cannot issue the webhook certificate: {e}");
    let (ca_cert, ca_key) = match previous {
        Some(p) => (p.ca_cert.clone(), KeyPair::from_pem(&p.ca_key).map_err(error)?),
        None => {
            let key = KeyPair::generate().map_err(error)?;
            (ca_params().self_signed(&key).map_err(error)?.pem(), key)
        }
    };
    // The same name, key and key usages as the CA certificate: what a signature is checked against.
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut params = CertificateParams::new(dns_names.to_vec()).map_err(error)?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, dns_names.first().cloned().unwrap_or_default());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.use_authority_key_identifier_extension = true;
    // An hour of slack for clocks that run behind.
    let not_before = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
    let not_after = now + LIFETIME;
    params.not_before = time::OffsetDateTime::from(not_before);
    params.not_after = time::OffsetDateTime::from(not_after);
    let key = KeyPair::generate().map_err(error)?;
    let cert = params.signed_by(&key, &issuer).map_err(error)?;
    Ok(ServingCert {
        ca_cert,
        ca_key: issuer.key().serialize_pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after: unix(not_after),
        dns_names: dns_names.to_vec(),
    })
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Whether the certificate must be (re)issued: missing, for other names, or in its last 30 days.
pub fn due(current: Option<&ServingCert>, dns_names: &[String], now: SystemTime) -> bool {
    current.is_none_or(|c| {
        c.dns_names != dns_names
            || c.not_after.saturating_sub(unix(now)) < i64::try_from(RENEW_BEFORE.as_secs()).unwrap_or(i64::MAX)
    })
}

impl ServingCert {
    pub fn to_secret(&self, name: &str, namespace: &str) -> Secret {
        let data =
            [("ca.crt", &self.ca_cert), ("ca.key", &self.ca_key), ("tls.crt", &self.cert), ("tls.key", &self.key)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect();
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(super::plan::MANAGED_BY_LABEL.into(), super::plan::MANAGED_BY.into())])),
                annotations: Some(BTreeMap::from([
                    (NOT_AFTER_ANNOTATION.into(), self.not_after.to_string()),
                    (DNS_NAMES_ANNOTATION.into(), self.dns_names.join(",")),
                ])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        }
    }

    /// The certificates in a Secret written by [`ServingCert::to_secret`]; `None` when any part is
    /// missing or unreadable (it is then issued again).
    pub fn from_secret(secret: &Secret) -> Option<ServingCert> {
        let data = secret.data.as_ref()?;
        let text = |k: &str| data.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok());
        let annotations = secret.annotations();
        Some(ServingCert {
            ca_cert: text("ca.crt")?,
            ca_key: text("ca.key")?,
            cert: text("tls.crt")?,
            key: text("tls.key")?,
            not_after: annotations.get(NOT_AFTER_ANNOTATION)?.parse().ok()?,
            dns_names: annotations.get(DNS_NAMES_ANNOTATION)?.split(',').map(String::from).collect(),
        })
    }
}

/// A certificate and key for rustls.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate is not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("the key is not PEM: {e}"))?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| format!("unusable key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

/// The serving certificate, swapped in place when it changes, and the CA that signs it (which
/// sidecars are given to trust the ledger).
#[derive(Debug)]
pub struct CertStore {
    key: ArcSwapOption<CertifiedKey>,
    ca: tokio::sync::watch::Sender<Option<String>>,
}

impl Default for CertStore {
    fn default() -> Self {
        CertStore { key: ArcSwapOption::empty(), ca: tokio::sync::watch::Sender::new(None) }
    }
}

impl CertStore {
    pub fn set(&self, key: Arc<CertifiedKey>) {
        self.key.store(Some(key));
    }

    pub fn loaded(&self) -> bool {
        self.key.load().is_some()
    }

    /// Records the CA (PEM); watchers hear of a change only.
    pub fn set_ca(&self, ca: Option<String>) {
        self.ca.send_if_modified(|current| {
            let changed = *current != ca;
            *current = ca;
            changed
        });
    }

    pub fn watch_ca(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.ca.subscribe()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key.load_full()
    }
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// Managed by the operator in a Secret.
    Managed(TlsSettings),
    /// `tls.crt` and `tls.key` in a directory (a cert-manager Secret mounted into the pod).
    Files(PathBuf),
}

/// Keeps `store` loaded from `source`, checking every `interval`; the leader also issues and
/// renews a managed certificate and publishes its CA.
pub async fn keep_current(
    client: Client,
    leadership: Leadership,
    source: CertSource,
    store: Arc<CertStore>,
    interval: Duration,
) {
    let mut last: Option<Pem> = None;
    let mut leadership_changes = leadership.clone();
    loop {
        let result = match &source {
            CertSource::Managed(settings) => managed_round(&client, &leadership, settings).await,
            CertSource::Files(dir) => read_files(dir),
        };
        match result {
            Ok(Some(pem)) if last.as_ref() != Some(&pem) => match certified_key(&pem.cert, &pem.key) {
                Ok(key) => {
                    store.set(key);
                    store.set_ca(pem.ca.clone());
                    tracing::info!("webhook certificate loaded");
                    last = Some(pem);
                }
                Err(e) => tracing::error!(error = %e, "the webhook certificate cannot be used"),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "webhook certificate not refreshed"),
        }
        // Until a certificate is there (a follower waiting for the leader), look more often.
        let wait = if store.loaded() { interval } else { interval.min(Duration::from_secs(2)) };
        // A new leader checks at once: the certificate may be waiting for it to issue.
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            became = leadership_changes.acquired() => if !became { tokio::time::sleep(wait).await },
        }
    }
}

/// A serving certificate, its key and, when known, its CA, as PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pem {
    pub cert: String,
    pub key: String,
    pub ca: Option<String>,
}

fn read_files(dir: &std::path::Path) -> Result<Option<Pem>, String> {
    let read =
        |name: &str| std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()));
    // cert-manager writes the issuer's CA beside the certificate; without it sidecars cannot be
    // told whom to trust, and budgets stay per pod.
    let ca = read("ca.crt").ok();
    Ok(Some(Pem { cert: read("tls.crt")?, key: read("tls.key")?, ca }))
}

/// One round of a managed certificate: the Secret's certificate, issued or renewed first when this
/// replica leads and it is due, with the CA published to the webhook configuration.
pub async fn managed_round(
    client: &Client,
    leadership: &Leadership,
    settings: &TlsSettings,
) -> Result<Option<Pem>, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let existing =
        secrets.get_opt(&settings.secret).await.map_err(|e| format!("cannot read Secret {}: {e}", settings.secret))?;
    let mut current = existing.as_ref().and_then(ServingCert::from_secret);
    if !leadership.is_leader() {
        return Ok(current.map(|c| Pem { cert: c.cert, key: c.key, ca: Some(c.ca_cert) }));
    }
    let names = dns_names(&settings.service, &settings.namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if due(current.as_ref(), &names, SystemTime::now()) {
        let issued = issue(&names, current.as_ref(), SystemTime::now())?;
        secrets
            .patch(&settings.secret, &params, &Patch::Apply(issued.to_secret(&settings.secret, &settings.namespace)))
            .await
            .map_err(|e| format!("cannot write Secret {}: {e}", settings.secret))?;
        tracing::info!(secret = %settings.secret, names = ?names, "issued the webhook certificate");
        current = Some(issued);
    }
    let Some(current) = current else { return Ok(None) };
    publish_ca_bundle(client, settings, &current.ca_cert).await?;
    Ok(Some(Pem { cert: current.cert, key: current.key, ca: Some(current.ca_cert) }))
}

/// Server-side applies the CA as the webhook's `caBundle` when it differs; the rest of the
/// configuration stays the chart's. A configuration that does not exist (installed without the
/// webhook) is left alone: applying would create an incomplete one.
pub async fn publish_ca_bundle(client: &Client, settings: &TlsSettings, ca_pem: &str) -> Result<(), String> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = &settings.webhook_configuration;
    let current = api.get_opt(name).await.map_err(|e| format!("cannot read {name}: {e}"))?;
    let Some(current) = current else { return Ok(()) };
    let up_to_date = current.webhooks.iter().flatten().any(|w| {
        w.name == WEBHOOK_NAME && w.client_config.ca_bundle.as_ref().is_some_and(|b| b.0 == ca_pem.as_bytes())
    });
    if up_to_date {
        return Ok(());
    }
    let ca_bundle = serde_json::to_value(ByteString(ca_pem.as_bytes().to_vec())).unwrap_or_default();
    let patch = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{"name": WEBHOOK_NAME, "clientConfig": {"caBundle": ca_bundle}}],
    });
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|e| format!("cannot update the caBundle of {name}: {e}"))?;
    tracing::info!(configuration = %name, "published the webhook CA");
    Ok(())
}

/// Serves `app` over TLS with the certificate in `certs` until `stop` completes. Handshakes run
/// on their own tasks, bounded in time, so a slow client holds up nobody.
pub async fn serve_https(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    certs: Arc<CertStore>,
    stop: impl Future<Output = ()>,
) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
        Ok(builder) => builder.with_no_client_auth().with_cert_resolver(certs),
        Err(e) => {
            tracing::error!(error = %e, "cannot configure TLS; the webhook is not served");
            return;
        }
    };
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let builder = Arc::new(hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let (acceptor, app, builder, watcher) = (acceptor.clone(), app.clone(), builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!("TLS handshake timed out"),
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).into_owned();
            let _ = watcher.watch(connection).await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
