fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ipamd.proto");
    // protox is a pure-Rust protobuf compiler: no system protoc is needed.
    let fds = protox::compile(["ipamd.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
