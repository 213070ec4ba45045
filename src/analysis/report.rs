//! An analysis as data files: `analysis.json` (everything but the atlas pixels) and one CSV per
//! table, each written atomically into the output folder.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{Analysis, AnalysisError};
use crate::routing::ArgStyle;

/// `analysis.json`.
pub fn json(a: &Analysis) -> Result<String, AnalysisError> {
    serde_json::to_string_pretty(a).map_err(|e| AnalysisError::Data(format!("JSON: {e}")))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `(file name, contents)` of every CSV table.
pub fn csv_tables(a: &Analysis) -> Vec<(&'static str, String)> {
    let cls = a.prefix_tokens;
    let gc = a.grid[1].max(1);
    let place = |p: usize| -> String {
        if p < cls {
            "true,,".to_string()
        } else {
            format!("false,{},{}", (p - cls) / gc, (p - cls) % gc)
        }
    };
    let mut class_expert = String::from("router,block,class,expert,tokens,share\n");
    let mut position =
        String::from("router,block,position,is_cls,patch_row,patch_col,expert,tokens\n");
    let mut drops_class = String::from("router,block,class,tokens,dropped,rate\n");
    let mut drops_pos =
        String::from("router,block,position,is_cls,patch_row,patch_col,dropped,rate\n");
    let mut load = String::from("router,block,expert,mean,std,min,max,p5,p25,p50,p75,p95\n");
    let mut ept = String::from("router,block,experts,tokens\n");
    let mut entropy = String::from("router,block,entropy_from,entropy_to,tokens\n");
    let mut atlas =
        String::from("router,block,expert,rank,image,token,patch_row,patch_col,score\n");
    let mut summary = String::from("router,block,dropped_token_rate,load_std,usage_entropy\n");
    let mut slots = String::from("router,block,slot,expert,position,mass\n");
    for run in &a.runs {
        let r = csv_field(&run.settings.label());
        for la in &run.layers {
            let st = &la.stats;
            let b = st.block;
            for (ci, name) in a.classes.iter().enumerate() {
                let name = csv_field(name);
                for j in 0..st.num_experts {
                    let _ = writeln!(
                        class_expert,
                        "{r},{b},{name},{j},{},{}",
                        st.tokens_per_class_expert[ci][j], st.class_expert_usage[ci][j]
                    );
                }
                let _ = writeln!(
                    drops_class,
                    "{r},{b},{name},{},{},{}",
                    st.tokens_per_class[ci],
                    st.dropped_per_class[ci],
                    st.dropped_per_class[ci] as f64 / st.tokens_per_class[ci].max(1) as f64
                );
            }
            for (p, row) in st.tokens_per_position_expert.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    let _ = writeln!(position, "{r},{b},{p},{},{j},{v}", place(p));
                }
                let d = st.dropped_per_position[p];
                let _ = writeln!(
                    drops_pos,
                    "{r},{b},{p},{},{d},{}",
                    place(p),
                    d as f64 / st.images.max(1) as f64
                );
            }
            for l in &st.load_per_expert {
                let _ = writeln!(
                    load,
                    "{r},{b},{},{},{},{},{},{},{},{},{},{}",
                    l.expert, l.mean, l.std, l.min, l.max, l.p5, l.p25, l.p50, l.p75, l.p95
                );
            }
            for (t, n) in st.experts_per_token_histogram.iter().enumerate() {
                let _ = writeln!(ept, "{r},{b},{t},{n}");
            }
            let counts = st
                .router_entropy
                .as_ref()
                .map_or(&[][..], |h| &h.counts[..]);
            let bins = counts.len().max(1) as f64;
            for (k, n) in counts.iter().enumerate() {
                let _ = writeln!(
                    entropy,
                    "{r},{b},{},{},{n}",
                    k as f64 / bins,
                    (k + 1) as f64 / bins
                );
            }
            for ex in &la.atlas {
                for (rank, t) in ex.patches.iter().enumerate() {
                    let _ = writeln!(
                        atlas,
                        "{r},{b},{},{rank},{},{},{},{},{}",
                        ex.expert,
                        csv_field(&t.name),
                        t.token,
                        t.row,
                        t.col,
                        t.score
                    );
                }
            }
            let _ = writeln!(
                summary,
                "{r},{b},{},{},{}",
                st.dropped_token_rate, st.load_std, st.usage_entropy
            );
            if let Some(sd) = &st.soft_slot_dispatch_per_position {
                let per_expert = sd.len() / st.num_experts.max(1);
                for (slot, row) in sd.iter().enumerate() {
                    for (p, v) in row.iter().enumerate() {
                        let _ =
                            writeln!(slots, "{r},{b},{slot},{},{p},{v}", slot / per_expert.max(1));
                    }
                }
            }
        }
    }
    let mut out = vec![
        ("class_expert.csv", class_expert),
        ("position_expert.csv", position),
        ("drops_by_class.csv", drops_class),
        ("drops_by_position.csv", drops_pos),
        ("expert_load.csv", load),
        ("experts_per_token.csv", ept),
        ("router_entropy.csv", entropy),
        ("atlas.csv", atlas),
        ("summary.csv", summary),
    ];
    if slots.lines().count() > 1 {
        out.push(("soft_slots.csv", slots));
    }
    out
}

/// Checks that `dir` can take the output before the run starts, creating nothing: it is a
/// folder or does not exist yet, and a probe file can be written (and is removed) in it or in
/// the nearest folder above it that exists. Errors name it as the `out` option in `style`.
pub fn check_output_dir(dir: &Path, style: ArgStyle) -> Result<(), AnalysisError> {
    let out = style.name("out");
    let sep = if style == ArgStyle::Cli { " " } else { "" };
    let err = |e: std::io::Error| {
        AnalysisError::Data(format!(
            "{out}{sep}{}: cannot write there: {e}",
            dir.display()
        ))
    };
    if dir.exists() && !dir.is_dir() {
        return Err(AnalysisError::Data(format!(
            "{out}{sep}{}: exists and is not a folder",
            dir.display()
        )));
    }
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p.to_path_buf(),
            _ => {
                existing = PathBuf::from(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return Err(AnalysisError::Data(format!(
            "{out}{sep}{}: cannot write there: {} is not a folder",
            dir.display(),
            existing.display()
        )));
    }
    let probe = existing.join(format!(".routerscope-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(err)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes `analysis.json` and the CSV tables into `dir`; returns the paths.
pub fn write_data(a: &Analysis, dir: &Path) -> Result<Vec<PathBuf>, AnalysisError> {
    let mut files = vec![("analysis.json".to_string(), json(a)?)];
    files.extend(csv_tables(a).into_iter().map(|(n, s)| (n.to_string(), s)));
    let mut out = Vec::new();
    for (name, body) in files {
        let path = dir.join(name);
        crate::tensor_io::write_atomic(&path, body.as_bytes())
            .map_err(|e| AnalysisError::Data(format!("{}: {e}", path.display())))?;
        out.push(path);
    }
    Ok(out)
}
