//! `roster environments set`: an environment's settings (allowed browser origins, what Flagsmith's
//! identities endpoint shows client keys), through a running server's admin API or directly on
//! the store.

use anyhow::Context;
use clap::Args;
use roster_engine::{EngineConfig, Principal};
use serde_json::{Map, Value, json};

use crate::{StoreArgs, open_engine};

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The environment's slug.
    slug: String,
    /// Browser origins allowed to call the client endpoints, comma-separated
    /// (`https://app.example.com,http://localhost:3000`); `*` for any, `none` for none.
    #[arg(long)]
    allowed_origins: Option<String>,
    /// Whether Flagsmith's identities endpoint answers client keys with stored traits.
    #[arg(long)]
    flagsmith_client_key_reads_traits: Option<bool>,
    /// A running Roster's base URL; without it the store is changed directly.
    #[arg(long, env = "ROSTER_URL")]
    url: Option<String>,
    /// The admin token (with `--url`).
    #[arg(long, env = "ROSTER_ADMIN_TOKEN")]
    admin_token: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

/// The settings patch the flags describe.
fn patch(args: &SetArgs) -> anyhow::Result<Map<String, Value>> {
    let mut patch = Map::new();
    if let Some(origins) = &args.allowed_origins {
        let list: Vec<&str> = match origins.trim() {
            "none" | "" => Vec::new(),
            listed => listed.split(',').map(str::trim).filter(|origin| !origin.is_empty()).collect(),
        };
        patch.insert("allowed_origins".into(), json!(list));
    }
    if let Some(reads) = args.flagsmith_client_key_reads_traits {
        patch.insert("flagsmith_client_key_reads_traits".into(), json!(reads));
    }
    anyhow::ensure!(
        !patch.is_empty(),
        "name a setting to change: --allowed-origins or --flagsmith-client-key-reads-traits"
    );
    Ok(patch)
}

pub async fn set(args: SetArgs) -> anyhow::Result<()> {
    let patch = patch(&args)?;
    let settings = match &args.url {
        Some(url) => {
            let token = args.admin_token.as_deref().context("--url needs --admin-token (or ROSTER_ADMIN_TOKEN)")?;
            let response = reqwest::Client::new()
                .patch(format!("{}/v1/admin/environments/{}", url.trim_end_matches('/'), args.slug))
                .header("X-API-Key", token)
                .json(&json!({ "settings": patch }))
                .send()
                .await
                .with_context(|| format!("cannot reach {url}"))?;
            let status = response.status();
            let body: Value = response.json().await.context("the server's answer is not JSON")?;
            anyhow::ensure!(
                status.is_success(),
                "{} ({})",
                body["message"].as_str().unwrap_or("the change was refused"),
                body["code"].as_str().unwrap_or("")
            );
            body["settings"].clone()
        }
        None => {
            // Whoever can open the store holds every key's secrets anyway: the admin's rights.
            let engine = open_engine(&args.store, EngineConfig::default()).await?;
            let environment = engine
                .update_environment_settings(&Principal::Admin, &args.slug, &patch)
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            serde_json::to_value(&environment.settings)?
        }
    };
    println!("{}", serde_json::to_string_pretty(&json!({ "slug": args.slug, "settings": settings }))?);
    Ok(())
}
