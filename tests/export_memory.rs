//! Exporting 200 images keeps memory flat: the peak resident size of a 200-image run stays
//! within a few megabytes of a 20-image run (one image is processed and written at a time).
//! Alone in its test binary so `RUSAGE_CHILDREN` sees only these two runs.

use std::path::Path;
use std::process::Command;

use routerscope::model::{preset, random_weights, save_checkpoint};
use routerscope::routing::RouterKind;

fn max_rss_children_kb() -> i64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the provided struct.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    u.ru_maxrss
}

#[test]
fn two_hundred_images_keep_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = preset("fashion-mnist", RouterKind::SoftmaxTokenChoice).unwrap();
    let m = dir.path().join("m.safetensors");
    save_checkpoint(&m, &cfg, &random_weights(&cfg, 1)).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/images/fmnist-03-shirt-test4.png");
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..200 {
        std::fs::copy(&src, imgs.join(format!("img{i:03}.png"))).unwrap();
    }
    let run = |n: usize, out: &str| {
        let files: Vec<_> = (0..n)
            .map(|i| imgs.join(format!("img{i:03}.png")))
            .collect();
        let o = Command::new(env!("CARGO_BIN_EXE_routerscope"))
            .args([
                "export",
                "--model",
                m.to_str().unwrap(),
                "--format",
                "svg,csv,json",
            ])
            .args(["--out", dir.path().join(out).to_str().unwrap()])
            .args(&files)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        max_rss_children_kb()
    };
    let small = run(20, "a");
    let large = run(200, "b");
    eprintln!("peak RSS: 20 images {small} kB, 200 images {large} kB");
    assert_eq!(
        std::fs::read_dir(dir.path().join("b")).unwrap().count(),
        601
    );
    assert!(
        large <= small + 16 * 1024,
        "20 images: {small} kB, 200 images: {large} kB"
    );
}
