//! Reading a run: every rank's database opened and checked (format, schema version, the
//! description, each row against it), the rows streamed in step order with the ranks' sums of
//! each step and block added up, and [`RunFile::refresh`] to follow a run that is still being
//! written (new committed steps, new snapshots).
//!
//! A run of 100,000 steps is never held whole: [`RunFile::for_each_row`] streams it, and what
//! stays in memory is the description, the blocks, the step list and the snapshot list.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::RunError;
use super::aggregate::{LayerSums, counts_from_blob};
use super::format::{
    BlockRouter, DATABASE, FORMAT_NAME, MAX_BLOCKS, MAX_EXPERTS, MAX_PROBES, MAX_RANKS, MAX_STEP,
    RANKS_DIR, RunMeta, SCHEMA_VERSION, rank_database,
};
use super::writer::ProbeImage;

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> RunError + '_ {
    move |err| RunError::Sql {
        path: path.to_owned(),
        err,
    }
}

/// The description of a database, its format and schema version checked first.
pub(crate) fn read_meta(conn: &Connection, path: &Path) -> Result<RunMeta, RunError> {
    let invalid = |reason: String| RunError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let get = |key: &str| -> Result<Option<String>, RunError> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::NotADatabase =>
                {
                    Err(invalid("not an SQLite database".into()))
                }
                rusqlite::Error::SqliteFailure(..) => Err(invalid(format!(
                    "not a routerscope run database (no readable `meta` table: {e})"
                ))),
                other => Err(sql(path)(other)),
            })
    };
    match get("format")?.as_deref() {
        Some(FORMAT_NAME) => {}
        Some(other) => {
            return Err(invalid(format!(
                "`format` is `{other}`, not `{FORMAT_NAME}`"
            )));
        }
        None => return Err(invalid("no `format` in its `meta` table: not a run".into())),
    }
    match get("schema_version")?.as_deref() {
        Some(v) if v == SCHEMA_VERSION.to_string() => {}
        Some(v) => {
            return Err(invalid(format!(
                "run schema version {v}; this routerscope reads version {SCHEMA_VERSION}"
            )));
        }
        None => return Err(invalid("no `schema_version` in its `meta` table".into())),
    }
    let json = get("description")?.ok_or_else(|| invalid("no `description`".into()))?;
    if json.len() > 64 << 20 {
        return Err(invalid(format!(
            "a description of {} bytes (at most 64 MB)",
            json.len()
        )));
    }
    let meta: RunMeta =
        crate::trace::parse_json(&json, "the run's `description`").map_err(invalid)?;
    if !(1..=MAX_EXPERTS).contains(&meta.num_experts) {
        return Err(invalid(format!(
            "num_experts is {}: between 1 and {MAX_EXPERTS}",
            meta.num_experts
        )));
    }
    if !(1..=MAX_RANKS).contains(&meta.world_size) || meta.rank >= meta.world_size {
        return Err(invalid(format!(
            "rank {} of a world of {}",
            meta.rank, meta.world_size
        )));
    }
    if meta.classes.len() > 100_000 {
        return Err(invalid(format!(
            "{} classes (at most 100000)",
            meta.classes.len()
        )));
    }
    Ok(meta)
}

/// One committed step: when, and how many ranks have committed it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    pub wall_time: f64,
    pub ranks: usize,
}

/// One database of the run.
struct Database {
    rank: usize,
    path: PathBuf,
    conn: Connection,
    /// The last step read from it.
    seen: Option<i64>,
}

/// An opened run.
pub struct RunFile {
    dir: PathBuf,
    meta: RunMeta,
    dbs: Vec<Database>,
    blocks: BTreeMap<usize, BlockRouter>,
    steps: BTreeMap<i64, StepInfo>,
    snapshots: BTreeMap<i64, PathBuf>,
}

impl std::fmt::Debug for RunFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunFile")
            .field("dir", &self.dir)
            .field("steps", &self.steps.len())
            .finish()
    }
}

/// Whether `path` is a run: a folder with a `run.sqlite`, or that file itself.
pub fn is_run(path: &Path) -> bool {
    (path.is_dir() && path.join(DATABASE).is_file())
        || path.file_name().is_some_and(|n| n == DATABASE)
}

impl RunFile {
    /// Opens the run at `path` (its folder, or its `run.sqlite`) with every rank's database.
    pub fn open(path: &Path) -> Result<Self, RunError> {
        let dir = if path.file_name().is_some_and(|n| n == DATABASE) && !path.is_dir() {
            path.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            path.to_path_buf()
        };
        if !dir.is_dir() {
            return Err(RunError::Invalid {
                path: dir,
                reason: "not a run folder".into(),
            });
        }
        let main = open_db(&dir.join(DATABASE))?;
        let meta = read_meta(&main, &dir.join(DATABASE))?;
        if meta.rank != 0 {
            return Err(RunError::Invalid {
                path: dir.join(DATABASE),
                reason: format!("written by rank {}, not rank 0", meta.rank),
            });
        }
        let mut dbs = vec![Database {
            rank: 0,
            path: dir.join(DATABASE),
            conn: main,
            seen: None,
        }];
        let mut file = Self {
            dir,
            meta,
            dbs: Vec::new(),
            blocks: BTreeMap::new(),
            steps: BTreeMap::new(),
            snapshots: BTreeMap::new(),
        };
        file.open_ranks(&mut dbs)?;
        file.dbs = dbs;
        file.refresh()?;
        Ok(file)
    }

    /// Opens the other ranks' databases that exist (a rank that has not started yet is missing;
    /// its steps count as partial).
    fn open_ranks(&self, dbs: &mut Vec<Database>) -> Result<(), RunError> {
        for rank in 1..self.meta.world_size {
            if dbs.iter().any(|d| d.rank == rank) {
                continue;
            }
            let path = self.dir.join(rank_database(rank));
            if !path.exists() {
                continue;
            }
            let conn = open_db(&path)?;
            let m = read_meta(&conn, &path)?;
            if m.rank != rank || m.num_experts != self.meta.num_experts {
                return Err(RunError::Invalid {
                    path,
                    reason: format!(
                        "rank {} with {} experts, but the run's rank {rank} has {} experts",
                        m.rank, m.num_experts, self.meta.num_experts
                    ),
                });
            }
            dbs.push(Database {
                rank,
                path,
                conn,
                seen: None,
            });
        }
        let _ = RANKS_DIR;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn meta(&self) -> &RunMeta {
        &self.meta
    }

    /// The MoE blocks logged, with what is known of their routers.
    pub fn blocks(&self) -> &BTreeMap<usize, BlockRouter> {
        &self.blocks
    }

    /// Committed steps (by any rank).
    pub fn steps(&self) -> &BTreeMap<i64, StepInfo> {
        &self.steps
    }

    /// Whether every rank has committed `step`.
    pub fn is_complete(&self, step: i64) -> bool {
        self.steps
            .get(&step)
            .is_some_and(|s| s.ranks >= self.meta.world_size)
    }

    /// Snapshot files by step (complete ones only).
    pub fn snapshots(&self) -> &BTreeMap<i64, PathBuf> {
        &self.snapshots
    }

    /// Reads what was committed since the last call (or the open): new ranks, blocks, steps
    /// and snapshots. Returns whether anything was new.
    pub fn refresh(&mut self) -> Result<bool, RunError> {
        let signature = |f: &Self| {
            (
                f.dbs.len(),
                f.blocks.len(),
                f.steps.len(),
                f.steps.values().map(|s| s.ranks).sum::<usize>(),
                f.snapshots.len(),
            )
        };
        let before = signature(self);
        let mut dbs = std::mem::take(&mut self.dbs);
        let result = self
            .open_ranks(&mut dbs)
            .and_then(|()| dbs.iter_mut().try_for_each(|d| self.read_new(d)));
        self.dbs = dbs;
        result?;
        Ok(signature(self) != before)
    }

    fn read_new(&mut self, d: &mut Database) -> Result<(), RunError> {
        let invalid = |reason: String| RunError::Invalid {
            path: d.path.clone(),
            reason,
        };
        let mut stmt = d
            .conn
            .prepare_cached("SELECT block, router FROM blocks")
            .map_err(sql(&d.path))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .map_err(sql(&d.path))?;
        for row in rows {
            let (block, router) = row.map_err(sql(&d.path))?;
            if !(0..MAX_BLOCKS as i64).contains(&block) {
                return Err(invalid(format!(
                    "table `blocks`: block {block} (blocks are below {MAX_BLOCKS})"
                )));
            }
            let router: BlockRouter =
                crate::trace::parse_json(&router, &format!("block {block}'s router"))
                    .map_err(invalid)?;
            self.blocks.entry(block as usize).or_insert(router);
        }
        drop(stmt);
        let from = d.seen.unwrap_or(-1);
        let mut stmt = d
            .conn
            .prepare_cached("SELECT step, wall_time FROM steps WHERE step > ?1 ORDER BY step")
            .map_err(sql(&d.path))?;
        let rows = stmt
            .query_map([from], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?)))
            .map_err(sql(&d.path))?;
        for row in rows {
            let (step, wall) = row.map_err(sql(&d.path))?;
            if !(0..=MAX_STEP).contains(&step) || !wall.is_finite() {
                return Err(invalid(format!(
                    "table `steps`: step {step} at time {wall} (steps are 0 to 2^53, times \
                     finite)"
                )));
            }
            let e = self.steps.entry(step).or_insert(StepInfo {
                wall_time: wall,
                ranks: 0,
            });
            e.ranks += 1;
            e.wall_time = e.wall_time.max(wall);
            d.seen = Some(step);
        }
        drop(stmt);
        if d.rank == 0 {
            let mut stmt = d
                .conn
                .prepare_cached("SELECT step, file FROM snapshots ORDER BY step")
                .map_err(sql(&d.path))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                .map_err(sql(&d.path))?;
            for row in rows {
                let (step, file) = row.map_err(sql(&d.path))?;
                let rel = Path::new(&file);
                if rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(invalid(format!(
                        "table `snapshots`: step {step}'s file `{file}` is not a path inside the \
                         run"
                    )));
                }
                self.snapshots.insert(step, self.dir.join(rel));
            }
        }
        Ok(())
    }

    /// Streams every committed row in (step, block) order, each with the sums of all ranks that
    /// committed it and how many did. `f` may stop the stream by returning `false`.
    pub fn for_each_row(
        &self,
        f: impl FnMut(i64, usize, &LayerSums, usize) -> bool,
    ) -> Result<(), RunError> {
        self.for_each_row_after(-1, f)
    }

    /// As [`RunFile::for_each_row`], for the rows of steps after `after` only (what a follower
    /// has not seen yet).
    pub fn for_each_row_after(
        &self,
        after: i64,
        mut f: impl FnMut(i64, usize, &LayerSums, usize) -> bool,
    ) -> Result<(), RunError> {
        let e = self.meta.num_experts;
        let mut statements = Vec::new();
        for d in &self.dbs {
            let stmt = d
                .conn
                .prepare(
                    "SELECT step, block, calls, tokens, dropped, kept, requests, entropy_sum, \
                     entropy_tokens, z_loss_sum, z_loss_tokens, importance_sum, load_sum, \
                     aux_groups FROM layers WHERE step > ?1 AND step <= ?2 ORDER BY step, block",
                )
                .map_err(sql(&d.path))?;
            statements.push((d, stmt));
        }
        // Each database up to the last step read from it, so every streamed row's step is known.
        let mut cursors = Vec::new();
        for (d, stmt) in &mut statements {
            let rows = stmt
                .query([after, d.seen.unwrap_or(-1)])
                .map_err(sql(&d.path))?;
            cursors.push((*d, rows, None::<(i64, usize, LayerSums)>));
        }
        let next = |d: &Database,
                    rows: &mut rusqlite::Rows<'_>|
         -> Result<Option<(i64, usize, LayerSums)>, RunError> {
            let Some(r) = rows.next().map_err(sql(&d.path))? else {
                return Ok(None);
            };
            read_row(r, d, e, &self.steps, &self.blocks).map(Some)
        };
        for (d, rows, head) in &mut cursors {
            *head = next(d, rows)?;
        }
        loop {
            let Some(key) = cursors
                .iter()
                .filter_map(|(_, _, h)| h.as_ref().map(|(s, b, _)| (*s, *b)))
                .min()
            else {
                return Ok(());
            };
            // The first rank's sums, with the others' added (no copy for a single process).
            let mut sum: Option<LayerSums> = None;
            let mut ranks = 0;
            for (d, rows, head) in &mut cursors {
                if head.as_ref().is_some_and(|(s, b, _)| (*s, *b) == key) {
                    if let Some((_, _, s)) = head.take() {
                        match &mut sum {
                            Some(acc) => acc.add(&s),
                            None => sum = Some(s),
                        }
                    }
                    ranks += 1;
                    *head = next(d, rows)?;
                }
            }
            let sum = sum.unwrap_or_else(|| LayerSums::new(e));
            if !f(key.0, key.1, &sum, ranks) {
                return Ok(());
            }
        }
    }

    /// The probe images, in order.
    pub fn probes(&self) -> Result<Vec<ProbeImage>, RunError> {
        let d = &self.dbs[0];
        let invalid = |reason: String| RunError::Invalid {
            path: d.path.clone(),
            reason,
        };
        let mut stmt = d
            .conn
            .prepare(
                "SELECT image, height, width, label, length(pixels) FROM probes ORDER BY image",
            )
            .map_err(sql(&d.path))?;
        let heads: Vec<(i64, i64, i64, Option<i64>, i64)> = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(sql(&d.path))?
            .collect::<Result<_, _>>()
            .map_err(sql(&d.path))?;
        if heads.len() > MAX_PROBES {
            return Err(invalid(format!(
                "{} probe images (at most {MAX_PROBES})",
                heads.len()
            )));
        }
        let side = crate::model::MAX_IMAGE_SIDE as i64;
        let mut out = Vec::new();
        for (k, &(i, h, w, label, len)) in heads.iter().enumerate() {
            // Sizes checked before the pixels are read.
            if i != k as i64
                || !(1..=side).contains(&h)
                || !(1..=side).contains(&w)
                || len != h * w * 3
            {
                return Err(invalid(format!(
                    "table `probes`, image {i}: {len} bytes for {h}x{w}x3 (images numbered from \
                     0, at most {side} pixels a side)"
                )));
            }
            let pixels: Vec<u8> = d
                .conn
                .query_row("SELECT pixels FROM probes WHERE image = ?1", [i], |r| {
                    r.get(0)
                })
                .map_err(sql(&d.path))?;
            let label = match label {
                Some(l)
                    if l < 0
                        || (!self.meta.classes.is_empty()
                            && l as usize >= self.meta.classes.len()) =>
                {
                    return Err(invalid(format!("table `probes`, image {i}: label {l}")));
                }
                l => l.map(|l| l as usize),
            };
            out.push(ProbeImage {
                height: h as usize,
                width: w as usize,
                pixels,
                label,
            });
        }
        Ok(out)
    }
}

fn open_db(path: &Path) -> Result<Connection, RunError> {
    crate::files::check_regular(path).map_err(|err| RunError::Io {
        path: path.to_owned(),
        err,
    })?;
    // Read-write without create: a WAL database is read through its shared-memory index,
    // which a reader must be able to map; nothing here writes.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .or_else(|_| Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY))
    .map_err(sql(path))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql(path))?;
    Ok(conn)
}

/// One `layers` row, checked against the description.
fn read_row(
    r: &rusqlite::Row<'_>,
    d: &Database,
    e: usize,
    steps: &BTreeMap<i64, StepInfo>,
    blocks: &BTreeMap<usize, BlockRouter>,
) -> Result<(i64, usize, LayerSums), RunError> {
    let s = sql(&d.path);
    let step: i64 = r.get(0).map_err(&s)?;
    let block: i64 = r.get(1).map_err(&s)?;
    let at = format!("table `layers`, row (step {step}, block {block})");
    let invalid = |m: String| RunError::Invalid {
        path: d.path.clone(),
        reason: format!("{at}: {m}"),
    };
    if !steps.contains_key(&step) {
        return Err(invalid("its step is not in table `steps`".into()));
    }
    if !(0..MAX_BLOCKS as i64).contains(&block) || !blocks.contains_key(&(block as usize)) {
        return Err(invalid("a block missing from table `blocks`".into()));
    }
    let count = |i: usize, name: &str| -> Result<u64, RunError> {
        let v: i64 = r
            .get(i)
            .map_err(|e| invalid(format!("`{name}`: {e} (an integer count)")))?;
        u64::try_from(v).map_err(|_| invalid(format!("`{name}` is {v}")))
    };
    let float = |i: usize, name: &str| -> Result<f64, RunError> {
        let v: f64 = r
            .get(i)
            .map_err(|e| invalid(format!("`{name}`: {e} (a finite number)")))?;
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(invalid(format!("`{name}` is {v}")))
        }
    };
    let blob = |i: usize, name: &str| -> Result<Vec<u64>, RunError> {
        let b: &[u8] = match r.get_ref(i).map_err(&s)? {
            rusqlite::types::ValueRef::Blob(b) if b.len() == 4 * e => b,
            other => {
                return Err(invalid(format!(
                    "`{name}` is not {e} little-endian u32 counts ({})",
                    match other {
                        rusqlite::types::ValueRef::Blob(b) => format!("{} bytes", b.len()),
                        _ => "not a blob".into(),
                    }
                )));
            }
        };
        counts_from_blob(b, e).ok_or_else(|| invalid(format!("`{name}`")))
    };
    let sums = LayerSums {
        calls: count(2, "calls")?,
        tokens: count(3, "tokens")?,
        dropped: count(4, "dropped")?,
        kept: blob(5, "kept")?,
        requests: blob(6, "requests")?,
        entropy_sum: float(7, "entropy_sum")?,
        entropy_tokens: count(8, "entropy_tokens")?,
        z_loss_sum: float(9, "z_loss_sum")?,
        z_loss_tokens: count(10, "z_loss_tokens")?,
        importance_sum: float(11, "importance_sum")?,
        load_sum: float(12, "load_sum")?,
        aux_groups: count(13, "aux_groups")?,
    };
    if sums.dropped > sums.tokens
        || sums.entropy_tokens > sums.tokens
        || sums.z_loss_tokens > sums.tokens
    {
        return Err(invalid(format!(
            "{} dropped, {} entropy and {} z-loss tokens of {} tokens",
            sums.dropped, sums.entropy_tokens, sums.z_loss_tokens, sums.tokens
        )));
    }
    Ok((step, block as usize, sums))
}
