//! `tnas-server`: loads the models, starts the compute worker, serves HTTP until SIGINT/SIGTERM.

use clap::Parser;
use tnas::server::{self, config::ServerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=info".into()),
        )
        .init();
    let config = ServerConfig::parse();
    if config.print_openapi {
        println!("{}", server::openapi::document());
        return Ok(());
    }
    let device = config.device.resolve().map_err(anyhow::Error::msg)?;
    let checkpoints = server::load_models(&config.models).map_err(anyhow::Error::msg)?;
    let state = server::build_state(&config, checkpoints, device).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port)).await?;
    tracing::info!(address = %listener.local_addr()?, device = %tnas::runtime::device::device_name(device), models = ?state.models.keys().collect::<Vec<_>>(), "serving");
    server::run(state, listener, shutdown_signal()).await?;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        tokio::signal::ctrl_c()
            .await
            .expect("SIGINT handler installs")
    };
    let terminate = async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs")
            .recv()
            .await;
    };
    tokio::select! { _ = interrupt => {}, _ = terminate => {} }
    tracing::info!("shutdown requested: finishing requests in flight");
}
