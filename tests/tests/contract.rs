//! The event contract: every event the code can build (public and operational) satisfies the
//! JSON Schemas in `docs/schemas/`, the schemas are strict enough to catch drift, and the
//! AsyncAPI document names every routing key and schema.

use lc_shared::events::{
    CloudEvent, FirstMessageExpired, FirstMessageFailed, FirstMessageSent, GraphErrorData,
    IdentityDeleted, IdentityLinked, OperationalEvent, PagePaused, PageResumed, PausedReason,
    PublicEvent, ResumedBy, SubscriptionLost, SubscriptionRestored,
};
use lc_testkit::contract::{Contract, KINDS, schema_dir};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;

const SOURCE: &str = "/loginconnect/test";

/// What the outbox adds to a public event's CloudEvent: `appid` and `personseq`.
fn as_written(event: &PublicEvent) -> Value {
    let mut json = serde_json::to_value(event.to_cloudevent(SOURCE)).expect("serialise");
    json["appid"] = json!("default");
    json["personseq"] = json!(1);
    json
}

/// Wraps `event` in a CloudEvent exactly as the outbox does, serialises it and checks it
/// against the schemas; returns the JSON for further assertions.
fn validated(contract: &Contract, event: &PublicEvent) -> Value {
    let json = as_written(event);
    contract.assert_valid(&event.routing_key(), &json);
    json
}

/// One operational event of every kind and reason, as the outbox writes them (`appid`,
/// `data.app_id`, `pageseq`).
fn every_operational_event() -> Vec<(OperationalEvent, Value)> {
    let page = || "106283175398765".to_owned();
    let mut events: Vec<OperationalEvent> = [
        PausedReason::TokenInvalid,
        PausedReason::Restricted,
        PausedReason::Throttled,
        PausedReason::Operator,
    ]
    .into_iter()
    .flat_map(|reason| {
        [
            OperationalEvent::PagePaused(PagePaused {
                page_id: page(),
                app_id: String::new(),
                reason,
                since: at(),
                detail: Some("Graph error 190".into()),
            }),
            OperationalEvent::PageResumed(PageResumed {
                page_id: page(),
                app_id: String::new(),
                reason,
                resumed_by: ResumedBy::Operator,
                resumed_at: at(),
            }),
        ]
    })
    .collect();
    events.extend([
        OperationalEvent::PagePaused(PagePaused {
            page_id: page(),
            app_id: String::new(),
            reason: PausedReason::Restricted,
            since: at(),
            detail: None,
        }),
        OperationalEvent::PageResumed(PageResumed {
            page_id: page(),
            app_id: String::new(),
            reason: PausedReason::TokenInvalid,
            resumed_by: ResumedBy::NewToken,
            resumed_at: at(),
        }),
        OperationalEvent::PageResumed(PageResumed {
            page_id: page(),
            app_id: String::new(),
            reason: PausedReason::Throttled,
            resumed_by: ResumedBy::ThrottleEnded,
            resumed_at: at(),
        }),
        OperationalEvent::SubscriptionLost(SubscriptionLost {
            page_id: page(),
            app_id: String::new(),
            missing: vec!["app".into()],
            since: at(),
        }),
        OperationalEvent::SubscriptionRestored(SubscriptionRestored {
            page_id: page(),
            app_id: String::new(),
            lost_since: at(),
            restored_at: at(),
        }),
    ]);
    events
        .into_iter()
        .map(|event| {
            let mut json = serde_json::to_value(event.to_cloudevent(SOURCE)).expect("serialise");
            json["appid"] = json!("1029384756");
            json["data"]["app_id"] = json!("1029384756");
            json["pageseq"] = json!(3);
            (event, json)
        })
        .collect()
}

#[test]
fn every_operational_event_satisfies_its_schema() {
    let contract = Contract::load();
    let mut seen = std::collections::BTreeSet::new();
    for (event, json) in every_operational_event() {
        contract.assert_valid(&event.routing_key(), &json);
        assert_eq!(json["type"], event.cloudevent_type());
        assert_eq!(json["pageid"], event.page_id());
        seen.insert(event.kind());
        // An operational event is not a public one: no person, no personseq.
        let mut with_login = json.clone();
        with_login["data"]["login_id"] = json!("L");
        assert!(
            contract
                .validate(&event.routing_key(), &with_login)
                .is_err()
        );
        let mut without_app = json.clone();
        without_app["data"]["app_id"] = json!("");
        assert!(
            contract
                .validate(&event.routing_key(), &without_app)
                .is_err()
        );
    }
    assert_eq!(seen.len(), lc_shared::events::OPERATIONAL_KINDS.len());
    let (event, mut json) = every_operational_event().remove(0);
    json["data"]["reason"] = json!("bad_luck");
    assert!(contract.validate(&event.routing_key(), &json).is_err());
}

fn at() -> OffsetDateTime {
    datetime!(2023-11-14 22:13:20.123 UTC)
}

fn graph_error(code: Option<i64>, subcode: Option<i64>) -> GraphErrorData {
    GraphErrorData {
        code,
        subcode,
        message: "(#100) No matching user found".into(),
    }
}

/// One event of every type and every optional-field combination.
fn every_event() -> Vec<PublicEvent> {
    vec![
        PublicEvent::IdentityLinked(IdentityLinked {
            page_id: "106283175398765".into(),
            login_id: "AZx9LcLoginId_7f3e2a1b".into(),
            psid: "5934617289162083".into(),
            linked_at: at(),
            opted_in_at: Some(datetime!(2023-11-14 22:00:00 UTC)),
            first_reply_mid: Some("m_qr_0001".into()),
        }),
        PublicEvent::IdentityLinked(IdentityLinked {
            page_id: "1".into(),
            login_id: "L".into(),
            psid: "P".into(),
            linked_at: at(),
            opted_in_at: None,
            first_reply_mid: None,
        }),
        PublicEvent::FirstMessageSent(FirstMessageSent {
            page_id: "1".into(),
            login_id: "L".into(),
            message_id: "m_sent".into(),
            sent_at: at(),
            attempts: 1,
        }),
        PublicEvent::FirstMessageFailed(FirstMessageFailed {
            page_id: "1".into(),
            login_id: "L".into(),
            attempts: 1,
            reason: "graph_permanent".into(),
            last_error: Some(graph_error(Some(100), Some(2_018_001))),
        }),
        PublicEvent::FirstMessageFailed(FirstMessageFailed {
            page_id: "1".into(),
            login_id: "L".into(),
            attempts: 0,
            reason: "unknown_page".into(),
            last_error: None,
        }),
        PublicEvent::FirstMessageFailed(FirstMessageFailed {
            page_id: "1".into(),
            login_id: "L".into(),
            attempts: 3,
            reason: "outcome_unknown".into(),
            last_error: Some(graph_error(None, None)),
        }),
        PublicEvent::FirstMessageExpired(FirstMessageExpired {
            page_id: "1".into(),
            login_id: "L".into(),
            attempts: 7,
            deadline: at(),
            last_error: Some(graph_error(Some(2), None)),
        }),
        PublicEvent::FirstMessageExpired(FirstMessageExpired {
            page_id: "1".into(),
            login_id: "L".into(),
            attempts: 0,
            deadline: at(),
            last_error: None,
        }),
        PublicEvent::IdentityDeleted(IdentityDeleted {
            page_id: "1".into(),
            login_id: "L".into(),
            psid: Some("P".into()),
            deleted_at: at(),
            confirmation_code: "5f0c2a9e8b7d4c1e".into(),
        }),
        PublicEvent::IdentityDeleted(IdentityDeleted {
            page_id: "1".into(),
            login_id: "L".into(),
            psid: None,
            deleted_at: at(),
            confirmation_code: "5f0c2a9e8b7d4c1e".into(),
        }),
    ]
}

#[test]
fn every_event_type_satisfies_its_schema() {
    let contract = Contract::load();
    let mut seen = std::collections::BTreeSet::new();
    for event in every_event() {
        let json = validated(&contract, &event);
        assert_eq!(json["type"], event.cloudevent_type());
        assert_eq!(json["subject"], event.page_id());
        assert_eq!(json["pageid"], event.page_id());
        // The body round-trips into the model consumers would use.
        let back: CloudEvent = serde_json::from_value(json).expect("CloudEvent");
        assert_eq!(back.data, event.data());
        seen.insert(event.kind());
    }
    assert_eq!(seen.len(), lc_shared::events::PUBLIC_KINDS.len());
}

#[test]
fn every_failure_reason_the_scheduler_uses_is_documented() {
    let contract = Contract::load();
    for reason in [
        "graph_permanent",
        "unknown_page",
        "other_page",
        "outcome_unknown",
        "retries_exhausted",
    ] {
        validated(
            &contract,
            &PublicEvent::FirstMessageFailed(FirstMessageFailed {
                page_id: "1".into(),
                login_id: "L".into(),
                attempts: 1,
                reason: reason.into(),
                last_error: None,
            }),
        );
    }
}

/// A change that makes a valid event invalid.
type Mutation = Box<dyn Fn(&mut Value)>;

/// The schemas must reject what the code does not produce, or they document nothing.
#[test]
fn schemas_are_strict() {
    let contract = Contract::load();
    let event = every_event().remove(0);
    let good = as_written(&event);
    let key = event.routing_key();
    let key = key.as_str();

    let mutations: Vec<(&str, Mutation)> = vec![
        (
            "extra data field",
            Box::new(|v| v["data"]["extra"] = json!(1)),
        ),
        (
            "extra envelope attribute",
            Box::new(|v| v["extra"] = json!("x")),
        ),
        (
            "missing psid",
            Box::new(|v| {
                v["data"].as_object_mut().map(|o| o.remove("psid"));
            }),
        ),
        (
            "missing nullable field",
            Box::new(|v| {
                v["data"].as_object_mut().map(|o| o.remove("opted_in_at"));
            }),
        ),
        (
            "bad linked_at",
            Box::new(|v| v["data"]["linked_at"] = json!("yesterday")),
        ),
        (
            "numeric psid",
            Box::new(|v| v["data"]["psid"] = json!(5934617289162083_u64)),
        ),
        ("id not a uuid", Box::new(|v| v["id"] = json!("not-a-uuid"))),
        (
            "wrong specversion",
            Box::new(|v| v["specversion"] = json!("0.3")),
        ),
        (
            "type of another event",
            Box::new(|v| v["type"] = json!("com.loginconnect.first_message.sent")),
        ),
        (
            "missing pageid",
            Box::new(|v| {
                v.as_object_mut().map(|o| o.remove("pageid"));
            }),
        ),
        (
            "missing appid",
            Box::new(|v| {
                v.as_object_mut().map(|o| o.remove("appid"));
            }),
        ),
        (
            "pageid of another page than the routing key's",
            Box::new(|v| v["pageid"] = json!("1")),
        ),
        (
            "data.page_id of another page than the routing key's",
            Box::new(|v| v["data"]["page_id"] = json!("1")),
        ),
        (
            "pageid with a dot",
            Box::new(|v| v["pageid"] = json!("10628.3175398765")),
        ),
        (
            "missing time",
            Box::new(|v| {
                v.as_object_mut().map(|o| o.remove("time"));
            }),
        ),
    ];
    for (what, mutate) in mutations {
        let mut bad = good.clone();
        mutate(&mut bad);
        assert!(
            contract.validate(key, &bad).is_err(),
            "the schemas accept an event with {what}: {bad:#}"
        );
    }

    let mut unknown_reason = as_written(&PublicEvent::FirstMessageFailed(FirstMessageFailed {
        page_id: "1".into(),
        login_id: "L".into(),
        attempts: 1,
        reason: "graph_permanent".into(),
        last_error: Some(graph_error(Some(1), None)),
    }));
    contract
        .validate("first_message.failed.1", &unknown_reason)
        .expect("valid before the mutation");
    unknown_reason["data"]["reason"] = json!("bad_luck");
    assert!(
        contract
            .validate("first_message.failed.1", &unknown_reason)
            .is_err()
    );
    unknown_reason["data"]["reason"] = json!("graph_permanent");
    unknown_reason["data"]["last_error"]["fbtrace_id"] = json!("A1b2");
    assert!(
        contract
            .validate("first_message.failed.1", &unknown_reason)
            .is_err(),
        "last_error is strict too"
    );
    unknown_reason["data"]["last_error"] = json!(null);
    contract
        .validate("first_message.failed.1", &unknown_reason)
        .expect("valid again");
    for key in [
        "first_message.failed",
        "first_message.failed.2",
        "first_message.failed.1.1",
    ] {
        assert!(
            contract.validate(key, &unknown_reason).is_err(),
            "accepted under routing key {key}"
        );
    }
}

/// `personseq` (the per-person order, set by the outbox) is a positive 32-bit integer, the
/// CloudEvents `Integer` type, and nothing else.
#[test]
fn personseq_is_a_positive_integer() {
    let contract = Contract::load();
    for event in every_event() {
        let mut json = as_written(&event);
        json["personseq"] = json!(7);
        contract.assert_valid(&event.routing_key(), &json);
        let back: CloudEvent = serde_json::from_value(json.clone()).expect("CloudEvent");
        assert_eq!(back.personseq, Some(7), "the model reads it");
        for bad in [json!(0), json!("7"), json!(1.5), json!(2_147_483_648_i64)] {
            json["personseq"] = bad.clone();
            assert!(
                contract.validate(&event.routing_key(), &json).is_err(),
                "personseq {bad} accepted"
            );
        }
    }
}

/// The AsyncAPI document names the exchange, every routing key, message type and schema
/// file, and every file it references exists.
#[test]
fn asyncapi_document_covers_every_event() {
    let dir = schema_dir();
    let doc_path = dir.join("..").join("asyncapi.yaml");
    let doc = std::fs::read_to_string(&doc_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", doc_path.display()));
    assert!(doc.starts_with("asyncapi: 3.0.0"), "AsyncAPI 3.0.0");
    assert!(doc.contains("name: loginconnect.events"));
    assert!(doc.contains("type: topic"));
    assert!(doc.contains("durable: true"));
    assert!(doc.contains("traceparent:"));
    assert!(doc.contains("$ref: './schemas/cloudevent.json'"));
    assert!(
        doc.contains("Migrating a binding"),
        "says how to migrate a binding"
    );
    for key in KINDS {
        assert!(
            doc.contains(&format!("address: '{key}.{{pageId}}'\n")),
            "channel for {key}"
        );
        assert!(
            doc.contains(&format!("messageType: com.loginconnect.{key}\n")),
            "AMQP type of {key}"
        );
        assert!(
            doc.contains(&format!("$ref: './schemas/{key}.json'")),
            "data schema of {key}"
        );
    }
    for line in doc.lines() {
        if let Some(rest) = line.trim().strip_prefix("$ref: './") {
            let file = rest.trim_end_matches('\'');
            let path = dir.join("..").join(file);
            assert!(
                path.exists(),
                "{} is referenced but missing",
                path.display()
            );
        }
    }
}

/// Every example in the AsyncAPI document satisfies the schemas, under the routing key of
/// the channel that carries it, and each message's payload names its own type and schema.
#[test]
fn asyncapi_examples_satisfy_the_schemas() {
    let contract = Contract::load();
    let path = schema_dir().join("..").join("asyncapi.yaml");
    let text = std::fs::read_to_string(&path).expect("read asyncapi.yaml");
    let doc: Value = serde_yaml_ng::from_str(&text).expect("asyncapi.yaml is YAML");
    let channels = doc["channels"].as_object().expect("channels");
    let mut checked = 0;
    for channel in channels.values() {
        let address = channel["address"].as_str().expect("channel address");
        let key = address
            .strip_suffix(".{pageId}")
            .unwrap_or_else(|| panic!("address {address} ends in the page"));
        assert!(KINDS.contains(&key), "unknown routing key {key}");
        assert_eq!(
            channel["parameters"]["pageId"]["$ref"],
            "#/components/parameters/pageId"
        );
        assert_eq!(
            channel["bindings"]["amqp"]["$ref"], "#/components/channelBindings/eventsExchange",
            "{key} is on loginconnect.events"
        );
        for message_ref in channel["messages"].as_object().expect("messages").values() {
            let name = message_ref["$ref"]
                .as_str()
                .and_then(|r| r.strip_prefix("#/components/messages/"))
                .expect("message $ref");
            let message = &doc["components"]["messages"][name];
            assert_eq!(message["name"], key);
            assert_eq!(
                message["bindings"]["amqp"]["messageType"],
                format!("com.loginconnect.{key}")
            );
            let extra = &message["payload"]["allOf"][1]["properties"];
            assert_eq!(extra["type"]["const"], format!("com.loginconnect.{key}"));
            assert_eq!(extra["data"]["$ref"], format!("./schemas/{key}.json"));
            let examples = message["examples"].as_array().expect("examples");
            assert!(!examples.is_empty(), "{key} has an example");
            for example in examples {
                let page = example["payload"]["pageid"].as_str().expect("pageid");
                contract.assert_valid(&format!("{key}.{page}"), &example["payload"]);
                checked += 1;
            }
        }
    }
    assert_eq!(channels.len(), KINDS.len(), "one channel per event kind");
    assert!(checked >= KINDS.len());
    let exchange = &doc["components"]["channelBindings"]["eventsExchange"]["exchange"];
    assert_eq!(exchange["name"], lc_shared::topology::EVENTS_EXCHANGE);
    assert_eq!(exchange["type"], "topic");
    assert_eq!(exchange["durable"], true);
}
