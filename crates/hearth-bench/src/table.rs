//! Tables as aligned Markdown, so that what the benchmark prints can be
//! pasted into BENCHMARKS.md as is.

use crate::stats::Summary;

/// A table: a header row and data rows of the same width.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Table {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are left empty, extra cells are dropped.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        row.resize(self.header.len(), String::new());
        self.rows.push(row);
    }

    /// The table as Markdown, columns padded to their widest cell; the
    /// first column is left-aligned, the others (figures) right-aligned.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.header.len())
            .map(|c| {
                std::iter::once(&self.header)
                    .chain(&self.rows)
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(3)
            })
            .collect();
        let mut out = line(&self.header, &widths);
        let rule: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(c, w)| match c {
                0 => "-".repeat(*w),
                _ => format!("{}:", "-".repeat(w - 1)),
            })
            .collect();
        out.push_str(&line(&rule, &widths));
        for row in &self.rows {
            out.push_str(&line(row, &widths));
        }
        out
    }
}

fn line(cells: &[String], widths: &[usize]) -> String {
    let padded: Vec<String> = cells
        .iter()
        .zip(widths)
        .enumerate()
        .map(|(c, (cell, w))| match c {
            0 => format!("{cell:<w$}"),
            _ => format!("{cell:>w$}"),
        })
        .collect();
    format!("| {} |\n", padded.join(" | "))
}

/// A figure with `decimals` decimals.
pub fn fixed(value: f64, decimals: usize) -> String {
    format!("{value:.decimals$}")
}

/// The cells `p50, p99, max, n` of a summary (`-` when there is none).
pub fn summary_cells(summary: Option<&Summary>, decimals: usize) -> Vec<String> {
    match summary {
        Some(s) => vec![
            fixed(s.p50, decimals),
            fixed(s.p99, decimals),
            fixed(s.max, decimals),
            s.n.to_string(),
        ],
        None => vec!["-".into(), "-".into(), "-".into(), "0".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_markdown() {
        let mut t = Table::new(["clients", "p50 ms", "n"]);
        t.row(["1", "1.25", "40"]);
        t.row(["64", "120.50", "1280"]);
        assert_eq!(
            t.render(),
            "\
| clients | p50 ms |    n |
| ------- | -----: | ---: |
| 1       |   1.25 |   40 |
| 64      | 120.50 | 1280 |
"
        );
    }

    #[test]
    fn short_rows_are_padded_and_widths_count_chars() {
        let mut t = Table::new(["a", "bé"]);
        t.row(["x"]);
        t.row(["y", "z", "dropped"]);
        assert_eq!(
            t.render(),
            "| a   |  bé |\n| --- | --: |\n| x   |     |\n| y   |   z |\n"
        );
    }

    #[test]
    fn summary_cells_show_p50_p99_max_n() {
        let s = Summary::of(&[1.0, 2.0, 4.0]).unwrap();
        assert_eq!(summary_cells(Some(&s), 1), ["2.0", "4.0", "4.0", "3"]);
        assert_eq!(summary_cells(None, 1), ["-", "-", "-", "0"]);
    }
}
