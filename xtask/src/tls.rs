//! Throwaway TLS material for the local stack (`cargo xtask up --tls`) and the tests:
//! a CA generated on the spot, and server certificates it signs for loopback. Nothing
//! here is for production, where certificates come from the operator's own CA.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate authority that lives as long as this value.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// A server certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// The key (PKCS#8) followed by the certificate, in one file: the form Kafka's
    /// `ssl.keystore.type=PEM` reads.
    pub key_and_certificate: PathBuf,
}

impl Authority {
    /// A new CA named `name`.
    pub fn generate(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        params.distinguished_name = subject;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)
            .context("cannot make a CA certificate")?;
        Ok(Self { issuer })
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA's certificate to `path`.
    pub fn write_pem(&self, path: &Path) -> anyhow::Result<PathBuf> {
        std::fs::write(path, self.pem())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path.to_path_buf())
    }

    /// A server certificate for `localhost` and 127.0.0.1, written into `dir` as
    /// `<name>.crt`, `<name>.key` and `<name>.pem` (key then certificate).
    pub fn issue(&self, dir: &Path, name: &str) -> anyhow::Result<ServerFiles> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        params.distinguished_name = subject;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let key = KeyPair::generate()?;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("cannot sign a certificate for {name}"))?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let write = |file: String, text: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(file);
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            restrict(&path)?;
            Ok(path)
        };
        let key_pem = key.serialize_pem();
        Ok(ServerFiles {
            certificate: write(format!("{name}.crt"), &certificate.pem())?,
            key: write(format!("{name}.key"), &key_pem)?,
            key_and_certificate: write(
                format!("{name}.pem"),
                &format!("{key_pem}{}", certificate.pem()),
            )?,
        })
    }
}

/// Owner-only permissions: the files hold private keys.
fn restrict(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_certificate_names_loopback_and_its_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Authority::generate("test CA").expect("CA");
        let files = ca.issue(dir.path(), "broker").expect("issued");
        let both = std::fs::read_to_string(&files.key_and_certificate).expect("read");
        assert!(
            both.starts_with("-----BEGIN PRIVATE KEY-----"),
            "PKCS#8 key first"
        );
        assert!(both.contains("-----BEGIN CERTIFICATE-----"));
        let mode = std::fs::metadata(&files.key)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "no one else reads the key");
        assert!(ca.pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
