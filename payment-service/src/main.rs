//! Binary: load settings, start tracing, run until SIGINT or SIGTERM.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = payment_service::Settings::load()?;
    let _spans = shared::telemetry::init(
        payment_service::SERVICE_NAME,
        &settings.log,
        &settings.tracing,
    )
    .map_err(anyhow::Error::msg)?;
    let app = payment_service::Application::build(settings).await?;
    app.run_until_stopped(shared::shutdown::on_signal()).await
}
