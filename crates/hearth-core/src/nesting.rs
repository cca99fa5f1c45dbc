//! The nesting bound of documents: a YAML or JSON document nested deeper
//! than [`MAX_DEPTH`] is refused by a linear pre-scan, before a parser sees
//! it. The YAML parser's cost grows much faster than the input on deeply
//! nested flow collections (a 1 MiB document of `[` costs seconds of CPU)
//! and its own recursion limit bites only after parsing; no resource of
//! hearth's is nested more than a handful of levels.
//!
//! The scan follows YAML's structure closely enough to count what a parser
//! would nest: `[`/`{` outside quoted scalars and comments (flow depth), and
//! in block context the columns of indentation and of `- ` entries (block
//! depth). Quotes count only where a scalar starts, so the apostrophe of
//! `it's` is plain text; block scalars (`|`, `>`) are skipped as text.

use crate::Error;

/// Deepest nesting accepted, in levels (flow and block together).
pub const MAX_DEPTH: usize = 64;

/// Refuses a document nested deeper than [`MAX_DEPTH`].
pub fn check(body: &str) -> Result<(), Error> {
    let depth = Scan::default().run(body, MAX_DEPTH);
    if depth > MAX_DEPTH {
        Err(Error::invalid(format!(
            "the document is nested deeper than the limit of {MAX_DEPTH} levels"
        )))
    } else {
        Ok(())
    }
}

#[derive(Default)]
struct Scan {
    /// Open `[`/`{`.
    flow: usize,
    /// Columns of the open block collections.
    block: Vec<usize>,
    /// Inside a quoted scalar that continues on the next line.
    quote: Option<u8>,
    /// Indentation of the line that opened a block scalar (`|`, `>`):
    /// deeper lines are its text.
    block_scalar: Option<usize>,
    /// The deepest nesting seen so far.
    deepest: usize,
}

impl Scan {
    /// The deepest nesting seen, stopping early once beyond `limit`.
    fn run(mut self, body: &str, limit: usize) -> usize {
        for line in body.lines() {
            let bytes = line.as_bytes();
            let indent = bytes.iter().take_while(|b| **b == b' ').count();
            let blank = bytes[indent..].iter().all(|b| b.is_ascii_whitespace());
            if let Some(opener) = self.block_scalar {
                if blank || indent > opener {
                    continue;
                }
                self.block_scalar = None;
            }
            let mut at = indent;
            if self.quote.is_none() && self.flow == 0 {
                if blank || bytes[indent] == b'#' {
                    continue;
                }
                if line.starts_with("---") || line.starts_with("...") {
                    self.block.clear();
                    continue;
                }
                while self.block.last().is_some_and(|c| *c > indent) {
                    self.block.pop();
                }
                if self.block.last() != Some(&indent) {
                    self.block.push(indent);
                }
                // `- - x`: each entry opens a sequence one column further in.
                while bytes.get(at) == Some(&b'-') && bytes.get(at + 1).is_none_or(|b| *b == b' ') {
                    at += 1;
                    while bytes.get(at) == Some(&b' ') {
                        at += 1;
                    }
                    if at < bytes.len() {
                        self.block.push(at);
                    }
                    if self.block.len() > limit {
                        break;
                    }
                }
            }
            self.deepest = self.deepest.max(self.block.len() + self.flow);
            self.line(&bytes[at..], indent, limit);
            if self.deepest > limit {
                break;
            }
        }
        self.deepest
    }

    /// Flow brackets, quotes and comments of the rest of a line.
    fn line(&mut self, bytes: &[u8], indent: usize, limit: usize) {
        // Whether a scalar may start here (so a quote opens a quoted one).
        let mut scalar_start = true;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if let Some(q) = self.quote {
                if q == b'"' && b == b'\\' {
                    i += 2;
                    continue;
                }
                if b == q {
                    if q == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    self.quote = None;
                    scalar_start = false;
                }
                i += 1;
                continue;
            }
            match b {
                b'"' | b'\'' if scalar_start => self.quote = Some(b),
                b'#' if i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t' => return,
                b'[' | b'{' if scalar_start => {
                    self.flow += 1;
                    self.deepest = self.deepest.max(self.block.len() + self.flow);
                    if self.deepest > limit {
                        return;
                    }
                }
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    scalar_start = false;
                }
                b',' if self.flow > 0 => scalar_start = true,
                b'|' | b'>' if scalar_start && self.flow == 0 => {
                    self.block_scalar = Some(indent);
                    return;
                }
                b' ' | b'\t' => {}
                b':' if bytes.get(i + 1).is_none_or(|n| *n == b' ') || self.flow > 0 => {
                    scalar_start = true
                }
                b'-' | b'?' if scalar_start && bytes.get(i + 1).is_none_or(|n| *n == b' ') => {}
                _ => scalar_start = false,
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(doc: &str) -> usize {
        Scan::default().run(doc, usize::MAX)
    }

    #[test]
    fn counts_flow_and_block_nesting() {
        assert_eq!(depth("max_vms: 1\n"), 1);
        assert_eq!(depth("a:\n  b:\n    c: 1\n  d: 2\n"), 3);
        assert_eq!(depth("a:\n- - - x\n"), 4);
        assert_eq!(depth("a: [[1], {b: [2]}]\n"), 4);
        assert_eq!(depth(r#"{"a": [{"b": "[[[["}]}"#), 4);
        assert_eq!(depth("a: \"[[[\n[[[\"\nb: 1\n"), 1);
        assert_eq!(depth("a: it's [x]\nb: 'it''s [['\n"), 1);
        assert_eq!(depth("a: 1 # [[[[\n"), 1);
        assert_eq!(
            depth("cmd: |\n  if x; then\n      [[ deep\n  fi\nb: 1\n"),
            1
        );
    }

    #[test]
    fn refuses_beyond_the_limit_naming_it() {
        assert!(check(&format!("a: {}1{}", "[".repeat(64), "]".repeat(64))).is_err());
        assert!(check(&format!("a: {}1{}", "[".repeat(63), "]".repeat(63))).is_ok());
        let e = check(&"[".repeat(1 << 20)).unwrap_err();
        assert_eq!(
            e.message,
            "the document is nested deeper than the limit of 64 levels"
        );
        assert!(check(&"- ".repeat(100)).is_err());
        let indented: String = (0..100).map(|i| format!("{}a:\n", " ".repeat(i))).collect();
        assert!(check(&indented).is_err());
        assert!(check(&format!("{{\"a\": {}1{}}}", "[".repeat(70), "]".repeat(70))).is_err());
    }
}
