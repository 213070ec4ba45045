//! A time-boxed fuzz pass over every parser of untrusted input, on stable Rust: proptest mutates
//! valid files (bit flips, byte overwrites, truncations, insertions, splices of the hostile seed
//! corpus in `tests/fuzz-corpus/`) and every parser must answer with a value or an error, never a
//! panic, within its bounds. Covered: the safetensors checkpoint reader (header, config JSON,
//! tensors) and overlay checkpoints (the overlay and its base), the vmoe index and shard reader,
//! routing traces (the file's bytes, and structure-aware: the description's numbers and the
//! tensors' shapes and dtypes), runs (the database's bytes, and hostile values set through SQL),
//! the IDX reader (raw and gzip), image decoding, every import format (timm and Hugging Face
//! safetensors with their config.json, PyTorch checkpoints as whole archives and as their
//! pickles, Flax `.npz`, ONNX with its external data file), and the routers on hostile
//! configurations (capacity paddings, k, capacity factors, iterations).
//!
//! "Within its bounds" is enforced: this binary's allocator refuses any single allocation over
//! 1 GiB (the process aborts with "memory allocation of N bytes failed"), so a number from a
//! file that sizes a buffer before it is checked fails the run even where the system would
//! overcommit it. Cases per parser: `ROUTERSCOPE_FUZZ_CASES` (default 2000; the structure-aware
//! trace fuzzer runs 4x that, the run values half); CI runs the default; each seed file of the
//! corpus is also a regression test on its own.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use routerscope::import::vmoe_format::{read_arrays, read_index, write_checkpoint};
use routerscope::model::{
    ModelConfig, decode_image_bytes, load_checkpoint, preset, random_weights, save_checkpoint,
};
use routerscope::routing::{CapacitySpec, Mode, RouterConfig, RouterKind, route_logits};

/// The system allocator, refusing single allocations beyond [`ALLOCATION_LIMIT`].
struct BoundedAllocator;

const ALLOCATION_LIMIT: usize = 1 << 30;

// SAFETY: every call is forwarded to the system allocator unchanged, or answered with null (an
// allocation failure, which callers handle or turn into an abort).
unsafe impl std::alloc::GlobalAlloc for BoundedAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        if new > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: BoundedAllocator = BoundedAllocator;

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
    fuzz_n(name, cases(), seeds, check)
}

/// [`fuzz`] with `n` cases.
fn fuzz_n(name: &str, n: u32, seeds: &[Vec<u8>], check: impl Fn(&[u8])) {
    let corpus = corpus();
    for c in &corpus {
        check(c);
    }
    let mut runner = TestRunner::new(Config {
        cases: n,
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
        n as usize + corpus.len(),
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
fn read_whole_trace(path: &Path) -> bool {
    use routerscope::model::RunOptions;
    let Ok(t) = routerscope::trace::TraceModel::open(path) else {
        return false;
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
    // Every layer's logged routing, each under its own logged router.
    for (l, layer) in file.meta().layers.iter().enumerate() {
        for g in 0..layer.groups.len() {
            let _ = file.logged_group(l, g);
        }
    }
    true
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
        let _ = read_whole_trace(&path);
    });
    fuzz("trace description", &[meta.into_bytes()], |bytes| {
        if write_trace(&path, &tensors, &String::from_utf8_lossy(bytes)) {
            let _ = read_whole_trace(&path);
        }
    });
}

fn fixture(path: &str) -> PathBuf {
    root().join("tests/fixtures/import").join(path)
}

/// An overlay checkpoint: the overlay's bytes and its base's bytes are each mutated; loading
/// must answer (the base's SHA-256 then refuses most base mutations, which is the point: the
/// overlay's own header and tensors are read first).
#[test]
fn fuzz_overlays() {
    use routerscope::model::save_overlay;
    use routerscope::tensor_io::Precision;
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let base = dir.path().join("base.safetensors");
    save_checkpoint(&base, &cfg, &random_weights(&cfg, 1)).unwrap();
    let mut w = random_weights(&cfg, 1);
    for (n, t) in w.iter_mut() {
        if n.contains("Moe") {
            t.data.iter_mut().for_each(|v| *v += 0.5);
        }
    }
    let overlay = dir.path().join("overlay.safetensors");
    save_overlay(
        &overlay,
        &cfg,
        &w,
        Precision::F32,
        &base,
        &|n| n.contains("Moe"),
        Default::default(),
    )
    .unwrap();
    load_checkpoint(&overlay).expect("the seed overlay loads");
    let (good_overlay, good_base) = (
        std::fs::read(&overlay).unwrap(),
        std::fs::read(&base).unwrap(),
    );
    fuzz("overlay", std::slice::from_ref(&good_overlay), |bytes| {
        std::fs::write(&overlay, bytes).unwrap();
        let _ = load_checkpoint(&overlay);
    });
    std::fs::write(&overlay, &good_overlay).unwrap();
    fuzz("overlay base", &[good_base], |bytes| {
        std::fs::write(&base, bytes).unwrap();
        let _ = load_checkpoint(&overlay);
    });
}

/// timm and Hugging Face state dicts in safetensors, with their config.json, and the same
/// weights as PyTorch checkpoints (whole archives mutated, and their pickles alone).
#[test]
fn fuzz_state_dict_imports() {
    use routerscope::import::WeightsOptions;
    use routerscope::import::hf::import_hf;
    use routerscope::import::timm::import_timm;
    let dir = tempfile::tempdir().unwrap();
    let opts = WeightsOptions::default();
    let n = cases();
    for (family, file, import) in [
        (
            "timm-vit",
            "model.safetensors",
            import_timm as fn(&Path, &WeightsOptions) -> _,
        ),
        ("hf-vit", "model.safetensors", import_hf),
        ("pt/timm-vit", "pytorch_model.bin", import_timm),
        ("pt/hf-vit", "pytorch_model.bin", import_hf),
    ] {
        let sub = dir.path().join(family);
        std::fs::create_dir_all(&sub).unwrap();
        for json in ["config.json", "preprocessor_config.json"] {
            let src = fixture(family).join(json);
            if src.exists() {
                std::fs::copy(&src, sub.join(json)).unwrap();
            }
        }
        let path = sub.join(file);
        let seed = std::fs::read(fixture(family).join(file)).unwrap();
        std::fs::write(&path, &seed).unwrap();
        import(&path, &opts).expect("the seed imports");
        fuzz_n(
            &format!("{family} {file}"),
            n,
            std::slice::from_ref(&seed),
            |bytes| {
                std::fs::write(&path, bytes).unwrap();
                let _ = import(&path, &opts);
            },
        );
        std::fs::write(&path, &seed).unwrap();
        let config = sub.join("config.json");
        let good = std::fs::read(&config).unwrap();
        fuzz_n(
            &format!("{family} config.json"),
            n,
            std::slice::from_ref(&good),
            |bytes| {
                std::fs::write(&config, bytes).unwrap();
                let _ = import(&path, &opts);
            },
        );
        std::fs::write(&config, &good).unwrap();
    }
}

/// The pickle of a PyTorch checkpoint mutated inside an intact archive (so the zip reader
/// passes and the unpickler and the state-dict checks see every mutation), and the pickle
/// reader alone on the hostile pickles' bytes.
#[test]
fn fuzz_pytorch_pickles() {
    use routerscope::import::WeightsOptions;
    use routerscope::import::timm::import_timm;
    use std::io::{Read, Write};
    let src = fixture("pt/timm-deit-distilled/checkpoint.pth.tar");
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
    let mut entries = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        entries.push((f.name().unwrap().to_string(), bytes));
    }
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("pt/timm-deit-distilled/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let path = dir.path().join("checkpoint.pth");
    let write = |pickle: &[u8]| {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (i, (name, bytes)) in entries.iter().enumerate() {
            z.start_file(name.as_str(), opts).unwrap();
            z.write_all(if i == pkl { pickle } else { bytes }).unwrap();
        }
        z.finish().unwrap();
    };
    let opts = WeightsOptions::default();
    write(&entries[pkl].1);
    import_timm(&path, &opts).expect("the seed imports");
    let hostile: Vec<Vec<u8>> = ["custom-class.pth", "os-system.pth", "resnet.pth"]
        .iter()
        .map(|n| {
            let mut z =
                zip::ZipArchive::new(std::fs::File::open(fixture("pt/hostile").join(n)).unwrap())
                    .unwrap();
            let name = z
                .file_names()
                .flatten()
                .find(|f| f.ends_with("data.pkl"))
                .unwrap()
                .to_string();
            let mut b = Vec::new();
            z.by_name(&name).unwrap().read_to_end(&mut b).unwrap();
            b
        })
        .collect();
    let mut seeds = vec![entries[pkl].1.clone()];
    seeds.extend(hostile);
    fuzz_n("PyTorch pickle", cases(), &seeds, |bytes| {
        write(bytes);
        let _ = import_timm(&path, &opts);
    });
}

/// Flax `.npz` and ONNX with its external data file (both files mutated).
#[test]
fn fuzz_npz_and_onnx_external_data() {
    use routerscope::import::WeightsOptions;
    use routerscope::import::big_vision::import_big_vision;
    use routerscope::import::onnx::import_onnx;
    let dir = tempfile::tempdir().unwrap();
    let opts = WeightsOptions::default();
    let n = cases();
    let npz = dir.path().join("model.npz");
    let seed = std::fs::read(fixture("bv-vit/model.npz")).unwrap();
    fuzz_n("npz", n, &[seed], |bytes| {
        std::fs::write(&npz, bytes).unwrap();
        let _ = import_big_vision(&npz, &opts);
    });
    let onnx = dir.path().join("model.onnx");
    let data = dir.path().join("model.onnx.data");
    let (good_model, good_data) = (
        std::fs::read(fixture("onnx-timm-deit-dynamo/model.onnx")).unwrap(),
        std::fs::read(fixture("onnx-timm-deit-dynamo/model.onnx.data")).unwrap(),
    );
    std::fs::write(&onnx, &good_model).unwrap();
    std::fs::write(&data, &good_data).unwrap();
    import_onnx(&onnx, &opts).expect("the seed imports");
    fuzz_n("ONNX external data", n, &[good_data], |bytes| {
        std::fs::write(&data, bytes).unwrap();
        let _ = import_onnx(&onnx, &opts);
    });
}

/// Numbers a hostile description uses: bounds, one past them, overflows, signs, floats.
const HOSTILE_NUMBERS: [&str; 24] = [
    "0",
    "1",
    "-1",
    "-4",
    "2",
    "3",
    "255",
    "4096",
    "4097",
    "16384",
    "16385",
    "65536",
    "1048576",
    "2147483648",
    "4294967296",
    "1000000000",
    "1099511627776",
    "4611686018427387904",
    "9223372036854775807",
    "18446744073709551615",
    "0.5",
    "1e300",
    "-1e300",
    "1.5",
];

/// Every path to a number in `v` (as JSON pointers), and the places a hostile description
/// adds one (labels, patch sizes, router settings).
fn number_pointers(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Number(_) => out.push(at),
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                number_pointers(x, format!("{at}/{i}"), out);
            }
        }
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                number_pointers(x, format!("{at}/{k}"), out);
            }
        }
        _ => {}
    }
}

/// Sets the JSON at `pointer` (creating objects and padding arrays on the way) to `value`.
fn set_pointer(v: &mut serde_json::Value, pointer: &str, value: serde_json::Value) {
    let mut cur = v;
    for part in pointer.split('/').skip(1) {
        cur = match cur {
            serde_json::Value::Array(a) => {
                let i: usize = part.parse().unwrap_or(0).min(a.len());
                if i == a.len() {
                    a.push(serde_json::Value::Null);
                }
                &mut a[i]
            }
            other => {
                if !other.is_object() {
                    *other = serde_json::json!({});
                }
                other
                    .as_object_mut()
                    .map(|o| o.entry(part).or_insert(serde_json::Value::Null))
                    .unwrap()
            }
        };
    }
    *cur = value;
}

/// A trace file written from a header of `(name, dtype, shape)` entries: each tensor's seed bytes
/// where its declared size still matches them, else a hole of the declared size in a sparse
/// file (so a shape claiming terabytes costs no disk); `false` when the declared sizes overflow.
fn write_declared(
    path: &Path,
    meta: &str,
    tensors: &[(String, String, Vec<u64>)],
    seed: &TraceTensors,
) -> bool {
    use std::io::Write;
    let width = |d: &str| match d {
        "F32" | "I32" => 4u64,
        "F16" | "BF16" => 2,
        "I64" => 8,
        _ => 1,
    };
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"routerscope.trace": meta}),
    );
    let mut offset = 0u64;
    let mut data: Vec<Option<&[u8]>> = Vec::new();
    for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
        let Some(len) = shape
            .iter()
            .try_fold(width(dtype), |a, &d| a.checked_mul(d))
        else {
            return false;
        };
        let Some(end) = offset.checked_add(len).filter(|&e| e < 1 << 42) else {
            return false;
        };
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        data.push(
            seed.get(i)
                .map(|t| t.3.as_slice())
                .filter(|b| b.len() as u64 == len),
        );
        offset = end;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let Ok(mut f) = std::fs::File::create(path) else {
        return false;
    };
    let mut at = 8 + text.len() as u64;
    let _ = f.write_all(&(text.len() as u64).to_le_bytes());
    let _ = f.write_all(text.as_bytes());
    for ((_, dtype, shape), bytes) in tensors.iter().zip(&data) {
        let len = shape.iter().product::<u64>() * width(dtype);
        if let Some(b) = bytes {
            let _ = f.write_all(b);
        } else {
            use std::io::Seek;
            let _ = f.seek(std::io::SeekFrom::Start(at + len));
        }
        at += len;
    }
    f.set_len(at).is_ok()
}

/// Structure-aware trace fuzzing: the description's numbers (labels, capacities, k, slots,
/// grids, patch sizes, members, blocks, experts) set to hostile values, and the tensors' shapes
/// and dtypes changed (their data a hole where the size no longer matches).
#[test]
fn fuzz_trace_numbers_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, meta) = trace_seed();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let mut pointers = Vec::new();
    number_pointers(&meta, String::new(), &mut pointers);
    for extra in [
        "/patch_size/0",
        "/patch_size/1",
        "/images/0/label",
        "/images/1/label",
        "/layers/0/router/capacity",
        "/layers/0/router/k",
        "/layers/0/router/capacity_factor",
        "/layers/1/router/capacity",
        "/layers/1/router/k",
        "/layers/1/router/capacity_factor",
    ] {
        pointers.push(extra.to_string());
    }
    let path = dir.path().join("case.rstrace.safetensors");
    let dtypes = ["F32", "F16", "BF16", "I32", "I64", "U8", "BOOL"];
    let dims = [0u64, 1, 2, 3, 5, 8, 1 << 16, 1 << 20, 1 << 31, 1 << 33];
    let mut runner = TestRunner::new(Config {
        cases: 4 * cases(),
        failure_persistence: None,
        ..Config::default()
    });
    // Half the cases change numbers only, half shapes and dtypes only, so that each kind of
    // mutation reaches the checks behind an intact rest of the file.
    let numbers = prop::collection::vec((any::<usize>(), 0..HOSTILE_NUMBERS.len()), 1..3);
    let shapes = prop::collection::vec(
        (
            any::<usize>(),
            any::<usize>(),
            0..dims.len(),
            0..dtypes.len() + 4,
        ),
        1..3,
    );
    let strategy = prop_oneof![
        numbers.prop_map(|n| (n, Vec::new())),
        shapes.prop_map(|s| (Vec::new(), s)),
    ];
    let started = std::time::Instant::now();
    let opened = std::cell::Cell::new(0usize);
    runner
        .run(&strategy, |(numbers, shapes)| {
            let mut m = meta.clone();
            for (p, h) in &numbers {
                let value: serde_json::Value = serde_json::from_str(HOSTILE_NUMBERS[*h]).unwrap();
                set_pointer(&mut m, &pointers[p % pointers.len()], value);
            }
            let mut declared: Vec<(String, String, Vec<u64>)> = tensors
                .iter()
                .map(|(n, d, s, _)| {
                    (
                        n.clone(),
                        format!("{d:?}"),
                        s.iter().map(|&x| x as u64).collect(),
                    )
                })
                .collect();
            for &(t, axis, d, dt) in &shapes {
                let entry = &mut declared[t % tensors.len()];
                if entry.2.is_empty() {
                    continue;
                }
                let a = axis % entry.2.len();
                entry.2[a] = dims[d];
                // Sometimes another dtype too (indices beyond the list keep it).
                if let Some(name) = dtypes.get(dt) {
                    entry.1 = name.to_string();
                }
            }
            if write_declared(&path, &m.to_string(), &declared, &tensors) && read_whole_trace(&path)
            {
                opened.set(opened.get() + 1);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("trace numbers and shapes: {e}"));
    eprintln!(
        "trace numbers and shapes: {} cases in {:.1} s ({} opened and read whole), no panic",
        4 * cases(),
        started.elapsed().as_secs_f64(),
        opened.get()
    );
}

/// Reads a run the way `analyze --run` does: open, stream every row, write the tables.
fn read_whole_run(dir: &Path, out: &Path) {
    let Ok(run) = routerscope::run::RunFile::open(dir) else {
        return;
    };
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::create_dir_all(out);
    let _ = routerscope::run::report::write_tables(&run, Default::default(), out);
    let _ = run.probes();
}

/// The run reader: its database's bytes mutated (SQLite's own checks, then ours), and values
/// set to hostile ones through SQL (counts, sums, blobs, steps, blocks, the description).
#[test]
fn fuzz_runs() {
    use routerscope::run::{LayerSums, ProbeImage, RunSpec, RunWriter};
    let dir = tempfile::tempdir().unwrap();
    let seed_dir = dir.path().join("seed.rsrun");
    let mut w = RunWriter::create(
        &seed_dir,
        &RunSpec {
            experts: 4,
            model_name: "fuzz".into(),
            classes: vec!["a".into(), "b".into()],
            rank: 0,
            world_size: 1,
        },
    )
    .unwrap();
    w.set_probes(
        &[ProbeImage {
            height: 2,
            width: 2,
            pixels: vec![9; 12],
            label: Some(1),
        }],
        [1, 1],
        true,
    )
    .unwrap();
    let mut one = LayerSums::new(4);
    one.add_picks(&[0, 1, 2, 3, 0, 0], None, 1, Some(&[0.5; 24]), None)
        .unwrap();
    for step in 0..5 {
        w.step(step).unwrap();
        w.add(1, None, &one).unwrap();
        w.add(3, None, &one).unwrap();
    }
    w.close().unwrap();
    let seed = std::fs::read(seed_dir.join("run.sqlite")).unwrap();
    let case = dir.path().join("case.rsrun");
    std::fs::create_dir_all(&case).unwrap();
    let out = dir.path().join("out");
    fuzz("run database", std::slice::from_ref(&seed), |bytes| {
        for stale in ["run.sqlite-wal", "run.sqlite-shm"] {
            let _ = std::fs::remove_file(case.join(stale));
        }
        std::fs::write(case.join("run.sqlite"), bytes).unwrap();
        read_whole_run(&case, &out);
    });
    let statements = [
        "UPDATE layers SET tokens = {v} WHERE rowid = {r}",
        "UPDATE layers SET dropped = {v} WHERE rowid = {r}",
        "UPDATE layers SET calls = {v} WHERE rowid = {r}",
        "UPDATE layers SET entropy_sum = {v} WHERE rowid = {r}",
        "UPDATE layers SET z_loss_tokens = {v} WHERE rowid = {r}",
        "UPDATE layers SET kept = {v} WHERE rowid = {r}",
        "UPDATE layers SET requests = zeroblob({v}) WHERE rowid = {r}",
        "UPDATE layers SET block = {v} WHERE rowid = {r}",
        "UPDATE layers SET step = {v} WHERE rowid = {r}",
        "UPDATE steps SET step = {v} WHERE rowid = {r}",
        "UPDATE steps SET wall_time = {v} WHERE rowid = {r}",
        "UPDATE blocks SET block = {v} WHERE rowid = {r}",
        "UPDATE blocks SET router = {v} WHERE rowid = {r}",
        "UPDATE probes SET height = {v} WHERE rowid = {r}",
        "UPDATE probes SET label = {v} WHERE rowid = {r}",
        "UPDATE probes SET pixels = zeroblob({v}) WHERE rowid = {r}",
        "UPDATE meta SET value = {v} WHERE key = 'schema_version'",
        "INSERT OR REPLACE INTO snapshots (step, file) VALUES ({r}, {v})",
        "UPDATE meta SET value = replace(value, '\"num_experts\":4', '\"num_experts\":' || {v}) \
         WHERE key = 'description'",
        "UPDATE meta SET value = replace(value, '\"world_size\":1', '\"world_size\":' || {v}) \
         WHERE key = 'description'",
    ];
    let values = [
        "-1",
        "0",
        "3",
        "65536",
        "1e999",
        "-1e999",
        "NULL",
        "'x'",
        "x'00'",
        "x'0100000002000000030000000400000005'",
        "9223372036854775807",
        "4294967296",
        "'../../etc/passwd'",
        "'{\"kind\": 7}'",
        "100000000",
    ];
    // Half the cases: each writes the analysis's files (alerts.json synced), the slow part.
    let n = (cases() / 2).max(1);
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let started = std::time::Instant::now();
    runner
        .run(
            &prop::collection::vec((0..statements.len(), 0..values.len(), 1i64..12), 1..4),
            |edits| {
                for stale in ["run.sqlite-wal", "run.sqlite-shm"] {
                    let _ = std::fs::remove_file(case.join(stale));
                }
                std::fs::write(case.join("run.sqlite"), &seed).unwrap();
                {
                    let c = rusqlite::Connection::open(case.join("run.sqlite")).unwrap();
                    // Mutations need no durability: no syncs.
                    let _ = c.pragma_update(None, "synchronous", "OFF");
                    for (s, v, r) in &edits {
                        let sql = statements[*s]
                            .replace("{v}", values[*v])
                            .replace("{r}", &r.to_string());
                        let _ = c.execute_batch(&sql);
                    }
                }
                read_whole_run(&case, &out);
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("run values: {e}"));
    eprintln!(
        "run values: {n} cases in {:.1} s, no panic",
        started.elapsed().as_secs_f64()
    );
}
