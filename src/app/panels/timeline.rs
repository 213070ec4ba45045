//! The Timeline panel: a run's metrics over steps for one MoE block (one small plot per metric,
//! each step bin's minimum and maximum, one shared step cursor: click a plot to move it), the
//! expert × step load heatmap, the block's alerts (click: jump to the step), and the probe
//! images at the snapshot at or before the cursor with each patch coloured by its top expert,
//! optionally with the patches whose top expert changed since the previous snapshot marked.

use egui_plot::{Line, Plot, PlotPoints, VLine};

use crate::app::RouterscopeApp;
use crate::figures::{Palette, sequential};
use crate::run::alerts::AlertKind;
use crate::run::series::METRICS;

impl RouterscopeApp {
    pub(in crate::app) fn timeline_panel(&mut self, ui: &mut egui::Ui) {
        if let Some(e) = &self.timeline.error {
            ui.colored_label(egui::Color32::from_rgb(240, 90, 80), format!("Error: {e}"));
        }
        let Some(data) = self.timeline.data.clone() else {
            if self.timeline.error.is_none() {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("Reading the run…");
                });
            }
            return;
        };
        ui.label(
            egui::RichText::new(format!(
                "{} · {} steps ({}–{}) · {} experts · {} rank{}{}",
                data.model,
                data.steps,
                data.first.map_or("-".into(), |s| s.to_string()),
                data.last.map_or("-".into(), |s| s.to_string()),
                data.experts,
                data.world_size,
                if data.world_size == 1 { "" } else { "s" },
                if data.partial > 0 {
                    format!(
                        " · {} partial steps (not every rank has committed them)",
                        data.partial
                    )
                } else {
                    String::new()
                }
            ))
            .strong(),
        );
        if data.series.is_empty() {
            ui.label("No step has been committed yet.");
        }
        let mut follow = self.timeline.follow;
        ui.horizontal(|ui| {
            if ui
                .checkbox(&mut follow, "follow latest")
                .on_hover_text("new steps and snapshots appear as the run is written")
                .changed()
            {
                self.set_follow_latest(follow);
            }
            ui.separator();
            ui.label("MoE block");
            for (i, s) in data.series.iter().enumerate() {
                if ui
                    .selectable_label(self.timeline.block == i, s.block.to_string())
                    .clicked()
                {
                    self.timeline.block = i;
                    self.timeline.heatmap = None;
                }
            }
            ui.separator();
            if let Some(c) = self.timeline.cursor {
                ui.label(format!("cursor: step {c}"));
            }
        });
        let Some(series) = data
            .series
            .get(self.timeline.block.min(data.series.len().saturating_sub(1)))
        else {
            return;
        };
        let (first, last) = series.step_range();
        let cursor = self.timeline.cursor.unwrap_or(last);
        let mut clicked: Option<f64> = None;
        let plot_w = (ui.available_width() - 8.0).max(300.0);
        for (k, name) in METRICS.iter().enumerate() {
            let bins = series.bins();
            let mid = |b: &crate::run::series::Bin| (b.first + b.last) as f64 / 2.0;
            let lo: Vec<[f64; 2]> = bins
                .iter()
                .filter(|b| b.metrics[k].0.is_finite())
                .map(|b| [mid(b), b.metrics[k].0])
                .collect();
            let hi: Vec<[f64; 2]> = bins
                .iter()
                .filter(|b| b.metrics[k].0.is_finite())
                .map(|b| [mid(b), b.metrics[k].1])
                .collect();
            let at = bins
                .iter()
                .find(|b| b.first <= cursor && cursor <= b.last)
                .map(|b| b.metrics[k].1)
                .filter(|v| v.is_finite());
            ui.label(
                egui::RichText::new(match (hi.is_empty(), at) {
                    (true, _) => format!("{name}: not logged"),
                    (false, Some(v)) => format!("{name} (at the cursor: {v:.3})"),
                    (false, None) => name.to_string(),
                })
                .small(),
            );
            let resp = Plot::new(("timeline", k))
                .height(48.0)
                .width(plot_w)
                .allow_drag(false)
                .allow_zoom(false)
                .allow_scroll(false)
                .show_axes([k == METRICS.len() - 1, true])
                .include_x(first as f64)
                .include_x(last as f64)
                .include_y(0.0)
                .link_axis(egui::Id::unique("timeline"), [true, false])
                .show(ui, |pui| {
                    pui.line(
                        Line::new(format!("{name} (max)"), PlotPoints::from(hi))
                            .color(egui::Color32::from_rgb(90, 160, 230)),
                    );
                    pui.line(
                        Line::new(format!("{name} (min)"), PlotPoints::from(lo))
                            .color(egui::Color32::from_rgb(60, 110, 170)),
                    );
                    pui.vline(
                        VLine::new("cursor", cursor as f64)
                            .color(egui::Color32::from_rgb(240, 200, 80)),
                    );
                    pui.pointer_coordinate()
                        .filter(|_| pui.response().clicked())
                        .map(|p| p.x)
                });
            if let Some(x) = resp.inner {
                clicked = Some(x);
            }
        }
        if let Some(x) = clicked {
            self.set_timeline_cursor(x.round() as i64);
        }
        self.timeline_heatmap(ui, series, cursor);
        // The block's alerts.
        let alerts: Vec<_> = data
            .alerts
            .iter()
            .filter(|a| a.block == series.block)
            .collect();
        ui.label(
            egui::RichText::new(format!(
                "alerts of block {} ({})",
                series.block,
                alerts.len()
            ))
            .strong(),
        );
        if alerts.is_empty() {
            ui.label("none: no collapse, dead expert or sustained drops by the default rules");
        }
        let mut jump = None;
        for a in alerts.iter().take(40) {
            let colour = match a.kind {
                AlertKind::Collapse => egui::Color32::from_rgb(230, 90, 90),
                AlertKind::DeadExperts => egui::Color32::from_rgb(170, 130, 220),
                AlertKind::Drops => egui::Color32::from_rgb(240, 160, 60),
            };
            let text = egui::RichText::new(format!(
                "{} · steps {}–{}: {}",
                a.kind.name(),
                a.first_step,
                a.last_step,
                a.detail
            ))
            .color(colour);
            if ui.selectable_label(false, text).clicked() {
                jump = Some(a.first_step);
            }
        }
        if let Some(s) = jump {
            self.set_follow_latest(false);
            self.set_timeline_cursor(s);
        }
        ui.separator();
        self.timeline_snapshot_view(ui, series.block);
    }

    /// The expert × step heatmap of the block's load shares, with the cursor.
    fn timeline_heatmap(
        &mut self,
        ui: &mut egui::Ui,
        series: &crate::run::series::BlockSeries,
        cursor: i64,
    ) {
        let e = series.experts();
        let bins = series.bins();
        if bins.is_empty() || e == 0 {
            return;
        }
        let key = (series.block, bins.len());
        if self.timeline.heatmap.as_ref().map(|h| (h.0, h.1)) != Some(key) {
            let vmax = bins
                .iter()
                .flat_map(|b| b.shares.iter().map(move |v| v / b.rows.max(1) as f64))
                .fold(1e-12f64, f64::max);
            let mut img = egui::ColorImage::filled([bins.len(), e], egui::Color32::WHITE);
            for (c, b) in bins.iter().enumerate() {
                for j in 0..e {
                    let rgb = sequential((b.shares[j] / b.rows.max(1) as f64 / vmax) as f32);
                    img[(c, j)] = egui::Color32::from_rgb(rgb[0], rgb[1], rgb[2]);
                }
            }
            let tex = ui
                .ctx()
                .load_texture("timeline-heatmap", img, egui::TextureOptions::NEAREST);
            self.timeline.heatmap = Some((key.0, key.1, tex));
        }
        let Some((_, _, tex)) = &self.timeline.heatmap else {
            return;
        };
        ui.label(format!(
            "expert share of block {}'s kept tokens over steps (rows: experts 0–{}; darker: more)",
            series.block,
            e - 1
        ));
        let w = (ui.available_width() - 8.0).max(300.0);
        let h = (e as f32 * 6.0).clamp(48.0, 200.0);
        let resp = ui.add(
            egui::Image::new(tex)
                .fit_to_exact_size(egui::vec2(w, h))
                .sense(egui::Sense::click()),
        );
        let (first, last) = series.step_range();
        let span = (last - first).max(1) as f32;
        let x = resp.rect.left() + resp.rect.width() * (cursor - first) as f32 / span;
        ui.painter().line_segment(
            [
                egui::pos2(x, resp.rect.top()),
                egui::pos2(x, resp.rect.bottom()),
            ],
            egui::Stroke::new(1.5, egui::Color32::from_rgb(240, 200, 80)),
        );
        if resp.clicked()
            && let Some(p) = resp.interact_pointer_pos()
        {
            let step = first as f32 + span * (p.x - resp.rect.left()) / resp.rect.width();
            self.set_follow_latest(false);
            self.set_timeline_cursor(step.round() as i64);
        }
    }

    /// The probe images at the snapshot at or before the cursor, with play and step buttons.
    fn timeline_snapshot_view(&mut self, ui: &mut egui::Ui, block: usize) {
        let Some(data) = &self.timeline.data else {
            return;
        };
        let snaps = data.snapshots.clone();
        if snaps.is_empty() {
            ui.label("This run has no snapshots of probe images.");
            return;
        }
        let at = self.snapshot_at_cursor();
        ui.horizontal(|ui| {
            ui.label(egui::RichText::new("probe images").strong());
            let idx = at.and_then(|s| snaps.iter().position(|&x| x == s));
            let go = |i: usize| snaps.get(i).copied();
            let mut target = None;
            if ui.button("|<").on_hover_text("first snapshot").clicked() {
                target = go(0);
            }
            if ui.button("<").on_hover_text("previous snapshot").clicked() {
                target = idx.and_then(|i| i.checked_sub(1)).and_then(go);
            }
            let playing = self.timeline.playing.is_some();
            if ui
                .button(if playing { "pause" } else { "play" })
                .on_hover_text("step through the snapshots")
                .clicked()
            {
                self.timeline.playing = if playing {
                    None
                } else {
                    Some(std::time::Instant::now())
                };
            }
            if ui.button(">").on_hover_text("next snapshot").clicked() {
                target = idx.map_or(Some(0), |i| Some(i + 1)).and_then(go);
            }
            if ui.button(">|").on_hover_text("last snapshot").clicked() {
                target = snaps.last().copied();
            }
            let mut compare = self.timeline.compare_previous;
            if ui
                .checkbox(&mut compare, "mark changes since the previous snapshot")
                .changed()
            {
                self.timeline.compare_previous = compare;
            }
            if let Some(t) = target {
                self.set_follow_latest(false);
                self.set_timeline_cursor(t);
            }
        });
        if let Some(started) = self.timeline.playing
            && started.elapsed().as_millis() >= 600
        {
            let next = at.and_then(|s| snaps.iter().find(|&&x| x > s).copied());
            match next {
                Some(n) => {
                    self.set_follow_latest(false);
                    self.set_timeline_cursor(n);
                    self.timeline.playing = Some(std::time::Instant::now());
                }
                None => self.timeline.playing = None,
            }
        }
        let Some(snap) = self.timeline.snapshot.clone() else {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("Reading the snapshot…");
            });
            return;
        };
        if self.timeline.textures_step != Some(snap.step) {
            self.timeline.textures = snap
                .images
                .iter()
                .enumerate()
                .map(|(i, im)| {
                    let ci = egui::ColorImage::from_rgb(
                        [im.width() as usize, im.height() as usize],
                        im.as_raw(),
                    );
                    ui.ctx().load_texture(
                        format!("timeline-probe-{i}"),
                        ci,
                        egui::TextureOptions::NEAREST,
                    )
                })
                .collect();
            self.timeline.textures_step = Some(snap.step);
        }
        let compare = self.timeline.compare_previous;
        let prev = snap.previous.as_ref();
        ui.label(match (compare, prev) {
            (true, Some((p, _))) => format!(
                "step {p} (left) and the snapshot of step {} (right) · red outline: the patch's \
                 top expert differs from step {p}'s",
                snap.step
            ),
            (true, None) => format!(
                "snapshot of step {} (the first: nothing to compare)",
                snap.step
            ),
            _ => format!(
                "snapshot of step {} · each patch coloured by its top expert",
                snap.step
            ),
        });
        let Some(top) = snap.top.get(&block) else {
            ui.label(format!("the snapshot did not log block {block}"));
            return;
        };
        let palette = Palette::TolMuted;
        let s = snap.grid[0] * snap.grid[1] + usize::from(snap.cls);
        let side = 120.0;
        let (gh, gw) = (snap.grid[0].max(1), snap.grid[1].max(1));
        // One tile: the image with each patch coloured by its top expert in `tops`, outlined
        // where `other` (the other snapshot's) differs. Returns the tile's response and the
        // patches that differ.
        let tile = |ui: &mut egui::Ui,
                    tex: &egui::TextureHandle,
                    i: usize,
                    tops: &[u32],
                    other: Option<&[u32]>|
         -> (egui::Response, usize) {
            let (rect, resp) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::hover());
            ui.painter().image(
                tex.id(),
                rect,
                egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                egui::Color32::WHITE,
            );
            let (cw, chh) = (side / gw as f32, side / gh as f32);
            let base = i * s + usize::from(snap.cls);
            let mut changed = 0;
            for p in 0..gh * gw {
                let Some(&j) = tops.get(base + p) else {
                    continue;
                };
                let r = egui::Rect::from_min_size(
                    rect.min + egui::vec2((p % gw) as f32 * cw, (p / gw) as f32 * chh),
                    egui::vec2(cw, chh),
                );
                if j != u32::MAX {
                    let c = palette.expert(j as usize);
                    ui.painter().rect_filled(
                        r,
                        0.0,
                        egui::Color32::from_rgba_unmultiplied(c[0], c[1], c[2], 110),
                    );
                }
                if other.is_some_and(|o| o.get(base + p) != Some(&j)) {
                    changed += 1;
                    ui.painter().rect_stroke(
                        r.shrink(0.5),
                        0.0,
                        egui::Stroke::new(1.5, egui::Color32::from_rgb(230, 40, 40)),
                        egui::StrokeKind::Inside,
                    );
                }
            }
            (resp, changed)
        };
        let before: Option<&[u32]> = prev
            .filter(|_| compare)
            .and_then(|(_, pt)| pt.get(&block))
            .map(Vec::as_slice);
        ui.horizontal_wrapped(|ui| {
            for (i, tex) in self.timeline.textures.iter().enumerate() {
                let name = snap.names.get(i).cloned().unwrap_or_default();
                ui.vertical(|ui| {
                    ui.horizontal(|ui| {
                        // The two snapshots side by side: the earlier one, then this one with
                        // the patches whose top expert changed outlined.
                        if let (Some(b), Some((p, _))) = (before, prev) {
                            let (r, _) = tile(ui, tex, i, b, None);
                            r.on_hover_text(format!("{name} at step {p}"));
                        }
                        let (r, changed) = tile(ui, tex, i, top, before);
                        r.on_hover_text(format!(
                            "{name} at step {}: {changed} patches changed top expert",
                            snap.step
                        ));
                    });
                    ui.label(egui::RichText::new(name).small());
                });
            }
        });
    }
}
