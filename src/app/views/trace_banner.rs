//! The note above both views when the "model" is a routing trace: what the trace holds, whether
//! the view shows its logged routing or a what-if on its logged logits, and what it cannot show.

use crate::app::runner::TraceSummary;

/// Draws the note for `t`; `logged` says whether the routing shown is the trace's own, and
/// `gallery` how many of its images the gallery holds.
pub fn trace_banner(ui: &mut egui::Ui, t: &TraceSummary, logged: bool, gallery: usize) {
    let blocks: Vec<String> = t.layers.iter().map(|l| l.block.to_string()).collect();
    let pieces = t
        .layers
        .first()
        .map_or(String::new(), |l| l.pieces.join(", "));
    ui.label(format!(
        "Routing trace · {} images{} · MoE blocks {} · logged: {} · no model runs",
        t.images,
        if gallery < t.images {
            format!(" (the gallery holds the first {gallery}; the Dataset view analyses all)")
        } else {
            String::new()
        },
        blocks.join(", "),
        pieces,
    ));
    let note = match (logged, t.what_ifs_possible()) {
        (true, true) => {
            "Showing the logged routing. Another router, k or capacity is a what-if on the logged \
             logits of each layer: exact for that layer, while the layers after it ran on the \
             logged model and cannot change."
                .to_string()
        }
        (true, false) => {
            let missing: Vec<String> = t
                .layers
                .iter()
                .filter(|l| !l.logits)
                .map(|l| l.block.to_string())
                .collect();
            format!(
                "Showing the logged routing. MoE block(s) {} logged no router logits, so they \
                 have no what-ifs (other routers, k, capacity) and no router probabilities.",
                missing.join(", ")
            )
        }
        (false, _) => "What-if on the logged logits: exact for each layer on its own; the \
                       layers after it ran on the logged model and cannot change."
            .to_string(),
    };
    ui.label(egui::RichText::new(note).small().weak());
}
