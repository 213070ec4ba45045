//! The window's panels, one file each, as `RouterscopeApp` methods that `layout.rs` places.

mod central;
mod comparison;
mod controls;
mod dataset;
mod details;
mod gallery;
mod timeline;
mod top_bar;
