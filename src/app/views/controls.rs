//! The routing controls: model mode, router, k, capacity (with the resulting c and the actual
//! factor after rounding), Batch Priority Routing, solver iterations, routing group, layer and
//! overlay options. Returns whether anything that changes the routing changed.

use crate::app::settings::{GroupMode, LayerView, ModelFamily, ModelMode, Settings};
use crate::backend::DeviceChoice;
use crate::catalog::builtin_model;
use crate::figures::Palette;
use crate::model::ModelConfig;
use crate::routing::{CapacityRounding, RouterFamily, RouterKind};

/// What changed in one frame.
#[derive(Default)]
pub struct ControlsChange {
    /// Routing or model selection changed: run again.
    pub rerun: bool,
    /// The compute device choice changed.
    pub device: bool,
}

/// Keyboard shortcut of router `i` in [`RouterKind::ALL`].
pub fn router_key(i: usize) -> egui::Key {
    [
        egui::Key::Num1,
        egui::Key::Num2,
        egui::Key::Num3,
        egui::Key::Num4,
        egui::Key::Num5,
        egui::Key::Num6,
        egui::Key::Num7,
    ][i.min(6)]
}

pub fn controls(
    ui: &mut egui::Ui,
    s: &mut Settings,
    cfg: Option<&ModelConfig>,
    trace: Option<&crate::app::runner::TraceSummary>,
    images_in_group: usize,
) -> ControlsChange {
    let before = s.clone();
    ui.heading("Model");
    ui.horizontal(|ui| {
        ui.radio_value(
            &mut s.mode,
            ModelMode::Trained,
            "trained model for this router",
        )
        .on_hover_text("Switch to the built-in checkpoint trained with the selected router.");
    });
    ui.horizontal(|ui| {
        ui.radio_value(&mut s.mode, ModelMode::WhatIf, "what-if")
            .on_hover_text("Keep the current weights and swap only the routing rule.");
    });
    ui.add_enabled_ui(s.mode == ModelMode::Trained, |ui| {
        ui.horizontal(|ui| {
            ui.label("built-in models:");
            family_combo(ui, s);
        });
    });
    ui.separator();
    ui.heading("Router");
    // The photo model is one checkpoint: every router is a what-if on it.
    let photo = cfg.is_some_and(|c| c.is_feature_model());
    for (i, kind) in RouterKind::ALL.into_iter().enumerate() {
        let label = format!("{}  [{}]", kind.display_name(), i + 1);
        let available = s.mode == ModelMode::WhatIf || builtin_model(kind).is_some() || photo;
        let resp = ui.add_enabled(available, egui::RadioButton::new(s.router == kind, label));
        let resp = if available {
            resp
        } else {
            resp.on_disabled_hover_text(
                "No built-in model was trained with this router; use what-if to route a trained model's tokens with it.",
            )
        };
        if resp.clicked() {
            s.router = kind;
        }
    }
    let family = s.router.family();
    ui.separator();
    let e = cfg
        .and_then(|c| c.moe.as_ref())
        .map_or(0, |m| m.num_experts);
    let n = cfg.map_or(0, |c| c.seq_len()) * images_in_group.max(1);
    if family == RouterFamily::TokenChoice {
        ui.add(egui::Slider::new(&mut s.k, 1..=e.max(1)).text("k (experts per token)"));
        ui.checkbox(&mut s.batch_priority, "Batch Priority Routing")
            .on_hover_text("Process tokens in order of their top routing weight, so drops fall on the least confident tokens (V-MoE).");
    }
    if family != RouterFamily::Soft {
        ui.add(
            egui::Slider::new(&mut s.capacity_factor, 0.1..=4.0)
                .text("capacity factor")
                .step_by(0.05),
        );
        ui.horizontal(|ui| {
            egui::ComboBox::from_label("rounding")
                .selected_text(match s.rounding {
                    CapacityRounding::Ceil => "ceil",
                    CapacityRounding::Round => "round",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut s.rounding, CapacityRounding::Ceil, "ceil");
                    ui.selectable_value(
                        &mut s.rounding,
                        CapacityRounding::Round,
                        "round (half to even)",
                    );
                });
            let label = ui.label("multiple of");
            ui.add(egui::DragValue::new(&mut s.multiple_of).range(0..=64))
                .labelled_by(label.id);
        });
        if e > 0 {
            let asked = s.router_config();
            let (r, logged) = match trace {
                Some(t) => {
                    let r = t.routed_as_logged(asked.clone());
                    let logged = r != asked;
                    (r, logged)
                }
                None => (asked, false),
            };
            match r.capacity_for(n, e) {
                Ok((c, big_n)) => ui.label(format!(
                    "capacity c = {c} slots per expert{} (N = {big_n} tokens, e = {e}); actual factor e·c/N = {:.3}",
                    if logged { ", as logged" } else { "" },
                    (e * c) as f64 / big_n as f64
                )),
                Err(err) => ui.colored_label(egui::Color32::from_rgb(230, 120, 60), err.to_string()),
            };
        }
    } else if let Some(p) = cfg
        .and_then(|c| c.moe.as_ref())
        .and_then(|m| match m.router.capacity {
            crate::routing::CapacitySpec::Slots(p) => Some(p),
            _ => None,
        })
    {
        ui.label(format!("{p} slots per expert (fixed by the shape of mu)"));
    }
    if s.router.has_solver() {
        ui.add(egui::Slider::new(&mut s.iterations, 1..=200).text(if s.router.uses_adam() {
            "solver iterations (Adam)"
        } else {
            "Sinkhorn iterations"
        }))
        .on_hover_text("vmoe's maxiter; Sinkhorn runs 10·floor(maxiter/10) iterations (0 below 10), as OTT does.");
    }
    ui.separator();
    ui.heading("Routing group");
    let trained_g = cfg
        .and_then(|c| c.moe.as_ref())
        .map_or(1, |m| m.group_images);
    ui.radio_value(&mut s.group, GroupMode::Single, "this image alone")
        .on_hover_text(
            "Route the shown image's tokens on their own: capacity is computed for one image.",
        );
    ui.radio_value(
        &mut s.group,
        GroupMode::AllImages,
        "all loaded images as one group",
    )
    .on_hover_text(
        "All loaded images share the experts' capacity, as the images of one group do in V-MoE.",
    );
    ui.radio_value(
        &mut s.group,
        GroupMode::AsTrained,
        if trained_g == 1 {
            "groups as trained (1 image)".to_string()
        } else {
            format!("groups of {trained_g} images, as trained")
        },
    )
    .on_hover_text(
        "V-MoE routes groups of several images together (8 for the released models): tokens of \
             the whole group compete for each expert's capacity, so an image's routing depends on \
             its neighbours. Routing one image alone (the default) shows how the image routes on \
             its own; the trained group size reproduces the training-time competition.",
    );
    ui.separator();
    ui.heading("View");
    if let Some(moe) = cfg.and_then(|c| c.moe.as_ref()) {
        ui.horizontal(|ui| {
            let text = match s.layer {
                LayerView::One(i) => format!("block {}", moe.layers.get(i).copied().unwrap_or(0)),
                LayerView::All => "all, side by side".into(),
            };
            egui::ComboBox::from_label("MoE layer")
                .selected_text(text)
                .show_ui(ui, |ui| {
                    for (i, b) in moe.layers.iter().enumerate() {
                        ui.selectable_value(&mut s.layer, LayerView::One(i), format!("block {b}"));
                    }
                    ui.selectable_value(&mut s.layer, LayerView::All, "all, side by side");
                });
        });
    }
    ui.checkbox(&mut s.compare, "compare routers side by side")
        .on_hover_text("The shown image under every router (trained mode: each router's own model; what-if: these weights), each image routed alone.");
    ui.add(egui::Slider::new(&mut s.opacity, 0.0..=1.0).text("overlay opacity"));
    if family == RouterFamily::TokenChoice {
        ui.checkbox(&mut s.show_second_choices, "show second choices");
    }
    egui::ComboBox::from_label("palette")
        .selected_text(s.palette.name())
        .show_ui(ui, |ui| {
            for p in Palette::ALL {
                ui.selectable_value(&mut s.palette, p, p.name());
            }
        });
    egui::ComboBox::from_label("compute device")
        .selected_text(s.device.label())
        .show_ui(ui, |ui| {
            for d in DeviceChoice::ALL {
                ui.selectable_value(&mut s.device, d, d.label());
            }
        })
        .response
        .on_hover_text(
            "auto: the window's GPU when it is a hardware one, else the CPU. GPU: the window's \
             wgpu device, software adapters included. CPU: candle. A GPU that fails hands over \
             to the CPU with a notice.",
        );
    let routing_changed = s.router != before.router
        || s.mode != before.mode
        || s.k != before.k
        || s.capacity_factor != before.capacity_factor
        || s.rounding != before.rounding
        || s.multiple_of != before.multiple_of
        || s.batch_priority != before.batch_priority
        || s.iterations != before.iterations
        || s.group != before.group
        || s.compare != before.compare
        || s.family != before.family;
    ControlsChange {
        rerun: routing_changed,
        device: s.device != before.device,
    }
}

/// Which built-in models images open under (trained mode).
fn family_combo(ui: &mut egui::Ui, s: &mut Settings) {
    egui::ComboBox::from_id_salt("model family")
        .selected_text(s.family.label())
        .show_ui(ui, |ui| {
            for f in ModelFamily::ALL {
                ui.selectable_value(&mut s.family, f, f.label());
            }
        })
        .response
        .on_hover_text(
            "by image: 28×28 grey images open under the Fashion-MNIST models (one per router), \
             every other image under the photo model (DINOv2-S/14 with 8 experts in blocks 9 and \
             11; every router is a what-if on it).",
        );
}
