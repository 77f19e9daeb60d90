//! The pages file imported into the registry: idempotent, safe to run from every replica.
//!
//! Rules (the README's "The pages file and the registry"): a page of the file that the
//! registry lacks is created; a page whose definition in the file changed since the last
//! import (its SHA-256 differs from the stored one) gets the file's definition; a page whose
//! definition did not change keeps the registry's (an API edit survives); a page that left
//! the file is kept and marked `in_file = false` (reported, deleted only by API or CLI).
//! Tokens are not imported: each replica reads them from its own file and environment.

use deadpool_postgres::Client;
use lc_meta::pages::PagesConfig;
use sha2::{Digest, Sha256};

use super::RegistryError;

/// Advisory lock serialising imports of replicas starting together ("lcpgimpt").
const IMPORT_LOCK_KEY: i64 = 0x6c63_7067_696d_7074;

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Pages created from the file.
    pub created: Vec<String>,
    /// Pages whose definition the file changed.
    pub updated: Vec<String>,
    /// Pages of the file already as the file says (or changed since through the API).
    pub unchanged: usize,
    /// Pages that were in the file at the previous import and are not any more (kept).
    pub left_file: Vec<String>,
}

/// The SHA-256 (hex) of a page's definition in the file: its first message as JSON.
fn definition_hash(first_message: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(first_message.to_string().as_bytes()))
}

/// Imports `file` into the registry in one transaction.
pub async fn import_file(
    client: &mut Client,
    file: &PagesConfig,
) -> Result<ImportReport, RegistryError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&IMPORT_LOCK_KEY])
        .await?;
    let mut report = ImportReport::default();
    let mut ids = Vec::with_capacity(file.pages.len());
    for page in &file.pages {
        let message = serde_json::to_value(&page.first_message)
            .map_err(|e| RegistryError::Invalid(format!("page {}: {e}", page.id)))?;
        let hash = definition_hash(&message);
        // `xmax = 0` tells an insert from an update; no row back: nothing changed.
        let row = tx
            .query_opt(
                "INSERT INTO pages (page_id, first_message, source, file_hash, in_file) \
                 VALUES ($1, $2, 'file', $3, true) \
                 ON CONFLICT (page_id) DO UPDATE SET \
                     first_message = CASE WHEN pages.file_hash IS DISTINCT FROM $3 \
                         THEN EXCLUDED.first_message ELSE pages.first_message END, \
                     file_hash = $3, in_file = true, updated_at = now() \
                 WHERE pages.file_hash IS DISTINCT FROM $3 OR NOT pages.in_file \
                 RETURNING xmax = 0",
                &[&page.id, &message, &hash],
            )
            .await?;
        match row.map(|r| r.get::<_, bool>(0)) {
            Some(true) => report.created.push(page.id.clone()),
            Some(false) => report.updated.push(page.id.clone()),
            None => report.unchanged += 1,
        }
        ids.push(page.id.as_str());
    }
    report.left_file = tx
        .query(
            "UPDATE pages SET in_file = false, updated_at = now() \
             WHERE in_file AND NOT page_id = ANY($1) RETURNING page_id",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.commit().await?;
    for page_id in &report.left_file {
        tracing::warn!(
            page_id,
            "page left the pages file: kept in the registry (no replica sends for it without a \
             stored token); delete it with `loginconnect pages delete` or the admin API"
        );
    }
    Ok(report)
}
