//! The deployment artefacts and the documentation checked against the code, because Docker
//! cannot run here and a configuration table that drifts from the code misleads operators.

use std::collections::BTreeSet;

use clap::CommandFactory;
use serde_json::Value;

fn root(path: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// The environment variables a clap command reads, visible or hidden.
fn env_vars(cmd: &clap::Command) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for arg in cmd.get_arguments() {
        if let Some(env) = arg.get_env() {
            out.insert(env.to_string_lossy().into_owned());
        }
    }
    for sub in cmd.get_subcommands() {
        out.extend(env_vars(sub));
    }
    out
}

fn hidden_env_vars(cmd: &clap::Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter(|a| a.is_hide_set())
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect()
}

fn binaries() -> Vec<(&'static str, clap::Command)> {
    vec![
        ("ingest", lc_ingest::IngestConfig::command()),
        (
            "scheduler",
            lc_worker::scheduler::SchedulerConfig::command(),
        ),
        (
            "correlator",
            lc_worker::correlator::CorrelatorConfig::command(),
        ),
        ("loginconnect", lc_worker::cli::Cli::command()),
    ]
}

/// Variables read outside clap (logging, OpenTelemetry's standard ones).
const EXTERNAL: &[&str] = &["RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT"];

fn compose() -> Value {
    let mut yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&root("docker-compose.yml")).expect("docker-compose.yml is YAML");
    yaml.apply_merge().expect("merge keys resolve");
    serde_json::to_value(yaml).expect("as JSON")
}

#[test]
fn compose_file_follows_the_compose_specification() {
    let schema: Value =
        serde_json::from_str(&root("tests/data/compose_spec.json")).expect("schema");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let doc = compose();
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "docker-compose.yml: {errors:#?}");
    // The schema really constrains the file: a wrong type is caught.
    let mut broken = doc.clone();
    broken["services"]["ingest"]["ports"] = Value::from(8080);
    assert!(
        !validator.is_valid(&broken),
        "a broken file must not validate"
    );
}

#[test]
fn compose_services_match_what_the_binaries_read() {
    let doc = compose();
    let services = doc["services"].as_object().expect("services");
    for name in [
        "rabbitmq",
        "postgres",
        "migrate",
        "ingest",
        "scheduler",
        "correlator",
    ] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    let dockerfile = root("Dockerfile");
    let bins = binaries();
    for (service, def) in services {
        // Third-party services (broker, database, collector) are not ours to check.
        if def["image"] != "loginconnect:latest" {
            assert!(
                def.get("build").is_none(),
                "{service} builds this repo but is not tagged loginconnect:latest"
            );
            continue;
        }
        let command = def["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{service} names its role"));
        let binary = command[0].as_str().expect("command is strings");
        let (_, cmd) = bins
            .iter()
            .find(|(b, _)| *b == binary)
            .unwrap_or_else(|| panic!("service {service} runs unknown binary {binary}"));
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "the image does not contain {binary}"
        );
        let known = env_vars(cmd);
        if let Some(env) = def["environment"].as_object() {
            for var in env.keys() {
                assert!(
                    known.contains(var) || EXTERNAL.contains(&var.as_str()),
                    "service {service} sets {var}, which {binary} does not read"
                );
            }
        }
        if let Some(test) = def["healthcheck"]["test"].as_array() {
            let probe: Vec<&str> = test.iter().filter_map(Value::as_str).collect();
            assert_eq!(&probe[..3], &["CMD", "loginconnect", "probe"], "{service}");
            let port = probe[3]
                .rsplit(':')
                .next()
                .and_then(|p| p.split('/').next())
                .expect("port");
            let addr_var = if binary == "ingest" {
                "INGEST_ADDR"
            } else {
                "METRICS_ADDR"
            };
            let addr = def["environment"][addr_var]
                .as_str()
                .unwrap_or_else(|| panic!("{service} sets {addr_var}"));
            assert!(
                addr.ends_with(&format!(":{port}")),
                "{service}: healthcheck port {port} vs {addr_var}={addr}"
            );
        }
        if let Some(deps) = def["depends_on"].as_object() {
            for (dep, cond) in deps {
                assert!(
                    services.contains_key(dep),
                    "{service} depends on unknown {dep}"
                );
                let c = cond["condition"].as_str().unwrap_or("");
                let has_check = services[dep].get("healthcheck").is_some();
                assert!(
                    (c == "service_healthy" && has_check) || c == "service_completed_successfully",
                    "{service} waits for {dep} with {c}"
                );
            }
        }
    }
    // Required settings are given; published ports match the listen address.
    let ingest = &services["ingest"];
    for var in ["META_APP_SECRETS", "META_VERIFY_TOKEN", "AMQP_URL"] {
        assert!(ingest["environment"][var].is_string(), "ingest needs {var}");
    }
    let port = ingest["environment"]["INGEST_ADDR"]
        .as_str()
        .expect("addr")
        .rsplit(':')
        .next()
        .expect("port");
    assert!(
        ingest["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.ends_with(&format!(":{port}"))))
    );
    let scheduler = &services["scheduler"];
    let pages = scheduler["environment"]["PAGES_FILE"]
        .as_str()
        .expect("PAGES_FILE");
    assert!(
        scheduler["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v.as_str().is_some_and(|v| v.contains(&format!(":{pages}")))),
        "the pages file is mounted where PAGES_FILE points"
    );
    for worker in ["scheduler", "correlator"] {
        assert!(
            services[worker].get("ports").is_none(),
            "{worker} must scale with --scale: no fixed host port"
        );
    }
}

#[test]
fn readme_configuration_tables_match_the_code() {
    let readme = root("README.md");
    let documented: BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1))
        .filter(|v| {
            v.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_owned)
        .collect();
    let mut in_code = BTreeSet::new();
    let mut hidden = BTreeSet::new();
    for (_, cmd) in binaries() {
        in_code.extend(env_vars(&cmd));
        hidden.extend(hidden_env_vars(&cmd));
    }
    let undocumented: Vec<&String> = in_code
        .difference(&documented)
        .filter(|v| !hidden.contains(*v))
        .collect();
    assert!(
        undocumented.is_empty(),
        "variables read by the code but missing from the README: {undocumented:?}"
    );
    let unknown: Vec<&String> = documented
        .iter()
        .filter(|v| !in_code.contains(*v) && !EXTERNAL.contains(&v.as_str()) && *v != "LOG_FORMAT")
        .collect();
    assert!(
        unknown.is_empty(),
        "variables in the README that no binary reads: {unknown:?}"
    );
}
