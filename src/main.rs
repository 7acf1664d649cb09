//! The `mtunnel` binary: parses the command line ([`cli`]), sets up logging and dispatches
//! each subcommand, to the library or to its glue in `cli::*` (`serve`, `cleanup`, `vm`,
//! `migrate`, `token`). The `handlers` commands are the two small functions below. Errors
//! are printed with their context chain.

mod bench;
mod cli;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Command, HandlersCommand, NodeArgs, TokenCommand, bench_options, load_config};

fn main() {
    // Installed (or symlinked) as `proxmox-websocket-tunnel`, we are that helper: a PVE source
    // runs it without arguments and speaks to it over stdin/stdout.
    let invoked_as = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let cli = if invoked_as.as_deref() == Some("proxmox-websocket-tunnel") {
        Cli {
            command: Command::Tunnel,
        }
    } else {
        Cli::parse()
    };
    // Spec runs report through their own output; only problems go to the log by default.
    let default_level = match cli.command {
        Command::Handlers(HandlersCommand::Test { .. }) => "error",
        Command::Bench(_) | Command::BenchRelay { .. } => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MTUNNEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // Under systemd, stderr goes to the journal, which stamps each line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        log.without_time().init();
    } else {
        log.init();
    }
    let result = match cli.command {
        Command::Serve(args) => run_async(cli::serve::serve(args)),
        Command::Token(TokenCommand::Create(args)) => cli::token::create(args),
        Command::Tunnel => run_async(mtunnel::client::tunnel::run_stdio()),
        Command::Vm(cmd) => run_async(cli::vm::run(cmd)),
        Command::Cleanup { dry_run, node } => run_async(cli::serve::cleanup(node, dry_run)),
        Command::Migrate(args) => run_async(cli::migrate::run(args)),
        Command::Replicate(args) => run_async(cli::replica::replicate(args)),
        Command::Replica(cmd) => run_async(cli::replica::run(cmd)),
        Command::Doctor(args) => run_async(cli::doctor::run(args)),
        Command::Handlers(HandlersCommand::Check { dir, node }) => handlers_check(dir, &node),
        Command::Handlers(HandlersCommand::Test { dir, filter }) => {
            run_async(handlers_test(dir, filter))
        }
        Command::Bench(args) => run_async(bench::run(bench_options(args))),
        Command::BenchRelay {
            listen,
            connect,
            ws,
        } => run_async(bench::relay::run(listen, connect, ws)),
        Command::GenerateDocs { dir } => cli::docs::generate(&dir),
    };
    if let Err(e) = result {
        eprintln!("mtunnel: error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs `fut` on a fresh runtime. Tasks still running when it returns (tunnels that did
/// not finish their cleanup within `shutdown_timeout`) are dropped, and blocking threads
/// get a moment before the process exits anyway, so a stuck command cannot hold it.
fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(fut);
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

fn handlers_check(dir: Option<PathBuf>, node: &NodeArgs) -> anyhow::Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => load_config(node, None)?.handlers_dir,
    };
    // a cookbook (examples/handlers/): each recipe is checked on its own
    let mut failed = 0;
    match mtunnel::script::recipe_dirs(&dir) {
        Some(recipes) => {
            for recipe in recipes {
                println!("== {}", recipe.display());
                failed += check_handler_set(&recipe)?;
            }
        }
        None => failed += check_handler_set(&dir)?,
    }
    if failed > 0 {
        anyhow::bail!("{failed} handler(s) refused");
    }
    Ok(())
}

/// Prints one line per handler of the built-ins overridden by `dir`; returns the refusals.
fn check_handler_set(dir: &std::path::Path) -> anyhow::Result<usize> {
    let results = mtunnel::script::check_handlers(Some(dir))?;
    let mut failed = 0;
    for (cmd, result) in &results {
        match result {
            Ok(desc) => println!("ok    {cmd}: {desc}"),
            Err(e) => {
                failed += 1;
                println!("FAIL  {cmd}: {e}");
            }
        }
    }
    println!("{} handlers, {failed} refused", results.len());
    Ok(failed)
}

async fn handlers_test(dir: Option<PathBuf>, filter: Option<String>) -> anyhow::Result<()> {
    let opts = mtunnel::script::spec::SpecOptions { dir, filter };
    let mut out = std::io::stdout();
    let summary = mtunnel::script::spec::run_specs(&opts, &mut out).await?;
    if summary.failed > 0 {
        anyhow::bail!("{} spec case(s) failed", summary.failed);
    }
    Ok(())
}
