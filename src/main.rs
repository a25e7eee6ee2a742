//! The `tollgate` command line. Only argument handling lives here; the work is in the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A multi-tenant API gateway: tenants, hashed API keys, Lua-free rules, limits and metering."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve traffic with a config file.
    Run {
        #[arg(short, long, default_value = "config/tollgate.toml")]
        config: PathBuf,
        /// Take over the listeners of a running instance (zero-downtime binary upgrade).
        #[arg(short, long)]
        upgrade: bool,
        /// Run in the background.
        #[arg(short, long)]
        daemon: bool,
    },
    /// Validate a config and print a summary, or every error.
    Check {
        #[arg(short, long, default_value = "config/tollgate.toml")]
        config: PathBuf,
    },
    /// Generate an API key: prints `key=<secret>` and `hash=sha256:<hex>`.
    Keygen {
        #[arg(long, default_value = tollgate::keys::DEFAULT_PREFIX)]
        prefix: String,
        /// Print a ready `[[tenants.keys]]` block instead.
        #[arg(long)]
        toml: bool,
        /// Key id for `--toml`.
        #[arg(long, default_value = "key-1")]
        id: String,
        /// Comma-separated scopes for `--toml`.
        #[arg(long, default_value = "read")]
        scopes: String,
    },
    /// Start an echo upstream and the gateway on config/demo.toml, and print curl commands.
    Demo {
        #[arg(short, long, default_value = "config/demo.toml")]
        config: PathBuf,
    },
    /// Inspect rules.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Usage reports, read straight from the configured store.
    Usage {
        #[command(subcommand)]
        command: UsageCommand,
    },
}

#[derive(Subcommand)]
enum UsageCommand {
    /// Per-metric totals, a daily breakdown and cost, over an inclusive range of UTC days.
    Report {
        #[arg(short, long, default_value = "config/tollgate.toml")]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        /// First day, YYYY-MM-DD.
        #[arg(long)]
        from: String,
        /// Last day, YYYY-MM-DD.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "json", value_parser = ["json", "csv"])]
        format: String,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Show which rule a request would match, why earlier rules did not, and the policy.
    Explain {
        #[arg(short, long, default_value = "config/tollgate.toml")]
        config: PathBuf,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Path, optionally with `?query`.
        #[arg(long)]
        path: String,
        #[arg(long, default_value = "")]
        host: String,
        #[arg(long)]
        tier: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// A request header, `name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, upgrade, daemon } => {
            match tollgate::app::run(&config, tollgate::app::RunOptions { upgrade, daemon }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => match tollgate::config::load(&config) {
            Ok(loaded) => {
                for w in loaded.warnings.warnings() {
                    eprintln!("{w}");
                }
                println!("ok: {}: {}", config.display(), loaded.config.summary());
                ExitCode::SUCCESS
            }
            Err(diags) => {
                eprintln!("{diags}");
                ExitCode::FAILURE
            }
        },
        Command::Keygen { prefix, toml, id, scopes } => {
            if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                eprintln!("the prefix may only hold letters, digits and `_`, like `tg_live` or `tg_test`");
                return ExitCode::FAILURE;
            }
            let k = tollgate::keys::generate(&prefix);
            if toml {
                let scopes: Vec<String> =
                    scopes.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| format!("\"{s}\"")).collect();
                println!("# secret (shown once, give it to the tenant): {}", k.secret);
                println!("[[tenants.keys]]");
                println!("id = \"{id}\"");
                println!("hash = \"{}\"", k.hash);
                println!("scopes = [{}]", scopes.join(", "));
            } else {
                println!("key={}", k.secret);
                println!("hash={}", k.hash);
            }
            ExitCode::SUCCESS
        }
        Command::Demo { config } => match tollgate::demo::run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Usage { command: UsageCommand::Report { config, tenant, from, to, format } } => {
            match tollgate::metering::report::cli(&config, &tenant, &from, &to, &format) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Rules { command: RulesCommand::Explain { config, method, path, host, tier, tenant, headers } } => {
            match tollgate::rules::explain::explain_cli(&config, &method, &path, &host, tier, tenant, &headers) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
