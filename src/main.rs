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
    /// Manage tenants through the admin API of a running gateway.
    Tenants {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: TenantsCommand,
    },
    /// Manage API keys through the admin API of a running gateway.
    Keys {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Reload the config file of a running gateway through its admin API.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
        /// Apply the file even if it removes every tenant, every key, the admin token, or more
        /// than `[admin] reload_max_removed_fraction` of the tenants (invalid files are still
        /// refused).
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The admin listener.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
    admin_url: String,
    /// The admin token (its SHA-256 is `[admin] token_hash` in the config).
    #[arg(long, global = true, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
}

#[derive(Subcommand)]
enum TenantsCommand {
    /// List tenants.
    List {
        #[arg(long)]
        tier: Option<String>,
        #[arg(long)]
        status: Option<String>,
    },
    /// Create a tenant.
    Create {
        id: String,
        #[arg(long)]
        tier: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        email: Option<String>,
        /// Repeatable.
        #[arg(long = "subdomain")]
        subdomains: Vec<String>,
    },
    /// Show one tenant.
    Get { id: String },
    /// Suspend a tenant: its keys answer 403 until it is reactivated.
    Suspend { id: String },
    /// Reactivate a suspended tenant.
    Reactivate { id: String },
    /// Move a tenant to another tier; the new limits apply on its next request.
    SetTier { id: String, tier: String },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// List a tenant's keys (never secrets).
    List { tenant: String },
    /// Create a key; the secret is printed once.
    Create {
        tenant: String,
        #[arg(long)]
        name: Option<String>,
        /// Comma-separated.
        #[arg(long, default_value = "read")]
        scopes: String,
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// Revoke a key now.
    Revoke { key_id: String },
    /// Replace a key; the old one keeps working for the grace period.
    Rotate {
        key_id: String,
        #[arg(long, default_value_t = 24)]
        grace_period_hours: u32,
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
        Command::Tenants { admin, command } => {
            use serde_json::json;
            let (method, path, body) = match command {
                TenantsCommand::List { tier, status } => {
                    let mut q = Vec::new();
                    if let Some(t) = tier {
                        q.push(format!("tier={t}"));
                    }
                    if let Some(s) = status {
                        q.push(format!("status={s}"));
                    }
                    ("GET", format!("/v1/tenants?{}", q.join("&")), None)
                }
                TenantsCommand::Create { id, tier, name, email, subdomains } => (
                    "POST",
                    "/v1/tenants".to_string(),
                    Some(json!({"id": id, "tier": tier, "name": name, "email": email, "subdomains": subdomains})),
                ),
                TenantsCommand::Get { id } => ("GET", format!("/v1/tenants/{id}"), None),
                TenantsCommand::Suspend { id } => ("POST", format!("/v1/tenants/{id}/suspend"), None),
                TenantsCommand::Reactivate { id } => ("POST", format!("/v1/tenants/{id}/reactivate"), None),
                TenantsCommand::SetTier { id, tier } => {
                    ("PUT", format!("/v1/tenants/{id}/tier"), Some(json!({"tier": tier})))
                }
            };
            admin_call(&admin, method, &path, body)
        }
        Command::Keys { admin, command } => {
            use serde_json::json;
            let (method, path, body) = match command {
                KeysCommand::List { tenant } => ("GET", format!("/v1/tenants/{tenant}/keys"), None),
                KeysCommand::Create { tenant, name, scopes, expires_in_days } => {
                    let scopes: Vec<&str> = scopes.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
                    (
                        "POST",
                        format!("/v1/tenants/{tenant}/keys"),
                        Some(json!({"name": name, "scopes": scopes, "expires_in_days": expires_in_days})),
                    )
                }
                KeysCommand::Revoke { key_id } => ("DELETE", format!("/v1/keys/{key_id}"), None),
                KeysCommand::Rotate { key_id, grace_period_hours } => (
                    "POST",
                    format!("/v1/keys/{key_id}/rotate"),
                    Some(json!({"grace_period_hours": grace_period_hours})),
                ),
            };
            admin_call(&admin, method, &path, body)
        }
        Command::Reload { admin, force } => {
            let path = if force { "/v1/reload?force=true" } else { "/v1/reload" };
            admin_call(&admin, "POST", path, None)
        }
        Command::Usage { command: UsageCommand::Report { config, tenant, from, to, format } } => {
            match tollgate::cli::usage_report(&config, &tenant, &from, &to, &format) {
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
            match tollgate::cli::explain_cli(&config, &method, &path, &host, tier, tenant, &headers) {
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

fn admin_call(admin: &AdminArgs, method: &str, path: &str, body: Option<serde_json::Value>) -> ExitCode {
    if admin.token.is_empty() {
        eprintln!("set TOLLGATE_ADMIN_TOKEN (or --token) to the admin token");
        return ExitCode::FAILURE;
    }
    // Drop nulls: the API rejects unknown fields, not absent ones.
    let body = body.map(|mut b| {
        if let Some(o) = b.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        b
    });
    match tollgate::admin::client::call(&admin.admin_url, &admin.token, method, path, body.as_ref())
        .and_then(tollgate::admin::client::render)
    {
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
