//! vpc-cni: invoked by the container runtime with CNI_* variables and the
//! network configuration on stdin. The result or a spec error goes to stdout;
//! logs go to a file and stderr, never stdout.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;

use vpc_cni::netns::Pod;
use vpc_cni::plugin;
use vpc_cni::spec::{CniError, Command, Env, Msg, NetConf, DEFAULT_LOG_FILE, SUPPORTED};

/// Writes each log line to the log file (when it can be opened) and stderr.
struct Tee(Option<Mutex<std::fs::File>>);

impl Write for &Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = &self.0 {
            if let Ok(mut f) = f.lock() {
                f.write_all(buf).ok();
            }
        }
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn init_logging(conf: Option<&NetConf>) {
    let path = conf
        .and_then(|c| c.log_file.clone())
        .unwrap_or_else(|| DEFAULT_LOG_FILE.to_string());
    let file = (!path.is_empty())
        .then(|| {
            if let Some(dir) = std::path::Path::new(&path).parent() {
                std::fs::create_dir_all(dir).ok();
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .ok()
        })
        .flatten()
        .map(Mutex::new);
    // A plain level, not an env-filter: the plugin starts once per pod and
    // compiling filter directives would be on every ADD's path.
    let level = conf
        .and_then(|c| c.log_level.clone())
        .or_else(|| std::env::var("VPC_CNI_LOG").ok())
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    let tee: &'static Tee = Box::leak(Box::new(Tee(file)));
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || tee)
        .init();
}

fn fail(version: &str, e: &CniError) -> ! {
    tracing::error!(code = e.code(), "{e}");
    println!("{}", e.to_json(version));
    std::process::exit(1);
}

/// The `cniVersion` the input names, if it is JSON that names one.
fn asked_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .unwrap_or_default()
}

fn main() {
    let cmd = match Command::parse(&std::env::var("CNI_COMMAND").unwrap_or_default()) {
        Ok(c) => c,
        Err(e) => {
            init_logging(None);
            fail("1.1.0", &e);
        }
    };
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    if cmd == Command::Version {
        // VERSION may come with only {"cniVersion": ...} on stdin.
        println!("{}", plugin::version(&asked_version(&stdin)));
        return;
    }
    if let Err(e) = read {
        init_logging(None);
        fail(
            "1.1.0",
            &CniError::IoFailure(Msg::new("cannot read stdin", e)),
        );
    }
    let conf = match NetConf::parse(&stdin) {
        Ok(c) => c,
        Err(e) => {
            init_logging(None);
            // Answer in the configuration's version when it names one.
            let asked = asked_version(&stdin);
            fail(
                if SUPPORTED.contains(&asked.as_str()) {
                    &asked
                } else {
                    "1.1.0"
                },
                &e,
            );
        }
    };
    let env = match Env::load(cmd, |k| std::env::var(k).ok()) {
        Ok(e) => e,
        Err(e) => {
            init_logging(Some(&conf));
            fail(&conf.cni_version, &e)
        }
    };
    let out = if cmd == Command::Add {
        // The request to ipamd goes first, so that ipamd answers while the
        // plugin does the rest; on the fast path there is no runtime at all.
        match plugin::start_add(&env, &conf) {
            Ok(ask) => {
                // Nothing runs on this thread but this code (a gRPC
                // fallback's runtime runs only inside block_on): enter the
                // pod's namespace for a moment (see vpc_cni::netns).
                let pod = Pod::open(Path::new(&env.netns), None);
                init_logging(Some(&conf));
                match pod {
                    Ok(pod) => plugin::add(&env, &conf, pod, ask).map(Some),
                    Err(e) => Err(CniError::IoFailure(Msg::new("network namespace", e))),
                }
            }
            Err(e) => {
                init_logging(Some(&conf));
                Err(e)
            }
        }
    } else {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                init_logging(Some(&conf));
                fail(
                    &conf.cni_version,
                    &CniError::IoFailure(Msg::new("cannot start the runtime", e)),
                )
            }
        };
        // Before the runtime runs anything: CHECK enters the pod's namespace
        // on this thread for a moment (see vpc_cni::netns).
        let pod = plugin::prestart(cmd, &env.netns, &runtime);
        init_logging(Some(&conf));
        match pod {
            Ok(pod) => runtime.block_on(plugin::run(cmd, &env, &conf, pod)),
            Err(e) => Err(CniError::IoFailure(Msg::new("network namespace", e))),
        }
    };
    match out {
        Ok(Some(out)) => {
            println!("{out}");
        }
        Ok(None) => {}
        Err(e) => fail(&conf.cni_version, &e),
    }
    // The answer is out (stdout is flushed at its newline; logs are written
    // unbuffered). Exit without tearing down the runtime or waiting for
    // threads: the kernel closes the sockets, and the container runtime
    // waits to read our exit status.
    std::process::exit(0);
}
