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

/// The services of a compose profile.
fn profile_services<'a>(
    services: &'a serde_json::Map<String, Value>,
    profile: &str,
) -> Vec<(&'a String, &'a Value)> {
    services
        .iter()
        .filter(|(_, def)| {
            def["profiles"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p == profile))
        })
        .collect()
}

/// `docker compose --profile cluster up`: three RabbitMQ nodes that find each other through
/// classic-config peer discovery (the nodes the config file lists are exactly the services'
/// hostnames, and they share one Erlang cookie), and a streaming replica of `postgres` copied
/// with `pg_basebackup -R` after the primary is healthy; the processes can be pointed at all
/// of them through `AMQP_URL` and `DATABASE_URL`, as the README shows.
#[test]
fn compose_cluster_profile_forms_a_cluster() {
    let doc = compose();
    let services = doc["services"].as_object().expect("services");
    let cluster = profile_services(services, "cluster");
    let rabbits: Vec<&(&String, &Value)> = cluster
        .iter()
        .filter(|(_, def)| {
            def["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("rabbitmq:"))
        })
        .collect();
    assert_eq!(
        rabbits.len(),
        3,
        "three RabbitMQ nodes in the cluster profile"
    );
    let volumes = doc["volumes"].as_object().expect("volumes");
    let mut hostnames = BTreeSet::new();
    let mut cookies = BTreeSet::new();
    let mut data_volumes = BTreeSet::new();
    let mut conf_files = BTreeSet::new();
    for (name, def) in &rabbits {
        let host = def["hostname"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has a fixed hostname (its node name)"));
        hostnames.insert(format!("rabbit@{host}"));
        cookies.insert(
            def["environment"]["RABBITMQ_ERLANG_COOKIE"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} sets the shared Erlang cookie"))
                .to_owned(),
        );
        assert!(def.get("healthcheck").is_some(), "{name} has a healthcheck");
        for mount in def["volumes"].as_array().expect("volumes") {
            let mount = mount.as_str().expect("short syntax");
            let (source, target) = mount.split_once(':').expect("source:target");
            if target.starts_with("/var/lib/rabbitmq") {
                assert!(
                    volumes.contains_key(source),
                    "{name}: volume {source} declared"
                );
                data_volumes.insert(source.to_owned());
            }
            if target.starts_with("/etc/rabbitmq/conf.d/") {
                conf_files.insert(source.trim_start_matches("./").to_owned());
            }
        }
    }
    assert_eq!(cookies.len(), 1, "one Erlang cookie for every node");
    assert_eq!(data_volumes.len(), 3, "each node keeps its own data");
    assert_eq!(
        conf_files.len(),
        1,
        "every node reads the same cluster config"
    );
    let conf = root(conf_files.first().expect("config"));
    let setting = |line: &str| {
        line.split_once('=')
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
    };
    let settings: Vec<(String, String)> = conf
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(setting)
        .collect();
    assert!(
        settings
            .iter()
            .any(|(k, v)| k == "cluster_formation.peer_discovery_backend" && v == "classic_config"),
        "classic-config peer discovery"
    );
    let listed: BTreeSet<String> = settings
        .iter()
        .filter(|(k, _)| k.starts_with("cluster_formation.classic_config.nodes."))
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(
        listed, hostnames,
        "the config lists exactly the three nodes"
    );

    // The replica: copied from the primary once it is healthy, then a hot standby.
    let replicas: Vec<&(&String, &Value)> = cluster
        .iter()
        .filter(|(_, def)| {
            def["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("postgres:"))
        })
        .collect();
    assert_eq!(
        replicas.len(),
        1,
        "one PostgreSQL replica in the cluster profile"
    );
    let (name, replica) = replicas[0];
    let script = replica["command"]
        .as_array()
        .expect("command")
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        script.contains("pg_basebackup")
            && script.contains(" -R")
            && script.contains("-h postgres "),
        "{name} copies the primary `postgres` with pg_basebackup -R: {script}"
    );
    assert_eq!(
        replica["depends_on"]["postgres"]["condition"], "service_healthy",
        "{name} waits for the primary"
    );
    assert!(
        replica.get("healthcheck").is_some(),
        "{name} has a healthcheck"
    );
    // The primary lets the replica connect for replication (the image's pg_hba.conf does not).
    let primary = &services["postgres"];
    let init: Vec<&str> = primary["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(Value::as_str)
        .filter(|m| m.contains(":/docker-entrypoint-initdb.d/"))
        .collect();
    assert_eq!(init.len(), 1, "the primary runs one init script");
    let script = root(
        init[0]
            .split(':')
            .next()
            .unwrap_or_default()
            .trim_start_matches("./"),
    );
    assert!(
        script.contains("host replication"),
        "the init script allows replication"
    );

    // The processes can be given every node; the README says how.
    let ingest = ingest_env(services, "AMQP_URL");
    assert!(
        ingest.starts_with("${AMQP_URL:-"),
        "AMQP_URL can be set for the cluster: {ingest}"
    );
    let scheduler = &services["scheduler"]["environment"]["DATABASE_URL"];
    assert!(
        scheduler
            .as_str()
            .is_some_and(|u| u.starts_with("${DATABASE_URL:-")),
        "DATABASE_URL can be set for the replica: {scheduler}"
    );
    let readme = root("README.md");
    let amqp = readme
        .lines()
        .find(|l| l.trim_start().starts_with("AMQP_URL=") && l.contains("rabbit-"))
        .expect("the README gives the cluster's AMQP_URL");
    for (_, def) in &rabbits {
        let host = def["hostname"].as_str().unwrap_or_default();
        assert!(
            amqp.contains(&format!("@{host}:5672/")),
            "README AMQP_URL names {host}"
        );
    }
    let db = readme
        .lines()
        .find(|l| l.trim_start().starts_with("DATABASE_URL=") && l.contains(name.as_str()))
        .expect("the README gives the DATABASE_URL with the replica");
    assert!(db.contains("target_session_attrs=read-write"), "{db}");
}

fn ingest_env<'a>(services: &'a serde_json::Map<String, Value>, var: &str) -> &'a str {
    services["ingest"]["environment"][var]
        .as_str()
        .unwrap_or_else(|| panic!("ingest sets {var}"))
}

/// The port of an `ADDR`-style setting (`0.0.0.0:9101` → `9101`).
fn port_of(addr: &str) -> u64 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr} ends with a port"))
}

/// `docker compose --profile monitoring up`: Prometheus and Grafana with their configuration
/// from `deploy/` (every bind mount exists in the repository), Prometheus scraping each of
/// our services on the port its `INGEST_ADMIN_ADDR`/`METRICS_ADDR` listens on (by DNS, so
/// every replica of `--scale` is found) with the rules file loaded, and Grafana provisioned
/// with a Prometheus data source on the `prometheus` service and the dashboard mounted where
/// its provider looks. `tests/tests/monitoring.rs` checks the dashboard and rules themselves.
#[test]
fn compose_monitoring_profile_scrapes_every_process() {
    let doc = compose();
    let services = doc["services"].as_object().expect("services");
    let monitoring = profile_services(services, "monitoring");
    let names: BTreeSet<&str> = monitoring.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["grafana", "prometheus"]));
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // (service, container path) → repository path, for every bind mount of the profile.
    let mut mounts = Vec::new();
    for (name, def) in &monitoring {
        for mount in def["volumes"].as_array().expect("volumes") {
            let mount = mount.as_str().expect("short syntax");
            let mut parts = mount.split(':');
            let (source, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if let Some(local) = source.strip_prefix("./") {
                assert!(
                    repo.join(local).exists(),
                    "{name} mounts {local}, which is not in the repository"
                );
                mounts.push((name.as_str(), target.to_owned(), local.to_owned()));
            } else {
                assert!(
                    doc["volumes"].get(source).is_some(),
                    "{name}: volume {source} declared"
                );
            }
        }
    }
    let in_container = |service: &str, path: &str| -> String {
        let (target, local) = mounts
            .iter()
            .filter(|(s, _, _)| *s == service)
            .find_map(|(_, t, l)| path.strip_prefix(t.as_str()).map(|rest| (rest, l)))
            .unwrap_or_else(|| panic!("{service}: nothing of the repository at {path}"));
        format!("{local}{target}")
    };
    let published = |service: &str, port: &str| {
        services[service]["ports"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == &format!("{port}:{port}")))
    };
    assert!(published("prometheus", "9090"), "Prometheus UI on 9090");
    assert!(published("grafana", "3000"), "Grafana on 3000");

    // Prometheus reads the repository's config; its rule files exist beside it.
    let flag = services["prometheus"]["command"]
        .as_array()
        .expect("command")
        .iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix("--config.file="))
        .expect("--config.file");
    let config_path = in_container("prometheus", flag);
    let config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&root(&config_path)).expect("prometheus.yml is YAML");
    let config = serde_json::to_value(config).expect("as JSON");
    let config_dir = std::path::Path::new(&config_path)
        .parent()
        .expect("dir")
        .to_owned();
    let rule_files = config["rule_files"].as_array().expect("rule_files");
    assert!(!rule_files.is_empty(), "the rules are loaded");
    for file in rule_files {
        let file = file.as_str().expect("path");
        assert!(
            repo.join(&config_dir).join(file).exists(),
            "rule file {file} beside prometheus.yml"
        );
    }
    // One job per process, on the port the process listens on.
    for (service, var) in [
        ("ingest", "INGEST_ADMIN_ADDR"),
        ("scheduler", "METRICS_ADDR"),
        ("correlator", "METRICS_ADDR"),
    ] {
        let addr = services[service]["environment"][var]
            .as_str()
            .unwrap_or_else(|| panic!("{service} sets {var}"));
        assert!(
            addr.starts_with("0.0.0.0:"),
            "{service}: {var}={addr} is reachable from prometheus"
        );
        let job = config["scrape_configs"]
            .as_array()
            .expect("scrape_configs")
            .iter()
            .find(|j| j["job_name"] == service)
            .unwrap_or_else(|| panic!("prometheus.yml scrapes {service}"));
        let sd = &job["dns_sd_configs"][0];
        assert_eq!(sd["names"], serde_json::json!([service]), "{service}");
        assert_eq!(
            sd["port"].as_u64(),
            Some(port_of(addr)),
            "{service}: {var}={addr}"
        );
    }

    // Grafana: the data source points at the prometheus service; the dashboard is mounted
    // where the provider reads.
    let provisioning = in_container("grafana", "/etc/grafana/provisioning");
    let read_yaml = |path: String| -> Value {
        serde_json::to_value(
            serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&root(&path))
                .unwrap_or_else(|e| panic!("{path}: {e}")),
        )
        .expect("as JSON")
    };
    let sources = read_yaml(format!("{provisioning}/datasources/prometheus.yml"));
    assert_eq!(sources["datasources"][0]["url"], "http://prometheus:9090");
    let providers = read_yaml(format!("{provisioning}/dashboards/loginconnect.yml"));
    let dir = providers["providers"][0]["options"]["path"]
        .as_str()
        .expect("provider path");
    let dashboard = in_container("grafana", &format!("{dir}/loginconnect.json"));
    let json: Value = serde_json::from_str(&root(&dashboard)).expect("dashboard JSON");
    assert_eq!(json["uid"], "loginconnect");
}
