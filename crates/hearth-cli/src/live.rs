//! What `hearth warm-pool test --watch` writes while it waits, as pure
//! functions of the instance polled and the clock: [`Live::update`]
//! returns the text to write, never writes it.
//!
//! On a terminal ([`Live::redraw`]) the steps are one list, one
//! [`step_line`] each with the labels aligned, redrawn in place after every
//! poll with plain ANSI (cursor up, clear line, clear to the end of the
//! screen; no colours); the running step has a spinner and its elapsed
//! time. Anywhere else ([`Live::lines`]: pipes, CI, tests) each step is
//! printed once, as a line, when it finishes, and nothing else: the output
//! reads the same in a log.

use crate::output::{InstanceView, StepView, step_line};

/// The frames of the running step's spinner, one per redraw.
pub const SPINNER: &[&str] = &["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];

/// Whether `--watch` redraws its list in place: only when stdout is a
/// terminal that understands cursor movement (`TERM` is not `dumb`).
pub fn redraws(stdout_is_tty: bool, term: Option<&str>) -> bool {
    stdout_is_tty && term != Some("dumb")
}

/// The state of the display between two polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// Not a terminal: which steps (by position) were already printed.
    Lines { printed: Vec<bool> },
    /// A terminal: how many lines the last frame drew, and how many frames
    /// were drawn (the spinner's position).
    Redraw { drawn: usize, frames: usize },
}

impl Live {
    /// One line per finished step.
    pub fn lines() -> Live {
        Live::Lines {
            printed: Vec::new(),
        }
    }

    /// The whole list, redrawn in place.
    pub fn redraw() -> Live {
        Live::Redraw {
            drawn: 0,
            frames: 0,
        }
    }

    /// The text that brings what is on screen up to date with `instance`;
    /// `now_ms` (Unix ms) times the running step.
    pub fn update(&mut self, instance: &InstanceView, now_ms: i64) -> String {
        match self {
            Live::Lines { printed } => {
                printed.resize(instance.steps.len().max(printed.len()), false);
                let mut text = String::new();
                for (step, done) in instance.steps.iter().zip(printed.iter_mut()) {
                    if step.is_finished() && !*done {
                        *done = true;
                        text.push_str(&step_line(step, 0, "", now_ms));
                        text.push('\n');
                    }
                }
                text
            }
            Live::Redraw { drawn, frames } => {
                let spinner = SPINNER[*frames % SPINNER.len()];
                let text = frame(&instance.steps, *drawn, spinner, now_ms);
                *drawn = instance.steps.len();
                *frames += 1;
                text
            }
        }
    }
}

/// The labels' column width on a terminal: the longest label plus two, so
/// that three spaces separate it from its duration.
pub fn label_width(steps: &[StepView]) -> usize {
    steps
        .iter()
        .map(|s| s.label().chars().count())
        .max()
        .map_or(0, |w| w + 2)
}

/// One redraw: back up over the `drawn` lines of the last frame, write
/// each step's line over a cleared line, clear whatever the last frame had
/// below.
pub fn frame(steps: &[StepView], drawn: usize, spinner: &str, now_ms: i64) -> String {
    let width = label_width(steps);
    let mut text = String::new();
    if drawn > 0 {
        text.push_str(&format!("\x1b[{drawn}A"));
    }
    for step in steps {
        text.push_str("\r\x1b[2K");
        text.push_str(&step_line(step, width, spinner, now_ms));
        text.push('\n');
    }
    text.push_str("\x1b[J");
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn instance(status: &str, steps: Value) -> InstanceView {
        InstanceView::from_answer(
            "test",
            &json!({"id": "i-1", "workspace": "web", "vm": "v-1", "test": true,
                    "status": status, "summary": null, "steps": steps,
                    "createdAt": "2026-11-23T03:00:00Z", "updatedAt": "2026-11-23T03:00:00Z",
                    "finishedAt": null}),
        )
        .unwrap()
    }

    fn step(name: &str, repo: Option<&str>, status: &str, started: Value, ms: Value) -> Value {
        let mut s = json!({"name": name, "status": status, "output": "",
                           "startedAt": crate::output::rfc3339_at(started), "durationMs": ms});
        if let Some(repo) = repo {
            s["repo"] = json!(repo);
        }
        s
    }

    #[test]
    fn terminals_are_detected() {
        assert!(redraws(true, Some("xterm-256color")));
        assert!(redraws(true, None));
        assert!(!redraws(true, Some("dumb")));
        assert!(!redraws(false, Some("xterm")));
    }

    #[test]
    fn without_a_terminal_each_step_is_printed_once_when_it_finishes() {
        let mut live = Live::lines();
        let at = |status_1: &str, status_2: &str, status_3: &str| {
            instance(
                "provisioning",
                json!([
                    step("create_vm", None, status_1, json!(1000), json!(10)),
                    step(
                        "clone_repo",
                        Some("myrepo"),
                        status_2,
                        json!(1010),
                        json!(1234)
                    ),
                    step("warm_pool_setup", None, status_3, json!(2300), json!(300)),
                ]),
            )
        };
        assert_eq!(live.update(&at("running", "pending", "pending"), 5000), "");
        assert_eq!(
            live.update(&at("succeeded", "running", "pending"), 5000),
            "✓ create_vm 0.01s\n"
        );
        assert_eq!(
            live.update(&at("succeeded", "running", "pending"), 5000),
            ""
        );
        // Two at once, in order.
        assert_eq!(
            live.update(&at("succeeded", "succeeded", "failed"), 5000),
            "✓ clone_repo (myrepo) 1.2s\n✗ warm_pool_setup 0.3s\n"
        );
        assert_eq!(
            live.update(&at("succeeded", "succeeded", "failed"), 5000),
            ""
        );
        // No steps yet: nothing.
        assert_eq!(
            Live::lines().update(&instance("provisioning", json!([])), 0),
            ""
        );
    }

    #[test]
    fn on_a_terminal_the_list_is_redrawn_in_place() {
        let mut live = Live::redraw();
        let steps = |first: &str, second: &str| {
            instance(
                "provisioning",
                json!([
                    step("create_vm", None, first, json!(1000), json!(10)),
                    step(
                        "clone_repo",
                        Some("myrepo"),
                        second,
                        json!(1010),
                        Value::Null
                    ),
                    step("project_setup", None, "pending", Value::Null, Value::Null),
                ]),
            )
        };
        assert_eq!(
            live.update(&steps("running", "pending"), 3400),
            "\r\x1b[2K⠋ create_vm             2.4s\n\
             \r\x1b[2K· clone_repo (myrepo)\n\
             \r\x1b[2K· project_setup\n\
             \x1b[J"
        );
        assert_eq!(
            live.update(&steps("succeeded", "running"), 2210),
            "\x1b[3A\
             \r\x1b[2K✓ create_vm             0.01s\n\
             \r\x1b[2K⠙ clone_repo (myrepo)   1.2s\n\
             \r\x1b[2K· project_setup\n\
             \x1b[J"
        );
        assert_eq!(
            live,
            Live::Redraw {
                drawn: 3,
                frames: 2
            }
        );
        // The spinner turns once per frame and wraps around.
        let mut live = Live::Redraw {
            drawn: 3,
            frames: SPINNER.len(),
        };
        assert!(
            live.update(&steps("succeeded", "running"), 2210)
                .contains("\r\x1b[2K⠋ clone_repo (myrepo)   1.2s\n")
        );
        // A frame with fewer lines clears what is left below it.
        assert_eq!(
            frame(&[], 3, "⠋", 0),
            "\x1b[3A\x1b[J",
            "back up 3 lines, clear below"
        );
    }

    #[test]
    fn labels_are_aligned_on_the_longest() {
        let steps = instance(
            "provisioning",
            json!([
                step("create_vm", None, "pending", Value::Null, Value::Null),
                step(
                    "clone_repo",
                    Some("a-long-repo"),
                    "pending",
                    Value::Null,
                    Value::Null
                ),
            ]),
        )
        .steps;
        assert_eq!(label_width(&steps), "clone_repo (a-long-repo)".len() + 2);
        assert_eq!(label_width(&[]), 0);
    }
}
