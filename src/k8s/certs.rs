//! `certs`: the mutual-TLS certificates of a cluster install (issue 12), kept in Secrets of the
//! release namespace and made at install time by `certs ensure`, the controller pod's init
//! container, so that no key is ever part of the chart or of manifests/.
//!
//! - A CA Secret (tls.crt, tls.key: the signing CA; ca.crt: the trust bundle, one CA or two
//!   during a rotation). Mounted nowhere.
//! - Leaf Secrets of type kubernetes.io/tls (tls.crt, tls.key, ca.crt = the bundle): the agent's
//!   server certificate (DNS name `flashcopy-agent`, serverAuth), the CSI controller's client
//!   certificate (clientAuth), the csi-snapshot-metadata sidecar's server certificate (its
//!   Service's DNS names).
//! - The SnapshotMetadataService object of the driver, whose caCert is the bundle.
//!
//! `ensure` creates what is missing, re-issues a leaf close to its expiry, and copies the
//! bundle into the leaves and the SnapshotMetadataService; it leaves everything else as it is,
//! so upgrades and restarts keep the certificates. `rotate` changes the CA Secret one stage at a
//! time (README, "Certificates"), then does what `ensure` does.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use time::OffsetDateTime;

/// Certificate file in every Secret.
pub const TLS_CERT: &str = "tls.crt";
/// Private key file in every Secret.
pub const TLS_KEY: &str = "tls.key";
/// CA bundle file in every Secret.
pub const CA_BUNDLE: &str = "ca.crt";
/// Label on every Secret this module makes (`kubectl delete secret -l` after an uninstall).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "flashcopy-csi-certs");
/// The common name of the CSI controller's client certificate.
pub const CONTROLLER_CN: &str = "flashcopy-controller";

/// Why the certificates could not be ensured. Messages never hold key material.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// The API server refused or failed a request (a conflict: another replica wrote first;
    /// the init container is retried).
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Making a certificate failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A Secret exists but is unusable.
    #[error("secret {name}: {why}")]
    Secret {
        /// The Secret.
        name: String,
        /// What is wrong (no contents).
        why: String,
    },
    /// Files did not appear in time (`--wait-for`).
    #[error("{0}")]
    Wait(String),
}

/// `flashcopy-csi certs ...`.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create the CA, the agent, controller and snapshot-metadata certificates as Secrets if
    /// absent (never replacing one that exists, except a leaf within --renew-days of expiry),
    /// copy the CA bundle into them and into the SnapshotMetadataService object.
    Ensure(Config),
    /// One stage of a CA rotation (README, "Certificates"), then what `ensure` does. Wait for
    /// the kubelet to update the mounted Secrets between stages.
    Rotate {
        /// add-ca, then reissue, then drop-old-ca.
        #[arg(long, value_enum)]
        stage: Stage,
        /// The Secrets.
        #[command(flatten)]
        config: Config,
    },
}

/// The stages of a CA rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// A new CA signs from now on; every bundle trusts the new and the old CA.
    AddCa,
    /// Every leaf certificate re-issued by the (new) CA.
    Reissue,
    /// The bundles trust the signing CA alone.
    DropOldCa,
}

/// Names and lifetimes; the chart passes the Secret names of the release.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Namespace of the Secrets (the release namespace).
    #[arg(long)]
    pub namespace: String,
    /// The CA Secret (mounted nowhere).
    #[arg(long)]
    pub ca_secret: String,
    /// The agent's server certificate Secret (omit when the agent API is plaintext).
    #[arg(long)]
    pub agent_secret: Option<String>,
    /// The CSI controller's client certificate Secret (with --agent-secret).
    #[arg(long, requires = "agent_secret")]
    pub controller_secret: Option<String>,
    /// The csi-snapshot-metadata sidecar's server certificate Secret.
    #[arg(long, requires_all = ["snapshot_metadata_service", "snapshot_metadata_audience"])]
    pub snapshot_metadata_secret: Option<String>,
    /// The sidecar's Service: certificate names SERVICE, SERVICE.NAMESPACE, SERVICE.NAMESPACE.svc
    /// (and .cluster.local), address SERVICE.NAMESPACE.svc:PORT in the SnapshotMetadataService.
    #[arg(long)]
    pub snapshot_metadata_service: Option<String>,
    /// The Service's port.
    #[arg(long, default_value_t = 6443)]
    pub snapshot_metadata_port: u16,
    /// The audience backup clients' tokens must carry.
    #[arg(long)]
    pub snapshot_metadata_audience: Option<String>,
    /// The SnapshotMetadataService object's name: the CSI driver name.
    #[arg(long, default_value = "flashcopy.csi.io")]
    pub driver: String,
    /// Validity of a new CA, in days.
    #[arg(long, default_value_t = 3650)]
    pub ca_days: u32,
    /// Validity of a new leaf certificate, in days.
    #[arg(long, default_value_t = 730)]
    pub leaf_days: u32,
    /// A leaf with fewer days left is re-issued.
    #[arg(long, default_value_t = 30)]
    pub renew_days: u32,
    /// Then wait until each FILE exists (a Secret's ca.crt projected into the init container:
    /// the kubelet has updated the pod's Secret volumes, the main containers find their keys).
    #[arg(long, value_name = "FILE")]
    pub wait_for: Vec<PathBuf>,
    /// How long to wait for --wait-for, in seconds.
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
}

/// A certificate and its key, PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8).
    pub key: String,
}

/// What a leaf certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leaf {
    /// The agent API's server: DNS name [`crate::tls::AGENT_SERVER_NAME`], serverAuth.
    AgentServer,
    /// The CSI controller as the agents' client: clientAuth.
    ControllerClient,
    /// A TLS server for these DNS names (the csi-snapshot-metadata sidecar).
    Server(Vec<String>),
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // An hour back: nodes whose clocks lag a little accept a certificate made just now.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days.into());
}

/// A new self-signed CA.
pub fn new_ca(days: u32) -> Result<Pem, rcgen::Error> {
    let mut p = CertificateParams::default();
    // Distinct names, so that the two CAs of a rotation bundle tell apart.
    let name = format!(
        "flashcopy-csi CA {}",
        OffsetDateTime::now_utc().unix_timestamp()
    );
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, days);
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A leaf certificate signed by `ca`.
pub fn issue(ca: &Pem, leaf: &Leaf, days: u32) -> Result<Pem, rcgen::Error> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let (cn, names, eku) = match leaf {
        Leaf::AgentServer => (
            crate::tls::AGENT_SERVER_NAME.to_string(),
            vec![crate::tls::AGENT_SERVER_NAME.to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        Leaf::ControllerClient => (
            CONTROLLER_CN.to_string(),
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        Leaf::Server(names) => (
            names.first().cloned().unwrap_or_default(),
            names.clone(),
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
    };
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![eku];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, days);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The end of the first certificate's validity in a PEM text (unix seconds).
pub fn not_after(cert_pem: &str) -> Option<i64> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The certificates of a PEM bundle, each as its own PEM block (normalised).
fn split_bundle(bundle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in bundle.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END") {
            if !out.contains(&cur) {
                out.push(std::mem::take(&mut cur));
            } else {
                cur.clear();
            }
        }
    }
    out
}

/// What a run changed, for the log and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Objects created.
    pub created: Vec<String>,
    /// Leaves re-issued (expiry, or the reissue stage).
    pub reissued: Vec<String>,
    /// Objects whose CA bundle was updated.
    pub bundle_updated: Vec<String>,
}

fn data(s: &Secret, name: &str, key: &str) -> Result<String, CertsError> {
    let bytes = s
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| CertsError::Secret {
            name: name.into(),
            why: format!("no {key}"),
        })?;
    String::from_utf8(bytes.0.clone()).map_err(|_| CertsError::Secret {
        name: name.into(),
        why: format!("{key} is not PEM text"),
    })
}

fn secret_data(pem: &Pem, bundle: &str) -> BTreeMap<String, ByteString> {
    [
        (TLS_CERT, &pem.cert),
        (TLS_KEY, &pem.key),
        (CA_BUNDLE, &bundle.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
    .collect()
}

fn new_secret(name: &str, pem: &Pem, bundle: &str, ca: bool) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([(MANAGED_BY.0.into(), MANAGED_BY.1.into())].into()),
            ..Default::default()
        },
        // The CA Secret is Opaque: nothing should take it for a serving certificate.
        type_: Some(if ca { "Opaque" } else { "kubernetes.io/tls" }.into()),
        data: Some(secret_data(pem, bundle)),
        ..Default::default()
    }
}

/// Creates `secret` unless a Secret of that name exists; returns the one that is there and
/// whether this call created it (another replica may have won the race).
async fn create_or_get(api: &Api<Secret>, secret: Secret) -> Result<(Secret, bool), CertsError> {
    let name = secret.name_any();
    match api.create(&PostParams::default(), &secret).await {
        Ok(s) => Ok((s, true)),
        Err(kube::Error::Api(e)) if e.is_already_exists() => Ok((api.get(&name).await?, false)),
        Err(e) => Err(e.into()),
    }
}

/// Replaces some data keys, guarded by the resourceVersion read.
async fn patch_data(
    api: &Api<Secret>,
    s: &Secret,
    changes: &[(&str, &str)],
) -> Result<Secret, CertsError> {
    let data: serde_json::Map<_, _> = changes
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::to_value(ByteString(v.as_bytes().to_vec())).unwrap_or_default(),
            )
        })
        .collect();
    let patch = json!({"metadata": {"resourceVersion": s.resource_version()}, "data": data});
    Ok(api
        .patch(
            &s.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?)
}

fn sms_api(client: Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cbt.storage.k8s.io", "v1beta1", "SnapshotMetadataService");
    Api::all_with(
        client,
        &ApiResource::from_gvk_with_plural(&gvk, "snapshotmetadataservices"),
    )
}

/// `certs ensure`.
pub async fn ensure(client: Client, cfg: &Config) -> Result<Report, CertsError> {
    run(client, cfg, None).await
}

/// `certs rotate --stage STAGE`.
pub async fn rotate(client: Client, cfg: &Config, stage: Stage) -> Result<Report, CertsError> {
    run(client, cfg, Some(stage)).await
}

async fn run(client: Client, cfg: &Config, stage: Option<Stage>) -> Result<Report, CertsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let mut report = Report::default();

    // The CA: the signing pair and the bundle every party trusts.
    let (ca_secret, created) = match api.get_opt(&cfg.ca_secret).await? {
        Some(s) => (s, false),
        None => {
            let ca = new_ca(cfg.ca_days)?;
            create_or_get(&api, new_secret(&cfg.ca_secret, &ca, &ca.cert, true)).await?
        }
    };
    if created {
        tracing::info!(secret = %cfg.ca_secret, "created the CA");
        report.created.push(cfg.ca_secret.clone());
    }
    let name = &cfg.ca_secret;
    let mut ca = Pem {
        cert: data(&ca_secret, name, TLS_CERT)?,
        key: data(&ca_secret, name, TLS_KEY)?,
    };
    let mut bundle = data(&ca_secret, name, CA_BUNDLE).unwrap_or_else(|_| ca.cert.clone());
    match stage {
        Some(Stage::AddCa) => {
            let new = new_ca(cfg.ca_days)?;
            let mut certs = vec![new.cert.clone()];
            certs.extend(split_bundle(&bundle));
            bundle = certs.concat();
            patch_data(
                &api,
                &ca_secret,
                &[
                    (TLS_CERT, &new.cert),
                    (TLS_KEY, &new.key),
                    (CA_BUNDLE, &bundle),
                ],
            )
            .await?;
            ca = new;
            tracing::info!(secret = %name, "rotation: a new CA signs; the bundle holds both");
        }
        Some(Stage::DropOldCa) => {
            bundle = ca.cert.clone();
            patch_data(&api, &ca_secret, &[(CA_BUNDLE, &bundle)]).await?;
            tracing::info!(secret = %name, "rotation: the bundle holds the signing CA alone");
        }
        Some(Stage::Reissue) | None => {}
    }

    // The leaves.
    let mut leaves: Vec<(&str, Leaf)> = Vec::new();
    if let Some(n) = &cfg.agent_secret {
        leaves.push((n, Leaf::AgentServer));
    }
    if let Some(n) = &cfg.controller_secret {
        leaves.push((n, Leaf::ControllerClient));
    }
    let sms = match (
        &cfg.snapshot_metadata_secret,
        &cfg.snapshot_metadata_service,
        &cfg.snapshot_metadata_audience,
    ) {
        (Some(secret), Some(svc), Some(audience)) => {
            let ns = &cfg.namespace;
            let host = format!("{svc}.{ns}.svc");
            let names = vec![
                host.clone(),
                format!("{svc}.{ns}"),
                svc.clone(),
                format!("{host}.cluster.local"),
            ];
            leaves.push((secret, Leaf::Server(names)));
            Some((format!("{host}:{}", cfg.snapshot_metadata_port), audience))
        }
        _ => None,
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let renew_before = now + i64::from(cfg.renew_days) * 86_400;
    for (name, leaf) in leaves {
        let (s, created) = match api.get_opt(name).await? {
            Some(s) => (s, false),
            None => {
                let pem = issue(&ca, &leaf, cfg.leaf_days)?;
                create_or_get(&api, new_secret(name, &pem, &bundle, false)).await?
            }
        };
        if created {
            tracing::info!(secret = %name, "issued a certificate");
            report.created.push(name.to_string());
            continue;
        }
        let expiring = data(&s, name, TLS_CERT)
            .ok()
            .and_then(|c| not_after(&c))
            .is_none_or(|t| t < renew_before);
        if expiring || stage == Some(Stage::Reissue) {
            let pem = issue(&ca, &leaf, cfg.leaf_days)?;
            patch_data(
                &api,
                &s,
                &[
                    (TLS_CERT, &pem.cert),
                    (TLS_KEY, &pem.key),
                    (CA_BUNDLE, &bundle),
                ],
            )
            .await?;
            tracing::info!(secret = %name, expiring, "re-issued a certificate");
            report.reissued.push(name.to_string());
        } else if data(&s, name, CA_BUNDLE).ok().as_deref() != Some(bundle.as_str()) {
            patch_data(&api, &s, &[(CA_BUNDLE, &bundle)]).await?;
            tracing::info!(secret = %name, "updated the CA bundle");
            report.bundle_updated.push(name.to_string());
        }
    }

    // The SnapshotMetadataService: how backup clients find and verify the sidecar.
    if let Some((address, audience)) = sms {
        let api = sms_api(client);
        let ca_cert =
            serde_json::to_value(ByteString(bundle.clone().into_bytes())).unwrap_or_default();
        let spec = json!({"address": address, "audience": audience, "caCert": ca_cert});
        let label = format!("snapshotmetadataservice/{}", cfg.driver);
        match api.get_opt(&cfg.driver).await? {
            None => {
                let mut obj = DynamicObject::new(
                    &cfg.driver,
                    &ApiResource::from_gvk_with_plural(
                        &GroupVersionKind::gvk(
                            "cbt.storage.k8s.io",
                            "v1beta1",
                            "SnapshotMetadataService",
                        ),
                        "snapshotmetadataservices",
                    ),
                );
                obj.metadata.labels = Some([(MANAGED_BY.0.into(), MANAGED_BY.1.into())].into());
                obj.data = json!({"spec": spec});
                match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => report.created.push(label),
                    Err(kube::Error::Api(e)) if e.is_already_exists() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Some(cur) if cur.data.get("spec") != Some(&spec) => {
                let patch = json!({"metadata": {"resourceVersion": cur.resource_version()},
                                   "spec": spec});
                api.patch(&cfg.driver, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                tracing::info!(object = %label, "updated address, audience or CA bundle");
                report.bundle_updated.push(label);
            }
            Some(_) => {}
        }
    }
    Ok(report)
}

/// Waits until every file exists (see [`Config::wait_for`]).
pub async fn wait_for(files: &[PathBuf], within: Duration) -> Result<(), CertsError> {
    let t0 = std::time::Instant::now();
    for f in files {
        while !f.exists() {
            if t0.elapsed() > within {
                return Err(CertsError::Wait(format!(
                    "{} did not appear within {} s (the kubelet updates Secret volumes about \
                     once a minute)",
                    f.display(),
                    within.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    Ok(())
}

/// The `certs` process.
pub fn main(cmd: CertsCommand) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async {
        let client = Client::try_default().await?;
        let (cfg, report) = match &cmd {
            CertsCommand::Ensure(cfg) => (cfg, ensure(client, cfg).await?),
            CertsCommand::Rotate { stage, config } => {
                (config, rotate(client, config, *stage).await?)
            }
        };
        tracing::info!(
            created = ?report.created,
            reissued = ?report.reissued,
            bundle_updated = ?report.bundle_updated,
            "certificates in place"
        );
        wait_for(&cfg.wait_for, Duration::from_secs(cfg.wait_secs)).await?;
        Ok(())
    })
}
