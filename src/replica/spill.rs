//! Append-only files of length-delimited prost records in the staging
//! folder, written as a point arrives and read back one record at a time.
//! This is how the secondary keeps a point's lists (`staging/point`) and
//! its offers (`staging/offers`) on disk rather than in memory: what it
//! holds per point does not grow with the number of operations or offers
//! (see `session`).
//!
//! A record is a varint length then the prost encoding, as
//! `encode_length_delimited` writes it; a record longer than
//! [`MAX_MESSAGE`] is not one (a damaged length), so reading never
//! allocates more than a message.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use super::records::bad;
use crate::error::{IoContext, Result};
use crate::wire::MAX_MESSAGE;

/// Bytes buffered before a write reaches the file.
const BUFFER: usize = 256 * 1024;

/// A spill file being written.
#[derive(Debug)]
pub struct Spill {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes written, the buffered ones included.
    len: u64,
}

impl Spill {
    /// A new, empty spill file at `path` (replacing any).
    pub fn create(path: &Path) -> Result<Spill> {
        let file = crate::state::state_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .at(path)?;
        Ok(Spill::over(path, file, 0))
    }

    /// The spill file at `path` cut to its first `len` bytes (what is
    /// after them is not trusted), appended to from there.
    pub fn reopen(path: &Path, len: u64) -> Result<Spill> {
        let file = OpenOptions::new().append(true).open(path).at(path)?;
        file.set_len(len).at(path)?;
        Ok(Spill::over(path, file, len))
    }

    fn over(path: &Path, file: File, len: u64) -> Spill {
        Spill {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(BUFFER, file),
            len,
        }
    }

    /// Appends `bytes` as they are (no record around them: a data file
    /// next to a log); returns where they start.
    pub fn append(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.len;
        self.out.write_all(bytes).at(&self.path)?;
        self.len += bytes.len() as u64;
        Ok(at)
    }

    /// Appends one record.
    pub fn push(&mut self, record: &impl Message) -> Result<()> {
        let bytes = record.encode_length_delimited_to_vec();
        self.out.write_all(&bytes).at(&self.path)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// The file's length once what is buffered is written.
    pub fn written(&self) -> u64 {
        self.len
    }

    /// Writes out what is buffered: a reader (or this process's successor
    /// after a `kill -9`) sees every record pushed.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().at(&self.path)
    }

    /// Writes out what is buffered and syncs it: every record pushed is
    /// durable.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.out.get_ref().sync_data().at(&self.path)
    }
}

/// A spill file read back one record at a time.
#[derive(Debug)]
pub struct Records {
    path: PathBuf,
    input: BufReader<File>,
    /// Where the records read so far end.
    at: u64,
}

impl Records {
    /// Reads the spill file at `path` from its start.
    pub fn open(path: &Path) -> Result<Records> {
        let file = File::open(path).at(path)?;
        Ok(Records {
            path: path.to_path_buf(),
            input: BufReader::with_capacity(BUFFER, file),
            at: 0,
        })
    }

    /// Where the records read so far end.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// The next record; `None` at the end of the file. A torn or damaged
    /// record is an error (the records before it stay good: see [`at`]).
    ///
    /// [`at`]: Records::at
    pub fn read<M: Message + Default>(&mut self) -> Result<Option<M>> {
        if self.input.fill_buf().at(&self.path)?.is_empty() {
            return Ok(None);
        }
        let (len, varint) = self.length()?;
        if len > MAX_MESSAGE as u64 {
            return Err(bad(&self.path, format!("a record of {len} bytes")));
        }
        let mut bytes = vec![0u8; len as usize];
        self.input.read_exact(&mut bytes).at(&self.path)?;
        let record = M::decode(bytes.as_slice())
            .map_err(|e| bad(&self.path, format!("undecodable record: {e}")))?;
        self.at += varint + len;
        Ok(Some(record))
    }

    /// A record's length prefix, and the prefix's own length.
    fn length(&mut self) -> Result<(u64, u64)> {
        let mut value = 0u64;
        for i in 0..10 {
            let mut byte = [0u8];
            self.input.read_exact(&mut byte).at(&self.path)?;
            value |= u64::from(byte[0] & 0x7f) << (7 * i);
            if byte[0] & 0x80 == 0 {
                return Ok((value, i + 1));
            }
        }
        Err(bad(&self.path, "a record length of more than 10 bytes"))
    }
}
