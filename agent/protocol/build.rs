//! Generates the protobuf messages and the async ttrpc client and server of `proto/agent.proto` with
//! ttrpc-codegen's pure-Rust parser (no protoc).

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out_dir =
        std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "OUT_DIR is not set")
        })?);
    Codegen::new()
        .out_dir(&out_dir)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;
    // The generated mod.rs opens with an inner attribute, which `include!` refuses: write our own.
    std::fs::write(
        out_dir.join("generated.rs"),
        "pub mod agent;\npub mod agent_ttrpc;\n",
    )
}
