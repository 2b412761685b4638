//! The `flashcopy-csi` binary: parses the command line and hands over to the library.

use clap::Parser;
use flashcopy_csi::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo { data_dir, size_mib } => flashcopy_csi::demo::run(&data_dir, size_mib << 20),
        Command::Ls { data_dir, output } => flashcopy_csi::demo::ls(&data_dir, output),
    }
}
