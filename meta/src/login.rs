//! The Login half of Login Connect: what happens around Facebook Login rather than around
//! Messenger's webhooks.
//!
//! - [`login_id`]: computing a person's `login_id` from their app-scoped id with the app's
//!   client token. This is how Meta's official sample does it (`fbsamples/fblogin-sample`);
//!   Meta's reference documentation does not describe it, so the paths
//!   built on it are optional and off unless configured.
//! - [`event_signature`]: the signature scheme of `POST /login-events`, the endpoint the
//!   business's own backend calls right after a successful login.
//! - [`dialog`]: the manual Login dialog URL (`…/dialog/oauth?…&messenger_page_id=…`) and its
//!   JS SDK equivalent.
//! - [`signed_request`]: Meta's `signed_request` (the user data deletion callback).
//! - [`deletion`]: data deletion requests on the broker, their queue and confirmation codes.

pub mod deletion;
pub mod dialog;
pub mod event_signature;
pub mod login_id;
pub mod signed_request;
