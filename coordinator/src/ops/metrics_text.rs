//! The ops layer's series in the `/metrics` exposition: where requests were served,
//! why they spilled upstream, key-file reloads, and usage per team (or per key with
//! `--metrics-key-label`).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::layer::Ops;
use super::usage;

impl Ops {
    /// Appends the ops series to a `/metrics` exposition.
    pub fn render_metrics(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP stral_served_total Generation requests by where they were served.\n# TYPE stral_served_total counter");
        let _ = writeln!(
            out,
            "stral_served_total{{backend=\"local\"}} {}\nstral_served_total{{backend=\"fallback\"}} {}",
            self.served_local.load(Ordering::Relaxed),
            self.served_fallback.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP stral_fallback_total Requests sent to an upstream, by reason.\n# TYPE stral_fallback_total counter");
        for (reason, n) in self
            .fallback_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "stral_fallback_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP stral_key_file_reloads_total Key file reloads, by outcome.\n# TYPE stral_key_file_reloads_total counter\nstral_key_file_reloads_total{{outcome=\"ok\"}} {}\nstral_key_file_reloads_total{{outcome=\"error\"}} {}",
            self.reloads.load(Ordering::Relaxed),
            self.reload_failures.load(Ordering::Relaxed)
        );
        let series: Vec<_> = if self.config.metrics_key_label {
            self.keys
                .principals()
                .into_iter()
                .map(|p| {
                    (
                        usage::key_labels(&p.spec.team, &p.spec.name),
                        p.usage.clone(),
                    )
                })
                .collect()
        } else {
            self.keys
                .teams()
                .into_iter()
                .map(|(t, (_, u))| (usage::team_labels(&t), u))
                .collect()
        };
        usage::render(out, series.iter().map(|(l, u)| (l.clone(), &**u)));
    }
}
