//! Every line of what goes to a relay ends with CRLF: a bare CR or a bare LF becomes CRLF,
//! in one linear pass.
//!
//! A bare CR or LF around a dot (`<LF>.<LF>`) is the SMTP-smuggling primitive: lettre's
//! dot-stuffing only recognises a line start after CRLF, so the content must be CRLF-only
//! before it is written. Normalising here, before lettre sees a body, also keeps lettre's
//! own conversion (`Body::new` inserts one `\r` at a time, which is quadratic on a body of
//! many short lines) from having anything to do.

use std::borrow::Cow;

/// How many bytes normalising `bytes` adds: one per bare CR and one per bare LF.
fn missing_bytes(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| match b {
            b'\r' => bytes.get(i + 1) != Some(&b'\n'),
            b'\n' => i == 0 || bytes[i - 1] != b'\r',
            _ => false,
        })
        .count()
}

/// Rewrite `text` so that every line ends with CRLF, in place: one counting pass, one
/// growth of the buffer, one backwards pass that moves each byte once. A body of a million
/// bare LFs costs two passes over it, not a million shifts of its tail.
pub fn to_crlf_in_place(text: &mut String) {
    let extra = missing_bytes(text.as_bytes());
    if extra == 0 {
        return;
    }
    let mut bytes = std::mem::take(text).into_bytes();
    let old_len = bytes.len();
    bytes.resize(old_len + extra, 0);
    // Walk back from the end of the old content, writing from the end of the new one: the
    // write position never falls below the read position, so nothing is overwritten
    // before it is read.
    let mut write = bytes.len();
    let mut read = old_len;
    while read > 0 {
        read -= 1;
        let b = bytes[read];
        match b {
            b'\n' => {
                // CRLF stays one line ending; a bare LF gets its CR.
                if read > 0 && bytes[read - 1] == b'\r' {
                    read -= 1;
                }
                write -= 2;
                bytes[write] = b'\r';
                bytes[write + 1] = b'\n';
            }
            // A CR followed by LF was taken with its LF above: this one is bare.
            b'\r' => {
                write -= 2;
                bytes[write] = b'\r';
                bytes[write + 1] = b'\n';
            }
            b => {
                write -= 1;
                bytes[write] = b;
            }
        }
    }
    debug_assert_eq!(write, 0);
    *text = String::from_utf8(bytes).expect("CR and LF inserted next to ASCII keep UTF-8 valid");
}

/// `message` with every line ending CRLF, borrowed when there is nothing to change (what
/// [`crate::deliver::prepare`] builds is already CRLF-only: this is the last guard before
/// the wire, for content from anywhere else).
pub fn crlf_line_endings(message: &[u8]) -> Cow<'_, [u8]> {
    let extra = missing_bytes(message);
    if extra == 0 {
        return Cow::Borrowed(message);
    }
    let mut out = Vec::with_capacity(message.len() + extra);
    let mut i = 0;
    while i < message.len() {
        match message[i] {
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                // CRLF is one line ending, not two.
                if message[i] == b'\r' && message.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Line endings as they may come in a job, and as they must leave.
    const CASES: [(&str, &str); 14] = [
        ("plain\r\ntext\r\n", "plain\r\ntext\r\n"),
        ("", ""),
        ("a\r.\rb", "a\r\n.\r\nb"),
        ("a\n.\nb", "a\r\n.\r\nb"),
        ("a\n.\r\nb", "a\r\n.\r\nb"),
        ("a\r\n.\nb", "a\r\n.\r\nb"),
        ("a\r\n.\rb", "a\r\n.\r\nb"),
        (".\r.\n.", ".\r\n.\r\n."),
        ("\r", "\r\n"),
        ("\n", "\r\n"),
        ("\n\r", "\r\n\r\n"),
        ("\r\r\n\n", "\r\n\r\n\r\n"),
        ("ends\r", "ends\r\n"),
        ("zoë\nçà\r€", "zoë\r\nçà\r\n€"),
    ];

    #[test]
    fn bare_cr_and_lf_become_crlf_in_place() {
        for (text, normalised) in CASES {
            let mut owned = text.to_string();
            to_crlf_in_place(&mut owned);
            assert_eq!(owned, normalised, "{text:?}");
        }
    }

    #[test]
    fn the_last_guard_before_the_wire_gives_crlf_only_content() {
        for (text, normalised) in CASES {
            assert_eq!(
                &*crlf_line_endings(text.as_bytes()),
                normalised.as_bytes(),
                "{text:?}"
            );
        }
        assert!(matches!(crlf_line_endings(b"clean\r\n"), Cow::Borrowed(_)));
    }
}
