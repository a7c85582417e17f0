//! The figures against their targets: percentiles, the table, and the
//! verdicts across sizes.

use super::*;

/// The targets at N = 4096 (issues 8 and 18; issue 27's release within
/// 1 s of the holder's end; issue 29's scrape at no more than a List's
/// cost; issue 30's reads at the bus's own cost, each against a floor
/// measured in the same run): (figure, bound, true when the
/// figure must be at most the bound). Issue 18's targets across sizes are
/// checked by [`scaling_verdicts`].
pub const TARGETS: [(&str, f64, bool); 15] = [
    ("get_over_ping", 1.3, true),
    ("get_over_floor", 1.1, true),
    ("getall_over_floor", 1.15, true),
    ("managed_objects_over_floor", 1.3, true),
    ("list_ms", 25.0, true),
    ("list_over_floor", 1.2, true),
    ("available_ms", 50.0, true),
    ("startup_ready_ms", 150.0, true),
    ("rss_idle_kib", 16384.0, true),
    ("register_per_s", 200.0, false),
    ("register_16_per_s", 1000.0, false),
    ("hotplug_to_signal_p99_ms", 10.0, true),
    ("lease_release_p99_ms", 1000.0, true),
    ("metrics_scrape_over_list", 1.0, true),
    ("errors", 0.0, true),
];

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn sorted_us(v: &[Duration]) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

/// Issue 18's targets across sizes, from a `--scaling` run: changes flat in
/// N (at the largest N at least 0.8 of the smallest's), start-up at the
/// largest N at most 150 ms, idle RSS at N = 4096 at most 16 MiB; and
/// issue 30's: `list_over_floor` at most 1.2 at every size, start-up at the
/// largest N at most 100 ms, idle RSS at N = 4096 at most 20 MiB. One line
/// each: what was measured and whether it is met.
pub fn scaling_verdicts(runs: &[serde_json::Map<String, Value>]) -> Vec<String> {
    let at = |n: u64| {
        runs.iter()
            .find(|r| r.get("devices").and_then(Value::as_u64) == Some(n))
    };
    let fig = |r: &serde_json::Map<String, Value>, k: &str| r.get(k).and_then(Value::as_f64);
    let (Some(small), Some(large)) = (runs.first(), runs.last()) else {
        return Vec::new();
    };
    let n = |r: &serde_json::Map<String, Value>| fig(r, "devices").unwrap_or(0.0);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let mut out = Vec::new();
    for k in ["register_per_s", "bind_unbind_per_s"] {
        if let (Some(a), Some(b)) = (fig(small, k), fig(large, k)) {
            let ratio = b / a.max(1e-9);
            out.push(format!(
                "{k} at N = {} / at N = {}: {ratio:.2} (>= 0.8: {})",
                n(large),
                n(small),
                verdict(ratio >= 0.8)
            ));
        }
    }
    if let Some(ms) = fig(large, "startup_ready_ms") {
        out.push(format!(
            "startup_ready_ms at N = {}: {ms} (<= 150: {}; issue 30 <= 100: {})",
            n(large),
            verdict(ms <= 150.0),
            verdict(ms <= 100.0)
        ));
    }
    let overs: Vec<(f64, f64)> = runs
        .iter()
        .filter_map(|r| Some((n(r), fig(r, "list_over_floor")?)))
        .collect();
    if !overs.is_empty() {
        let shown: Vec<String> = overs
            .iter()
            .map(|(n, x)| format!("{x} at N = {n}"))
            .collect();
        out.push(format!(
            "list_over_floor: {} (<= 1.2 at every size: {})",
            shown.join(", "),
            verdict(overs.iter().all(|(_, x)| *x <= 1.2))
        ));
    }
    if let Some(kib) = at(4096).and_then(|r| fig(r, "rss_idle_kib")) {
        out.push(format!(
            "rss_idle_kib at N = 4096: {kib} (<= 16384: {}; issue 30 <= 20480: {})",
            verdict(kib <= 16384.0),
            verdict(kib <= 20480.0)
        ));
    }
    out
}

/// A readable table of one run against the targets.
pub fn table(figures: &serde_json::Map<String, Value>) -> String {
    let mut s = String::new();
    for (k, v) in figures {
        let target = TARGETS.iter().find(|(t, _, _)| t == k);
        let verdict = match (target, v.as_f64()) {
            (Some((_, bound, at_most)), Some(x)) => {
                let ok = if *at_most { x <= *bound } else { x >= *bound };
                format!(
                    "{} {bound}  {}",
                    if *at_most { "<=" } else { ">=" },
                    if ok { "met" } else { "MISSED" }
                )
            }
            _ => String::new(),
        };
        let _ = writeln!(s, "{k:<26} {v:>14}  {verdict}");
    }
    s
}
