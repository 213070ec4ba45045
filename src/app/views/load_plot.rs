//! Expert load: tokens per expert (kept, and requests over capacity for Token Choice) against
//! the capacity line, and the distribution of experts per token. Clicking a bar highlights that
//! expert's tokens.

use egui_plot::{Bar, BarChart, HLine, Plot};

use crate::figures::{DROPPED, ImageRouting, Palette};
use crate::routing::RouterFamily;

use super::color;

/// Draws the load histogram; returns the expert whose bar was clicked.
pub fn load_plot(
    ui: &mut egui::Ui,
    r: &ImageRouting,
    palette: Palette,
    height: f32,
) -> Option<usize> {
    let e = r.num_experts;
    let family = r.router.family();
    let kept = r.tokens_per_expert();
    let requests = r.requests_per_expert();
    let kept_bars: Vec<Bar> = kept
        .iter()
        .enumerate()
        .map(|(j, &v)| {
            Bar::new(j as f64, v as f64)
                .width(0.8)
                .fill(color(palette.expert(j), 1.0))
                .name(format!("expert {j}"))
        })
        .collect();
    let kept_chart = BarChart::new("tokens processed", kept_bars);
    // One bar per expert (zero where nothing overflowed): stacking pairs bars by position.
    let overflow: Vec<Bar> = requests
        .iter()
        .zip(&kept)
        .enumerate()
        .map(|(j, (&req, &k))| {
            Bar::new(j as f64, (req as f64 - k as f64).max(0.0))
                .width(0.8)
                .fill(color(DROPPED, 0.55))
                .name(format!("expert {j}: over capacity"))
        })
        .collect();
    let has_overflow = family == RouterFamily::TokenChoice
        && requests.iter().zip(&kept).any(|(&r, &k)| r as f32 > k);
    let overflow_chart = BarChart::new("requests over capacity (dropped)", overflow)
        .color(color(DROPPED, 0.8))
        .stack_on(&[&kept_chart]);
    // Per image; with several images in a group the capacity is the group's, shown per image.
    let cap = r.capacity as f64 / r.group_images.max(1) as f64;
    let title = if family == RouterFamily::Soft {
        "combine mass per expert (tokens)".to_string()
    } else if r.group_images > 1 {
        format!(
            "tokens per expert from this image (line: capacity {} per group of {} images, shown per image)",
            r.capacity, r.group_images
        )
    } else {
        format!("tokens per expert (line: capacity c = {})", r.capacity)
    };
    ui.label(title);
    let mut clicked = None;
    let resp = Plot::new("load_plot")
        .height(height)
        .x_grid_spacer(egui_plot::uniform_grid_spacer(|_| [1.0, 5.0, 10.0]))
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .include_y(0.0)
        .include_y(cap.max(1.0) * 1.1)
        .include_x(-0.6)
        .include_x(e as f64 - 0.4)
        .x_axis_label("expert")
        .show(ui, |pui| {
            pui.bar_chart(kept_chart);
            if has_overflow {
                pui.bar_chart(overflow_chart);
            }
            if family != RouterFamily::Soft {
                pui.hline(
                    HLine::new("capacity", cap)
                        .color(egui::Color32::from_rgb(230, 230, 230))
                        .width(1.5),
                );
            }
            if let Some(p) = pui
                .pointer_coordinate()
                .filter(|_| pui.response().clicked())
            {
                let j = p.x.round();
                if (0.0..e as f64).contains(&j) {
                    clicked = Some(j as usize);
                }
            }
        });
    drop(resp);
    if has_overflow {
        ui.colored_label(
            color(DROPPED, 1.0),
            "red: requests beyond capacity (dropped choices)",
        );
    }
    let dropped = r.dropped_count();
    if family != RouterFamily::Soft {
        ui.label(format!(
            "dropped tokens: {dropped} of {} ({:.0}%)",
            r.tokens.len(),
            100.0 * dropped as f64 / r.tokens.len().max(1) as f64
        ));
    }
    if family == RouterFamily::ExpertChoice {
        let hist = r.experts_per_token_histogram();
        let last = hist.iter().rposition(|&c| c > 0).unwrap_or(0).max(2);
        let bars: Vec<Bar> = hist
            .iter()
            .take(last + 1)
            .enumerate()
            .map(|(m, &c)| {
                Bar::new(m as f64, c as f64)
                    .width(0.8)
                    .fill(if m == 0 {
                        color(DROPPED, 0.9)
                    } else {
                        egui::Color32::from_rgb(120, 150, 200)
                    })
                    .name(format!("{m} experts"))
            })
            .collect();
        ui.label("experts per token (0 = picked by none)");
        Plot::new("experts_per_token")
            .height(height * 0.6)
            .allow_drag(false)
            .allow_zoom(false)
            .allow_scroll(false)
            .include_y(0.0)
            .x_axis_label("experts processing the token")
            .show(ui, |pui| pui.bar_chart(BarChart::new("tokens", bars)));
    }
    clicked
}
