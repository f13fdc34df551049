//! Grouped bar charts as SVG, for the projections document: plain text
//! that any browser or GitHub renders, no fonts or plotting stack needed.

use std::fmt::Write;

/// A grouped bar chart: one group per category, one bar per series.
#[derive(Debug, Clone)]
pub struct Bars {
    /// Title above the chart.
    pub title: String,
    /// Unit of the values (axis label).
    pub unit: String,
    /// Group labels.
    pub categories: Vec<String>,
    /// (series label, one value per category; `None`: no bar, marked "—").
    pub series: Vec<(String, Vec<Option<f64>>)>,
}

const COLORS: &[&str] = &[
    "#3b6ea8", "#e0913a", "#4e9a5b", "#b8483f", "#7d5ba6", "#7a7a7a",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum at or above `x`: 1, 2 or 5 times a power of ten.
fn nice_max(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&v| v >= x)
        .unwrap_or(10.0 * p)
}

/// Renders `b` as an SVG document.
pub fn bar_chart(b: &Bars) -> String {
    let legend = 18.0 * b.series.len() as f64;
    let (w, h) = (760.0, 330.0 + legend);
    let (left, right, top, bottom) = (70.0, 20.0, 50.0, 40.0 + legend);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max = b
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .fold(0f64, |a, &x| a.max(x));
    let top_value = nice_max(max);
    let y = |v: f64| top + plot_h * (1.0 - v / top_value);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        w / 2.0,
        escape(&b.title)
    );
    for i in 0..=5 {
        let v = top_value * i as f64 / 5.0;
        let yy = y(v);
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            yy + 4.0,
            fmt_value(v)
        );
    }
    let _ = write!(
        s,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + plot_h / 2.0,
        escape(&b.unit)
    );
    let groups = b.categories.len().max(1) as f64;
    let group_w = plot_w / groups;
    let bar_w = group_w * 0.8 / b.series.len().max(1) as f64;
    for (g, cat) in b.categories.iter().enumerate() {
        let gx = left + group_w * g as f64 + group_w * 0.1;
        for (k, (_, values)) in b.series.iter().enumerate() {
            let x = gx + bar_w * k as f64;
            let color = COLORS[k % COLORS.len()];
            match values.get(g).copied().flatten() {
                Some(v) => {
                    let yy = y(v);
                    let _ = write!(
                        s,
                        r#"<rect x="{x:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                        bar_w - 2.0,
                        top + plot_h - yy,
                        x + bar_w / 2.0 - 1.0,
                        yy - 3.0,
                        fmt_value(v)
                    );
                }
                None => {
                    let _ = write!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#999">—</text>"##,
                        x + bar_w / 2.0 - 1.0,
                        top + plot_h - 4.0
                    );
                }
            }
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            top + plot_h + 18.0,
            escape(cat)
        );
    }
    let lx = left;
    for (k, (label, _)) in b.series.iter().enumerate() {
        let ly = h - legend + 18.0 * k as f64;
        let _ = write!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 10.0,
            COLORS[k % COLORS.len()],
            lx + 16.0,
            escape(label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
