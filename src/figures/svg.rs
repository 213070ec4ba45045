//! Vector routing figures: the image with its patch grid coloured by expert (dropped tokens
//! crossed out, second choices as inner squares, Expert Choice multi-picks as stripes), a legend,
//! a title, and the expert-load histogram with axes and the capacity line. A comparison figure
//! puts several routers' panels side by side. Plain SVG 1.1, one `<rect class="patch">` per patch.

use crate::model::PrefixTokens;
use std::fmt::Write as _;

use super::palette::{DROPPED, Palette, Rgb};
use super::token_view::ImageRouting;
use crate::routing::RouterFamily;

/// One routing panel to draw.
pub struct Panel<'a> {
    pub title: String,
    pub routing: &'a ImageRouting,
}

/// What every panel shares.
pub struct FigureInput<'a> {
    pub title: String,
    /// The image as PNG bytes, embedded under the grid (`None`: grey background).
    pub image_png: Option<&'a [u8]>,
    /// Aspect ratio (width / height) of the image as shown.
    pub image_aspect: f32,
    pub grid: [usize; 2],
    pub prefix: PrefixTokens,
    pub palette: Palette,
    pub opacity: f32,
}

pub(crate) fn hex(c: Rgb) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const PANEL_W: f32 = 320.0;
const PAD: f32 = 16.0;

/// An SVG document with one panel per routing, side by side, and a shared legend.
pub fn routing_figure(input: &FigureInput<'_>, panels: &[Panel<'_>]) -> String {
    let grid_w = PANEL_W;
    let grid_h = PANEL_W / input.image_aspect.max(0.1);
    let cls_h = if input.prefix.count() > 0 { 22.0 } else { 0.0 };
    let hist_h = 150.0;
    let panel_h = 24.0 + cls_h + grid_h + 30.0 + hist_h + 40.0;
    let experts = panels.first().map_or(0, |p| p.routing.num_experts);
    let legend_h = 28.0 + 18.0 * (experts.saturating_sub(1) / 16) as f32;
    // Wide enough for the legend (one row) and a long title.
    let legend_w = PAD + experts.min(16) as f32 * 72.0 + 230.0;
    let title_w = PAD + input.title.chars().count() as f32 * 7.5;
    let width = (PAD + panels.len() as f32 * (PANEL_W + PAD))
        .max(legend_w)
        .max(title_w)
        .ceil();
    let height = PAD + 30.0 + panel_h + legend_h + PAD;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="Ubuntu, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<title>{}</title>"#, esc(&input.title));
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{PAD}" y="{}" font-size="14" fill="#111111">{}</text>"##,
        PAD + 14.0,
        esc(&input.title)
    );
    let image_href = input
        .image_png
        .map(|png| format!("data:image/png;base64,{}", base64(png)));
    for (k, p) in panels.iter().enumerate() {
        let x0 = PAD + k as f32 * (PANEL_W + PAD);
        let y0 = PAD + 30.0;
        panel(
            &mut s,
            input,
            p,
            image_href.as_deref(),
            x0,
            y0,
            grid_w,
            grid_h,
            cls_h,
            hist_h,
        );
    }
    // Legend.
    let ly = height - PAD - legend_h + 10.0;
    let _ = writeln!(s, r#"<g id="legend">"#);
    let mut x = PAD;
    let mut ly = ly;
    for j in 0..experts {
        if j > 0 && j % 16 == 0 {
            x = PAD;
            ly += 18.0;
        }
        let _ = writeln!(
            s,
            r##"<rect class="legend-swatch" data-expert="{j}" x="{x}" y="{ly}" width="12" height="12" fill="{}"/><text x="{}" y="{}" font-size="12" fill="#111111">expert {j}</text>"##,
            hex(input.palette.expert(j)),
            x + 16.0,
            ly + 10.5
        );
        x += 72.0;
    }
    let family = panels.first().map(|p| p.routing.router.family());
    if family != Some(RouterFamily::Soft) {
        let red = hex(DROPPED);
        let _ = writeln!(
            s,
            r##"<g class="legend-dropped"><rect x="{x}" y="{ly}" width="12" height="12" fill="none" stroke="{red}" stroke-width="1.5"/><path d="M{} {} L{} {} M{} {} L{} {}" stroke="{red}" stroke-width="1.5"/><text x="{}" y="{}" font-size="12" fill="#111111">dropped / picked by no expert</text></g>"##,
            x + 2.0,
            ly + 2.0,
            x + 10.0,
            ly + 10.0,
            x + 10.0,
            ly + 2.0,
            x + 2.0,
            ly + 10.0,
            x + 16.0,
            ly + 10.5
        );
    }
    let _ = writeln!(s, "</g>\n</svg>");
    s
}

#[allow(clippy::too_many_arguments)]
fn panel(
    s: &mut String,
    input: &FigureInput<'_>,
    p: &Panel<'_>,
    image_href: Option<&str>,
    x0: f32,
    y0: f32,
    gw_px: f32,
    gh_px: f32,
    cls_h: f32,
    hist_h: f32,
) {
    let r = p.routing;
    let family = r.router.family();
    let [gh, gw] = input.grid;
    let _ = writeln!(
        s,
        r#"<g class="panel" data-router="{}">"#,
        r.router.cli_name()
    );
    let _ = writeln!(
        s,
        r##"<text x="{x0}" y="{}" font-size="13" fill="#111111">{}</text>"##,
        y0 + 12.0,
        esc(&p.title)
    );
    let top = y0 + 24.0 + cls_h;
    match image_href {
        Some(href) => {
            let _ = writeln!(
                s,
                r#"<image x="{x0}" y="{top}" width="{gw_px}" height="{gh_px}" preserveAspectRatio="none" style="image-rendering:pixelated" xlink:href="{href}" href="{href}"/>"#
            );
        }
        None => {
            let _ = writeln!(
                s,
                r##"<rect x="{x0}" y="{top}" width="{gw_px}" height="{gh_px}" fill="#808080"/>"##
            );
        }
    }
    let np = input.prefix.count();
    let cw = gw_px / gw as f32;
    let ch = gh_px / gh as f32;
    let a = input.opacity;
    let _ = writeln!(s, r#"<g class="patches">"#);
    for t in &r.tokens {
        let (x, y, w, h, cls) = match t.index.checked_sub(input.prefix.count()) {
            Some(q) => (
                x0 + (q % gw) as f32 * cw,
                top + (q / gw) as f32 * ch,
                cw,
                ch,
                false,
            ),
            None => {
                let pw = cw.max(40.0).min(gw_px * 0.7 / np as f32);
                (
                    x0 + t.index as f32 * pw,
                    y0 + 24.0,
                    pw - 1.0,
                    cls_h - 4.0,
                    true,
                )
            }
        };
        let class = match (cls, input.prefix.cls && t.index == 0) {
            (false, _) => "patch",
            (true, true) => "cls-token",
            (true, false) => "prefix-token",
        };
        if cls && t.index + 1 == np {
            let label = match np {
                1 if input.prefix.cls => "CLS token".to_string(),
                _ => (0..np)
                    .filter_map(|i| input.prefix.name(i))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let _ = writeln!(
                s,
                r##"<text x="{:.2}" y="{:.2}" font-size="11" fill="#333333">{label}</text>"##,
                x + w + 6.0,
                y + h * 0.75
            );
        }
        let kept: Vec<usize> = t
            .choices
            .iter()
            .filter(|c| c.slot.is_some())
            .map(|c| c.expert as usize)
            .collect();
        let fill = match t.primary {
            Some(j) if !t.dropped => hex(input.palette.expert(j)),
            _ => "none".into(),
        };
        let _ = writeln!(
            s,
            r##"<rect class="{class}" data-token="{}" data-expert="{}" data-dropped="{}" x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="{fill}" fill-opacity="{a}" stroke="#000000" stroke-opacity="0.35" stroke-width="0.5"/>"##,
            t.index,
            t.primary.map_or(String::new(), |j| j.to_string()),
            t.dropped
        );
        if t.dropped {
            let red = hex(DROPPED);
            let m = w.min(h) * 0.2;
            let _ = writeln!(
                s,
                r#"<path class="dropped-mark" d="M{:.2} {:.2} L{:.2} {:.2} M{:.2} {:.2} L{:.2} {:.2}" stroke="{red}" stroke-width="{:.2}"/>"#,
                x + m,
                y + m,
                x + w - m,
                y + h - m,
                x + w - m,
                y + m,
                x + m,
                y + h - m,
                (w / 12.0).clamp(1.0, 3.0)
            );
        } else if family == RouterFamily::ExpertChoice && kept.len() > 1 {
            let sw = w / kept.len() as f32;
            for (k, &j) in kept.iter().enumerate() {
                let _ = writeln!(
                    s,
                    r#"<rect class="multi-pick" x="{:.2}" y="{y:.2}" width="{sw:.2}" height="{h:.2}" fill="{}" fill-opacity="{a}"/>"#,
                    x + k as f32 * sw,
                    hex(input.palette.expert(j))
                );
            }
            let _ = writeln!(
                s,
                r##"<text x="{:.2}" y="{:.2}" font-size="{:.1}" text-anchor="end" fill="#ffffff">×{}</text>"##,
                x + w - 2.0,
                y + h * 0.35,
                (h * 0.3).clamp(7.0, 12.0),
                kept.len()
            );
        }
        if family == RouterFamily::TokenChoice && t.choices.len() > 1 {
            let c = t.choices[1];
            let inset = w * 0.3;
            let (fill, stroke) = match c.slot {
                Some(_) => (
                    hex(input.palette.expert(c.expert as usize)),
                    "none".to_string(),
                ),
                None => ("none".to_string(), hex(DROPPED)),
            };
            let _ = writeln!(
                s,
                r#"<rect class="second-choice" x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>"#,
                x + inset,
                y + inset,
                w - 2.0 * inset,
                h - 2.0 * inset
            );
        }
    }
    let _ = writeln!(s, "</g>");
    histogram(s, input, r, x0, top + gh_px + 30.0, gw_px, hist_h);
    let _ = writeln!(s, "</g>");
}

fn histogram(
    s: &mut String,
    input: &FigureInput<'_>,
    r: &ImageRouting,
    x0: f32,
    y0: f32,
    w: f32,
    h: f32,
) {
    let e = r.num_experts;
    let kept = r.tokens_per_expert();
    let requests = r.requests_per_expert();
    let family = r.router.family();
    let cap = r.capacity as f32 / r.group_images.max(1) as f32;
    let max_v = kept
        .iter()
        .cloned()
        .chain(requests.iter().map(|&v| v as f32))
        .fold(cap, f32::max)
        .max(1.0);
    // An even top keeps the middle tick an integer.
    let top = (max_v.ceil() / 2.0).ceil() * 2.0;
    let left = x0 + 28.0;
    let plot_w = w - 28.0;
    let y_of = |v: f32| y0 + h - v / top * h;
    let _ = writeln!(s, r#"<g class="histogram">"#);
    let label = if family == RouterFamily::Soft {
        "combine mass per expert (tokens)"
    } else {
        "tokens per expert (line: capacity)"
    };
    let _ = writeln!(
        s,
        r##"<text x="{x0}" y="{}" font-size="11" fill="#111111">{label}</text>"##,
        y0 - 8.0
    );
    // Axes with ticks.
    let _ = writeln!(
        s,
        r##"<path class="axis" d="M{left} {y0} L{left} {} L{} {}" stroke="#333333" fill="none"/>"##,
        y0 + h,
        left + plot_w,
        y0 + h
    );
    for tick in [0.0, top / 2.0, top] {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{:.2}" font-size="10" text-anchor="end" fill="#333333">{}</text>"##,
            left - 4.0,
            y_of(tick) + 3.5,
            (tick * 10.0).round() / 10.0
        );
    }
    let bw = plot_w / e.max(1) as f32;
    for j in 0..e {
        let x = left + j as f32 * bw + bw * 0.1;
        let v = kept[j];
        let _ = writeln!(
            s,
            r#"<rect class="bar" data-expert="{j}" x="{x:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{}"/>"#,
            y_of(v),
            bw * 0.8,
            y0 + h - y_of(v),
            hex(input.palette.expert(j))
        );
        let over = requests[j] as f32 - v;
        if family == RouterFamily::TokenChoice && over > 0.0 {
            let _ = writeln!(
                s,
                r#"<rect class="overflow" data-expert="{j}" x="{x:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{}" fill-opacity="0.6"/>"#,
                y_of(v + over),
                bw * 0.8,
                y_of(v) - y_of(v + over),
                hex(DROPPED)
            );
        }
        if e <= 16 || j % 4 == 0 {
            let _ = writeln!(
                s,
                r##"<text x="{:.2}" y="{}" font-size="10" text-anchor="middle" fill="#333333">{j}</text>"##,
                x + bw * 0.4,
                y0 + h + 12.0
            );
        }
    }
    if family != RouterFamily::Soft {
        let _ = writeln!(
            s,
            r##"<line class="capacity" x1="{left}" x2="{}" y1="{:.2}" y2="{:.2}" stroke="#111111" stroke-dasharray="4 3"/>"##,
            left + plot_w,
            y_of(cap),
            y_of(cap)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" font-size="10" text-anchor="middle" fill="#333333">expert</text>"##,
        left + plot_w / 2.0,
        y0 + h + 25.0
    );
    let _ = writeln!(s, "</g>");
}

/// Standard base64 (RFC 4648) with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(T[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
