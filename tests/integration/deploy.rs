//! The deployment files are checked with what can run here: every YAML file parses, every
//! configuration they set is loaded through the program's own configuration loader, and the
//! Helm chart, rendered by Helm itself, passes the same checks as `deploy/k8s/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use product_sync::config::{self, Settings, Sources};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every document of a YAML file, as JSON, with merge keys (`<<: *anchor`) applied.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_documents(&text, path)
}

fn yaml_documents(text: &str, path: &Path) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| {
            let mut value = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

fn load(vars: &HashMap<String, String>) -> Settings {
    config::load(&Sources {
        dir: Some(repo().join("config")),
        env_name: None,
        file: None,
        vars: Some(vars.clone()),
    })
    .unwrap_or_else(|e| panic!("the deployment's configuration is refused: {e}"))
}

fn string_map(v: &Value) -> HashMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = vec![
        repo().join("deploy/docker-compose.yml"),
        repo().join("deploy/observability/alerts.yaml"),
        repo().join("deploy/observability/alerts.test.yaml"),
        repo().join("deploy/helm/product-sync/Chart.yaml"),
        repo().join("deploy/helm/product-sync/values.yaml"),
    ];
    for entry in std::fs::read_dir(repo().join("deploy/k8s")).unwrap() {
        files.push(entry.unwrap().path());
    }
    for f in &files {
        assert!(!documents(f).is_empty(), "{} is empty", f.display());
    }
    assert!(files.len() >= 11);
}

#[test]
fn compose_instances_use_keys_the_program_accepts() {
    let compose = &documents(&repo().join("deploy/docker-compose.yml"))[0];
    let services = compose["services"].as_object().unwrap();
    for name in [
        "kafka",
        "postgres",
        "simulator",
        "product-sync-1",
        "product-sync-2",
    ] {
        assert!(services.contains_key(name), "compose lacks {name}");
    }
    for name in ["product-sync-1", "product-sync-2"] {
        let env = string_map(&services[name]["environment"]);
        assert!(env.keys().all(|k| k.starts_with("PRODUCT_SYNC")), "{env:?}");
        let s = load(&env);
        assert_eq!(s.kafka.bootstrap_servers, "kafka:9092");
        assert_eq!(s.upstream.base_url, "http://simulator:8080");
        assert!(s.governance.enabled);
    }
    let sim = services["simulator"]["command"].as_array().unwrap();
    assert_eq!(sim[0], "simulate");
}

/// The objects of a deployment, found by kind.
struct Objects(Vec<Value>);

impl Objects {
    fn kind(&self, kind: &str) -> Value {
        self.0
            .iter()
            .find(|o| o["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} among the objects"))
    }

    fn has(&self, kind: &str) -> bool {
        self.0.iter().any(|o| o["kind"] == kind)
    }
}

#[test]
fn kubernetes_manifests_agree_with_the_configuration() {
    let mut objects = Vec::new();
    for entry in std::fs::read_dir(repo().join("deploy/k8s")).unwrap() {
        objects.extend(documents(&entry.unwrap().path()));
    }
    check_objects(&Objects(objects));
}

/// What every deployment of product-sync must hold: the settings load (with production's TLS
/// everywhere), the pod outlasts its shutdown, probes and ports match, the selectors agree.
fn check_objects(o: &Objects) {
    let doc = |kind: &str| o.kind(kind);
    let configmap = doc("ConfigMap");
    let secret = doc("Secret");
    let mut env = string_map(&configmap["data"]);
    env.extend(string_map(&secret["stringData"]));
    let s = load(&env);

    let deployment = doc("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    assert!(
        grace > s.pipeline.drain_timeout + s.pipeline.shutdown_timeout,
        "the grace period must outlast the drain and the shutdown steps"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        container["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(s.http.listen.port()))
    );
    let refs: Vec<&str> = container["envFrom"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| {
            r["configMapRef"]["name"]
                .as_str()
                .or(r["secretRef"]["name"].as_str())
        })
        .collect();
    assert!(refs.contains(&configmap["metadata"]["name"].as_str().unwrap()));
    assert!(refs.contains(&secret["metadata"]["name"].as_str().unwrap()));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["automountServiceAccountToken"], false);

    // Production talks TLS to everything (the settings were loaded with production.toml).
    assert!(s.kafka.require_tls && s.database.require_tls);
    assert_eq!(
        s.kafka.librdkafka.get("security.protocol"),
        Some("sasl_ssl")
    );
    assert!(s.upstream.base_url.starts_with("https://"));
    assert!(s.governance.base_url.starts_with("https://"));
    assert!(!s.upstream.allow_http && !s.governance.allow_http);
    let policy = doc("NetworkPolicy");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let egress_ports: Vec<u64> = policy["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_array().unwrap().iter())
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert!(
        !egress_ports.contains(&9092),
        "no plaintext Kafka: {egress_ports:?}"
    );
    for port in [53, 9093, 5432, 443] {
        assert!(
            egress_ports.contains(&port),
            "egress to {port}: {egress_ports:?}"
        );
    }
    let brokers = s.kafka.bootstrap_servers.split(',');
    assert!(brokers.into_iter().all(|b| b.ends_with(":9093")));

    let keda = doc("ScaledObject");
    let trigger = &keda["spec"]["triggers"][0]["metadata"];
    assert_eq!(trigger["topic"], s.topics.requests.as_str());
    assert_eq!(trigger["consumerGroup"], s.kafka.group_id.as_str());
    assert!(
        keda["spec"]["maxReplicaCount"].as_i64().unwrap() <= i64::from(s.topics.partitions),
        "never more replicas than partitions"
    );
    assert_eq!(
        doc("PodDisruptionBudget")["spec"]["selector"],
        deployment["spec"]["selector"]
    );
    assert_eq!(
        doc("Service")["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

/// The Helm binary the tests use: `PRODUCT_SYNC_HELM`, else the one `deploy/local/tools.sh`
/// builds.
fn helm() -> PathBuf {
    let path = std::env::var_os("PRODUCT_SYNC_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("PRODUCT_SYNC_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/product-sync")
                });
            cache.join("helm-v3.22.0/helm")
        });
    assert!(
        path.exists(),
        "Helm is not built at {}: run `deploy/local/tools.sh up` (or set PRODUCT_SYNC_HELM)",
        path.display()
    );
    path
}

/// `helm template` of the chart with these values files, as JSON documents.
fn helm_template(values: &[&Path]) -> Objects {
    let chart = repo().join("deploy/helm/product-sync");
    let mut command = std::process::Command::new(helm());
    command.arg("template").arg("product-sync").arg(&chart);
    for v in values {
        command.arg("--values").arg(v);
    }
    let out = command.output().expect("run helm template");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let docs = yaml_documents(&text, &chart)
        .into_iter()
        .filter(|d| !d.is_null())
        .collect();
    Objects(docs)
}

#[test]
fn the_helm_chart_renders_objects_that_agree_with_the_configuration() {
    let k8s = repo().join("deploy/k8s");
    // The Secret's values of deploy/k8s (placeholders) and KEDA on: every object rendered.
    let secret = documents(&k8s.join("secret.yaml")).remove(0);
    let values = serde_json::json!({
        "keda": {"enabled": true},
        "secret": {"create": true, "values": secret["stringData"]},
    });
    let dir = std::env::temp_dir().join(format!("ps-helm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("values.json");
    std::fs::write(&file, values.to_string()).unwrap();
    let all = helm_template(&[&file]);
    check_objects(&all);
    // The chart's defaults are the manifests' settings.
    let manifest = documents(&k8s.join("configmap.yaml")).remove(0);
    assert_eq!(all.kind("ConfigMap")["data"], manifest["data"]);
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ScaledObject",
        "TriggerAuthentication",
    ] {
        assert!(all.has(kind), "the chart renders no {kind}");
    }
    // By default the chart only refers to the Secret and leaves scaling to `replicaCount`.
    let plain = helm_template(&[]);
    assert!(!plain.has("Secret") && !plain.has("ScaledObject"));
    let deployment = plain.kind("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let refs = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"].to_string();
    assert!(refs.contains("\"product-sync\""), "{refs}");
    // Under KEDA the Deployment leaves replicas to the scaler.
    assert!(all.kind("Deployment")["spec"].get("replicas").is_none());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_dockerfile_is_multi_stage_and_runs_as_a_non_root_user() {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    assert!(
        text.lines().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "runs as {user}"
    );
    assert!(text.contains("PRODUCT_SYNC_ENV=production"));
    assert!(text.contains("--locked"));
}
