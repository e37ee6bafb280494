//! Tools xtask installs on first use, into a folder outside the checkout so every
//! later clone on the machine reuses them: Apache Kafka's jars (Maven Central, see
//! `crate::broker`), the real Eureka client the registry's tests talk to, the SMTP
//! sink and the schemathesis fuzzer (PyPI), and newman (npm). Each install holds a lock file, so parallel tests or
//! two terminals never install the same tool twice.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::procs::{self, Interrupt};

/// The pinned py-eureka-client, a Eureka client written by someone else.
pub const PY_EUREKA_CLIENT: &str = "py-eureka-client==0.13.3";

/// `STOREFRONT_TOOLS_DIR`, else the user's cache folder.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STOREFRONT_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("storefront").join("tools")
}

/// Runs `install` once to create `marker` inside `root`, under `root`'s lock file.
/// Returns at once when `marker` already exists.
pub fn install_once(
    root: &Path,
    marker: &Path,
    announce: &str,
    install: &mut Command,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    install_once_with(root, marker, announce, || {
        procs::run(announce, install, interrupt)
    })
}

/// [`install_once`] with the install as a function: it runs only when `marker` is
/// missing, under `root`'s lock file, and must create `marker`.
pub fn install_once_with(
    root: &Path,
    marker: &Path,
    announce: &str,
    install: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if marker.exists() {
        return Ok(());
    }
    fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let lock_file = fs::File::create(root.with_extension("lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("cannot lock the tools folder")?;
    if marker.exists() {
        return Ok(());
    }
    eprintln!("xtask: {announce}");
    install()?;
    if !marker.exists() {
        bail!("the install finished but {} is missing", marker.display());
    }
    Ok(())
}

/// Resolves the dependencies of the small Maven project `xtask/maven/<project>` from
/// Maven Central into `out` (`mvn dependency:copy-dependencies`, Maven's own
/// repository in the tools folder), with any `extra` arguments.
pub fn maven_copy_dependencies(
    project: &str,
    out: &Path,
    extra: &[&str],
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let pom = crate::workspace_root()
        .join("xtask")
        .join("maven")
        .join(project)
        .join("pom.xml");
    let mvn = debian_tool("mvn", "maven")?;
    let mut resolve = Command::new(mvn);
    resolve
        .args(["--batch-mode", "--quiet", "-Dstyle.color=never", "--file"])
        .arg(&pom)
        .arg(format!(
            "-Dmaven.repo.local={}",
            tools_dir().join("maven-repository").display()
        ))
        .arg("dependency:copy-dependencies")
        .arg(format!("-DoutputDirectory={}", out.display()))
        .args(extra)
        .stdin(std::process::Stdio::null());
    procs::run("mvn dependency:copy-dependencies", &mut resolve, interrupt)
}

/// The pinned aiosmtpd, the SMTP server the local stack and the tests use as a mail
/// sink (its `Mailbox` handler writes every message into a Maildir).
pub const AIOSMTPD: &str = "aiosmtpd==1.4.6";

/// A folder holding py-eureka-client and its dependencies, for `PYTHONPATH`.
pub fn python_eureka_client(interrupt: &Interrupt) -> anyhow::Result<PathBuf> {
    python_package(PY_EUREKA_CLIENT, "py_eureka_client", interrupt)
}

/// A folder holding aiosmtpd and its dependencies, for `PYTHONPATH`.
pub fn aiosmtpd(interrupt: &Interrupt) -> anyhow::Result<PathBuf> {
    python_package(AIOSMTPD, "aiosmtpd", interrupt)
}

/// `PYTHONPATH` for every Python tool the tests use.
pub fn python_path(interrupt: &Interrupt) -> anyhow::Result<std::ffi::OsString> {
    Ok(std::env::join_paths([
        python_eureka_client(interrupt)?,
        aiosmtpd(interrupt)?,
    ])?)
}

/// The pinned schemathesis, the OpenAPI fuzzer the tests run against every document.
pub const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// A folder holding schemathesis and its dependencies, for `PYTHONPATH` (kept apart
/// from [`python_path`]: it brings many packages the other tools do not need). Run it
/// as `python3 -m schemathesis.cli`.
pub fn schemathesis(interrupt: &Interrupt) -> anyhow::Result<PathBuf> {
    python_package(SCHEMATHESIS, "schemathesis", interrupt)
}

/// Installs the pinned PyPI package `spec` (whose import name is `module`) into its own
/// folder under the tools folder; returns the folder for `PYTHONPATH`.
fn python_package(spec: &str, module: &str, interrupt: &Interrupt) -> anyhow::Result<PathBuf> {
    let root = tools_dir().join(spec.replace("==", "-"));
    let site = root.join("site");
    let mut install = Command::new("python3");
    install
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--target")
        .arg(&site)
        .arg(spec);
    install_once(
        &root,
        &site.join(module),
        &format!("installing {spec} (PyPI) into {}", root.display()),
        &mut install,
        interrupt,
    )?;
    Ok(site)
}

/// The pinned newman, Postman's command-line collection runner (npm).
pub const NEWMAN: &str = "newman@6.2.1";

/// The newman executable, installed first if missing. Needs `npm`: as root on Debian
/// it is installed with apt when absent; otherwise the error says what to install.
pub fn newman(interrupt: &Interrupt) -> anyhow::Result<PathBuf> {
    let npm = debian_tool("npm", "npm")?;
    let root = tools_dir().join(NEWMAN.replace('@', "-"));
    let bin = root.join("node_modules").join(".bin").join("newman");
    let mut install = Command::new(npm);
    install
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(&root)
        .arg(NEWMAN);
    install_once(
        &root,
        &bin,
        &format!("installing {NEWMAN} (npm) into {}", root.display()),
        &mut install,
        interrupt,
    )?;
    Ok(bin)
}

/// `binary` on the PATH (or in `/usr/sbin`), installing Debian `package` with apt if
/// it is missing and xtask runs as root.
pub fn debian_tool(binary: &str, package: &str) -> anyhow::Result<PathBuf> {
    let find = || {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/usr/bin".into()])
            .map(|d| d.join(binary))
            .find(|p| p.is_file())
    };
    if let Some(path) = find() {
        return Ok(path);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("{binary} is missing: install Debian's {package} (sudo apt-get install {package})");
    }
    eprintln!("xtask: installing {package} (Debian)");
    crate::postgres::apt_install(&[package])?;
    find().with_context(|| format!("{package} installed but {binary} not found"))
}

/// The Spring programs under `interop/` (`eureka-client`, `eureka-server`, `gateway`),
/// all on one pinned Spring Boot and Spring Cloud release.
pub const SPRING_PROGRAMS: [&str; 3] = ["eureka-client", "eureka-server", "gateway"];

/// The Spring program `interop/<name>`, built with Maven into cargo's target folder
/// (Maven's repository in the tools folder, so only the first build downloads
/// Spring); returns its executable jar. Built once per xtask run: later calls return
/// the jar at once.
pub fn spring_program(name: &str, interrupt: &Interrupt) -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    if !SPRING_PROGRAMS.contains(&name) {
        bail!("no Spring program `{name}` under interop/");
    }
    let project = crate::workspace_root().join("interop").join(name);
    let out = crate::target_dir().join("interop").join(name);
    let jar = out.join(format!("{name}.jar"));
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.iter().any(|b| b == name) {
        return Ok(jar);
    }
    let mvn = debian_tool("mvn", "maven")?;
    let mut build = Command::new(mvn);
    build
        .args([
            "--batch-mode",
            "--quiet",
            "-Dstyle.color=never",
            "-DskipTests",
        ])
        .arg("--file")
        .arg(project.join("pom.xml"))
        .arg(format!(
            "-Dmaven.repo.local={}",
            tools_dir().join("maven-repository").display()
        ))
        .arg(format!("-Dstorefront.build.directory={}", out.display()))
        .arg("package")
        .stdin(std::process::Stdio::null());
    // Maven's output goes to a log, shown only when the build fails: Debian's Maven
    // writes terminal reset codes even in batch mode.
    fs::create_dir_all(&out)?;
    let log_path = out.join("maven.log");
    let log = fs::File::create(&log_path)?;
    build.stdout(log.try_clone()?).stderr(log);
    if let Err(e) = procs::run(
        &format!("mvn package (interop/{name})"),
        &mut build,
        interrupt,
    ) {
        let said = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = said.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{e}; Maven said:\n{}", tail.join("\n"));
    }
    if !jar.exists() {
        bail!("Maven finished but {} is missing", jar.display());
    }
    built.push(name.to_owned());
    Ok(jar)
}
