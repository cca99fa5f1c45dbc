//! Progress bars on stderr (indicatif) while the CLI waits: a bake's
//! spinner with its log scrolling above it (`hearth image bake`), and a test
//! boot's bar of finished steps (`hearth warm-pool test --watch` when stdout
//! is not the in-place list of [`crate::live`]: `-o json|yaml`, or stdout
//! piped while stderr is a terminal).
//!
//! **Invariants:** a bar is only ever drawn when stderr is a terminal that
//! understands cursor movement ([`enabled`]); otherwise nothing here runs
//! and the output is byte for byte what it was without bars. Bars never
//! write to stdout, and are cleared before the command's result is printed.

use crate::output::InstanceView;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::Duration;

/// Whether bars are drawn: stderr is a terminal and `TERM` is not `dumb`.
pub fn enabled(stderr_is_tty: bool, term: Option<&str>) -> bool {
    stderr_is_tty && term != Some("dumb")
}

/// How often a spinner turns by itself between polls.
const TICK: Duration = Duration::from_millis(120);

fn bar_on_stderr(len: Option<u64>, template: &str) -> ProgressBar {
    let bar = match len {
        Some(len) => ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("the templates here are valid")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(TICK);
    bar
}

/// A bake's spinner: the image, the job and the time so far; the log's
/// lines are printed above it as they come.
pub struct Bake {
    bar: ProgressBar,
    /// The log's last line while it has no end yet.
    partial: String,
}

impl Bake {
    pub fn start(image: &str, job: &str) -> Bake {
        let bar = bar_on_stderr(None, "{spinner} baking image/{msg} {elapsed}");
        bar.set_message(format!("{image} (job {job})"));
        Bake {
            bar,
            partial: String::new(),
        }
    }

    /// Prints the log's new text above the spinner, whole lines only (the
    /// rest waits for its end).
    pub fn log(&mut self, text: &str) {
        self.partial.push_str(text);
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            self.bar.println(line.trim_end_matches('\n'));
        }
    }

    /// Clears the spinner; a last line without an end is printed.
    pub fn finish(self) {
        self.bar.finish_and_clear();
        if !self.partial.is_empty() {
            eprint!("{}", self.partial);
        }
    }
}

/// A test boot's bar: steps finished of all, and the one running.
pub struct Steps {
    bar: ProgressBar,
}

impl Steps {
    pub fn start(instance: &str) -> Steps {
        let bar = bar_on_stderr(
            Some(0),
            "{spinner} [{bar:30}] {pos}/{len} steps {elapsed} {msg}",
        );
        bar.set_prefix(instance.to_owned());
        Steps { bar }
    }

    /// Moves the bar to what `instance` says.
    pub fn update(&self, instance: &InstanceView) {
        let (done, total) = step_counts(instance);
        self.bar.set_length(total);
        self.bar.set_position(done);
        let running = instance
            .steps
            .iter()
            .find(|s| !s.is_finished() && s.status == "running")
            .map(|s| s.label())
            .unwrap_or_default();
        self.bar.set_message(running);
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// Finished steps and all steps of a run.
pub fn step_counts(instance: &InstanceView) -> (u64, u64) {
    let done = instance.steps.iter().filter(|s| s.is_finished()).count();
    (done as u64, instance.steps.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_on_a_terminal_that_moves_its_cursor() {
        assert!(enabled(true, Some("xterm")));
        assert!(enabled(true, None));
        assert!(!enabled(true, Some("dumb")));
        assert!(!enabled(false, Some("xterm")));
    }

    #[test]
    fn steps_are_counted_finished_of_all() {
        let view = InstanceView::from_answer(
            "test",
            &json!({"id": "i-1", "workspace": "web", "vm": "v-1", "test": true,
                    "status": "provisioning", "summary": null,
                    "steps": [
                        {"name": "create_vm", "status": "succeeded", "output": "", "durationMs": 10},
                        {"name": "clone_repo", "status": "running", "output": ""},
                        {"name": "project_setup", "status": "pending", "output": ""}
                    ],
                    "createdAt": "2026-11-23T03:00:00Z", "updatedAt": "2026-11-23T03:00:00Z",
                    "finishedAt": null}),
        )
        .unwrap();
        assert_eq!(step_counts(&view), (1, 3));
    }
}
