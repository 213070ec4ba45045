//! A time-boxed fuzz pass over every parser of untrusted input, on stable Rust: proptest mutates
//! valid files (bit flips, byte overwrites, truncations, insertions, splices of the hostile seed
//! corpus in `tests/fuzz-corpus/`) and every parser must answer with a value or an error, never a
//! panic, within its bounds. Covered: the safetensors checkpoint reader (header, config JSON,
//! tensors), the vmoe index and shard reader, routing traces (file and description), the IDX
//! reader (raw and gzip), image decoding, the ONNX importer, and the routers on hostile
//! configurations (capacity paddings, k, capacity factors, iterations). Cases per parser: `ROUTERSCOPE_FUZZ_CASES` (default 2000); CI runs the
//! default; each seed file of the corpus is also a regression test on its own.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use routerscope::import::vmoe_format::{read_arrays, read_index, write_checkpoint};
use routerscope::model::{
    ModelConfig, decode_image_bytes, load_checkpoint, preset, random_weights, save_checkpoint,
};
use routerscope::routing::{CapacitySpec, Mode, RouterConfig, RouterKind, route_logits};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn corpus() -> Vec<Vec<u8>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fuzz-corpus"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn cases() -> u32 {
    std::env::var("ROUTERSCOPE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// One mutation of a seed.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    /// Overwrite with a slice of corpus file `.0` from offset `.1`.
    Splice(usize, usize, usize),
    /// Set 8 bytes at `.0` to a large little-endian number (lengths, offsets, dimensions).
    Big(usize, u64),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Flip(a, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Set(a, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(a, b)| Edit::Insert(a, b)),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(a, b, c)| Edit::Splice(a, b, c)),
        (
            any::<usize>(),
            prop_oneof![Just(u64::MAX), Just(1 << 32), Just(1 << 40), any::<u64>()]
        )
            .prop_map(|(a, b)| Edit::Big(a, b)),
    ];
    prop::collection::vec(edit, 1..6)
}

fn apply(seed: &[u8], edits: &[Edit], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        if b.is_empty() {
            break;
        }
        let n = b.len();
        match e {
            Edit::Flip(i, m) => b[i % n] ^= m | 1,
            Edit::Set(i, v) => b[i % n] = *v,
            Edit::Truncate(i) => b.truncate(i % n),
            Edit::Insert(i, bytes) => {
                let at = i % n;
                b.splice(at..at, bytes.iter().copied());
            }
            Edit::Splice(f, from, at) => {
                let src = &corpus[f % corpus.len()];
                let from = from % src.len().max(1);
                let at = at % n;
                for (d, s) in b[at..].iter_mut().zip(&src[from..]) {
                    *d = *s;
                }
            }
            Edit::Big(i, v) => {
                let at = i % n;
                for (d, s) in b[at..].iter_mut().zip(v.to_le_bytes()) {
                    *d = s;
                }
            }
        }
    }
    b
}

/// Runs `check` on `cases()` mutations of each seed (and on every corpus file as it is).
fn fuzz(name: &str, seeds: &[Vec<u8>], check: impl Fn(&[u8])) {
    let corpus = corpus();
    for c in &corpus {
        check(c);
    }
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let started = std::time::Instant::now();
    runner
        .run(&(0..seeds.len(), edits()), |(s, e)| {
            let bytes = apply(&seeds[s], &e, &corpus);
            check(&bytes);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!(
        "{name}: {} cases in {:.1} s, no panic",
        cases() as usize + corpus.len(),
        started.elapsed().as_secs_f64()
    );
}

fn tiny() -> ModelConfig {
    let mut cfg = preset("fashion-mnist", RouterKind::SoftmaxTokenChoice).unwrap();
    cfg.hidden_size = 8;
    cfg.mlp_dim = 8;
    cfg.num_heads = 2;
    cfg.num_layers = 2;
    if let Some(m) = &mut cfg.moe {
        m.layers = vec![1];
        m.num_experts = 2;
    }
    cfg
}

#[test]
fn fuzz_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let seed = dir.path().join("seed.safetensors");
    save_checkpoint(&seed, &cfg, &random_weights(&cfg, 1)).unwrap();
    let path = dir.path().join("case.safetensors");
    fuzz("checkpoint", &[std::fs::read(&seed).unwrap()], |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let _ = load_checkpoint(&path);
    });
}

#[test]
fn fuzz_model_configs() {
    let json = tiny().to_json();
    fuzz("config JSON", &[json.into_bytes()], |bytes| {
        if let Ok(text) = std::str::from_utf8(bytes) {
            let _ = ModelConfig::from_json(text);
        }
    });
}

#[test]
fn fuzz_vmoe_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let w: std::collections::BTreeMap<_, _> = random_weights(&cfg, 2)
        .into_iter()
        .map(|(k, v)| (format!("params/{k}"), v))
        .collect();
    let prefix = dir.path().join("ckpt");
    write_checkpoint(&prefix, &w, 2, 40, 3).unwrap();
    let index = prefix.with_extension("index");
    let shard0 = PathBuf::from(format!("{}.data-00000-of-00002", prefix.display()));
    let (good_index, good_shard) = (
        std::fs::read(&index).unwrap(),
        std::fs::read(&shard0).unwrap(),
    );
    fuzz("vmoe index", std::slice::from_ref(&good_index), |bytes| {
        std::fs::write(&index, bytes).unwrap();
        if let Ok(i) = read_index(&prefix) {
            let _ = read_arrays(&i, &mut |_, _| {});
        }
    });
    std::fs::write(&index, &good_index).unwrap();
    fuzz("vmoe shard", &[good_shard], |bytes| {
        std::fs::write(&shard0, bytes).unwrap();
        if let Ok(i) = read_index(&prefix) {
            let _ = read_arrays(&i, &mut |_, _| {});
        }
    });
}

#[test]
fn fuzz_idx_files() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut raw = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 4];
    raw.extend((0..32).map(|i| i as u8));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    let gz = gz.finish().unwrap();
    let path = dir.path().join("case-idx3-ubyte");
    fuzz("IDX", &[raw, gz], |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let _ = routerscope::train::data::read_idx(&path, 3);
    });
}

#[test]
fn fuzz_images() {
    let imgs = root().join("assets/images");
    let seeds: Vec<Vec<u8>> = ["fmnist-00-ankle-boot-test0.png", "photo-flower.jpg"]
        .iter()
        .map(|n| std::fs::read(imgs.join(n)).unwrap())
        .collect();
    // Small BMP, GIF, TIFF and WebP seeds made here, so every decoder is reached.
    let mut more = Vec::new();
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(6, 5, |x, y| {
        image::Rgb([x as u8 * 40, y as u8 * 50, 7])
    }));
    for fmt in [
        image::ImageFormat::Bmp,
        image::ImageFormat::Gif,
        image::ImageFormat::Tiff,
        image::ImageFormat::WebP,
    ] {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        more.push(out.into_inner());
    }
    let all: Vec<Vec<u8>> = seeds.into_iter().chain(more).collect();
    fuzz("images", &all, |bytes| {
        let _ = decode_image_bytes(bytes, "case");
    });
}

#[test]
fn fuzz_onnx() {
    use prost::Message;
    use routerscope::import::WeightsOptions;
    use routerscope::import::onnx::import_onnx;
    use routerscope::import::onnx_proto::{GraphProto, ModelProto, NodeProto, TensorProto};
    let t = |name: &str, dims: &[i64]| TensorProto {
        dims: dims.to_vec(),
        data_type: Some(1),
        name: Some(name.into()),
        raw_data: Some(vec![0; 4 * dims.iter().product::<i64>() as usize]),
        ..Default::default()
    };
    let model = ModelProto {
        graph: Some(GraphProto {
            node: vec![NodeProto {
                input: vec!["x".into(), "w".into()],
                output: vec!["y".into()],
                op_type: Some("MatMul".into()),
                ..Default::default()
            }],
            initializer: vec![
                t("v.embeddings.cls_token", &[1, 1, 4]),
                t(
                    "v.embeddings.patch_embeddings.projection.weight",
                    &[4, 3, 2, 2],
                ),
                t("v.embeddings.patch_embeddings.projection.bias", &[4]),
                t("w", &[4, 4]),
            ],
            ..Default::default()
        }),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.onnx");
    fuzz("ONNX", &[model.encode_to_vec()], |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let _ = import_onnx(&path, &WeightsOptions::default());
    });
}

proptest! {
    #![proptest_config(Config { cases: cases(), failure_persistence: None, ..Config::default() })]

    /// The routers on hostile settings: any k, capacity factor, padding (up to 2^64) and
    /// solver iterations give a routing or an error, never a panic or a runaway allocation.
    #[test]
    fn fuzz_router_settings(
        kind in prop::sample::select(RouterKind::ALL.to_vec()),
        k in prop_oneof![0usize..6, Just(usize::MAX)],
        cf in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(1e300), -1.0f64..8.0],
        multiple_of in prop_oneof![0usize..9, Just(1 << 62), Just(usize::MAX)],
        iterations in prop_oneof![0usize..40, Just(1_000_000_000)],
        n in 1usize..40,
        e in 1usize..6,
    ) {
        let logits: Vec<f32> = (0..n * e).map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.5).collect();
        let cfg = RouterConfig {
            k,
            capacity: CapacitySpec::Factor(cf),
            multiple_of,
            max_iterations: iterations,
            ..RouterConfig::new(kind)
        };
        let _ = route_logits(&logits, n, e, &cfg, Mode::Deterministic);
    }
}

/// A trace's tensors: name, dtype, shape, bytes.
type TraceTensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// A small valid trace: two images with logits, Token Choice picks with slots, and dense
/// dispatch/combine in a second layer; its description returned separately for JSON fuzzing.
fn trace_seed() -> (TraceTensors, String) {
    use safetensors::Dtype;
    let (n, e, c) = (5usize, 2usize, 4usize);
    let f = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let i = |v: Vec<i32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut t = Vec::new();
    for g in 0..2 {
        t.push((
            format!("images/{g}"),
            Dtype::U8,
            vec![4, 4, 3],
            vec![g as u8 * 40; 48],
        ));
        let p = |l: usize, x: &str| format!("layers/{l}/groups/{g}/{x}");
        t.push((
            p(0, "logits"),
            Dtype::F32,
            vec![n, e],
            f((0..n * e).map(|k| k as f32 * 0.3 - 1.0).collect()),
        ));
        t.push((
            p(0, "expert_index"),
            Dtype::I32,
            vec![n, 1],
            i(vec![0, 1, 0, 1, 0]),
        ));
        t.push((p(0, "gates"), Dtype::F32, vec![n, 1], f(vec![0.6; n])));
        t.push((
            p(0, "slot"),
            Dtype::I32,
            vec![n, 1],
            i(vec![0, 0, 1, 1, -1]),
        ));
        let mut d = vec![0.0f32; n * e * c];
        for tok in 0..4 {
            d[(tok * e + tok % 2) * c + tok / 2] = 1.0;
        }
        t.push((p(1, "dispatch"), Dtype::F32, vec![n, e, c], f(d.clone())));
        t.push((
            p(1, "combine"),
            Dtype::F32,
            vec![n, e, c],
            f(d.iter().map(|v| v * 0.7).collect()),
        ));
    }
    let meta = serde_json::json!({
        "format": "routerscope-trace", "version": 1, "num_experts": e, "classes": ["a", "b"],
        "images": [{"grid": [2, 2], "cls_token": true, "label": 0},
                   {"grid": [2, 2], "cls_token": true, "label": 1}],
        "layers": [
            {"block": 1, "router": {"kind": "softmax-tc", "k": 1, "capacity": 2},
             "groups": [{"members": [[0, 0, 5]]}, {"members": [[1, 0, 5]]}]},
            {"block": 3, "router": {"kind": "softmax-ec"},
             "groups": [{"members": [[0, 0, 5]]}, {"members": [[1, 0, 5]]}]}
        ]
    });
    (t, meta.to_string())
}

fn write_trace(path: &Path, tensors: &TraceTensors, meta: &str) -> bool {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .filter_map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .ok()
                .map(|v| (n.clone(), v))
        })
        .collect();
    let m = std::collections::HashMap::from([("routerscope.trace".to_string(), meta.to_string())]);
    safetensors::serialize_to_file(views, Some(m), path).is_ok()
}

/// Opens a trace and reads everything a view or analysis reads: every image, the logged
/// routing of every image, and a what-if on every image.
fn read_whole_trace(path: &Path) {
    use routerscope::model::RunOptions;
    let Ok(t) = routerscope::trace::TraceModel::open(path) else {
        return;
    };
    let file = t.trace().clone();
    let own = RunOptions::from_config(file.config());
    let what_if = own
        .clone()
        .with_router(RouterConfig::new(RouterKind::SinkhornExpertChoice));
    let g = file.group_images();
    for first in (0..file.num_images()).step_by(g.max(1)) {
        let _ = file.image(first);
        let ids: Vec<usize> = (first..(first + g).min(file.num_images())).collect();
        let _ = t.route_ids(&ids, &own);
        let _ = t.route_ids(&ids, &what_if);
    }
}

#[test]
fn fuzz_traces() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, meta) = trace_seed();
    let seed = dir.path().join("seed.rstrace.safetensors");
    assert!(write_trace(&seed, &tensors, &meta));
    routerscope::trace::TraceModel::open(&seed).expect("the seed is a valid trace");
    let path = dir.path().join("case.rstrace.safetensors");
    fuzz("trace file", &[std::fs::read(&seed).unwrap()], |bytes| {
        std::fs::write(&path, bytes).unwrap();
        read_whole_trace(&path);
    });
    fuzz("trace description", &[meta.into_bytes()], |bytes| {
        if write_trace(&path, &tensors, &String::from_utf8_lossy(bytes)) {
            read_whole_trace(&path);
        }
    });
}
