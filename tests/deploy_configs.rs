//! Checks the deployment files under `deploy/` and the Dockerfile: Envoy accepts `deploy/envoy/envoy.yaml`
//! and it fails closed; the Kubernetes and Istio manifests keep the sidecar locked down, probed on its
//! metrics port and wired to the right ports; and every s2s-authz configuration and command line they ship
//! is accepted by the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;
use support::ChildGuard;

const ENVOY_CONFIG: &str = "deploy/envoy/envoy.yaml";
/// The key of the s2s-authz configuration in its ConfigMaps.
const CONFIG_KEY: &str = "s2s-authz.yaml";
const SIDECAR: &str = "s2s-authz";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn parse_yaml(text: &str, origin: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{origin} is not YAML: {e}"))
}

// ---------------------------------------------------------------------------------------------------------
// Manifests

/// One YAML file of Kubernetes objects (`---`-separated documents).
struct Manifest {
    file: String,
    docs: Vec<Value>,
}

impl Manifest {
    fn objects(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn object(&self, kind: &str, name: &str) -> &Value {
        self.objects(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} named `{name}`", self.file))
    }
}

/// Every `*.yaml` under `dir` (relative to the repository), parsed, in name order.
fn manifests(dir: &str) -> Vec<Manifest> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("listing {dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {dir}");
    files
        .into_iter()
        .map(|path| {
            let file = path
                .strip_prefix(repo())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
                .unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
            let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
            assert!(!docs.is_empty(), "{file} holds no documents");
            for doc in &docs {
                assert!(
                    doc["apiVersion"].is_string() && doc["kind"].is_string(),
                    "{file}: a document without apiVersion and kind: {doc}"
                );
            }
            Manifest { file, docs }
        })
        .collect()
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn addr(config: &Value, key: &str, origin: &str) -> SocketAddr {
    config[key]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{origin}: `{key}` must be set to an address: {}",
                config[key]
            )
        })
}

fn container<'a>(deployment: &'a Value, name: &str) -> Option<&'a Value> {
    array(&deployment["spec"]["template"]["spec"]["containers"])
        .iter()
        .find(|c| c["name"] == name)
}

/// A container port given by number or by the name of one of the pod's container ports.
fn resolve_port(deployment: &Value, port: &Value, only_in: Option<&Value>) -> Option<u64> {
    if let Some(n) = port.as_u64() {
        return Some(n);
    }
    let name = port.as_str()?;
    let containers: Vec<&Value> = match only_in {
        Some(c) => vec![c],
        None => array(&deployment["spec"]["template"]["spec"]["containers"])
            .iter()
            .collect(),
    };
    containers
        .into_iter()
        .flat_map(|c| array(&c["ports"]))
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
}

/// The s2s-authz container of a Deployment, with the configuration it is started with.
struct SidecarSpec<'a> {
    origin: String,
    deployment: &'a Value,
    container: &'a Value,
    /// The text of the configuration file, from the ConfigMap mounted where `--config` points.
    config_text: String,
    config: Value,
}

fn sidecars(manifest: &Manifest) -> Vec<SidecarSpec<'_>> {
    manifest
        .objects("Deployment")
        .into_iter()
        .map(|deployment| {
            let origin = format!(
                "{} Deployment `{}`",
                manifest.file,
                deployment["metadata"]["name"].as_str().unwrap_or("?")
            );
            let container = container(deployment, SIDECAR)
                .unwrap_or_else(|| panic!("{origin}: no `{SIDECAR}` container"));
            let args: Vec<&str> = array(&container["args"])
                .iter()
                .map(|a| a.as_str().expect("args are strings"))
                .collect();
            assert_eq!(args.first(), Some(&"serve"), "{origin}: args {args:?}");
            let config_path = args
                .iter()
                .position(|a| *a == "--config")
                .and_then(|i| args.get(i + 1))
                .unwrap_or_else(|| panic!("{origin}: no `--config FILE` in args {args:?}"));
            let (dir, key) = config_path.rsplit_once('/').unwrap();
            let mount = array(&container["volumeMounts"])
                .iter()
                .find(|m| m["mountPath"] == dir)
                .unwrap_or_else(|| panic!("{origin}: nothing is mounted at {dir}"));
            let volume = array(&deployment["spec"]["template"]["spec"]["volumes"])
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap_or_else(|| panic!("{origin}: no volume {}", mount["name"]));
            let config_map = volume["configMap"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{origin}: {dir} is not a ConfigMap volume"));
            let config_text = manifest.object("ConfigMap", config_map)["data"][key]
                .as_str()
                .unwrap_or_else(|| panic!("{origin}: ConfigMap `{config_map}` has no key {key}"))
                .to_owned();
            let config = parse_yaml(&config_text, &format!("{origin}: {config_path}"));
            SidecarSpec {
                origin,
                deployment,
                container,
                config_text,
                config,
            }
        })
        .collect()
}

/// A security-context field of the container, else of the pod (the container's value wins).
fn effective<'a>(sidecar: &'a SidecarSpec, pointer: &str) -> &'a Value {
    match sidecar.container["securityContext"].pointer(pointer) {
        Some(v) => v,
        None => sidecar.deployment["spec"]["template"]["spec"]["securityContext"]
            .pointer(pointer)
            .unwrap_or(&Value::Null),
    }
}

fn assert_locked_down(sidecar: &SidecarSpec) {
    let origin = &sidecar.origin;
    let security = &sidecar.container["securityContext"];
    assert_eq!(
        effective(sidecar, "/runAsNonRoot"),
        true,
        "{origin}: runAsNonRoot"
    );
    assert_ne!(effective(sidecar, "/runAsUser"), 0, "{origin}: runAsUser 0");
    assert_eq!(
        security["readOnlyRootFilesystem"], true,
        "{origin}: readOnlyRootFilesystem"
    );
    assert_eq!(
        security["allowPrivilegeEscalation"], false,
        "{origin}: allowPrivilegeEscalation"
    );
    assert!(
        array(&security["capabilities"]["drop"]).contains(&Value::from("ALL")),
        "{origin}: capabilities must drop ALL: {security}"
    );
    assert!(
        array(&security["capabilities"]["add"]).is_empty(),
        "{origin}: no capabilities added"
    );
    assert_eq!(
        effective(sidecar, "/seccompProfile/type"),
        "RuntimeDefault",
        "{origin}: seccomp profile"
    );
    let resources = &sidecar.container["resources"];
    for field in [
        "/requests/cpu",
        "/requests/memory",
        "/limits/cpu",
        "/limits/memory",
    ] {
        assert!(
            resources.pointer(field).is_some_and(|v| !v.is_null()),
            "{origin}: resources{field} missing: {resources}"
        );
    }
}

fn assert_probed_on_metrics_port(sidecar: &SidecarSpec) {
    let origin = &sidecar.origin;
    let metrics = addr(&sidecar.config, "metrics_addr", origin);
    assert!(
        !metrics.ip().is_loopback(),
        "{origin}: metrics_addr {metrics} is loopback: the kubelet's probes could not reach it"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &sidecar.container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{origin}: {probe} path");
        let port = resolve_port(sidecar.deployment, &get["port"], Some(sidecar.container));
        assert_eq!(
            port,
            Some(u64::from(metrics.port())),
            "{origin}: {probe} must probe the metrics port ({metrics})"
        );
    }
}

fn assert_admin_port_on_loopback(sidecar: &SidecarSpec) {
    let origin = &sidecar.origin;
    let admin = addr(&sidecar.config, "admin_addr", origin);
    assert!(admin.ip().is_loopback(), "{origin}: admin_addr {admin}");
    for env in array(&sidecar.container["env"]) {
        assert_ne!(
            env["name"], "S2S_AUTHZ_ADMIN_ADDR",
            "{origin}: the admin address comes from the configuration"
        );
    }
    let pod = &sidecar.deployment["spec"]["template"]["spec"];
    for port in array(&pod["containers"])
        .iter()
        .flat_map(|c| array(&c["ports"]))
    {
        assert_ne!(
            port["containerPort"].as_u64(),
            Some(u64::from(admin.port())),
            "{origin}: the admin port must not be published"
        );
    }
}

/// SQLite needs a writable directory, and the root filesystem is read-only: the data directory must be a
/// writable emptyDir mount.
fn assert_data_dir_writable(sidecar: &SidecarSpec) {
    let origin = &sidecar.origin;
    let data_dir = sidecar.config["data_dir"]
        .as_str()
        .unwrap_or_else(|| panic!("{origin}: `data_dir` must be set"));
    let mount = array(&sidecar.container["volumeMounts"])
        .iter()
        .find(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|p| Path::new(data_dir).starts_with(p))
        })
        .unwrap_or_else(|| panic!("{origin}: data_dir {data_dir} is on the read-only root"));
    assert_ne!(mount["readOnly"], true, "{origin}: {data_dir} is read-only");
    let volume = array(&sidecar.deployment["spec"]["template"]["spec"]["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(
        volume["emptyDir"].is_object(),
        "{origin}: {data_dir} should be an emptyDir"
    );
}

/// The database URL holds a password: it may only come from a Secret, never a literal or the ConfigMap.
fn database_url_secret<'a>(manifest: &'a Manifest, sidecar: &SidecarSpec) -> Option<&'a str> {
    let origin = &sidecar.origin;
    assert!(
        sidecar.config["database_url"].is_null(),
        "{origin}: database_url must not be in the ConfigMap"
    );
    let env = array(&sidecar.container["env"])
        .iter()
        .find(|e| e["name"] == "S2S_AUTHZ_DATABASE_URL")?;
    assert!(
        env["value"].is_null(),
        "{origin}: S2S_AUTHZ_DATABASE_URL must come from a Secret"
    );
    let reference = &env["valueFrom"]["secretKeyRef"];
    let name = reference["name"].as_str().expect("secretKeyRef.name");
    let key = reference["key"].as_str().expect("secretKeyRef.key");
    let secret = manifest.object("Secret", name);
    let url = secret["stringData"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{origin}: Secret `{name}` has no stringData.{key}"));
    Some(url)
}

/// A Service in the same file selects the pod and targets a port the pod has; returns that port.
fn service_target(manifest: &Manifest, deployment: &Value) -> u64 {
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let service = manifest
        .objects("Service")
        .into_iter()
        .find(|s| {
            s["spec"]["selector"]
                .as_object()
                .is_some_and(|sel| sel.iter().all(|(k, v)| &labels[k] == v))
        })
        .unwrap_or_else(|| panic!("{}: no Service selects the pod", manifest.file));
    let ports = array(&service["spec"]["ports"]);
    assert_eq!(ports.len(), 1, "{}: one Service port", manifest.file);
    resolve_port(deployment, &ports[0]["targetPort"], None).unwrap_or_else(|| {
        panic!(
            "{}: Service targetPort {} is no port of the pod",
            manifest.file, ports[0]["targetPort"]
        )
    })
}

// ---------------------------------------------------------------------------------------------------------
// Envoy

fn envoy_config() -> Value {
    parse_yaml(&read(ENVOY_CONFIG), ENVOY_CONFIG)
}

/// The HTTP connection manager of the `ingress` listener.
fn http_connection_manager(envoy: &Value) -> &Value {
    let listener = array(&envoy["static_resources"]["listeners"])
        .iter()
        .find(|l| l["name"] == "ingress")
        .expect("a listener named `ingress`");
    let filters = array(&listener["filter_chains"][0]["filters"]);
    &filters
        .iter()
        .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        .expect("an HTTP connection manager")["typed_config"]
}

fn ingress_port(envoy: &Value) -> u64 {
    let listener = array(&envoy["static_resources"]["listeners"])
        .iter()
        .find(|l| l["name"] == "ingress")
        .unwrap();
    listener["address"]["socket_address"]["port_value"]
        .as_u64()
        .unwrap()
}

fn cluster_endpoint<'a>(envoy: &'a Value, name: &str) -> (&'a Value, SocketAddr) {
    let cluster = array(&envoy["static_resources"]["clusters"])
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cluster `{name}`"));
    let socket = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    let endpoint = format!(
        "{}:{}",
        socket["address"].as_str().unwrap(),
        socket["port_value"]
    )
    .parse()
    .unwrap();
    (cluster, endpoint)
}

#[test]
fn envoy_config_validates() {
    let Some(envoy) = support::find_tool("envoy", "S2S_ENVOY", "envoy_config_validates") else {
        return;
    };
    let output = Command::new(&envoy)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(repo().join(ENVOY_CONFIG))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", envoy.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "envoy --mode validate: {text}");
    assert!(
        text.contains(&format!("'{}' OK", repo().join(ENVOY_CONFIG).display())),
        "{text}"
    );
}

/// What `--mode validate` cannot know: that the filter fails closed, reaches the sidecar over HTTP/2,
/// shows it the headers it decides on, and is skipped only for the health check.
#[test]
fn envoy_config_fails_closed_and_exempts_only_the_health_check() {
    let envoy = envoy_config();
    let hcm = http_connection_manager(&envoy);
    assert_eq!(
        hcm["normalize_path"], true,
        "paths are normalised before the check"
    );
    assert_eq!(hcm["merge_slashes"], true);

    let filters = array(&hcm["http_filters"]);
    let position = |name: &str| filters.iter().position(|f| f["name"] == name);
    let ext_authz = position("envoy.filters.http.ext_authz").expect("the ext_authz filter");
    let router = position("envoy.filters.http.router").expect("the router");
    assert!(ext_authz < router, "ext_authz must run before the router");

    let authz = &filters[ext_authz]["typed_config"];
    assert_eq!(authz["transport_api_version"], "V3");
    assert_eq!(authz["failure_mode_allow"], false);
    assert_eq!(authz["status_on_error"]["code"], "ServiceUnavailable");
    assert!(
        authz["with_request_body"].is_null(),
        "the body is not needed for a decision"
    );
    assert!(authz["grpc_service"]["timeout"].is_string());
    let patterns = array(&authz["allowed_headers"]["patterns"]);
    for (kind, header) in [
        ("exact", "authorization"),
        ("exact", "clienttype"),
        ("exact", "callerobjectid"),
        ("prefix", "x-s2s-"),
    ] {
        assert!(
            patterns.iter().any(|p| p[kind] == header),
            "allowed_headers must let the sidecar see {kind} `{header}`"
        );
    }

    let cluster_name = authz["grpc_service"]["envoy_grpc"]["cluster_name"]
        .as_str()
        .unwrap();
    let (cluster, endpoint) = cluster_endpoint(&envoy, cluster_name);
    assert_eq!(endpoint, "127.0.0.1:50051".parse().unwrap());
    assert!(
        cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            ["explicit_http_config"]["http2_protocol_options"]
            .is_object(),
        "the sidecar speaks gRPC: the cluster must use HTTP/2"
    );

    let hosts = array(&hcm["route_config"]["virtual_hosts"]);
    let routes: Vec<&Value> = hosts.iter().flat_map(|h| array(&h["routes"])).collect();
    let exempt: Vec<&Value> = routes
        .iter()
        .copied()
        .filter(|r| {
            r["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] == true
        })
        .collect();
    assert_eq!(exempt.len(), 1, "exactly one route skips ext_authz");
    assert_eq!(
        exempt[0]["match"],
        serde_json::json!({ "path": "/healthz" }),
        "only the exact health-check path skips ext_authz"
    );
    assert!(
        hosts.iter().all(|h| h["typed_per_filter_config"].is_null()),
        "no virtual host disables ext_authz"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Kubernetes and Istio

#[test]
fn kubernetes_sidecars_are_locked_down_probed_and_wired() {
    let envoy_text = read(ENVOY_CONFIG);
    let envoy_port = ingress_port(&envoy_config());
    let manifests = manifests("deploy/kubernetes");
    let mut deployments = BTreeMap::new();
    for manifest in &manifests {
        // Envoy's configuration in a ConfigMap is deploy/envoy/envoy.yaml itself, so what Envoy validated
        // above is what the pods run.
        for config_map in manifest.objects("ConfigMap") {
            if let Some(text) = config_map["data"]["envoy.yaml"].as_str() {
                assert!(
                    text == envoy_text,
                    "{}: ConfigMap `{}` differs from {ENVOY_CONFIG}",
                    manifest.file,
                    config_map["metadata"]["name"]
                );
            }
        }
        for sidecar in sidecars(manifest) {
            assert_locked_down(&sidecar);
            assert_probed_on_metrics_port(&sidecar);
            assert_admin_port_on_loopback(&sidecar);
            let database = database_url_secret(manifest, &sidecar);
            if database.is_none() {
                assert_data_dir_writable(&sidecar);
            }
            let grpc = addr(&sidecar.config, "grpc_addr", &sidecar.origin);
            assert_eq!(
                grpc,
                "127.0.0.1:50051".parse().unwrap(),
                "{}: Envoy in the pod asks 127.0.0.1:50051",
                sidecar.origin
            );

            let envoy = container(sidecar.deployment, "envoy")
                .unwrap_or_else(|| panic!("{}: no `envoy` container", sidecar.origin));
            let mounted = array(&envoy["volumeMounts"]).iter().any(|m| {
                array(&sidecar.deployment["spec"]["template"]["spec"]["volumes"])
                    .iter()
                    .any(|v| {
                        v["name"] == m["name"]
                            && manifests.iter().any(|other| {
                                other.objects("ConfigMap").iter().any(|c| {
                                    c["metadata"]["name"] == v["configMap"]["name"]
                                        && c["data"]["envoy.yaml"].is_string()
                                })
                            })
                    })
            });
            assert!(
                mounted,
                "{}: Envoy's ConfigMap is not mounted",
                sidecar.origin
            );
            assert_eq!(
                service_target(manifest, sidecar.deployment),
                envoy_port,
                "{}: the Service must send traffic to Envoy's listener, never around it",
                sidecar.origin
            );

            deployments.insert(manifest.file.clone(), database.map(str::to_owned));
        }
    }
    assert_eq!(
        deployments.len(),
        2,
        "sidecar.yaml and fleet-postgres.yaml: {deployments:?}"
    );
    assert_eq!(deployments["deploy/kubernetes/sidecar.yaml"], None);
    let url = deployments["deploy/kubernetes/fleet-postgres.yaml"]
        .as_deref()
        .expect("fleet-postgres.yaml sets S2S_AUTHZ_DATABASE_URL");
    assert!(url.starts_with("postgres://"), "{url}");
}

#[test]
fn istio_policy_sends_the_workload_to_its_own_sidecar_and_fails_closed() {
    let manifests = manifests("deploy/istio");
    let all: Vec<(&Manifest, &Value)> = manifests
        .iter()
        .flat_map(|m| m.docs.iter().map(move |d| (m, d)))
        .collect();
    let one = |kind: &str| -> &Value {
        let found: Vec<&Value> = all
            .iter()
            .filter(|(_, d)| d["kind"] == kind)
            .map(|(_, d)| *d)
            .collect();
        assert_eq!(found.len(), 1, "one {kind} in deploy/istio");
        found[0]
    };

    let policy = one("AuthorizationPolicy");
    assert_eq!(policy["spec"]["action"], "CUSTOM");
    let provider_name = policy["spec"]["provider"]["name"].as_str().unwrap();
    let providers = array(&one("IstioOperator")["spec"]["meshConfig"]["extensionProviders"]);
    let provider = &providers
        .iter()
        .find(|p| p["name"] == provider_name)
        .unwrap_or_else(|| panic!("no extension provider `{provider_name}`"))["envoyExtAuthzGrpc"];
    assert_eq!(provider["failOpen"], false, "the provider must fail closed");
    assert_eq!(provider["statusOnError"], "503");
    assert!(provider["timeout"].is_string());

    // The provider's service is the ServiceEntry that means "this pod's own sidecar".
    let entry = one("ServiceEntry");
    assert_eq!(
        entry["spec"]["hosts"],
        serde_json::json!([provider["service"]])
    );
    assert_eq!(entry["spec"]["resolution"], "STATIC");
    assert_eq!(entry["spec"]["endpoints"][0]["address"], "127.0.0.1");
    let entry_port = array(&entry["spec"]["ports"])
        .iter()
        .find(|p| p["number"] == provider["port"])
        .unwrap_or_else(|| panic!("the ServiceEntry has no port {}", provider["port"]));
    assert_eq!(entry_port["protocol"], "GRPC");

    let (workload, deployment) = all
        .iter()
        .find(|(_, d)| d["kind"] == "Deployment")
        .copied()
        .expect("a workload Deployment");
    let sidecars = sidecars(workload);
    let sidecar = sidecars
        .iter()
        .find(|s| std::ptr::eq(s.deployment, deployment))
        .unwrap();
    assert_locked_down(sidecar);
    assert_probed_on_metrics_port(sidecar);
    assert_admin_port_on_loopback(sidecar);
    assert_data_dir_writable(sidecar);
    let grpc = addr(&sidecar.config, "grpc_addr", &sidecar.origin);
    assert_eq!(grpc.ip().to_string(), "127.0.0.1");
    assert_eq!(provider["port"].as_u64(), Some(u64::from(grpc.port())));
    let kubernetes = sidecar_config_text("deploy/kubernetes/sidecar.yaml");
    assert!(
        sidecar.config_text == kubernetes,
        "{}: the configuration should be that of deploy/kubernetes/sidecar.yaml",
        sidecar.origin
    );

    // The policy selects the workload and covers the port its Service targets, not the metrics port.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selector = policy["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    assert!(
        selector.iter().all(|(k, v)| &labels[k] == v),
        "the policy's selector must match the workload's labels"
    );
    let app_port = service_target(workload, deployment).to_string();
    let metrics_port = addr(&sidecar.config, "metrics_addr", &sidecar.origin)
        .port()
        .to_string();
    let rules = array(&policy["spec"]["rules"]);
    assert!(!rules.is_empty(), "a CUSTOM policy needs rules");
    let ports: Vec<&Value> = rules
        .iter()
        .flat_map(|r| array(&r["to"]))
        .flat_map(|t| array(&t["operation"]["ports"]))
        .collect();
    assert!(ports.contains(&&Value::from(app_port.clone())), "{ports:?}");
    assert!(!ports.contains(&&Value::from(metrics_port)), "{ports:?}");
    assert!(
        container(deployment, "envoy").is_none(),
        "in a mesh the injected proxy enforces: no Envoy of its own"
    );
}

/// The s2s-authz configuration that the (one) sidecar of `file` is started with.
fn sidecar_config_text(file: &str) -> String {
    let manifest = Manifest {
        file: file.to_owned(),
        docs: serde_saphyr::from_multiple(&read(file)).unwrap(),
    };
    sidecars(&manifest).pop().expect("a sidecar").config_text
}

// ---------------------------------------------------------------------------------------------------------
// The real binary

/// A running `s2s-authz serve`, once it has announced its listeners.
struct Running {
    process: ChildGuard,
    metrics_addr: SocketAddr,
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
}

/// Starts the binary with `args` (plus `env`) and waits for its `s2s-authz listening` line; fails with its
/// output if it exits first. Discovery goes to a closed loopback port, so nothing leaves the machine.
fn start(what: &str, args: &[String], env: &[(String, String)]) -> Running {
    let mut command = support::binary();
    command
        .args(args)
        .args([
            "--instance",
            "http://127.0.0.1:9/",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: starting s2s-authz: {e}"));
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut process = ChildGuard::new(child, "s2s-authz");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + support::DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => panic!(
                "{what}: s2s-authz did not start ({e}); exit {:?}; args {args:?}; stderr:\n{}",
                process.wait_exit(support::DEADLINE),
                seen.join("\n")
            ),
        };
        if let Some(fields) = listening(&line) {
            let get = |key: &str| -> SocketAddr {
                fields
                    .get(key)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| panic!("{what}: no `{key}` in the log line {line}"))
            };
            return Running {
                process,
                grpc_addr: get("grpc_addr"),
                admin_addr: get("admin_addr"),
                metrics_addr: get("metrics_addr"),
            };
        }
        seen.push(line);
    }
}

/// The addresses of the `s2s-authz listening` log line, in either log format (the one the container's
/// environment chooses is kept, so a bad value there fails the start).
fn listening(line: &str) -> Option<BTreeMap<String, String>> {
    let fields: BTreeMap<String, String> = match serde_json::from_str::<Value>(line) {
        Ok(json) => {
            let fields = json["fields"].as_object()?;
            fields
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        }
        Err(_) => line
            .split_whitespace()
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    };
    let is_it = match fields.get("message") {
        Some(m) => m == "s2s-authz listening",
        None => line.contains("s2s-authz listening"),
    };
    is_it.then_some(fields)
}

impl Running {
    /// Healthy (the process is up), not ready (no signing keys: fail closed), stops cleanly on SIGTERM.
    fn check_and_stop(mut self, what: &str) {
        assert!(self.grpc_addr.ip().is_loopback() && self.admin_addr.ip().is_loopback());
        assert_eq!(
            support::http_get(self.metrics_addr, "/healthz").map(|(s, _)| s),
            Some(200),
            "{what}: /healthz"
        );
        assert_eq!(
            support::http_get(self.metrics_addr, "/readyz").map(|(s, _)| s),
            Some(503),
            "{what}: /readyz without signing keys"
        );
        self.process.signal("TERM");
        let status = self.process.wait_exit(support::DEADLINE);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{what}: exit on SIGTERM"
        );
    }
}

/// Every s2s-authz container in deploy/kubernetes and deploy/istio, started the way its pod starts it (its
/// args, with the ConfigMap's file, and its literal environment), with every port moved to loopback port 0
/// and the data directory to a temporary one. A configuration the binary refuses fails here.
#[test]
fn shipped_configurations_are_accepted_by_the_binary() {
    let mut started = 0;
    for manifest in manifests("deploy/kubernetes")
        .iter()
        .chain(&manifests("deploy/istio"))
    {
        for sidecar in sidecars(manifest) {
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join(CONFIG_KEY);
            std::fs::write(&config, &sidecar.config_text).unwrap();
            let mut args: Vec<String> = array(&sidecar.container["args"])
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect();
            let at = args.iter().position(|a| a == "--config").unwrap() + 1;
            args[at] = config.display().to_string();
            args.extend(
                [
                    "--grpc-addr",
                    "127.0.0.1:0",
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--data-dir",
                ]
                .map(str::to_owned),
            );
            args.push(dir.path().join("data").display().to_string());
            let env: Vec<(String, String)> = array(&sidecar.container["env"])
                .iter()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_owned(),
                        e["value"].as_str()?.to_owned(),
                    ))
                })
                .collect();
            start(&sidecar.origin, &args, &env).check_and_stop(&sidecar.origin);
            started += 1;
        }
    }
    assert_eq!(
        started, 3,
        "sidecar.yaml, fleet-postgres.yaml, istio/workload.yaml"
    );
}

/// The Dockerfile's default command line, with its paths moved to a temporary directory and its ports
/// to loopback port 0: every flag it uses must exist. It also publishes the decision and metrics ports
/// and never the admin port.
#[test]
fn dockerfile_command_line_is_accepted_by_the_binary() {
    let dockerfile = read("Dockerfile").replace("\\\n", " ");
    let instruction = |name: &str| -> Vec<String> {
        dockerfile
            .lines()
            .filter_map(|l| l.trim().strip_prefix(name).map(str::trim))
            .map(str::to_owned)
            .collect()
    };
    let cmd = instruction("CMD ");
    assert_eq!(cmd.len(), 1, "one CMD");
    let cmd: Vec<String> = serde_json::from_str(&cmd[0])
        .unwrap_or_else(|e| panic!("CMD is not an exec-form JSON array ({e}): {}", cmd[0]));
    let flag = |name: &str| -> &str {
        cmd.iter()
            .position(|a| a == name)
            .and_then(|i| cmd.get(i + 1))
            .unwrap_or_else(|| panic!("CMD has no {name}: {cmd:?}"))
    };
    let grpc: SocketAddr = flag("--grpc-addr").parse().unwrap();
    let metrics: SocketAddr = flag("--metrics-addr").parse().unwrap();
    assert!(
        grpc.ip().is_unspecified() && metrics.ip().is_unspecified(),
        "{cmd:?}"
    );
    let exposed: Vec<u16> = instruction("EXPOSE ")
        .iter()
        .flat_map(|l| l.split_whitespace().map(|p| p.parse().unwrap()))
        .collect();
    assert!(exposed.contains(&grpc.port()) && exposed.contains(&metrics.port()));
    assert!(!exposed.contains(&50052), "the admin port is loopback only");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join(CONFIG_KEY);
    std::fs::write(
        &config,
        sidecar_config_text("deploy/kubernetes/sidecar.yaml"),
    )
    .unwrap();
    let data = dir.path().join("data");
    let args: Vec<String> = cmd
        .iter()
        .map(|a| match a.as_str() {
            "/etc/s2s-authz/s2s-authz.yaml" => config.display().to_string(),
            "/var/lib/s2s-authz" => data.display().to_string(),
            "0.0.0.0:50051" | "0.0.0.0:9464" => "127.0.0.1:0".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    assert!(
        args.iter()
            .all(|a| !a.starts_with("0.0.0.0") && !a.starts_with("/etc/")),
        "every path and address of the CMD was moved: {args:?}"
    );
    start("Dockerfile CMD", &args, &[]).check_and_stop("Dockerfile CMD");
}

// ---------------------------------------------------------------------------------------------------------
// Envoy with mutual TLS

const ENVOY_MTLS_CONFIG: &str = "deploy/envoy/envoy-mtls.yaml";

/// The TLS context of a listener's filter chain or a cluster.
fn tls_context(holder: &Value) -> &Value {
    let socket = &holder["transport_socket"];
    assert_eq!(socket["name"], "envoy.transport_sockets.tls", "{holder}");
    &socket["typed_config"]
}

/// The mTLS variant validates (with its certificate paths pointed at certificates made here, since
/// Envoy reads them), requires client certificates from workloads (their SPIFFE id is what the sidecar
/// checks), talks to the sidecar over mTLS with h2 and a checked name, and still fails closed.
#[test]
fn envoy_mtls_config_validates_and_keeps_both_hops_mutual() {
    let envoy: Value = parse_yaml(&read(ENVOY_MTLS_CONFIG), ENVOY_MTLS_CONFIG);
    let listener = array(&envoy["static_resources"]["listeners"])
        .iter()
        .find(|l| l["name"] == "ingress")
        .expect("a listener named `ingress`");
    let downstream = tls_context(&listener["filter_chains"][0]);
    assert_eq!(downstream["require_client_certificate"], true);
    assert!(
        downstream["common_tls_context"]["validation_context"]["trusted_ca"]["filename"]
            .is_string()
    );
    let filters = array(&listener["filter_chains"][0]["filters"]);
    let hcm = &filters[0]["typed_config"];
    let ext_authz = array(&hcm["http_filters"])
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.ext_authz")
        .expect("ext_authz")["typed_config"]
        .clone();
    assert_eq!(ext_authz["failure_mode_allow"], false);
    assert_eq!(
        ext_authz["grpc_service"]["envoy_grpc"]["cluster_name"],
        "s2s_authz"
    );
    let (cluster, endpoint) = cluster_endpoint(&envoy, "s2s_authz");
    assert!(endpoint.ip().is_loopback());
    let upstream = tls_context(cluster);
    let common = &upstream["common_tls_context"];
    assert_eq!(common["alpn_protocols"], serde_json::json!(["h2"]));
    assert!(common["tls_certificates"][0]["certificate_chain"]["filename"].is_string());
    assert!(
        !array(&common["validation_context"]["match_typed_subject_alt_names"]).is_empty(),
        "the sidecar's certificate name is checked"
    );

    let Some(envoy_bin) = support::find_tool(
        "envoy",
        "S2S_ENVOY",
        "envoy_mtls_config_validates_and_keeps_both_hops_mutual",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = support::pki::Ca::new("mesh CA");
    ca.write(dir.path(), "ca");
    ca.server("ingress").write(dir.path(), "ingress");
    ca.workload("spiffe://cluster.local/ns/orders/sa/envoy")
        .write(dir.path(), "authz-client");
    let config =
        read(ENVOY_MTLS_CONFIG).replace("/etc/envoy/tls", &dir.path().display().to_string());
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(&envoy_bin)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "envoy --mode validate: {text}");
    assert!(text.contains("OK"), "{text}");
}
