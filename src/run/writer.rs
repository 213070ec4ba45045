//! Writing a run while it trains: one process's database (rank 0's `run.sqlite`, or
//! `ranks/rank-R.sqlite`), a step's sums kept in memory until the step ends and then committed
//! in one transaction, so a reader (or a run killed mid-step) sees whole steps only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::RunError;
use super::aggregate::{LayerSums, counts_to_blob};
use super::format::{
    BlockRouter, DATABASE, FORMAT_NAME, MAX_BLOCKS, MAX_EXPERTS, MAX_PROBES, MAX_RANKS, MAX_STEP,
    ProbeMeta, RANKS_DIR, RunMeta, SCHEMA, SCHEMA_VERSION, SNAPSHOTS_DIR, rank_database,
    snapshot_file,
};

/// What a new run is.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub experts: usize,
    pub model_name: String,
    pub classes: Vec<String>,
    pub rank: usize,
    pub world_size: usize,
}

/// A probe image as the model saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeImage {
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
    pub label: Option<usize>,
}

/// One process's writer of a run.
pub struct RunWriter {
    dir: PathBuf,
    db: PathBuf,
    conn: Connection,
    meta: RunMeta,
    step: Option<i64>,
    last: Option<i64>,
    pending: BTreeMap<usize, LayerSums>,
    blocks: BTreeMap<usize, BlockRouter>,
    probes: usize,
}

impl std::fmt::Debug for RunWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunWriter")
            .field("db", &self.db)
            .field("step", &self.step)
            .finish()
    }
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> RunError + '_ {
    move |err| RunError::Sql {
        path: path.to_owned(),
        err,
    }
}

/// The database's connection settings: the journal mode of [`journal_mode`] with
/// `synchronous = NORMAL` (a committed step survives the process being killed).
pub(crate) fn configure(conn: &Connection, path: &Path) -> Result<(), RunError> {
    conn.pragma_update(
        None,
        "journal_mode",
        journal_mode(|k| std::env::var(k).ok()),
    )
    .map_err(sql(path))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql(path))?;
    // Under the rollback journal a reader's scan holds a shared lock that a commit waits out
    // (a long run's full read takes seconds).
    conn.busy_timeout(std::time::Duration::from_secs(60))
        .map_err(sql(path))?;
    Ok(())
}

/// The journal a rank's database is written with, from the environment (`var`):
/// `ROUTERSCOPE_RUN_JOURNAL` (`wal` or `delete`) where set, else `WAL` (readers see committed
/// steps while the writer appends, without locks), except in a job that spans machines
/// (torchrun's `WORLD_SIZE` above `LOCAL_WORLD_SIZE`): WAL's shared-memory index only works
/// between processes of one host, so over a shared network filesystem a reader elsewhere needs
/// SQLite's rollback journal (`DELETE`), which coordinates through file locks.
pub fn journal_mode(var: impl Fn(&str) -> Option<String>) -> &'static str {
    match var("ROUTERSCOPE_RUN_JOURNAL").map(|v| v.to_ascii_lowercase()) {
        Some(v) if v == "delete" => return "DELETE",
        Some(v) if v == "wal" => return "WAL",
        _ => {}
    }
    let number = |k: &str| var(k).and_then(|v| v.trim().parse::<u64>().ok());
    match (number("WORLD_SIZE"), number("LOCAL_WORLD_SIZE")) {
        (Some(world), Some(local)) if world > local => "DELETE",
        _ => "WAL",
    }
}

impl RunWriter {
    /// Opens the run in `dir` for this process: a new run (its folder and database created),
    /// or one this rank wrote before (a resumed job: it must have the same experts, and its
    /// steps continue after the last committed one).
    pub fn create(dir: &Path, spec: &RunSpec) -> Result<Self, RunError> {
        let invalid = |reason: String| RunError::Invalid {
            path: dir.to_owned(),
            reason,
        };
        if !(1..=MAX_EXPERTS).contains(&spec.experts) {
            return Err(invalid(format!(
                "experts is {}: between 1 and {MAX_EXPERTS}",
                spec.experts
            )));
        }
        if !(1..=MAX_RANKS).contains(&spec.world_size) || spec.rank >= spec.world_size {
            return Err(invalid(format!(
                "rank {} of a world of {}: ranks are 0..world size, at most {MAX_RANKS}",
                spec.rank, spec.world_size
            )));
        }
        if dir.exists() && !dir.is_dir() {
            return Err(invalid("exists and is not a folder".into()));
        }
        let io = |err| RunError::Io {
            path: dir.to_owned(),
            err,
        };
        std::fs::create_dir_all(dir.join(SNAPSHOTS_DIR)).map_err(io)?;
        if spec.rank > 0 {
            std::fs::create_dir_all(dir.join(RANKS_DIR)).map_err(io)?;
        }
        let db = dir.join(rank_database(spec.rank));
        let meta = RunMeta {
            format: FORMAT_NAME.into(),
            version: SCHEMA_VERSION,
            model_name: spec.model_name.clone(),
            num_experts: spec.experts,
            classes: spec.classes.clone(),
            world_size: spec.world_size,
            rank: spec.rank,
            probe: None,
        };
        if !db.exists() {
            create_database(&db, &meta)?;
        }
        crate::files::check_regular(&db).map_err(|err| RunError::Io {
            path: db.clone(),
            err,
        })?;
        let conn = Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(sql(&db))?;
        configure(&conn, &db)?;
        let existing = super::reader::read_meta(&conn, &db)?;
        if existing.num_experts != spec.experts || existing.rank != spec.rank {
            return Err(RunError::Invalid {
                path: db.clone(),
                reason: format!(
                    "this run was written with {} experts by rank {}; resuming it with {} \
                     experts as rank {} would mix two runs",
                    existing.num_experts, existing.rank, spec.experts, spec.rank
                ),
            });
        }
        let last: Option<i64> = conn
            .query_row("SELECT MAX(step) FROM steps", [], |r| r.get(0))
            .map_err(sql(&db))?;
        let probes: i64 = conn
            .query_row("SELECT COUNT(*) FROM probes", [], |r| r.get(0))
            .map_err(sql(&db))?;
        Ok(Self {
            dir: dir.to_owned(),
            db,
            conn,
            meta: existing,
            step: None,
            last,
            pending: BTreeMap::new(),
            blocks: BTreeMap::new(),
            probes: probes as usize,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn meta(&self) -> &RunMeta {
        &self.meta
    }

    /// The step being logged, if one was started.
    pub fn current_step(&self) -> Option<i64> {
        self.step
    }

    /// The last committed step.
    pub fn last_committed(&self) -> Option<i64> {
        self.last
    }

    fn invalid(&self, reason: String) -> RunError {
        RunError::Invalid {
            path: self.db.clone(),
            reason,
        }
    }

    /// Ends the current step (committing it) and starts step `n`, which must come after every
    /// step this run committed.
    pub fn step(&mut self, n: i64) -> Result<(), RunError> {
        if !(0..=MAX_STEP).contains(&n) {
            return Err(self.invalid(format!("step {n}: steps are 0 to 2^53")));
        }
        if let Some(cur) = self.step.or(self.last)
            && n <= cur
        {
            return Err(self.invalid(format!("step {n} after step {cur}: steps must increase")));
        }
        self.commit()?;
        self.step = Some(n);
        Ok(())
    }

    /// Adds one forward call's sums of `block` to the current step; `router` describes the
    /// block's router the first time it is seen.
    pub fn add(
        &mut self,
        block: usize,
        router: Option<&BlockRouter>,
        sums: &LayerSums,
    ) -> Result<(), RunError> {
        if self.step.is_none() {
            return Err(self.invalid("a layer logged before any step: call step(n) first".into()));
        }
        if block >= MAX_BLOCKS {
            return Err(self.invalid(format!("block {block}: blocks are below {MAX_BLOCKS}")));
        }
        if sums.experts() != self.meta.num_experts {
            return Err(self.invalid(format!(
                "block {block}: {} experts logged, the run has {}",
                sums.experts(),
                self.meta.num_experts
            )));
        }
        self.blocks
            .entry(block)
            .or_insert_with(|| router.cloned().unwrap_or_default());
        self.pending
            .entry(block)
            .or_insert_with(|| LayerSums::new(self.meta.num_experts))
            .add(sums);
        Ok(())
    }

    /// Commits the current step (its blocks, their sums and the wall-clock time) in one
    /// transaction. A step with nothing logged is committed too (it is a step of training).
    pub fn commit(&mut self) -> Result<(), RunError> {
        let Some(step) = self.step.take() else {
            return Ok(());
        };
        let pending = std::mem::take(&mut self.pending);
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let db = self.db.clone();
        let tx = self.conn.transaction().map_err(sql(&db))?;
        for (block, router) in &self.blocks {
            let json = serde_json::to_string(router).unwrap_or_else(|_| "{}".into());
            tx.execute(
                "INSERT OR IGNORE INTO blocks (block, router) VALUES (?1, ?2)",
                params![*block as i64, json],
            )
            .map_err(sql(&db))?;
        }
        tx.execute(
            "INSERT INTO steps (step, wall_time) VALUES (?1, ?2)",
            params![step, wall],
        )
        .map_err(sql(&db))?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO layers (step, block, calls, tokens, dropped, kept, requests, \
                     entropy_sum, entropy_tokens, z_loss_sum, z_loss_tokens, importance_sum, \
                     load_sum, aux_groups) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, \
                     ?12, ?13, ?14)",
                )
                .map_err(sql(&db))?;
            for (block, s) in &pending {
                let blob = |v: &[u64]| {
                    counts_to_blob(v).map_err(|m| RunError::Invalid {
                        path: db.clone(),
                        reason: format!("step {step}, block {block}: {m}"),
                    })
                };
                insert
                    .execute(params![
                        step,
                        *block as i64,
                        s.calls as i64,
                        s.tokens as i64,
                        s.dropped as i64,
                        blob(&s.kept)?,
                        blob(&s.requests)?,
                        s.entropy_sum,
                        s.entropy_tokens as i64,
                        s.z_loss_sum,
                        s.z_loss_tokens as i64,
                        s.importance_sum,
                        s.load_sum,
                        s.aux_groups as i64,
                    ])
                    .map_err(sql(&db))?;
            }
        }
        tx.commit().map_err(sql(&db))?;
        self.last = Some(step);
        Ok(())
    }

    /// Forgets the current step's sums without committing them (a step cut short by an error).
    pub fn discard(&mut self) {
        self.step = None;
        self.pending.clear();
    }

    /// Registers the probe images (once per run; rank 0 only): their pixels and labels, the
    /// patch grid and the CLS token.
    pub fn set_probes(
        &mut self,
        images: &[ProbeImage],
        grid: [usize; 2],
        cls_token: bool,
    ) -> Result<(), RunError> {
        if self.meta.rank != 0 {
            return Err(self.invalid("probe images are registered by rank 0".into()));
        }
        if self.probes > 0 {
            return Err(self.invalid(format!(
                "the run already has {} probe images: probes are registered once",
                self.probes
            )));
        }
        if images.is_empty() || images.len() > MAX_PROBES {
            return Err(self.invalid(format!(
                "{} probe images: between 1 and {MAX_PROBES}",
                images.len()
            )));
        }
        let tokens = grid[0].saturating_mul(grid[1]);
        if tokens == 0 || tokens >= 1 << 20 {
            return Err(self.invalid(format!(
                "a probe grid of {}x{}: between 1 and 2^20 patches",
                grid[0], grid[1]
            )));
        }
        let db = self.db.clone();
        let tx = self.conn.transaction().map_err(sql(&db))?;
        for (i, im) in images.iter().enumerate() {
            let side = crate::model::MAX_IMAGE_SIDE as usize;
            if !(1..=side).contains(&im.height)
                || !(1..=side).contains(&im.width)
                || im.pixels.len() != im.height * im.width * 3
            {
                return Err(RunError::Invalid {
                    path: db,
                    reason: format!(
                        "probe image {i}: {} bytes for {}x{}x3 (at most {side} pixels a side)",
                        im.pixels.len(),
                        im.height,
                        im.width
                    ),
                });
            }
            tx.execute(
                "INSERT INTO probes (image, height, width, label, pixels) VALUES (?1, ?2, ?3, \
                 ?4, ?5)",
                params![
                    i as i64,
                    im.height as i64,
                    im.width as i64,
                    im.label.map(|l| l as i64),
                    im.pixels
                ],
            )
            .map_err(sql(&db))?;
        }
        let mut meta = self.meta.clone();
        meta.probe = Some(ProbeMeta { grid, cls_token });
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'description'",
            params![serde_json::to_string(&meta).unwrap_or_default()],
        )
        .map_err(sql(&db))?;
        tx.commit().map_err(sql(&db))?;
        self.meta = meta;
        self.probes = images.len();
        Ok(())
    }

    /// Where the snapshot of `step` goes (the writer of the trace writes it there atomically,
    /// then calls [`RunWriter::record_snapshot`]).
    pub fn snapshot_path(&self, step: i64) -> PathBuf {
        self.dir.join(snapshot_file(step))
    }

    /// Records that the snapshot of `step` is complete.
    pub fn record_snapshot(&mut self, step: i64) -> Result<(), RunError> {
        let file = snapshot_file(step);
        if !self.dir.join(&file).is_file() {
            return Err(self.invalid(format!("snapshot {file} was not written")));
        }
        self.conn
            .execute(
                "INSERT OR REPLACE INTO snapshots (step, file) VALUES (?1, ?2)",
                params![step, file],
            )
            .map_err(sql(&self.db))?;
        Ok(())
    }

    /// Commits the last step and closes the database.
    pub fn close(mut self) -> Result<(), RunError> {
        self.commit()?;
        let db = self.db.clone();
        self.conn.close().map_err(|(_, e)| sql(&db)(e))
    }
}

/// A new database: schema and description written into a temporary file and renamed into
/// place, so no reader ever finds a half-made one.
fn create_database(db: &Path, meta: &RunMeta) -> Result<(), RunError> {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| DATABASE.into());
    let tmp = db.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let conn = Connection::open(&tmp).map_err(sql(&tmp))?;
        conn.execute_batch(SCHEMA).map_err(sql(&tmp))?;
        let description = serde_json::to_string(meta).map_err(|e| RunError::Invalid {
            path: tmp.clone(),
            reason: e.to_string(),
        })?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('format', ?1), ('schema_version', ?2), \
             ('description', ?3)",
            params![FORMAT_NAME, SCHEMA_VERSION.to_string(), description],
        )
        .map_err(sql(&tmp))?;
        conn.pragma_update(
            None,
            "journal_mode",
            journal_mode(|k| std::env::var(k).ok()),
        )
        .map_err(sql(&tmp))?;
        conn.close().map_err(|(_, e)| sql(&tmp)(e))?;
        std::fs::rename(&tmp, db).map_err(|err| RunError::Io {
            path: db.to_owned(),
            err,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::journal_mode;

    #[test]
    fn the_journal_is_wal_on_one_host_and_a_rollback_journal_across_machines() {
        fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_string())
            }
        }
        assert_eq!(journal_mode(env(&[])), "WAL");
        let one_host = [("WORLD_SIZE", "8"), ("LOCAL_WORLD_SIZE", "8")];
        assert_eq!(journal_mode(env(&one_host)), "WAL");
        let two_hosts = [("WORLD_SIZE", "16"), ("LOCAL_WORLD_SIZE", "8")];
        assert_eq!(journal_mode(env(&two_hosts)), "DELETE");
        let forced = [
            ("WORLD_SIZE", "16"),
            ("LOCAL_WORLD_SIZE", "8"),
            ("ROUTERSCOPE_RUN_JOURNAL", "wal"),
        ];
        assert_eq!(journal_mode(env(&forced)), "WAL");
        assert_eq!(
            journal_mode(env(&[("ROUTERSCOPE_RUN_JOURNAL", "DELETE")])),
            "DELETE"
        );
        assert_eq!(journal_mode(env(&[("WORLD_SIZE", "x")])), "WAL");
    }
}
