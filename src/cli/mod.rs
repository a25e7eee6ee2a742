//! Command-line glue that needs the whole crate: `tollgate rules explain` and `tollgate usage
//! report`. Nothing in the library imports this module, so it may depend on every other one.

pub mod explain;

use crate::pipeline::canonical::{canonicalize, RequestPolicy};
use crate::rules::matcher::RequestView;
use explain::explain;

/// The `tollgate rules explain` command: loads the config and explains one request, read
/// through the same canonical view as the gateway (so `--method delete` is refused as it would
/// be on the wire). When only `tenant` is given, its tier comes from the config. With `jwt`,
/// the token is checked as the gateway would check it now (its issuer's `jwks_url` is
/// fetched), and the tenant, tier and scopes it proves are explained with the request.
#[allow(clippy::too_many_arguments)]
pub fn explain_cli(
    path: &std::path::Path,
    method: &str,
    target: &str,
    host: &str,
    tier: Option<String>,
    tenant: Option<String>,
    headers: &[String],
    jwt: Option<&str>,
) -> Result<String, String> {
    let config = crate::app::load_or_report(path)?;
    // `--jwt -` reads the token from stdin, keeping it out of the process list and history.
    let from_stdin = match jwt {
        Some("-") => {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(std::io::stdin(), 64 * 1024), &mut t)
                .map_err(|e| format!("cannot read the token from stdin: {e}"))?;
            Some(t)
        }
        _ => None,
    };
    let jwt = from_stdin.as_deref().or(jwt);
    let facts = jwt.map(|t| explain_token(&config, t));
    let (tier, tenant) = match &facts {
        Some(f) => (tier.or(f.tier.clone()), tenant.or(f.tenant.clone())),
        None => (tier, tenant),
    };
    let method =
        http::Method::from_bytes(method.as_bytes()).map_err(|_| format!("`{method}` is not an HTTP method"))?;
    let mut map = http::HeaderMap::new();
    for h in headers {
        let (k, v) = h.split_once(':').ok_or_else(|| format!("--header `{h}` must look like `name: value`"))?;
        let name = http::HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("`{k}` is not a header name"))?;
        let value = http::HeaderValue::from_str(v.trim()).map_err(|_| format!("bad value for header `{k}`"))?;
        map.append(name, value);
    }
    // Without --host the request is explained as if sent to `localhost`, and host conditions
    // do not match.
    let host_given = !host.is_empty();
    let host_value = if host_given { host } else { "localhost" };
    let host_value = http::HeaderValue::from_str(host_value).map_err(|_| format!("`{host}` is not a host name"))?;
    map.insert(http::header::HOST, host_value);
    let canon = canonicalize(&method, target.as_bytes(), &map, &RequestPolicy::of(&config))
        .map_err(|r| format!("the gateway would refuse this request: {} {}", r.status(), r.code()))?;
    let tier = tier.or_else(|| {
        let t = tenant.as_deref()?;
        config.tenants.iter().find(|x| x.id == t).map(|x| x.tier.clone())
    });
    if let Some(t) = &tier {
        if !config.tiers.contains_key(t) {
            return Err(format!("tier `{t}` is not defined in {}", path.display()));
        }
    }
    // The same path the gateway matches: canonical, then `/t/<tenant>` stripped (when path
    // resolution is on).
    let mut routed = canon.path();
    let mut tenant = tenant;
    if config.tenancy.uses(crate::config::Source::Path) {
        if let Some(rest) = routed.strip_prefix("/t/") {
            let (t, tail) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            if !t.is_empty() {
                tenant = tenant.or_else(|| Some(t.to_ascii_lowercase()));
                routed = tail;
            }
        }
    }
    let tier = tier.or_else(|| {
        let t = tenant.as_deref()?;
        config.tenants.iter().find(|x| x.id == t).map(|x| x.tier.clone())
    });
    let view = RequestView {
        method: canon.method(),
        host: if host_given { canon.host() } else { "" },
        path: routed,
        query: canon.query(),
        headers: &map,
        tier: tier.as_deref(),
        tenant: tenant.as_deref(),
    };
    let mut out = facts.as_ref().map(|f| f.text.clone()).unwrap_or_default();
    out.push_str(&explain(&config, &view));
    if let Some(scopes) = facts.as_ref().and_then(|f| f.scopes.as_ref()) {
        if let Some(line) = explain::scope_verdict(&config, &view, scopes) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// `rules explain --jwt`: the token checked at the current time, with the keys of the config
/// (a `jwks_url` is fetched once, within the issuer's `jwks_timeout`).
fn explain_token(config: &crate::config::Config, token: &str) -> explain::TokenFacts {
    use crate::config::JwtKeys;
    let keys = |i: usize| -> Result<std::sync::Arc<crate::jwks::KeySet>, String> {
        let issuer = config.jwt.issuers.get(i).ok_or_else(|| "no such issuer".to_string())?;
        match &issuer.keys {
            JwtKeys::File { keys, .. } | JwtKeys::Hmac { keys, .. } => Ok(keys.clone()),
            JwtKeys::Url(url) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start a runtime: {e}"))?;
                rt.block_on(crate::jwt::fetch::fetch(url, issuer.jwks_timeout))
                    .map(std::sync::Arc::new)
                    .map_err(|e| format!("{url}: {e}"))
            }
        }
    };
    explain::token(config, token, chrono::Utc::now().timestamp_millis(), &keys)
}

/// How long a command that reads the store waits for a Redis Cluster to be discovered.
const STORE_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `tollgate usage report`: opens the configured store (waiting up to
/// [`STORE_CONNECT_WAIT`] for a Redis Cluster) and renders a report.
pub fn usage_report(
    config_path: &std::path::Path,
    tenant: &str,
    from: &str,
    to: &str,
    format: &str,
) -> Result<String, String> {
    let config = crate::app::load_or_report(config_path)?;
    let (from, to) = (crate::metering::report::parse_day(from)?, crate::metering::report::parse_day(to)?);
    if from > to {
        return Err(format!("--from {from} is after --to {to}"));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let clock: crate::clock::SharedClock = std::sync::Arc::new(crate::clock::SystemClock);
    let stores = crate::app::open_store(&config.store, clock, metrics, &rt)?;
    stores.wait_connected(STORE_CONNECT_WAIT, &rt)?;
    let store = stores.counters.name();
    let rows = rt
        .block_on(stores.ledger.rows(tenant, &from, &to))
        .map_err(|e| format!("cannot read usage from the {store} store: {e}"))?;
    // A mistyped id would otherwise print an empty report and exit 0, as if the tenant had no
    // traffic. A deleted tenant is not in the config or the store but keeps its usage, so a
    // report is still printed when there is usage to show.
    let in_config = config.tenants.iter().any(|t| t.id == tenant);
    let known = in_config
        || rt
            .block_on(stores.directory.load())
            .map_err(|e| format!("cannot read the tenants of the {store} store: {e}"))?
            .tenants
            .iter()
            .any(|t| t.id == tenant);
    if !known {
        if rows.is_empty() {
            return Err(format!(
                "no tenant is called `{tenant}`: it is neither in {} nor in the {store} store, and it has no usage \
                 from {from} to {to}. Check the id (`tollgate tenants list` shows every tenant), or give the config \
                 of the gateway that serves it with -c",
                config_path.display()
            ));
        }
        eprintln!(
            "note: `{tenant}` is no longer a tenant (it was deleted, or removed from the config); this is the usage \
             recorded before"
        );
    }
    let report = crate::metering::report::build(tenant, &from, &to, &rows);
    Ok(if format == "csv" { report.to_csv() } else { report.to_json() + "\n" })
}
