//! The `flashcopy-csi` binary: parses the command line and hands over to the library.

use clap::Parser;
use flashcopy_csi::cli::{Cli, Command, CsiCommand};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // The agent is a daemon: its default log level tells what it does.
    let level = match &cli.command {
        Command::Fc(_)
        | Command::Standalone(flashcopy_csi::standalone::Config { demo: true, .. }) => "warn",
        #[cfg(feature = "kubernetes")]
        Command::Crd => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: container logs and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Agent(cfg) => flashcopy_csi::agent::main(cfg)?,
        Command::Fc(args) => return Ok(flashcopy_csi::fc::main(args)),
        Command::Csi(CsiCommand::Controller(cfg)) => flashcopy_csi::csi::controller_main(cfg)?,
        Command::Csi(CsiCommand::Node(cfg)) => flashcopy_csi::csi::node::node_main(cfg)?,
        Command::Standalone(cfg) => flashcopy_csi::standalone::main(cfg)?,
        #[cfg(feature = "kubernetes")]
        Command::SnapshotController(cfg) => flashcopy_csi::k8s::run::main(cfg)?,
        #[cfg(feature = "kubernetes")]
        Command::KubeSync(cfg) => flashcopy_csi::k8s::sync::main(cfg)?,
        #[cfg(feature = "kubernetes")]
        Command::Certs(cmd) => flashcopy_csi::k8s::certs::main(cmd)?,
        #[cfg(feature = "kubernetes")]
        Command::Crd => print!("{}", flashcopy_csi::k8s::crd::crd_yaml()?),
    }
    Ok(ExitCode::SUCCESS)
}
