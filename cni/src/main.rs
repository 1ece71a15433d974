//! vpc-cni: the CNI plugin. The full CNI front and datapath come with the
//! plugin work; this binary answers VERSION so the crate builds and links
//! only the wire contract.

fn main() {
    let cmd = std::env::var("CNI_COMMAND").unwrap_or_default();
    if cmd == "VERSION" {
        println!(
            "{}",
            serde_json::json!({
                "cniVersion": "1.1.0",
                "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]
            })
        );
        return;
    }
    let _ = ipamd_api::DEFAULT_SOCKET;
    eprintln!("vpc-cni: command {cmd:?} is not implemented yet");
    println!(
        "{}",
        serde_json::json!({"cniVersion": "1.1.0", "code": 4, "msg": "unsupported CNI_COMMAND", "details": cmd})
    );
    std::process::exit(1);
}
