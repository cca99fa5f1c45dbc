//! Developer → developer, tried as an attack over real HTTP against the real
//! server with real sandboxes: another developer (and a service identity)
//! tries every action on an agent that is not its own — exec, kill, sleep,
//! wake, idle, finish, resurrect, and reading its output — and is refused
//! while the agent is left as it was (an exec that was refused never ran:
//! the marker file it would have written is absent when the owner looks).
//! A viewer reads no output at all. Beside each attack the legitimate path
//! works: the owner on its agent and on its child, an admin on anyone's.

use crate::both_backends;
use crate::common::{Answer, Backend, Server, id};
use serde_json::{Value, json};

both_backends!(developers_act_only_on_their_own_agents);

const FAST: &[&str] = &["--resync", "200ms"];

/// The refusal a developer (or a service with the developer role) gets
/// for an agent of `owner`.
fn not_yours(agent: &str, owner: &str) -> String {
    format!(
        "agent {agent} belongs to {owner:?}: a developer acts only on its own agents and their children (admins act on every agent of the tenant)"
    )
}

fn phase(s: &Server, agent: &str) -> String {
    let r = s.admin().get(&format!("/v1/agents/{agent}"));
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["phase"].as_str().unwrap().to_owned()
}

fn exec(s: &Server, token: &str, agent: &str, command: &str) -> Answer {
    s.client(token).post(
        &format!("/v1/agents/{agent}/exec"),
        json!({"command": command}),
    )
}

fn act(s: &Server, token: &str, agent: &str, verb: &str) -> Answer {
    let body = if verb == "finish" {
        json!({"status": "completed"})
    } else {
        json!({})
    };
    s.client(token)
        .post(&format!("/v1/agents/{agent}/{verb}"), body)
}

/// The agent `agent` out of a `GET /v1/agents` answer.
fn listed<'a>(list: &'a Answer, agent: &str) -> &'a Value {
    list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == agent)
        .unwrap_or_else(|| panic!("{agent} not listed: {}", list.text))
}

fn assert_hidden(view: &Value, marker: &str) {
    assert_eq!(
        (&view["output"], &view["error"], &view["output_hidden"]),
        (&Value::Null, &Value::Null, &json!(true)),
        "{view}"
    );
    assert!(!view.to_string().contains(marker), "{view}");
}

fn developers_act_only_on_their_own_agents(b: Backend) {
    let s = Server::start_with(b, FAST);
    s.pool(
        6,
        "driver: sandbox\nmemory: 256Mi\n",
        "web",
        "min_idle: 0\n",
    );
    let alice = s.identity("alice", "developer");
    let bob = s.identity("bob", "developer");
    let vic = s.identity("vic", "viewer");
    let ada = s.identity("ada", "admin");
    let bot = s.admin().post(
        "/v1/identities",
        json!({"name": "ci-bot", "kind": "service", "role": "developer"}),
    );
    assert_eq!(bot.status, 201, "{}", bot.text);
    let bot = bot.body["token"].as_str().unwrap().to_owned();

    // Alice's agents: one running (no command), its child, and one whose
    // command printed something and failed.
    // The command line is not output (every reader sees it); what it
    // prints is, and differs from it.
    let marker = "alice-only-output-7";
    let a = s.spawn(&alice, json!({"workspace": "web"}));
    assert_eq!(a.status, 201, "{}", a.text);
    let a = id(&a.body);
    s.wait_agent(&a, "running", 60);
    let child = s.spawn(&alice, json!({"workspace": "web", "parent": a}));
    assert_eq!(child.status, 201, "{}", child.text);
    let child = id(&child.body);
    s.wait_agent(&child, "running", 60);
    let done = s.spawn(
        &alice,
        json!({"workspace": "web", "command": "echo alice-only-output-$((3 + 4)); exit 3"}),
    );
    assert_eq!(done.status, 201, "{}", done.text);
    let done = id(&done.body);
    s.wait_agent(&done, "failed", 60);
    // Bob's own agent, for the legitimate neighbour of reading output.
    let own = s.spawn(
        &bob,
        json!({"workspace": "web", "command": "echo bob-output-$((1 + 1))"}),
    );
    let own = id(&own.body);
    s.wait_agent(&own, "completed", 60);

    // Exec as Bob (and as the service) is refused and never runs.
    for (token, who) in [(&bob, "bob"), (&bot, "ci-bot")] {
        for target in [&a, &child] {
            exec(&s, token, target, &format!("touch /home/{who}-was-here")).assert_error(
                403,
                "PERMISSION_DENIED",
                &not_yours(target, "alice"),
            );
        }
    }
    // The owner's exec on its agent and on its child works, and shows
    // that nothing of the refused ones ran.
    for target in [&a, &child] {
        let r = exec(
            &s,
            &alice,
            target,
            "ls /home/bob-was-here /home/ci-bot-was-here 2>/dev/null | wc -l",
        );
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            (r.body["stdout"].as_str(), r.body["exit_code"].as_i64()),
            (Some("0\n"), Some(0)),
            "{}",
            r.text
        );
    }

    // Every action on a running agent of Alice's: refused, the agent
    // still running.
    for (token, who) in [(&bob, "bob"), (&bot, "ci-bot")] {
        for verb in ["kill", "sleep", "idle", "finish"] {
            for target in [&a, &child] {
                act(&s, token, target, verb).assert_error(
                    403,
                    "PERMISSION_DENIED",
                    &not_yours(target, "alice"),
                );
                assert_eq!(phase(&s, target), "running", "{who} {verb} {target}");
            }
        }
        // Resurrect of a finished one: refused, still failed.
        act(&s, token, &done, "resurrect").assert_error(
            403,
            "PERMISSION_DENIED",
            &not_yours(&done, "alice"),
        );
        assert_eq!(phase(&s, &done), "failed");
    }
    let out = s.cli(&bob, &["agents", "kill", &a], "");
    assert_eq!(
        (out.code, out.stderr.trim_end()),
        (
            1,
            format!("PERMISSION_DENIED: {}", not_yours(&a, "alice")).as_str()
        ),
        "{out:?}"
    );
    assert_eq!(phase(&s, &a), "running");

    // Wake of a sleeping one: Alice puts hers to sleep (legitimate), Bob
    // cannot wake it, Alice can.
    let r = act(&s, &alice, &a, "sleep");
    assert_eq!(
        (r.status, r.body["phase"].as_str()),
        (200, Some("sleeping")),
        "{}",
        r.text
    );
    for token in [&bob, &bot] {
        act(&s, token, &a, "wake").assert_error(403, "PERMISSION_DENIED", &not_yours(&a, "alice"));
        assert_eq!(phase(&s, &a), "sleeping");
    }
    let r = act(&s, &alice, &a, "wake");
    assert_eq!(r.status, 200, "{}", r.text);
    s.wait_agent(&a, "running", 60);

    // Reading output: Bob sees Alice's agents but not what they printed;
    // his own agent's output he reads.
    let list = s.client(&bob).get("/v1/agents");
    assert_eq!(list.status, 200, "{}", list.text);
    assert!(!list.text.contains(marker), "{}", list.text);
    assert_hidden(listed(&list, &done), marker);
    assert_eq!(listed(&list, &done)["phase"], "failed");
    assert_eq!(listed(&list, &own)["output"], "bob-output-2\n");
    assert_eq!(listed(&list, &own)["output_hidden"], false);
    let r = s.client(&bob).get(&format!("/v1/agents/{done}"));
    assert_eq!(
        (r.status, r.body["exit_code"].as_i64()),
        (200, Some(3)),
        "{}",
        r.text
    );
    assert_hidden(&r.body, marker);
    // A viewer sees every agent and no output at all, not even through the
    // CLI, and may act on none.
    let list = s.client(&vic).get("/v1/agents");
    assert_eq!(list.status, 200, "{}", list.text);
    for agent in [&a, &child, &done, &own] {
        assert_hidden(listed(&list, agent), marker);
    }
    assert!(!list.text.contains("bob-output-2"), "{}", list.text);
    let out = s.cli(&vic, &["agents", "get", &done], "");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("output: null") && out.stdout.contains("output_hidden: true"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains(marker), "{}", out.stdout);
    exec(&s, &vic, &a, "true").assert_error(
        403,
        "PERMISSION_DENIED",
        "your role does not have agent.spawn permission",
    );
    act(&s, &vic, &a, "kill").assert_error(
        403,
        "PERMISSION_DENIED",
        "your role does not have agent.kill permission",
    );
    // The owner and an admin read it.
    for token in [&alice, &ada] {
        let r = s.client(token).get(&format!("/v1/agents/{done}"));
        assert_eq!(
            (r.body["output"].as_str(), r.body["output_hidden"].as_bool()),
            (Some(format!("{marker}\n").as_str()), Some(false)),
            "{}",
            r.text
        );
    }

    // An admin acts on Alice's agents: exec, then kill the child.
    let r = exec(&s, &ada, &a, "echo admin-was-here");
    assert_eq!(r.body["stdout"], "admin-was-here\n", "{}", r.text);
    let r = act(&s, &ada, &child, "kill");
    assert_eq!(
        (r.status, r.body["phase"].as_str()),
        (200, Some("killed")),
        "{}",
        r.text
    );
    // Alice kills and resurrects her own.
    let r = act(&s, &alice, &a, "kill");
    assert_eq!(
        (r.status, r.body["phase"].as_str()),
        (200, Some("killed")),
        "{}",
        r.text
    );
    for token in [&bob, &bot] {
        act(&s, token, &a, "resurrect").assert_error(
            403,
            "PERMISSION_DENIED",
            &not_yours(&a, "alice"),
        );
        assert_eq!(phase(&s, &a), "killed");
    }
    let r = act(&s, &alice, &a, "resurrect");
    assert_eq!(r.status, 200, "{}", r.text);
    s.wait_agent(&a, "running", 60);
    let r = act(&s, &alice, &a, "finish");
    assert_eq!(
        (r.status, r.body["phase"].as_str()),
        (200, Some("completed")),
        "{}",
        r.text
    );
    // Every refusal was logged with who tried.
    assert!(
        s.logs()
            .contains("agent action refused: not the caller's own"),
        "{}",
        s.logs_tail()
    );
}
