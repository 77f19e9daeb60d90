//! The life of an opt-in as the database stores it and the public events announce it: its
//! [`OptinState`] and, for `failed`, its [`FailureReason`].
//!
//! SQL text keeps the states as literals (the partial indexes on `state = 'pending'` are only
//! used when the planner sees the literal, not a parameter), so queries spell them through
//! [`crate::state_sql!`], which expands to the quoted literal at compile time; a test checks
//! that it agrees with [`OptinState::as_str`] for every state.

use std::error::Error;
use std::fmt;
use std::str::FromStr;

use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

/// Where an opt-in is in its life. `sent`, `replied`, `failed` and `expired` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OptinState {
    /// Waiting for its send time (or a retry).
    Pending,
    /// Claimed under a lease by one worker, whose call may be in flight.
    Sending,
    /// The first message was accepted by the Send API.
    Sent,
    /// The person replied before anything was sent (announced by `identity.linked`).
    Replied,
    /// Given up; the [`FailureReason`] says why.
    Failed,
    /// The window closed before a message could be sent.
    Expired,
}

impl OptinState {
    /// Every state, in the order of an opt-in's life.
    pub const ALL: [OptinState; 6] = [
        Self::Pending,
        Self::Sending,
        Self::Sent,
        Self::Replied,
        Self::Failed,
        Self::Expired,
    ];
    /// The terminal states.
    pub const TERMINAL: [OptinState; 4] = [Self::Sent, Self::Replied, Self::Failed, Self::Expired];

    /// The value stored in `optins.state` and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Replied => "replied",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    /// True for the states an opt-in never leaves.
    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }
}

impl fmt::Display for OptinState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored state or failure reason this version does not know (a newer schema, a hand edit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown opt-in state or failure reason {0:?} in the database (is a newer version of loginconnect writing to it?)"
)]
pub struct UnknownState(pub String);

impl FromStr for OptinState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// The quoted SQL literal of an [`OptinState`], for `concat!` into query text:
/// `concat!("… WHERE state = ", state_sql!(pending), " …")`.
#[macro_export]
macro_rules! state_sql {
    (pending) => {
        "'pending'"
    };
    (sending) => {
        "'sending'"
    };
    (sent) => {
        "'sent'"
    };
    (replied) => {
        "'replied'"
    };
    (failed) => {
        "'failed'"
    };
    (expired) => {
        "'expired'"
    };
}

/// Why an opt-in ended `failed`: the `reason` of `first_message.failed` and of
/// `optins.failure_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// Graph refused the message for good (invalid recipient, outside the window, …).
    GraphPermanent,
    /// The opt-in names a page this deployment has no configuration for.
    UnknownPage,
    /// Another page already messaged this login_id (one page per login_id).
    OtherPage,
    /// A call may have reached Graph but its answer was lost (policy `fail`).
    OutcomeUnknown,
    /// The attempt limit was reached before a message got through.
    RetriesExhausted,
}

impl FailureReason {
    /// Every reason.
    pub const ALL: [FailureReason; 5] = [
        Self::GraphPermanent,
        Self::UnknownPage,
        Self::OtherPage,
        Self::OutcomeUnknown,
        Self::RetriesExhausted,
    ];

    /// The value in events and in `optins.failure_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GraphPermanent => "graph_permanent",
            Self::UnknownPage => "unknown_page",
            Self::OtherPage => "other_page",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::RetriesExhausted => "retries_exhausted",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Both enums travel to and from PostgreSQL as their `as_str()` text, so query parameters
/// and columns are typed on our side and stay plain `text` in the schema.
macro_rules! text_sql {
    ($ty:ty, $parse:expr) => {
        impl ToSql for $ty {
            fn to_sql(
                &self,
                ty: &Type,
                out: &mut BytesMut,
            ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
                self.as_str().to_sql(ty, out)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as ToSql>::accepts(ty)
            }

            to_sql_checked!();
        }

        impl<'a> FromSql<'a> for $ty {
            fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
                let text = <&str as FromSql>::from_sql(ty, raw)?;
                let parse: fn(&str) -> Result<$ty, UnknownState> = $parse;
                Ok(parse(text)?)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as FromSql>::accepts(ty)
            }
        }
    };
}

/// Both serialise as their `as_str()` text, as events and the admin API show them.
macro_rules! text_serde {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

text_serde!(OptinState);
text_serde!(FailureReason);

text_sql!(OptinState, str::parse);
text_sql!(FailureReason, |s| {
    FailureReason::ALL
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| UnknownState(s.to_owned()))
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_literals_agree_with_the_states() {
        let literals = [
            state_sql!(pending),
            state_sql!(sending),
            state_sql!(sent),
            state_sql!(replied),
            state_sql!(failed),
            state_sql!(expired),
        ];
        for (state, literal) in OptinState::ALL.into_iter().zip(literals) {
            assert_eq!(literal, format!("'{}'", state.as_str()));
            assert_eq!(state.as_str().parse::<OptinState>(), Ok(state));
        }
        assert!("paused".parse::<OptinState>().is_err());
    }

    #[test]
    fn terminal_states_are_the_last_four() {
        let terminal: Vec<_> = OptinState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal, OptinState::TERMINAL);
    }
}
