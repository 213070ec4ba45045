//! The data behind a routing figure: one CSV row per token (its experts, slots, gates, whether it
//! was dropped) and a JSON document with the tokens, the per-expert load and capacity, and for
//! Soft MoE the dispatch and combine matrices.

use crate::model::PrefixTokens;
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::token_view::ImageRouting;

/// Header of [`tokens_csv`].
pub const CSV_HEADER: &str = "image,block,router,token,is_cls,patch_row,patch_col,dropped,primary_expert,experts,slots,gates,probabilities";

/// One row per token; list columns are `;`-separated, a dropped choice's slot is `-`.
pub fn tokens_csv(
    image: &str,
    block: usize,
    r: &ImageRouting,
    grid: [usize; 2],
    prefix: PrefixTokens,
    with_header: bool,
) -> String {
    let mut s = String::new();
    if with_header {
        let _ = writeln!(s, "{CSV_HEADER}");
    }
    let image = csv_field(image);
    for t in &r.tokens {
        let patch = t.index.checked_sub(prefix.count());
        let join = |it: &mut dyn Iterator<Item = String>| it.collect::<Vec<_>>().join(";");
        let experts = join(&mut t.choices.iter().map(|c| c.expert.to_string()));
        let slots = join(
            &mut t
                .choices
                .iter()
                .map(|c| c.slot.map_or("-".into(), |s| s.to_string())),
        );
        let gates = join(&mut t.choices.iter().map(|c| format!("{:.6}", c.gate)));
        let probs = join(&mut t.probs.iter().map(|p| format!("{p:.6}")));
        let _ = writeln!(
            s,
            "{image},{block},{},{},{},{},{},{},{},{experts},{slots},{gates},{probs}",
            r.router.cli_name(),
            t.index,
            patch.is_none(),
            patch.map_or(String::new(), |p| (p / grid[1]).to_string()),
            patch.map_or(String::new(), |p| (p % grid[1]).to_string()),
            t.dropped,
            t.primary.map_or(String::new(), |j| j.to_string()),
        );
    }
    s
}

fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// The routing of one image in one layer as JSON.
pub fn routing_json(
    image: &str,
    block: usize,
    r: &ImageRouting,
    grid: [usize; 2],
    prefix: PrefixTokens,
) -> Value {
    let tokens: Vec<Value> = r
        .tokens
        .iter()
        .map(|t| {
            let patch = t.index.checked_sub(prefix.count());
            json!({
                "token": t.index,
                "is_cls": patch.is_none(),
                "patch": patch.map(|p| [p / grid[1], p % grid[1]]),
                "dropped": t.dropped,
                "primary_expert": t.primary,
                "choices": t.choices.iter().map(|c| json!({
                    "expert": c.expert, "slot": c.slot, "gate": c.gate,
                })).collect::<Vec<_>>(),
                "probabilities": t.probs,
            })
        })
        .collect();
    let mut v = json!({
        "image": image,
        "block": block,
        "router": r.router.cli_name(),
        "num_experts": r.num_experts,
        "capacity": r.capacity,
        "k": r.k,
        "group_images": r.group_images,
        "tokens_per_expert": r.tokens_per_expert(),
        "requests_per_expert": r.requests_per_expert(),
        "dropped_tokens": r.dropped_count(),
        "experts_per_token_histogram": r.experts_per_token_histogram(),
        "tokens": tokens,
    });
    if let Some(soft) = &r.soft {
        v["soft_moe"] = json!({
            "slots_per_expert": soft.slots_per_expert,
            "dispatch_slot_by_token": soft.dispatch,
            "combine_token_by_slot": soft.combine,
        });
    }
    v
}
