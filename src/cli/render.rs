//! How answers look: aligned tables by default, JSON with `--json`, and
//! the byte and time formats the tables use.

use std::fmt::Write as _;
use std::io::{BufWriter, Write as _};

use serde::Serialize;
use serde_json::Value;

use crate::control::{Answer, BlockRun, EpochRow, Extents, FileRow, OpRow, VerifyReport};

/// Prints `answer` as the command's table, or as JSON with `json`.
pub(super) fn print(answer: &Answer, json: bool) {
    if json {
        print_json(answer);
        return;
    }
    match answer {
        Answer::Ls(files) => table(&FILE_HEADER, &files.files, file_row),
        Answer::Show(extents) => show(extents),
        Answer::Epochs(epochs) => table(&EPOCH_HEADER, &epochs.epochs, epoch_row),
        Answer::Ops(ops) => table(&OP_HEADER, &ops.ops, op_row),
        Answer::Verify(report) => verify(report),
        Answer::Stats(_) | Answer::Cut(_) | Answer::Status(_) => print_fields("", answer),
    }
}

/// Prints a one-record answer as fields one a line, or as JSON with `json`.
pub(super) fn record(v: &impl Serialize, json: bool) {
    if json {
        print_json(v);
    } else {
        print_fields("", v);
    }
}

/// Serialises through a `serde_json::Value`: its map keeps keys sorted,
/// which is the order `--json` has always printed them in.
fn to_value(v: &impl Serialize) -> Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// Prints any answer as pretty JSON, keys sorted.
fn print_json(v: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(&to_value(v)).unwrap_or_default()
    );
}

/// Prints an answer's fields one a line (keys sorted), nested objects
/// indented: the table form of the answers that are one record.
fn print_fields(indent: &str, v: &impl Serialize) {
    fields(indent, &to_value(v));
}

fn fields(indent: &str, v: &Value) {
    let Value::Object(map) = v else { return };
    for (k, val) in map {
        match val {
            Value::Object(_) => {
                println!("{indent}{k}:");
                fields(&format!("{indent}  "), val);
            }
            Value::String(s) => println!("{indent}{k:<24} {s}"),
            other => println!("{indent}{k:<24} {other}"),
        }
    }
}

/// Prints a header and one row per item, each column as wide as its
/// widest cell, through one buffer (stdout is line-buffered: a write per
/// row was most of the printing of a 10,000-row `journal ls`). A closed
/// pipe ends the printing quietly.
pub(super) fn table<T>(header: &[&str], items: &[T], row: impl Fn(&T) -> Vec<String>) {
    let mut rows = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    rows.extend(items.iter().map(row));
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut line = String::new();
    for row in rows {
        line.clear();
        for (c, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let _ = write!(line, "{cell:<w$}");
        }
        if writeln!(out, "{}", line.trim_end()).is_err() {
            return;
        }
    }
    let _ = out.flush();
}

/// An optional number as a cell: `-` for none.
fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |n| n.to_string())
}

const FILE_HEADER: [&str; 7] = [
    "PATH",
    "ID",
    "SIZE",
    "DIRTY BLOCKS",
    "DIRTY",
    "WRITTEN",
    "LAST WRITE",
];

fn file_row(f: &FileRow) -> Vec<String> {
    vec![
        f.path.clone(),
        f.id.to_string(),
        bytes(f.size),
        f.dirty_blocks.to_string(),
        bytes(f.dirty_bytes),
        bytes(f.bytes_written),
        time(f.last_write_ns),
    ]
}

fn show(x: &Extents) {
    println!(
        "{} (file id {}): {} , block size {}",
        x.path,
        x.id,
        bytes(x.size),
        bytes(x.block_size)
    );
    let header = ["FIRST BLOCK", "BLOCKS", "OFFSET", "LENGTH"];
    table(&header, &x.extents, |e| {
        vec![
            e.first_block.to_string(),
            e.blocks.to_string(),
            e.offset.to_string(),
            bytes(e.length),
        ]
    });
}

const EPOCH_HEADER: [&str; 7] = [
    "EPOCH",
    "STATE",
    "OPENED",
    "CLOSED",
    "FILES",
    "BLOCKS",
    "MERGED INTO",
];

fn epoch_row(e: &EpochRow) -> Vec<String> {
    vec![
        e.epoch.to_string(),
        e.state.clone(),
        time(e.opened_ns),
        time(e.closed_ns.unwrap_or(0)),
        e.files.to_string(),
        e.blocks.to_string(),
        opt(e.merged_into),
    ]
}

const OP_HEADER: [&str; 8] = [
    "SEQ", "EPOCH", "OP", "PATH", "TARGET", "SIZE", "TIME", "SEEN",
];

fn op_row(o: &OpRow) -> Vec<String> {
    let seen = if o.found_at_mount { "at mount" } else { "live" };
    vec![
        o.seq.to_string(),
        o.epoch.to_string(),
        o.op.clone(),
        o.path.clone(),
        o.target.clone().unwrap_or_else(|| "-".into()),
        o.size.to_string(),
        time(o.time_ns),
        seen.into(),
    ]
}

fn verify(r: &VerifyReport) {
    println!(
        "epoch {}: {} blocks compared, {} dirty (they ship with the next point)",
        r.epoch, r.blocks_checked, r.blocks_dirty_skipped
    );
    let runs: Vec<(&str, &BlockRun)> = r
        .differences
        .iter()
        .flat_map(|d| d.ranges.iter().map(|run| (d.path.as_str(), run)))
        .collect();
    table(&["PATH", "FIRST BLOCK", "BLOCKS"], &runs, |(path, run)| {
        vec![
            path.to_string(),
            run.first_block.to_string(),
            run.blocks.to_string(),
        ]
    });
}

/// Bytes in binary units, for tables.
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A unix-nanosecond time as UTC `YYYY-MM-DD HH:MM:SS`, `-` for none.
pub(super) fn time(ns: u64) -> String {
    if ns == 0 {
        return "-".into();
    }
    crate::state::utc(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_in_utc() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_700_000_000 * 1_000_000_000), "2023-11-14 22:13:20");
    }
}
