//! Binary: load settings, start tracing, run until SIGINT or SIGTERM.

// Every proxied request allocates and frees header maps and buffers on two worker
// threads; glibc's allocator showed up in the profile as lock waits, mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = gateway::Settings::load()?;
    shared::telemetry::init(&settings.log);
    let app = gateway::Application::build(settings).await?;
    app.run_until_stopped(shared::shutdown::on_signal()).await
}
