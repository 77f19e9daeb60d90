//! `login-url`: the manual Facebook Login dialog URL for Login Connect, with its JS SDK
//! equivalent (built by [`lc_meta::login::dialog`]).

use std::io::Write;

use lc_meta::login::dialog::{DEFAULT_DIALOG_VERSION, LoginDialog};
use serde_json::json;

use super::CliError;

/// Arguments of `loginconnect login-url`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoginUrlArgs {
    /// The Login app id (`client_id`).
    #[arg(long = "app-id")]
    pub app_id: String,
    /// Where Facebook sends the person back; must be a valid OAuth redirect URI of the app.
    #[arg(long = "redirect-uri")]
    pub redirect_uri: String,
    /// The Page the person opts in to message with (`messenger_page_id`).
    #[arg(long = "page-id")]
    pub page_id: String,
    /// Extra permissions, comma-separated or repeated (`user_messenger_contact` is always
    /// added, once).
    #[arg(long = "scope")]
    pub scope: Vec<String>,
    /// The CSRF `state` to put in the URL (default: a random one, printed).
    #[arg(long)]
    pub state: Option<String>,
    /// Add `reset_messenger_state=1` to re-trigger the opt-in (app-role users only).
    #[arg(long = "reset-messenger-state")]
    pub reset_messenger_state: bool,
    /// Dialog version.
    #[arg(long = "api-version", default_value = DEFAULT_DIALOG_VERSION)]
    pub api_version: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Warning printed with `--reset-messenger-state` (Meta's rule, LC-FAQ / LC-impl).
pub const RESET_WARNING: &str = "warning: reset_messenger_state=1 re-triggers the Messenger \
    opt-in only for people with a role in the app (admins, developers, testers); for everyone \
    else it has no effect. Use it in development only.";

/// Prints the dialog URL (first line, alone, for scripts), its `state`, and the JS SDK call.
/// The reset warning goes to stderr so a script reading stdout gets only the output.
pub fn login_url(out: &mut dyn Write, args: &LoginUrlArgs) -> Result<(), CliError> {
    let dialog = LoginDialog {
        app_id: args.app_id.trim().to_owned(),
        redirect_uri: args.redirect_uri.clone(),
        page_id: args.page_id.trim().to_owned(),
        scopes: args.scope.clone(),
        state: args.state.clone(),
        reset_messenger_state: args.reset_messenger_state,
        api_version: args.api_version.clone(),
    };
    let link = dialog.build().map_err(|e| CliError::Other(e.to_string()))?;
    if args.reset_messenger_state {
        eprintln!("{RESET_WARNING}");
    }
    if args.json {
        let value = json!({
            "url": link.url.as_str(),
            "state": link.state,
            "scope": link.scope,
            "reset_messenger_state": args.reset_messenger_state,
            "js_snippet": link.js_snippet,
        });
        writeln!(out, "{value:#}")?;
        return Ok(());
    }
    writeln!(out, "{}", link.url)?;
    writeln!(out)?;
    writeln!(
        out,
        "state: {} (check that the redirect brings the same value back)",
        link.state
    )?;
    writeln!(out, "scope: {}", link.scope)?;
    writeln!(out)?;
    writeln!(out, "JS SDK equivalent:")?;
    writeln!(out, "{}", link.js_snippet)?;
    Ok(())
}
