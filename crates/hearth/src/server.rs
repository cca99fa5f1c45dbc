//! `hearth server`: opens the store, bootstraps the first tenant, serves the
//! API and shuts down gracefully on SIGINT/SIGTERM.

use anyhow::Context;
use hearth_store::Store;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "HEARTH_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where the server keeps its files (SQLite database, admin token).
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = ".hearth")]
    data_dir: PathBuf,
    /// `postgres://…` for PostgreSQL, `sqlite://PATH`; default: SQLite in the data dir.
    #[arg(long, env = "HEARTH_DATABASE_URL")]
    database_url: Option<String>,
    /// Log line format.
    #[arg(long, env = "HEARTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Json,
    Pretty,
}

/// Name of the file in the data dir holding the first admin token.
const TOKEN_FILE: &str = "admin-token";
/// Written before the bootstrap transaction, renamed after it commits, so a
/// crash in between never loses the only admin token.
const PENDING_TOKEN_FILE: &str = "admin-token.pending";

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Pretty => builder.init(),
    }
}

async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.data_dir)
        .with_context(|| format!("cannot create the data dir {}", args.data_dir.display()))?;
    let store = hearth_store::open(args.database_url.as_deref(), &args.data_dir)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the store: {}", hearth_api::error::chain(&e)))?;
    tracing::info!(store = store.backend(), data_dir = %args.data_dir.display(), "store open, migrations applied");
    bootstrap(&store, &args.data_dir).await?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let app = hearth_api::router(hearth_api::AppState { store });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
}

/// On an empty store, creates the first tenant and its operator, prints the
/// token once and keeps it in a 0600 file of the data dir.
async fn bootstrap(store: &Arc<dyn Store>, data_dir: &Path) -> anyhow::Result<()> {
    let token_path = data_dir.join(TOKEN_FILE);
    let pending_path = data_dir.join(PENDING_TOKEN_FILE);
    let token = hearth_api::auth::issue_token(None);
    if store
        .list_tenants()
        .await
        .map(|t| t.is_empty())
        .unwrap_or(true)
    {
        write_secret(&pending_path, &token.text)?;
    }
    match store.bootstrap("default", "admin", &token.stored).await? {
        Some((tenant, identity)) => {
            if !pending_path.exists() {
                write_secret(&pending_path, &token.text)?;
            }
            fs::rename(&pending_path, &token_path)?;
            tracing::info!(tenant = %tenant.name, identity = %identity.name, path = %token_path.display(), "first start: tenant and operator token created");
            println!(
                "hearth: first start — created tenant \"{}\" and operator \"{}\".\nAdmin token (shown once; also saved to {}):\n  {}\n",
                tenant.name,
                identity.name,
                token_path.display(),
                token.text
            );
        }
        None => recover_pending(store, &pending_path, &token_path).await?,
    }
    Ok(())
}

/// A pending token left by a crash right after the bootstrap committed is
/// the only admin token: keep it if the store knows it, else drop it.
async fn recover_pending(
    store: &Arc<dyn Store>,
    pending: &Path,
    token_path: &Path,
) -> anyhow::Result<()> {
    let Ok(text) = fs::read_to_string(pending) else {
        return Ok(());
    };
    let known = match text
        .trim()
        .strip_prefix("hth_")
        .and_then(|r| r.split_once('_'))
    {
        Some((id, _)) => match id.parse() {
            Ok(id) => store
                .find_token(hearth_core::ids::TokenId(id))
                .await?
                .is_some(),
            Err(_) => false,
        },
        None => false,
    };
    if known && !token_path.exists() {
        fs::rename(pending, token_path)?;
        tracing::warn!(path = %token_path.display(), "recovered the admin token of an interrupted first start");
    } else {
        fs::remove_file(pending)?;
    }
    Ok(())
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(())
}
