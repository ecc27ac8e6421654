//! SVG charts of what the benchmark tables show (`netd-lab bench … --plot
//! DIR`), for the book's benchmark pages.
//!
//! Each benchmark hands the figures its printed table is made of to
//! [`write()`]; nothing is measured again. plotters draws with its SVG backend
//! only: text becomes `<text>` elements that the browser renders, so no font
//! file or system library is needed to draw. Every chart carries a title,
//! axis labels with units, a legend and a footnote naming the machine, the
//! date and the command of the run.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Chart size in pixels: wide enough for five bars in four groups and a
/// legend, small enough to sit beside a table in the book.
const SIZE: (u32, u32) = (900, 540);
/// Height of the footnote strip under the chart.
const FOOT: u32 = 30;
const FONT: &str = "sans-serif";

/// One figure of a table: median and the min–max spread (the whiskers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    /// Median and min–max of unsorted samples (the median as
    /// [`crate::bench::median`] takes it).
    pub(crate) fn of(samples: &[f64]) -> Stat {
        let (min, max) = crate::bench::min_max(samples);
        Stat { median: crate::bench::median(samples), min, max }
    }
}

/// One named line (x, figure) or one named bar per category.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub name: String,
    /// For [`Kind::Lines`]: (x, figure); for [`Kind::Bars`]: (category
    /// index, figure).
    pub points: Vec<(f64, Stat)>,
}

/// How the series are drawn.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// Lines with points and min–max whiskers over a numeric x axis.
    Lines { log_x: bool, log_y: bool },
    /// Bars grouped by category (one bar per series in each group), whiskers
    /// from min to max.
    Bars { categories: Vec<String> },
}

/// A chart of one table.
#[derive(Debug, Clone)]
pub(crate) struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub kind: Kind,
    pub series: Vec<Series>,
    /// Machine, date and command of the run.
    pub footnote: String,
}

/// A chart [`write()`] wrote in this process: where, and the series it
/// should show (what the smoke run checks).
#[derive(Debug, Clone)]
pub(crate) struct Written {
    pub path: PathBuf,
    pub series: Vec<String>,
    pub labels: Vec<String>,
}

static DIR: OnceLock<PathBuf> = OnceLock::new();
static WRITTEN: Mutex<Vec<Written>> = Mutex::new(Vec::new());
/// The `bench <name>` running now, for the footnote's command.
static RUNNING: Mutex<String> = Mutex::new(String::new());

/// Where this process writes its charts (`--plot DIR`); only the first call counts.
pub(crate) fn set_dir(dir: PathBuf) {
    let _ = DIR.set(dir);
}

/// Notes the benchmark that runs next (named in the footnotes).
pub(crate) fn running(name: &str) {
    *RUNNING.lock().unwrap_or_else(PoisonError::into_inner) = name.to_string();
}

/// Takes the list of charts written since the last call.
pub(crate) fn take_written() -> Vec<Written> {
    std::mem::take(&mut *WRITTEN.lock().unwrap_or_else(PoisonError::into_inner))
}

/// The footnote of a chart drawn now by the running benchmark.
pub(crate) fn footnote() -> String {
    let name = RUNNING.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let command = match crate::bench::Scale::current() {
        crate::bench::Scale::Full => format!("cargo xtask bench {name} --plot DIR"),
        crate::bench::Scale::Smoke => {
            format!("cargo xtask bench smoke (bench {name}; smoke sizes, figures mean nothing)")
        }
    };
    format!("{} · {} UTC · {command}", crate::bench::machine(), today())
}

/// Today's date (UTC) as `YYYY-MM-DD`.
fn today() -> String {
    let days = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`): no date crate for one footnote.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Renders `chart` in `<dir>/<file>` when `--plot DIR` was given (and says
/// where); does nothing otherwise.
pub(crate) fn write(file: &str, chart: &Chart) -> Result<()> {
    let Some(dir) = DIR.get() else { return Ok(()) };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let svg = render(chart).with_context(|| format!("drawing {file}"))?;
    let path = dir.join(file);
    std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    println!("(chart: {})", path.display());
    WRITTEN.lock().unwrap_or_else(PoisonError::into_inner).push(Written {
        path,
        series: chart.series.iter().map(|s| s.name.clone()).collect(),
        labels: vec![chart.title.clone(), chart.x_label.clone(), chart.y_label.clone()],
    });
    Ok(())
}

/// Draws `chart` as an SVG document.
pub(crate) fn render(chart: &Chart) -> Result<String> {
    ensure!(chart.series.iter().any(|s| !s.points.is_empty()), "nothing to draw in `{}`", chart.title);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw)?;
        let (main, foot) = root.split_vertically(SIZE.1 - FOOT);
        match &chart.kind {
            Kind::Lines { log_x, log_y } => {
                let (x, y) = (span(chart, |(x, _)| (*x, *x)), span(chart, |(_, s)| (s.min, s.max)));
                // The legend sits in the upper left: the y axis leaves it
                // room above the data. Linear axes start at zero (times and
                // rates read against it).
                let room = legend_room(chart.series.len());
                let lin = |(lo, hi): (f64, f64), room: f64| {
                    let lo = lo.min(0.0);
                    let hi = hi + (hi - lo).max(f64::EPSILON) * 0.05;
                    RangedCoordf64::from(lo..lo + (hi - lo) / (1.0 - room))
                };
                let log = |(lo, hi): (f64, f64), room: f64| -> LogCoord<f64> {
                    let (lo, hi) = (lo.max(f64::MIN_POSITIVE) / 1.5, hi.max(f64::MIN_POSITIVE) * 1.5);
                    (lo..lo * (hi / lo).powf(1.0 / (1.0 - room))).log_scale().into()
                };
                match (log_x, log_y) {
                    (false, false) => lines(&main, chart, lin(x, 0.0), lin(y, room))?,
                    (true, false) => lines(&main, chart, log(x, 0.0), lin(y, room))?,
                    (false, true) => lines(&main, chart, lin(x, 0.0), log(y, room))?,
                    (true, true) => lines(&main, chart, log(x, 0.0), log(y, room))?,
                }
            }
            Kind::Bars { categories } => bars(&main, chart, categories)?,
        }
        foot.draw_text(&chart.footnote, &(FONT, 13).into_text_style(&foot).color(&BLACK.mix(0.7)), (10, 8))
            .map_err(draw)?;
        root.present().map_err(draw)?;
    }
    Ok(svg)
}

fn draw<E: std::error::Error + Send + Sync>(error: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("plotters: {error}")
}

/// The share of the plot's height the legend of `series` entries takes
/// (14 px text, ~19 px a line, its frame and margins).
fn legend_room(series: usize) -> f64 {
    ((19 * series + 30) as f64 / 420.0).min(0.6)
}

/// Lowest and highest of `f` over every point.
fn span(chart: &Chart, f: impl Fn(&(f64, Stat)) -> (f64, f64)) -> (f64, f64) {
    chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(&f))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (a, b)| (lo.min(a), hi.max(b)))
}

/// The i-th series' colour: dark enough to read on white as a thin line
/// (plotters' own palette has a pale yellow third), distinct from each other.
fn colour(i: usize) -> RGBAColor {
    const COLOURS: [(u8, u8, u8); 6] =
        [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)];
    let (r, g, b) = COLOURS[i % COLOURS.len()];
    RGBColor(r, g, b).to_rgba()
}

fn caption(chart: &Chart) -> (&str, (&'static str, u32)) {
    (&chart.title, (FONT, 20))
}

fn lines<X, Y>(area: &DrawingArea<SVGBackend<'_>, Shift>, chart: &Chart, x: X, y: Y) -> Result<()>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let (title, style) = caption(chart);
    let mut ctx = ChartBuilder::on(area)
        .caption(title, style)
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(draw)?;
    let ticks = |v: &f64| number(*v);
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_label_formatter(&ticks)
        .y_label_formatter(&ticks)
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 13))
        .draw()
        .map_err(draw)?;
    for (i, series) in chart.series.iter().enumerate() {
        let c = colour(i);
        let points: Vec<(f64, f64)> = series.points.iter().map(|(x, s)| (*x, s.median)).collect();
        ctx.draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(draw)?
            .label(series.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        ctx.draw_series(points.iter().map(|p| Circle::new(*p, 4, c.filled()))).map_err(draw)?;
        ctx.draw_series(
            series
                .points
                .iter()
                .filter(|(_, s)| s.max > s.min)
                .map(|(x, s)| PathElement::new(vec![(*x, s.min), (*x, s.max)], c.stroke_width(1))),
        )
        .map_err(draw)?;
    }
    legend(&mut ctx)
}

fn legend<'a, X, Y>(ctx: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>) -> Result<()>
where
    X: Ranged,
    Y: Ranged,
{
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(draw)
}

fn bars(area: &DrawingArea<SVGBackend<'_>, Shift>, chart: &Chart, categories: &[String]) -> Result<()> {
    if categories.is_empty() {
        bail!("a bar chart needs categories");
    }
    // Room for the figures over the bars, and for the legend above them.
    let top =
        span(chart, |(_, s)| (s.median, s.max)).1.max(f64::EPSILON) * 1.1 / (1.0 - legend_room(chart.series.len()));
    let (title, style) = caption(chart);
    let mut ctx = ChartBuilder::on(area)
        .caption(title, style)
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..categories.len() as f64, 0.0..top)
        .map_err(draw)?;
    // Category names are drawn under their groups below, not as ticks.
    let none = |_: &f64| String::new();
    let ticks = |v: &f64| number(*v);
    ctx.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&none)
        .y_label_formatter(&ticks)
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 13))
        .draw()
        .map_err(draw)?;
    let n = chart.series.len().max(1) as f64;
    // Each group fills 80 % of its slot; bars touch within the group.
    let width = 0.8 / n;
    for (i, series) in chart.series.iter().enumerate() {
        let c = colour(i);
        let left = |at: f64| at + 0.1 + width * i as f64;
        ctx.draw_series(
            series
                .points
                .iter()
                .map(|(at, s)| Rectangle::new([(left(*at), 0.0), (left(*at) + width, s.median)], c.filled())),
        )
        .map_err(draw)?
        .label(series.name.as_str())
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], c.filled()));
        ctx.draw_series(series.points.iter().filter(|(_, s)| s.max > s.min).map(|(at, s)| {
            let mid = left(*at) + width / 2.0;
            PathElement::new(vec![(mid, s.min), (mid, s.max)], BLACK.stroke_width(1))
        }))
        .map_err(draw)?;
        // The figure above each bar: what a reader would look up in the table.
        ctx.draw_series(series.points.iter().map(|(at, s)| {
            let mid = left(*at) + width / 2.0;
            let style = (FONT, 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
            Text::new(number(s.median), (mid, s.max.max(s.median)), style)
        }))
        .map_err(draw)?;
    }
    let style = (FONT, 14).into_text_style(area).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, name) in categories.iter().enumerate() {
        let (px, py) = ctx.backend_coord(&(i as f64 + 0.5, 0.0));
        let (ox, oy) = area.get_base_pixel();
        area.draw_text(name, &style, (px - ox, py - oy + 6)).map_err(draw)?;
    }
    legend(&mut ctx)
}

/// A tick or bar value as the tables write it: no needless decimals,
/// thousands apart.
fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 1_000.0 {
        let n = v.round() as i64;
        let (sign, n) = if n < 0 { ("-", -n) } else { ("", n) };
        let digits = n.to_string();
        let mut out = String::from(sign);
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(' ');
            }
            out.push(c);
        }
        out
    } else {
        // Three significant digits at most, trailing zeros dropped.
        let decimals = if a >= 100.0 || a == 0.0 {
            0
        } else if a >= 10.0 {
            1
        } else if a >= 1.0 {
            2
        } else {
            3
        };
        let text = format!("{v:.decimals$}");
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            text
        }
    }
}

/// Checks a written chart the way a reader's browser would start: an SVG
/// document, complete, with its series names and labels in it.
pub(crate) fn check(written: &Written) -> Result<()> {
    let text = std::fs::read_to_string(&written.path).with_context(|| format!("reading {}", written.path.display()))?;
    check_svg(&text, written.series.iter().chain(&written.labels)).with_context(|| written.path.display().to_string())
}

fn check_svg<'a>(text: &str, names: impl IntoIterator<Item = &'a String>) -> Result<()> {
    let body = text.trim_start();
    let body = match body.strip_prefix("<?xml") {
        Some(rest) => rest.split_once("?>").map(|(_, r)| r.trim_start()).unwrap_or(""),
        None => body,
    };
    ensure!(body.starts_with("<svg"), "not an SVG document: starts with {:?}", &body[..body.len().min(40)]);
    ensure!(body.trim_end().ends_with("</svg>"), "the SVG document is not closed");
    ensure!(text.contains("<text"), "no text elements");
    for name in names {
        ensure!(text.contains(&xml_escape(name)), "`{name}` is not in the chart");
    }
    Ok(())
}

/// How plotters' SVG backend escapes text.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// A file name for chart `name` of the benchmark: `<bench>-<name>.svg`.
pub(crate) fn file(bench: &str, name: &str) -> String {
    format!("{bench}-{name}.svg")
}

/// `path` made absolute against the working directory, so the lab writes
/// where the user's shell pointed, whatever directory it later works in.
pub(crate) fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("--plot {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.into(),
            points: points.iter().map(|&(x, y)| (x, Stat { median: y, min: y * 0.9, max: y * 1.1 })).collect(),
        }
    }

    fn chart(kind: Kind, series: Vec<Series>) -> Chart {
        Chart {
            title: "Programming N peers".into(),
            x_label: "peers".into(),
            y_label: "time to program, ms".into(),
            kind,
            series,
            footnote: "AMD EPYC, 2 cores · 2026-12-07 UTC · cargo xtask bench vxlan --plot DIR".into(),
        }
    }

    #[test]
    fn a_line_chart_is_an_svg_with_its_series_and_labels() {
        for (log_x, log_y) in [(false, false), (true, true), (false, true)] {
            let c = chart(
                Kind::Lines { log_x, log_y },
                vec![
                    series("anchor <flannel>", &[(1e3, 60.0), (1e4, 2_493.0)]),
                    series("ours", &[(1e3, 14.5), (1e4, 184.0)]),
                ],
            );
            let svg = render(&c).unwrap();
            let names: Vec<String> = vec![
                "anchor <flannel>".into(),
                "ours".into(),
                c.title.clone(),
                c.x_label.clone(),
                c.y_label.clone(),
                c.footnote.clone(),
            ];
            check_svg(&svg, &names).unwrap();
            // A name that is not drawn is missed: the check can fail.
            assert!(check_svg(&svg, &["floor".to_string()]).is_err());
            assert!(svg.contains("<circle"), "points are drawn");
        }
    }

    #[test]
    fn a_bar_chart_names_its_categories_and_series() {
        let c = chart(
            Kind::Bars { categories: vec!["ADD".into(), "DEL".into()] },
            vec![series("host-local", &[(0.0, 20.0), (1.0, 18.0)]), series("netd-ipam", &[(0.0, 19.0), (1.0, 17.5)])],
        );
        let svg = render(&c).unwrap();
        let names: Vec<String> = ["ADD", "DEL", "host-local", "netd-ipam", "peers"].map(String::from).to_vec();
        check_svg(&svg, &names).unwrap();
        assert!(svg.contains("<rect"), "bars are drawn");
    }

    #[test]
    fn nothing_to_draw_is_an_error_and_a_truncated_file_fails_the_check() {
        assert!(render(&chart(Kind::Lines { log_x: false, log_y: false }, vec![])).is_err());
        let svg =
            render(&chart(Kind::Bars { categories: vec!["a".into()] }, vec![series("s", &[(0.0, 1.0)])])).unwrap();
        assert!(check_svg(&svg[..svg.len() / 2], &[]).is_err());
        assert!(check_svg("<html></html>", &[]).is_err());
    }

    #[test]
    fn dates_and_numbers() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_429), (2025, 12, 7));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(number(2_493.1), "2 493");
        assert_eq!(number(14.49), "14.5");
        assert_eq!(number(0.95), "0.95");
        assert_eq!(number(5.0), "5");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(0.0), "0");
    }
}
