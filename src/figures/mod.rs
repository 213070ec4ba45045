//! Figures: expert colours and the per-image view of a routing record that the app draws and the
//! exporters write. No UI code here.

pub mod data;
pub mod dataset;
pub mod diff;
pub mod export;
pub mod palette;
pub mod raster;
pub mod run;
pub mod svg;
pub mod token_view;

pub use palette::{DROPPED, Palette, Rgb, sequential};
pub use token_view::{ImageRouting, SoftImage, TokenRouting};
