//! `freebind-agent check`: everything freebind needs from the kernel and the process, as a
//! table with what to do about each missing piece.
use anyhow::Result;

/// Prints the table; true when everything freebind needs is there.
pub fn run() -> Result<bool> {
    anyhow::bail!("not built yet")
}
