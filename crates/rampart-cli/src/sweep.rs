//! `rampart sweep`: one model evaluated over a range of a test-time parameter — λ of a
//! once-for-all (OAT) model, or the noise scale of a stochastic student — with a table
//! and a chart of the trade-off. The same command started again after a kill keeps
//! the values whose evaluation finished and continues the interrupted one from its
//! last finished batch.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::common::{create_out_dir, record_command, write_json};
use crate::eval::{EvalArgs, EvalResults, Suite};

/// The parameter a sweep varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SweepOver {
    /// λ of an OAT model (0 = the clean end, 1 = the robust end).
    Lambda,
    /// The noise scale of a stochastic student (0 = deterministic, 1 = as trained).
    NoiseScale,
}

impl SweepOver {
    fn flag(self) -> &'static str {
        match self {
            SweepOver::Lambda => "lambda",
            SweepOver::NoiseScale => "noise-scale",
        }
    }
}

/// Flags of `rampart sweep`: those of `rampart eval` (the evaluation run at every
/// value, e.g. `--suite pgd20 --attack-limit 500`) plus the parameter and its values.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Writes into --out: one `rampart eval` folder per value (e.g. lambda-0.3/), \
sweep.json and sweep.md (the figures per value), plots/sweep.png and .svg, config.json, \
command.txt and sweep.log."
)]
pub struct SweepArgs {
    /// What to vary.
    #[arg(long, value_enum)]
    pub over: SweepOver,

    /// The values, comma-separated [default: λ: the model's training values;
    /// noise scale: 0,0.5,1,2,4].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub values: Vec<f32>,

    /// Other models drawn beside the curve, as NAME=RESULTS (the results.json of
    /// `rampart eval`, e.g. models trained at one fixed λ).
    #[arg(long = "reference")]
    pub references: Vec<String>,

    /// The evaluation at every value.
    #[command(flatten)]
    pub eval: EvalArgs,
}

/// One value of a sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// The parameter's value.
    pub value: f32,
    /// Clean accuracy (the mean over noise draws for a stochastic model).
    pub clean_accuracy: f64,
    /// Its standard deviation over noise draws (stochastic models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_accuracy_std: Option<f64>,
    /// Robust accuracy under the evaluation's attack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy: Option<f64>,
    /// Its standard deviation over noise draws.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robust_accuracy_std: Option<f64>,
    /// 1 − robust accuracy / clean accuracy on the attacked images: the share of the
    /// correctly classified attacked images the attack turns wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack_success_rate: Option<f64>,
    /// The value's evaluation folder.
    pub results: PathBuf,
}

/// `sweep.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepResults {
    /// Version of this layout.
    pub schema_version: u32,
    /// The model evaluated.
    pub model: PathBuf,
    /// The parameter varied.
    pub over: SweepOver,
    /// The attack of the evaluations, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<String>,
    /// One entry per value, in the order given.
    pub points: Vec<SweepPoint>,
    /// The reference models: name, clean and robust accuracy.
    #[serde(default)]
    pub references: Vec<(String, f64, Option<f64>)>,
}

impl SweepArgs {
    /// Log file of the sweep.
    pub fn log_file(&self) -> PathBuf {
        self.eval.out.join("sweep.log")
    }

    /// Runs the evaluation at every value and writes the table and the chart.
    pub fn run(
        &self,
        command: &str,
        data_fallback: Option<crate::common::DataDir>,
    ) -> Result<SweepResults> {
        if self.eval.shard.is_some() {
            anyhow::bail!("--shard applies to `rampart eval` and `rampart attack`, not to a sweep");
        }
        if self.eval.lambda.is_some() || self.eval.noise_scale.is_some() {
            bail!("--lambda and --noise-scale are set per value by --over/--values");
        }
        if !matches!(self.eval.suite, Suite::Clean | Suite::Pgd20) {
            bail!("rampart sweep runs --suite clean or pgd20 at every value");
        }
        let values = self.resolve_values()?;
        let mut references = Vec::new();
        for spec in &self.references {
            let (name, path) = spec
                .split_once('=')
                .with_context(|| format!("--reference `{spec}`: expected NAME=results.json"))?;
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            let (clean, robust) = reference_accuracies(&text)
                .with_context(|| format!("{path} is not the results.json of `rampart eval`"))?;
            references.push((name.to_string(), clean, robust));
        }
        create_out_dir(&self.eval.out)?;
        // An interrupted sweep here continues only with the same settings.
        let settings = crate::common::run_settings();
        settings.begin(&self.eval.out)?;
        record_command(&self.eval.out, command)?;
        write_json(
            &self.eval.out.join("config.json"),
            &serde_json::json!({
                "command": "sweep",
                "rampart_version": env!("CARGO_PKG_VERSION"),
                "command_line": command,
                "over": self.over,
                "values": values,
                "references": self.references,
                "model": self.eval.model,
                "suite": self.eval.suite,
            }),
        )?;
        let mut points = Vec::with_capacity(values.len());
        let mut attack = None;
        for &value in &values {
            let mut args = self.eval.clone();
            args.out = self.eval.out.join(format!("{}-{value}", self.over.flag()));
            match self.over {
                SweepOver::Lambda => args.lambda = Some(value),
                SweepOver::NoiseScale => args.noise_scale = Some(value),
            }
            let plan = args.plan(data_fallback.clone())?;
            let r = match finished_point(&settings, &args.out) {
                Some(r) => {
                    tracing::info!(value, "{} sweep: loaded", self.over.flag());
                    r
                }
                None => {
                    tracing::info!(value, "{} sweep", self.over.flag());
                    plan.run(command)
                        .with_context(|| format!("{} = {value}", self.over.flag()))?
                }
            };
            attack = r.attack.clone();
            let st = r.stochastic.as_ref();
            points.push(SweepPoint {
                value,
                clean_accuracy: r.clean_accuracy,
                clean_accuracy_std: st.map(|s| s.clean_accuracy_std),
                robust_accuracy: r.robust_accuracy,
                robust_accuracy_std: st.and_then(|s| s.robust_accuracy_std),
                attack_success_rate: match (r.robust_accuracy, r.attacked_clean_accuracy) {
                    (Some(a), Some(c)) if c > 0.0 => Some((1.0 - a / c).max(0.0)),
                    _ => None,
                },
                results: args.out.join("results.json"),
            });
        }
        let results = SweepResults {
            schema_version: 1,
            model: self.eval.model.clone(),
            over: self.over,
            attack,
            points,
            references,
        };
        write_json(&self.eval.out.join("sweep.json"), &results)?;
        self.plot(&results)?;
        rampart_fs::write_atomic(
            &self.eval.out.join("sweep.md"),
            results.markdown().as_bytes(),
        )?;
        rampart_fs::finish_run(&self.eval.out)?;
        Ok(results)
    }

    fn resolve_values(&self) -> Result<Vec<f32>> {
        if !self.values.is_empty() {
            return Ok(self.values.clone());
        }
        Ok(match self.over {
            SweepOver::NoiseScale => vec![0.0, 0.5, 1.0, 2.0, 4.0],
            SweepOver::Lambda => {
                let spec = rampart_models::Classifier::read_spec(&self.eval.model)
                    .with_context(|| format!("cannot read {}", self.eval.model.display()))?;
                spec.oat
                    .map(|o| o.lambdas)
                    .context("--over lambda needs a once-for-all (OAT) model")?
            }
        })
    }

    fn plot(&self, r: &SweepResults) -> Result<()> {
        use rampart_eval::Series;
        let dir = self.eval.out.join("plots");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let pct = |v: f64| 100.0 * v;
        let series: Vec<Series> = match r.over {
            SweepOver::Lambda => {
                let Some(_) = r.points.first().and_then(|p| p.robust_accuracy) else {
                    return Ok(()); // a clean-only sweep has no trade-off to draw
                };
                let mut s = vec![Series {
                    name: "one OAT model over lambda".into(),
                    points: r
                        .points
                        .iter()
                        .map(|p| (pct(p.clean_accuracy), pct(p.robust_accuracy.unwrap_or(0.0))))
                        .collect(),
                    labels: r.points.iter().map(|p| format!("  {}", p.value)).collect(),
                    markers_only: false,
                }];
                for (name, clean, robust) in &r.references {
                    if let Some(robust) = robust {
                        s.push(Series {
                            name: name.clone(),
                            points: vec![(pct(*clean), pct(*robust))],
                            labels: vec![format!("  {name}")],
                            markers_only: true,
                        });
                    }
                }
                s
            }
            SweepOver::NoiseScale => {
                let line = |name: &str, y: &dyn Fn(&SweepPoint) -> f64| Series {
                    name: name.into(),
                    points: r
                        .points
                        .iter()
                        .map(|p| (f64::from(p.value), pct(y(p))))
                        .collect(),
                    labels: Vec::new(),
                    markers_only: false,
                };
                let mut s = vec![line("clean accuracy (%)", &|p| p.clean_accuracy)];
                if r.points.iter().all(|p| p.robust_accuracy.is_some()) {
                    s.push(line("robust accuracy (%)", &|p| {
                        p.robust_accuracy.unwrap_or(0.0)
                    }));
                    s.push(line("attack success rate (%)", &|p| {
                        p.attack_success_rate.unwrap_or(0.0)
                    }));
                }
                s
            }
        };
        let (title, x, y) = match r.over {
            SweepOver::Lambda => (
                "Clean vs robust accuracy of one OAT model",
                "clean accuracy (%)",
                "robust accuracy (%)",
            ),
            SweepOver::NoiseScale => (
                "Stochastic student against its noise level",
                "noise scale (x the trained noise)",
                "%",
            ),
        };
        rampart_eval::plot_lines(title, x, y, &series, &dir.join("sweep"))?;
        Ok(())
    }
}

/// A reference model's clean and robust accuracy from the `results.json` of `rampart
/// eval`: of a clean or `pgd20` run, or of a protocol suite (`quick`, `ccat`, `full`),
/// whose robust accuracy is that of its headline threat model (L∞ 8/255, the worst
/// case of its attacks) on its attacked images.
fn reference_accuracies(text: &str) -> Result<(f64, Option<f64>)> {
    let value: serde_json::Value = serde_json::from_str(text)?;
    if let Some(models) = value.get("threat_models") {
        let clean = value
            .get("clean_accuracy")
            .and_then(serde_json::Value::as_f64)
            .context("no clean_accuracy")?;
        let robust = models
            .get(rampart_eval::HEADLINE_THREAT_MODEL)
            .and_then(|m| m.get("robust_error"))
            .and_then(serde_json::Value::as_f64)
            .map(|e| 1.0 - e);
        return Ok((clean, robust));
    }
    let r: EvalResults = serde_json::from_value(value)?;
    Ok((r.clean_accuracy, r.robust_accuracy))
}

/// The results of a value's evaluation that finished with these sweep `settings` (a
/// killed sweep's finished points), if `dir` holds one.
fn finished_point(
    settings: &rampart_fs::RunSettings,
    dir: &std::path::Path,
) -> Option<EvalResults> {
    if !settings.finished_in(dir) {
        return None;
    }
    let text = std::fs::read_to_string(dir.join("results.json")).ok()?;
    serde_json::from_str(&text).ok()
}

impl SweepResults {
    /// The table of `sweep.md`.
    pub fn markdown(&self) -> String {
        let name = match self.over {
            SweepOver::Lambda => "λ",
            SweepOver::NoiseScale => "noise scale",
        };
        let pm = |v: f64, s: Option<f64>| match s {
            Some(s) => format!("{:.2} ± {:.2} %", 100.0 * v, 100.0 * s),
            None => format!("{:.2} %", 100.0 * v),
        };
        let mut md = format!(
            "# Sweep of {name}: `{}`\n\nAttack: {}.\n\n| {name} | clean accuracy | robust accuracy | attack success rate |\n|---:|---:|---:|---:|\n",
            self.model.display(),
            self.attack.as_deref().unwrap_or("none (clean figures only)")
        );
        for p in &self.points {
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                p.value,
                pm(p.clean_accuracy, p.clean_accuracy_std),
                p.robust_accuracy
                    .map_or("–".into(), |a| pm(a, p.robust_accuracy_std)),
                p.attack_success_rate
                    .map_or("–".into(), |a| format!("{:.2} %", 100.0 * a)),
            ));
        }
        if !self.references.is_empty() {
            md.push_str(
                "\n| reference model | clean accuracy | robust accuracy |\n|---|---:|---:|\n",
            );
            for (n, c, r) in &self.references {
                md.push_str(&format!(
                    "| {n} | {:.2} % | {} |\n",
                    100.0 * c,
                    r.map_or("–".into(), |r| format!("{:.2} %", 100.0 * r))
                ));
            }
        }
        md.push_str("\n![sweep](plots/sweep.png)\n");
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_read_pgd20_and_protocol_results() -> Result<()> {
        // `rampart eval --suite pgd20`: its own robust accuracy.
        let head = r#""schema_version":1,"model":"m","method":"at","arch":"wrn-10-1",
            "dataset":"cifar10","test_examples":10000,"clean_accuracy":0.6,"clean_error":0.4,
            "eval_seconds":1.0"#;
        let pgd = format!(r#"{{"suite":"pgd20",{head},"robust_accuracy":0.25}}"#);
        assert_eq!(reference_accuracies(&pgd)?, (0.6, Some(0.25)));
        // A clean run: no robust figure.
        let clean = format!(r#"{{"suite":"clean",{head}}}"#);
        assert_eq!(reference_accuracies(&clean)?, (0.6, None));
        // A protocol: 1 − the headline threat model's worst-case robust error.
        let protocol = r#"{"clean_accuracy":0.5,"threat_models":{
            "linf_16_255":{"robust_error":0.99},"linf_8_255":{"robust_error":0.75}}}"#;
        assert_eq!(reference_accuracies(protocol)?, (0.5, Some(0.25)));
        assert!(reference_accuracies("{}").is_err());
        Ok(())
    }
}
