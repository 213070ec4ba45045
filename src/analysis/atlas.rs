//! The expert atlas: for every expert, the patches of the dataset most strongly routed to it,
//! kept as a bounded heap during the run (memory independent of the dataset) and cut from the
//! original images with some context once the run is over.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

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

/// The best `n` entries seen.
#[derive(Clone, Debug)]
pub struct TopN {
    n: usize,
    heap: BinaryHeap<Reverse<AtlasEntry>>,
}

impl TopN {
    pub fn new(n: usize) -> Self {
        Self {
            n,
            heap: BinaryHeap::with_capacity(n + 1),
        }
    }

    pub fn push(&mut self, entry: AtlasEntry) {
        if self.n == 0 {
            return;
        }
        if self.heap.len() < self.n {
            self.heap.push(Reverse(entry));
        } else if self
            .heap
            .peek()
            .is_some_and(|Reverse(worst)| entry > *worst)
        {
            self.heap.pop();
            self.heap.push(Reverse(entry));
        }
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<AtlasEntry> {
        let mut v: Vec<AtlasEntry> = self.heap.into_iter().map(|Reverse(e)| e).collect();
        v.sort_by(|a, b| b.cmp(a));
        v
    }
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

/// Turns the heaps of one layer into atlas rows, reading each listed image once.
pub fn build_atlas(
    source: &DataSource,
    heaps: Vec<TopN>,
    grid: [usize; 2],
    cls_offset: usize,
) -> Vec<AtlasExpert> {
    let rows: Vec<Vec<AtlasEntry>> = heaps.into_iter().map(TopN::into_sorted).collect();
    let mut wanted: Vec<usize> = rows.iter().flatten().map(|e| e.image).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut tiles = std::collections::HashMap::new();
    for &i in &wanted {
        let img = source.original(i).ok();
        for e in rows.iter().flatten().filter(|e| e.image == i) {
            let p = e.token - cls_offset;
            let (row, col) = (p / grid[1].max(1), p % grid[1].max(1));
            let cut = img.as_ref().map(|im| cut_tile(im, grid, row, col));
            tiles.insert((e.image, e.token), (row, col, cut));
        }
    }
    rows.into_iter()
        .enumerate()
        .map(|(j, entries)| AtlasExpert {
            expert: j,
            patches: entries
                .into_iter()
                .map(|e| {
                    let (row, col, cut) = tiles
                        .get(&(e.image, e.token))
                        .cloned()
                        .unwrap_or((0, 0, None));
                    let (thumbnail, patch_box) = match cut {
                        Some((t, b)) => (Some(t), b),
                        None => (None, [0.0; 4]),
                    };
                    AtlasTile {
                        image: e.image,
                        name: source.name(e.image),
                        token: e.token,
                        row,
                        col,
                        score: e.score,
                        thumbnail,
                        patch_box,
                    }
                })
                .collect(),
        })
        .collect()
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
