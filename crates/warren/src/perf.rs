use clap::Args;
#[derive(Args)]
pub struct PerfArgs {}
pub async fn run(_args: PerfArgs) -> anyhow::Result<()> {
    Ok(())
}
