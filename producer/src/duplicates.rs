//! Recipients listed more than once in one file: found during `send`'s first pass, reported
//! by line, and skipped by the second pass under `--dedupe` (the first occurrence is sent).
//!
//! Two rows are duplicates when their `email` fields, trimmed, are equal ignoring case
//! (Unicode lower case of the whole address, local part included: `Ann@Example.org` and
//! `ann@example.org` are one recipient). Only valid rows take part: an invalid row is never
//! sent, so it is no first occurrence.
//!
//! Memory: one 64-bit hash and one 32-bit line number per distinct address, packed into 12
//! bytes (a `u64` key beside a `u32` would be padded to 16): with the table's slack about
//! 26 MiB for a million rows, 39 MiB for a moment while the table grows, not the addresses
//! themselves. Two different addresses with the same hash would be taken for duplicates;
//! among a million addresses the odds are about 1 in 36 million.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};

/// A row whose address an earlier row already has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub line: u64,
    pub first_line: u64,
    pub address: String,
}

impl fmt::Display for Duplicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: duplicate of line {} ({})",
            self.line, self.first_line, self.address
        )
    }
}

/// The addresses seen so far, fed in file order.
#[derive(Debug, Default)]
pub struct Duplicates {
    hasher: RandomState,
    /// The hash (as two `u32`, for a 12-byte entry) → the line it was first seen on.
    first_lines: HashMap<[u32; 2], u32>,
    /// Lines of the duplicates, in file order.
    lines: Vec<u64>,
}

impl Duplicates {
    /// The valid row on `line` has `address`: its duplicate report if an earlier row had it.
    pub fn check(&mut self, line: u64, address: &str) -> Option<Duplicate> {
        let address = address.trim();
        let hash = self.hasher.hash_one(address.to_lowercase());
        let key = [(hash >> 32) as u32, hash as u32];
        // A file of more than 4 billion lines is beyond any limit of `send`; saturate.
        let this_line = u32::try_from(line).unwrap_or(u32::MAX);
        let first_line = u64::from(*self.first_lines.entry(key).or_insert(this_line));
        (first_line != u64::from(this_line)).then(|| {
            self.lines.push(line);
            Duplicate {
                line,
                first_line,
                address: address.to_string(),
            }
        })
    }

    /// Lines of the duplicates found, in file order.
    pub fn into_lines(self) -> Vec<u64> {
        self.lines
    }
}

/// Two sorted lists of lines as one sorted list without repeats.
pub fn merge_lines(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut merged = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x <= y => {
                i += 1;
                if x == y {
                    j += 1;
                }
                x
            }
            (Some(_), Some(&y)) | (None, Some(&y)) => {
                j += 1;
                y
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (None, None) => unreachable!("the loop ends first"),
        };
        merged.push(next);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_rows_with_the_same_address_in_any_case_are_duplicates_of_the_first() {
        let mut duplicates = Duplicates::default();
        let rows = [
            (2, "ann@example.org"),
            (3, "bob@example.org"),
            (5, " Ann@Example.ORG "),
            (6, "ann@example.org"),
            (7, "bob@example.com"),
            (9, "BOB@example.org"),
        ];
        let reports: Vec<String> = rows
            .iter()
            .filter_map(|&(line, address)| duplicates.check(line, address))
            .map(|d| d.to_string())
            .collect();
        assert_eq!(
            reports,
            [
                "line 5: duplicate of line 2 (Ann@Example.ORG)",
                "line 6: duplicate of line 2 (ann@example.org)",
                "line 9: duplicate of line 3 (BOB@example.org)",
            ]
        );
        assert_eq!(duplicates.into_lines(), [5, 6, 9]);
    }

    #[test]
    fn merged_lines_stay_sorted_without_repeats() {
        assert_eq!(merge_lines(&[3, 7, 9], &[2, 7, 10]), [2, 3, 7, 9, 10]);
        assert_eq!(merge_lines(&[], &[4]), [4]);
        assert_eq!(merge_lines(&[4], &[]), [4]);
        assert!(merge_lines(&[], &[]).is_empty());
    }
}
