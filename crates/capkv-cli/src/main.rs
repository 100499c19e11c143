//! `capkv`: the server, the playground and the client commands.

mod bench_cmd;
mod check_cmd;
mod client_cmd;
mod playground;
mod server_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capkv",
    version,
    about = "capkv: a partitioned, Raft-replicated key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Server(server_cmd::ServerArgs),
    /// Run a local cluster of child `capkv server` processes until Ctrl-C.
    Playground(playground::PlaygroundArgs),
    /// Write a key.
    Put(client_cmd::PutArgs),
    /// Read a key (exit 0 found, 1 not found, 2 error).
    Get(client_cmd::GetArgs),
    /// Delete a key (exit 0 deleted, 1 not found, 2 error).
    Del(client_cmd::DelArgs),
    /// List keys in byte order: KEY<TAB>VALUE lines.
    Scan(client_cmd::ScanArgs),
    /// Nodes, partitions, leaders, terms and applied indexes.
    Status(client_cmd::StatusArgs),
    /// Jepsen-style check: workload + faults + checkers (exit 0 valid, 1 invalid, 2 no verdict).
    Check(check_cmd::CheckArgs),
    /// Closed-loop load generator against capkv or etcd (docs/benchmarks.md).
    Bench(bench_cmd::BenchArgs),
}

/// mimalloc: measured put-16 server CPU per op 0.425 -> 0.39 ms and get-16 +9 % against
/// glibc malloc (docs/benchmarks.md); allocation-heavy paths are HTTP/2 frames and Raft entries.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Server(a) = &cli.command {
        builder.worker_threads(server_cmd::worker_threads(a));
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Server(a) => server_cmd::run(a).await,
            Command::Playground(a) => playground::run(a).await,
            Command::Put(a) => client_cmd::put(a).await,
            Command::Get(a) => client_cmd::get(a).await,
            Command::Del(a) => client_cmd::del(a).await,
            Command::Scan(a) => client_cmd::scan(a).await,
            Command::Status(a) => client_cmd::status(a).await,
            Command::Check(a) => check_cmd::run(a).await,
            Command::Bench(a) => bench_cmd::run(a).await,
        }
    });
    std::process::exit(code);
}

/// Logs to stderr; `RUST_LOG` overrides the default level.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person watching; log files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn a_server_runs_at_least_one_worker_thread() {
        use clap::Parser;
        let server = |args: &[&str]| match super::Cli::try_parse_from(
            ["capkv", "server"].iter().chain(args),
        ) {
            Ok(super::Cli {
                command: super::Command::Server(a),
            }) => Ok(super::server_cmd::worker_threads(&a)),
            Ok(_) => panic!("not the server command"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(server(&["--worker-threads", "3"]), Ok(3));
        assert!(server(&[]).unwrap() >= 1);
        let zero = server(&["--worker-threads", "0"]).unwrap_err();
        assert!(zero.contains("--worker-threads"), "{zero}");
    }
}
