//! The run format, schema version 1 (`docs/run-format.md`): the folder's layout, the SQLite
//! schema every process's database has, and the description stored in it.

use serde::{Deserialize, Serialize};

/// `format` of a run's description.
pub const FORMAT_NAME: &str = "routerscope-run";
/// The schema version this routerscope writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
/// Rank 0's database (the description, and rank 0's steps), in the run folder.
pub const DATABASE: &str = "run.sqlite";
/// The folder of the other ranks' databases (`ranks/rank-R.sqlite`).
pub const RANKS_DIR: &str = "ranks";
/// The folder of the probe images' snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";

/// The most experts, blocks (block indices below it), ranks, probe images and steps of a run.
pub const MAX_EXPERTS: usize = 4096;
pub const MAX_BLOCKS: usize = 1024;
pub const MAX_RANKS: usize = 65_536;
pub const MAX_PROBES: usize = 4096;
pub const MAX_STEP: i64 = 1 << 53;

/// Rank `r`'s database, relative to the run folder.
pub fn rank_database(rank: usize) -> String {
    if rank == 0 {
        DATABASE.to_string()
    } else {
        format!("{RANKS_DIR}/rank-{rank}.sqlite")
    }
}

/// The snapshot file of `step`, relative to the run folder.
pub fn snapshot_file(step: i64) -> String {
    format!("{SNAPSHOTS_DIR}/step-{step:09}.rstrace.safetensors")
}

/// The tables of every database of a run. Counts per expert are little-endian `u32` arrays of
/// `num_experts` entries (one row per step and block keeps a run of 100,000 steps x 12 blocks
/// at 1.2 million rows).
pub const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE blocks (block INTEGER PRIMARY KEY, router TEXT NOT NULL);
CREATE TABLE probes (
    image INTEGER PRIMARY KEY, height INTEGER NOT NULL, width INTEGER NOT NULL,
    label INTEGER, pixels BLOB NOT NULL);
CREATE TABLE steps (step INTEGER PRIMARY KEY, wall_time REAL NOT NULL);
CREATE TABLE layers (
    step INTEGER NOT NULL, block INTEGER NOT NULL, calls INTEGER NOT NULL,
    tokens INTEGER NOT NULL, dropped INTEGER NOT NULL,
    kept BLOB NOT NULL, requests BLOB NOT NULL,
    entropy_sum REAL NOT NULL, entropy_tokens INTEGER NOT NULL,
    z_loss_sum REAL NOT NULL, z_loss_tokens INTEGER NOT NULL,
    importance_sum REAL NOT NULL, load_sum REAL NOT NULL, aux_groups INTEGER NOT NULL,
    PRIMARY KEY (step, block));
CREATE TABLE snapshots (step INTEGER PRIMARY KEY, file TEXT NOT NULL);
";

/// The description (`meta` key `description`, JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    pub format: String,
    pub version: u32,
    #[serde(default)]
    pub model_name: String,
    pub num_experts: usize,
    #[serde(default)]
    pub classes: Vec<String>,
    /// Processes writing the run (ranks `0..world_size`).
    #[serde(default = "one")]
    pub world_size: usize,
    /// This database's rank.
    #[serde(default)]
    pub rank: usize,
    /// The probe images' patch grid and CLS token, once probes are registered.
    #[serde(default)]
    pub probe: Option<ProbeMeta>,
}

fn one() -> usize {
    1
}

/// What the probe images are to the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeMeta {
    pub grid: [usize; 2],
    #[serde(default)]
    pub cls_token: bool,
}

/// What is known of a block's router (as a trace's `router` entry).
pub type BlockRouter = crate::trace::format::RouterMeta;
