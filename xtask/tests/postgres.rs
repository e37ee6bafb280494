//! The throwaway PostgreSQL cluster that `cargo xtask up` and `cargo xtask test` start
//! when no `DATABASE_URL` is given.

use std::path::Path;

use xtask::{
    postgres::{Cluster, ServerTls},
    procs::Interrupt,
};

fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_throwaway_cluster_accepts_sqlx_and_a_migration_and_leaves_nothing() {
    let base = tempfile::tempdir().expect("temp dir");
    let root = base.path().join("pg");
    let interrupt = Interrupt::install().expect("signal handlers");
    // Started from the test's own thread: the server's parent-death signal fires when
    // the thread that spawned it ends, and a pool thread ends when it idles.
    let cluster = Cluster::start(&root, false, &interrupt).expect("cluster starts");
    let url = cluster.url(xtask::postgres::DATABASE);

    let pool = sqlx::PgPool::connect(&url).await.expect("sqlx connects");
    sqlx::migrate!("tests/migrations")
        .run(&pool)
        .await
        .expect("migration applies");
    sqlx::query("INSERT INTO probe (label) VALUES ('a')")
        .execute(&pool)
        .await
        .expect("insert");
    let duplicate = sqlx::query("INSERT INTO probe (label) VALUES ('a')")
        .execute(&pool)
        .await
        .expect_err("the migration's constraint holds");
    assert_eq!(
        duplicate
            .as_database_error()
            .and_then(|e| e.constraint())
            .unwrap_or_default(),
        "probe_label_unique"
    );
    let wrong_password = url.replacen("postgres:", "postgres:wrong", 1);
    use sqlx::Connection;
    assert!(
        sqlx::PgConnection::connect(&wrong_password).await.is_err(),
        "the cluster checks passwords"
    );
    pool.close().await;

    let server_pid = cluster.pid();
    let data_root = cluster.root().to_path_buf();
    assert!(process_alive(server_pid));
    drop(cluster);
    assert!(!process_alive(server_pid), "postgres stopped on drop");
    assert!(!Path::new(&data_root).exists(), "its files were removed");
}

#[tokio::test]
async fn a_kept_cluster_restarts_with_its_data() {
    let base = tempfile::tempdir().expect("temp dir");
    let root = base.path().join("durable");
    let start = |root: std::path::PathBuf| {
        let interrupt = Interrupt::install().expect("signal handlers");
        Cluster::start(&root, true, &interrupt)
    };
    let first = start(root.clone()).expect("first start");
    let pool = sqlx::PgPool::connect(&first.url(xtask::postgres::DATABASE))
        .await
        .expect("connect");
    sqlx::raw_sql("CREATE TABLE kept (v INT); INSERT INTO kept VALUES (42)")
        .execute(&pool)
        .await
        .expect("write");
    pool.close().await;
    drop(first);

    let second = start(root.clone()).expect("restart");
    let pool = sqlx::PgPool::connect(&second.url(xtask::postgres::DATABASE))
        .await
        .expect("reconnect");
    let v: i32 = sqlx::query_scalar("SELECT v FROM kept")
        .fetch_one(&pool)
        .await
        .expect("data survived");
    assert_eq!(v, 42);
}

/// The throwaway cluster skips disk flushes but not synchronous commits: a server that
/// crashes (an immediate shutdown, as the chaos scenario does) right after its commits
/// were acknowledged has every one of them after its restart.
#[tokio::test]
async fn a_crashed_throwaway_cluster_restarts_with_every_acknowledged_commit() {
    let base = tempfile::tempdir().expect("temp dir");
    let interrupt = Interrupt::install().expect("signal handlers");
    let mut cluster = Cluster::start(&base.path().join("pg"), false, &interrupt).expect("start");
    let url = cluster.url(xtask::postgres::DATABASE);
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::raw_sql("CREATE TABLE acknowledged (n INT PRIMARY KEY)")
        .execute(&pool)
        .await
        .expect("create");
    for n in 0..200 {
        sqlx::query("INSERT INTO acknowledged VALUES ($1)")
            .bind(n)
            .execute(&pool)
            .await
            .expect("commit acknowledged");
    }
    pool.close().await;
    let crashed = cluster.pid();
    cluster.stop_immediately();
    assert!(!process_alive(crashed), "the server is gone");
    assert!(cluster.exited().is_some(), "the crash is reported");
    cluster.restart(&interrupt).expect("crash recovery");
    let pool = sqlx::PgPool::connect(&url)
        .await
        .expect("reconnect on the same port");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM acknowledged")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(kept, 200, "every acknowledged commit survived the crash");
}

/// A CA, and a certificate it signed for 127.0.0.1, written into `dir`: returns the
/// CA's file and the server's certificate and key.
fn pki(dir: &Path, name: &str) -> (std::path::PathBuf, ServerTls) {
    let ca = xtask::tls::Authority::generate(name).expect("CA");
    let server = ca.issue(dir, &format!("{name}-server")).expect("issued");
    (
        ca.write_pem(&dir.join(format!("{name}-ca.pem")))
            .expect("CA file"),
        ServerTls {
            certificate: server.certificate,
            key: server.key,
        },
    )
}

#[tokio::test]
async fn services_connect_with_verify_full_to_a_cluster_serving_a_trusted_certificate() {
    let base = tempfile::tempdir().expect("temp dir");
    let (ca, tls) = pki(base.path(), "ours");
    let (other_ca, _) = pki(base.path(), "other");
    let interrupt = Interrupt::install().expect("signal handlers");
    let cluster = Cluster::start_with(&base.path().join("pg"), false, Some(&tls), &interrupt)
        .expect("a cluster serving TLS starts");
    let url = cluster.url(xtask::postgres::DATABASE);
    let separator = if url.contains('?') { '&' } else { '?' };
    let with_root = |root: &Path| {
        format!(
            "{url}{separator}sslmode=verify-full&sslrootcert={}",
            root.display()
        )
    };
    let settings = |url: String| shared::config::DatabaseSettings {
        url,
        ..Default::default()
    };

    // As a service connects: its pool, with the cluster's CA as the root.
    let pool = shared::db::connect_lazy(&settings(with_root(&ca)), "public").expect("url");
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .expect("connects over verified TLS");
    assert!(encrypted, "the connection is encrypted");
    pool.close().await;

    // A server whose certificate another CA signed is refused.
    let pool = shared::db::connect_lazy(&settings(with_root(&other_ca)), "public").expect("url");
    let refused = sqlx::query("SELECT 1")
        .fetch_one(&pool)
        .await
        .expect_err("an untrusted certificate is refused");
    assert!(
        format!("{refused:?}")
            .to_lowercase()
            .contains("certificate"),
        "the error names the certificate: {refused:?}"
    );
}
