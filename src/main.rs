//! The `tollgate` command line. Only argument handling lives here; the work is in the library.

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use tollgate::admin::client::segment;

/// Pingora and the pipeline allocate and free small objects on every request; mimalloc serves
/// them from per-thread pages, which measured faster than the system allocator on the proxy hop
/// (docs/performance.md, "The hot path").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// The config file.
        #[arg(short, long, default_value = "config/tollgate.toml")]
        config: PathBuf,
        /// Take over the listeners of a running instance (zero-downtime binary upgrade).
        #[arg(short, long)]
        upgrade: bool,
        /// Run in the background and write `server.pid_file`. Returns once the gateway listens
        /// (exit 0), or exits 1 if it stopped before it could.
        #[arg(short, long)]
        daemon: bool,
    },
    /// Validate a config and print a summary, or every error.
    Check {
        /// The config file.
        #[arg(short, long, default_value = "config/tollgate.toml")]
        config: PathBuf,
    },
    /// Generate an API key: prints `key=<secret>` and `hash=sha256:<hex>`.
    Keygen {
        /// The start of the secret: letters, digits and `_` (`tg_admin` for an admin token).
        #[arg(long, default_value = tollgate::keys::DEFAULT_PREFIX)]
        prefix: String,
        /// Print a `[[tenants.keys]]` block on stdout (ready to append to a config) and the
        /// secret on stderr.
        #[arg(long)]
        toml: bool,
        /// Key id for `--toml`.
        #[arg(long, default_value = "key-1")]
        id: String,
        /// Comma-separated scopes for `--toml`, like `read,generate`. Default: none, as in the
        /// config file.
        #[arg(long, default_value = "")]
        scopes: String,
    },
    /// Start an echo upstream and the gateway on config/demo.toml, and print curl commands.
    Demo {
        /// The config file; the built-in echo upstream listens on every upstream server address it
        /// lists.
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
    /// Show the audit log of a running gateway (admin changes and reloads), one JSON entry per
    /// line, oldest first.
    Audit {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only the newest N matching entries, 1 to 100000. Default: 1000.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: Option<u32>,
        /// Only entries about this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The admin listener.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
    admin_url: String,
    /// The admin token (its SHA-256 is `[admin] token_hash` in the config).
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_ADMIN_TOKEN",
        hide_env_values = true,
        default_value = "",
        hide_default_value = true
    )]
    token: String,
}

/// The fields `tenants create` and `tenants update` both take, as in `POST /v1/tenants`.
#[derive(clap::Args)]
struct TenantFields {
    /// Display name. Default on create: the id.
    #[arg(long)]
    name: Option<String>,
    /// Contact address.
    #[arg(long)]
    email: Option<String>,
    /// `active`, or `suspended` (its keys answer 403). Default on create: active.
    #[arg(long, value_parser = ["active", "suspended"])]
    status: Option<String>,
    /// A DNS label under `[tenancy] base_domain` that names the tenant (repeatable; on update,
    /// the labels given replace the previous ones).
    #[arg(long = "subdomain", value_name = "LABEL")]
    subdomains: Vec<String>,
    /// A CIDR block or single IP allowed to use the tenant's keys (repeatable; on update, the
    /// addresses given replace the previous ones). Default on create: any address.
    #[arg(long = "ip-allow", value_name = "CIDR")]
    ip_allow: Vec<String>,
    /// Day of the month, 1 to 31, on which monthly quotas reset. Default on create: 1.
    #[arg(long, value_name = "DAY")]
    billing_anchor_day: Option<u32>,
    /// IANA time zone of the tenant's quota periods, like `Europe/Berlin`. Default on create: UTC.
    #[arg(long)]
    timezone: Option<String>,
    /// A change to the tier's limits for this tenant, `PATH=VALUE`, like
    /// `rate.requests_per_minute=120` or `quotas.requests.period=day` (repeatable; on update,
    /// the overrides given replace the previous ones).
    #[arg(long = "override", value_name = "PATH=VALUE", value_parser = parse_override)]
    overrides: Vec<(String, Value)>,
}

impl TenantFields {
    /// The JSON fields of the request; absent options are left out.
    fn to_json(&self) -> serde_json::Map<String, Value> {
        let mut o = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            if !v.is_null() {
                o.insert(k.to_string(), v);
            }
        };
        put("name", json!(self.name));
        put("email", json!(self.email));
        put("status", json!(self.status));
        put("billing_anchor_day", json!(self.billing_anchor_day));
        put("timezone", json!(self.timezone));
        if !self.subdomains.is_empty() {
            put("subdomains", json!(self.subdomains));
        }
        if !self.ip_allow.is_empty() {
            put("ip_allow", json!(self.ip_allow));
        }
        if !self.overrides.is_empty() {
            put("overrides", Value::Object(self.overrides.iter().cloned().collect()));
        }
        o
    }
}

/// `PATH=VALUE`; a whole number is sent as a number, anything else as a string.
fn parse_override(s: &str) -> Result<(String, Value), String> {
    let (path, value) = s
        .split_once('=')
        .filter(|(p, v)| !p.trim().is_empty() && !v.trim().is_empty())
        .ok_or_else(|| format!("`{s}` must look like PATH=VALUE, like `rate.requests_per_minute=120`"))?;
    let value = value.trim();
    let value = value.parse::<u64>().map(Value::from).unwrap_or_else(|_| Value::from(value));
    Ok((path.trim().to_string(), value))
}

#[derive(Subcommand)]
enum TenantsCommand {
    /// List tenants, config and API, sorted by id (the first 100; see `--cursor`).
    List {
        /// Only tenants of this tier.
        #[arg(long)]
        tier: Option<String>,
        /// Only `active` or only `suspended` tenants.
        #[arg(long, value_parser = ["active", "suspended"])]
        status: Option<String>,
        /// Page size, 1 to 1000. Default: 100.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
        /// Start after this tenant id: the previous page's `next_cursor`.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Create a tenant.
    Create {
        /// The tenant id: 1-63 characters of a-z, 0-9 and `-`.
        id: String,
        /// The tenant's tier, one of the running config's.
        #[arg(long)]
        tier: String,
        #[command(flatten)]
        fields: TenantFields,
    },
    /// Show one tenant.
    Get {
        /// The tenant id.
        id: String,
    },
    /// Change an API tenant; what is not given stays as it is.
    Update {
        /// The tenant id.
        id: String,
        /// Move the tenant to this tier (as `set-tier`).
        #[arg(long)]
        tier: Option<String>,
        #[command(flatten)]
        fields: TenantFields,
        /// Remove every subdomain.
        #[arg(long, conflicts_with = "subdomains")]
        no_subdomains: bool,
        /// Remove the address allowlist, so any address may use the tenant's keys.
        #[arg(long, conflicts_with = "ip_allow")]
        no_ip_allow: bool,
        /// Remove every override, so the tier's limits apply as they are.
        #[arg(long, conflicts_with = "overrides")]
        no_overrides: bool,
    },
    /// Delete an API tenant and all its keys, for good (its usage stays in the store).
    Delete {
        /// The tenant id.
        id: String,
    },
    /// Suspend a tenant: its keys answer 403 until it is reactivated.
    Suspend {
        /// The tenant id.
        id: String,
    },
    /// Reactivate a suspended tenant.
    Reactivate {
        /// The tenant id.
        id: String,
    },
    /// Move a tenant to another tier; the new limits apply on its next request.
    SetTier {
        /// The tenant id.
        id: String,
        /// The new tier, one of the running config's.
        tier: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// List a tenant's keys (never secrets).
    List {
        /// The tenant id.
        tenant: String,
    },
    /// Create a key; the secret is printed once.
    Create {
        /// The tenant id.
        tenant: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Comma-separated scopes, like `read,generate`. Default: none, as in the API: the key
        /// then passes only rules that require no scope.
        #[arg(long, default_value = "")]
        scopes: String,
        /// Days until the key expires, 1 to 3650. Default: never.
        #[arg(long, value_name = "DAYS")]
        expires_in_days: Option<u32>,
    },
    /// Revoke a key now.
    Revoke {
        /// The key id (`key_…`).
        key_id: String,
    },
    /// Replace a key; the old one keeps working for the grace period.
    Rotate {
        /// The key id (`key_…`).
        key_id: String,
        /// How long the old key keeps working, 0 to 2160 hours.
        #[arg(long, default_value_t = 24, value_name = "HOURS")]
        grace_period_hours: u32,
    },
}

#[derive(Subcommand)]
enum UsageCommand {
    /// Per-metric totals, a daily breakdown and cost, over an inclusive range of UTC days.
    Report {
        /// The config file; the report reads the store it names.
        #[arg(short, long, default_value = "config/tollgate.toml")]
        config: PathBuf,
        /// The tenant id.
        #[arg(long)]
        tenant: String,
        /// First day, YYYY-MM-DD.
        #[arg(long)]
        from: String,
        /// Last day, YYYY-MM-DD.
        #[arg(long)]
        to: String,
        /// Output format.
        #[arg(long, default_value = "json", value_parser = ["json", "csv"])]
        format: String,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Show which rule a request would match, why earlier rules did not, and the policy.
    Explain {
        /// The config file.
        #[arg(short, long, default_value = "config/tollgate.toml")]
        config: PathBuf,
        /// The request method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Path, optionally with `?query`.
        #[arg(long, default_value = "/")]
        path: String,
        /// The Host header; without it, rules that match on a host do not match.
        #[arg(long, default_value = "")]
        host: String,
        /// The tenant's tier. Default: the tier of `--tenant` in the config.
        #[arg(long)]
        tier: Option<String>,
        /// The tenant the request is from.
        #[arg(long)]
        tenant: Option<String>,
        /// A request header, `name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// A bearer token (JWT): check it as the gateway would now, and show the claims used,
        /// the tenant and the scopes; the request is then explained as that tenant's. `-`
        /// reads it from stdin.
        #[arg(long)]
        jwt: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, upgrade, daemon } => {
            tollgate::app::run(&config, tollgate::app::RunOptions { upgrade, daemon })
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
                // Quoted as TOML strings, so any id or scope makes a block the config loads.
                let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
                let scopes: Vec<String> = split_scopes(&scopes).into_iter().map(quote).collect();
                // stdout is only the block, so `>> tollgate.toml` never stores the secret.
                eprintln!("secret (shown once, give it to the tenant): {}", k.secret);
                println!("[[tenants.keys]]");
                println!("id = {}", quote(&id));
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
            let (method, path, body) = match command {
                TenantsCommand::List { tier, status, limit, cursor } => {
                    let query = tollgate::admin::client::query(&[
                        ("tier", tier),
                        ("status", status),
                        ("limit", limit.map(|l| l.to_string())),
                        ("cursor", cursor),
                    ]);
                    ("GET", format!("/v1/tenants{query}"), None)
                }
                TenantsCommand::Create { id, tier, fields } => {
                    let mut body = fields.to_json();
                    body.insert("id".into(), json!(id));
                    body.insert("tier".into(), json!(tier));
                    ("POST", "/v1/tenants".to_string(), Some(Value::Object(body)))
                }
                TenantsCommand::Get { id } => ("GET", format!("/v1/tenants/{}", segment(&id)), None),
                TenantsCommand::Update { id, tier, fields, no_subdomains, no_ip_allow, no_overrides } => {
                    let mut body = fields.to_json();
                    if let Some(t) = tier {
                        body.insert("tier".into(), json!(t));
                    }
                    // PATCH replaces these whole, so an empty value clears them.
                    for (clear, field, empty) in [
                        (no_subdomains, "subdomains", json!([])),
                        (no_ip_allow, "ip_allow", json!([])),
                        (no_overrides, "overrides", json!({})),
                    ] {
                        if clear {
                            body.insert(field.into(), empty);
                        }
                    }
                    if body.is_empty() {
                        eprintln!(
                            "nothing to change: give at least one field, like `--tier pro` or `--email ops@example.com` \
                             (see `tollgate tenants update --help`)"
                        );
                        return ExitCode::from(2);
                    }
                    ("PATCH", format!("/v1/tenants/{}", segment(&id)), Some(Value::Object(body)))
                }
                TenantsCommand::Delete { id } => {
                    return match admin_request(&admin, "DELETE", &format!("/v1/tenants/{}", segment(&id)), None) {
                        Ok(_) => {
                            println!("deleted tenant `{id}` and its keys");
                            ExitCode::SUCCESS
                        }
                        Err(e) => fail(&e),
                    };
                }
                TenantsCommand::Suspend { id } => ("POST", format!("/v1/tenants/{}/suspend", segment(&id)), None),
                TenantsCommand::Reactivate { id } => ("POST", format!("/v1/tenants/{}/reactivate", segment(&id)), None),
                TenantsCommand::SetTier { id, tier } => {
                    ("PUT", format!("/v1/tenants/{}/tier", segment(&id)), Some(json!({"tier": tier})))
                }
            };
            admin_call(&admin, method, &path, body)
        }
        Command::Keys { admin, command } => {
            let (method, path, body) = match command {
                KeysCommand::List { tenant } => ("GET", format!("/v1/tenants/{}/keys", segment(&tenant)), None),
                KeysCommand::Create { tenant, name, scopes, expires_in_days } => {
                    let scopes = split_scopes(&scopes);
                    if scopes.is_empty() {
                        eprintln!(
                            "note: the key has no scopes, so rules with `require_scopes` will refuse it; \
                             give them with --scopes, like `--scopes read,generate`"
                        );
                    }
                    (
                        "POST",
                        format!("/v1/tenants/{}/keys", segment(&tenant)),
                        Some(json!({"name": name, "scopes": scopes, "expires_in_days": expires_in_days})),
                    )
                }
                KeysCommand::Revoke { key_id } => ("DELETE", format!("/v1/keys/{}", segment(&key_id)), None),
                KeysCommand::Rotate { key_id, grace_period_hours } => (
                    "POST",
                    format!("/v1/keys/{}/rotate", segment(&key_id)),
                    Some(json!({"grace_period_hours": grace_period_hours})),
                ),
            };
            admin_call(&admin, method, &path, body)
        }
        Command::Reload { admin, force } => {
            let path = if force { "/v1/reload?force=true" } else { "/v1/reload" };
            admin_call(&admin, "POST", path, None)
        }
        Command::Audit { admin, limit, tenant } => {
            let query = tollgate::admin::client::query(&[("tenant", tenant), ("limit", limit.map(|l| l.to_string()))]);
            match admin_request(&admin, "GET", &format!("/v1/audit{query}"), None) {
                Ok(answer) => {
                    // One compact entry per line, as in the log file, so grep and jq work on it.
                    let items = serde_json::from_slice::<Value>(&answer.body)
                        .ok()
                        .and_then(|v| v.get("items").and_then(Value::as_array).cloned())
                        .unwrap_or_default();
                    for item in items {
                        println!("{item}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Usage { command: UsageCommand::Report { config, tenant, from, to, format } } => {
            print_or_fail(tollgate::cli::usage_report(&config, &tenant, &from, &to, &format))
        }
        Command::Rules {
            command: RulesCommand::Explain { config, method, path, host, tier, tenant, headers, jwt },
        } => print_or_fail(tollgate::cli::explain_cli(
            &config,
            &method,
            &path,
            &host,
            tier,
            tenant,
            &headers,
            jwt.as_deref(),
        )),
    }
}

/// Comma-separated scopes, without blanks.
fn split_scopes(scopes: &str) -> Vec<&str> {
    scopes.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
}

fn fail(message: &str) -> ExitCode {
    eprintln!("{message}");
    ExitCode::FAILURE
}

/// Sends one admin request; a refusal becomes the problem's status, code and detail.
fn admin_request(
    admin: &AdminArgs,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<tollgate::admin::client::Answer, String> {
    if admin.token.is_empty() {
        return Err("no admin token: set TOLLGATE_ADMIN_TOKEN (or pass --token) to the token whose SHA-256 is \
                    `[admin] token_hash` in the gateway's config"
            .into());
    }
    // Drop nulls: the API rejects unknown fields, not absent ones.
    let body = body.map(|mut b| {
        if let Some(o) = b.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        b
    });
    let answer = tollgate::admin::client::call(&admin.admin_url, &admin.token, method, path, body.as_ref())?;
    tollgate::admin::client::check(answer)
}

/// Sends one admin request and prints the answer as pretty JSON.
fn admin_call(admin: &AdminArgs, method: &str, path: &str, body: Option<Value>) -> ExitCode {
    match admin_request(admin, method, path, body).and_then(tollgate::admin::client::render) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// Prints a command's text on stdout, or its error on stderr with exit status 1.
fn print_or_fail(r: Result<String, String>) -> ExitCode {
    match r {
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

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// `--help` is the CLI's reference: every command, argument and option says what it is.
    #[test]
    fn every_command_and_option_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("`{path}` {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("`{sub_path}`"));
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "tollgate", &mut missing);
        assert!(missing.is_empty(), "no help line: {missing:#?}");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
