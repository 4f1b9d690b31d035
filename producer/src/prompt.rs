//! Asking the operator before something is destroyed or rebuilt (`dead purge`,
//! `migrate-queues`), when there is a terminal to ask on.

use std::io::{BufRead, Write};

/// Ask `question` on stderr and read the answer from stdin: true for yes.
pub fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
