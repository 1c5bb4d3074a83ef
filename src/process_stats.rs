//! The process's own memory and CPU figures, for benchmark reports (`replay`'s summary, the
//! examples, `run --embedded --exit-when-done`).
//!
//! Reads `/proc/self/status` and `/proc/self/stat` (Linux); elsewhere the figures are `None`. An
//! edge: never used by the core.

/// Current resident set size, in bytes (`VmRSS`).
pub fn resident_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// Peak resident set size since the process started, in bytes (`VmHWM`).
pub fn peak_resident_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Process CPU time (user + system) in seconds, from `/proc/self/stat` (Linux).
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    // The kernel reports these in USER_HZ, 100 per second on Linux.
    Some((user + system) / 100.0)
}

fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kilobytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kilobytes * 1024)
}
