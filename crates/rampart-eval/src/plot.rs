//! Charts of an evaluation, each written as PNG and SVG: accuracy–perturbation curves
//! (several models on one chart), reliability diagrams and confidence histograms.
//!
//! Drawn with `plotters` without system libraries: bitmaps go into an RGB buffer that
//! the `image` crate encodes as PNG, and text uses a subset of DejaVu Sans bundled
//! in `assets/` (licence beside it) through plotters' `ab_glyph` support. SVG text
//! names the `sans-serif` family and is rendered by the viewer.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::chart::MeshStyle;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use rampart_metrics::{AccuracyCurve, ReliabilityBin};

use crate::error::{EvalError, Result};
use crate::io::write_atomic;
use crate::report::ConfidenceHistograms;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (900, 600);

/// Distinguishable colours (Tableau 10), one per model or set.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn register_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err("the bundled font could not be read".into())
    }
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The chart every plot here draws on: f64 on both axes.
type Plane<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart on `area` with the given caption (text and size), margin, label-area sizes
/// (x, y) and ranges.
fn plane<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: Option<(&str, u32)>,
    margin: u32,
    label_areas: (u32, u32),
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> std::result::Result<Plane<'a, DB>, String> {
    let mut builder = ChartBuilder::on(area);
    if let Some((caption, size)) = caption {
        builder.caption(caption, (FAMILY, size));
    }
    builder
        .margin(margin)
        .x_label_area_size(label_areas.0)
        .y_label_area_size(label_areas.1)
        .build_cartesian_2d(x, y)
        .map_err(text)
}

/// Draws a configured mesh in the house style: axis descriptions and labels at the
/// given sizes, one light grid line between bold ones.
fn draw_mesh<DB: DrawingBackend>(
    mesh: &mut MeshStyle<'_, '_, RangedCoordf64, RangedCoordf64, DB>,
    sizes: (u32, u32),
) -> std::result::Result<(), String> {
    mesh.axis_desc_style((FAMILY, sizes.0))
        .label_style((FAMILY, sizes.1))
        .max_light_lines(1)
        .light_line_style(RGBColor(240, 240, 240))
        .draw()
        .map_err(text)
}

/// Draws the legend of the labelled series at `position`, in the house style.
fn draw_legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut Plane<'a, DB>,
    position: SeriesLabelPosition,
    size: u32,
) -> std::result::Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FAMILY, size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(text)
}

/// A tick label without decimals.
fn whole(v: &f64) -> String {
    format!("{v:.0}")
}

/// Something drawable on any plotters backend.
trait Chart {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String>;
}

/// Writes `stem.png` and `stem.svg`; returns both paths.
fn render(chart: &impl Chart, stem: &Path) -> Result<Vec<PathBuf>> {
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |message: String| EvalError::Plot { path, message }
    };
    register_font().map_err(fail(&png))?;
    let (w, h) = SIZE;
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(text).map_err(fail(&png))?;
        chart.draw(&root).map_err(fail(&png))?;
        root.present().map_err(text).map_err(fail(&png))?;
    }
    let mut encoded = Vec::new();
    {
        use image::ImageEncoder;
        image::codecs::png::PngEncoder::new(&mut encoded)
            .write_image(&pixels, w, h, image::ExtendedColorType::Rgb8)
            .map_err(text)
            .map_err(fail(&png))?;
    }
    write_atomic(&png, &encoded)?;
    let mut svg_text = String::new();
    {
        let root = SVGBackend::with_string(&mut svg_text, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(text).map_err(fail(&svg))?;
        chart.draw(&root).map_err(fail(&svg))?;
        root.present().map_err(text).map_err(fail(&svg))?;
    }
    write_atomic(&svg, svg_text.as_bytes())?;
    Ok(vec![png, svg])
}

/// Accuracy (%) against ε (in 1/255) of several models on one chart: one line each,
/// labelled with the model's name and AUAC. Writes `stem.png` and `stem.svg`.
pub fn plot_accuracy_curves(
    curves: &[(&str, &AccuracyCurve)],
    stem: &Path,
) -> Result<Vec<PathBuf>> {
    if curves.is_empty() {
        return Err(EvalError::Plot {
            path: stem.to_path_buf(),
            message: "no curve to plot".into(),
        });
    }
    let series = curves
        .iter()
        .map(|(name, c)| {
            let auac = c
                .auac()
                .map(|a| format!(" (AUAC {:.1} %)", 100.0 * a))
                .unwrap_or_default();
            (
                format!("{name}{auac}"),
                c.eps
                    .iter()
                    .zip(&c.accuracy)
                    .map(|(e, a)| (e * 255.0, 100.0 * a))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    render(&CurveChart { series }, stem)
}

struct CurveChart {
    series: Vec<(String, Vec<(f64, f64)>)>,
}

impl Chart for CurveChart {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let x_max = self
            .series
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|p| p.0))
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let mut chart = plane(
            root,
            Some(("Accuracy under L∞ perturbations", 26)),
            20,
            (50, 60),
            0.0..x_max,
            0.0..100.0,
        )?;
        draw_mesh(
            chart
                .configure_mesh()
                .x_desc("ε (× 1/255), minimal adversarial ε by PGD bisection")
                .y_desc("accuracy (%)")
                .x_label_formatter(&whole)
                .y_label_formatter(&whole),
            (18, 15),
        )?;
        for (i, (name, pts)) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(3)))
                .map_err(text)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight, 16)?;
        Ok(())
    }
}

/// Reliability diagram: accuracy per confidence bin (bars) and the bin's mean
/// confidence (red marks) against the diagonal, and below it the share of examples
/// per bin. Writes `stem.png` and `stem.svg`.
pub fn plot_reliability(
    bins: &[ReliabilityBin],
    ece: f64,
    title: &str,
    stem: &Path,
) -> Result<Vec<PathBuf>> {
    render(
        &ReliabilityChart {
            bins: bins.to_vec(),
            title: format!("{title} (ECE {:.2} %)", 100.0 * ece),
        },
        stem,
    )
}

struct ReliabilityChart {
    bins: Vec<ReliabilityBin>,
    title: String,
}

impl Chart for ReliabilityChart {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let (upper, lower) = root.split_vertically(SIZE.1 * 72 / 100);
        let mut chart = plane(
            &upper,
            Some((self.title.as_str(), 24)),
            15,
            (30, 60),
            0.0..1.0,
            0.0..1.0,
        )?;
        draw_mesh(chart.configure_mesh().y_desc("accuracy"), (18, 14))?;
        let blue = PALETTE[0];
        let red = PALETTE[3];
        chart
            .draw_series(self.bins.iter().filter_map(|b| {
                b.accuracy
                    .map(|a| Rectangle::new([(b.lo, 0.0), (b.hi, a)], blue.mix(0.8).filled()))
            }))
            .map_err(text)?
            .label("accuracy")
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 16, y + 6)], blue.mix(0.8).filled())
            });
        // The mean confidence of each bin as a red mark: its distance to the top of the
        // blue bar is the bin's miscalibration, on whichever side.
        chart
            .draw_series(self.bins.iter().filter_map(|b| {
                b.confidence.map(|c| {
                    let inset = 0.1 * (b.hi - b.lo);
                    PathElement::new(
                        vec![(b.lo + inset, c), (b.hi - inset, c)],
                        red.stroke_width(4),
                    )
                })
            }))
            .map_err(text)?
            .label("mean confidence")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], red.stroke_width(4)));
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                BLACK.mix(0.6).stroke_width(2),
            ))
            .map_err(text)?
            .label("perfect calibration")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.6).stroke_width(2))
            });
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft, 15)?;

        let total: usize = self.bins.iter().map(|b| b.count).sum();
        let shares: Vec<(f64, f64, f64)> = self
            .bins
            .iter()
            .map(|b| (b.lo, b.hi, 100.0 * b.count as f64 / total.max(1) as f64))
            .collect();
        let y_max = shares.iter().map(|s| s.2).fold(1.0, f64::max) * 1.1;
        let mut counts = plane(&lower, None, 15, (45, 60), 0.0..1.0, 0.0..y_max)?;
        draw_mesh(
            counts
                .configure_mesh()
                .x_desc("confidence (max softmax)")
                .y_desc("examples (%)")
                .y_labels(4)
                .y_label_formatter(&whole),
            (16, 13),
        )?;
        counts
            .draw_series(shares.iter().map(|&(lo, hi, s)| {
                Rectangle::new([(lo, 0.0), (hi, s)], PALETTE[7].mix(0.7).filled())
            }))
            .map_err(text)?;
        Ok(())
    }
}

/// Confidence histograms of clean, adversarial, distal and noise inputs (share of each
/// set per bin), with τ marked. Writes `stem.png` and `stem.svg`.
pub fn plot_confidence_histograms(
    h: &ConfidenceHistograms,
    title: &str,
    stem: &Path,
) -> Result<Vec<PathBuf>> {
    let mut sets = vec![("clean".to_string(), h.clean.clone(), PALETTE[0])];
    if let Some(a) = &h.adversarial {
        sets.push((
            "adversarial (L∞ 8/255, worst case)".into(),
            a.clone(),
            PALETTE[3],
        ));
    }
    if let Some(d) = &h.distal {
        sets.push(("distal".into(), d.clone(), PALETTE[4]));
    }
    if let Some(n) = &h.noise {
        sets.push(("uniform noise".into(), n.clone(), PALETTE[7]));
    }
    if h.edges.len() != h.clean.len() + 1 {
        return Err(EvalError::Plot {
            path: stem.to_path_buf(),
            message: format!("{} edges for {} bins", h.edges.len(), h.clean.len()),
        });
    }
    render(
        &HistogramChart {
            edges: h.edges.clone(),
            sets,
            tau: h.tau,
            title: title.to_string(),
        },
        stem,
    )
}

struct HistogramChart {
    edges: Vec<f64>,
    sets: Vec<(String, Vec<usize>, RGBColor)>,
    tau: Option<f64>,
    title: String,
}

impl Chart for HistogramChart {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let shares: Vec<Vec<f64>> = self
            .sets
            .iter()
            .map(|(_, counts, _)| {
                let total: usize = counts.iter().sum();
                counts
                    .iter()
                    .map(|&c| 100.0 * c as f64 / total.max(1) as f64)
                    .collect()
            })
            .collect();
        let y_max = shares.iter().flatten().copied().fold(1.0, f64::max) * 1.1;
        let mut chart = plane(
            root,
            Some((self.title.as_str(), 24)),
            20,
            (50, 60),
            0.0..1.0,
            0.0..y_max,
        )?;
        draw_mesh(
            chart
                .configure_mesh()
                .x_desc("confidence (max softmax)")
                .y_desc("share of the set (%)")
                .y_label_formatter(&whole),
            (18, 15),
        )?;
        for ((name, _, color), share) in self.sets.iter().zip(&shares) {
            let color = *color;
            chart
                .draw_series(share.iter().enumerate().map(|(b, &s)| {
                    Rectangle::new(
                        [(self.edges[b], 0.0), (self.edges[b + 1], s)],
                        color.mix(0.25).filled(),
                    )
                }))
                .map_err(text)?;
            // The outline as a step line makes overlapping sets readable.
            let mut steps = vec![(self.edges[0], 0.0)];
            for (b, &s) in share.iter().enumerate() {
                steps.push((self.edges[b], s));
                steps.push((self.edges[b + 1], s));
            }
            steps.push((self.edges[share.len()], 0.0));
            chart
                .draw_series(LineSeries::new(steps, color.stroke_width(2)))
                .map_err(text)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.mix(0.6).filled())
                });
        }
        if let Some(tau) = self.tau {
            chart
                .draw_series(LineSeries::new(
                    [(tau, 0.0), (tau, y_max)],
                    BLACK.stroke_width(2),
                ))
                .map_err(text)?
                .label(format!("τ = {tau:.3} (99 % TPR)"))
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(2))
                });
        }
        // The legend goes to the side with less mass, so it hides no bar.
        let (mut left, mut right) = (0.0, 0.0);
        for share in &shares {
            for (b, &s) in share.iter().enumerate() {
                if self.edges[b] < 0.5 {
                    left += s;
                } else {
                    right += s;
                }
            }
        }
        let position = if left > right {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::UpperLeft
        };
        draw_legend(&mut chart, position, 15)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::histogram;

    fn non_empty(paths: &[PathBuf]) -> Result<()> {
        assert_eq!(paths.len(), 2);
        for p in paths {
            let len = std::fs::metadata(p).map_err(|e| EvalError::io(p, e))?.len();
            assert!(len > 1000, "{} has {len} bytes", p.display());
        }
        let svg = std::fs::read_to_string(&paths[1]).map_err(|e| EvalError::io(&paths[1], e))?;
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"));
        let png = std::fs::read(&paths[0]).map_err(|e| EvalError::io(&paths[0], e))?;
        assert_eq!(&png[1..4], b"PNG");
        Ok(())
    }

    #[test]
    fn plots_are_written_as_png_and_svg() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io(Path::new("tempdir"), e))?;
        let eps: Vec<f64> = (0..=16).map(|i| f64::from(i) / 255.0).collect();
        let a = AccuracyCurve {
            accuracy: eps.iter().map(|e| (1.0 - e * 20.0).max(0.0)).collect(),
            eps: eps.clone(),
        };
        let b = AccuracyCurve {
            accuracy: eps.iter().map(|e| 0.8 * (-e * 40.0).exp()).collect(),
            eps,
        };
        let paths =
            plot_accuracy_curves(&[("normal", &a), ("ccat", &b)], &dir.path().join("curves"))?;
        non_empty(&paths)?;
        let svg = std::fs::read_to_string(&paths[1]).map_err(|e| EvalError::io(&paths[1], e))?;
        assert!(svg.contains("normal") && svg.contains("ccat"));

        let conf: Vec<f64> = (0..200).map(|i| 0.3 + 0.7 * f64::from(i) / 200.0).collect();
        let correct: Vec<bool> = (0..200).map(|i| i % 3 != 0).collect();
        let cal = rampart_metrics::ece_15(&conf, &correct).map_err(EvalError::metric("ece"))?;
        non_empty(&plot_reliability(
            &cal.bins,
            cal.ece,
            "Reliability",
            &dir.path().join("rel"),
        )?)?;

        let h = ConfidenceHistograms {
            edges: (0..=20).map(|i| f64::from(i) / 20.0).collect(),
            clean: histogram(&conf),
            adversarial: Some(histogram(&conf.iter().map(|c| c * 0.8).collect::<Vec<_>>())),
            distal: Some(histogram(&[0.99; 50])),
            noise: Some(histogram(&[0.2; 50])),
            tau: Some(0.42),
        };
        non_empty(&plot_confidence_histograms(
            &h,
            "Confidences",
            &dir.path().join("hist"),
        )?)?;
        assert!(plot_accuracy_curves(&[], &dir.path().join("none")).is_err());
        Ok(())
    }
}

/// One series of [`plot_lines`]: a name, its points (x, y) and an optional label per
/// point (drawn beside it).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// The points, joined in order.
    pub points: Vec<(f64, f64)>,
    /// One label per point, or none.
    pub labels: Vec<String>,
    /// Draw the points only, unjoined (reference models beside a curve).
    pub markers_only: bool,
}

/// A line chart with marked points: `series` on axes described by `x_desc` and
/// `y_desc` (both ranges from the data, padded). Writes `stem.png` and `stem.svg`.
pub fn plot_lines(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    stem: &Path,
) -> Result<Vec<PathBuf>> {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.clone()).collect();
    if all.is_empty() || all.iter().any(|(x, y)| !(x.is_finite() && y.is_finite())) {
        return Err(EvalError::Plot {
            path: stem.to_path_buf(),
            message: "nothing finite to plot".into(),
        });
    }
    render(
        &LineChart {
            title: title.to_string(),
            x_desc: x_desc.to_string(),
            y_desc: y_desc.to_string(),
            series: series.to_vec(),
        },
        stem,
    )
}

struct LineChart {
    title: String,
    x_desc: String,
    y_desc: String,
    series: Vec<Series>,
}

fn padded_range(values: impl Iterator<Item = f64> + Clone) -> std::ops::Range<f64> {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.08).max(1e-3);
    (lo - pad)..(hi + pad)
}

impl Chart for LineChart {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let pts = self.series.iter().flat_map(|s| s.points.iter().copied());
        let x_range = padded_range(pts.clone().map(|p| p.0));
        // Room on the right for the labels drawn beside the points.
        let labelled = self.series.iter().any(|s| !s.labels.is_empty());
        let x_range = if labelled {
            x_range.start..x_range.end + 0.15 * (x_range.end - x_range.start)
        } else {
            x_range
        };
        let y_range = padded_range(pts.map(|p| p.1));
        let mut chart = plane(
            root,
            Some((self.title.as_str(), 26)),
            20,
            (50, 60),
            x_range,
            y_range,
        )?;
        draw_mesh(
            chart
                .configure_mesh()
                .x_desc(self.x_desc.as_str())
                .y_desc(self.y_desc.as_str()),
            (18, 15),
        )?;
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            if !s.markers_only {
                chart
                    .draw_series(LineSeries::new(
                        s.points.iter().copied(),
                        color.stroke_width(3),
                    ))
                    .map_err(text)?;
            }
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 5, color.filled())))
                .map_err(text)?
                .label(s.name.as_str())
                .legend(move |(x, y)| Circle::new((x + 12, y), 5, color.filled()));
            chart
                .draw_series(s.points.iter().zip(&s.labels).map(|(&p, label)| {
                    Text::new(label.clone(), p, (FAMILY, 14).into_font().color(&BLACK))
                }))
                .map_err(text)?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerLeft, 16)?;
        Ok(())
    }
}
