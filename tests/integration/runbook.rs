//! `docs/runbook.md` cannot drift: every alert of `deploy/prometheus/alerts.yml` has the section
//! its `runbook_url` names, with the story's five parts (§10), and every command block of the
//! runbook (fenced `sh runbook`) runs, in order, against a live instance with held contacts and
//! manual-review items to work on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::admin::{api, wait_held, wait_ready, wait_review, with_admin, TOKEN};
use crate::common::process::{binary, config_file};
use crate::common::*;
use causal_commit::config::Config;
use causal_commit::proto::ReviewReason;

const FENCE: &str = "```";
const TAG: &str = "sh runbook";

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The anchors the alert rules link to, in file order.
fn alert_anchors() -> Vec<String> {
    read("deploy/prometheus/alerts.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: \"docs/runbook.md#"))
        .map(|rest| rest.trim_end_matches('"').to_string())
        .collect()
}

/// GitHub's anchor of a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            ' ' => Some('-'),
            _ => None,
        })
        .collect()
}

/// A `##` section: its anchor and text.
struct Section {
    anchor: String,
    text: String,
}

fn sections(doc: &str) -> Vec<Section> {
    let mut out: Vec<Section> = Vec::new();
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            out.push(Section {
                anchor: slug(h),
                text: String::new(),
            });
        } else if let Some(s) = out.last_mut() {
            s.text.push_str(line);
            s.text.push('\n');
        }
    }
    out
}

/// Every fenced block of `text`: (its info string, its lines without their indentation).
fn blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(String, usize, String)> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim_start();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix(FENCE) {
                    open = Some((info.trim().to_string(), indent, String::new()));
                }
            }
            Some((info, ind, body)) => {
                if trimmed == FENCE {
                    out.push((std::mem::take(info), std::mem::take(body)));
                    open = None;
                } else {
                    body.push_str(line.get((*ind).min(indent)..).unwrap_or(""));
                    body.push('\n');
                }
            }
        }
    }
    assert!(open.is_none(), "an unclosed code block");
    out
}

#[test]
fn every_alert_has_a_runbook_section_with_its_five_parts_and_runnable_commands() {
    let doc = read("docs/runbook.md");
    let sections = sections(&doc);
    let anchors = alert_anchors();
    assert!(
        anchors.len() >= 12,
        "alerts.yml names {} runbook anchors",
        anchors.len()
    );
    for anchor in &anchors {
        let s = sections
            .iter()
            .find(|s| &s.anchor == anchor)
            .unwrap_or_else(|| panic!("docs/runbook.md has no section #{anchor}"));
        let mut last = 0;
        for part in [
            "**Trigger.**",
            "**Immediate action.**",
            "**Owner.**",
            "**Escalation.**",
            "**Return to normal.**",
        ] {
            let at = s
                .text
                .find(part)
                .unwrap_or_else(|| panic!("#{anchor} has no {part}"));
            assert!(at >= last, "#{anchor}: {part} is out of order");
            last = at;
        }
        let action = &s.text[s.text.find("**Immediate action.**").unwrap()..];
        let action = &action[..action.find("**Owner.**").unwrap()];
        let back = &s.text[s.text.find("**Return to normal.**").unwrap()..];
        for (part, text) in [("immediate action", action), ("return to normal", back)] {
            assert!(
                blocks(text).iter().any(|(info, _)| info == TAG),
                "#{anchor}: its {part} shows no command"
            );
        }
        assert!(
            s.text.contains("P1"),
            "#{anchor}: its escalation names no P1"
        );
    }
    for s in &sections {
        assert!(
            s.anchor == "before-you-start" || anchors.contains(&s.anchor),
            "section #{} belongs to no alert",
            s.anchor
        );
    }
    // Every command shown is one the live test runs.
    for (info, body) in blocks(&doc) {
        assert_eq!(info, TAG, "an untested code block:\n{body}");
    }
}

/// A contact to work on: held (`WAIT_TIMEOUT`: sequence 1 missing), whose sequence-1 intent is
/// in the manual-review queue (`CONTACT_ON_HOLD`).
struct Scenario {
    contact: String,
    review: (i32, i64),
    consumed: bool,
}

async fn scenario(config: &Config, n: usize) -> Scenario {
    let contact = format!("rb-{n}");
    let api = api(config);
    produce_intents(config, &[intent(&format!("{contact}-2"), &contact, 2)]).await;
    wait_held(&api, &contact).await;
    produce_intents(config, &[intent(&format!("{contact}-1"), &contact, 1)]).await;
    let (p, o, _) = wait_review(config, &format!("{contact}-1"), ReviewReason::ContactOnHold).await;
    Scenario {
        contact,
        review: (p, o),
        consumed: false,
    }
}

/// A command no instance applies (its contact's partition has no owner): it stays pending.
async fn pending_command(config: &Config) -> i64 {
    let pool = causal_commit::store::postgres::pool(&config.postgres).unwrap();
    let state = causal_commit::store::snapshot::encode(
        &causal_commit::sequencer::ContactSnapshot::new("rb-unowned"),
    )
    .unwrap();
    sqlx::query(
        "INSERT INTO cc_contact (contact_id, topic, partition, batch_no, state, on_hold)
         VALUES ('rb-unowned', $1, 999, 0, $2, true) ON CONFLICT DO NOTHING",
    )
    .bind(&config.kafka.intents_topic)
    .bind(state)
    .execute(&pool)
    .await
    .unwrap();
    let r = api(config)
        .post(
            "/v1/contacts/rb-unowned/release",
            &serde_json::json!({ "actor": "runbook-test" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{r:?}");
    r.body["id"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runbook_command_runs_against_a_live_instance() {
    let mut env = TestEnv::new("runbook", 1).await;
    env.config.sequencer.wait_timeout = Duration::from_secs(2);
    with_admin(&mut env.config);
    let mut running = start(env.config());
    wait_ready(&api(&env.config), &mut running).await;
    let config_path = config_file(&env.config);
    let bin_dir = binary().parent().map(PathBuf::from).unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let doc = read("docs/runbook.md");
    let mut current: Option<Scenario> = None;
    let mut made = 0;
    for (i, (_, commands)) in blocks(&doc)
        .into_iter()
        .filter(|(info, _)| info == TAG)
        .enumerate()
    {
        let mutates = commands.contains("causal-commit release")
            || commands.contains("causal-commit resubmit");
        let needs = mutates || commands.contains("$CONTACT") || commands.contains("$REVIEW_");
        if needs && (current.is_none() || (mutates && current.as_ref().is_some_and(|s| s.consumed)))
        {
            made += 1;
            current = Some(scenario(&env.config, made).await);
        }
        let mut cmd = tokio::process::Command::new("bash");
        cmd.args(["-euo", "pipefail", "-c", &commands])
            .env("PATH", &path)
            .env("CAUSAL_COMMIT_CONFIG", &config_path)
            .env("CAUSAL_COMMIT_ADMIN_URL", crate::admin::url(&env.config))
            .env("CAUSAL_COMMIT_ADMIN_TOKEN", TOKEN)
            .env("CAUSAL_COMMIT_ACTOR", "runbook-test")
            .env("KAFKA_BROKERS", &env.config.kafka.brokers)
            .env("MANUAL_REVIEW_TOPIC", &env.config.kafka.manual_review_topic)
            .env("RUST_LOG", "warn");
        for (k, _) in std::env::vars() {
            if k.starts_with(causal_commit::config::ENV_PREFIX) {
                cmd.env_remove(k);
            }
        }
        if let Some(s) = &current {
            cmd.env("CONTACT", &s.contact)
                .env("SKIP_TO", "3")
                .env("REVIEW_PARTITION", s.review.0.to_string())
                .env("REVIEW_OFFSET", s.review.1.to_string());
        }
        if commands.contains("$COMMAND_ID") {
            cmd.env("COMMAND_ID", pending_command(&env.config).await.to_string());
        }
        let out = cmd.output().await.expect("bash runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "runbook block {i} failed:\n{commands}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
        if commands.contains("causal-commit reviews") {
            // Before the block's own release and re-submission: the item is listed where it
            // is, and re-submittable.
            let (p, o) = current.as_ref().unwrap().review;
            let listed = serde_json::Deserializer::from_str(&stdout)
                .into_iter::<serde_json::Value>()
                .filter_map(Result::ok)
                .filter_map(|doc| doc["items"].as_array().cloned())
                .flatten()
                .any(|i| i["partition"] == p && i["offset"] == o && i["resubmittable"] == true);
            assert!(
                listed,
                "the review listing misses the contact's item: {stdout}"
            );
        }
        if mutates {
            if let Some(s) = &mut current {
                s.consumed = true;
            }
        }
    }
    assert!(
        made >= 5,
        "the runbook's operator steps ran on {made} held contacts"
    );
    running.stop().await;
    // What the runbook's commands did is sound: no reopened decision without its audit row,
    // no skip without its release (slots left in manual review are pending work).
    let report = verify_allowing_waiting(&env.config).await;
    assert!(
        report.ok,
        "{}",
        serde_json::to_string_pretty(&report).unwrap()
    );
}
