//! The disagreement map of two routings of one image: per MoE block, the patch grid over the
//! image with every patch whose top-1 expert differs between the two marked (the CLS token as
//! a cell of its own), each patch's `<title>` naming its token.

use std::fmt::Write as _;
use std::io::Cursor;

use super::dataset::{PAD, open, text};
use super::svg::base64;
use crate::trace::diff::TraceDiff;

/// The figure of image `i` of `d`; `pixels` is the image (as the first trace holds it).
pub fn disagreement_figure(
    d: &TraceDiff,
    i: usize,
    pixels: Option<&image::RgbImage>,
    grid: [usize; 2],
    cls: bool,
    image_name: &str,
) -> String {
    let side = 220.0f32;
    let panel_w = side + PAD;
    let w = PAD + d.blocks.len() as f32 * panel_w;
    let h = PAD + 40.0 + side + 60.0;
    let mut s = String::new();
    open(
        &mut s,
        w,
        h,
        &format!(
            "routing disagreement · {image_name} · A: {} · B: {}",
            short(&d.a),
            short(&d.b)
        ),
    );
    let png = pixels.and_then(|p| {
        let mut out = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(p.clone())
            .write_to(&mut out, image::ImageFormat::Png)
            .ok()
            .map(|()| base64(&out.into_inner()))
    });
    let (gh, gw) = (grid[0].max(1), grid[1].max(1));
    let cell = (side / gh.max(gw) as f32).min(side);
    for (k, b) in d.blocks.iter().enumerate() {
        let x0 = PAD + k as f32 * panel_w;
        let y0 = PAD + 40.0;
        let Some(map) = b.maps.get(i) else { continue };
        let differ = b.per_image.get(i).copied().unwrap_or(0.0);
        text(
            &mut s,
            x0,
            y0 - 6.0,
            12.0,
            "start",
            &format!(
                "block {} · top-1 differs on {:.1}%",
                b.block,
                100.0 * differ
            ),
        );
        if let Some(png) = &png {
            let _ = writeln!(
                s,
                r#"<image x="{x0}" y="{y0}" width="{:.1}" height="{:.1}" preserveAspectRatio="none" href="data:image/png;base64,{png}"/>"#,
                cell * gw as f32,
                cell * gh as f32
            );
        }
        let first_patch = usize::from(cls);
        for (t, &differs) in map.iter().enumerate().skip(first_patch) {
            let p = t - first_patch;
            let (r, c) = (p / gw, p % gw);
            let (fill, opacity) = if differs {
                ("#d62728", 0.6)
            } else {
                ("#ffffff", 0.0)
            };
            let _ = writeln!(
                s,
                r##"<rect class="patch" data-token="{t}" x="{:.1}" y="{:.1}" width="{cell:.1}" height="{cell:.1}" fill="{fill}" fill-opacity="{opacity}" stroke="#888888" stroke-width="0.3"><title>token {t} (patch {r}, {c}): top-1 {}</title></rect>"##,
                x0 + c as f32 * cell,
                y0 + r as f32 * cell,
                if differs { "differs" } else { "agrees" }
            );
        }
        if cls {
            let differs = map.first().copied().unwrap_or(false);
            text(
                &mut s,
                x0,
                y0 + cell * gh as f32 + 16.0,
                11.0,
                "start",
                &format!(
                    "CLS token: top-1 {}",
                    if differs { "differs" } else { "agrees" }
                ),
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="{PAD}" y="{:.1}" font-size="11" fill="#555555">red: the two routings send the patch to different top-1 experts</text>"##,
        h - 12.0
    );
    s.push_str("</svg>\n");
    s
}

fn short(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned())
}
