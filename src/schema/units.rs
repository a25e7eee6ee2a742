//! Human units in config values: durations (`250ms`, `5s`, `2m`, `1h`, `1d`) and sizes
//! (`512`, `64KiB`, `10MiB`, `1GiB`, `10MB`).

use std::time::Duration;

/// Parses a duration such as `250ms`, `5s`, `1m`, `1h` or `1d`. A bare number is not accepted:
/// the unit is required so that nobody has to guess.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 =
        num.parse().map_err(|_| format!("`{text}` is not a duration; write it like `250ms`, `5s`, `2m` or `1h`"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        "" => return Err(format!("`{text}` has no unit; write it like `{text}s` or `{text}ms`")),
        other => return Err(format!("`{other}` is not a duration unit in `{text}`; use ms, s, m, h or d")),
    };
    Ok(d)
}

/// Parses a size such as `10MiB`, `64KiB`, `1GB` or a bare number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{text}` is not a size; write it like `512`, `64KiB` or `10MiB`"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("`{other}` is not a size unit in `{text}`; use B, KiB, MiB, GiB, KB, MB or GB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1KB").unwrap(), 1000);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5XB").is_err());
    }
}
