//! The image with its patch grid coloured by expert: dropped tokens crossed out in red, Token
//! Choice second choices as an inner square, Expert Choice tokens picked by several experts as
//! stripes (one per expert) with their count, the CLS token as a cell above the image. Hovering
//! a patch shows its details; other experts' patches dim while one expert is highlighted.

use crate::figures::{DROPPED, ImageRouting, Palette, TokenRouting};
use crate::model::PrefixTokens;
use crate::routing::RouterFamily;

use super::color;
use super::token_details::token_details;

/// How the grid is drawn.
pub struct GridStyle {
    pub opacity: f32,
    pub palette: Palette,
    pub show_second_choices: bool,
    pub highlight: Option<usize>,
    /// A token to outline (the atlas patch the image was opened from).
    pub marked: Option<usize>,
}

/// Draws `routing` over `texture` within `side` × `side` points; returns the hovered token.
pub fn patch_grid(
    ui: &mut egui::Ui,
    texture: &egui::TextureHandle,
    routing: &ImageRouting,
    grid: [usize; 2],
    prefix: PrefixTokens,
    style: &GridStyle,
    side: f32,
) -> Option<usize> {
    let [tw, th] = texture.size().map(|v| v as f32);
    let scale = side / tw.max(th);
    let img_size = egui::vec2(tw * scale, th * scale);
    let np = prefix.count();
    let cls_h = if np > 0 {
        (side / 12.0).clamp(14.0, 24.0)
    } else {
        0.0
    };
    let (rect, response) = ui.allocate_exact_size(
        egui::vec2(img_size.x, img_size.y + cls_h + 4.0 * f32::from(np > 0)),
        egui::Sense::click(),
    );
    let painter = ui.painter_at(rect);
    let img_rect = egui::Rect::from_min_size(
        egui::pos2(rect.left(), rect.bottom() - img_size.y),
        img_size,
    );
    painter.image(
        texture.id(),
        img_rect,
        egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
        egui::Color32::WHITE,
    );
    let family = routing.router.family();
    let [gh, gw] = grid;
    let cell = egui::vec2(img_rect.width() / gw as f32, img_rect.height() / gh as f32);
    let mut cells: Vec<(usize, egui::Rect)> = Vec::with_capacity(routing.tokens.len());
    for t in &routing.tokens {
        // Prefix tokens (CLS, distillation, registers) share the strip above the image.
        let prefix_w = (cell.x.max(cls_h * 2.5)).min(img_size.x * 0.7 / np.max(1) as f32);
        let r = match prefix.patch(t.index) {
            Some(p) => egui::Rect::from_min_size(
                img_rect.min + egui::vec2((p % gw) as f32 * cell.x, (p / gw) as f32 * cell.y),
                cell,
            ),
            None => egui::Rect::from_min_size(
                rect.min + egui::vec2(t.index as f32 * prefix_w, 0.0),
                egui::vec2(prefix_w - 1.0, cls_h),
            ),
        };
        draw_token(&painter, r, t, family, style);
        cells.push((t.index, r));
    }
    let line = egui::Stroke::new(0.5, egui::Color32::from_black_alpha(90));
    for c in 0..=gw {
        let x = img_rect.left() + c as f32 * cell.x;
        painter.line_segment(
            [
                egui::pos2(x, img_rect.top()),
                egui::pos2(x, img_rect.bottom()),
            ],
            line,
        );
    }
    for r in 0..=gh {
        let y = img_rect.top() + r as f32 * cell.y;
        painter.line_segment(
            [
                egui::pos2(img_rect.left(), y),
                egui::pos2(img_rect.right(), y),
            ],
            line,
        );
    }
    if let Some((_, r)) = cells.iter().find(|(i, _)| np > 0 && *i + 1 == np) {
        let label = match (prefix.cls, prefix.distillation, prefix.registers) {
            (true, false, 0) => "CLS token".to_string(),
            (cls, dist, regs) => [
                cls.then(|| "CLS".to_string()),
                dist.then(|| "distillation".to_string()),
                (regs > 0).then(|| format!("{regs} registers")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" · "),
        };
        painter.text(
            r.right_center() + egui::vec2(6.0, 0.0),
            egui::Align2::LEFT_CENTER,
            label,
            egui::FontId::proportional(11.0),
            ui.visuals().text_color(),
        );
    }
    if let Some((_, r)) = style
        .marked
        .and_then(|m| cells.iter().find(|(i, _)| *i == m))
    {
        painter.rect_stroke(
            *r,
            0.0,
            egui::Stroke::new(3.0, egui::Color32::from_rgb(255, 204, 0)),
            egui::StrokeKind::Outside,
        );
    }
    let hovered = response
        .hover_pos()
        .and_then(|pos| cells.iter().find(|(_, r)| r.contains(pos)).map(|(i, _)| *i));
    if let Some(i) = hovered {
        if let Some((_, r)) = cells.iter().find(|(j, _)| *j == i) {
            painter.rect_stroke(
                *r,
                0.0,
                egui::Stroke::new(2.0, egui::Color32::WHITE),
                egui::StrokeKind::Inside,
            );
        }
        if let Some(t) = routing.tokens.iter().find(|t| t.index == i) {
            response.on_hover_ui_at_pointer(|ui| {
                token_details(ui, t, family, grid, prefix, style.palette);
            });
        }
    }
    hovered
}

/// Whether `t` is processed by expert `j`.
fn uses(t: &TokenRouting, j: usize, family: RouterFamily) -> bool {
    match family {
        RouterFamily::Soft => t.primary == Some(j),
        _ => t
            .choices
            .iter()
            .any(|c| c.slot.is_some() && c.expert as usize == j),
    }
}

fn draw_token(
    painter: &egui::Painter,
    r: egui::Rect,
    t: &TokenRouting,
    family: RouterFamily,
    style: &GridStyle,
) {
    let a = style.opacity;
    let dim = style.highlight.is_some_and(|h| !uses(t, h, family));
    if t.dropped {
        let red = egui::Stroke::new((r.width() / 10.0).clamp(1.5, 4.0), color(DROPPED, 0.95));
        painter.rect_filled(r, 0.0, egui::Color32::from_black_alpha((a * 120.0) as u8));
        let m = r.shrink(r.width() * 0.18);
        painter.line_segment([m.left_top(), m.right_bottom()], red);
        painter.line_segment([m.right_top(), m.left_bottom()], red);
        painter.rect_stroke(
            r.shrink(1.0),
            0.0,
            egui::Stroke::new(1.5, color(DROPPED, 0.9)),
            egui::StrokeKind::Inside,
        );
        return;
    }
    let kept: Vec<usize> = t
        .choices
        .iter()
        .filter(|c| c.slot.is_some())
        .map(|c| c.expert as usize)
        .collect();
    match family {
        RouterFamily::ExpertChoice if kept.len() > 1 => {
            // One vertical stripe per picking expert, and the count.
            let w = r.width() / kept.len() as f32;
            for (s, &j) in kept.iter().enumerate() {
                let stripe = egui::Rect::from_min_size(
                    r.min + egui::vec2(s as f32 * w, 0.0),
                    egui::vec2(w, r.height()),
                );
                painter.rect_filled(stripe, 0.0, color(style.palette.expert(j), a));
            }
            painter.text(
                r.right_top() + egui::vec2(-2.0, 1.0),
                egui::Align2::RIGHT_TOP,
                format!("×{}", kept.len()),
                egui::FontId::proportional((r.height() / 3.0).clamp(8.0, 14.0)),
                egui::Color32::WHITE,
            );
        }
        _ => {
            if let Some(j) = t.primary {
                painter.rect_filled(r, 0.0, color(style.palette.expert(j), a));
            }
        }
    }
    if style.show_second_choices && family == RouterFamily::TokenChoice && t.choices.len() > 1 {
        // The second choice: filled inner square when it got a slot, red outline when dropped.
        let c = t.choices[1];
        let inner = r.shrink(r.width() * 0.3);
        match c.slot {
            Some(_) => {
                painter.rect_filled(
                    inner,
                    0.0,
                    color(style.palette.expert(c.expert as usize), (a + 0.3).min(1.0)),
                );
            }
            None => {
                painter.rect_stroke(
                    inner,
                    0.0,
                    egui::Stroke::new(1.5, color(DROPPED, 0.9)),
                    egui::StrokeKind::Inside,
                );
            }
        }
    }
    if dim {
        painter.rect_filled(r, 0.0, egui::Color32::from_black_alpha(170));
    }
}
