//! Binary: load settings, start tracing, run until SIGINT or SIGTERM.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = gateway::Settings::load()?;
    let _spans = shared::telemetry::init_exporting_only(
        gateway::SERVICE_NAME,
        &settings.log,
        &settings.tracing,
    )
    .map_err(anyhow::Error::msg)?;
    let app = gateway::Application::build(settings).await?;
    app.run_until_stopped(shared::shutdown::on_signal()).await
}
