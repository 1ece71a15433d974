//! ipamctl: the node's pool from a shell. Reads ipamd's loopback
//! introspection (`status`, `interfaces`, `assignments`, `explain`: a table,
//! or `--json`), and calls its socket as the CNI plugin does (`add`, `del`).
//! `install-cni` and `uninstall-cni` put the plugin on the node and take it
//! off (the chart's init container and uninstall step; see
//! [`ipamd::install`]).
//!
//! Exit status: 0 on an answer, 1 when ipamd refuses a call, 64 for bad
//! arguments (a plugin or conflist that is not a regular file, a conflist
//! name that is not `NAME.conflist`), 69 when ipamd cannot be reached, 74
//! when install-cni or uninstall-cni cannot write.

use std::fmt::Write as _;

use clap::{Parser, Subcommand};
use http_body_util::BodyExt;
use ipamd_api::v1::{AddNetworkRequest, DelNetworkRequest};
use serde_json::Value;

#[derive(Parser)]
#[command(
    version,
    about = "The node's IP pool: status, interfaces, assignments, explain; add/del"
)]
struct Cli {
    /// ipamd's gRPC socket (add, del).
    #[arg(long, global = true, env = "IPAMD_SOCKET", default_value = ipamd_api::DEFAULT_SOCKET)]
    socket: std::path::PathBuf,
    /// ipamd's introspection address (status, interfaces, assignments, explain).
    #[arg(
        long,
        global = true,
        env = "IPAMD_INTROSPECTION_ADDR",
        default_value = "127.0.0.1:61679"
    )]
    introspection: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The pool at a glance: readiness, counts, limits, why it cannot grow,
    /// the cloud calls.
    Status {
        /// The whole `/v1/pool` answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every interface with its addresses by state.
    Interfaces {
        /// `/v1/interfaces` as JSON (every address and its state).
        #[arg(long)]
        json: bool,
    },
    /// Every assignment: pod, address, interface.
    Assignments {
        /// `/v1/assignments` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Why POD (NAMESPACE/NAME) has an address or not; without POD, why the
    /// next ADD would get one or not.
    Explain {
        pod: Option<String>,
        /// The verdict with every fact behind it, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Same as `status --json` (kept for scripts).
    #[command(hide = true)]
    Pool,
    /// Ask for an address for CONTAINER_ID; prints the reply as JSON.
    Add {
        container_id: String,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long, default_value = "vpc-cni")]
        network: String,
        /// The pod, NAMESPACE/NAME, as the runtime's CNI_ARGS would name it.
        #[arg(long)]
        pod: Option<String>,
    },
    /// Install the vpc-cni plugin into the host's CNI bin directory (whole:
    /// a temporary file, then rename; only when it differs).
    InstallCni {
        /// The plugin to install (in the image).
        #[arg(long, default_value = "/usr/local/bin/vpc-cni")]
        source: std::path::PathBuf,
        /// The host's CNI bin directory, as mounted.
        #[arg(long)]
        bin_dir: std::path::PathBuf,
    },
    /// Remove the plugin (if it is SOURCE's copy) and the conflist (if its
    /// first plugin is vpc-cni) from the host: a clean uninstall.
    UninstallCni {
        /// The plugin as installed (in the image): the installed copy is
        /// removed only if it is the same.
        #[arg(long, default_value = "/usr/local/bin/vpc-cni")]
        source: std::path::PathBuf,
        /// The host's CNI bin directory, as mounted.
        #[arg(long)]
        bin_dir: std::path::PathBuf,
        /// The host's CNI conf directory, as mounted.
        #[arg(long)]
        conf_dir: std::path::PathBuf,
        /// The conflist's file name in --conf-dir (NAME.conflist).
        #[arg(long, default_value = "10-vpc-cni.conflist")]
        conflist_file: String,
    },
    /// Release CONTAINER_ID's address.
    Del {
        container_id: String,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long, default_value = "vpc-cni")]
        network: String,
    },
}

/// Ends the process: `code` with `msg` on stderr.
fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    eprintln!("ipamctl: {msg}");
    std::process::exit(code)
}

/// GET `path` from the introspection server (hyper, HTTP/1.1): the JSON
/// body of a 200, else exit 69 (unreachable) or 1 (an error answer).
async fn fetch(addr: &str, path: &str) -> Value {
    let unreachable = |e: &dyn std::fmt::Display| -> ! {
        fail(
            69,
            format!("introspection at {addr}: {e} (is ipamd running, with introspection on?)"),
        )
    };
    let stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => unreachable(&e),
    };
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut send, conn) = match hyper::client::conn::http1::handshake(io).await {
        Ok(x) => x,
        Err(e) => unreachable(&e),
    };
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "ipamd")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("a valid request");
    let resp = match send.send_request(req).await {
        Ok(r) => r,
        Err(e) => unreachable(&e),
    };
    let status = resp.status();
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => unreachable(&e),
    };
    let text = String::from_utf8_lossy(&body);
    if !status.is_success() {
        fail(1, format!("{path}: {status}: {}", text.trim()));
    }
    serde_json::from_str(&text).unwrap_or_else(|e| fail(1, format!("{path}: not JSON: {e}")))
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// A JSON value as a table cell: strings bare, null as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn status_text(p: &Value) -> String {
    let mut out = String::new();
    let i = &p["instance"];
    let c = &p["counts"];
    let _ = writeln!(
        out,
        "instance   {} ({}, {}), provider {}, node side {}",
        cell(&i["id"]),
        cell(&i["type"]),
        cell(&i["zone"]),
        cell(&p["provider"]),
        cell(&p["node_side"])
    );
    let ready = if p["ready"] == true {
        "yes".to_string()
    } else {
        let why: Vec<String> = p["not_ready_because"]
            .as_array()
            .map(|a| a.iter().map(cell).collect())
            .unwrap_or_default();
        format!("no: {}", why.join("; "))
    };
    let _ = writeln!(out, "ready      {ready}");
    let _ = writeln!(
        out,
        "limits     {} interfaces x {} addresses",
        cell(&i["max_interfaces"]),
        cell(&i["ipv4_per_interface"])
    );
    let _ = writeln!(
        out,
        "pool       {} interfaces, {} addresses: {} assigned, {} cooling, {} free ({} assignable); {} ADDs waiting",
        cell(&c["interfaces"]),
        cell(&c["total"]),
        cell(&c["assigned"]),
        cell(&c["cooling"]),
        cell(&c["available"]),
        cell(&c["assignable"]),
        cell(&p["waiting"])
    );
    let s = &p["status"];
    if !s["blocked"].is_null() {
        let _ = writeln!(out, "blocked    {}", s["blocked"]);
    }
    if !s["last_error"].is_null() {
        let _ = writeln!(
            out,
            "last error {} ({})",
            cell(&s["last_error"]),
            cell(&s["last_error_kind"])
        );
    }
    if let Some(api) = p["provider_api"].as_object().filter(|a| !a.is_empty()) {
        out.push('\n');
        let rows: Vec<Vec<String>> = api
            .iter()
            .map(|(name, a)| {
                vec![
                    name.clone(),
                    cell(&a["calls"]),
                    cell(&a["retries"]),
                    cell(&a["throttles"]),
                    cell(&a["errors"]),
                ]
            })
            .collect();
        out.push_str(&table(
            &["API", "CALLS", "RETRIES", "THROTTLED", "ERRORS"],
            &rows,
        ));
    }
    out
}

fn interfaces_text(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let count = |state: &str| {
                i["addresses"]
                    .as_array()
                    .map_or(0, |a| a.iter().filter(|x| x["state"] == state).count())
                    .to_string()
            };
            let mut flags = vec![];
            if i["ready"] != true {
                flags.push("node side pending");
            }
            if i["draining"] == true {
                flags.push("draining");
            }
            vec![
                cell(&i["id"]),
                cell(&i["device_index"]),
                cell(&i["subnet_id"]),
                cell(&i["primary_ip"]),
                count("assigned"),
                count("cooling"),
                count("free"),
                if flags.is_empty() {
                    "-".into()
                } else {
                    flags.join(", ")
                },
            ]
        })
        .collect();
    table(
        &[
            "INTERFACE",
            "DEVICE",
            "SUBNET",
            "PRIMARY IP",
            "ASSIGNED",
            "COOLING",
            "FREE",
            "NOTES",
        ],
        &rows,
    )
}

fn assignments_text(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            vec![
                cell(&a["pod"]),
                cell(&a["ip"]),
                if a["confirmed"] == true {
                    cell(&a["interface"])
                } else {
                    "(unconfirmed)".into()
                },
                format!("{}/{}", cell(&a["network"]), cell(&a["ifname"])),
            ]
        })
        .collect();
    table(&["POD", "IP", "INTERFACE", "NETWORK/IFNAME"], &rows)
}

fn explain_text(e: &Value) -> String {
    let mut out = format!(
        "{}: {}\n{}\n",
        cell(&e["subject"]),
        cell(&e["verdict"]),
        cell(&e["message"])
    );
    if let Some(f) = e["facts"].as_object() {
        out.push_str("\nfacts:\n");
        for (k, v) in f {
            if !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()) {
                let _ = writeln!(out, "  {k}: {}", cell(v));
            }
        }
    }
    out
}

fn print(json: bool, v: &Value, text: fn(&Value) -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(v).expect("JSON values print")
        );
    } else {
        print!("{}", text(v));
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        if e.use_stderr() {
            eprint!("{e}");
            std::process::exit(64)
        }
        e.exit()
    });
    let at = cli.introspection.as_str();
    if at.parse::<std::net::SocketAddr>().is_err() {
        fail(
            64,
            format!("--introspection {at:?}: expected ADDRESS:PORT, e.g. 127.0.0.1:61679"),
        );
    }
    match &cli.cmd {
        Cmd::Status { json } => return print(*json, &fetch(at, "/v1/pool").await, status_text),
        Cmd::Pool => return print(true, &fetch(at, "/v1/pool").await, status_text),
        Cmd::Interfaces { json } => {
            return print(*json, &fetch(at, "/v1/interfaces").await, interfaces_text)
        }
        Cmd::Assignments { json } => {
            return print(*json, &fetch(at, "/v1/assignments").await, assignments_text)
        }
        Cmd::Explain { pod, json } => {
            let path = match pod {
                None => "/v1/explain".to_string(),
                // Kubernetes names only: they need no escaping in the URL.
                Some(p) => match ipamd::datastore::PodName::parse(p).filter(|n| {
                    ipamd_api::names::check_k8s_name("namespace", &n.namespace).is_ok()
                        && ipamd_api::names::check_k8s_name("name", &n.name).is_ok()
                }) {
                    Some(p) => format!("/v1/explain?pod={}/{}", p.namespace, p.name),
                    None => fail(
                        64,
                        format!("{p:?}: expected NAMESPACE/NAME, each a Kubernetes name (a-z, 0-9, '-', '.')"),
                    ),
                },
            };
            return print(*json, &fetch(at, &path).await, explain_text);
        }
        Cmd::InstallCni { source, bin_dir } => {
            match ipamd::install::install_plugin(source, bin_dir) {
                Ok(true) => println!(
                    "installed {}",
                    bin_dir.join(ipamd::install::PLUGIN).display()
                ),
                Ok(false) => println!(
                    "{} is up to date",
                    bin_dir.join(ipamd::install::PLUGIN).display()
                ),
                // A source or destination that is not a regular file.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    fail(64, format!("install-cni: {e}"))
                }
                Err(e) => fail(74, format!("install-cni into {}: {e}", bin_dir.display())),
            }
            return;
        }
        Cmd::UninstallCni {
            source,
            bin_dir,
            conf_dir,
            conflist_file,
        } => {
            match ipamd::install::uninstall(source, bin_dir, conf_dir, conflist_file) {
                Ok(r) => {
                    for p in [r.plugin, r.conflist].into_iter().flatten() {
                        println!("removed {}", p.display());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    fail(64, format!("uninstall-cni: {e}"))
                }
                Err(e) => fail(74, format!("uninstall-cni: {e}")),
            }
            return;
        }
        Cmd::Add { .. } | Cmd::Del { .. } => {}
    }
    let cli_socket = cli.socket.clone();
    let mut client = match ipamd_api::client(&cli.socket).await {
        Ok(c) => c,
        Err(e) => fail(69, e),
    };
    let out = match cli.cmd {
        Cmd::Add {
            container_id,
            ifname,
            network,
            pod,
        } => {
            let (pod_namespace, pod_name) =
                match pod.as_deref().map(ipamd::datastore::PodName::parse) {
                    None => Default::default(),
                    Some(Some(p)) => (p.namespace, p.name),
                    Some(None) => fail(64, "--pod: expected NAMESPACE/NAME"),
                };
            client
                .add_network(AddNetworkRequest {
                    network_name: network,
                    container_id,
                    ifname,
                    pod_namespace,
                    pod_name,
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    let i = r.interface.unwrap_or_default();
                    serde_json::json!({
                        "ip": r.ipv4_address,
                        "interface": i.id,
                        "device_number": i.device_number,
                        "route_table": i.route_table,
                        "vpc_cidrs": r.vpc_cidrs,
                        "node_ip": r.node_ip,
                    })
                })
        }
        Cmd::Del {
            container_id,
            ifname,
            network,
        } => client
            .del_network(DelNetworkRequest {
                network_name: network,
                container_id,
                ifname,
                ..Default::default()
            })
            .await
            .map(|r| {
                let r = r.into_inner();
                serde_json::json!({"found": r.found, "ip": r.ipv4_address})
            }),
        _ => unreachable!("answered above"),
    };
    match out {
        Ok(v) => println!("{v}"),
        // No answer from ipamd at all (nothing, or not ipamd, on the socket).
        Err(s)
            if s.code() == tonic::Code::Unavailable || s.message().contains("transport error") =>
        {
            fail(
                69,
                format!(
                    "{}: {} (is ipamd running?)",
                    cli_socket.display(),
                    s.message()
                ),
            )
        }
        Err(s) => fail(1, format!("{:?}: {}", s.code(), s.message())),
    }
}
