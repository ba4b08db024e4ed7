//! `target/bench/results.md`: the results as the README's table, one row per figure, each
//! a median with the rounds' range, and its ratio to the baseline of the same run.
use serde_json::Value;

/// "median (min–max)" of a stats object, with `digits` decimals.
fn range(v: &Value, digits: usize) -> String {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "{:.digits$} ({:.digits$}–{:.digits$})",
        f("median"),
        f("min"),
        f("max")
    )
}

/// The measured object, its baseline and what the baseline is, by benchmark.
fn columns(r: &Value) -> Option<(&Value, &Value, &'static str, usize)> {
    let b = r["benchmark"].as_str()?;
    Some(match b {
        "bind_path" => (
            &r["managed"],
            &r["baseline_ip_freebind"],
            "app sets IP_FREEBIND",
            0,
        ),
        "bystander" => (&r["agent_elsewhere"], &r["no_agent"], "no agent", 0),
        "steer" => (
            &r["steered"],
            &r["baseline_native_bind"],
            "natively bound",
            0,
        ),
        "scale_attach" => (
            &r["rss_mib_after"],
            &r["rss_mib_before"],
            "RSS MiB before",
            1,
        ),
        "address_churn" => (&r["served"], &r["unserved"], "unserved namespace", 0),
        "events" => (&r["agent_logging"], &r["agent_stopped"], "agent stopped", 0),
        _ => return None,
    })
}

/// The ratio's stats: `rss_ratio` for the attach rows, `ratio` for the others.
fn ratio(r: &Value) -> &Value {
    if r["ratio"].is_object() {
        &r["ratio"]
    } else {
        &r["rss_ratio"]
    }
}

pub(super) fn markdown(machine: &str, commit: &str, results: &[Value]) -> String {
    let mut out = format!(
        "Taken on {machine} with `cargo xtask bench` at commit {commit}.\n\n\
         | figure | unit | measured | baseline | ratio | goal | notes |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for r in results {
        let Some((m, b, base, digits)) = columns(r) else {
            continue;
        };
        let bench = r["benchmark"].as_str().unwrap_or_default();
        let case = r["case"].as_str().unwrap_or_default();
        let unit = match bench {
            "scale_attach" => "RSS MiB",
            _ => r["unit"].as_str().unwrap_or_default(),
        };
        let notes = match bench {
            "bind_path" => format!(
                "Δ {} ns/bind; the same syscalls without BPF: {} ns, ratio {}",
                range(&r["delta_ns_per_bind"], 0),
                range(&r["baseline_same_syscalls"], 0),
                range(&r["ratio_same_syscalls"], 3)
            ),
            "bystander" => format!("Δ {} ns/bind", range(&r["delta_ns_per_bind"], 0)),
            "steer" => format!("Δ {} ns/call", range(&r["delta_ns_per_call"], 0)),
            "scale_attach" => match r["ms_per_further_cgroup"].as_f64() {
                Some(further) => format!(
                    "{} ms per cgroup; {further:.2} ms for each cgroup past the first",
                    range(&r["ms_per_cgroup"], 2)
                ),
                None => format!("{} ms per cgroup", range(&r["ms_per_cgroup"], 2)),
            },
            "address_churn" => format!(
                "{} addresses added + removed; agent {} µs CPU per change; {} rtnetlink overruns",
                r["addresses"],
                range(&r["agent_cpu_us_per_change"], 1),
                r["rtnetlink_overruns"]
            ),
            "events" => format!(
                "{} binds; agent logged {} events/s, lost {} per run",
                r["binds"],
                range(&r["logged_per_second"], 0),
                range(&r["lost_per_run"], 0)
            ),
            _ => String::new(),
        };
        out.push_str(&format!(
            "| {bench} {case} | {unit} | {} | {} ({base}) | {} | {} | {notes} |\n",
            range(m, digits),
            range(b, digits),
            range(ratio(r), 3),
            r["goal"].as_str().unwrap_or("–"),
        ));
    }
    let breakdown: Vec<&Value> = results
        .iter()
        .filter(|r| r["benchmark"] == "bind_path_breakdown")
        .collect();
    if !breakdown.is_empty() {
        out.push_str(
            "\nBind path, ns per bind (kernel run-time statistics on, one extra pass; Δ is \
             that pass against the same syscalls without BPF):\n\n\
             | case | fb_setsockopt | fb_bind4/6 | all programs | Δ | outside the programs |\n\
             |---|---|---|---|---|---|\n",
        );
        for r in breakdown {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            out.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                r["case"].as_str().unwrap_or_default(),
                f("fb_setsockopt"),
                f("fb_bind"),
                f("all_programs"),
                f("delta_same_syscalls"),
                f("outside_programs")
            ));
        }
    }
    out
}
