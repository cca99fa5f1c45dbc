//! A PostgreSQL database of the benchmark's own, `hearth_bench_<uuid>`,
//! created on the admin URL's server and dropped (with `FORCE`) when the
//! value is dropped.

use anyhow::{Context, Result};
use sqlx::Connection;

/// A fresh database; dropped with this value.
#[derive(Debug)]
pub struct Database {
    admin_url: String,
    name: String,
    /// The URL the server connects to.
    pub url: String,
}

impl Database {
    /// Creates `hearth_bench_<uuid>` through `admin_url`
    /// (`postgres://user@host:port/dbname`).
    pub fn create(admin_url: &str) -> Result<Database> {
        let name = format!("hearth_bench_{}", uuid::Uuid::new_v4().simple());
        run(admin_url, &format!("CREATE DATABASE {name}"))
            .with_context(|| format!("cannot create the database {name} on {admin_url}"))?;
        let base = admin_url
            .rsplit_once('/')
            .map(|(base, _)| base)
            .context("the PostgreSQL URL has no database name")?;
        Ok(Database {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        match run(&self.admin_url, &sql) {
            Ok(()) => eprintln!("[bench] dropped database {}", self.name),
            Err(e) => eprintln!("[bench] cannot drop database {}: {e:#}", self.name),
        }
    }
}

/// Runs one statement on a connection of its own.
fn run(url: &str, sql: &str) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            sqlx::raw_sql(sql).execute(&mut conn).await?;
            conn.close().await?;
            anyhow::Ok(())
        })
}
