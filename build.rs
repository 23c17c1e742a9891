//! Compiles `proto/` with prost at build time. protoc comes from the system (Debian's
//! `protobuf-compiler`, installed by `scripts/stack.sh install`) or from `$PROTOC`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/causal_commit.proto");
    // sqlx::migrate! embeds migrations/ at compile time: a new migration must rebuild.
    println!("cargo:rerun-if-changed=migrations");
    prost_build::Config::new()
        .bytes(["."])
        .compile_protos(&["proto/causal_commit.proto"], &["proto/"])?;
    Ok(())
}
