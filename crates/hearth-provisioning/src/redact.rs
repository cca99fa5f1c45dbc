//! Secret redaction: [`Redactor`] replaces every occurrence of a secret
//! value by [`MASK`], and [`TailBuffer`] keeps the redacted tail of a
//! command's streamed output.
//!
//! **Invariants:**
//! - every byte that belongs to an occurrence of any secret is masked, also
//!   where secrets overlap or one contains another (the occurrences of all
//!   secrets are found in the original text, merged, then each merged span
//!   becomes one `***`);
//! - a secret split across two chunks is masked once both have arrived, and
//!   a text taken while the output still streams ([`TailBuffer::streaming_text`])
//!   holds back a trailing piece that could be the start of a secret;
//! - dropping old output never leaves a piece of a secret visible: the raw
//!   text keeps the longest secret's length of slack in front of what is
//!   shown, and only what lies past that slack (where every occurrence is
//!   whole) is shown.

use std::fmt;

/// What a secret becomes.
pub const MASK: &str = "***";

/// How much of a step's output is kept (its tail), in bytes.
pub const TAIL_BYTES: usize = 16 * 1024;

/// Replaces secret values by [`MASK`].
#[derive(Clone, Default)]
pub struct Redactor {
    /// Distinct, non-empty, longest first.
    secrets: Vec<String>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Redactor {
    /// A redactor of `secrets`; empty values are ignored.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Redactor { secrets }
    }

    /// No secret to hide.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// The longest secret's length in bytes (0 without secrets).
    pub fn longest(&self) -> usize {
        self.secrets.first().map_or(0, String::len)
    }

    /// `text` with every secret replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let spans = self.spans(text);
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (start, end) in spans {
            out.push_str(&text[at..start]);
            out.push_str(MASK);
            at = end;
        }
        out.push_str(&text[at..]);
        out
    }

    /// The byte spans of `text` covered by secrets, merged, in order.
    fn spans(&self, text: &str) -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        for secret in &self.secrets {
            // Overlapping occurrences too ("aa" twice in "aaa").
            let mut from = 0;
            while let Some(pos) = text[from..].find(secret.as_str()) {
                let start = from + pos;
                found.push((start, start + secret.len()));
                from = start + text[start..].chars().next().map_or(1, char::len_utf8);
            }
        }
        found.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(found.len());
        for (start, end) in found {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged
    }

    /// The length of the longest suffix of `text` that is a proper prefix
    /// of some secret (it may turn into that secret with more output).
    fn pending_prefix(&self, text: &str) -> usize {
        let mut best = 0;
        for secret in &self.secrets {
            let max = (secret.len() - 1).min(text.len());
            for len in (best + 1..=max).rev() {
                let start = text.len() - len;
                if text.is_char_boundary(start)
                    && secret.as_bytes().starts_with(&text.as_bytes()[start..])
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

/// A bounded buffer of streamed output that hands out its redacted tail
/// (at most `limit` bytes).
#[derive(Debug, Clone)]
pub struct TailBuffer {
    redactor: Redactor,
    limit: usize,
    /// The end of everything pushed (whole characters).
    raw: String,
    /// Whether the front of the output was dropped from `raw`.
    trimmed: bool,
}

impl TailBuffer {
    /// A buffer keeping [`TAIL_BYTES`].
    pub fn new(redactor: Redactor) -> Self {
        Self::with_limit(redactor, TAIL_BYTES)
    }

    /// A buffer keeping `limit` bytes of redacted text.
    pub fn with_limit(redactor: Redactor, limit: usize) -> Self {
        TailBuffer {
            redactor,
            limit,
            raw: String::new(),
            trimmed: false,
        }
    }

    /// Appends a chunk of output.
    pub fn push(&mut self, chunk: &str) {
        self.raw.push_str(chunk);
        // Keep the shown tail plus the slack; trim in batches.
        let keep = self.limit + self.redactor.longest();
        if self.raw.len() > 2 * keep.max(1024) {
            let mut cut = self.raw.len() - keep;
            while !self.raw.is_char_boundary(cut) {
                cut += 1;
            }
            self.raw.drain(..cut);
            self.trimmed = true;
        }
    }

    /// Starts a new line unless at the start of one (or of the output).
    pub fn start_line(&mut self) {
        if !self.raw.is_empty() && !self.raw.ends_with('\n') {
            self.raw.push('\n');
        }
    }

    /// Nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty() && !self.trimmed
    }

    /// The redacted tail of everything pushed, once the output is complete.
    pub fn text(&self) -> String {
        self.tail(self.raw.len())
    }

    /// The redacted tail while output may still come: a trailing piece that
    /// could be the beginning of a secret is held back.
    pub fn streaming_text(&self) -> String {
        let held = self.redactor.pending_prefix(&self.raw);
        self.tail(self.raw.len() - held)
    }

    /// The redacted tail of `raw[..end]`; a secret that starts before
    /// `end` is masked whole.
    fn tail(&self, end: usize) -> String {
        let raw = self.raw.as_str();
        // Past the slack every occurrence of a secret lies wholly in `raw`.
        let mut at = if self.trimmed {
            self.redactor.longest().min(raw.len())
        } else {
            0
        };
        while !raw.is_char_boundary(at) {
            at += 1;
        }
        let mut out = String::new();
        for (start, stop) in self.redactor.spans(raw) {
            if stop <= at {
                continue;
            }
            if start >= end {
                break;
            }
            out.push_str(&raw[at..start.max(at)]);
            out.push_str(MASK);
            at = stop;
        }
        if at < end {
            out.push_str(&raw[at..end]);
        }
        if out.len() > self.limit {
            let mut cut = out.len() - self.limit;
            while !out.is_char_boundary(cut) {
                cut += 1;
            }
            out.drain(..cut);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(secrets: &[&str]) -> Redactor {
        Redactor::new(secrets.iter().map(|s| s.to_string()))
    }

    #[test]
    fn masks_every_occurrence_and_ignores_empty_values() {
        let r = redactor(&["", "hunter2"]);
        assert_eq!(r.longest(), 7);
        assert_eq!(r.redact("pw hunter2, again hunter2!"), "pw ***, again ***!");
        assert_eq!(r.redact("nothing here"), "nothing here");
        assert_eq!(redactor(&[""]).redact("abc"), "abc");
        assert!(redactor(&["", ""]).is_empty());
    }

    #[test]
    fn nested_and_overlapping_secrets_are_masked_whole() {
        // A secret inside a longer one: the longer one is masked whole.
        let r = redactor(&["abc", "abcdef"]);
        assert_eq!(r.redact("x abcdef y abc z"), "x *** y *** z");
        // Overlapping secrets: nothing of either stays visible.
        let r = redactor(&["abcd", "cdef"]);
        assert_eq!(r.redact("abcdef"), "***");
        assert_eq!(r.redact("1abcd2cdef3"), "1***2***3");
        // Overlapping occurrences of one secret.
        assert_eq!(redactor(&["aa"]).redact("aaa b"), "*** b");
    }

    #[test]
    fn works_on_multibyte_text() {
        let r = redactor(&["clé€"]);
        assert_eq!(r.redact("é clé€ ü"), "é *** ü");
        let mut b = TailBuffer::with_limit(r, 5);
        b.push("ééééé");
        assert_eq!(b.text(), "éé");
    }

    #[test]
    fn debug_never_shows_the_secrets() {
        let r = redactor(&["topsecret"]);
        assert!(!format!("{r:?}").contains("topsecret"));
        let b = TailBuffer::new(r);
        assert!(!format!("{b:?}").contains("topsecret"));
    }

    #[test]
    fn a_secret_split_across_chunks_is_masked() {
        let mut b = TailBuffer::new(redactor(&["SECRET"]));
        b.push("token=SEC");
        // While streaming, the possible beginning of the secret is held back.
        assert_eq!(b.streaming_text(), "token=");
        b.push("RET done\n");
        assert_eq!(b.streaming_text(), "token=*** done\n");
        assert_eq!(b.text(), "token=*** done\n");
        // Once complete, a prefix that never became the secret is output.
        let mut b = TailBuffer::new(redactor(&["SECRET"]));
        b.push("SECRE");
        assert_eq!(b.streaming_text(), "");
        assert_eq!(b.text(), "SECRE");
        // A whole secret at the end is masked, not held back in part.
        let mut b = TailBuffer::new(redactor(&["aa"]));
        b.push("xaa");
        assert_eq!(b.streaming_text(), "x***");
        b.push("a");
        assert_eq!(b.streaming_text(), "x***");
        // One byte per chunk.
        let mut b = TailBuffer::new(redactor(&["SECRET"]));
        for c in "a SECRET b".chars() {
            b.push(&c.to_string());
            assert!(!b.streaming_text().contains('S'), "{}", b.streaming_text());
        }
        assert_eq!(b.text(), "a *** b");
    }

    #[test]
    fn the_tail_is_bounded() {
        let mut b = TailBuffer::with_limit(Redactor::default(), 10);
        assert!(b.is_empty());
        for i in 0..5000 {
            b.push(&format!("{i}\n"));
        }
        assert!(!b.is_empty());
        assert_eq!(b.text(), "4998\n4999\n");
        assert!(b.raw.len() <= 2 * 1024 + 10);
    }

    #[test]
    fn trimming_never_leaves_a_piece_of_a_secret_visible() {
        let secret = "0123456789abcdef";
        // Every alignment of the secret against the cut of the raw text.
        for pad in 0..40 {
            for limit in [4, 10, 17, 33] {
                let mut b = TailBuffer::with_limit(redactor(&[secret]), limit);
                b.push(&"x".repeat(pad));
                for _ in 0..300 {
                    b.push(secret);
                    b.push("-");
                }
                for text in [b.text(), b.streaming_text()] {
                    assert!(text.len() <= limit, "{text:?}");
                    assert!(
                        text.chars().all(|c| c == '*' || c == '-'),
                        "pad {pad} limit {limit}: {text:?}"
                    );
                }
            }
        }
        // Masks shrink the text: a short shown tail still shows no piece.
        let mut b = TailBuffer::with_limit(redactor(&[secret]), 8);
        b.push("zz");
        b.push(&secret.repeat(2000));
        assert_eq!(b.text(), "***");
    }

    #[test]
    fn start_line_adds_a_newline_only_when_needed() {
        let mut b = TailBuffer::new(Redactor::default());
        b.start_line();
        b.push("$ one\nout");
        b.start_line();
        b.push("$ two\n");
        b.start_line();
        assert_eq!(b.text(), "$ one\nout\n$ two\n");
    }
}
