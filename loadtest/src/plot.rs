//! A small SVG line chart: latency percentiles against offered rate or fanout. Written
//! by hand (no plotting dependency): axes, ticks, a line and markers per series, a
//! legend. The x axis is logarithmic when the values span more than 20×.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;
const COLORS: [&str; 5] = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#666666"];

/// A series: its name and one y value per x.
pub type Series = (String, Vec<f64>);

fn nice_step(span: f64) -> f64 {
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Charts rendered by [`line_chart`], one above the other, in one SVG.
pub fn stack(charts: &[String]) -> String {
    let height = H * charts.len() as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}">"#
    );
    for (i, chart) in charts.iter().enumerate() {
        svg += &chart.replacen("<svg ", &format!(r#"<svg y="{}" "#, H * i as f64), 1);
    }
    svg += "</svg>\n";
    svg
}

/// Renders the chart. `xs` must be positive when the axis is logarithmic.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, xs: &[f64], series: &[Series]) -> String {
    let (x_min, x_max) = xs.iter().fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    let log_x = x_min > 0.0 && x_max / x_min > 20.0;
    let fx = |x: f64| if log_x { x.ln() } else { x };
    let (lo, hi) = if xs.is_empty() { (0.0, 1.0) } else { (fx(x_min), fx(x_max)) };
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 1.0, hi + 1.0) };
    let y_top = series.iter().flat_map(|(_, ys)| ys.iter().copied()).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + (fx(x) - lo) / (hi - lo) * plot_w;
    let py = |y: f64| TOP + plot_h - y / y_top * plot_h;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        LEFT + plot_w / 2.0,
        escape(title)
    );
    // Y grid and ticks.
    let step = nice_step(y_top);
    let mut y = 0.0;
    while y <= y_top + 1e-9 {
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            py(y) + 4.0,
            trim(y),
            py = py(y)
        );
        y += step;
    }
    // X ticks at the data points.
    for x in xs {
        let _ = writeln!(
            svg,
            r##"<line x1="{p:.1}" x2="{p:.1}" y1="{}" y2="{}" stroke="#e0e0e0"/><text x="{p:.1}" y="{}" text-anchor="middle">{}</text>"##,
            TOP,
            TOP + plot_h,
            TOP + plot_h + 16.0,
            trim(*x),
            p = px(*x)
        );
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}{}</text>
<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        H - 14.0,
        escape(x_label),
        if log_x { " (log scale)" } else { "" },
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    for (k, (name, ys)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<String> =
            xs.iter().zip(ys).map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        for (x, y) in xs.iter().zip(ys) {
            let _ = writeln!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, px(*x), py(*y));
        }
        let ly = TOP + 10.0 + 20.0 * k as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            LEFT + plot_w + 12.0,
            LEFT + plot_w + 36.0,
            LEFT + plot_w + 42.0,
            ly + 4.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn trim(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 { format!("{}", v.round() as i64) } else { format!("{v:.2}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_and_point() {
        let xs = [10.0, 100.0, 1000.0, 5000.0];
        let series = vec![
            ("p50".to_string(), vec![1.0, 2.0, 3.0, 4.0]),
            ("p99 <x>".to_string(), vec![2.0, 4.0, 8.0, 9.5]),
        ];
        let svg = line_chart("t", "fanout", "ms", &xs, &series);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 8);
        assert!(svg.contains("log scale") && svg.contains("p99 &lt;x&gt;"));
        // Linear when the span is small.
        assert!(!line_chart("t", "rate", "ms", &[100.0, 200.0], &series[..1]).contains("log scale"));
    }
}
