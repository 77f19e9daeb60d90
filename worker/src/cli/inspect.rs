//! Read-mostly CLI commands: status, opt-ins, links, pages.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::graph::GraphClient;
use lc_meta::pages::PagesConfig;
use lc_shared::config::{AmqpArgs, DatabaseArgs};
use lc_shared::topology;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::CliError;

async fn client(db: &DatabaseArgs) -> Result<deadpool_postgres::Object, CliError> {
    let pool = lc_shared::db::pool(&db.database_url, 1)?;
    Ok(pool.get().await?)
}

fn ts(t: Option<OffsetDateTime>) -> Value {
    t.and_then(|t| t.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

/// `status`: what an operator looks at first.
pub async fn status(
    out: &mut dyn Write,
    db: &DatabaseArgs,
    amqp: &AmqpArgs,
    as_json: bool,
) -> Result<(), CliError> {
    let c = client(db).await?;
    let mut by_state = serde_json::Map::new();
    for r in c
        .query(
            "SELECT state, count(*) FROM optins GROUP BY state ORDER BY state",
            &[],
        )
        .await?
    {
        by_state.insert(r.get::<_, String>(0), json!(r.get::<_, i64>(1)));
    }
    let nearest: Option<OffsetDateTime> = c
        .query_one(
            concat!(
                "SELECT min(deadline) FROM optins WHERE state = ",
                lc_shared::state_sql!(pending)
            ),
            &[],
        )
        .await?
        .get(0);
    // Pauses are shared page state: what every replica obeys.
    let paused: Vec<String> = c
        .query(
            "SELECT page_id FROM page_state WHERE paused_reason IS NOT NULL ORDER BY page_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let outbox = c
        .query_one(
            "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::bigint, 0) \
             FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await?;
    let (unpublished, lag): (i64, i64) = (outbox.get(0), outbox.get(1));
    let conflicts: i64 = c
        .query_one("SELECT count(*) FROM link_conflicts", &[])
        .await?
        .get(0);

    let mut queues = serde_json::Map::new();
    match lc_shared::amqp::connect(
        amqp.endpoint().map_err(lc_shared::amqp::AmqpError::from)?,
        "loginconnect-cli",
    )
    .await
    {
        Ok(conn) => {
            let mut names = topology::inspectable_queues();
            names.extend(topology::WORK_QUEUES.iter().map(|(q, _)| (*q).to_owned()));
            for q in names {
                let ch = conn.create_channel().await?;
                let depth = ch
                    .queue_declare(
                        q.as_str().into(),
                        lapin::options::QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await
                    .map(|q| json!(q.message_count()))
                    .unwrap_or(Value::Null);
                // A failed passive declare has closed the channel already.
                if ch.status().connected() {
                    let _ = ch.close(200, "done".into()).await;
                }
                queues.insert(q, depth);
            }
            let _ = conn.close(200, "done".into()).await;
        }
        Err(e) => {
            queues.insert("error".into(), json!(e.to_string()));
        }
    }
    let report = json!({
        "optins_by_state": by_state,
        "nearest_pending_deadline": ts(nearest),
        "paused_pages": paused,
        "outbox": {"unpublished": unpublished, "oldest_unpublished_age_secs": lag},
        "link_conflicts": conflicts,
        "queues": queues,
    });
    if as_json {
        writeln!(out, "{report:#}")?;
        return Ok(());
    }
    writeln!(out, "opt-ins by state:")?;
    if by_state.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for (state, n) in &by_state {
        writeln!(out, "  {state:<10} {n}")?;
    }
    writeln!(
        out,
        "nearest pending deadline: {}",
        report["nearest_pending_deadline"].as_str().unwrap_or("-")
    )?;
    writeln!(
        out,
        "paused pages (invalid token, restricted, or by an operator): {}",
        if paused.is_empty() {
            "-".to_owned()
        } else {
            paused.join(", ")
        }
    )?;
    writeln!(out, "outbox: {unpublished} unpublished, oldest {lag} s")?;
    writeln!(out, "link conflicts: {conflicts}")?;
    writeln!(out, "queues (messages ready):")?;
    for (q, n) in &queues {
        writeln!(out, "  {q:<26} {n}")?;
    }
    Ok(())
}

/// `optin show`.
pub async fn optin_show(
    out: &mut dyn Write,
    db: &DatabaseArgs,
    page: &str,
    login_id: &str,
) -> Result<(), CliError> {
    let c = client(db).await?;
    let row = c
        .query_opt(
            "SELECT cycle, source, state, opted_in_at, deadline, send_at, attempts, \
                    next_attempt_at, lease_owner, message_id, sent_at, failure_reason, \
                    last_error_code, last_error_subcode, last_error_message, replied_at \
             FROM optins WHERE page_id = $1 AND login_id = $2",
            &[&page, &login_id],
        )
        .await?
        .ok_or_else(|| CliError::Other(format!("no opt-in for page {page} and that login_id")))?;
    let v = json!({
        "page_id": page, "login_id": login_id,
        "cycle": row.get::<_, i32>(0), "source": row.get::<_, String>(1),
        "state": row.get::<_, String>(2), "opted_in_at": ts(row.get(3)),
        "deadline": ts(row.get(4)), "send_at": ts(row.get(5)),
        "attempts": row.get::<_, i32>(6), "next_attempt_at": ts(row.get(7)),
        "lease_owner": row.get::<_, Option<String>>(8), "message_id": row.get::<_, Option<String>>(9),
        "sent_at": ts(row.get(10)), "failure_reason": row.get::<_, Option<String>>(11),
        "last_error": {"code": row.get::<_, Option<i64>>(12), "subcode": row.get::<_, Option<i64>>(13),
                       "message": row.get::<_, Option<String>>(14)},
        "replied_at": ts(row.get(15)),
    });
    writeln!(out, "{v:#}")?;
    Ok(())
}

/// `optin reset`.
pub async fn optin_reset(
    out: &mut dyn Write,
    db: &DatabaseArgs,
    page: &str,
    login_id: &str,
) -> Result<(), CliError> {
    let mut c = client(db).await?;
    let tx = c.transaction().await?;
    let sending: Option<String> = tx
        .query_opt(
            "SELECT state FROM optins WHERE page_id = $1 AND login_id = $2 FOR UPDATE",
            &[&page, &login_id],
        )
        .await?
        .map(|r| r.get(0));
    if sending.as_deref() == Some("sending") {
        return Err(CliError::Other(
            "a first message to this login_id is being sent right now; try again in a minute"
                .into(),
        ));
    }
    let optins = tx
        .execute(
            "DELETE FROM optins WHERE page_id = $1 AND login_id = $2",
            &[&page, &login_id],
        )
        .await?;
    let links = tx
        .execute(
            "DELETE FROM links WHERE page_id = $1 AND login_id = $2",
            &[&page, &login_id],
        )
        .await?;
    tx.commit().await?;
    writeln!(
        out,
        "reset: {optins} opt-in(s) and {links} link(s) deleted; the next opt-in starts afresh"
    )?;
    Ok(())
}

/// `link show`.
pub async fn link_show(
    out: &mut dyn Write,
    db: &DatabaseArgs,
    login_id: Option<&str>,
    psid: Option<&str>,
) -> Result<(), CliError> {
    let c = client(db).await?;
    let rows = match (login_id, psid) {
        (Some(l), _) => {
            c.query(
                "SELECT page_id, login_id, psid, linked_at, first_reply_mid FROM links WHERE login_id = $1",
                &[&l],
            )
            .await?
        }
        (None, Some(p)) => {
            c.query(
                "SELECT page_id, login_id, psid, linked_at, first_reply_mid FROM links WHERE psid = $1",
                &[&p],
            )
            .await?
        }
        (None, None) => return Err(CliError::Other("give --login-id or --psid".into())),
    };
    if rows.is_empty() {
        return Err(CliError::Other("no link found".into()));
    }
    for r in rows {
        let v = json!({
            "page_id": r.get::<_, String>(0), "login_id": r.get::<_, String>(1),
            "psid": r.get::<_, String>(2), "linked_at": ts(r.get(3)),
            "first_reply_mid": r.get::<_, Option<String>>(4),
        });
        writeln!(out, "{v}")?;
    }
    Ok(())
}

/// `pages check`.
pub async fn pages_check(
    out: &mut dyn Write,
    path: &Path,
    graph_url: &str,
    offline: bool,
) -> Result<(), CliError> {
    let pages = PagesConfig::load(path).map_err(|e| CliError::Other(e.to_string()))?;
    writeln!(
        out,
        "{}: {} page(s), valid",
        path.display(),
        pages.pages.len()
    )?;
    if offline {
        return Ok(());
    }
    let graph = GraphClient::new(graph_url, Duration::from_secs(10))
        .map_err(|e| CliError::Other(e.to_string()))?;
    let mut failed = 0;
    for page in &pages.pages {
        match graph.check_token(page).await {
            Ok(()) => writeln!(out, "  page {}: token works", page.id)?,
            Err(e) => {
                failed += 1;
                writeln!(out, "  page {}: token check failed: {e}", page.id)?;
            }
        }
    }
    if failed > 0 {
        return Err(CliError::Other(format!(
            "{failed} page token(s) do not work"
        )));
    }
    Ok(())
}
