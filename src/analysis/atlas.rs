//! The expert atlas: for every expert, the patches of the dataset most strongly routed to it,
//! kept as a bounded pool during the run (memory independent of the dataset) and cut from the
//! original images with some context once the run is over.
//!
//! Two rules keep an atlas varied: at most `per_image` patches of one image (ten crops of one
//! photo say little), and a tile that shows the same pixels as a better one already in the row
//! (the black background of many Fashion-MNIST images) is skipped and listed. The pool holds
//! [`POOL_FACTOR`] times the atlas size, so skipped tiles are replaced by the next best.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use image::RgbaImage;
use image::imageops::FilterType;
use serde::Serialize;

use super::source::DataSource;

/// Side in pixels of an atlas tile.
pub const TILE_SIDE: u32 = 64;
/// The largest `--atlas-size`.
pub const MAX_ATLAS_SIZE: usize = 256;

/// A patch in the atlas: which image, which token, how strongly it was routed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct AtlasEntry {
    pub score: f32,
    /// Index of the image in the data source (its order in the report).
    pub image: usize,
    /// Token index within the image (including the CLS token, if any).
    pub token: usize,
}

impl Eq for AtlasEntry {}

impl Ord for AtlasEntry {
    /// Higher score ranks first; ties go to the earlier image, then the earlier token.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.image.cmp(&self.image))
            .then_with(|| other.token.cmp(&self.token))
    }
}

impl PartialOrd for AtlasEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Patches of one image an atlas row shows, by default.
pub const DEFAULT_PER_IMAGE: usize = 2;
/// Candidates kept per atlas place, to replace near-duplicates.
pub const POOL_FACTOR: usize = 16;
/// Two tiles are near-duplicates when their pixels differ by at most this much on average
/// (mean absolute difference over the RGB channels, in 0–255 levels).
pub const DUPLICATE_TOLERANCE: f32 = 2.0;

/// The best `pool` entries seen, at most `per_image` of any one image (0: no cap).
#[derive(Clone, Debug)]
pub struct TopN {
    pool: usize,
    per_image: usize,
    /// Ascending: the first is the worst.
    set: BTreeSet<AtlasEntry>,
    by_image: HashMap<usize, BTreeSet<AtlasEntry>>,
}

impl TopN {
    /// Keeps the best `n` (no per-image cap, no spare candidates).
    pub fn new(n: usize) -> Self {
        Self::with_rules(n, 0, 1)
    }

    /// Room for an atlas of `n`, at most `per_image` per image (0: no cap), with `factor` times
    /// `n` candidates.
    pub fn with_rules(n: usize, per_image: usize, factor: usize) -> Self {
        Self {
            pool: n.saturating_mul(factor.max(1)),
            per_image,
            set: BTreeSet::new(),
            by_image: HashMap::new(),
        }
    }

    pub fn push(&mut self, entry: AtlasEntry) {
        if self.pool == 0 {
            return;
        }
        if self.set.len() >= self.pool && self.set.first().is_some_and(|worst| entry <= *worst) {
            return;
        }
        let of_image = self.by_image.entry(entry.image).or_default();
        if self.per_image > 0 && of_image.len() >= self.per_image {
            // The image is at its cap: the entry takes its own worst one's place, or nothing.
            match of_image.first().copied() {
                Some(worst) if entry > worst => {
                    of_image.remove(&worst);
                    self.set.remove(&worst);
                }
                _ => return,
            }
        }
        of_image.insert(entry);
        self.set.insert(entry);
        if self.set.len() > self.pool
            && let Some(worst) = self.set.pop_first()
            && let Some(v) = self.by_image.get_mut(&worst.image)
        {
            v.remove(&worst);
            if v.is_empty() {
                self.by_image.remove(&worst.image);
            }
        }
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<AtlasEntry> {
        self.set.into_iter().rev().collect()
    }
}

/// Mean absolute difference of two tiles' RGB channels, in 0–255 levels (infinite for tiles of
/// different sizes).
pub fn tile_difference(a: &RgbaImage, b: &RgbaImage) -> f32 {
    if a.dimensions() != b.dimensions() {
        return f32::INFINITY;
    }
    let (mut sum, mut n) = (0u64, 0u64);
    for (p, q) in a.pixels().zip(b.pixels()) {
        for c in 0..3 {
            sum += p.0[c].abs_diff(q.0[c]) as u64;
        }
        n += 3;
    }
    sum as f32 / n.max(1) as f32
}

/// An atlas candidate left out because it shows what a better tile of the row shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SkippedTile {
    pub image: usize,
    pub name: String,
    pub token: usize,
    pub score: f32,
    /// The kept tile it matches: its image's name and token.
    pub like_name: String,
    pub like_token: usize,
    /// Their mean absolute difference (RGB levels).
    pub difference: f32,
}

/// A cut-out atlas patch.
#[derive(Clone, Debug, Serialize)]
pub struct AtlasTile {
    pub image: usize,
    /// The image's name in the report.
    pub name: String,
    pub token: usize,
    /// The patch's place in the grid.
    pub row: usize,
    pub col: usize,
    pub score: f32,
    /// The patch with context, [`TILE_SIDE`] square (`None` when the image could not be read
    /// again).
    #[serde(skip)]
    pub thumbnail: Option<RgbaImage>,
    /// Where the patch lies in the thumbnail, as fractions `[x0, y0, x1, y1]`.
    pub patch_box: [f32; 4],
}

/// An expert's atlas row.
#[derive(Clone, Debug, Serialize)]
pub struct AtlasExpert {
    pub expert: usize,
    pub patches: Vec<AtlasTile>,
    /// Near-duplicates passed over (best first).
    pub skipped: Vec<SkippedTile>,
}

/// Cuts patch `(row, col)` of a `grid` laid over `img` (the model stretches images to its
/// size, so the patch covers the same fraction of the original) with half a patch of context on
/// every side, scaled to a [`TILE_SIDE`] square.
pub fn cut_tile(
    img: &image::DynamicImage,
    grid: [usize; 2],
    row: usize,
    col: usize,
) -> (RgbaImage, [f32; 4]) {
    let (w, h) = (img.width().max(1) as f64, img.height().max(1) as f64);
    let (ph, pw) = (h / grid[0].max(1) as f64, w / grid[1].max(1) as f64);
    let (x0, y0) = (col as f64 * pw, row as f64 * ph);
    let (cx0, cy0) = ((x0 - pw / 2.0).max(0.0), (y0 - ph / 2.0).max(0.0));
    let (cx1, cy1) = ((x0 + 1.5 * pw).min(w), (y0 + 1.5 * ph).min(h));
    let (ix0, iy0) = (cx0.floor() as u32, cy0.floor() as u32);
    let (iw, ih) = (
        ((cx1.ceil() as u32).saturating_sub(ix0)).max(1),
        ((cy1.ceil() as u32).saturating_sub(iy0)).max(1),
    );
    let crop = img.crop_imm(ix0, iy0, iw, ih);
    // Small images (Fashion-MNIST) are scaled up with visible pixels; photos smoothly.
    let filter = if iw.max(ih) < TILE_SIDE / 2 {
        FilterType::Nearest
    } else {
        FilterType::Triangle
    };
    let tile = crop.resize_exact(TILE_SIDE, TILE_SIDE, filter).to_rgba8();
    let fx = |x: f64| ((x - ix0 as f64) / iw as f64) as f32;
    let fy = |y: f64| ((y - iy0 as f64) / ih as f64) as f32;
    (tile, [fx(x0), fy(y0), fx(x0 + pw), fy(y0 + ph)])
}

/// Side of the square a patch's own pixels (no context) are scaled to for the near-duplicate
/// rule.
pub const SIGNATURE_SIDE: u32 = 16;

/// Patch `(row, col)` of a `grid` over `img` by itself, scaled to a [`SIGNATURE_SIDE`] square:
/// what the near-duplicate rule compares, so that two blank background patches are alike
/// whatever surrounds them.
pub fn patch_signature(
    img: &image::DynamicImage,
    grid: [usize; 2],
    row: usize,
    col: usize,
) -> RgbaImage {
    let (w, h) = (img.width().max(1) as f64, img.height().max(1) as f64);
    let (ph, pw) = (h / grid[0].max(1) as f64, w / grid[1].max(1) as f64);
    let (x0, y0) = ((col as f64 * pw).floor(), (row as f64 * ph).floor());
    let (x1, y1) = (
        ((col + 1) as f64 * pw).ceil().min(w),
        ((row + 1) as f64 * ph).ceil().min(h),
    );
    let (iw, ih) = (((x1 - x0) as u32).max(1), ((y1 - y0) as u32).max(1));
    let crop = img.crop_imm(x0 as u32, y0 as u32, iw, ih);
    let filter = if iw.max(ih) < SIGNATURE_SIDE {
        FilterType::Nearest
    } else {
        FilterType::Triangle
    };
    crop.resize_exact(SIGNATURE_SIDE, SIGNATURE_SIDE, filter)
        .to_rgba8()
}

/// Turns the pools of one layer into atlas rows of at most `n` tiles each: candidates are taken
/// best first, a near-duplicate of a tile already in its row (its patch's own pixels within
/// [`DUPLICATE_TOLERANCE`] of a kept one's) is skipped, and more candidates are
/// cut (each image read once per round) until the row is full or its pool is spent.
pub fn build_atlas(
    source: &DataSource,
    heaps: Vec<TopN>,
    n: usize,
    grid: [usize; 2],
    cls_offset: usize,
) -> Vec<AtlasExpert> {
    let pools: Vec<Vec<AtlasEntry>> = heaps.into_iter().map(TopN::into_sorted).collect();
    let mut rows: Vec<AtlasExpert> = (0..pools.len())
        .map(|j| AtlasExpert {
            expert: j,
            patches: Vec::new(),
            skipped: Vec::new(),
        })
        .collect();
    // The kept tiles' patch signatures, row by row, beside `rows[j].patches`.
    let mut signatures: Vec<Vec<Option<RgbaImage>>> = vec![Vec::new(); pools.len()];
    let mut next = vec![0usize; pools.len()];
    let cols = grid[1].max(1);
    loop {
        // This round's candidates: as many per row as it still lacks.
        let mut round: Vec<(usize, AtlasEntry)> = Vec::new();
        for (j, pool) in pools.iter().enumerate() {
            let want = n.saturating_sub(rows[j].patches.len());
            let take = want.min(pool.len() - next[j]);
            round.extend(pool[next[j]..next[j] + take].iter().map(|&e| (j, e)));
            next[j] += take;
        }
        if round.is_empty() {
            break;
        }
        let mut wanted: Vec<usize> = round.iter().map(|(_, e)| e.image).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut cuts = HashMap::new();
        for &i in &wanted {
            let img = source.original(i).ok();
            for (_, e) in round.iter().filter(|(_, e)| e.image == i) {
                let p = e.token - cls_offset;
                let cut = img.as_ref().map(|im| {
                    let (tile, b) = cut_tile(im, grid, p / cols, p % cols);
                    (tile, b, patch_signature(im, grid, p / cols, p % cols))
                });
                cuts.insert((e.image, e.token), cut);
            }
        }
        // Best first within each row, so the better of two duplicates is the one kept.
        for (j, e) in round {
            let p = e.token - cls_offset;
            let (thumbnail, patch_box, signature) =
                match cuts.get(&(e.image, e.token)).cloned().flatten() {
                    Some((t, b, sig)) => (Some(t), b, Some(sig)),
                    None => (None, [0.0; 4], None),
                };
            let row = &mut rows[j];
            let like = signature.as_ref().and_then(|sig| {
                (row.patches.iter().zip(&signatures[j])).find_map(|(k, ks)| {
                    let d = tile_difference(ks.as_ref()?, sig);
                    (d <= DUPLICATE_TOLERANCE).then_some((k, d))
                })
            });
            if let Some((k, difference)) = like {
                row.skipped.push(SkippedTile {
                    image: e.image,
                    name: source.name(e.image),
                    token: e.token,
                    score: e.score,
                    like_name: k.name.clone(),
                    like_token: k.token,
                    difference,
                });
                continue;
            }
            signatures[j].push(signature);
            row.patches.push(AtlasTile {
                image: e.image,
                name: source.name(e.image),
                token: e.token,
                row: p / cols,
                col: p % cols,
                score: e.score,
                thumbnail,
                patch_box,
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_keeps_the_best_with_deterministic_ties() {
        let mut t = TopN::new(3);
        for (i, s) in [0.5f32, 0.9, 0.1, 0.9, 0.7, 0.2].iter().enumerate() {
            t.push(AtlasEntry {
                score: *s,
                image: i,
                token: 0,
            });
        }
        let got: Vec<(f32, usize)> = t.into_sorted().iter().map(|e| (e.score, e.image)).collect();
        assert_eq!(got, vec![(0.9, 1), (0.9, 3), (0.7, 4)]);
    }

    fn entry(score: f32, image: usize, token: usize) -> AtlasEntry {
        AtlasEntry {
            score,
            image,
            token,
        }
    }

    /// With a cap of 2 per image, a third patch of an image only takes the place of that image's
    /// worst; the pool still holds the best candidates overall.
    #[test]
    fn the_per_image_cap_keeps_each_images_best() {
        let mut t = TopN::with_rules(2, 2, 2);
        for (s, i, k) in [
            (0.9, 0, 1),
            (0.8, 0, 2),
            (0.95, 0, 3),
            (0.1, 1, 1),
            (0.7, 2, 1),
            (0.6, 3, 1),
            (0.85, 0, 4),
            (0.5, 4, 1),
        ] {
            t.push(entry(s, i, k));
        }
        let got: Vec<(usize, usize)> = t.into_sorted().iter().map(|e| (e.image, e.token)).collect();
        assert_eq!(got, vec![(0, 3), (0, 1), (2, 1), (3, 1)]);
        // Without a cap the four best are kept whatever their image.
        let mut t = TopN::with_rules(2, 0, 2);
        for (s, i) in [(0.9, 0), (0.8, 0), (0.95, 0), (0.1, 1), (0.7, 0)] {
            t.push(entry(s, i, (s * 100.0) as usize));
        }
        assert!(t.into_sorted().iter().all(|e| e.image == 0));
    }

    /// Three all-black images and one with a white square: the black patches of images 1 and 2
    /// repeat image 0's and are skipped (listed, with what they repeat), the row fills from the
    /// pool; another expert's row is judged on its own.
    #[test]
    fn near_duplicate_tiles_are_skipped_and_replaced_from_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..4 {
            let mut img = image::GrayImage::new(28, 28);
            if i == 3 {
                for y in 0..12 {
                    for x in 0..12 {
                        img.put_pixel(x, y, image::Luma([255]));
                    }
                }
            }
            img.save(dir.path().join(format!("{i}.png"))).unwrap();
        }
        let source =
            DataSource::Folder(super::super::source::FolderSource::scan(dir.path()).unwrap());
        let mut a = TopN::with_rules(2, 2, POOL_FACTOR);
        let mut b = TopN::with_rules(2, 2, POOL_FACTOR);
        for (s, i) in [(0.9, 0), (0.8, 1), (0.7, 2), (0.6, 3)] {
            a.push(entry(s, i, 1));
        }
        // Token 0 of image 3 is the white square; token 48 (bottom right) is black.
        b.push(entry(0.9, 3, 49));
        b.push(entry(0.8, 0, 1));
        b.push(entry(0.7, 3, 1));
        let rows = build_atlas(&source, vec![a, b], 2, [7, 7], 1);
        let kept: Vec<usize> = rows[0].patches.iter().map(|t| t.image).collect();
        assert_eq!(kept, vec![0, 3]);
        let skipped: Vec<(usize, &str, f32)> = rows[0]
            .skipped
            .iter()
            .map(|k| (k.image, k.like_name.as_str(), k.difference))
            .collect();
        assert_eq!(skipped, vec![(1, "0.png", 0.0), (2, "0.png", 0.0)]);
        let kept: Vec<(usize, usize)> =
            rows[1].patches.iter().map(|t| (t.image, t.token)).collect();
        assert_eq!(kept, vec![(3, 49), (3, 1)]);
        assert_eq!(rows[1].skipped.len(), 1);
        assert_eq!(rows[1].skipped[0].like_token, 49);
        // Tiles that differ by more than the tolerance are both kept.
        let grey = |v: u8| RgbaImage::from_pixel(4, 4, image::Rgba([v, v, v, 255]));
        assert_eq!(tile_difference(&grey(10), &grey(12)), 2.0);
        assert!(tile_difference(&grey(10), &grey(13)) > DUPLICATE_TOLERANCE);
        assert!(tile_difference(&grey(10), &RgbaImage::new(2, 2)).is_infinite());
    }

    /// Two black patches are alike whatever their context shows (a white neighbour here), and
    /// a patch that differs in its own pixels is not.
    #[test]
    fn duplicates_are_judged_by_the_patch_not_its_context() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3 {
            let mut img = image::GrayImage::new(28, 28);
            // Image 1: the patch right of (2, 2) is white; image 2: one pixel of (2, 2) is.
            match i {
                1 => (12..16)
                    .for_each(|x| (8..12).for_each(|y| img.put_pixel(x, y, image::Luma([255])))),
                2 => img.put_pixel(9, 9, image::Luma([255])),
                _ => {}
            }
            img.save(dir.path().join(format!("{i}.png"))).unwrap();
        }
        let source =
            DataSource::Folder(super::super::source::FolderSource::scan(dir.path()).unwrap());
        let mut a = TopN::with_rules(3, 2, POOL_FACTOR);
        for (s, i) in [(0.9, 0), (0.8, 1), (0.7, 2)] {
            // Token 1 + 2·7 + 2: patch (2, 2) after the CLS token.
            a.push(entry(s, i, 17));
        }
        let rows = build_atlas(&source, vec![a], 3, [7, 7], 1);
        let kept: Vec<usize> = rows[0].patches.iter().map(|t| t.image).collect();
        assert_eq!(kept, vec![0, 2]);
        assert_eq!(rows[0].skipped.len(), 1);
        assert_eq!(
            (
                rows[0].skipped[0].image,
                rows[0].skipped[0].like_name.as_str()
            ),
            (1, "0.png")
        );
        // The tiles themselves (with context) differ a lot.
        let t = |i: usize| {
            rows[0]
                .patches
                .iter()
                .find(|t| t.image == i)
                .map(|t| t.thumbnail.clone())
        };
        assert!(t(0).is_some() && t(2).is_some());
        let sig = patch_signature(
            &image::open(dir.path().join("2.png")).unwrap(),
            [7, 7],
            2,
            2,
        );
        assert_eq!(sig.dimensions(), (SIGNATURE_SIDE, SIGNATURE_SIDE));
        assert!(sig.pixels().filter(|p| p.0[0] == 255).count() == 16);
    }

    /// A patch of a 28x28 image on a 7x7 grid: the tile shows it with half a patch around it
    /// (clamped at the border), and the box says where.
    #[test]
    fn tiles_cut_the_patch_with_context() {
        let mut img = image::GrayImage::new(28, 28);
        for y in 8..12 {
            for x in 12..16 {
                img.put_pixel(x, y, image::Luma([255]));
            }
        }
        let (tile, b) = cut_tile(&image::DynamicImage::ImageLuma8(img), [7, 7], 2, 3);
        assert_eq!(tile.dimensions(), (TILE_SIDE, TILE_SIDE));
        assert_eq!(b, [0.25, 0.25, 0.75, 0.75]);
        assert_eq!(tile.get_pixel(32, 32).0[0], 255);
        assert_eq!(tile.get_pixel(4, 4).0[0], 0);
        let (_, corner) = cut_tile(&image::DynamicImage::new_luma8(28, 28), [7, 7], 0, 0);
        assert_eq!(corner, [0.0, 0.0, 4.0 / 6.0, 4.0 / 6.0]);
    }
}
